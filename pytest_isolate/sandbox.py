"""One sandbox: the ordered setup sequence and the handle pytest's side holds.

This is the only place that decides the order of the setup steps. It reads
top to bottom like the talk the project grew from:

  pytest (P) --fork--> the sandbox process, born in a new pid namespace
     0. (pid 1 of that namespace exists already: a reaper from initd.py)
     1. die with P (parent-death signal); drop descriptors of other sandboxes
     2. place itself in its cgroup            (before the cgroup namespace)
        join a pod's network (and, rootless, user) namespace when asked
     3. new user namespace when not root      (owns everything created after)
     4. new mount, net, uts, ipc, cgroup namespaces
     5. the new root: tmpfs, binds, /proc, /dev, /sys, pivot_root, old root detached
     6. hostname, loopback up
     7. it is the test process from here on
     8. close directory descriptors (CVE-2024-21626), environment allow-list
     9. capabilities dropped, no_new_privs          (before the filter: it needs nnp)
    10. wait for "go" from P   (a sandbox can be prepared while the previous test runs)
    11. the syscall filter, last                    (our own setup is unaffected)
    12. the test

Forking pytest is the dominant cost, so the common case forks it once: as
root, a small init factory (initd.py) has made pid 1 already and P forks the
sandbox straight into its namespace, as pid 2. Without the factory, P forks
into a fresh pid namespace, the child is pid 1 and forks the test at step 7;
rootless, the child makes the user namespace first and forks pid 1, which
forks the test. Nothing here imports pytest.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # the C module signal.py wraps
import contextlib
import dataclasses
import errno
import fcntl
import functools
import os
import select
import signal
import stat
import sys
import time
import traceback
import types
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, NoReturn

from . import syscalls as sc
from .capabilities import DEFAULT_ROOT_CAPS
from .initd import InitFactory, InitFactoryError, InitSetup, Recycled, kill_init, readable
from .prefault import Ranges, populate
from .protocol import MAX_TOTAL, FrameReader, Message, ProtocolError, encode_exit, send_message
from .rootfs import RootfsPlan, SetupStepError, apply_rootfs, finish_joined_rootfs

_native_pid1: types.ModuleType | None
try:  # optional, compiled (setup.py): without it a rootless pid 1 is a copy of Python
    from . import _pid1 as _native_pid1
except ImportError:  # pragma: no cover - where it was not built
    _native_pid1 = None
_native_steps: types.ModuleType | None
try:  # optional, compiled (setup.py): without it the setup steps run in Python
    from . import _steps as _native_steps
except ImportError:  # pragma: no cover - where it was not built
    _native_steps = None

__all__ = [
    "SETUP_FAILED_EXIT",
    "Sandbox",
    "SandboxOutcome",
    "SandboxPlan",
    "TestContext",
    "init_setup",
    "spawn",
]

#: Exit status of a sandbox process whose setup failed (after a setup_failed frame).
SETUP_FAILED_EXIT = 121
#: P asks the sandbox for the test's stack with this signal (forwarded down to the test).
DUMP_SIGNAL = signal.SIGRTMIN + 3
#: The C-level fallback dump (faulthandler), for a test stuck outside Python code.
FAULT_SIGNAL = signal.SIGRTMIN + 4
#: Without a cgroup: P asks the sandbox's pid 1 to SIGKILL every other
#: process of its pid namespace and say so on its own pipe (_init_loop).
KILL_ALL_SIGNAL = signal.SIGRTMIN + 5

_O_PATH = getattr(os, "O_PATH", 0o10000000)
_NS_FLAGS = sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | sc.CLONE_NEWCGROUP


@dataclass(frozen=True)
class SandboxPlan:
    """What the sandbox process does, decided once per distinct spec."""

    namespaces: bool = True
    rootless: bool = False
    new_net: bool = True
    pod_netns: str | None = None  # /proc/<pod holder>/ns/net, joined instead of a new one
    pod_userns: str | None = None  # rootless: the pod's user namespace, joined first
    hostname: str = "isolated"
    rootfs: RootfsPlan | None = None
    caps: frozenset[str] | None = None
    seccomp_program: bytes | None = None
    #: The root, hostname and loopback as a program for _steps.c (steps.py),
    #: compiled by pytest's process; None: the Python steps.
    setup_program: bytes | None = None
    #: The capability drop, Landlock and the filter, likewise.
    secure_program: bytes | None = None
    #: Rootless, the ids' mapping and the cgroup namespace, likewise.
    born_program: bytes | None = None
    env_allow: tuple[str, ...] | None = None
    strict_fds: bool = False
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)


@dataclass
class TestContext:
    """Handed to the test callback inside the sandbox. ``result_fd``: where
    every frame is written (a memfd: what was written stays readable to
    pytest whatever happens next); ``bell_fd``: a pipe, written to once the
    "done" frame is there (``ring``), the one wake-up pytest waits for."""

    result_fd: int
    out_fd: int
    err_fd: int
    stack_fd: int
    bell_fd: int
    go_data: bytes = b""

    def ring(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.bell_fd, b"d")

    __test__ = False


@dataclass
class SandboxOutcome:
    messages: list[Message]
    wait_status: int | None  # of the process P forked (init, or the rootless outer)
    test_status: int | None  # the test process's status, as init reported it
    timed_out: bool
    protocol_error: str | None
    stack: str
    duration: float


class Sandbox:
    """P's handle on one sandbox: its pid, pipes and captured output."""

    def __init__(
        self,
        pid: int,
        result_fd: int,
        go_fd: int,
        out_fd: int,
        err_fd: int,
        stack_fd: int,
        bell_fd: int,
        cleanup: Callable[[], None] | None,
        pending: tuple[Callable[[], int], tuple[int, ...]] | None = None,
    ) -> None:
        #: The memfd the sandbox writes its frames to, and the pipe it rings
        #: once "done" is there (TestContext).
        self.result_fd = result_fd
        self.bell_fd = bell_fd
        self.go_fd = go_fd
        self.out_fd = out_fd
        self.err_fd = err_fd
        self.stack_fd = stack_fd
        self._cleanup = cleanup
        self._reaped: int | None = None
        self.init_pidfd = -1
        #: Where the init goes after a clean end to be reset for another test.
        self._recycler: InitFactory | None = None
        self._recycled: Recycled | None = None
        #: The "done" frame came, and nothing broke the protocol.
        self._clean = False
        self.started = 0.0
        self.fds: tuple[int, ...] = (result_fd, go_fd, out_fd, err_fd, stack_fd, bell_fd)
        #: Forked by a zygote that has not answered yet: the call that gives
        #: the pid, and the child's ends of the pipes, held until then.
        self._pending = pending
        #: Its copy of pytest's state has the test's item as it is at "go"
        #: (forked by pytest's process in the item's own protocol).
        self.item_current = False
        #: Rootless: the process pytest forked may stay outside the pid
        #: namespace and only relay the exit of pid 1, its child (_relay);
        #: or be pid 1, born in the namespace (fork_born).
        self.relayed = False
        #: Rootless without a cgroup: the read end of the pipe on which the
        #: sandbox's pid 1 says it has killed every other process of its
        #: namespace (KILL_ALL_SIGNAL), or -1.
        self.killed_fd = -1
        self._kill_all = "no"  # "asked" once the signal is sent, "hard" after a SIGKILL
        self.pid = -1
        self.pidfd = -1
        if pending is None:
            self._adopt(pid)
        else:
            self.fds = (*self.fds, *pending[1])

    def set_cleanup(self, cleanup: Callable[[], None] | None) -> None:
        """What close() calls last (the cgroup's removal)."""
        self._cleanup = cleanup

    def _resolve_quietly(self) -> None:
        """For the methods that must work whatever happened: a sandbox that
        could not be forked has no process to signal or wait for (pid -1)."""
        if self._pending is not None:
            try:
                self.resolve()
            except OSError:
                self._reaped = 0  # no process to wait for

    def _adopt(self, pid: int) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.fds = (*self.fds, self.pidfd)

    def resolve(self) -> None:
        """Wait for the zygote's answer (the pid) if it is still due. Raises
        OSError when the sandbox could not be forked at all."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        resolve, held = pending
        self.fds = tuple(fd for fd in self.fds if fd not in held)
        self._adopt(resolve())

    def attach_init(self, pidfd: int, recycler: InitFactory | None = None) -> None:
        """The sandbox's pid 1 came from the factory: killing it ends the
        whole pid namespace. ``recycler``: the factory, which takes it back
        after a test that ended cleanly, to be reset for another."""
        self.init_pidfd = pidfd
        self.fds = (*self.fds, pidfd)
        self._recycler = recycler

    def go(self, data: bytes = b"", linger: bool = False) -> None:
        """Release the prepared test; the timeout clock starts here. ``data``
        (under 64 KiB, the pipe's capacity, so that the write never waits for
        a test process that died) reaches the test callback as
        ``ctx.go_data``. With
        ``linger``, the test process stays (stopped in pause()) after its
        "done" frame until kill(), so its memory can be looked at."""
        self._resolve_quietly()
        self.started = time.monotonic()
        header = b"g" + (b"l" if linger else b"-") + len(data).to_bytes(4, "little")
        with contextlib.suppress(OSError):  # already dead: collect() reports how
            os.write(self.go_fd, header + data)

    def attach_killed(self, fd: int) -> None:
        """The read end of the pipe pid 1 answers KILL_ALL_SIGNAL on."""
        self.killed_fd = fd
        self.fds = (*self.fds, fd)

    def kill(self, gently: bool = False) -> None:
        """SIGKILL the sandbox's pid 1, which makes the kernel kill the rest of
        its pid namespace, and the process pytest forked. Idempotent.
        ``gently``: where pid 1 can answer (a rootless pid 1 born in its
        namespaces, with no cgroup), ask it to kill every other process
        instead and leave it be: stopped() waits for its word, far sooner
        than for its end (its exit tears down a copy of pytest's memory
        before the kernel kills the rest of the namespace)."""
        self._resolve_quietly()
        if gently and (self._kill_all == "asked" or self._ask_kill_all()):
            return
        self._kill_all = "hard"
        if self._clean and self.init_pidfd >= 0 and self._recycler is not None:
            # The init ends every process of the namespace itself, and is
            # handed out again only once it has made the sandbox new.
            recycled = self._recycler.recycle(self.init_pidfd, self._exited)
            if recycled is not None:
                self._recycled = recycled
                self.fds = tuple(fd for fd in self.fds if fd != self.init_pidfd)
                self.init_pidfd = -1
        if self.init_pidfd < 0 and self._recycled is None and self._reaped is None and self.pid > 0:
            # Rootless with an outer process (which stays outside the
            # namespace), pid 1 is its child: take it by pidfd, from the
            # kernel's own list of children, never from anything the sandbox
            # says. Where the process pytest forked is pid 1 itself (born in
            # its namespaces, or root without the factory), its child is the
            # test process: killed as well, and pid 1's end ends the rest.
            for pid in _children_of(self.pid):
                with contextlib.suppress(OSError):
                    self.init_pidfd = os.pidfd_open(pid)
                    self.fds = (*self.fds, self.init_pidfd)
                    break
        if self.init_pidfd >= 0:
            kill_init(self.init_pidfd, self._recycler)
        if self._reaped is None and self.pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def _ask_kill_all(self) -> bool:
        if self._kill_all != "no" or self.killed_fd < 0 or self._reaped is not None:
            return False
        if self.pid <= 0 or self._in_our_pid_namespace():
            return False  # an outer process (not born in the namespaces): no answer
        try:
            os.kill(self.pid, KILL_ALL_SIGNAL)  # our child, not reaped: its pid is its own
        except OSError:
            return False
        self._kill_all = "asked"
        return True

    def stopped(self, timeout: float = 10.0) -> bool:
        """Without a cgroup, after kill(gently=True): wait for pid 1's word
        that no other process of the sandbox is left to run (_kill_all), then
        SIGKILL pid 1 itself, which runs only our code; its end, and the
        namespaces', are reaped later (is_gone). False, having killed it:
        no word came (pid 1 ended first, or was never asked); wait for the
        namespace to end instead (wait_namespace_gone)."""
        self._resolve_quietly()
        word = b""
        if self._kill_all == "asked" and readable(self.killed_fd, timeout):
            with contextlib.suppress(OSError):
                word = os.read(self.killed_fd, 1)
        self.kill()
        return word == b"k"

    def signalled_pids(self) -> tuple[int, ...]:
        """After kill(): the process pytest forked, if it is not reaped yet (its
        number cannot have been given to another process): it has SIGKILL."""
        return (self.pid,) if self.pid > 0 and self._reaped is None else ()

    def _exited(self) -> bool:
        """Without blocking: has the process pytest forked exited (then it
        is reaped)?"""
        if self._reaped is None:
            if self.pid <= 0 or not readable(self.pidfd, 0):
                return False
            self._reap()
        return True

    def is_gone(self) -> bool:
        """Without blocking: have the process pytest forked and pid 1 exited
        (or pid 1 ended every other process, when it is reset for another
        test)? Ours is reaped as soon as it has exited: pid 1 cannot finish
        while it is an unreaped zombie of its namespace."""
        self._resolve_quietly()
        if not self._exited():
            return False
        if self._recycled is not None:
            return self._recycled.gone()
        return self.init_pidfd < 0 or readable(self.init_pidfd, 0)

    def wait_namespace_gone(self, timeout: float = 10.0) -> bool:
        """Rootless (``relayed``): kill, then block until pid 1 has exited,
        which the kernel lets happen only once every other process of the
        namespace is gone; the process pytest forked, outside the namespace
        and running only our relay, is left to exit and be reaped later
        (is_gone, close). False, having waited for nothing: not that shape,
        or its pid 1 is unknown (call wait_gone)."""
        self._resolve_quietly()
        outside = self.relayed and self._in_our_pid_namespace()
        self.kill()
        if not outside or self._recycled is not None or self.init_pidfd < 0:
            return False
        return readable(self.init_pidfd, timeout)

    def _in_our_pid_namespace(self) -> bool:
        """Is the process pytest forked in pytest's own pid namespace (an
        outer process), as the kernel says? False when it cannot be told
        (gone, not readable): then wait_gone waits for everything."""
        if self.pid <= 0 or self._reaped is not None:
            return False
        try:
            return os.stat(f"/proc/{self.pid}/ns/pid").st_ino == _own_pid_namespace()
        except OSError:
            return False

    def wait_gone(self, timeout: float = 10.0) -> None:
        """Block until pid 1 has exited, which the kernel lets happen only once
        every other process of the namespace is gone: no code of this test runs
        after this returns."""
        self._resolve_quietly()
        self.kill()
        # Reap ours first: pid 1 cannot finish exiting while a process of its
        # namespace, the test forked by pytest, is still an unreaped zombie.
        self._reap()
        if self._recycled is not None:
            self._recycled.gone(timeout)
        elif self.init_pidfd >= 0:
            readable(self.init_pidfd, timeout)

    def _reap(self) -> int:
        if self._reaped is None:
            _, status = os.waitpid(self.pid, 0)
            self._reaped = status
        return self._reaped

    def collect(self, timeout: float | None, keep: bool = False) -> SandboxOutcome:
        """Wait until the sandbox rings (its "done" frame is written), is gone,
        the timeout passes, or the child breaks the protocol; then read its
        frames. The frames are written to a memfd, which holds them whatever
        the child does next (a crash in teardown still delivers setup and
        call), so pytest wakes once a test, not once a frame. The sandbox
        is killed on its "done" frame unless ``keep`` (then the caller kills
        it)."""
        self._resolve_quietly()
        results = _Results(self.result_fd)
        protocol_error: str | None = None
        timed_out = False
        deadline = None if timeout is None else self.started + timeout
        poller = select.poll()
        bell_open = True
        poller.register(self.bell_fd, select.POLLIN)
        poller.register(self.pidfd, select.POLLIN)
        complete = False
        while True:
            wait_ms = -1
            if deadline is not None:
                wait_ms = max(0, int((deadline - time.monotonic()) * 1000) + 1)
            events = poller.poll(wait_ms)
            if not events and deadline is not None and time.monotonic() >= deadline:
                timed_out = True
                break
            gone = False
            for fd, _ in events:
                if fd == self.bell_fd and bell_open:
                    # Rung (by the test, or by anything of the sandbox that
                    # holds the bell: only a wake-up, the frames decide).
                    if not os.read(fd, _BELL_READ):
                        bell_open = False
                        poller.unregister(fd)
                elif fd == self.pidfd:
                    gone = True
            try:
                complete = results.read()
            except ProtocolError as exc:
                protocol_error = str(exc)
                break
            if complete:
                self._clean = True
                # Every report is in: kill the sandbox now, so that its
                # teardown (address space, namespaces) overlaps with pytest
                # logging the reports; wait_gone() confirms it before the
                # next test starts.
                if not keep:
                    self.kill(gently=True)
                break
            if gone:
                break
        stack = ""
        if timed_out:
            stack = self._dump_stack()
        if timed_out or protocol_error:
            self.kill()
        status = None
        messages = results.messages
        if not complete:
            status = self._reap()
            # Everything of the pid namespace is gone once its init is
            # reaped: what it wrote last is in the memfd now (after a
            # timeout too: the reports made before the test hung).
            if protocol_error is None:
                try:
                    if not results.read() and not timed_out:
                        results.finish()  # nothing more will come: a part frame is an error
                except ProtocolError as exc:
                    protocol_error = str(exc)
            # The test process may have exited after its "done" frame before
            # pytest saw it ring (a busy or slow machine): as clean an end.
            self._clean = protocol_error is None and bool(messages) and messages[-1].type == "done"
        test_status = None
        for msg in messages:
            if msg.type == "exit" and isinstance(msg.payload, dict):
                value = msg.payload.get("status")
                if isinstance(value, int) and not isinstance(value, bool):
                    test_status = value
        return SandboxOutcome(
            messages,
            status,
            test_status,
            timed_out,
            protocol_error,
            stack,
            time.monotonic() - self.started,
        )

    def _dump_stack(self) -> str:
        """Ask the test for its Python stack (pytest-timeout style), falling
        back to faulthandler's C-level dump if Python code does not run."""
        for sig, wait in ((DUMP_SIGNAL, 0.3), (FAULT_SIGNAL, 0.2)):
            with contextlib.suppress(ProcessLookupError):
                if self.pid > 0:
                    os.kill(self.pid, sig)
            end = time.monotonic() + wait
            size = 0
            while time.monotonic() < end:
                time.sleep(0.02)
                new_size = os.fstat(self.stack_fd).st_size
                if new_size and new_size == size:
                    break
                size = new_size
            if size:
                break
        return read_memfd(self.stack_fd)

    def close(self) -> None:
        """Release everything: kill if still alive, reap, close fds, cleanup."""
        self._resolve_quietly()
        if self._reaped is None and self.pid > 0:
            self.wait_gone()
        elif self.pid <= 0 and self.init_pidfd >= 0:
            # Never forked (the zygote failed): its init waits for nobody.
            kill_init(self.init_pidfd, self._recycler)
        for fd in self.fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fds = ()
        # The handle on its init, reset for another test, refers back to this
        # sandbox until then: no cycle left for the cyclic collector.
        self._recycled = None
        self._recycler = None
        if self._cleanup is not None:
            cleanup, self._cleanup = self._cleanup, None
            cleanup()


def _children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except (OSError, ValueError):
        return []


#: Bytes asked of each pread() of the results memfd. os.pread allocates that
#: much first: 1 MiB would be an mmap, a page fault and an mremap on every
#: read (~25 us); 64 KiB comes from the heap. Larger results take several.
_READ_SIZE = 1 << 16
#: The bell carries no data: what a read of it takes at most.
_BELL_READ = 4096


class _Results:
    """pytest's reader of a sandbox's results memfd: the frames written so
    far, parsed from where the last read stopped, up to the "done" frame
    (anything after it is ignored, as nothing after it matters). At most
    the protocol's MAX_TOTAL bytes are read: the child is untrusted."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.messages: list[Message] = []
        self._reader = FrameReader()
        self._offset = 0
        self._done = False

    def read(self) -> bool:
        """Parse what was written since; True once the "done" frame is in.
        Raises ProtocolError on a malformed or oversized stream."""
        while not self._done:
            data = os.pread(self.fd, min(_READ_SIZE, MAX_TOTAL + 1 - self._offset), self._offset)
            if not data:
                break
            self._offset += len(data)
            # Past MAX_TOTAL bytes in all, feed() raises ProtocolError.
            for message in self._reader.feed(data):
                self.messages.append(message)
                if message.type == "done":
                    self._done = True
                    break
        return self._done

    def finish(self) -> None:
        """The writers are gone: raise ProtocolError if a frame was left half
        written."""
        self._reader.finish()


def read_memfd(fd: int, limit: int = 1 << 20) -> str:
    size = os.fstat(fd).st_size
    data = os.pread(fd, min(size, limit), 0)
    text = data.decode("utf-8", "replace")
    if size > limit:
        text += f"\n[... {size - limit} more bytes not shown]"
    return text


# --------------------------------------------------------------------------- P's side


def spawn(
    plan: SandboxPlan,
    *,
    cgroup_procs: tuple[str, ...],
    run_test: RunTest,
    foreign_fds: Callable[[], set[int]],
    clone_into: str | None = None,
    keep_fds: Callable[[], set[int]] = set,
    cleanup: Callable[[], None] | None = None,
    init_factory: InitFactory | None = None,
    prefault: Ranges = (),
    forker: Callable[[list[int]], Callable[[], int]] | None = None,
) -> Sandbox:
    """Fork a sandbox that sets itself up and waits for ``go()``.

    Three shapes, cheapest first: as root with the init factory, pytest forks
    the test straight into a pid namespace whose init the factory made (one
    fork of pytest); as root without it, the forked process is the init and
    forks the test (two); rootless, the forked process makes the user
    namespace, forks the init, which forks the test (three).

    ``forker``: a zygote (zygote.py) forks instead of pytest's process. It
    is sent the sandbox's descriptors (results, go, stdout, stderr, stack, bell,
    and the init's pidfd or -1) and returns a call that waits for the pid
    of a process that is pytest's own child, as one forked here would be;
    it decides the rest (run_test, prefault...) from its own copy of
    pytest's state. The sandbox returned then has its pid once
    Sandbox.resolve() is called (every method that needs it does), which
    raises OSError if the zygote failed; when the request cannot even be
    sent, the fork happens here.

    ``clone_into``: the test's cgroup v2 directory, where pytest's process
    (when it has a single thread) forks the child straight into it
    (fork_born); otherwise the child writes itself to ``cgroup_procs``."""
    result_fd = os.memfd_create("isolate-results", os.MFD_CLOEXEC)
    bell_r, bell_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    out_fd = os.memfd_create("isolate-stdout", os.MFD_CLOEXEC)
    err_fd = os.memfd_create("isolate-stderr", os.MFD_CLOEXEC)
    stack_fd = os.memfd_create("isolate-stack", os.MFD_CLOEXEC)
    init_pidfd = -1
    setup = _init_setup(plan)
    if plan.namespaces and not plan.rootless and init_factory is not None:
        with contextlib.suppress(InitFactoryError):
            init_pidfd = init_factory.new_init(setup)
    fds = [result_fd, go_r, out_fd, err_fd, stack_fd, bell_w]
    # Without a cgroup to SIGKILL every process of the test at once, pid 1
    # does it when asked and says so on this pipe (Sandbox.stopped).
    killed_r = killed_w = -1
    if plan.rootless and plan.namespaces and not cgroup_procs and clone_into is None:
        killed_r, killed_w = os.pipe2(os.O_CLOEXEC)
    held = tuple(fd for fd in (bell_w, go_r, killed_w) if fd >= 0)
    pid = -1
    try:
        ticket = None
        if forker is not None:
            # The seventh: the factory's init (root) or the pipe (rootless).
            with contextlib.suppress(OSError):
                ticket = forker([*fds, init_pidfd, killed_w])
        if ticket is not None:
            # The zygote answers while pytest goes on; until then pytest keeps
            # the child's ends. No answer: the sandbox is unusable (the
            # caller makes a new one, with new pipes: the zygote may have
            # forked a child that holds these before it failed).
            def resolve(ticket: Callable[[], int] = ticket) -> int:
                try:
                    return ticket()
                finally:
                    for fd in held:
                        os.close(fd)

            sandbox = Sandbox(
                -1,
                result_fd,
                go_w,
                out_fd,
                err_fd,
                stack_fd,
                bell_r,
                cleanup,
                (resolve, held),
            )
            sandbox.relayed = plan.rootless and plan.namespaces
            if init_pidfd >= 0:
                sandbox.attach_init(init_pidfd, init_factory)
            if killed_r >= 0:
                sandbox.attach_killed(killed_r)
            return sandbox
        for attempt in range(2):
            try:
                pid = fork_sandbox(
                    plan,
                    init_pidfd,
                    clone_into,
                    functools.partial(
                        start_sandbox,
                        plan,
                        fds,
                        init_pidfd,
                        cgroup_procs=cgroup_procs,
                        run_test=run_test,
                        keep_fds=keep_fds,
                        foreign=foreign_fds,
                        prefault=prefault,
                        killed_fd=killed_w,
                    ),
                )
                break
            except OSError:
                if attempt or init_pidfd < 0:
                    raise
                # Kernels before 5.8 cannot setns() with a pidfd: without the
                # factory's init, the sandbox makes its own.
                kill_init(init_pidfd, init_factory)
                os.close(init_pidfd)
                init_pidfd = -1
    except BaseException:
        for fd in (result_fd, bell_r, bell_w, go_r, go_w, out_fd, err_fd, stack_fd):
            os.close(fd)
        for fd in (killed_r, killed_w):
            if fd >= 0:
                os.close(fd)
        if init_pidfd >= 0:
            kill_init(init_pidfd, init_factory)
            os.close(init_pidfd)
        raise
    for fd in held:
        os.close(fd)
    sandbox = Sandbox(pid, result_fd, go_w, out_fd, err_fd, stack_fd, bell_r, cleanup)
    sandbox.relayed = plan.rootless and plan.namespaces
    if init_pidfd >= 0:
        sandbox.attach_init(init_pidfd, init_factory)
    if killed_r >= 0:
        sandbox.attach_killed(killed_r)
    return sandbox


def fork_sandbox(
    plan: SandboxPlan, init_pidfd: int, clone_into: str | None, start: Callable[[], object]
) -> int:
    """pytest's own fork of a sandbox (a zygote calls fork_into_pid_namespace
    itself): the child, born in the pid namespace of ``init_pidfd`` (or -1:
    a new one) and, where it can be, in the cgroup v2 directory
    ``clone_into`` (rootless: in its new namespaces, born_flags), runs
    ``start`` (start_sandbox) and never returns."""
    flush_std_streams()
    fork = os.fork
    into = clone_into if _CLONE_INTO[0] else None
    flags = born_flags(plan)
    if (into is not None or flags) and _single_threaded():
        # No other thread (xdist's execnet has one): the raw clone skips
        # glibc's own fork steps, which only matter for other threads' locks.
        fork = functools.partial(fork_born, into, flags, os.fork, sibling=False)
    with warnings.catch_warnings():
        # Python 3.12+ warns when a multi-threaded process forks (xdist's
        # execnet thread); the child never touches locks other threads held.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = fork_into_pid_namespace(plan, init_pidfd, fork)
    if pid == 0:  # pragma: no cover - runs in the sandbox
        try:
            start()
        finally:
            os._exit(SETUP_FAILED_EXIT)
    return pid


@functools.cache
def _own_pid_namespace() -> int:
    """pytest's pid namespace (its inode), read once."""
    return os.stat("/proc/self/ns/pid").st_ino


def _single_threaded() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


#: Set in a child born in its cgroup (fork_born): it does not write itself
#: to cgroup.procs.
_BORN_IN_CGROUP = False
#: Set in a child born in its namespaces (fork_born, rootless): it is pid 1
#: of its pid namespace already, in its own user namespace.
_BORN_IN_NAMESPACES = False
#: Set in a test process whose pid 1 is the C one (_pid1.c): it was born in
#: the namespaces (_BORN_IN_NAMESPACES) as pid 1's child, and is not pid 1.
_NATIVE_PID1 = False
#: Cleared once the C pid 1 failed in a way that holds for this process's
#: life; off with PYTEST_ISOLATE_C_PID1=0 (docs/options.md).
_NATIVE = [
    _native_pid1 is not None
    and _native_pid1.available()
    and os.environ.get("PYTEST_ISOLATE_C_PID1", "1") != "0"
]


def secure_parts(plan: SandboxPlan) -> list[str]:
    """The test process's last steps before pytest's, in order (_test_main):
    the capability drop ("caps") or no_new_privs alone, then Landlock where
    it applies, then the syscall filter."""
    parts = ["caps" if plan.caps is not None else "no_new_privs"]
    if plan.rootfs is not None and plan.caps is not None and "SYS_ADMIN" not in plan.caps:
        # A kept descriptor refers to a host file through the host's
        # mount: reopening /proc/self/fd/N would give write access to a
        # file outside the sandbox (even from a read-only descriptor).
        # Landlock checks the file reached, so "writable only beneath
        # our own /" leaves everything inside as it was and closes that.
        # A Landlock domain may not mount: not applied when SYS_ADMIN is
        # granted (which can remount anything writable anyway).
        parts.append("landlock")
    if plan.seccomp_program is not None:
        parts.append("seccomp")
    return parts


def native_steps() -> bool:
    """Whether a test process runs its root, hostname and loopback as a
    program in C (_steps.c, steps.py); off with PYTEST_ISOLATE_C_STEPS=0
    (docs/options.md)."""
    return _native_steps is not None and os.environ.get("PYTEST_ISOLATE_C_STEPS", "1") != "0"


#: Set in a rootless pid 1 born from a zygote that forks without Python's
#: at-fork handlers (forkhooks.py): what the test process calls after its
#: own fork, which is made without them too (_fork_test_process).
_AFTER_QUIET_FORK: list[Callable[[], None] | None] = [None]
#: Cleared once clone3(CLONE_INTO_CGROUP), or a clone that makes the
#: namespaces, failed in a way that holds for this process's life (an old
#: kernel, a seccomp profile that refuses clone3 or namespaces).
_CLONE_INTO = [True]
_CLONE_NS = [True]
_CLONE_LASTING = frozenset({errno.ENOSYS, errno.EINVAL, errno.E2BIG, errno.EOPNOTSUPP, errno.EPERM})
#: Rootless, what the sandbox's outer process would unshare before forking
#: pid 1 (its cgroup namespace excepted: made once the process is in its
#: cgroup, see _sandbox_main).
_ROOTLESS_BORN = (
    sc.CLONE_NEWUSER | sc.CLONE_NEWPID | sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC
)


def born_flags(plan: SandboxPlan) -> int:
    """Rootless, without a pod: the namespaces the sandbox's pid 1 can be
    born in (one clone from the zygote or pytest, where an outer process
    would unshare them and fork pid 1: one copy of pytest's process fewer a
    test). 0: the outer process does it."""
    if not plan.rootless or not plan.namespaces or plan.pod_netns or plan.pod_userns:
        return 0
    if not _CLONE_NS[0]:
        return 0
    return _ROOTLESS_BORN | (sc.CLONE_NEWNET if plan.new_net else 0)


def fork_born(
    into: str | None,
    flags: int,
    fallback: Callable[[], int],
    *,
    sibling: bool,
    pid1_fds: tuple[int, int] | None = None,
) -> int:
    """A fork whose child is born where the sandbox wants it, so that
    neither it nor a process of its own has to get it there:

    - in the cgroup v2 directory ``into`` (clone3 with CLONE_INTO_CGROUP,
      syscalls.fork_sibling): no cgroup.procs write, so no wait for the
      kernel's cgroup_threadgroup_rwsem (trap 1 of docs/performance.md);
    - in the new namespaces ``flags`` (born_flags, rootless): the child is
      pid 1 of its pid namespace, with no outer process.

    Where the kernel refuses (cgroup v1, an old kernel, clone3 or the
    namespaces refused), the parts it refused are left out, down to
    ``fallback()``, and the child does them itself (_BORN_IN_CGROUP and
    _BORN_IN_NAMESPACES say which it was born with). ``sibling``: the child
    is the caller's parent's (the zygote's forks). Only for a process with
    one thread.

    ``pid1_fds`` (a zygote's fork, rootless): the results memfd and the
    kill pipe's write end (or -1) of a sandbox whose pid 1 may be the C one
    (_pid1.c, _spawn_native): then the child returned is the test process,
    pid 1's child, and the caller gets pid 1's pid."""
    global _BORN_IN_CGROUP, _BORN_IN_NAMESPACES
    fd = -1
    if into is not None and _CLONE_INTO[0]:
        with contextlib.suppress(OSError):
            fd = os.open(into, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    flags = flags if _CLONE_NS[0] else 0
    if flags and sibling and pid1_fds is not None and _NATIVE[0] and (into is None or fd >= 0):
        # Refused, the Python pid 1 below; never the C one outside the
        # test's cgroup.
        pid = _spawn_native(fd, flags, pid1_fds)
        if pid >= 0:
            if fd >= 0:
                os.close(fd)
            return pid
    # Everything at once first; refused, without the cgroup (the namespaces
    # spare a whole process, the cgroup only a write).
    attempts = [(fd, flags)] if fd >= 0 else []
    if flags:
        attempts.append((-1, flags))
    pid = -1
    try:
        for cgroup_fd, ns_flags in attempts:
            try:
                pid = sc.fork_sibling(cgroup_fd, sibling=sibling, flags=ns_flags)
            except OSError as exc:
                if exc.errno in _CLONE_LASTING:
                    if cgroup_fd < 0:
                        _CLONE_NS[0] = False  # refused with the namespaces alone
                    elif not ns_flags:
                        _CLONE_INTO[0] = False  # refused with the cgroup alone
                continue
            if pid == 0:  # pragma: no cover - the child
                _BORN_IN_CGROUP = cgroup_fd >= 0
                _BORN_IN_NAMESPACES = bool(ns_flags)
            break
    finally:
        if fd >= 0:
            os.close(fd)
    return pid if pid >= 0 else fallback()


#: [pid, glibc_tid_address() in that process] (native_spawn).
_TID: list[int | None] = [None, None]


def native_spawn(
    flags: int, *, sibling: bool, result_fd: int, killed_fd: int = -1, cgroup_fd: int = -1
) -> int:
    """_pid1.spawn(): the C pid 1 born in the namespaces ``flags`` (and the
    cgroup v2 directory ``cgroup_fd``, or -1), which forks the test process
    and writes its exit frame to ``result_fd``: 0 in the test process, pid
    1's pid in the caller. Raises OSError where it failed (nothing was forked
    then); only where _native_pid1 and glibc_tid_address() are there."""
    if _TID[0] != os.getpid():  # once per process (a zygote spawns many)
        _TID[:] = [os.getpid(), sc.glibc_tid_address()]
    tid = _TID[1]
    if _native_pid1 is None or tid is None:
        raise OSError(errno.ENOSYS, "the C pid 1 is not available here")
    return int(
        _native_pid1.spawn(
            flags,
            sibling,
            result_fd,
            killed_fd,
            cgroup_fd,
            tid,
            int(KILL_ALL_SIGNAL),
            int(DUMP_SIGNAL),
            int(FAULT_SIGNAL),
        )
    )


def _spawn_native(cgroup_fd: int, flags: int, pid1_fds: tuple[int, int]) -> int:
    """A zygote's native_spawn(): -1 where it failed (a failure that lasts
    turns it off), and in the test process the flags that say how it was born."""
    global _BORN_IN_CGROUP, _BORN_IN_NAMESPACES, _NATIVE_PID1
    try:
        pid = native_spawn(
            flags, sibling=True, result_fd=pid1_fds[0], killed_fd=pid1_fds[1], cgroup_fd=cgroup_fd
        )
    except OSError as exc:
        if exc.errno in _CLONE_LASTING and cgroup_fd < 0:
            _NATIVE[0] = False
        return -1
    if pid == 0:  # pragma: no cover - the test process
        _BORN_IN_CGROUP = cgroup_fd >= 0
        _BORN_IN_NAMESPACES = _NATIVE_PID1 = True
    return pid


def fork_into_pid_namespace(
    plan: SandboxPlan, init_pidfd: int, fork: Callable[[], int], own_pidns: int = -1
) -> int:
    """fork(), the child born in the sandbox's pid namespace: as root, the
    caller sets the pid namespace of its next child only and returns to its
    own right after the fork. With an init from the factory, the child is
    born as pid 2 beside it; otherwise it is pid 1. ``own_pidns``: the
    caller's own pid namespace, when it keeps a descriptor of it (a zygote:
    nothing more is opened per fork). Only what must precede the fork is
    done here: in a zygote, every page written is copied once per test."""
    if not plan.namespaces or plan.rootless:
        return fork()
    opened = own_pidns < 0
    if opened:
        own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    pid = -1
    try:
        if init_pidfd >= 0:
            # Kernels before 5.8 cannot setns() with a pidfd: OSError.
            sc.setns(init_pidfd, sc.CLONE_NEWPID)
        else:
            sc.unshare(sc.CLONE_NEWPID)
        pid = fork()
    finally:
        # Only the parent gets here with pid != 0 or an error; the child is
        # already in the new namespace and must not (cannot) go back.
        if pid != 0:
            sc.setns(own_pidns, sc.CLONE_NEWPID)
        if opened:  # in the child too: a handle on the host's pid namespace
            os.close(own_pidns)
    return pid


#: Called in the test process before "go" (pytest made ready there); returns
#: the call that runs the test, made once "go" came (ctx.go_data set).
RunTest = Callable[[TestContext], Callable[[], None]]

#: Set in a zygote by prepare_zygote: it closed every directory descriptor
#: it held and opens none, so a test process it forks has none to close.
_NO_DIRECTORY_FDS = False
#: Set in a zygote by prepare_zygote: the descriptor number its test
#: processes' stack dumps are written to (/dev/null in the zygote itself),
#: the dump handlers already installed for it; each test process puts its
#: own stack memfd there.
_DUMP_FD = -1


def prepare_zygote(plans: Iterable[SandboxPlan]) -> int:
    """In a zygote, once, before its first fork: what each test process it
    forks would otherwise do for itself. Its directory descriptors (from
    pytest's process) are closed; the capabilities that none of its plans
    keeps leave its bounding set, which limits only what its children can
    regain by execve (capabilities.drop_bounding_once). A plan without the
    capability layer keeps the whole set: then nothing is dropped. What
    each test process's capability drop does is worked out here too. The
    handlers that dump a test's stack on a timeout are installed here too.
    Returns a descriptor of the zygote's own pid namespace, kept to return
    to after each fork (fork_into_pid_namespace's ``own_pidns``)."""
    global _NO_DIRECTORY_FDS, _DUMP_FD
    _close_directory_fds(set(), strict=False)
    _NO_DIRECTORY_FDS = True
    # The handlers that write a test's stack on a timeout: installed once,
    # for a descriptor number the zygote holds so that nothing else gets it.
    fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    _install_dump_handlers(fd)
    _DUMP_FD = fd
    kept = [plan.caps for plan in plans]
    if kept and all(caps is not None for caps in kept):
        from .capabilities import ALL_CAPS, drop_bounding_once, prepare_capabilities

        dropped = frozenset(ALL_CAPS).difference(*(caps for caps in kept if caps is not None))
        with contextlib.suppress(Exception):  # no CAP_SETPCAP (rootless): each child drops
            drop_bounding_once(dropped)
        for caps in kept:
            if caps is not None:
                prepare_capabilities(caps)
    return os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)


def start_sandbox(
    plan: SandboxPlan,
    fds: list[int],
    init_pidfd: int,
    *,
    cgroup_procs: tuple[str, ...],
    run_test: RunTest,
    keep_fds: Callable[[], set[int]],
    foreign: Callable[[], set[int]],
    prefault: Ranges = (),
    killed_fd: int = -1,
) -> NoReturn:  # pragma: no cover - runs in the sandbox
    """In the child of fork_into_pid_namespace: set the sandbox up, wait for
    "go", run the test. Never returns (in a zygote: never back to its loop).
    ``fds``: results (memfd), go (read end), stdout, stderr, stack, bell (write end).
    ``init_pidfd`` (or -1): the factory's init, whose pid namespace the child
    was born in. ``keep_fds`` (pytest's capture descriptors) and ``foreign``
    (what it must close) are evaluated here. ``killed_fd`` (or -1): the
    write end of the pipe on which a rootless pid 1 says it has killed every
    other process of its namespace (_init_loop)."""
    try:
        result_fd, go_r, out_fd, err_fd, stack_fd, bell_w = fds
        ctx = TestContext(result_fd, out_fd, err_fd, stack_fd, bell_w)
        _sandbox_main(
            plan,
            cgroup_procs,
            ctx,
            go_r,
            {*fds, *keep_fds()},
            foreign(),
            run_test,
            init_pidfd=init_pidfd,
            joined=init_pidfd >= 0 and _init_setup(plan) is not None,
            prefault=prefault,
            killed_fd=killed_fd,
        )
    finally:
        os._exit(SETUP_FAILED_EXIT)


def _init_setup(plan: SandboxPlan) -> InitSetup | None:
    """init_setup(plan), computed once per plan (the engine keeps one plan per
    spec): the factory knows a setup by its identity first."""
    known = _INIT_SETUPS.get(id(plan))
    if known is not None and known[0] is plan:
        return known[1]
    setup = init_setup(plan)
    if setup is not None:
        _INIT_SETUPS[id(plan)] = (plan, setup)
    return setup


def init_setup(plan: SandboxPlan) -> InitSetup | None:
    """What the factory's init can make for this plan (root, a new root, no
    pod): the namespaces, the root (its cgroup2 view excepted: that mount must
    be made from the test's own cgroup namespace), the hostname, the loopback.
    None: the sandbox makes its namespaces itself. Does not depend on the
    plan's syscall filter."""
    if (
        not plan.namespaces
        or plan.rootless
        or plan.pod_netns
        or plan.pod_userns
        or plan.rootfs is None
    ):
        # Without a new root, joining pid 1's mount namespace would make its
        # root (the host's, even if pytest runs chrooted) ours: the test
        # process unshares its namespaces itself, keeping root and directory.
        return None
    rootfs = plan.rootfs
    if rootfs.cgroup2:
        rootfs = dataclasses.replace(rootfs, cgroup2=False)
    # The template's read-only mounts are shared by every sandbox of the
    # plan: only where no test can make them writable again or reach pid 1
    # (which can) to do it (docs/security.md).
    template = plan.caps is not None and plan.caps <= DEFAULT_ROOT_CAPS
    return (rootfs, plan.hostname, plan.new_net, template)


#: id(plan) -> (plan, its setup); the plan is kept so that its id stays its own.
_INIT_SETUPS: dict[int, tuple[SandboxPlan, InitSetup]] = {}


# --------------------------------------------------------------------------- the sandbox


def _fail(ctx: TestContext, step: str, exc: BaseException) -> None:
    if isinstance(exc, SetupStepError):
        error = exc.error
    elif isinstance(exc, OSError):
        error = str(exc)
    else:
        error = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    with contextlib.suppress(Exception):
        send_message(
            ctx.result_fd,
            "setup_failed",
            {
                "step": getattr(exc, "step", step),
                "error": error,
                "errno": getattr(exc, "errno", None),
            },
        )
    os._exit(SETUP_FAILED_EXIT)


def _sandbox_main(
    plan: SandboxPlan,
    cgroup_procs: tuple[str, ...],
    ctx: TestContext,
    go_r: int,
    own: set[int],
    foreign: set[int],
    run_test: RunTest,
    *,
    init_pidfd: int = -1,
    joined: bool = False,
    prefault: Ranges = (),
    killed_fd: int = -1,
) -> None:  # pragma: no cover
    step = "start"
    direct = init_pidfd >= 0
    try:
        step = "set the parent-death signal"
        _die_with_parent()
        if killed_fd >= 0 and (not _BORN_IN_NAMESPACES or _NATIVE_PID1):
            # Only a pid 1 born in its namespaces answers P's request (with
            # an outer process, P waits for the namespace's end instead);
            # the C one holds its own copy.
            os.close(killed_fd)
            killed_fd = -1
        for fd in foreign - own:
            with contextlib.suppress(OSError):
                os.close(fd)
        # The cgroup first: on v1 a move can wait 10 ms or more for the
        # kernel (docs/performance.md), which a prepared sandbox spends while
        # the previous test runs, never after "go".
        step = "place the sandbox in its cgroup"
        for path in () if _BORN_IN_CGROUP else cgroup_procs:
            with SetupStepErrorContext(f"write 0 to {path}"):
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, b"0")
                finally:
                    os.close(fd)
        if prefault and direct:
            # The pages tests usually write, copied now rather than one fault
            # at a time after "go" (prefault.py); only until "go" comes. The
            # engine asks for it only for tests without a memory limit: the
            # copies are charged to the test's cgroup, as the ones it makes
            # itself are.
            step = "copy the pages the test will write"
            populate(prefault, stop=lambda: readable(go_r, 0))
        if joined:
            # The factory's init made the namespaces and the root: join them
            # (the mount namespace's root and our working directory become
            # the sandbox's root).
            step = "join the sandbox's namespaces"
            with SetupStepErrorContext("setns into the mount, uts, ipc, net namespaces of pid 1"):
                sc.setns(
                    init_pidfd,
                    sc.CLONE_NEWNS
                    | sc.CLONE_NEWUTS
                    | sc.CLONE_NEWIPC
                    | (sc.CLONE_NEWNET if plan.new_net else 0),
                )
        if direct:
            os.close(init_pidfd)  # a handle on a process outside the test: not for it
        if not plan.namespaces:
            _test_main(plan, ctx, go_r, own, run_test)
        if plan.pod_netns:
            # Join the pod before making our own user namespace: rootless, the
            # pod's network namespace belongs to the pod's user namespace, which
            # ours must then descend from to be allowed in.
            step = "join the pod"
            joins = ((plan.pod_userns, sc.CLONE_NEWUSER), (plan.pod_netns, sc.CLONE_NEWNET))
            for ns_path, nstype in joins:
                if ns_path is None:
                    continue
                with SetupStepErrorContext(f"setns into {ns_path}"):
                    fd = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        sc.setns(fd, nstype)
                    finally:
                        os.close(fd)
        flags = _NS_FLAGS | (sc.CLONE_NEWNET if plan.new_net else 0)
        if plan.rootless and _BORN_IN_NAMESPACES:
            # Born pid 1 in its user, pid, mount, uts, ipc (and net)
            # namespaces (fork_born): no outer process to relay its end.
            step = "map the user namespace"
            if _NATIVE_PID1 and plan.born_program is not None and _native_steps is not None:
                # The same steps in C (steps.compile_born).
                failed = _native_steps.run(plan.born_program)
                if failed is not None:
                    from .steps import failure

                    step, error = failure(plan, *failed, born=True)
                    raise error
            else:
                if _NATIVE_PID1:
                    # Non-dumpable from the zygote (_pid1.c), this process's
                    # /proc files are the host root's until it is dumpable
                    # again: for the writes only, while nothing else is in
                    # its pid namespace but the C pid 1.
                    sc.prctl(sc.PR_SET_DUMPABLE, 1)
                _map_ids(plan.uid, plan.gid)
                if _NATIVE_PID1:
                    sc.prctl(sc.PR_SET_DUMPABLE, 0)
                step = "unshare the cgroup namespace"
                with SetupStepErrorContext("unshare(CLONE_NEWCGROUP)"):
                    sc.unshare(sc.CLONE_NEWCGROUP)
        elif plan.rootless:
            step = "create the user namespace"
            with SetupStepErrorContext("unshare the user, pid and other namespaces"):
                sc.unshare(sc.CLONE_NEWUSER | sc.CLONE_NEWPID | flags)
            _map_ids(plan.uid, plan.gid)
            step = "fork the sandbox init"
            pid = os.fork()
            if pid:
                _relay(pid, ctx, go_r)
            _die_with_parent()
        elif joined:
            step = "unshare the cgroup namespace"
            with SetupStepErrorContext("unshare(CLONE_NEWCGROUP)"):
                sc.unshare(sc.CLONE_NEWCGROUP)
            os.setsid()
            if plan.rootfs is not None:
                step = "finish the root file system"
                finish_joined_rootfs(plan.rootfs)
            _test_main(plan, ctx, go_r, own, run_test)
        else:
            step = "unshare the namespaces"
            with SetupStepErrorContext("unshare mount, uts, ipc, cgroup, net namespaces"):
                sc.unshare(flags)
        # The test must not share a session (or terminal) with pytest: setsid
        # also blocks TIOCSTI injection into the terminal without CAP_SYS_ADMIN.
        os.setsid()
        if not direct and not _NATIVE_PID1:
            # pid 1 forks the test process now, and the test process builds
            # the root: each page of pytest's state pid 1 wrote building it
            # (reference counts) would be copied twice, into pid 1 and again
            # into the test process forked from it.
            # Our init is not dumpable: a test running as the same uid cannot
            # ptrace it or read its memory to forge frames from outside the test.
            sc.prctl(sc.PR_SET_DUMPABLE, 0)
            step = "fork the test process"
            if killed_fd >= 0:
                _signal.signal(KILL_ALL_SIGNAL, functools.partial(_kill_all, killed_fd))
            pid = _fork_test_process()
            if pid:
                os.close(go_r)
                _init_loop(pid, ctx, killed_fd)
            if killed_fd >= 0:  # the test process: pid 1's alone
                _signal.signal(KILL_ALL_SIGNAL, _signal.SIG_DFL)
                os.close(killed_fd)
        # The test process (pid 2) from here on.
        if plan.setup_program is not None and _native_steps is not None:
            # The same steps as below, in C: no page of pytest's written.
            step = "build the root file system"
            failed = _native_steps.run(plan.setup_program)
            if failed is not None:
                from .steps import failure

                step, error = failure(plan, *failed)
                raise error
            _test_main(plan, ctx, go_r, own, run_test)
        if plan.rootfs is not None:
            step = "build the root file system"
            apply_rootfs(plan.rootfs)
        step = "set the hostname"
        with SetupStepErrorContext(f"sethostname({plan.hostname!r})"):
            sc.sethostname(plan.hostname)
        if plan.new_net:
            with SetupStepErrorContext("bring the loopback interface up"):
                sc.loopback_up()
        _test_main(plan, ctx, go_r, own, run_test)
    except BaseException as exc:
        _fail(ctx, step, exc)
    os._exit(SETUP_FAILED_EXIT)


def defer_after_fork(after: Callable[[], None]) -> bool:  # pragma: no cover - in a child
    """In a child of a zygote that forks without Python's at-fork handlers
    (forkhooks.py), before it runs ``after``, what they leave to the child:
    a rootless pid 1 (born in its namespaces) leaves it to its test process
    and returns True (_fork_test_process); any other child runs it itself."""
    if not _BORN_IN_NAMESPACES or _NATIVE_PID1:
        return False
    _AFTER_QUIET_FORK[0] = after
    return True


def _fork_test_process() -> int:  # pragma: no cover - in pid 1
    """pid 1's fork of the test process. Born from a zygote that forks
    without Python's at-fork handlers, pid 1 has not run them and forks
    without them too, as the zygote would (it has one thread and holds no
    lock): the test process runs what is left of them, once. This spares
    pid 1 the pages the handlers write before and after its fork, and the
    test process threading's reset (about 130 pages). Otherwise (pytest's
    own fork of pid 1) both run them as usual."""
    after = _AFTER_QUIET_FORK[0]
    pid = os.fork()  # the handlers' lists are empty when ``after`` is set
    if pid == 0 and after is not None:
        _AFTER_QUIET_FORK[0] = None
        after()
    return pid


class SetupStepErrorContext:
    """Name the step of an OSError raised inside the block."""

    def __init__(self, step: str) -> None:
        self.step = step

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> Literal[False]:
        if isinstance(exc, OSError) and not isinstance(exc, SetupStepError):
            raise SetupStepError(self.step, exc) from exc
        return False


def _die_with_parent() -> None:
    parent = os.getppid()
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(SETUP_FAILED_EXIT)


def id_map_writes(uid: int, gid: int) -> tuple[tuple[str, str], ...]:
    """What a process writes to map its ids in its new user namespace (also
    steps.compile_born's): an unprivileged process may map only its own ids,
    and must deny setgroups before writing gid_map."""
    return (
        ("/proc/self/setgroups", "deny"),
        ("/proc/self/uid_map", f"{uid} {uid} 1"),
        ("/proc/self/gid_map", f"{gid} {gid} 1"),
    )


def _map_ids(uid: int, gid: int) -> None:
    for path, text in id_map_writes(uid, gid):
        with SetupStepErrorContext(f"write {text!r} to {path}"):
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)


def _forward(child: int) -> None:
    def handler(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    # _signal's own call: signal.signal converts its arguments and result
    # to enums, raising and catching two exceptions for a function handler
    # (about 40 pages written in a fresh fork, pid 1's case).
    _signal.signal(DUMP_SIGNAL, handler)
    _signal.signal(FAULT_SIGNAL, handler)


def _relay(pid: int, ctx: TestContext, go_r: int) -> None:  # pragma: no cover
    """Rootless: the outer process stays outside the pid namespace only to be
    P's child; it ends with the init it forked."""
    os.close(go_r)
    _forward(pid)
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF if os.WIFEXITED(status) else 1)


def _kill_all(killed_fd: int, *_: object) -> None:  # pragma: no cover - in pid 1
    """pid 1, asked by P (KILL_ALL_SIGNAL) or once the test process has
    ended: SIGKILL every other process of the namespace, then say so. kill(-1)
    reaches every process pid 1 can see but itself, those of nested pid
    namespaces too (pid 1 holds every capability of the sandbox's user
    namespace, in which all of them are), and a fork it races with fails
    (the parent has SIGKILL pending): once the word is written no process of
    the test runs another instruction of its own. P needs no more to start
    the next test; pid 1's own exit, and the kernel's teardown of the
    namespaces, follow later, off the critical path (Sandbox.stopped)."""
    with contextlib.suppress(OSError):
        os.kill(-1, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.write(killed_fd, b"k")


def _init_loop(test_pid: int, ctx: TestContext, killed_fd: int = -1) -> None:  # pragma: no cover
    """pid 1: reap every orphan; when the test process ends, report its status
    and exit, which makes the kernel kill whatever the test left behind."""
    _forward(test_pid)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == test_pid:
            if killed_fd >= 0:
                _kill_all(killed_fd)
            with contextlib.suppress(OSError):
                os.write(ctx.result_fd, encode_exit(status))
            os._exit(0)


def _close_directory_fds(keep: set[int], strict: bool) -> None:
    """A descriptor of a host directory defeats pivot_root (openat, fchdir +
    chroot: runc CVE-2024-21626). Strict mode keeps only stdio and our own."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep:
            continue
        if strict and fd > 2:
            with contextlib.suppress(OSError):
                os.close(fd)
            continue
        try:
            mode = os.fstat(fd).st_mode
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError:
            continue  # the listing's own descriptor, already closed
        if stat.S_ISDIR(mode) or flags & _O_PATH:
            os.close(fd)


def _apply_env(allow: tuple[str, ...]) -> None:
    exact = {name for name in allow if not name.endswith("*")}
    prefixes = tuple(name[:-1] for name in allow if name.endswith("*"))
    for name in list(os.environ):
        if name not in exact and not name.startswith(prefixes):
            del os.environ[name]


def _test_main(
    plan: SandboxPlan,
    ctx: TestContext,
    go_r: int,
    own: set[int],
    run_test: RunTest,
) -> None:  # pragma: no cover
    step = "prepare the test process"
    try:
        if plan.strict_fds or not _NO_DIRECTORY_FDS:
            _close_directory_fds(own, plan.strict_fds)
        if plan.env_allow is not None:
            _apply_env(plan.env_allow)
        if _DUMP_FD >= 0:
            os.dup2(ctx.stack_fd, _DUMP_FD, inheritable=False)
        else:
            _install_dump_handlers(ctx.stack_fd)
        # The steps in C (steps.compile_secure); where there is no program,
        # or from the step that failed in it on, Python's, which raise their
        # own errors.
        failed = (
            _native_steps.run(plan.secure_program)
            if plan.secure_program is not None and _native_steps is not None
            else (0, 0)
        )
        for part in secure_parts(plan)[max(failed[0], 0) :] if failed is not None else ():
            if part == "caps":
                step = "drop capabilities"
                from .capabilities import apply_capabilities

                assert plan.caps is not None
                apply_capabilities(plan.caps)
            elif part == "no_new_privs":
                sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
            elif part == "landlock":
                step = "confine writes to the sandbox (Landlock)"
                sc.landlock_writes_beneath("/")
            else:
                # Last of the setup, still before "go": the filter's cost (the
                # kernel checks and translates it) is off the critical path.
                step = "load the syscall filter"
                from .seccomp import load_filter

                assert plan.seccomp_program is not None
                load_filter(plan.seccomp_program)
        # pytest's side of the test process (its plugins, capture, setup
        # stack), made ready before "go" too: only the test runs after it.
        step = "prepare pytest in the test process"
        start = run_test(ctx)
        step = "wait for the go signal"
        # One read for the usual message (a header and 4 bytes of data): P
        # writes it at once, and writes up to a page arrive whole.
        message = os.read(go_r, 4096)
        if not message.startswith(b"g") or len(message) < 6:
            os._exit(0)  # discarded by P before use: leave quietly
        linger = message[1:2] == b"l"
        size = int.from_bytes(message[2:6], "little")
        data = message[6:]
        while len(data) < size:
            chunk = os.read(go_r, size - len(data))
            if not chunk:
                break
            data += chunk
        ctx.go_data = data
        os.close(go_r)
    except BaseException as exc:
        _fail(ctx, step, exc)
    try:
        start()
        flush_std_streams()
        send_message(ctx.result_fd, "done", {})
        ctx.ring()
        while linger:
            time.sleep(3600)  # until P has read what it wanted and kills us
    except KeyboardInterrupt:
        flush_std_streams()
        os._exit(130)
    except BaseException as exc:
        flush_std_streams()
        _fail(ctx, "run the test protocol", exc)
    os._exit(0)


def flush_std_streams() -> None:
    """What Python still buffers of the standard streams, written.

    - In the test process, what the test printed: ``os._exit`` would drop
      it. With ``-s`` and output to a pipe or file (a CI log),
      ``sys.stdout`` is block-buffered, and every line a test printed was
      lost. Before "done", since P may end the process once it has read it.
    - In pytest's process, before each fork (a zygote, a sandbox): a child
      that flushes would write the buffered text of its parent a second
      time."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()


def _install_dump_handlers(stack_fd: int) -> None:
    import faulthandler

    def dump(signum: int, frame: object) -> None:
        lines = ["+" * 30 + " Timeout " + "+" * 30 + "\n"]
        import threading

        frames = sys._current_frames()
        # The interrupted frame, not this handler's own, for the main thread.
        frames[threading.main_thread().ident or 0] = frame  # type: ignore[assignment]
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, stack_frame in frames.items():
            lines.append(
                f"\n{'~' * 20} Stack of {names.get(ident, '<unknown>')} ({ident}) {'~' * 20}\n"
            )
            lines.extend(traceback.format_stack(stack_frame))
        lines.append("+" * 69 + "\n")
        with contextlib.suppress(OSError):
            os.pwrite(stack_fd, "".join(lines).encode(), 0)

    signal.signal(DUMP_SIGNAL, dump)
    faulthandler.register(FAULT_SIGNAL, file=stack_fd, all_threads=True)
