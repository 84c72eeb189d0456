"""The init factory: a small process that makes each sandbox's pid 1.

Forking pytest is the dominant cost of a sandbox (page tables copied, every
page the child writes copied again), so a test should cost one fork of
pytest, not two. The first process of a pid namespace becomes its init, so
the init must exist before the test process is forked into the namespace.
This factory, a separate small interpreter started once per session, makes
one on request: it unshares a pid namespace, forks the init (a fork of a
small process is cheap) and hands pytest a pidfd of it; pytest then forks the
test straight into that namespace (setns on the pidfd) as pid 2.

The factory and its inits live in an empty, read-only root of their own, not
dumpable, so a test that is granted CAP_SYS_PTRACE and looks at /proc/1/root
finds nothing of the host. The factory dies with pytest (parent-death signal
and end of its socket); the inits die with the factory. Only for root:
rootless sandboxes make their own init (see sandbox.py).

Runs as ``python -I -S -c`` with only this package on its path: it must not
import pytest or anything else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile

__all__ = ["InitFactory", "InitFactoryError", "main"]

_REQUEST = b"n"


class InitFactoryError(Exception):
    """The factory could not start or answer; the caller falls back to making
    the init itself."""


class InitFactory:
    """pytest's handle on the factory process."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._jail: str | None = None
        self._pending = False

    def start(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._jail = tempfile.mkdtemp(prefix="pytest-isolate-initd-")
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = (f"import sys; sys.path.insert(0, {package_parent!r}); "
                "from pytest_isolate.initd import main; main()")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", code, str(child.fileno()), self._jail],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL,
                # Never pytest's output: an init outliving a run would hold it open.
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)
        except OSError as exc:
            raise InitFactoryError(f"cannot start the init factory: {exc}") from exc
        finally:
            child.close()
        self._sock = parent
        reply = self._recv()
        if reply[0] != b"ready":
            self.close()
            raise InitFactoryError(f"the init factory failed to start: {reply[0]!r}")

    def _recv(self) -> tuple[bytes, list[int]]:
        assert self._sock is not None
        try:
            data, fds, _, _ = socket.recv_fds(self._sock, 4096, 2)
        except OSError as exc:
            raise InitFactoryError(f"the init factory did not answer: {exc}") from exc
        if not data:
            raise InitFactoryError("the init factory exited")
        return data, fds

    def _request(self) -> None:
        assert self._sock is not None
        try:
            self._sock.send(_REQUEST)
        except OSError as exc:
            raise InitFactoryError(f"the init factory is gone: {exc}") from exc
        self._pending = True

    def new_init(self) -> int:
        """A pidfd of a fresh init in a fresh pid namespace, owned by the caller.

        The next one is asked for right away, so the factory makes it while
        this one's test runs: pytest never waits for a fork in the factory."""
        if self._sock is None:
            raise InitFactoryError("the init factory is not running")
        if not self._pending:
            self._request()
        self._pending = False
        data, fds = self._recv()
        if data != b"init" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise InitFactoryError(f"the init factory could not make an init: {data!r}")
        self._request()
        return fds[0]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        if self._jail is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self._jail)
            self._jail = None


# --------------------------------------------------------------------------- the factory


def _jail(path: str) -> None:
    """An empty, read-only root: nothing of the host behind /proc/1/root."""
    from . import syscalls as sc

    sc.unshare(sc.CLONE_NEWNS)
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_SLAVE)
    sc.mount("tmpfs", path, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, "size=4k,mode=0555")
    os.chdir(path)
    sc.pivot_root(".", ".")
    sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")
    sc.mount(None, "/", None, sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV
             | sc.MS_NOEXEC)


def _init_loop() -> None:  # pragma: no cover - runs as pid 1 of a sandbox
    """pid 1: orphans of the test are reparented here and, since SIGCHLD is
    ignored (inherited from the factory), the kernel reaps them as they die.
    The init only waits to be killed with its sandbox."""
    while True:
        signal.pause()


def main() -> None:  # pragma: no cover - runs in the factory process
    from . import syscalls as sc

    sock = socket.socket(fileno=int(sys.argv[1]))
    try:
        parent = os.getppid()
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)
        own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        _jail(sys.argv[2])
        sc.prctl(sc.PR_SET_DUMPABLE, 0)
        # Inits are reaped by the kernel: the factory never waits for them.
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        sock.send(b"ready")
    except Exception as exc:
        with contextlib.suppress(OSError):
            sock.send(f"error: {exc}".encode()[:4000])
        os._exit(1)
    while True:
        try:
            request = sock.recv(16)
        except OSError:
            os._exit(0)
        if request != _REQUEST:
            os._exit(0)  # pytest closed its end (or spoke nonsense): done
        try:
            sc.unshare(sc.CLONE_NEWPID)
            pid = os.fork()
            if pid == 0:
                with contextlib.suppress(BaseException):
                    sock.close()
                    # Dies with the factory, which dies with pytest.
                    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
                    _init_loop()
                os._exit(0)
            sc.setns(own_pidns, sc.CLONE_NEWPID)
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            sock.send(f"error: {exc}".encode()[:4000])
            continue
        try:
            socket.send_fds(sock, [b"init"], [pidfd])
        finally:
            os.close(pidfd)
