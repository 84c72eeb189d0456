"""The init factory: a small process that makes each sandbox's pid 1, and
with it the sandbox's namespaces and root file system.

Forking pytest is the dominant cost of a sandbox (page tables copied, every
page the child writes copied again), and every line of Python the forked
test process runs before the test copies more of pytest's pages. So as root
the work that does not need pytest's memory happens here, in a separate small
interpreter started once per session: on request it unshares a pid
namespace and forks the init, which makes the mount, uts, ipc and network
namespaces, builds the root file system (rootfs.apply_rootfs: mounts, /proc,
pivot_root), sets the hostname and brings the loopback up, then waits to be
killed with its sandbox. pytest gets a pidfd of it; it forks the test straight
into that pid namespace (setns on the pidfd) as pid 2, and the test joins the
other namespaces of pid 1 in one setns call (nsenter's way). The test process
itself then only joins its cgroup and drops its privileges.

The factory always has one init ready, made while the current test runs, for
the setup last asked for. A bare init (pods, or when the namespaces are made
by the test process) jails itself in an empty read-only root, so a test that
is granted CAP_SYS_PTRACE and looks at /proc/1/root finds nothing of the
host; a full init's root is the sandbox's own. Inits are not dumpable. The
factory dies with pytest (parent-death signal and end of its socket); the
inits die with the factory. Only for root: rootless sandboxes make their own
namespaces (see sandbox.py).

Runs as ``python -I -S -c`` with only this package on its path: it must not
import pytest or anything outside the standard library.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import itertools
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Hashable

# Not typing's (mypy reads the name as typing's): importing typing is
# milliseconds of the factory's start-up, which the first test waits for.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from typing import Any

    from .rootfs import Renewal
    from .scratchdirs import LockedDir

__all__ = [
    "InitFactory",
    "InitFactoryError",
    "InitSetup",
    "Recycled",
    "kill_init",
    "main",
    "readable",
]

#: Inits made ahead of time for the setup last asked for.
AHEAD = 2
#: Inits kept for reuse after their test (Recycled), at most.
POOL = 4
#: How long an init waits for the processes of the last test to end.
RESET_TIMEOUT = 5.0
_RESET = b"r"
_RESET_DONE = b"ok"
_REGISTER = b"p"
_REQUEST = b"n"
#: The factory's answers with an init's pidfd: its root built whole, or copied.
_MADE = b"init"
_MADE_FROM_TEMPLATE = b"init from template"
_ID = struct.Struct("<I")
#: A setup registered with the factory: (root file system plan or None,
#: hostname, whether to make a network namespace, whether its inits may copy
#: a template mount namespace). Id 0 is the bare init.
if TYPE_CHECKING:
    InitSetup = tuple[Any, str, bool, bool]
else:
    InitSetup = tuple


class InitFactoryError(Exception):
    """The factory could not start or answer, or could not make this init; the
    caller falls back to making the init (and namespaces) itself."""


class InitFactory:
    """pytest's handle on the factory process."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._jail: LockedDir | None = None
        #: Setup ids of the inits asked for and not taken yet, oldest first.
        self._pending: collections.deque[int] = collections.deque()
        self._ids: dict[Hashable, int] = {}
        self._by_identity: dict[int, tuple[InitSetup, int]] = {}
        self._starting = False
        #: Inits handed out whose root is a copy of their setup's template.
        self.copied = 0
        #: Inits handed out again after a reset (recycle()).
        self.reused = 0
        #: Resets that failed (the init was killed instead), and the last reason.
        self.reset_failures = 0
        self.last_reset_failure = ""
        #: Inits the factory could not make (pytest made those sandboxes
        #: itself), and the last reason the factory gave.
        self.init_failures = 0
        self.last_init_failure = ""
        #: PYTEST_ISOLATE_REUSE=0: every test gets a new init.
        self.reuse = os.environ.get("PYTEST_ISOLATE_REUSE", "1") != "0"
        #: pidfd of a resettable init handed out -> (its control socket, setup id).
        self._controls: dict[int, tuple[socket.socket, int]] = {}
        #: Inits resetting or reset, oldest first.
        self._pool: collections.deque[Recycled] = collections.deque()

    def start(self, wait: bool = True) -> None:
        """Start the factory; without ``wait``, return while the interpreter
        starts (its first answer is awaited by the first request)."""
        # Imported here: the factory process imports this module too and
        # should stay small (every init is a fork of it).
        import subprocess

        from .scratchdirs import LockedDir

        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._jail = LockedDir("pytest-isolate-initd-")
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = (
            f"import sys; sys.path.insert(0, {package_parent!r}); "
            "from pytest_isolate.initd import main; main()"
        )
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", code, str(child.fileno()), self._jail.path],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                # Never pytest's output: an init outliving a run would hold it open.
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=True,
            )
        except OSError as exc:
            raise InitFactoryError(f"cannot start the init factory: {exc}") from exc
        finally:
            child.close()
        self._sock = parent
        self._starting = True
        if wait:
            self._wait_ready()

    def _wait_ready(self) -> None:
        if not self._starting:
            return
        self._starting = False
        reply = self._recv()
        if reply[0] != b"ready":
            self.close()
            raise InitFactoryError(f"the init factory failed to start: {reply[0]!r}")

    def fileno(self) -> int:
        """pytest's end of the socket (-1 when not running): never to be
        inherited by a test process, which could ask for inits of its own."""
        return self._sock.fileno() if self._sock is not None else -1

    def _recv(self) -> tuple[bytes, list[int]]:
        assert self._sock is not None
        try:
            data, fds, _, _ = socket.recv_fds(self._sock, 4096, 2)
        except OSError as exc:
            raise InitFactoryError(f"the init factory did not answer: {exc}") from exc
        if not data:
            raise InitFactoryError("the init factory exited")
        return data, fds

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.send(data)
        except OSError as exc:
            raise InitFactoryError(f"the init factory is gone: {exc}") from exc

    def _id_of(self, setup: InitSetup | None) -> int:
        """The factory's number for ``setup``, registered on first use. A setup
        object seen before is known by identity (no encoding per test); an
        equal one by its encoding."""
        if setup is None:
            return 0
        known = self._by_identity.get(id(setup))
        if known is not None and known[0] is setup:
            return known[1]
        key = _encode_setup(setup)
        ident = self._ids.get(key)
        if ident is None:
            ident = len(self._ids) + 1
            self._send(_REGISTER + _ID.pack(ident) + key)
            self._ids[key] = ident
        self._by_identity[id(setup)] = (setup, ident)
        return ident

    def _request(self, ident: int) -> None:
        self._send(_REQUEST + _ID.pack(ident))
        self._pending.append(ident)

    def _take(self) -> tuple[int, bool]:
        """The next init's pidfd, and whether its root was copied from a
        template (such an init comes with its control socket: it can be reset
        for another test, see recycle())."""
        ident = self._pending.popleft()
        data, fds = self._recv()
        wanted = 2 if data == _MADE_FROM_TEMPLATE else 1
        if data not in (_MADE, _MADE_FROM_TEMPLATE) or len(fds) != wanted:
            for fd in fds:
                os.close(fd)
            said = data.decode(errors="replace")
            self.init_failures += 1
            self.last_init_failure = said.removeprefix("error: ")[:300]
            raise InitFactoryError(f"the init factory could not make an init: {said}")
        if wanted == 2:
            # A caller that closed an init's pidfd without forget() left its
            # socket under the same number.
            self.forget(fds[0])
            self._controls[fds[0]] = (socket.socket(fileno=fds[1]), ident)
        return fds[0], data == _MADE_FROM_TEMPLATE

    def new_init(self, setup: InitSetup | None = None) -> int:
        """A pidfd of a fresh init in a fresh pid namespace, owned by the caller.
        With ``setup``, the init has also made the other namespaces and the root
        described there; without, it is bare.

        The factory keeps AHEAD inits of the setup last asked for in the
        making, so that it makes them while tests run: pytest rarely waits
        for it, even when the machine is busy."""
        if self._sock is None:
            raise InitFactoryError("the init factory is not running")
        self._wait_ready()
        ident = self._id_of(setup)
        reused = self._from_pool(ident)
        if reused >= 0:
            return reused
        while self._pending and self._pending[0] != ident:
            # Made for another setup: not usable for this one.
            with contextlib.suppress(InitFactoryError):
                pidfd = self._take()[0]
                kill_init(pidfd, self)
                os.close(pidfd)
        if not self._pending:
            self._request(ident)
        try:
            pidfd, copied = self._take()
            self.copied += copied
            return pidfd
        finally:
            while len(self._pending) < AHEAD:
                self._request(ident)

    def prepare(self, setup: InitSetup) -> None:
        """Have the factory start making inits of ``setup`` now, before the
        first new_init() asks for one: pytest then finishes the plan (loads
        libcap, compiles the syscall filter) while the factory builds the
        template and the first inits. Never raises: new_init() reports what
        went wrong, if it still does."""
        if self._sock is None:
            return
        with contextlib.suppress(InitFactoryError):
            ident = self._id_of(setup)
            while self._pending.count(ident) < AHEAD:
                self._request(ident)

    def recycle(self, pidfd: int, test_gone: Callable[[], bool]) -> Recycled | None:
        """Take back an init handed out by new_init() whose test has ended,
        and ask it to reset its sandbox for another test of the same setup
        (_reset: every process of the namespace killed, the mount table
        checked, new uts, ipc and network namespaces, every writable file
        system and /sys made again). None: this init cannot be reset (the
        caller kills it). ``test_gone``: whether the test process pytest
        forked into it has been reaped; the init is handed out again only
        then, so that the next test is pid 2 and finds nothing of the last.
        The returned handle says when the reset is over (settled())."""
        control = self._controls.pop(pidfd, None)
        if control is None:
            return None
        sock, ident = control
        if not self.reuse:
            sock.close()
            return None
        try:
            sock.send(_RESET)
        except OSError:
            sock.close()
            return None
        recycled = Recycled(pidfd, sock, ident, test_gone, self._reset_failed)
        self._pool.append(recycled)
        while len(self._pool) > POOL:
            self._pool.popleft().discard()
        return recycled

    def _reset_failed(self, reason: str) -> None:
        self.reset_failures += 1
        self.last_reset_failure = reason

    def _from_pool(self, ident: int) -> int:
        """The pidfd of a reset init of this setup, or -1."""
        for recycled in list(self._pool):
            state = recycled.settled()
            if state is False:
                self._pool.remove(recycled)
                recycled.discard()
            elif state and recycled.ident == ident and recycled.test_gone():
                self._pool.remove(recycled)
                self._controls[recycled.pidfd] = (recycled.sock, ident)
                self.reused += 1
                # It refers to the last test's sandbox, which refers to it: a
                # cycle that only the cyclic collector would free, late.
                recycled.test_gone = _gone
                return recycled.pidfd
        return -1

    def held_fds(self) -> set[int]:
        """Descriptors held here: never for a test process (the pidfds of
        inits handed out belong to their sandboxes)."""
        fds = {self.fileno()}
        for sock, _ in self._controls.values():
            fds.add(sock.fileno())
        for recycled in self._pool:
            fds.update((recycled.pidfd, recycled.sock.fileno()))
        fds.discard(-1)
        return fds

    def forget(self, pidfd: int) -> None:
        """An init handed out is killed by its sandbox: close its control socket."""
        control = self._controls.pop(pidfd, None)
        if control is not None:
            control[0].close()

    def close(self) -> None:
        while self._pool:
            self._pool.popleft().discard()
        for sock, _ in self._controls.values():
            sock.close()
        self._controls.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        if self._jail is not None:
            self._jail.remove()
            self._jail = None


class Recycled:
    """An init taken back from its test and asked to reset its sandbox."""

    def __init__(
        self,
        pidfd: int,
        sock: socket.socket,
        ident: int,
        test_gone: Callable[[], bool],
        failed: Callable[[str], None],
    ):
        self.pidfd = pidfd
        self._failed = failed
        self.sock = sock
        self.ident = ident
        self.test_gone = test_gone
        #: None while resetting; True once reset; False if it failed.
        self.state: bool | None = None
        self.discarded = False

    def settled(self) -> bool | None:
        """Without blocking: None while the init resets, True when it is
        ready for another test, False when it failed (then it is killed; the
        kernel ends every process of its namespace)."""
        if self.state is None and self.sock.fileno() >= 0:
            ready = select.poll()
            ready.register(self.sock, select.POLLIN)
            if ready.poll(0):
                try:
                    reply = self.sock.recv(64)
                except OSError:
                    reply = b""
                # Only this exact answer: anything else, or the end of the
                # socket, is an init that could not make its sandbox new.
                self.state = reply == _RESET_DONE
                if not self.state:
                    with contextlib.suppress(OSError):
                        signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                    reason = reply.decode("utf-8", "replace")[:300]
                    self._failed(reason.removeprefix("error: ") or "the init ended")
        return self.state

    def gone(self, timeout: float = 0) -> bool:
        """Every process of the sandbox's last test has ended: the init has
        reset, or it failed and has exited (waiting up to ``timeout``)."""
        if self.discarded or (self.state is None and self.sock.fileno() < 0):
            return True  # killed, or its socket closed: the init ends with it
        if self.state is None and timeout > 0:
            readable(self.sock.fileno(), timeout)
        state = self.settled()
        if state is None:
            return False
        return state or readable(self.pidfd, timeout)

    def discard(self) -> None:
        """Kill the init (the kernel ends its namespace) and let go of it."""
        if self.discarded:
            return
        self.discarded = True
        self.test_gone = _gone
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        self.sock.close()
        with contextlib.suppress(OSError):
            os.close(self.pidfd)
        self.state = False


def _gone() -> bool:
    return True


def readable(fd: int, timeout: float = 0) -> bool:
    """Has ``fd`` something to read (a pidfd: has its process exited), within
    ``timeout`` seconds? poll(), not select(): numbers may exceed FD_SETSIZE."""
    ready = select.poll()
    ready.register(fd, select.POLLIN)
    return bool(ready.poll(int(timeout * 1000)))


def kill_init(pidfd: int, factory: InitFactory | None = None) -> None:
    """SIGKILL an init (the kernel ends every process of its namespace);
    the control socket ``factory`` holds for it, if any, is closed."""
    with contextlib.suppress(OSError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    if factory is not None:
        factory.forget(pidfd)


def _encode_setup(setup: InitSetup) -> bytes:
    """JSON, not pickle: the factory runs as root outside every sandbox and
    must never run code it is sent."""
    rootfs, hostname, new_net, template = setup
    plan = None
    if rootfs is not None:
        plan = dataclasses.asdict(rootfs)  # Op entries become dicts too
    return json.dumps([plan, hostname, new_net, template], sort_keys=True).encode()


def _decode_setup(data: bytes) -> InitSetup:  # pragma: no cover - runs in the factory
    from .rootfs import Op, RootfsPlan

    plan, hostname, new_net, template = json.loads(data)
    rootfs = None
    if plan is not None:
        # Exactly the dataclasses' fields: a missing or unknown key is an error.
        plan["ops"] = tuple(Op(**op) for op in plan["ops"])
        rootfs = RootfsPlan(**plan)
    if not isinstance(hostname, str) or not all(isinstance(b, bool) for b in (new_net, template)):
        raise TypeError("bad setup")
    return (rootfs, hostname, new_net, template)


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
    sc.mount(
        None, "/", None, sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC
    )


def _build(setup: InitSetup, template: Template | None) -> None:  # pragma: no cover - pid 1
    """The sandbox's namespaces and root, made by its pid 1: from scratch, or
    as a copy of the setup's template mount namespace plus the sandbox's own
    mounts."""
    from . import syscalls as sc
    from .rootfs import apply_own, apply_rootfs, close_detached, detach_sources

    rootfs, hostname, new_net, _ = setup
    detached = {}
    if template is not None:
        detached = detach_sources(template.taken)
        sc.setns(template.fd, sc.CLONE_NEWNS)  # unshared below: the template stays as it is
    sc.unshare(
        sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | (sc.CLONE_NEWNET if new_net else 0)
    )
    if template is not None:
        apply_own(rootfs, template.own, detached)
        close_detached(detached)
    elif rootfs is not None:
        apply_rootfs(rootfs)
    sc.sethostname(hostname)
    if new_net:
        sc.loopback_up()


def _init_loop() -> None:  # pragma: no cover - runs as pid 1 of a sandbox
    """pid 1: orphans of the test are reparented here and, since SIGCHLD is
    ignored (inherited from the factory), the kernel reaps them as they die.
    The init only waits to be killed with its sandbox."""
    while True:
        signal.pause()


def _serve_resets(
    control: socket.socket, setup: InitSetup, template: Template, mounts: bytes, net: bytes
) -> None:  # pragma: no cover - runs as pid 1 of a sandbox
    """pid 1 of a sandbox copied from a template: between two tests, pytest
    asks it to make its sandbox new (_reset). It answers "ok" or ends, and
    ends when pytest closes the socket (the kernel then kills the rest of the
    namespace). ``mounts``: its mount table, and ``net`` its network
    namespace's state (_net_state, or empty), read before it said it was
    ready (no test could have run in it yet)."""
    last_pid = _open_last_pid()
    while True:
        request = control.recv(16)
        if request != _RESET:
            return
        try:
            net = _reset(setup, template, mounts, last_pid, net)
            mounts = _mount_table()
        except BaseException as exc:
            # Said to pytest (-vv), then the init ends with its namespace.
            with contextlib.suppress(OSError):
                control.send(f"error: {type(exc).__name__}: {exc}".encode()[:300])
            return
        control.send(_RESET_DONE)


def _open_last_pid() -> int:  # pragma: no cover - pid 1
    """The pid namespace's ns_last_pid, open for writing for the init's life
    (-1 where it cannot be): /proc/sys is read-only in the sandbox, so it is
    reached through a copy of /proc without its submounts, which the open
    file keeps. The pid namespace, and so this file, outlive every reset."""
    from . import syscalls as sc

    try:
        proc = sc.open_tree_clone("/proc", recursive=False)
    except OSError:
        return -1
    try:
        return os.open("sys/kernel/ns_last_pid", os.O_WRONLY | os.O_CLOEXEC, dir_fd=proc)
    except OSError:
        return -1
    finally:
        os.close(proc)


def _mount_table() -> bytes:
    """The sandbox's mount table as the next test must find it: without the
    cgroup2 view a test process mounts for itself (under /sys, made again)."""
    with open("/proc/self/mountinfo", "rb") as f:
        table = f.read()
    if b" /sys/" not in table:
        return table
    lines = table.splitlines(keepends=True)
    return b"".join(line for line in lines if not line.split(b" ", 5)[4].startswith(b"/sys/"))


#: What shows that nothing of a test is left in its network namespace: the
#: loopback's packet counters, the IP, ICMP, TCP and UDP counters, and from
#: /proc/net/sockstat the namespace's own counts (_SOCKSTAT_OWN).
_NET_STATE_FILES = ("/proc/net/dev", "/proc/net/snmp")
#: The namespace's own fields of /proc/net/sockstat: its sockets in use
#: (every family, sockets kept alive only by descriptors in flight
#: included), per protocol too, and its TIME_WAIT sockets. The others
#: ("orphan", "alloc", "mem") count the whole host's.
_SOCKSTAT_OWN = frozenset({b"used", b"inuse", b"tw"})


def _net_state() -> bytes:  # pragma: no cover - pid 1
    """The network namespace of the caller as _reset compares it: equal
    after a test means that the test left nothing there (_reset). Empty
    where it cannot be read: never equal to a state that was."""
    try:
        with open("/proc/net/sockstat", "rb") as f:
            words = f.read().split()
        parts = [b" ".join(pair) for pair in itertools.pairwise(words) if pair[0] in _SOCKSTAT_OWN]
        for path in _NET_STATE_FILES:
            with open(path, "rb") as f:
                parts.append(f.read())
    except OSError:
        return b""
    return b"\0".join(parts)


def _mounts_kept(before: bytes, now: bytes) -> bool:
    """Every mount of ``before`` is still there, unchanged, and every other
    one came from the host: a mount the host made beneath a path the
    sandbox binds reaches it as a slave of the host's (``master:`` in its
    optional fields), as it would reach a sandbox made now. A mount made in
    the sandbox itself would be private."""
    if now == before:
        return True
    old = set(before.splitlines())
    lines = now.splitlines()
    if not old.issubset(lines):
        return False  # removed or changed (the host's unmounts fail it too)
    for line in lines:
        if line not in old:
            optional = line.split(b" - ", 1)[0].split()[6:]
            if not any(field.startswith(b"master:") for field in optional):
                return False
    return True


def _end_every_process(timeout: float = RESET_TIMEOUT) -> None:  # pragma: no cover - pid 1
    """SIGKILL every other process of the pid namespace and wait until each
    has exited (the test process, pytest's child, may stay a zombie until
    pytest reaps it: it holds nothing then). Raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)  # every process we may signal: all but pid 1
        pidfds = []
        ended = set()
        try:
            for name in _pids():
                with contextlib.suppress(ProcessLookupError):
                    pidfds.append(os.pidfd_open(int(name)))
                    ended.add(name)
            if not pidfds:
                return
            waiting = select.poll()
            for fd in pidfds:
                waiting.register(fd, select.POLLIN)
            left = len(pidfds)
            while left:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("processes of the last test did not end")
                for fd, _ in waiting.poll(int(remaining * 1000) + 1):
                    waiting.unregister(fd)
                    left -= 1
            # None started since the scan (a fork fails once SIGKILL is
            # pending); checked all the same: every pid still listed (a
            # zombie until its parent reaps it) is one seen to end.
            if set(_pids()) <= ended:
                return
        finally:
            for fd in pidfds:
                os.close(fd)


def _pids() -> list[str]:
    return [name for name in os.listdir("/proc") if name.isdigit() and name != "1"]


def _reset(
    setup: InitSetup, template: Template, mounts: bytes, last_pid: int, net: bytes
) -> bytes:  # pragma: no cover - pid 1
    """Make the sandbox as new for the next test of its setup, or raise.
    Returns the network namespace's state as the next test finds it
    (_net_state), for the next reset; ``net``: as the last test found it.

    Nothing of the last test may be left: its processes are ended (and
    checked gone), the mount table is checked unchanged (a test with the
    default capabilities cannot mount, and this holds it), the uts and ipc
    namespaces are new ones (SysV and POSIX IPC objects stay behind), and
    every writable file system is made again, with /dev and /sys
    (rootfs.renew_own). The pid counter starts again at 2. What is kept is
    what no test can change: the read-only root and the masks, /proc of the
    same pid namespace.

    The network namespace is kept only when the test left no trace in it:
    the same sockets in use (none of its own: a socket alive only in a
    descriptor in flight counts), no packet through the loopback, the same
    IP, ICMP, TCP and UDP counters. Everything else a test could leave there
    (addresses, routes, links, filters, sysctls) needs CAP_NET_ADMIN, which
    the tests of a reset sandbox never have (only tests with the default
    capabilities get one). Otherwise, and whenever it cannot be read, it is
    a new one (sockets in TIME_WAIT, the loopback's counters stay behind).
    A network namespace costs about 0.8 ms of CPU to make and tear down."""
    from . import syscalls as sc
    from .rootfs import renew_own

    rootfs, hostname, new_net, _ = setup
    _end_every_process()
    if not _mounts_kept(mounts, _mount_table()):
        raise OSError(0, "the sandbox's mount table changed")
    fresh_net = new_net and not (net and _net_state() == net)
    sc.unshare(sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | (sc.CLONE_NEWNET if fresh_net else 0))
    renew_own(rootfs, template.renewal)
    sc.sethostname(hostname)
    if fresh_net:
        sc.loopback_up()
    if last_pid >= 0:
        # The next process of the namespace is pid 2 again, as in a new one.
        with contextlib.suppress(OSError):
            os.pwrite(last_pid, b"1", 0)
    return _net_state() if fresh_net else net  # empty without a network namespace


@dataclasses.dataclass(frozen=True)
class Template:
    """A mount namespace holding the shared part of a setup's root
    (rootfs.build_template), kept by its descriptor; ``own``: what each
    init adds in its copy."""

    fd: int
    own: tuple[Any, ...]
    #: (path, device, inode) of the host paths it binds (rootfs.template_sources).
    sources: tuple[tuple[str, int, int], ...]
    #: What each init takes from the host before joining a copy (rootfs.own_sources).
    taken: tuple[tuple[str, str, bool, bool], ...]
    #: What a reset makes again (rootfs.plan_renewal).
    renewal: Renewal


def _make_template(setup: InitSetup) -> Template | None:  # pragma: no cover - in the factory
    """Build the setup's template in a child (which only holds the namespace
    until the factory has a descriptor of it); None where the setup cannot
    have one or building it failed (its inits then build the whole root)."""
    from . import syscalls as sc
    from .rootfs import (
        build_template,
        own_sources,
        plan_renewal,
        split_template,
        template_sources,
    )

    rootfs, _, _, allowed = setup
    split = split_template(rootfs) if allowed and rootfs is not None else None
    if split is None:
        return None
    shared, own = split
    try:
        # Before the build: a source replaced in between shows as stale later.
        sources = template_sources(shared)
        taken = own_sources(own)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
    except OSError:
        return None
    factory = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        os.close(status_r)
        os.close(status_w)
        return None
    if pid == 0:
        try:
            os.close(status_r)
            sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != factory:
                os._exit(1)  # the factory died before the signal was armed
            sc.unshare(sc.CLONE_NEWNS)
            build_template(rootfs, shared, own)
            os.write(status_w, b"ok")
        finally:
            # Ends only when the factory kills it (by pid: it cannot have been
            # reaped before, whatever happened here).
            os.close(status_w)
            while True:
                signal.pause()
    os.close(status_w)
    try:
        if os.read(status_r, 2) != b"ok":
            return None
        fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        return Template(fd, own, sources, taken, plan_renewal(own, taken))
    except OSError:
        return None
    finally:
        os.close(status_r)
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            # The factory ignores SIGCHLD (the kernel reaps, this only waits
            # for the end); any other caller reaps it here.
            os.waitpid(pid, 0)


def _make_init(
    sock: socket.socket,
    own_pidns: int,
    jail: str,
    setup: InitSetup | None,
    template: Template | None = None,
) -> tuple[int, socket.socket | None]:  # pragma: no cover - runs in the factory
    """Fork pid 1 of a new pid namespace; return its pidfd once it is ready,
    with pytest's end of its control socket when it can be reset."""
    from . import syscalls as sc

    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    # A sandbox copied from a template can be reset for another test of its
    # setup (_reset): pytest asks through this socket.
    control = ours = None
    if template is not None and setup is not None:
        control, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sc.unshare(sc.CLONE_NEWPID)
        pid = os.fork()
        if pid == 0:
            try:
                gc.disable()  # a few hundred objects in its life: none worth a pass
                os.close(status_r)
                sock.close()
                if control is not None:
                    control.close()
                # Dies with the factory, which dies with pytest.
                sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
                sc.set_process_name("isolate-init")
                # pid 1 takes no signal from its namespace but those it
                # handles: Python's SIGINT handler would be one.
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                if setup is None:
                    _jail(jail)
                else:
                    _build(setup, template)
                # A test granted CAP_SYS_PTRACE still cannot read our memory
                # or descriptors; none of the factory's stays open anyway.
                sc.prctl(sc.PR_SET_DUMPABLE, 0)
                mounts = _mount_table() if ours is not None else b""
                # As the first test finds it: read before "ok" (no test ran yet).
                net = _net_state() if ours is not None and setup is not None and setup[2] else b""
                _close_all_but({status_w} | ({ours.fileno()} if ours is not None else set()))
                os.write(status_w, b"ok")
                os.close(status_w)
            except BaseException as exc:
                with contextlib.suppress(BaseException):
                    os.write(status_w, f"{type(exc).__name__}: {exc}".encode()[:3000])
                os._exit(1)
            with contextlib.suppress(BaseException):
                if ours is not None and setup is not None and template is not None:
                    _serve_resets(ours, setup, template, mounts, net)
                else:
                    _init_loop()
            os._exit(0)
        sc.setns(own_pidns, sc.CLONE_NEWPID)
    finally:
        os.close(status_w)
        if ours is not None:
            ours.close()
    try:
        reply = os.read(status_r, 4000)
    finally:
        os.close(status_r)
    if reply != b"ok":
        if control is not None:
            control.close()
        raise OSError(0, reply.decode(errors="replace") or "the init died while starting")
    return os.pidfd_open(pid), control


def _close_all_but(keep: set[int]) -> None:  # pragma: no cover - in an init
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 16)


def main() -> None:  # pragma: no cover - runs in the factory process
    from . import syscalls as sc

    sock = socket.socket(fileno=int(sys.argv[1]))
    jail = sys.argv[2]
    try:
        parent = os.getppid()
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)  # pytest died before the signal was armed
        sc.set_process_name("isolate-initd")  # what ps and top show
        own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        # Our own mount namespace: nothing an init does can propagate back.
        sc.unshare(sc.CLONE_NEWNS)
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_SLAVE)
        sc.prctl(sc.PR_SET_DUMPABLE, 0)
        # Inits are reaped by the kernel: the factory never waits for them.
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        from .rootfs import apply_rootfs, template_current  # noqa: F401  (imported once)

        # Every init is a fork of this process: what it holds now is never
        # scanned by an init's garbage collector (which would copy the pages).
        gc.freeze()
        sock.send(b"ready")
    except Exception as exc:
        with contextlib.suppress(OSError):
            sock.send(f"error: {exc}".encode()[:4000])
        os._exit(1)
    setups: dict[int, InitSetup] = {}
    templates: dict[int, Template | None] = {}
    while True:
        try:
            request = sock.recv(1 << 20)
        except OSError:
            os._exit(0)
        kind, ident = request[:1], request[1:5]
        if len(ident) != 4 or kind not in (_REGISTER, _REQUEST):
            os._exit(0)  # pytest closed its end (or spoke nonsense): done
        (number,) = _ID.unpack(ident)
        if kind == _REGISTER:
            try:
                setups[number] = _decode_setup(request[5:])
            except (ValueError, TypeError, KeyError):
                os._exit(0)  # spoke nonsense: done
            continue
        setup = setups.get(number) if number else None
        template = templates.get(number)
        if template is not None and not template_current(template.sources):
            os.close(template.fd)  # the host replaced a path it binds: made again
            del templates[number]
        if setup is not None and number not in templates:
            templates[number] = _make_template(setup)
        template = templates.get(number)
        try:
            try:
                pidfd, control = _make_init(sock, own_pidns, jail, setup, template)
            except OSError:
                if template is None:
                    raise
                # Once more before giving the template up: a host file being
                # replaced at that very moment fails the mask made on it
                # (mount(2) on a name just renamed over: ENOENT).
                pidfd, control = _make_init(sock, own_pidns, jail, setup, template)
        except OSError as exc:
            if template is not None:
                # This setup's inits build the whole root from now on; pytest
                # makes this sandbox itself (and reports what fails there).
                os.close(template.fd)
                templates[number] = None
            with contextlib.suppress(OSError):
                sock.send(f"error: {exc.strerror or exc}".encode()[:4000])
            continue
        try:
            if control is None:
                socket.send_fds(sock, [_MADE], [pidfd])
            else:
                socket.send_fds(sock, [_MADE_FROM_TEMPLATE], [pidfd, control.fileno()])
        finally:
            os.close(pidfd)
            if control is not None:
                control.close()
