"""The zygote: a copy of pytest's process that forks the test processes.

Every fork write-protects the parent's memory: while a test process lives,
each page the parent writes is copied first (a page fault and 4 KiB copied).
pytest's process writes hundreds of pages between two tests (reference
counts, reports, the terminal), so forking it once per test makes it pay
those copies once per test, and with a sandbox prepared during the current
test (engine.py) there is nearly always a live child.

Instead, while pytest's state stays what the next tests need (same parent
collector, no fixture set up or torn down in pytest's process since), one
fork of pytest's process, the zygote, does the forking. It only waits for
requests, so its pages stay shared with its children, and pytest's process
copies each page it writes at most once per zygote instead of once per
test. A request carries the sandbox's descriptors (SCM_RIGHTS) and which
plan, item and cgroup; the zygote forks with clone(CLONE_PARENT)
(syscalls.fork_sibling), so the test process is pytest's own child, as if
pytest had forked it: waiting for it, its pidfd, its exit status and the
parent-death signal are unchanged. The zygote dies with pytest, and ends
when pytest closes its socket (the engine does whenever its state moved on).
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import struct
import warnings
from collections.abc import Callable, Container

from . import syscalls as sc
from .initd import readable

__all__ = ["Zygote", "ZygoteError"]

_REPLY = struct.Struct("<i")
#: A request: up to 6 descriptors and a short payload (ids, cgroup paths).
_MAX_FDS = 8
_MAX_PAYLOAD = 1 << 16
#: Seconds a closed zygote has to exit before it is killed (reap(block=True)).
_EXIT_GRACE = 5.0


class ZygoteError(OSError):
    """The zygote is gone or could not fork: the engine forks itself."""


#: In the zygote: turns a request (payload, descriptors, the zygote's own
#: socket) into a forked child's pid. Raises to refuse.
Serve = Callable[[bytes, list[int], int], int]


class Zygote:
    """pytest's handle on one zygote."""

    def __init__(self, key: object, plans: Container[int] = ()) -> None:
        #: What pytest's state was when it was forked (the engine compares).
        self.key = key
        #: Identities of the sandbox plans its copy of pytest's state holds.
        self.plans = plans
        self.pid = -1
        self._sock: socket.socket | None = None
        self._sent = 0
        self._received = 0
        self._answers: dict[int, bytes] = {}

    def start(self, serve: Serve, close: set[int]) -> None:
        """Fork the zygote; ``close``: pytest's descriptors it must not keep
        (other sandboxes' pipes, the init factory's socket)."""
        from .sandbox import flush_std_streams

        flush_std_streams()  # its test processes flush theirs (the test's output)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with warnings.catch_warnings():
                # Python 3.12+ warns when a multi-threaded process forks (xdist's
                # execnet thread); the zygote never touches locks other threads held.
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        except BaseException:
            ours.close()
            theirs.close()
            raise
        if pid == 0:  # pragma: no cover - the zygote
            _main(theirs, ours, serve, close)
        theirs.close()
        self.pid = pid
        self._sock = ours

    def request(self, payload: bytes, fds: list[int]) -> Callable[[], int]:
        """Ask the zygote to fork a sandbox, without waiting: returns the call
        that waits for its pid (a child of ours). The answers come in order."""
        sock = self._sock
        if sock is None:
            raise ZygoteError("the zygote is closed")
        try:
            socket.send_fds(sock, [payload], [fd for fd in fds if fd >= 0])
        except OSError as exc:
            self.close()
            raise ZygoteError(f"the zygote is gone: {exc}") from exc
        self._sent += 1
        number = self._sent
        return lambda: self._answer(number)

    def _answer(self, number: int) -> int:
        while number not in self._answers:
            self._read_answer()
        reply = self._answers.pop(number)
        if len(reply) == _REPLY.size:
            (pid,) = _REPLY.unpack(reply)
            if pid > 0:
                return int(pid)
        raise ZygoteError(
            f"the zygote refused: {reply[1:].decode(errors='replace') or 'it is gone'}"
        )

    def _read_answer(self) -> None:
        self._received += 1
        reply = b""
        if self._sock is not None:
            try:
                reply = self._sock.recv(512)
            except OSError:
                reply = b""
            if not reply:
                self._sock.close()
                self._sock = None
        self._answers[self._received] = reply

    @property
    def alive(self) -> bool:
        return self._sock is not None

    def held_fds(self) -> set[int]:
        """pytest's end of the channel: no sandbox pytest forks itself may
        keep it (it could ask for forks, and the zygote would never see the
        end of file that ends it)."""
        return {self._sock.fileno()} if self._sock is not None else set()

    def close(self) -> None:
        """End it: on end of file it exits; reap() collects it. Answers still
        due are read first: each is a child of ours to wait for."""
        if self._sock is not None:
            self._sock.settimeout(10)
            while self._received < self._sent and self._sock is not None:
                self._read_answer()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def reap(self, block: bool) -> bool:
        """True once it has exited and been waited for."""
        if self.pid <= 0:
            return True
        self.close()
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
            if not pid and block:
                # It exits at the end of file (its pidfd says when); should a
                # descriptor of its channel live on somewhere, it is ended
                # after a while.
                pidfd = os.pidfd_open(self.pid)
                try:
                    readable(pidfd, _EXIT_GRACE)
                finally:
                    os.close(pidfd)
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
                if not pid:
                    os.kill(self.pid, signal.SIGKILL)
                    pid, _ = os.waitpid(self.pid, 0)
        except ChildProcessError:
            pid = self.pid
        if pid:
            self.pid = -1
            return True
        return False


def _main(sock: socket.socket, theirs: socket.socket, serve: Serve, close: set[int]) -> None:
    """The zygote's loop: one request, one fork, one answer."""
    code = 0
    try:
        parent = os.getppid()
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(0)
        theirs.close()
        for fd in close:
            with contextlib.suppress(OSError):
                os.close(fd)
        # What it holds now is what every test process inherits: never
        # scanned by the collector (which would write to, and so copy, it).
        gc.freeze()
        while True:
            message, fds, _, _ = socket.recv_fds(sock, _MAX_PAYLOAD, _MAX_FDS)
            if not message:
                break
            try:
                reply = _REPLY.pack(serve(message, fds, sock.fileno()))
            except Exception as exc:
                reply = b"!" + f"{type(exc).__name__}: {exc}".encode()[:400]
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            sock.send(reply)
    except BaseException:  # KeyboardInterrupt included: pytest forks itself then
        code = 1
    finally:
        os._exit(code)
