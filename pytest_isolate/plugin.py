"""The pytest plugin: options, the ``isolated`` marker and the protocol hook.

Precedence of every option, low to high:
  1. built-in defaults (pytest_isolate.spec.IsolationSpec)
  2. ini keys (``isolate_memory = 200M`` in pytest.ini / pyproject.toml)
  3. command line (``--isolate-memory=200M``)
  4. markers, nearest first (function < class < module ``pytestmark``)

Three error channels, never mixed: a bad command-line or ini value is a
pytest.UsageError; a bad marker argument is an error on that one test; a host
that lacks a feature errors (or skips) the test that needs it, naming the fix.
"""

from __future__ import annotations

import collections
import importlib.metadata
import os
import sys
from collections.abc import Generator
from typing import Any

import pytest
from _pytest.runner import runtestprotocol as _plain_runtestprotocol

from . import _pytest_compat as compat
from .engine import Engine
from .spec import OPTIONS, IsolationSpec, SpecError, default_values, format_size, resolve_spec

__all__ = ["runtestprotocol"]

_spec_key = pytest.StashKey["IsolationSpec | SpecError"]()
_engine_key = pytest.StashKey[Engine]()
_base_key = pytest.StashKey[dict[str, Any]]()
_peaks_key = pytest.StashKey[list[tuple[int, str]]]()
_specs_key = pytest.StashKey[dict[IsolationSpec, IsolationSpec]]()

MARKER_DOC = (
    "isolated(enabled=True, *, timeout=None, memory=None, pids=None, cpu=None, "
    "caps_drop=(), caps_add=(), seccomp=True, net='none', pod=None, hostname='isolated', "
    "fs='readonly', rootfs=None, binds=(), env=None, strict=False, tmpfs_size='512M', "
    "layers='all'): run the test in a throw-away Linux container (own namespaces, read-only "
    "root, cgroup limits, capabilities dropped, syscall filter). isolated(False) runs it "
    "without isolation under --isolate. Options: see docs/options.md."
)

# Distributions that cannot be installed beside this one (same import name or
# the same marker and flag with other meanings).
_CLASHING = {
    "pytest-isolate": "PyPI's 'pytest-isolate' (another project) uses the same import name "
    "'pytest_isolate' and the same --isolate flag",
    "pytest-isolated": "'pytest-isolated' owns a marker also called 'isolated'",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(
        "isolate", "run tests in throw-away Linux containers (pytest-isolate-linux)"
    )
    group.addoption(
        "--isolate",
        action="store_true",
        default=None,
        help="isolate every collected test (ini: isolate = true)",
    )
    parser.addini(
        "isolate", type="bool", default=False, help="isolate every collected test (--isolate)"
    )
    for option in OPTIONS:
        group.addoption(
            option.cli,
            dest="isolate_" + option.name,
            metavar=option.metavar,
            default=None,
            help=f"{option.help} (ini: {option.ini})",
        )
        parser.addini(option.ini, help=f"{option.help} ({option.cli})", default=None)
    group.addoption(
        "--isolate-peak-memory",
        type=int,
        metavar="N",
        default=None,
        dest="isolate_peak_memory_n",
        help="show the N isolated tests with the highest peak memory "
        "(N=0: all; ini: isolate_peak_memory)",
    )
    parser.addini("isolate_peak_memory", help="like --isolate-peak-memory", default=None)
    group.addoption(
        "--isolate-doctor",
        action="store_true",
        default=False,
        help="check which isolation features this host supports, print the fixes "
        "for those missing, and exit",
    )


def _check_clashes() -> None:
    for name, why in _CLASHING.items():
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        raise pytest.UsageError(
            f"pytest-isolate-linux cannot run beside the installed distribution {name!r}: "
            f"{why}.\nUninstall one of them, e.g. `pip uninstall {name}`."
        )


def _base_values(config: pytest.Config) -> dict[str, Any]:
    """Defaults < ini < command line, each parsed once; bad values are usage errors."""
    from .spec import parse_option

    values = default_values()
    values["enabled"] = bool(config.getini("isolate"))
    if config.getoption("isolate"):
        values["enabled"] = True
    for option in OPTIONS:
        raw_ini = config.getini(option.ini)
        raw_cli = config.getoption("isolate_" + option.name)
        for source, raw in (
            (f"ini {option.ini} = {raw_ini!r}", raw_ini),
            (f"{option.cli}={raw_cli}", raw_cli),
        ):
            if raw in (None, "", []):
                continue
            try:
                values[option.name] = parse_option(option.name, raw)
            except SpecError as exc:
                raise pytest.UsageError(f"{source}: {exc}") from None
    return values


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_DOC)
    _check_clashes()
    base = _base_values(config)
    config.stash[_base_key] = base
    config.stash[_peaks_key] = []
    config.stash[_specs_key] = {}
    if _peak_memory_count(config) is not None:
        config.pluginmanager.register(_PeakRecorder(config.stash[_peaks_key]), "isolate-peaks")
    if base["enabled"] and not sys.platform.startswith("linux"):
        raise pytest.UsageError(
            f"--isolate needs Linux (namespaces, cgroups); this is {sys.platform}. "
            "Run without --isolate, or on a Linux host or VM."
        )
    if base["enabled"] and not hasattr(os, "fork"):
        raise pytest.UsageError("--isolate needs os.fork(), which this Python lacks")
    engine = config.stash[_engine_key] = Engine(config, spec_for)
    config.add_cleanup(compat.install_protocol(runtestprotocol))
    if base["enabled"] and _runs_tests_here(config):
        # Started now, the init factory's interpreter starts while pytest
        # configures the other plugins and collects (pytest_unconfigure
        # closes it, even when a later plugin fails to configure).
        engine.warm_up()


def _runs_tests_here(config: pytest.Config) -> bool:
    """Tests run in this process: not only collected or listed (--co,
    --fixtures, --markers, --help, --version), not the xdist controller."""
    option = config.option
    if any(
        getattr(option, name, False)
        for name in (
            "collectonly",
            "help",
            "version",
            "markers",
            "showfixtures",
            "show_fixtures_per_test",
        )
    ):
        return False
    return hasattr(config, "workerinput") or getattr(option, "dist", "no") == "no"


def pytest_unconfigure(config: pytest.Config) -> None:
    engine = config.stash.get(_engine_key, None)
    if engine is not None:
        engine.close()
        del config.stash[_engine_key]


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtestloop(session: pytest.Session) -> Generator[None, object, object]:
    """Merge the sandboxes' coverage before pytest-cov's own wrapper (outside
    this one) saves and reports. Before any test: the session's warning
    filters, which every sandbox starts from (compat.record_warnings)."""
    compat.remember_session_warnings(session.config)
    try:
        return (yield)
    finally:
        engine = session.config.stash.get(_engine_key, None)
        if engine is not None:
            engine.close()
            engine.merge_coverage()


def pytest_sessionfinish(session: pytest.Session) -> None:
    engine = session.config.stash.get(_engine_key, None)
    if engine is not None:
        engine.close()


def pytest_cmdline_main(config: pytest.Config) -> int | None:
    if config.getoption("isolate_doctor", False):
        from .doctor import run_doctor

        return run_doctor(print)
    return None


def spec_for(item: pytest.Item) -> IsolationSpec:
    """The item's spec, resolved once (SpecError re-raised on every call)."""
    cached = item.stash.get(_spec_key, None)
    if cached is None:
        try:
            base: dict[str, Any] = item.config.stash[_base_key]
            spec = resolve_spec(
                base=base,
                marker_layers=[(m.args, m.kwargs) for m in item.iter_markers("isolated")],
                where=item.nodeid,
            )
            # One object per distinct spec, shared by every item that has it:
            # pytest's process keeps no per-test copy (10,000 tests, one spec).
            cached = item.config.stash[_specs_key].setdefault(spec, spec)
        except SpecError as exc:
            cached = exc
        item.stash[_spec_key] = cached
    if isinstance(cached, SpecError):
        raise cached
    return cached


def runtestprotocol(
    item: pytest.Item, log: bool = True, nextitem: pytest.Item | None = None
) -> list[pytest.TestReport]:
    """pytest's runtestprotocol, isolated where the item's spec says so.

    Installed in place of pytest's own (and pytest-rerunfailures' reference to
    it): whichever plugin runs the protocol, and however often, every run of
    an isolated item is isolated.
    """
    engine = item.config.stash.get(_engine_key, None)
    if engine is None:
        # A session without this plugin running in the same process as one
        # with it (pytester's runpytest_inprocess with -p no:isolate or
        # PYTEST_DISABLE_PLUGIN_AUTOLOAD): the runner's lookup still finds us.
        return _plain_runtestprotocol(item, log=log, nextitem=nextitem)
    try:
        spec = spec_for(item)
    except SpecError as exc:
        reports = [
            engine._report(item, "setup", str(exc), spec=None),
            engine._teardown(item, nextitem, None),
        ]
    else:
        if _runs_plainly(item, spec):
            engine.generation += 1  # pytest's process runs this one: its state moves on
            return _plain_runtestprotocol(item, log=log, nextitem=nextitem)
        if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
            reports = [
                engine._report(
                    item,
                    "setup",
                    f"{item.nodeid}: isolation needs Linux and os.fork(); this is {sys.platform}",
                    spec=spec,
                ),
                engine._teardown(item, nextitem, None),
            ]
        else:
            compat.move_fault_timer(item)
            compat.reset_rerun_state(item)
            reports = engine.run(item, nextitem, spec)
    compat.note_rerun_reports(item, reports)
    if compat.record_dependency_results(item, reports):
        engine.results_recorded()
    try:
        _log(item, reports, engine.take_logged(), log)
    finally:
        engine.finish_item()
    exit_request, engine.pending_exit = engine.pending_exit, None
    if exit_request is not None:
        pytest.exit(exit_request[0], exit_request[1])
    interrupted, engine.pending_interrupt = engine.pending_interrupt, None
    if interrupted is not None:
        raise KeyboardInterrupt(f"raised by {item.nodeid} at {interrupted}")
    return reports


def _log(
    item: pytest.Item,
    reports: list[pytest.TestReport],
    logged: list[tuple[str, pytest.TestReport]],
    log: bool,
) -> None:
    """Log the reports the test logged during its phases (pytest 9's
    subtests: always, as they would have been, whatever ``log`` says), each
    before its phase's report, and with ``log`` the phase reports."""
    if not log:
        for _, report in logged:
            item.ihook.pytest_runtest_logreport(report=report)
        return
    pending = collections.deque(logged)
    for report in reports:
        while pending and pending[0][0] == report.when:
            item.ihook.pytest_runtest_logreport(report=pending.popleft()[1])
        item.ihook.pytest_runtest_logreport(report=report)
    for _, report in pending:
        item.ihook.pytest_runtest_logreport(report=report)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    """Around every protocol (ours, pytest's, pytest-rerunfailures'): tear
    down wider fixtures held back while reruns were possible. Notes the
    item's attributes first (compat.note_protocol_start), before the
    protocol wrappers of other plugins add theirs."""
    compat.note_protocol_start(item)
    try:
        return (yield)
    finally:
        engine = item.config.stash.get(_engine_key, None)
        if engine is not None:
            failed = engine.finish_protocol(item)
            if failed is not None:
                item.ihook.pytest_runtest_logreport(report=failed)


@pytest.hookimpl(wrapper=True)
def pytest_report_teststatus(
    report: pytest.TestReport, config: pytest.Config
) -> Generator[None, Any, Any]:
    result = yield
    summary = getattr(report, "isolate_summary", None)
    verbose = config.get_verbosity()
    if summary and verbose > 0 and isinstance(result, tuple) and len(result) == 3:
        category, letter, word = result
        tag = f"[isolated: {summary}]" if verbose > 1 else "[isolated]"
        if isinstance(word, tuple) and word and word[0]:
            word = (f"{word[0]} {tag}", *word[1:])
        elif isinstance(word, str) and word:
            word = f"{word} {tag}"
        result = (category, letter, word)
    return result


def _runs_plainly(item: pytest.Item, spec: IsolationSpec) -> bool:
    """runtestprotocol runs ``item`` in pytest's process: isolation is off
    for it, or a skip marker skips it (no fixture, no fork)."""
    return not spec.enabled or compat.evaluate_skip(item)


#: pytest-timeout's timer for this item was left to its sandbox.
_timer_in_sandbox_key = pytest.StashKey[bool]()


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    """pytest-timeout's timer for a whole isolated test is armed in its
    sandbox (child.run_in_sandbox), where the test runs, and not here: the
    alarm would interrupt pytest's process while it waits for the test."""
    from .child import in_sandbox

    if in_sandbox() or _engine_key not in item.config.stash:
        return None
    try:
        if _runs_plainly(item, spec_for(item)):
            return None
    except SpecError:
        return None
    item.stash[_timer_in_sandbox_key] = True
    return True


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_timeout_cancel_timer(item: pytest.Item) -> bool | None:
    from .child import in_sandbox

    # In the sandbox the timer is its own (a copy of the stash may say otherwise).
    if not in_sandbox() and item.stash.get(_timer_in_sandbox_key, False):
        del item.stash[_timer_in_sandbox_key]
        return True
    return None


def pytest_warning_recorded(warning_message: Any, when: str, nodeid: str) -> None:
    from .child import forward_warning

    forward_warning(warning_message, when, nodeid)


class _PeakRecorder:
    """Collects peak memory from reports (in the xdist controller too, where
    reports arrive from the workers with their attributes)."""

    def __init__(self, peaks: list[tuple[int, str]]) -> None:
        self.peaks = peaks

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        peak = getattr(report, "isolate_peak_memory", None)
        if isinstance(peak, int) and not isinstance(peak, bool):
            self.peaks.append((peak, report.nodeid))


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    base = config.stash.get(_base_key, {})
    if not base.get("enabled") and config.get_verbosity() < 1:
        return None
    from .doctor import header_line

    return [header_line(config.stash[_engine_key])]


def _forks_line(engine: Any) -> str:
    """-vv: how the sandboxes were made (docs/performance.md explains each)."""
    counts = engine.counts
    line = (
        f"isolate: {counts['sandboxes']} sandboxes, {counts['prepared']} prepared during "
        f"the previous test, {counts['by_zygote']} forked by {counts['zygotes']} "
        f"zygote{'' if counts['zygotes'] == 1 else 's'}"
    )
    reason = engine.zygote_unavailable
    line += f" (zygote off: {reason})" if reason else ""
    line += (
        f", {engine.roots_copied} roots copied from their spec's template, "
        f"{engine.sandboxes_reused} sandboxes reset and used again"
    )
    failures, reason = engine.reset_failures
    if failures:
        line += f" ({failures} resets failed, the last: {reason})"
    failures, reason = engine.init_failures
    if failures:
        line += f" ({failures} inits the factory could not make, the last: {reason})"
    return line


def _peak_memory_count(config: pytest.Config) -> int | None:
    """--isolate-peak-memory / ini isolate_peak_memory, or None when not asked."""
    count: int | None = config.getoption("isolate_peak_memory_n")
    if count is None:
        raw = config.getini("isolate_peak_memory")
        if raw in (None, ""):
            return None
        try:
            count = int(raw)
        except ValueError:
            raise pytest.UsageError(
                f"ini isolate_peak_memory = {raw!r}: use a whole number, e.g. 10"
            ) from None
    return count


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    engine = config.stash.get(_engine_key, None)
    if engine is not None and engine.counts["sandboxes"] and config.get_verbosity() >= 2:
        terminalreporter.write_line(_forks_line(engine))
    count = _peak_memory_count(config)
    if count is None:
        return
    recorded: list[tuple[int, str]] = config.stash[_peaks_key]
    peaks = sorted(recorded, reverse=True)
    if count:
        peaks = peaks[:count]
    title = "isolated tests by peak memory" + (f" (top {count})" if count else "")
    terminalreporter.write_sep("=", title)
    if not peaks:
        terminalreporter.write_line("(no isolated test reported its peak memory)")
    for peak, nodeid in peaks:
        terminalreporter.write_line(f"{format_size(peak):>12}  {nodeid}")
