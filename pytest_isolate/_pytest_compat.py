"""Every use of pytest's private internals, in one place.

Splitting a test's protocol between pytest's process (fixtures of wider scope,
set up once) and the sandbox (function-scoped fixtures, the test, its
teardown) needs pytest's setup state and fixture caches, which have no public
API. Each function says which internal it relies on; tests/test_compat.py fails
loudly when a pytest release changes one of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import pluggy
import pytest
from _pytest.nodes import Node
from _pytest.runner import CallInfo, call_and_report, show_test_item

__all__ = [
    "basetemp",
    "call_in_phase",
    "evaluate_skip",
    "init_request",
    "install_protocol",
    "record_warnings",
    "redirect_capture",
    "release_parent_finalizers",
    "run_phases",
    "setup_shared",
    "shared_snapshot",
    "teardown_shared",
]


#: pytest's no-op Node.setup and Node.teardown: collectors that do not
#: override them run no code entering or leaving.
_NODE_SETUP = Node.setup
_NODE_TEARDOWN = Node.teardown


def init_request(item: pytest.Item) -> None:
    """runtestprotocol re-creates the fixture request after a previous run
    (pytest-rerunfailures runs an item more than once)."""
    if hasattr(item, "_request") and not item._request:
        item._initrequest()  # type: ignore[attr-defined]


def evaluate_skip(item: pytest.Item) -> bool:
    """True when a skip/skipif marker skips the item: pytest never sets up
    fixtures for it, so neither do we (no fork for a skipped test)."""
    from _pytest.skipping import evaluate_skip_marks

    try:
        return evaluate_skip_marks(item) is not None
    except Exception:
        return False  # a broken skipif condition errors in the sandbox, as in pytest


def _wider_fixtures(item: pytest.Item) -> list[Any]:
    """The item's fixtures of wider than function scope, which pytest's
    process sets up. A class-scoped fixture of a test outside a class is
    not one: pytest registers its teardown on the test itself (the scope's
    node falls back to the item), so it is set up and torn down for each
    test, in the sandbox (pytest-django's autouse ``_django_setup_unittest``)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return []
    in_class: bool | None = None
    defs = []
    for name in getattr(item, "fixturenames", ()):
        chain = info.name2fixturedefs.get(name)
        if not chain or chain[-1].scope == "function":
            continue
        if chain[-1].scope == "class":
            if in_class is None:
                in_class = item.getparent(pytest.Class) is not None
            if not in_class:
                continue
        defs.append((name, chain[-1]))
    return defs


def setup_shared(item: pytest.Item) -> None:
    """Set up, in pytest's process, the collectors above the item and every
    fixture of wider than function scope it uses: they are created once and
    inherited by every sandbox (SetupState.setup, FixtureRequest)."""
    __tracebackhide__ = True  # pytest leaves this frame out of failure reports
    session = item.session
    parent = item.parent
    assert parent is not None
    session._setupstate.setup(parent)  # type: ignore[arg-type]
    request = getattr(item, "_request", None)
    if request is None:
        return
    # pytest 9.1+ treats a request whose item is not on the setup stack as one
    # made during teardown. The item is on the stack only while its wider
    # fixtures are requested here; its own setup happens in the sandbox.
    stack = session._setupstate.stack
    stack[item] = ([], None)
    try:
        for name, _ in _wider_fixtures(item):
            request.getfixturevalue(name)
    finally:
        finalizers, _ = stack.pop(item)
        # Only wider fixtures ran: their finalizers belong to their own scope's node.
        assert not finalizers, f"function-level finalizers in pytest's process: {finalizers}"


def shared_snapshot(item: pytest.Item) -> tuple[int, ...] | None:
    """Identity of the state a sandbox for ``item`` inherits: the setup stack
    and each wider fixture's cached value. None when a fixture is not cached
    yet (its setup would change pytest's process, so no sandbox can be
    prepared in advance)."""
    return _snapshot(item, list(item.session._setupstate.stack))


def predicted_snapshot(item: pytest.Item, nextitem: pytest.Item) -> tuple[int, ...] | None:
    """While ``item`` runs: the snapshot pytest's process will have when
    ``nextitem``'s turn comes, if getting there runs no code in it. In the
    same parent that is the current one. Across a module (or class, or
    directory) boundary, only when every collector left behind has no
    finalizer and no error (its teardown does nothing), every collector
    entered has pytest's no-op ``setup`` (not a package, whose ``setup`` may
    run ``setup_module`` of ``__init__.py``), and every wider fixture
    ``nextitem`` uses is cached already. None otherwise: the sandbox is then
    made when ``nextitem``'s turn comes, after that code ran."""
    if nextitem.parent is item.parent:
        return shared_snapshot(nextitem)
    stack = item.session._setupstate.stack
    chain = nextitem.listchain()[:-1]
    if not _quiet_teardown(stack, chain) or not _quiet_setup(stack, chain):
        return None
    return _snapshot(nextitem, chain)


def quiet_teardown(nextitem: pytest.Item | None, session: pytest.Session) -> bool:
    """True when teardown_shared(_, nextitem) runs nothing but pytest's no-op
    teardown of collectors without finalizers: pytest's state then changes
    only in its setup stack, which a sandbox forked before puts right itself
    (leave_other_collectors)."""
    chain = nextitem.listchain() if nextitem is not None else []
    return _quiet_teardown(session._setupstate.stack, chain)


def quiet_setup(item: pytest.Item) -> bool:
    """True when setup_shared(item) runs nothing but pytest's no-op ``setup``
    of the collectors it enters and finds every wider fixture cached, with a
    value, for the item's parameters (as predicted_snapshot requires)."""
    stack = item.session._setupstate.stack
    chain = item.listchain()[:-1]
    if any(node not in chain or exc is not None for node, (_, exc) in stack.items()):
        return False
    if not _quiet_setup(stack, chain) or _snapshot(item, chain) is None:
        return False
    return all(fixturedef.cached_result[2] is None for _, fixturedef in _wider_fixtures(item))


def _quiet_teardown(stack: dict[Any, Any], chain: list[Any]) -> bool:
    return all(
        node in chain or (exc is None and _no_op_finalizers(node, finalizers))
        for node, (finalizers, exc) in stack.items()
    )


def _quiet_setup(stack: dict[Any, Any], chain: list[Any]) -> bool:
    return all(node in stack or type(node).setup is _NODE_SETUP for node in chain)


def _no_op_finalizers(node: Any, finalizers: list[Any]) -> bool:
    """SetupState registers each collector's own ``teardown`` first: pytest's
    no-op unless the collector overrides it. Anything else is real work."""
    return all(
        getattr(fin, "__self__", None) is node and getattr(fin, "__func__", None) is _NODE_TEARDOWN
        for fin in finalizers
    )


def _snapshot(item: pytest.Item, stack: list[Any]) -> tuple[int, ...] | None:
    ids = [id(node) for node in stack]
    params = getattr(getattr(item, "callspec", None), "params", {})
    for name, fixturedef in _wider_fixtures(item):
        cached = fixturedef.cached_result
        if cached is None:
            return None
        if name in params:
            try:
                if not (cached[1] is params[name] or cached[1] == params[name]):
                    return None
            except Exception:
                return None
        ids.append(id(cached))
    return tuple(ids)


def leave_other_collectors(item: pytest.Item) -> None:
    """In the sandbox, after release_parent_finalizers: a sandbox prepared
    across a collector boundary inherited the previous item's collectors on
    the setup stack; pop them (their finalizers were released, so nothing
    runs) so that pytest's setup of ``item`` finds its own chain."""
    state = item.session._setupstate
    chain = item.listchain()
    if any(node not in chain for node in state.stack):
        state.teardown_exact(item)


def shared_ready(item: pytest.Item) -> bool:
    """True when setup_shared(item) would do nothing: the setup stack is the
    item's parent chain without errors, and every wider fixture is cached
    with a value (not an error) for the item's parameters."""
    parent = item.parent
    stack = item.session._setupstate.stack
    if parent is None or list(stack) != parent.listchain():
        return False
    if any(exc is not None for _, exc in stack.values()):
        return False
    if shared_snapshot(item) is None:
        return False
    return all(fixturedef.cached_result[2] is None for _, fixturedef in _wider_fixtures(item))


def teardown_shared(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Tear down, in pytest's process, what ``nextitem`` does not need."""
    __tracebackhide__ = True  # pytest leaves this frame out of failure reports
    item.session._setupstate.teardown_exact(nextitem)


#: In a zygote or a test process: the setup stack's finalizers were released
#: (release_collector_finalizers), and the stack stays as it is.
_collectors_released = False


def release_collector_finalizers(session: pytest.Session) -> None:
    """Once per process (a zygote, before its first fork, for every test
    process it forks): release_parent_finalizers for the collectors on the
    setup stack, which is every node on it (a test's own setup runs in its
    sandbox), and which a zygote never changes."""
    global _collectors_released
    stack = session._setupstate.stack
    if any(isinstance(node, pytest.Item) for node in stack):
        return
    for node, (_, exc) in list(stack.items()):
        stack[node] = ([], exc)
    _collectors_released = True


def release_parent_finalizers(item: pytest.Item) -> None:
    """In the sandbox: keep only the item's own finalizers, so its teardown
    never runs those of wider fixtures, which belong to pytest's process."""
    if _collectors_released:
        return
    stack = item.session._setupstate.stack
    for node, (_, exc) in list(stack.items()):
        if node is not item:
            stack[node] = ([], exc)


#: pluggy's warning that a hook wrapper raised (pluggy 1.4+).
_PLUGGY_TEARDOWN_RAISED: type[Warning] = getattr(pluggy, "PluggyTeardownRaisedWarning", UserWarning)


def call_in_phase(
    item: pytest.Item,
    when: str,
    func: Callable[[], None],
    *,
    hooks: bool = True,
    hooks_if_passed: bool = True,
) -> pytest.TestReport:
    """Run ``func`` as (part of) phase ``when`` with pytest's per-item capture,
    and make the report pytest would make for it. ``hooks=False`` builds it
    without pytest_runtest_makereport: plugins' wrappers of that hook saw the
    phase in the sandbox already and may expect state only set up there.
    ``hooks_if_passed=False``: only a failure's report (the one that will
    be logged) goes through the hook. The hook runs plugins' wrappers that
    may rely on their own pytest_runtest_<phase> wrapper, which did not run
    here (pytest-json-report's KeyError): where one raises, the report is
    built without the hook rather than ending the run."""
    capman = item.config.pluginmanager.getplugin("capturemanager")
    reraise: tuple[type[BaseException], ...] = (pytest.exit.Exception,)
    if not item.config.getoption("usepdb", False):
        reraise += (KeyboardInterrupt,)
    if capman is not None:
        with capman.item_capture(when, item):
            call = CallInfo.from_call(func, when=when, reraise=reraise)  # type: ignore[arg-type]
    else:
        call = CallInfo.from_call(func, when=when, reraise=reraise)  # type: ignore[arg-type]
    if not hooks or (not hooks_if_passed and call.excinfo is None):
        return pytest.TestReport.from_item_and_call(item, call)
    try:
        with warnings.catch_warnings():
            # pluggy warns of the wrapper that raises below: ours to handle.
            warnings.simplefilter("ignore", _PLUGGY_TEARDOWN_RAISED)
            report: pytest.TestReport = item.ihook.pytest_runtest_makereport(item=item, call=call)
    except Exception:
        if call.excinfo is not None:
            # The failed attempt already cut the traceback pytest shows:
            # start again from the exception itself.
            fresh = pytest.ExceptionInfo.from_exception(call.excinfo.value)
            call = CallInfo(
                None, fresh, call.start, call.stop, call.duration, call.when, _ispytest=True
            )
        return pytest.TestReport.from_item_and_call(item, call)
    return report


#: In a zygote or a test process, once silence_plugins ran: what
#: redirect_capture does (capture_redirects).
_redirects: tuple[tuple[int, int], ...] | None = None


def learn_capture(config: pytest.Config) -> None:
    """Once per process (a zygote, before its first fork): the descriptors
    redirect_capture points at each test's own files; pytest's capture
    stays as it is in a zygote, which only forks."""
    global _redirects
    _redirects = capture_redirects(config)


def capture_redirects(config: pytest.Config) -> tuple[tuple[int, int], ...]:
    """For pytest's fd-level capture of stdout, then stderr: (the capture
    file's descriptor, the captured descriptor if capture is started, else
    -1), or (-1, -1) where there is nothing to redirect (sys-level capture
    lives in memory)."""
    capman = config.pluginmanager.getplugin("capturemanager")
    capturing = getattr(capman, "_global_capturing", None)
    if capturing is None:
        return ()
    found: list[tuple[int, int]] = []
    for capture in (capturing.out, capturing.err):
        tmpfile = getattr(capture, "tmpfile", None)
        targetfd = getattr(capture, "targetfd", None)
        number = -1
        if tmpfile is not None and isinstance(targetfd, int) and hasattr(tmpfile, "fileno"):
            with contextlib.suppress(OSError, ValueError):
                number = tmpfile.fileno()
        started = number >= 0 and getattr(capture, "_state", None) == "started"
        found.append((number, targetfd if started and isinstance(targetfd, int) else -1))
    return tuple(found)


def redirect_capture(config: pytest.Config, out_fd: int, err_fd: int) -> None:
    """In the sandbox: point pytest's fd-level capture files at descriptors
    pytest's process owns, so output survives a crash and is never mixed with
    another sandbox's (CaptureManager._global_capturing, FDCapture.tmpfile)."""
    redirects = _redirects if _redirects is not None else capture_redirects(config)
    for (number, targetfd), fd in zip(redirects, (out_fd, err_fd), strict=False):
        if number < 0:
            continue
        # Same descriptor number, new file: every object holding it follows.
        os.dup2(fd, number)
        if targetfd >= 0:
            os.dup2(number, targetfd)


def capture_fds(config: pytest.Config) -> set[int]:
    """Descriptors pytest's capture holds (saved terminal, capture files): kept
    open in strict mode, where every other inherited descriptor is closed."""
    capman = config.pluginmanager.getplugin("capturemanager")
    capturing = getattr(capman, "_global_capturing", None)
    fds: set[int] = set()
    for capture in (getattr(capturing, name, None) for name in ("in_", "out", "err")):
        saved = getattr(capture, "targetfd_save", None)
        if isinstance(saved, int):
            fds.add(saved)
        tmpfile = getattr(capture, "tmpfile", None)
        with contextlib.suppress(AttributeError, OSError, ValueError):
            fds.add(tmpfile.fileno())  # type: ignore[union-attr]
    return fds


def basetemp(config: pytest.Config) -> str | None:
    """The session's temp base, created in pytest's process so that every
    sandbox makes its tmp_path below it on the host (TempPathFactory)."""
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is None:
        return None
    return str(factory.getbasetemp())


#: The warning filters outside every test (remember_session_warnings).
_session_filters_key = pytest.StashKey[tuple[Any, ...]]()


def remember_session_warnings(config: pytest.Config) -> None:
    """In pytest's process, before the first test: the warning filters of the
    session, outside every test's. A sandbox is forked while another test's
    protocol runs in pytest's process, inside pytest's warning capture for
    that test, with its ``filterwarnings`` marks applied: the sandbox starts
    from these instead (record_warnings)."""
    config.stash[_session_filters_key] = tuple(warnings.filters)


#: In pytest's process: the item whose protocol is forking its sandbox, and
#: the warning filters pytest's process has for it then (note_protocol_filters).
_protocol_filters: tuple[object, tuple[Any, ...]] | None = None


def note_protocol_filters(item: pytest.Item) -> None:
    """In pytest's process, in ``item``'s protocol, once its wider fixtures
    are set up and before its sandbox is forked: the filters it runs with
    without isolation, exactly (the session's, the configured ones, its
    marks, and whatever a wider fixture set up for it just now changed:
    pytest undoes that when this protocol ends, so only this test sees it).
    A sandbox forked now (or by a zygote forked now) for this very item
    starts from these (record_warnings); any other from the session's."""
    global _protocol_filters
    _protocol_filters = (item, tuple(warnings.filters))


#: In a zygote or a test process: the list warnings are recorded into since
#: start_session_warnings (None: record_warnings does it all per test).
_session_log: list[warnings.WarningMessage] | None = None
#: ... and what keeps that recording open for the process's life.
_session_recording: contextlib.ExitStack | None = None


def _set_filters(filters: tuple[Any, ...]) -> None:
    # A list at runtime (typeshed says Sequence): replaced in place, as
    # warnings.catch_warnings saved this very object.
    warnings.filters[:] = filters  # type: ignore[index]
    mutated = getattr(warnings, "_filters_mutated", None)
    if mutated is not None:
        mutated()  # the cached "already shown" entries are stale


def _restore_session_filters(config: pytest.Config) -> None:
    session_filters = config.stash.get(_session_filters_key, None)
    if session_filters is not None:
        _set_filters(session_filters)


def _recording(config: pytest.Config) -> bool:
    """pytest's warnings plugin records warnings (not ``-p no:warnings``)."""
    return config.pluginmanager.has_plugin("warnings")


def start_session_warnings(config: pytest.Config) -> None:
    """In a zygote before its first fork (or a test process forked without
    one): the part of pytest's warning capture that is the same for every
    test, done once for all the test processes it forks: the session's
    filters (remember_session_warnings), pytest's configured ones applied
    and recording started (pytest 9's Config._catch_configured_warnings,
    kept open until the process ends). Each test process then only applies
    its item's marks (record_warnings): otherwise each would apply the
    configured filters again, writing pages of pytest's memory (each one
    copied per test). Before pytest 9, record_warnings does it all."""
    global _session_log, _session_recording
    configured = getattr(config, "_catch_configured_warnings", None)
    if configured is None or _session_recording is not None or not _recording(config):
        return
    _restore_session_filters(config)
    stack = contextlib.ExitStack()
    log = stack.enter_context(configured(record=True))
    if not isinstance(log, list):
        stack.close()
        return
    _session_log, _session_recording = log, stack


def record_warnings(item: pytest.Item) -> contextlib.ExitStack:
    """In the sandbox, before "go": pytest's warning capture for the item's
    run, entered now (the item's filters applied, recording started); the
    returned stack, used as a context manager around run_phases, ends it and
    hands each recorded warning to pytest_warning_recorded. pytest records
    around pytest_runtest_protocol, which runs in pytest's process; the
    sandbox records its own and the hook forwards them. The filters it
    starts from are the session's, as in pytest's process between two
    tests, not those of the test whose protocol forked the sandbox; or,
    forked in the item's own protocol, exactly the item's there
    (note_protocol_filters)."""
    stack = contextlib.ExitStack()
    if not _recording(item.config):
        return stack  # -p no:warnings: Python's own handling, as in pytest's process
    log = _session_log
    noted = _protocol_filters
    if noted is not None and noted[0] is item:
        # Forked in this item's own protocol: its filters as they were there.
        _set_filters(noted[1])
        if log is None:
            log = stack.enter_context(warnings.catch_warnings(record=True))
        else:
            del log[:]
        stack.callback(_hand_over, item, log)
        return stack
    if log is None:
        from _pytest.warnings import catch_warnings_for_item

        _restore_session_filters(item.config)
        stack.enter_context(
            catch_warnings_for_item(item.config, ihook=item.ihook, when="runtest", item=item)
        )
        return stack
    # What catch_warnings_for_item adds to the configured filters.
    from _pytest.config import parse_warning_filter

    del log[:]  # nothing the zygote itself recorded
    for mark in item.iter_markers(name="filterwarnings"):
        for arg in mark.args:
            warnings.filterwarnings(*parse_warning_filter(arg, escape=False))

    stack.callback(_hand_over, item, log)
    return stack


def _hand_over(item: pytest.Item, log: list[warnings.WarningMessage]) -> None:
    """What catch_warnings_for_item does with each warning recorded."""
    for warning_message in log:
        item.ihook.pytest_warning_recorded.call_historic(
            kwargs={
                "warning_message": warning_message,
                "nodeid": item.nodeid,
                "when": "runtest",
                "location": None,
            }
        )


def run_phases(
    item: pytest.Item, nextitem: pytest.Item | None, send: Callable[[pytest.TestReport], None]
) -> None:
    """In the sandbox: runtestprotocol without logging, each report sent as soon
    as it exists (a crash in teardown still delivers setup and call). Inside
    record_warnings(item)."""
    init_request(item)
    rep = call_and_report(item, "setup", log=False)
    send(rep)
    if rep.passed:
        setup_only = item.config.getoption("setuponly", False)
        if item.config.getoption("setupshow", False):
            if "add_space" in inspect.signature(show_test_item).parameters:  # pytest 9
                show_test_item(item, add_space=not setup_only)
            else:  # pragma: no cover - pytest 8
                show_test_item(item)  # type: ignore[call-arg]
        if not setup_only:
            send(call_and_report(item, "call", log=False))
    if item.session.shouldfail or item.session.shouldstop:
        nextitem = None
    send(call_and_report(item, "teardown", log=False, nextitem=nextitem))


#: Session facts the test processes need (and pytest's process, per test),
#: in the config's stash: found on first use (in pytest's process, while
#: tests run, so every plugin is configured) or by learn_session.
_facts_key = pytest.StashKey[dict[str, Any]]()


def learn_session(config: pytest.Config) -> None:
    """In a zygote (or a test process forked without one), once: find every
    fact before the forks, or each test process would look them up anew
    (each lookup writes pages of pytest's memory, copied per test)."""
    for name in _FACTS:
        _fact(name, config)


def _fact(name: str, config: pytest.Config) -> Any:
    facts = config.stash.get(_facts_key, None)
    if facts is None:
        facts = config.stash[_facts_key] = {}
    if name not in facts:
        facts[name] = _FACTS[name](config)
    return facts[name]


def _failed_subtests_counts(config: pytest.Config) -> Any:
    return _fact("subtests", config)


def _find_failed_subtests_counts(config: pytest.Config) -> Any:
    """pytest 9's count of failed subtests per test (config.stash), which
    makes a test whose subtests failed fail; None before pytest 9."""
    try:
        from _pytest.subtests import failed_subtests_key
    except ImportError:
        return None
    return config.stash.get(failed_subtests_key, None)


def failed_subtests(item: pytest.Item) -> int:
    """How many of ``item``'s subtests this process counted as failed."""
    counts = _failed_subtests_counts(item.config)
    if counts is None:
        return 0
    return int(counts.get(getattr(item, "id", item.nodeid), 0))


def add_failed_subtests(item: pytest.Item, count: int) -> None:
    """In pytest's process: ``count`` subtests of ``item`` failed in its
    sandbox (where pytest's subtests counted them), as if here."""
    counts = _failed_subtests_counts(item.config)
    if counts is not None and count > 0:
        counts[getattr(item, "id", item.nodeid)] += count


def suite_properties(config: pytest.Config) -> list[tuple[str, str]] | None:
    """junitxml's test suite properties (record_testsuite_property appends
    to them, in whichever process the test runs); None without --junitxml."""
    return _fact("junitxml", config)  # type: ignore[no-any-return]


def _find_suite_properties(config: pytest.Config) -> list[tuple[str, str]] | None:
    from _pytest.junitxml import xml_key

    xml = config.stash.get(xml_key, None)
    properties = getattr(xml, "global_properties", None)
    return properties if isinstance(properties, list) else None


def keep_subtest_values(report: pytest.TestReport, data: dict[str, Any]) -> None:
    """A subtest's report rebuilt from its JSON shows its values as the
    sandbox wrote them (already repr()'d there), not repr()'d a second time
    (pytest's SubtestContext does so on every rebuild)."""
    context = getattr(report, "context", None)
    sent = data.get("_subtest.context")
    kwargs = sent.get("kwargs") if isinstance(sent, dict) else None
    if (
        context is None
        or not isinstance(kwargs, dict)
        or not all(isinstance(v, str) for v in kwargs.values())
    ):
        return
    with contextlib.suppress(AttributeError, TypeError, dataclasses.FrozenInstanceError):
        object.__setattr__(context, "kwargs", dict(kwargs))


def start_timeout(item: pytest.Item) -> bool:
    """In the sandbox: pytest-timeout's timer for the whole test (setup, call
    and teardown), armed as its pytest_runtest_protocol would have armed it
    (in pytest's process, plugin.py kept it from doing so). True if armed.
    A timer for the call alone (func_only) is armed by its own hook, which
    runs here anyway."""
    module: Any = _fact("pytest_timeout", item.config)
    if module is None:
        return False
    try:
        settings = module._get_item_settings(item)
    except Exception:
        return False  # a malformed marker: pytest-timeout reports it in the call
    timeout = getattr(settings, "timeout", None)
    if not timeout or timeout <= 0 or getattr(settings, "func_only", False) is not False:
        return False
    item.config.hook.pytest_timeout_set_timer(item=item, settings=settings)
    return True


def cancel_timeout(item: pytest.Item) -> None:
    item.config.hook.pytest_timeout_cancel_timer(item=item)


def _find_pytest_timeout(config: pytest.Config) -> Any:
    """The pytest_timeout module, when its plugin runs in this session."""
    module = sys.modules.get("pytest_timeout")
    return module if module is not None and config.pluginmanager.has_plugin("timeout") else None


def _fault_timer(config: pytest.Config) -> tuple[float, bool, int] | None:
    return _fact("faulthandler", config)  # type: ignore[no-any-return]


def _find_fault_timer(config: pytest.Config) -> tuple[float, bool, int] | None:
    """pytest's faulthandler_timeout: (seconds, exit on timeout, the stderr
    descriptor pytest dumps to), or None when unset."""
    try:
        from _pytest import faulthandler as fh

        timeout = fh.get_timeout_config_value(config)
        fd = config.stash[fh.fault_handler_stderr_fd_key]
        getter = getattr(fh, "get_exit_on_timeout_config_value", None)
        exit_on_timeout = bool(getter(config)) if getter is not None else False
    except (ImportError, AttributeError, KeyError, ValueError):
        return None
    return (timeout, exit_on_timeout, fd) if timeout > 0 else None


def move_fault_timer(item: pytest.Item) -> None:
    """In pytest's process, before an isolated test: pytest's faulthandler
    timer (armed around the protocol) is cancelled here, where it would dump
    (and with faulthandler_exit_on_timeout end) pytest's own process waiting
    for the sandbox; start_fault_timer arms it in the sandbox."""
    if _fault_timer(item.config) is not None:
        import faulthandler

        faulthandler.cancel_dump_traceback_later()


def start_fault_timer(item: pytest.Item) -> bool:
    """In the sandbox: pytest's faulthandler timer, as its
    pytest_runtest_protocol arms it in the test's process without isolation.
    True if armed (cancel with cancel_fault_timer)."""
    timer = _fault_timer(item.config)
    if timer is None:
        return False
    import faulthandler

    timeout, exit_on_timeout, fd = timer
    try:
        os.fstat(fd)
    except OSError:
        fd = 2  # closed in this sandbox (strict): its stderr, captured
    faulthandler.dump_traceback_later(timeout, file=fd, exit=exit_on_timeout)
    return True


def cancel_fault_timer() -> None:
    import faulthandler

    faulthandler.cancel_dump_traceback_later()


def _find_allure_listener(config: pytest.Config) -> Any:
    """allure-pytest's listener, when it records this session (--alluredir)."""
    for plugin in config.pluginmanager.get_plugins():
        if (
            type(plugin).__name__ == "AllureListener"
            and hasattr(plugin, "_cache")
            and hasattr(plugin, "allure_logger")
        ):
            return plugin
    return None


_FACTS: dict[str, Callable[[pytest.Config], Any]] = {
    "subtests": _find_failed_subtests_counts,
    "junitxml": _find_suite_properties,
    "pytest_timeout": _find_pytest_timeout,
    "faulthandler": _find_fault_timer,
    "allure": _find_allure_listener,
}


def close_allure_result(item: pytest.Item) -> bool:
    """In the sandbox, after the phases: allure-pytest's result for ``item``,
    which its listener filled in here (title, steps, status, attachments),
    written here, as its protocol wrapper in pytest's process would have
    written it (a test without a status is "skipped"). The results directory
    must be granted writable (its fixtures' files are written here too).
    True when written: pytest's process then drops its own copy, which the
    phases never filled in (drop_allure_result)."""
    listener = _fact("allure", item.config)
    if listener is None:
        return False
    try:
        uuid = listener._cache.get(item.nodeid)
        if not uuid:
            return False
        result = listener.allure_logger.get_test(uuid)
        if result is not None and getattr(result, "status", None) is None:
            result.status = "skipped"
        listener.allure_logger.close_test(uuid)
        listener._cache.pop(item.nodeid)
    except Exception:  # not writable (its own error already failed the test), or another version
        return False
    return True


def drop_allure_result(item: pytest.Item) -> None:
    """In pytest's process: the sandbox wrote allure-pytest's result for
    ``item`` (close_allure_result); the listener's own, opened around the
    protocol here and never filled in, is dropped unwritten."""
    listener = _fact("allure", item.config)
    if listener is None:
        return
    with contextlib.suppress(Exception):
        uuid = listener._cache.pop(item.nodeid)
        if uuid:
            listener.allure_logger.drop_test(uuid)


def reruns_expected(item: pytest.Item) -> bool:
    """True when pytest-rerunfailures may run ``item`` again: pytest's process
    must then keep the wider fixtures until the last attempt is over."""
    module = sys.modules.get("pytest_rerunfailures")
    if module is None or not item.config.pluginmanager.has_plugin("rerunfailures"):
        return False
    try:
        return bool(module.get_reruns_count(item))
    except Exception:
        return False


#: pytest-rerunfailures' per-attempt state on an item (set by its makereport
#: wrapper, in the sandbox), which its rerun loop reads in pytest's process.
_RERUN_FLAGS = ("_test_failed_statuses", "_terminal_errors", "_test_xfailed")


def _rerunfailures(item: pytest.Item) -> Any:
    """pytest-rerunfailures' module when it may run ``item`` again (its
    rerun loop, which reads the state below, runs only then)."""
    return sys.modules.get("pytest_rerunfailures") if reruns_expected(item) else None


def rerun_state(item: pytest.Item) -> dict[str, Any] | None:
    """In the sandbox, after the phases: what pytest-rerunfailures' rerun
    loop in pytest's process reads on the item, which its makereport wrapper
    set here: each phase's failed, terminal-error (``--only-rerun``,
    ``--rerun-except``) and xfailed flags, and the ``condition=`` of its
    marker evaluated now, while the exceptions are here (they do not travel;
    their count per phase does). None without the plugin."""
    module = _rerunfailures(item)
    if module is None:
        return None
    with contextlib.suppress(Exception):
        module.get_reruns_condition(item, module._get_reruns_condition_failures(item))
    state: dict[str, Any] = {}
    for name in _RERUN_FLAGS:
        value = getattr(item, name, None)
        if isinstance(value, dict):
            state[name] = {str(key): bool(flag) for key, flag in value.items()}
    results = getattr(item, "_rerun_condition_results", None)
    if isinstance(results, dict):
        state["condition_results"] = [
            [key[0], key[1], bool(value)]
            for key, value in results.items()
            if isinstance(key, tuple) and len(key) == 2
        ]
    excinfos = getattr(item, "_rerun_condition_excinfos", None)
    if isinstance(excinfos, dict):
        state["failures"] = {str(key): len(value) for key, value in excinfos.items()}
    return state


def reset_rerun_state(item: pytest.Item) -> None:
    """In pytest's process, before an attempt: pytest-rerunfailures' state
    as its makereport wrapper leaves it after a setup that recorded nothing,
    so that its rerun loop finds it even when the sandbox sends none (a
    crash)."""
    if _rerunfailures(item) is None:
        return
    for name in (*_RERUN_FLAGS, "_rerun_condition_excinfos", "_rerun_condition_results"):
        setattr(item, name, {})


def note_rerun_reports(item: pytest.Item, reports: list[pytest.TestReport]) -> None:
    """In pytest's process, the attempt's reports made: each one's failure
    and xfail noted as pytest-rerunfailures' makereport would, for reports
    pytest's process made itself too (a crash's, a spec error's)."""
    if _rerunfailures(item) is None:
        return
    failed = getattr(item, "_test_failed_statuses", None)
    xfailed = getattr(item, "_test_xfailed", None)
    if not isinstance(failed, dict) or not isinstance(xfailed, dict):
        reset_rerun_state(item)
        failed, xfailed = item._test_failed_statuses, item._test_xfailed  # type: ignore[attr-defined]
    for report in reports:
        failed[report.when] = bool(failed.get(report.when)) or report.failed
        xfailed[report.when] = bool(xfailed.get(report.when)) or hasattr(report, "wasxfail")


def apply_rerun_state(item: pytest.Item, state: object) -> str | None:
    """In pytest's process: the state rerun_state sent, checked (it comes
    from the test), set on the item. Returns what was wrong with it."""
    if _rerunfailures(item) is None:
        return None
    return _set_rerun_state(item, state)


def _set_rerun_state(item: Any, state: object) -> str | None:
    if not isinstance(state, dict):
        return "a rerun state that is not an object"
    phases = ("setup", "call", "teardown")
    for name in _RERUN_FLAGS:
        flags = state.get(name, {})
        if not isinstance(flags, dict) or not all(
            key in phases and isinstance(value, bool) for key, value in flags.items()
        ):
            return f"a rerun state with a malformed {name}"
        setattr(item, name, dict(flags))
    results = state.get("condition_results", [])
    failures = state.get("failures", {})
    if not isinstance(results, list) or len(results) > 3 * _MAX_RERUN_FAILURES:
        return "a rerun state with malformed condition results"
    if not isinstance(failures, dict) or not all(
        key in phases and isinstance(n, int) and 0 <= n <= _MAX_RERUN_FAILURES
        for key, n in failures.items()
    ):
        return "a rerun state with malformed failures"
    condition_results = {}
    for entry in results:
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and entry[0] in ("attempt", *phases)
            and isinstance(entry[1], int)
            and isinstance(entry[2], bool)
        ):
            return "a rerun state with malformed condition results"
        condition_results[(entry[0], entry[1])] = entry[2]
    item._rerun_condition_results = condition_results
    # The exceptions stay in the sandbox: one placeholder each, so that the
    # plugin finds the same (phase, index) keys, whose results are above.
    item._rerun_condition_excinfos = {phase: [None] * count for phase, count in failures.items()}
    return None


#: The most failures per phase a rerun state may name.
_MAX_RERUN_FAILURES = 1024


def record_dependency_results(item: pytest.Item, reports: list[pytest.TestReport]) -> bool:
    """In pytest's process, an isolated test's reports made: what
    pytest-dependency's makereport wrapper does with each (it ran in the
    sandbox, whose copy of its managers ends with it): the outcome recorded
    in the managers of the item's session, package, module and class, where
    the later tests' setups (and its ``depends()``) look. True when recorded:
    pytest's state then moved (Engine.results_recorded)."""
    module = sys.modules.get("pytest_dependency")
    if module is None or not item.config.pluginmanager.has_plugin("dependency"):
        return False
    manager_class = getattr(module, "DependencyManager", None)
    marker = item.get_closest_marker("dependency")
    if manager_class is None or (marker is None and not getattr(module, "_automark", False)):
        return False
    name = marker.kwargs.get("name") if marker is not None else None
    with contextlib.suppress(Exception):  # another version's internals: as before
        for report in reports:
            for scope in manager_class.ScopeCls:
                manager = manager_class.getManager(item, scope=scope)
                if manager:
                    manager.addResult(item, name, report)
        return True
    return False


def install_protocol(
    isolated_protocol: Callable[..., list[pytest.TestReport]],
) -> Callable[[], None]:
    """Make ``isolated_protocol`` the runtestprotocol that pytest's runner and
    pytest-rerunfailures call (each looks it up in its own module). Returns
    the undo, for config.add_cleanup (pytester runs sessions in-process)."""
    import _pytest.runner

    undo: list[tuple[Any, Any]] = []
    for name in ("_pytest.runner", "pytest_rerunfailures"):
        module: Any = sys.modules.get(name)
        if module is not None and hasattr(module, "runtestprotocol"):
            undo.append((module, module.runtestprotocol))
            module.runtestprotocol = isolated_protocol
    assert _pytest.runner.runtestprotocol is isolated_protocol

    def restore() -> None:
        for target, original in undo:
            target.runtestprotocol = original

    return restore


# ------------------------------------------------------ reports kept on the item

#: At most this many attributes and stash entries of reports are carried.
_MAX_KEPT_REPORTS = 16
_PHASE_NAMES = ("setup", "call", "teardown")


def item_marks(item: pytest.Item) -> tuple[int, int]:
    """In the sandbox, before the phases: how many attributes and stash
    entries the item has (report_refs looks further only when that grew,
    or when pytest's process kept reports on it before: a rerun)."""
    return len(vars(item)), len(item.stash)


#: On an item in pytest's process: apply_report_refs set reports on it, so a
#: later attempt's wrapper may replace them without adding a name.
_kept_before_key = pytest.StashKey[bool]()


def report_refs(
    item: pytest.Item, sent: list[pytest.TestReport], marks: tuple[int, int]
) -> dict[str, Any] | None:
    """In the sandbox, after the phases: the reports that a
    pytest_runtest_makereport wrapper kept on the item, the pattern of
    pytest's documentation ("making test result information available in
    fixtures"): ``setattr(item, "rep_" + rep.when, rep)`` or
    ``item.stash.setdefault(key, {})[rep.when] = rep``. The wrapper ran
    here; pytest's process sets the same names to its own copies of those
    reports (apply_report_refs), for what reads them there (a module or
    session fixture's teardown, pytest_sessionfinish). A stash key is named
    by the module global that holds it, in a conftest or the test's module.
    Uses ``Stash._storage`` (private). None: nothing kept. An item nothing
    was added to since ``marks`` (item_marks before the phases) is not looked
    through: its values are not touched, which would copy the pages they
    are on."""
    if marks == item_marks(item) and _kept_before_key not in item.stash:
        return None
    phase_of: dict[int, str] = {id(report): report.when for report in sent}
    attrs = {
        name: phase_of[id(value)]
        for name, value in vars(item).items()
        if id(value) in phase_of and isinstance(value, pytest.TestReport)
    }
    stash = []
    storage: dict[Any, Any] = getattr(item.stash, "_storage", {})
    for key, value in storage.items():
        kept = _kept_phases(value, phase_of)
        home = _global_name(key, item) if kept is not None else None
        if home is not None:
            stash.append([*home, kept])
    if not attrs and not stash:
        return None
    return {
        "attrs": dict(list(attrs.items())[:_MAX_KEPT_REPORTS]),
        "stash": stash[:_MAX_KEPT_REPORTS],
    }


def _kept_phases(value: object, phase_of: dict[int, str]) -> str | dict[str, str] | None:
    if isinstance(value, pytest.TestReport):
        return phase_of.get(id(value))
    if not isinstance(value, dict) or not value or len(value) > len(_PHASE_NAMES):
        return None
    kept = {}
    for name, report in value.items():
        when = phase_of.get(id(report)) if isinstance(report, pytest.TestReport) else None
        if not isinstance(name, str) or when is None:
            return None
        kept[name] = when
    return kept


def _may_hold_keys(module: object, item: pytest.Item) -> bool:
    """Where a stash key a makereport wrapper uses may be defined, and the
    only modules pytest's process looks one up in: the test's module and
    the conftest modules."""
    path = getattr(module, "__file__", None)
    return module is getattr(item, "module", None) or (
        isinstance(path, str) and os.path.basename(path) == "conftest.py"
    )


def _global_name(key: object, item: pytest.Item) -> tuple[str, str] | None:
    for module in list(sys.modules.values()):
        if not _may_hold_keys(module, item):
            continue
        for name, value in vars(module).items():
            if value is key:
                return module.__name__, name
    return None


def apply_report_refs(
    item: pytest.Item, refs: object, reports: dict[str, pytest.TestReport]
) -> str | None:
    """In pytest's process: what report_refs sent, set on the item with
    pytest's process's own reports of those phases (``reports``; a phase
    not among them is left for a later call: the teardown's report exists
    only after the wider fixtures' teardown, which may read the call's).
    The names come from the sandbox: only new attributes (or ones holding a
    report), never a private one or one of the item's class, and only stash
    keys that are globals of a conftest or of the test's module. Returns a
    problem when the frame is malformed."""
    problem = check_report_refs(refs)
    if problem is not None:
        return problem
    assert isinstance(refs, dict)
    attrs, stash = refs["attrs"], refs["stash"]
    item.stash[_kept_before_key] = True
    own = vars(item)
    for name, when in attrs.items():
        report = reports.get(when) if isinstance(when, str) else None
        if (
            report is None
            or not isinstance(name, str)
            or not name.isidentifier()
            or name.startswith("_")
            or hasattr(type(item), name)
            or not isinstance(own.get(name, report), pytest.TestReport)
        ):
            continue
        own[name] = report
    for entry in stash:
        key = _known_stash_key(item, entry[0], entry[1])
        if key is None:
            continue
        kept, current = entry[2], item.stash.get(key, None)
        if isinstance(kept, str):
            if kept in reports and (current is None or isinstance(current, pytest.TestReport)):
                item.stash[key] = reports[kept]
        elif isinstance(kept, dict) and len(kept) <= len(_PHASE_NAMES):
            if current is None:
                current = item.stash[key] = {}
            if not isinstance(current, dict) or not all(
                isinstance(value, pytest.TestReport) for value in current.values()
            ):
                continue
            for name, when in kept.items():
                if isinstance(name, str) and isinstance(when, str) and when in reports:
                    current[name] = reports[when]
    return None


def check_report_refs(refs: object) -> str | None:
    """The shape of what report_refs sent (it comes from the test's
    process): a problem, or None."""
    if not isinstance(refs, dict):
        return "a kept-reports frame is not an object"
    attrs, stash = refs.get("attrs"), refs.get("stash")
    if not isinstance(attrs, dict) or not isinstance(stash, list):
        return "a kept-reports frame lacks its attributes or stash entries"
    if len(attrs) > _MAX_KEPT_REPORTS or len(stash) > _MAX_KEPT_REPORTS:
        return "a kept-reports frame has too many entries"
    if any(not isinstance(entry, list) or len(entry) != 3 for entry in stash):
        return "a kept-reports stash entry is not [module, name, phases]"
    return None


def _known_stash_key(item: pytest.Item, module_name: object, name: object) -> Any:
    module = sys.modules.get(module_name) if isinstance(module_name, str) else None
    if module is None or not isinstance(name, str) or not _may_hold_keys(module, item):
        return None
    key = vars(module).get(name)
    return key if isinstance(key, pytest.StashKey) else None


# ------------------------------------------- what protocol wrappers put on the item

#: The item whose protocol runs in pytest's process, and how many attributes
#: it had when its outermost protocol wrapper (ours, tryfirst) began.
_protocol_start: tuple[Any, int] | None = None
#: The bound of what is carried to a sandbox with "go" (the go pipe's
#: capacity is 64 KiB, and nothing else is in it then).
_MAX_PROTOCOL_ATTRS = 60000


def note_protocol_start(item: pytest.Item) -> None:
    """In pytest's process, first in pytest_runtest_protocol: how many
    attributes the item has before other plugins' protocol wrappers run."""
    global _protocol_start
    _protocol_start = (item, len(vars(item)))


def protocol_attrs(item: pytest.Item) -> bytes:
    """In pytest's process, at "go" for a sandbox forked before this
    protocol began (prepared during the previous test, or by a zygote): the
    attributes other plugins' pytest_runtest_protocol wrappers set on the
    item since (pytest-json-report's ``_json_report_extra``, which its
    makereport wrapper in the sandbox needs), pickled for the sandbox's copy
    of the item (apply_protocol_attrs). Those that cannot be pickled are
    left out. Empty: none."""
    start = _protocol_start
    if start is None or start[0] is not item or len(vars(item)) == start[1]:
        return b""
    names = list(vars(item))[start[1] :]
    import pickle

    carried: dict[str, bytes] = {}
    size = 0
    for name in names:
        try:
            data = pickle.dumps(vars(item)[name], protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            continue
        size += len(name) + len(data)
        if size > _MAX_PROTOCOL_ATTRS:
            break
        carried[name] = data
    return pickle.dumps(carried, protocol=pickle.HIGHEST_PROTOCOL) if carried else b""


def apply_protocol_attrs(item: pytest.Item, data: bytes) -> None:
    """In the sandbox, before the phases: what protocol_attrs sent (from
    pytest's process, which the sandbox trusts), set on its item."""
    if not data:
        return
    import pickle

    with contextlib.suppress(Exception):
        for name, value in pickle.loads(data).items():
            with contextlib.suppress(Exception):
                setattr(item, name, pickle.loads(value))
