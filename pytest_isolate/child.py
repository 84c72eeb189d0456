"""What runs inside the sandbox: the test's protocol, its reports sent home.

Called in the test process once the sandbox is ready and released. Reports
travel through pytest's own pytest_report_to_serializable as JSON frames;
warnings recorded here are forwarded so pytest's summary still shows them.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import pytest

from . import _pytest_compat as compat
from .coverage_support import start_in_sandbox, stop_in_sandbox
from .protocol import send_message
from .sandbox import TestContext

__all__ = ["run_in_sandbox"]

# Plugins whose hooks talk to another process over descriptors the sandbox
# inherits (xdist's worker channel): in the sandbox they would corrupt it.
_PLUGINS_TO_SILENCE = ("workerinteractor",)


#: Set in the sandbox only: where plugin.pytest_warning_recorded forwards warnings.
FORWARD_FD: int | None = None
#: Set by the engine before forking when coverage measures the session.
COVERAGE_DIR: str | None = None


#: How many of a warning category's bases are sent with it (and read).
MAX_BASES = 8


#: Where a sandbox's hypothesis keeps its example database when the
#: project's ``.hypothesis`` cannot be written (private_hypothesis_home).
SANDBOX_HYPOTHESIS_HOME = "/tmp/.hypothesis"


def private_hypothesis_home() -> None:
    """In the test process, its root built: hypothesis' example database
    defaults to ``.hypothesis`` in the project, read-only here, so
    hypothesis warns ("The database setting is not configured, and the
    default location is unusable") and keeps examples in memory; under
    ``filterwarnings = error`` every hypothesis test failed. Where that
    directory cannot be written (not granted with ``binds``), the sandbox's
    own ``/tmp`` is hypothesis' home: the same examples kept, dropped with the
    sandbox, and no warning. Only for a test hypothesis runs (its function's
    ``is_hypothesis_test``), and when pytest's process imported hypothesis
    (hypothesis.configuration's set_hypothesis_home_dir)."""
    configuration: Any = sys.modules.get("hypothesis.configuration")
    if configuration is None or not hasattr(configuration, "set_hypothesis_home_dir"):
        return
    try:
        try:
            found = configuration.storage_directory(intent_to_write=False)
        except TypeError:  # hypothesis before the keyword
            found = configuration.storage_directory()
        path = os.fspath(getattr(found, "path", found))
        while not os.path.exists(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)
        if os.access(path, os.W_OK) or not os.path.isdir("/tmp"):
            return
        configuration.set_hypothesis_home_dir(SANDBOX_HYPOTHESIS_HOME)
    except Exception:
        return


def in_sandbox() -> bool:
    """True in a test process (its results descriptor is set)."""
    return FORWARD_FD is not None


def forward_warning(warning_message: warnings.WarningMessage, when: str, nodeid: str) -> None:
    """Send a warning recorded in the sandbox to pytest's process."""
    if FORWARD_FD is None:
        return
    category = warning_message.category
    send_message(
        FORWARD_FD,
        "warning",
        {
            "message": str(warning_message.message),
            "category": f"{category.__module__}.{category.__qualname__}",
            # Its bases, nearest first: pytest's process takes the first it
            # has (a class of a module only the test imported it has not).
            "bases": [
                f"{base.__module__}.{base.__qualname__}"
                for base in category.__mro__[1:]
                if issubclass(base, Warning) and base is not Warning
            ][:MAX_BASES],
            "filename": str(warning_message.filename),
            "lineno": int(warning_message.lineno or 0),
            "when": when,
            "nodeid": nodeid,
        },
    )


def _plugins_to_silence(manager: Any) -> list[object]:
    """xdist's WorkerInteractor, registered under a generated name by
    xdist 3 (under "workerinteractor" by older versions)."""
    # Its module is execnet's "__channelexec__" (xdist ships remote.py as source).
    found = [
        plugin
        for plugin in manager.get_plugins()
        if type(plugin).__name__ == "WorkerInteractor" and hasattr(plugin, "channel")
    ]
    for name in _PLUGINS_TO_SILENCE:
        plugin = manager.get_plugin(name)
        if plugin is not None and plugin not in found:
            found.append(plugin)
    return found


def _channel_fds(plugin: object) -> set[int]:
    """The descriptors of an xdist worker's execnet channel (execnet's popen
    gateway: a pipe in, a pipe out), when they can be found."""
    fds: set[int] = set()
    io = getattr(getattr(getattr(plugin, "channel", None), "gateway", None), "_io", None)
    for name in ("infile", "outfile"):
        stream = getattr(io, name, None)
        with contextlib.suppress(AttributeError, OSError, ValueError):
            fd = stream.fileno()  # type: ignore[union-attr]
            if fd > 2:
                fds.add(fd)
    return fds


#: Set once the plugins are silenced in this process (a zygote does it once for
#: every test process it forks).
_SILENCED = False


def silence_plugins(session: pytest.Session) -> None:
    """In a sandbox, or a zygote before its first fork: unregister the plugins
    that talk to another process (_PLUGINS_TO_SILENCE) and close their
    channel's descriptors; leave the logging of reports to pytest's process;
    find the session's facts the test processes need (compat.learn_session);
    start recording warnings with the session's filters
    (compat.start_session_warnings); find where pytest's capture must be
    redirected (compat.learn_capture); release the setup stack's
    finalizers, which belong to pytest's process
    (compat.release_collector_finalizers). Once per process."""
    global _SILENCED
    if _SILENCED:
        return
    config = session.config
    manager = config.pluginmanager
    for plugin in _plugins_to_silence(manager):
        manager.unregister(plugin)
        # The channel's descriptors too: a test could otherwise write
        # messages to xdist's controller (a forged report) or read the
        # worker's. They are the gateway's own pipes, nothing of a fixture.
        for fd in _channel_fds(plugin):
            with contextlib.suppress(OSError):
                os.close(fd)
    _log_reports_at_home(config)
    compat.learn_session(config)
    compat.start_session_warnings(config)
    compat.learn_capture(config)
    compat.release_collector_finalizers(session)
    _SILENCED = True


class _LogForwarder:
    """In a sandbox, pytest_runtest_logreport's only implementation: a report
    logged while a phase runs (pytest 9's subtests log one per subtest, from
    inside the test) is sent to pytest's process, which logs it where the
    plugins that count, print and keep reports live (Engine.take_logged)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if FORWARD_FD is None or not isinstance(report, pytest.TestReport):
            return
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        if isinstance(data, dict):
            send_message(FORWARD_FD, "logreport", data)


def _log_reports_at_home(config: pytest.Config) -> None:
    """Every other plugin's pytest_runtest_logreport leaves this process: here
    it would print to pytest's terminal (the terminal reporter) or count in a
    copy of pytest's state that dies with the test (the session's failures,
    junitxml), and the report would never reach pytest's process."""
    manager = config.pluginmanager
    caller = manager.hook.pytest_runtest_logreport
    remove = getattr(caller, "_remove_plugin", None)  # pluggy's, per hook
    if remove is not None:
        for impl in caller.get_hookimpls():
            with contextlib.suppress(ValueError):
                remove(impl.plugin)
    manager.register(_LogForwarder(config), "isolate-logreport-forwarder")


def _where(exc: BaseException) -> str:
    """Where ``exc`` was raised: "file:line"."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


def decode_nextitem(item: pytest.Item, data: bytes) -> pytest.Item | None:
    """The next item, from the first 4 bytes of "go"'s data (the rest: what
    compat.protocol_attrs sent)."""
    if len(data) < 4:
        return None
    (index,) = struct.unpack("<i", data[:4])
    items = item.session.items
    return items[index] if 0 <= index < len(items) else None


def run_in_sandbox(item: pytest.Item, ctx: TestContext) -> Callable[[], None]:
    """Before "go": make pytest ready to run ``item`` here (plugins that talk
    to another process silenced, capture into pytest's descriptors, the
    setup stack the item's own, warnings recorded). Returns the call that runs setup, call and
    teardown, sending each report, once "go" came."""
    global FORWARD_FD
    config = item.config
    silence_plugins(item.session)
    FORWARD_FD = ctx.result_fd
    compat.redirect_capture(config, ctx.out_fd, ctx.err_fd)
    if getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
        private_hypothesis_home()
    compat.release_parent_finalizers(item)
    compat.leave_other_collectors(item)

    sent: list[pytest.TestReport] = []

    def send(report: pytest.TestReport) -> None:
        data: dict[str, Any] = config.hook.pytest_report_to_serializable(
            config=config, report=report
        )
        send_message(ctx.result_fd, "report", data)
        sent.append(report)

    recording = compat.record_warnings(item)

    def start() -> None:
        nextitem = decode_nextitem(item, ctx.go_data)
        compat.apply_protocol_attrs(item, ctx.go_data[4:])
        coverage = start_in_sandbox(COVERAGE_DIR)
        failed_subtests = compat.failed_subtests(item)
        properties = compat.suite_properties(config)
        known_properties = len(properties) if properties is not None else 0
        timer = compat.start_timeout(item)
        fault_timer = compat.start_fault_timer(item)
        marks = compat.item_marks(item)
        try:
            with recording:
                compat.run_phases(item, nextitem, send)
        except pytest.exit.Exception as exc:
            send_message(
                ctx.result_fd, "session_exit", {"msg": str(exc.msg), "returncode": exc.returncode}
            )
        except KeyboardInterrupt as exc:
            # Raised by the test (a real Ctrl-C reaches pytest's process, not
            # this one: the sandbox has its own session). pytest's process
            # stops the run as pytest would (Engine.pending_interrupt).
            send_message(ctx.result_fd, "interrupted", {"where": _where(exc)})
        finally:
            if timer:
                compat.cancel_timeout(item)
            if fault_timer:
                compat.cancel_fault_timer()
            failed_subtests = compat.failed_subtests(item) - failed_subtests
            if failed_subtests > 0:
                send_message(ctx.result_fd, "subtests_failed", failed_subtests)
            if properties is not None and len(properties) > known_properties:
                send_message(ctx.result_fd, "suite_properties", properties[known_properties:])
            kept = compat.report_refs(item, sent, marks)
            if kept is not None:
                send_message(ctx.result_fd, "kept_reports", kept)
            rerun = compat.rerun_state(item)
            if rerun is not None:
                send_message(ctx.result_fd, "rerun_state", rerun)
            if compat.close_allure_result(item):
                send_message(ctx.result_fd, "allure_written", {})
            stop_in_sandbox(coverage)

    return start
