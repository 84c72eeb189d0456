"""Pods: a network namespace that isolated tests share, as containers of a Kubernetes pod do.

A fixture starts a pod and runs a real server in it; tests marked
``isolated(pod="web")`` join the pod's network namespace instead of getting a
fresh one, so they reach the server on 127.0.0.1 while they stay cut off from
the host's network (and the host from the pod's).

    pytest (P) --fork--> holder: unshare(NET|PID, rootless also USER), lo up
                           `--fork--> pod init: pid 1 of the pod's pid namespace, reaps
    P --fork--> relay (spawn): setns user, net, pid --fork--> func()
    P --exec--> trampoline (popen): setns user, net, pid --fork+exec--> program
    an isolated(pod=...) test's sandbox: setns user, net (sandbox.py), then its own namespaces

The holder is the pod's anchor, like Kubernetes' pause container: its
/proc/<pid>/ns/net is what sandboxes join. It stays P's unreaped child until
the pod closes, so its pid cannot be reused while the pod is registered.
Everything the pod runs lives in the pod's pid namespace: when the holder
dies, its init dies, and the kernel kills every process left in the pod,
however it forked or daemonized. Nothing here imports pytest.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, NoReturn

from . import syscalls as sc
from .capabilities import privileged
from .spec import SpecError, parse_option

__all__ = ["Pod", "PodError", "lookup_pod", "pod"]

#: Signals a relay (spawn) or trampoline (popen) passes on to the process it runs.
FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
_START_TIMEOUT = 10.0

# popen runs this with `python -I -S -c`: it loads pods.py and syscalls.py as
# members of a package object made on the spot, so pytest_isolate/__init__.py
# (which imports pytest: ~130 ms) is not run, and no site-packages is needed.
_TRAMPOLINE = (
    "import importlib, sys, types\n"
    "pkg = types.ModuleType('_pytest_isolate_pod_exec')\n"
    "pkg.__path__ = [sys.argv[1]]\n"
    "sys.modules[pkg.__name__] = pkg\n"
    "importlib.import_module(pkg.__name__ + '.pods').exec_main(sys.argv[2:])\n"
)


class PodError(Exception):
    """A pod cannot be started, joined or used; the message names the fix."""


# name -> the running pod, in the process that started it (each xdist worker has its own).
_registry: dict[str, Pod] = {}


class Pod:
    """A network namespace kept alive by a holder process, with processes running in it.

    ``Pod(name)`` (or :func:`pod`) starts the holder and registers the pod
    under ``name`` for ``isolated(pod=name)``; :meth:`close` (or leaving the
    ``with`` block) kills everything the pod runs and unregisters it. Use it
    from pytest's process (a fixture), not from inside an isolated test.
    """

    def __init__(self, name: str, *, log: str | os.PathLike[str] | None = None) -> None:
        try:
            parse_option("pod", name)
        except SpecError as exc:
            raise PodError(f"pod({name!r}): {exc}") from None
        if name in _registry:
            raise PodError(
                f"pod({name!r}): a pod named {name!r} is already running in this pytest process "
                f"(holder pid {_registry[name].pid}); close it first or use another name"
            )
        self.name = name
        self.rootless = not privileged()
        self._owner = os.getpid()
        self._closed = False
        self._relays: list[int] = []
        self._popens: list[tuple[subprocess.Popen[Any], str]] = []
        self._statuses: dict[int, int] = {}
        if log is None:
            fd, path = tempfile.mkstemp(prefix=f"pytest-isolate-pod-{name}-", suffix=".log")
            os.close(fd)
            self._own_log = True
        else:
            path, self._own_log = os.path.abspath(os.fspath(log)), False
        #: Where the output of spawn()ed and popen()ed processes goes (unless redirected).
        self.log_path = path
        self._log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            #: The holder's pid (P's child until close()).
            self.pid: int = _start_holder(name, self.rootless)
        except BaseException:
            self._release_log()
            raise
        #: The pod's network namespace: what an ``isolated(pod=...)`` sandbox joins.
        self.netns_path = f"/proc/{self.pid}/ns/net"
        #: Rootless only: the pod's user namespace, which owns its network namespace
        #: and must be joined first.
        self.userns_path: str | None = f"/proc/{self.pid}/ns/user" if self.rootless else None
        #: The pod's pid namespace, for the processes the pod itself runs.
        self.pidns_path = f"/proc/{self.pid}/ns/pid_for_children"
        _registry[name] = self

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"holder pid {self.pid}"
        return f"<Pod {self.name!r} {state}>"

    def __enter__(self) -> Pod:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ running things

    def spawn(self, func: Callable[[], object]) -> int:
        """Fork a process that joins the pod and calls ``func`` (e.g. a server's
        ``serve_forever``). Returns the pid of the relay that pytest's process
        can signal and wait for; ``func`` runs in the relay's child, inside the
        pod's pid namespace, and the relay forwards SIGTERM, SIGINT and friends
        to it and exits with its status. Its output goes to :attr:`log_path`."""
        self._check_usable("spawn")
        pid = _fork()
        if pid == 0:  # pragma: no cover - runs in the relay
            try:
                _die_with_parent(self._owner)
                _redirect_output(self._log_fd)
                _enter(self.userns_path, self.netns_path, self.pidns_path)
                child = os.fork()
                if child == 0:
                    # The relay is outside the pod's pid namespace (getppid() is
                    # 0 here), so the usual "did the parent die first" check
                    # cannot be made; an orphan is reaped by the pod's init.
                    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
                    _run_callable(func)
                _relay(child)
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
                os._exit(1)
        self._relays.append(pid)
        return pid

    def popen(self, args: Sequence[str | os.PathLike[str]], **kwargs: Any) -> subprocess.Popen[Any]:
        """Run a program inside the pod; ``kwargs`` go to ``subprocess.Popen``.

        The program runs under a small trampoline (``python -I -S -c``) that
        joins the pod and forks it into the pod's pid namespace, forwards
        SIGTERM, SIGINT and friends, and exits with its status: the returned
        Popen's pid is the trampoline's. stdout and stderr go to
        :attr:`log_path` unless given; stdin is /dev/null unless given.
        """
        self._check_usable("popen")
        if isinstance(args, (str, bytes)) or kwargs.get("shell"):
            raise PodError(
                f"pod {self.name!r}: popen() takes a list of arguments, not a shell "
                "string; for a shell line pass ['/bin/sh', '-c', LINE]"
            )
        if "executable" in kwargs or "preexec_fn" in kwargs:
            raise PodError(
                f"pod {self.name!r}: popen() does not support executable= or "
                "preexec_fn= (they would apply to the trampoline, not the program)"
            )
        argv = [os.fspath(arg) for arg in args]
        if not argv:
            raise PodError(f"pod {self.name!r}: popen() needs a program to run")
        program = _resolve_program(argv[0], kwargs.get("cwd"), kwargs.get("env"))
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", self._log_fd)
        kwargs.setdefault("stderr", self._log_fd)
        package_dir = os.path.dirname(os.path.abspath(__file__))
        command = [
            sys.executable,
            "-I",
            "-S",
            "-c",
            _TRAMPOLINE,
            package_dir,
            str(self._owner),
            self.userns_path or "",
            self.netns_path,
            self.pidns_path,
            program,
            "--",
            *argv,
        ]
        proc: subprocess.Popen[Any] = subprocess.Popen(command, **kwargs)
        self._popens.append((proc, argv[0]))
        return proc

    def wait_for_port(self, port: int, timeout: float = 5.0, host: str = "127.0.0.1") -> None:
        """Return once something inside the pod accepts TCP connections on
        ``host:port``; raise PodError naming the last error and showing the
        pod's log otherwise. The connection is made by a helper process that
        joins the pod: the port is not open anywhere else."""
        self._check_usable("wait_for_port")
        deadline = time.monotonic() + timeout
        pid = _fork()
        if pid == 0:  # pragma: no cover - runs in the helper
            code = 0
            try:
                _die_with_parent(self._owner)
                _enter(self.userns_path, self.netns_path, None)
                code = _probe(host, port, deadline)
            except BaseException:
                code = 255
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code == 0:
            return
        reason = os.strerror(code) if 0 < code < 255 else "the helper could not join the pod"
        raise PodError(
            f"pod {self.name!r}: nothing accepted a connection on {host}:{port} inside the pod "
            f"within {timeout:g} s (last error: {reason}){self._processes_report()}\n"
            f"--- the pod's log ({self.log_path}), last lines ---\n{self._log_tail()}"
        )

    def read_log(self) -> str:
        """The output of the processes the pod runs, so far."""
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            return log.read()

    # ------------------------------------------------------------------ the end

    def close(self) -> None:
        """Kill every process the pod runs and the holder, reap them, unregister."""
        if self._closed or os.getpid() != self._owner:
            return  # a forked copy (a sandbox, a relay) never tears down the real pod
        self._closed = True
        if _registry.get(self.name) is self:
            del _registry[self.name]
        # The holder first: its death ends the pod's init, and with it every
        # process in the pod's pid namespace at once.
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        for pid in self._relays:
            if pid in self._statuses:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        for proc, _ in self._popens:
            proc.kill()
            proc.wait()
        self._release_log()

    def _release_log(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._log_fd)
        if self._own_log:
            with contextlib.suppress(OSError):
                os.unlink(self.log_path)

    def _check_usable(self, what: str) -> None:
        if os.getpid() != self._owner:
            raise PodError(
                f"pod {self.name!r}: {what}() called from another process (pid {os.getpid()}) "
                "than the one that started the pod; use the pod from fixtures in pytest's "
                "process, not from inside an isolated test"
            )
        if self._closed:
            raise PodError(f"pod {self.name!r}: {what}() called after close()")
        ended = self.holder_status()
        if ended is not None:
            raise PodError(
                f"pod {self.name!r}: its holder process (pid {self.pid}) has ended "
                f"({ended}); the pod is gone"
            )

    def holder_status(self) -> str | None:
        """None while the holder runs; how it ended otherwise (without reaping it)."""
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return "already reaped"
        if info is None:
            return None
        if info.si_code == os.CLD_EXITED:
            return f"exit status {info.si_status}"
        return f"killed by {_signal_name(info.si_status)}"

    def _processes_report(self) -> str:
        lines = []
        for pid in self._relays:
            if pid not in self._statuses:
                with contextlib.suppress(ChildProcessError):
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        self._statuses[pid] = status
            if pid in self._statuses:
                lines.append(f"spawn() pid {pid} ended: {_describe(self._statuses[pid])}")
        for proc, program in self._popens:
            if proc.poll() is not None:
                lines.append(
                    f"popen([{program!r}, ...]) pid {proc.pid} ended with "
                    f"returncode {proc.returncode}"
                )
        return "".join("\n" + line for line in lines)

    def _log_tail(self, limit: int = 4000) -> str:
        try:
            text = self.read_log()
        except OSError as exc:
            return f"(unreadable: {exc})"
        return (text[-limit:] if text else "(empty)").rstrip()


def pod(name: str, *, log: str | os.PathLike[str] | None = None) -> Pod:
    """Start a pod named ``name`` and register it for ``isolated(pod=name)``.

    The result is a context manager: the pod closes (every process in it
    killed) when the ``with`` block ends. ``log`` names the file that the
    pod's processes write to (default: a temporary file removed at close).
    """
    return Pod(name, log=log)


def lookup_pod(name: str) -> tuple[str, str | None]:
    """For the engine: the pod's network namespace path and, rootless, its
    user namespace path (joined first). Raises PodError naming the fix."""
    found = _registry.get(name)
    if found is None or found._owner != os.getpid():
        running = sorted(n for n, p in _registry.items() if p._owner == os.getpid())
        also = f"; running pods: {', '.join(running)}" if running else ""
        raise PodError(
            f"isolated(pod={name!r}): no pod named {name!r} is running in this pytest process; "
            f"start it in a fixture: `with pytest_isolate.pod({name!r}) as p: ...` and request "
            f"that fixture from the test (see docs/pods.md){also}"
        )
    ended = found.holder_status()
    if ended is not None:
        raise PodError(
            f"isolated(pod={name!r}): the pod's holder process (pid {found.pid}) has "
            f"ended ({ended}); the fixture that started the pod must keep it open"
        )
    return found.netns_path, found.userns_path


# --------------------------------------------------------------------------- the holder


def _fork() -> int:
    with warnings.catch_warnings():
        # Python 3.12+ warns when a multi-threaded process forks (xdist's execnet
        # thread); the child only makes syscalls or runs the given callable.
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


def _start_holder(name: str, rootless: bool) -> int:
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    owner = os.getpid()
    uid, gid = os.getuid(), os.getgid()
    try:
        pid = _fork()
    except BaseException:
        os.close(ready_r)
        os.close(ready_w)
        raise
    if pid == 0:  # pragma: no cover - runs in the holder
        _holder_main(ready_w, owner, rootless, uid, gid)
    os.close(ready_w)
    try:
        answer = _read_until_eof(ready_r, _START_TIMEOUT)
    finally:
        os.close(ready_r)
    if answer == b"ok":
        return pid
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    why = answer.decode(errors="replace") or f"no answer within {_START_TIMEOUT:g} s"
    hint = ""
    if rootless and "user" in why.lower():
        hint = (
            "; rootless pods need unprivileged user namespaces "
            "(sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0)"
        )
    raise PodError(f"pod({name!r}): the holder could not be started: {why}{hint}")


def _read_until_eof(fd: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return data
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return data
        chunk = os.read(fd, 4096)
        if not chunk:
            return data
        data += chunk


def _holder_main(
    ready_w: int, owner: int, rootless: bool, uid: int, gid: int
) -> NoReturn:  # pragma: no cover - runs in the holder
    step = "start"
    try:
        step = "set the parent-death signal"
        _die_with_parent(owner)
        # Nothing of pytest's is needed here: holding its pipes and sockets
        # open would delay their EOFs until the pod closes.
        _close_descriptors(keep=ready_w)
        # Imported here: the popen trampoline loads this module and needs none of it.
        from .sandbox import _map_ids
        from .syscalls import loopback_up

        flags = sc.CLONE_NEWNET | sc.CLONE_NEWPID
        if rootless:
            # One unshare: the network and pid namespaces are then owned by the
            # new user namespace, which sandboxes join first to be let in.
            step = "create the user, network and pid namespaces"
            sc.unshare(sc.CLONE_NEWUSER | flags)
            step = "map the user's own uid and gid"
            _map_ids(uid, gid)
        else:
            step = "create the network and pid namespaces"
            sc.unshare(flags)
        step = "bring the loopback interface up"
        loopback_up()
        step = "fork the pod's init"
        life_r, life_w = os.pipe2(os.O_CLOEXEC)
        init = os.fork()  # the first child in the new pid namespace: its pid 1
        if init == 0:
            os.close(ready_w)
            os.close(life_w)
            _pod_init(life_r)
        os.close(life_r)
        os.write(ready_w, b"ok")
        os.close(ready_w)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(ready_w, f"{step}: {exc}".encode())
        os._exit(1)
    # The holder's only job now: exist. Killed by Pod.close() or with pytest;
    # life_w closes with it, which ends the init.
    while True:
        try:
            os.waitpid(init, 0)
            os._exit(0)
        except ChildProcessError:
            os._exit(0)


def _pod_init(life_r: int) -> NoReturn:  # pragma: no cover - pid 1 of the pod
    """Reap orphans of the pod (a relay that died leaves its child here) until
    the holder goes, then exit: the kernel then kills the rest of the pod.

    The init's parent is outside its pid namespace, so a parent-death signal
    armed here could race with the holder's death unseen; the end of the
    holder's pipe is race-free."""
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(wake_w)
    for sig in FORWARDED_SIGNALS:
        # As pid 1 it ignores signals it has no handler for; make that explicit.
        signal.signal(sig, signal.SIG_IGN)
    while True:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        ready, _, _ = select.select([life_r, wake_r], [], [])
        if life_r in ready:
            os._exit(0)
        with contextlib.suppress(BlockingIOError):
            os.read(wake_r, 4096)


# --------------------------------------------------------------------------- joining


def _die_with_parent(parent: int) -> None:
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _close_descriptors(keep: int) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))


def _redirect_output(log_fd: int) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    # pytest's capture replaced sys.stdout/sys.stderr: write to the real fds.
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115


def _enter(userns: str | None, netns: str, pidns: str | None) -> None:
    """Join the pod. The user namespace comes first: rootless, it owns the
    other two, and joining it is what grants the right to join them. A pid
    namespace applies to the children made after joining, not to the caller."""
    for path, nstype in (
        (userns, sc.CLONE_NEWUSER),
        (netns, sc.CLONE_NEWNET),
        (pidns, sc.CLONE_NEWPID),
    ):
        if not path:
            continue
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            sc.setns(fd, nstype)
        except OSError as exc:
            raise OSError(exc.errno, f"joining {path}: {exc}") from None
        finally:
            os.close(fd)


def _run_callable(func: Callable[[], object]) -> NoReturn:  # pragma: no cover
    code = 0
    try:
        func()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _relay(child: int) -> NoReturn:  # pragma: no cover - runs in a relay or trampoline
    """Stand in for ``child`` outside the pod: pass signals on, end as it ended."""

    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    _, status = os.waitpid(child, 0)  # PEP 475: retried after each forwarded signal
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def exec_main(argv: list[str]) -> NoReturn:  # pragma: no cover - the popen trampoline
    """``owner userns netns pidns program -- argv...``: join the pod, fork the
    program into its pid namespace, relay."""
    owner, userns, netns, pidns, program, separator, *args = argv
    assert separator == "--", argv
    try:
        _die_with_parent(int(owner))
        _enter(userns or None, netns, pidns)
        child = os.fork()
    except OSError as exc:
        sys.stderr.write(f"pytest-isolate pod: {exc}\n")
        os._exit(126)
    if child == 0:
        try:
            sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
            os.execv(program, args)
        except OSError as exc:
            sys.stderr.write(f"pytest-isolate pod: cannot run {program}: {exc}\n")
        os._exit(127)
    _relay(child)


def _resolve_program(program: str, cwd: object, env: object) -> str:
    """The program's absolute path, so a missing one fails here, in the
    caller, with FileNotFoundError, as subprocess.Popen would."""
    if "/" in program:
        base = os.fspath(cwd) if isinstance(cwd, (str, os.PathLike)) else os.getcwd()
        path = os.path.join(base, program)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return os.path.abspath(path)
        raise FileNotFoundError(2, f"no executable file {path!r}", program)
    search = env.get("PATH") if isinstance(env, dict) else os.environ.get("PATH")
    found = shutil.which(program, path=search)
    if found is None:
        raise FileNotFoundError(2, f"{program!r} was not found on PATH ({search})", program)
    return os.path.abspath(found)


def _probe(host: str, port: int, deadline: float) -> int:  # pragma: no cover
    last = 0
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return 0
        except OSError as exc:
            last = exc.errno or 110
        if time.monotonic() >= deadline:
            return last if 0 < last < 255 else 110
        time.sleep(0.02)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {_signal_name(os.WTERMSIG(status))}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
