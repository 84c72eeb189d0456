"""What cgroup v1 and v2 share: the data types, the interface, and the plumbing.

The engine sees only what this module defines (``Limits``, ``CgroupStats``,
``TestCgroup``, ``CgroupManager``, ``CgroupUnavailable``); ``v1.py`` and
``v2.py`` implement the interface for one hierarchy each, like runc's ``fs/``
and ``fs2/``. Everything here is plain ``os`` calls: ``create()`` and
``remove()`` run once per test, so the hot path is a handful of syscalls on
precomputed paths.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import os
import re
import signal
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

__all__ = [
    "CONTROLLERS",
    "CPU_PERIOD_US",
    "SHARED_DIR",
    "CgroupManager",
    "CgroupStats",
    "CgroupUnavailable",
    "Limits",
    "TestCgroup",
    "place_current_process",
]

#: The controllers this layer uses, in the order they are reported.
CONTROLLERS = ("memory", "pids", "cpu")
#: The CFS period for cpu limits: the kernel default, so the quota reads as cores.
CPU_PERIOD_US = 100_000
#: The one directory this plugin creates beneath a cgroup it may write to.
SHARED_DIR = "pytest-isolate"
#: How long kill()/remove() wait for a cgroup to empty before giving up.
DRAIN_TIMEOUT = 5.0

_OWNER_RE = re.compile(r"^p(\d+)-(\d+)(?:-[A-Za-z0-9_.]+)?$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_.]{0,40}$")


@dataclass(frozen=True)
class Limits:
    """The resource limits of one test; None means no limit."""

    memory: int | None = None  # bytes; swap is disabled for the cgroup so the limit is real
    pids: int | None = None
    cpu: float | None = None  # cores: quota = cpu * CPU_PERIOD_US per period

    def __post_init__(self) -> None:
        # The spec validates user input; this guards the kernel against a caller's bug.
        if self.memory is not None and self.memory < 1:
            raise ValueError(f"Limits(memory={self.memory}): must be a positive number of bytes")
        if self.pids is not None and self.pids < 1:
            raise ValueError(f"Limits(pids={self.pids}): must be at least 1")
        if self.cpu is not None and not self.cpu >= 0.01:
            raise ValueError(
                f"Limits(cpu={self.cpu}): must be at least 0.01 cores "
                "(the kernel's smallest CFS quota is 1 ms per 100 ms period)"
            )

    def controllers(self) -> frozenset[str]:
        """The controllers these limits need (memory is measured even without a limit)."""
        needed = {"memory"} if self.memory is not None else set()
        if self.pids is not None:
            needed.add("pids")
        if self.cpu is not None:
            needed.add("cpu")
        return frozenset(needed)

    def cpu_quota_us(self) -> int:
        assert self.cpu is not None
        return round(self.cpu * CPU_PERIOD_US)


@dataclass(frozen=True)
class CgroupStats:
    """What the kernel counted for one test's cgroup, read before it is removed."""

    peak_memory: int | None  # bytes; None where the kernel keeps no peak (v2 before 5.19)
    oom_kills: int  # processes the OOM killer ended inside the cgroup
    pids_max_hits: int  # forks refused by pids.max
    nr_throttled: int | None  # CFS periods in which the test was throttled (cpu limit only)
    throttled_usec: int | None


class CgroupUnavailable(Exception):
    """No usable cgroup for what was asked. The message says what is missing,
    then the exact command that fixes it, one per line."""

    def __init__(self, missing: str, fix: str) -> None:
        super().__init__(f"{missing}\nfix: {fix}")
        self.missing = missing
        self.fix = fix


class TestCgroup(abc.ABC):
    """The cgroup of one test: one directory per hierarchy it needs.

    The child places itself by writing "0" into every file of ``procs_files``
    (``place_current_process``) as the first step of its setup; on v2 the
    engine may instead fork straight into ``clone_into`` with clone3.
    """

    __test__ = False  # not a pytest test class, whatever the name says

    path_for_display: str
    procs_files: tuple[str, ...]
    #: v2: the directory to open for clone3(CLONE_INTO_CGROUP); None on v1.
    clone_into: str | None
    limits: Limits

    @abc.abstractmethod
    def stats(self) -> CgroupStats:
        """The counters of this test. Read them before ``remove()``."""

    @abc.abstractmethod
    def kill(self) -> None:
        """SIGKILL everything in the cgroup and wait (bounded) until it is empty."""

    def signal_all(self, signalled: Iterable[int] = ()) -> None:
        """SIGKILL everything in the cgroup without waiting for it to exit:
        when this returns, every member has SIGKILL pending and runs no more
        user code; remove() later waits for the kernel's teardown.
        ``signalled``: pids the caller has already sent SIGKILL and not
        reaped (so the number is still theirs): not signalled again."""
        signal_rounds(self.procs_files, self._membership(), signalled=signalled)

    def _membership(self) -> Mapping[str, str]:
        """hierarchy key -> cgroup path, to check a pid before signalling it."""
        raise NotImplementedError

    @abc.abstractmethod
    def remove(self) -> None:
        """Remove the directories; kills leftovers first if the kernel says busy.
        A directory already gone is fine."""


class CgroupManager(abc.ABC):
    """One per pytest process: owns ``<base>/pytest-isolate/p<pid>-<start>[-tag]``."""

    version: int
    controllers: frozenset[str]
    #: controller -> why it cannot be used here, with the fix (CgroupUnavailable text).
    unavailable: Mapping[str, CgroupUnavailable]
    #: Caveats worth a line in the session header (e.g. swap not accounted).
    notes: tuple[str, ...]

    def describe(self) -> str:
        """One line for the session header, e.g. ``cgroup v1 (memory, pids, cpu)``."""
        names = [c for c in CONTROLLERS if c in self.controllers]
        text = f"cgroup v{self.version} ({', '.join(names) or 'no controllers'})"
        return "; ".join([text, *self.notes])

    def check(self, limits: Limits) -> None:
        """Raise CgroupUnavailable if a controller these limits need is not usable."""
        for name in CONTROLLERS:
            if name in limits.controllers() and name not in self.controllers:
                raise self.unavailable.get(name) or CgroupUnavailable(
                    f"the cgroup controller {name!r} is not usable here",
                    "run `pytest --isolate-doctor` to see why",
                )

    def prime(self) -> None:  # noqa: B027 - a no-op where moves cost nothing (v2 clones into)
        """Make the next placement cheap, if that takes something (v1)."""

    @abc.abstractmethod
    def create(self, limits: Limits) -> TestCgroup:
        """Make the cgroup of the next test and write its limits."""

    @abc.abstractmethod
    def close(self) -> None:
        """Remove this process's subtree (killing anything left in it)."""


# ---------------------------------------------------------------- file access


def write_file(path: str, data: bytes) -> None:
    """One open/write/close; the error names the path and the value written."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        raise OSError(
            e.errno, f"cannot open {path} to write {data.decode()!r}: {e.strerror}", path
        ) from None
    try:
        os.write(fd, data)
    except OSError as e:
        raise OSError(e.errno, f"writing {data.decode()!r} to {path}: {e.strerror}", path) from None
    finally:
        os.close(fd)


def read_text(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


def read_keyed(path: str) -> dict[str, int]:
    """Parse the ``key value`` lines of memory.events, cpu.stat and friends."""
    out = {}
    for line in read_text(path).splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def read_pids(procs_file: str) -> list[int]:
    try:
        return [int(x) for x in read_text(procs_file).split()]
    except FileNotFoundError:
        return []


def place_current_process(procs_files: Iterable[str]) -> None:
    """Move the calling process into each cgroup (the child's first setup step).

    Writing "0" means "myself" to the kernel, so no pid crosses a pid
    namespace. Raises OSError naming the path.
    """
    for path in procs_files:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        except OSError as e:
            raise OSError(
                e.errno, f"cannot join cgroup: write '0' to {path}: {e.strerror}", path
            ) from None


# ------------------------------------------------------------ owner liveness


def process_starttime(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot); None if no such pid.

    A pid alone can be reused; pid plus start time names one process for good.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = data.rsplit(b")", 1)[1].split()
    return int(fields[19])


def owner_dir_name(owner_tag: str) -> str:
    if not _TAG_RE.match(owner_tag):
        raise ValueError(f"owner_tag={owner_tag!r}: use letters, digits, '_' or '.' only")
    pid = os.getpid()
    name = f"p{pid}-{process_starttime(pid)}"
    return f"{name}-{owner_tag}" if owner_tag else name


def owner_is_dead(dir_name: str) -> bool:
    """True for a per-process directory whose pytest no longer runs.

    Names that are not ours (no ``p<pid>-<start>`` form) are never judged dead.
    A pytest in another pid namespace sharing this cgroup would look dead; the
    docs say not to share one cgroup between pid namespaces.
    """
    m = _OWNER_RE.match(dir_name)
    if m is None:
        return False
    return process_starttime(int(m.group(1))) != int(m.group(2))


# ------------------------------------------------------------- hierarchies


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy, as /proc/self/mountinfo shows it."""

    key: str  # the middle field of /proc/<pid>/cgroup: "" on v2, "cpu,cpuacct" on v1
    mountpoint: str
    root: str  # the cgroup the mount shows at its top (mountinfo field 4)
    options: frozenset[str]  # super options: controllers on v1, nsdelegate on v2

    def dir_of(self, cgpath: str) -> str | None:
        """The directory of a /proc/self/cgroup path; None if the mount hides it."""
        root = self.root.rstrip("/")
        if cgpath != root and not cgpath.startswith(root + "/"):
            return None
        return self.mountpoint.rstrip("/") + cgpath[len(root) :].rstrip("/")

    def cgpath_of(self, directory: str) -> str:
        """The inverse of dir_of: how /proc/<pid>/cgroup names this directory."""
        tail = directory[len(self.mountpoint.rstrip("/")) :]
        return (self.root.rstrip("/") + tail) or "/"


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def cgroup_mounts() -> list[Hierarchy]:
    """Every cgroup/cgroup2 mount, first mount of each hierarchy only."""
    found: dict[str, Hierarchy] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(rfields) < 3 or rfields[0] not in ("cgroup", "cgroup2"):
                continue
            options = frozenset(rfields[2].split(","))
            if rfields[0] == "cgroup2":
                key = ""
            else:
                key = norm_key(
                    ",".join(
                        o
                        for o in options
                        if o.startswith("name=") or (o not in _V1_NON_CONTROLLERS and "=" not in o)
                    )
                )
            found.setdefault(
                key, Hierarchy(key, _unescape(fields[4]), _unescape(fields[3]), options)
            )
    return list(found.values())


# Mount options of cgroup v1 that are not controller names.
_V1_NON_CONTROLLERS = frozenset(
    {
        "rw",
        "ro",
        "relatime",
        "noatime",
        "nosuid",
        "nodev",
        "noexec",
        "none",
        "noprefix",
        "clone_children",
        "xattr",
        "cpuset_v2_mode",
        "favordynmods",
        "sync",
        "dirsync",
    }
)


def norm_key(key: str) -> str:
    """A v1 hierarchy key with its controllers sorted and names last: mountinfo
    and /proc/<pid>/cgroup list co-mounted controllers in different orders."""
    parts = key.split(",") if key else []
    return ",".join(
        sorted(p for p in parts if not p.startswith("name="))
        + sorted(p for p in parts if p.startswith("name="))
    )


def own_cgroups(pid: int | str = "self") -> dict[str, str]:
    """/proc/<pid>/cgroup as normalized hierarchy key -> path."""
    out = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, key, path = line.rstrip("\n").split(":", 2)
            out[norm_key(key)] = path
    return out


# ------------------------------------------------------------ kill and remove


def _member(pid: int, where: Mapping[str, str]) -> bool:
    """Is pid in one of the cgroups where maps (hierarchy key -> cgroup path)?"""
    try:
        theirs = own_cgroups(pid)
    except (FileNotFoundError, ProcessLookupError):
        return False
    for key, rel in where.items():
        path = theirs.get(key)
        if path is not None and (path == rel or path.startswith(rel.rstrip("/") + "/")):
            return True
    return False


def signal_members(procs_files: Iterable[str], where: Mapping[str, str]) -> int:
    """SIGKILL every process listed in procs_files; return how many were listed.

    A pid read from cgroup.procs may exit and be reused by an unrelated process
    before we signal it. A pidfd pins the process we check: its membership is
    read while the pidfd holds it, and pidfd_send_signal never reaches a
    successor that got the same number.
    """
    seen = 0
    for procs in procs_files:
        for pid in read_pids(procs):
            seen += 1
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                if _member(pid, where):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            finally:
                os.close(pidfd)
    return seen


def signal_rounds(
    procs_files: Iterable[str],
    where: Mapping[str, str],
    rounds: int = 8,
    signalled: Iterable[int] = (),
) -> None:
    """Signal until a round lists no new pid. A process with SIGKILL pending
    cannot fork, and a child forked before its parent was signalled is listed
    by the next round, so two rounds normally suffice. ``signalled``: pids
    that already have SIGKILL pending (a test process that ended alone
    costs one read of cgroup.procs)."""
    files = tuple(procs_files)
    signalled = set(signalled)
    for _ in range(rounds):
        listed = {pid for f in files for pid in read_pids(f)}
        if not listed - signalled:
            return
        signal_members(files, where)
        signalled |= listed


def drain(
    procs_files: tuple[str, ...], where: Mapping[str, str], timeout: float = DRAIN_TIMEOUT
) -> None:
    """Kill until the cgroups are empty. Without a freezer, a process forked
    between two reads is caught by the next round; one with SIGKILL pending
    cannot fork, so the rounds converge."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while signal_members(procs_files, where):
        if time.monotonic() > deadline:
            left = sorted({p for f in procs_files for p in read_pids(f)})
            raise OSError(
                errno.EBUSY,
                f"cgroup {os.path.dirname(procs_files[0])} still "
                f"holds pids {left} after {timeout:.0f} s of SIGKILL",
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def rmdir_quiet(path: str) -> bool:
    """rmdir; True if removed or already gone, False if busy."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError as e:
        if e.errno == errno.EBUSY:
            return False
        raise OSError(e.errno, f"cannot remove cgroup {path}: {e.strerror}", path) from None
    return True


def rmdir_draining(path: str, hierarchy: Hierarchy, timeout: float = DRAIN_TIMEOUT) -> None:
    """rmdir one cgroup; if busy, kill what is left in it and retry (bounded).

    EBUSY right after the last process died is normal: SIGKILL is delivered
    asynchronously and the task leaves the cgroup only in do_exit.
    """
    if rmdir_quiet(path):
        return
    procs = (os.path.join(path, "cgroup.procs"),)
    where = {hierarchy.key: hierarchy.cgpath_of(path)}
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while not rmdir_quiet(path):
        drain(procs, where, timeout)
        if time.monotonic() > deadline:
            raise OSError(
                errno.EBUSY, f"cannot remove cgroup {path}: still busy after {timeout:.0f} s", path
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def walk_bottom_up(top: str) -> Iterator[str]:
    """Every cgroup directory under top (inclusive), children before parents."""
    try:
        entries = list(os.scandir(top))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from walk_bottom_up(entry.path)
    yield top


def remove_tree(top: str, hierarchy: Hierarchy) -> None:
    """Kill whatever runs in the subtree, then rmdir it bottom-up."""
    for path in walk_bottom_up(top):
        rmdir_draining(path, hierarchy)


def remove_stale(shared: str, hierarchy: Hierarchy) -> list[str]:
    """Remove the per-process subtrees under shared whose pytest is dead.
    Returns the directories removed. Live owners' subtrees are never touched."""
    removed: list[str] = []
    try:
        names = os.listdir(shared)
    except FileNotFoundError:
        return removed
    for name in names:
        path = os.path.join(shared, name)
        if os.path.isdir(path) and owner_is_dead(name):
            remove_tree(path, hierarchy)
            removed.append(path)
    return removed


# ----------------------------------------------------------------- the lock


def session_lock_dir() -> str:
    """Where session_lock's files live: the runtime dir when it is writable,
    else the temp dir."""
    run_dir = os.environ.get("XDG_RUNTIME_DIR")
    if not run_dir or not os.access(run_dir, os.W_OK):
        run_dir = tempfile.gettempdir()
    return run_dir


@contextlib.contextmanager
def session_lock(base: str, timeout: float = 60.0) -> Iterator[None]:
    """The lock xdist workers and concurrent runs take while they create or
    remove the shared directory, clean stale subtrees or move processes.

    cgroupfs holds no regular files, so the lock lives in the runtime dir (per
    user, mode 0700) or the temp dir, named after the cgroup it guards. A
    flock(2), as filelock takes it, without filelock's import and fork hooks
    (pytest's process forks once a test).
    """
    key = re.sub(r"[^A-Za-z0-9_.-]+", "_", base.strip("/"))[-120:]
    path = os.path.join(session_lock_dir(), f"pytest-isolate-{os.geteuid()}-{key}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"another pytest holds {path} for over {timeout:g} s"
                    ) from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # releases the lock
