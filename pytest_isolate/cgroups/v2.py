"""cgroup v2: one unified hierarchy, one leaf directory per test.

Where the tree goes (``<base>/pytest-isolate/p<pid>-<starttime>[-tag]/t<N>``)
is decided once, by the no-internal-processes rule: a non-root cgroup that
holds processes cannot hand controllers to children (EBUSY). In order:

1. this process runs in the real root cgroup (a VM, a bare container init):
   base is the root, which is exempt from the rule;
2. this process runs in ``<C>/pytest-isolate.procs`` (a sibling worker or an
   earlier run moved it there): base is ``<C>``;
3. this process's cgroup C is delegated to us (we can write its
   cgroup.procs and cgroup.subtree_control) and every process in it belongs
   to this run: move them into the leaf ``<C>/pytest-isolate.procs`` and
   enable the controllers in C, systemd's Delegate=yes recipe. "Belongs to this
   run" is this process, the chain of parents above it that run the same
   interpreter (an xdist controller, tox) and their descendants; a shell, an
   editor or a CI agent in the same cgroup stops us, because moving another
   program's processes is not ours to do;
4. the top of the cgroup2 mount is writable (root) and may have children
   with controllers (the real root, or a container's root whose processes
   were moved into a leaf): base is the top, beside system.slice
   (``/sys/fs/cgroup/pytest-isolate``, documented);
5. otherwise no cgroup: the error names the fix (a delegated scope).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable, Mapping

from .common import (
    CONTROLLERS,
    CPU_PERIOD_US,
    SHARED_DIR,
    CgroupManager,
    CgroupStats,
    CgroupUnavailable,
    Hierarchy,
    Limits,
    TestCgroup,
    drain,
    owner_dir_name,
    read_keyed,
    read_pids,
    read_text,
    remove_stale,
    remove_tree,
    rmdir_draining,
    rmdir_quiet,
    session_lock,
    write_file,
)

__all__ = ["PROCS_LEAF", "V2Manager", "V2TestCgroup", "open_v2"]

#: The leaf that holds pytest's own processes in a delegated cgroup.
PROCS_LEAF = "pytest-isolate.procs"

FIX_DELEGATE = "systemd-run --user --scope -p Delegate=yes pytest ..."
#: Inside a container (cgroup namespace root holding the job's shell): what
#: Docker's own dind entrypoint does, run as root before pytest.
FIX_CONTAINER = (
    "inside a container, move its processes into a leaf first (as root): "
    "mkdir -p /sys/fs/cgroup/init && xargs -rn1 < /sys/fs/cgroup/cgroup.procs "
    "> /sys/fs/cgroup/init/cgroup.procs && sed -e 's/ / +/g' -e 's/^/+/' "
    "< /sys/fs/cgroup/cgroup.controllers > /sys/fs/cgroup/cgroup.subtree_control"
)


class V2TestCgroup(TestCgroup):
    __test__ = False

    def __init__(self, path: str, hierarchy: Hierarchy, limits: Limits, manager: V2Manager) -> None:
        self.path = path
        self.path_for_display = path
        self.limits = limits
        self.procs_files = (f"{path}/cgroup.procs",)
        self.clone_into = path
        self._hierarchy = hierarchy
        self._m = manager

    def stats(self) -> CgroupStats:
        path, m = self.path, self._m
        peak = None
        oom = 0
        if "memory" in m.controllers:
            if m.has_peak:
                peak = int(read_text(f"{path}/memory.peak"))
            oom = read_keyed(f"{path}/memory.events").get("oom_kill", 0)
        hits = 0
        if self.limits.pids is not None:
            hits = read_keyed(f"{path}/pids.events").get("max", 0)
        throttled = throttled_us = None
        if self.limits.cpu is not None:
            stat = read_keyed(f"{path}/cpu.stat")
            throttled = stat.get("nr_throttled", 0)
            throttled_us = stat.get("throttled_usec", 0)
        return CgroupStats(peak, oom, hits, throttled, throttled_us)

    def kill(self) -> None:
        if self._m.has_kill:
            try:
                # 5.14+: the kernel kills every member at once, forks in flight included.
                write_file(f"{self.path}/cgroup.kill", b"1")
            except FileNotFoundError:
                return
        # Wait for the cgroup to empty (or kill by pid where cgroup.kill is missing).
        drain(self.procs_files, {"": self._hierarchy.cgpath_of(self.path)})

    def signal_all(self, signalled: Iterable[int] = ()) -> None:
        if self._m.has_kill:
            with contextlib.suppress(FileNotFoundError):
                # 5.14+: every member at once, forks in flight included.
                write_file(f"{self.path}/cgroup.kill", b"1")
                return
        super().signal_all(signalled)

    def _membership(self) -> Mapping[str, str]:
        return {"": self._hierarchy.cgpath_of(self.path)}

    def remove(self) -> None:
        rmdir_draining(self.path, self._hierarchy)


class V2Manager(CgroupManager):
    version = 2

    def __init__(
        self,
        hierarchy: Hierarchy,
        *,
        base: str,
        pdir: str,
        placement: str,
        controllers: frozenset[str],
        unavailable: dict[str, CgroupUnavailable],
    ) -> None:
        self.hierarchy = hierarchy
        self.base = base
        self.pdir = pdir
        self.placement = placement
        self.controllers = controllers
        self.unavailable = unavailable
        self._next = 0
        # Probed once so create()/stats() never stat a file per test.
        self.has_peak = os.path.exists(f"{pdir}/memory.peak")
        self.has_swap = os.path.exists(f"{pdir}/memory.swap.max")
        self.has_kill = os.path.exists(f"{pdir}/cgroup.kill")
        notes = [placement]
        if "memory" in controllers and not self.has_peak:
            notes.append("no memory.peak (Linux < 5.19): peak memory not measured")
        if "memory" in controllers and not self.has_swap:
            notes.append(
                "no memory.swap.max (swap accounting off): "
                "where the host swaps, memory limits leak into swap"
            )
        self.notes = tuple(notes)

    def create(self, limits: Limits) -> V2TestCgroup:
        self.check(limits)
        path = f"{self.pdir}/t{self._next}"
        self._next += 1
        os.mkdir(path)
        try:
            if "memory" in self.controllers:
                # OOM in the test kills the whole test, not one random process of it.
                write_file(f"{path}/memory.oom.group", b"1")
            if limits.memory is not None:
                write_file(f"{path}/memory.max", str(limits.memory).encode())
                if self.has_swap:
                    # Without this a hog swaps instead of being killed (seen with zram).
                    write_file(f"{path}/memory.swap.max", b"0")
            if limits.pids is not None:
                write_file(f"{path}/pids.max", str(limits.pids).encode())
            if limits.cpu is not None:
                write_file(f"{path}/cpu.max", f"{limits.cpu_quota_us()} {CPU_PERIOD_US}".encode())
        except BaseException:
            rmdir_draining(path, self.hierarchy)
            raise
        return V2TestCgroup(path, self.hierarchy, limits, self)

    def close(self) -> None:
        if not self.pdir:
            return
        shared = os.path.dirname(self.pdir)
        with session_lock(self.base):
            remove_tree(self.pdir, self.hierarchy)
            rmdir_quiet(shared)  # busy while another pytest still uses it: fine
        self.pdir = ""


# ----------------------------------------------------------------- opening


def _enable(directory: str, wanted: frozenset[str]) -> frozenset[str]:
    """Make sure wanted controllers are in directory's subtree_control; return
    those that are. Reads first: every subtree_control write takes the
    cgroup_threadgroup_rwsem for writing, which costs an RCU grace period."""
    have = set(read_text(f"{directory}/cgroup.subtree_control").split())
    missing = [c for c in CONTROLLERS if c in wanted and c not in have]
    if missing:
        try:
            write_file(
                f"{directory}/cgroup.subtree_control", " ".join(f"+{c}" for c in missing).encode()
            )
        except OSError:
            for c in missing:  # find out which one the kernel refuses
                try:
                    write_file(f"{directory}/cgroup.subtree_control", f"+{c}".encode())
                except OSError:
                    continue
        have = set(read_text(f"{directory}/cgroup.subtree_control").split())
    return frozenset(c for c in wanted if c in have)


def _stat_fields(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _ppid(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else 0


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def _foreign_processes(procs: list[int]) -> list[int]:
    """The pids in procs that do not belong to this pytest run (see step 3)."""
    me = os.getpid()
    exe = _exe(me)
    members = set(procs)
    top = me
    parent = _ppid(top)
    while parent in members and exe is not None and _exe(parent) == exe:
        top, parent = parent, _ppid(parent)
    foreign = []
    for pid in procs:
        p, hops = pid, 0
        while p not in (top, 0, 1) and hops < 64:
            p, hops = _ppid(p), hops + 1
        if p != top:
            foreign.append(pid)
    return foreign


def _describe_pids(pids: list[int]) -> str:
    out = []
    for pid in pids[:5]:
        try:
            with open(f"/proc/{pid}/comm") as f:
                out.append(f"{pid} ({f.read().strip()})")
        except OSError:
            out.append(str(pid))
    return ", ".join(out) + (" ..." if len(pids) > 5 else "")


def _delegate(own: str, hierarchy: Hierarchy, wanted: frozenset[str]) -> str:
    """Step 3: move this run's processes into own/pytest-isolate.procs and
    enable the controllers in own. Called under the session lock."""
    leaf = f"{own}/{PROCS_LEAF}"
    for _ in range(5):
        procs = read_pids(f"{own}/cgroup.procs")
        foreign = _foreign_processes(procs)
        if foreign:
            raise CgroupUnavailable(
                f"cgroup v2: {hierarchy.cgpath_of(own)} also holds {_describe_pids(foreign)}, "
                "which are not part of this pytest run; the no-internal-processes rule "
                "forbids controllers below a cgroup with processes, and pytest-isolate "
                "does not move another program's processes",
                f"run pytest in a cgroup of its own: {FIX_DELEGATE}",
            )
        with contextlib.suppress(FileExistsError):
            os.mkdir(leaf)
        for pid in procs:
            with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                write_file(f"{leaf}/cgroup.procs", str(pid).encode())
        if not read_pids(f"{own}/cgroup.procs"):
            return leaf
    raise CgroupUnavailable(
        f"cgroup v2: processes keep appearing in {hierarchy.cgpath_of(own)} while "
        f"pytest-isolate moves them into {PROCS_LEAF}",
        f"run pytest in a cgroup of its own: {FIX_DELEGATE}",
    )


def open_v2(hierarchy: Hierarchy, own_path: str, owner_tag: str) -> V2Manager:
    """Choose the base (see the module docstring), then create
    <base>/pytest-isolate/<owner> with the controllers enabled down to it."""
    own = hierarchy.dir_of(own_path)
    if own is None:
        raise CgroupUnavailable(
            f"cgroup v2: this process's cgroup {own_path} is outside the cgroup2 mount at "
            f"{hierarchy.mountpoint}",
            "run pytest in its own cgroup namespace (`unshare --cgroup`) or remount cgroup2",
        )
    owner = owner_dir_name(owner_tag)
    euid = os.geteuid()
    # The real root has no cgroup.type; a cgroup namespace's root does.
    own_is_root = not os.path.exists(f"{own}/cgroup.type")
    top = hierarchy.mountpoint
    top_is_root = not os.path.exists(f"{top}/cgroup.type")
    # The top of the mount can hold our subtree if it is the real root (exempt
    # from the rule) or already hands controllers down, so it has no processes:
    # a container whose processes were moved into a leaf (the dind init step).
    top_ok = os.access(top, os.W_OK) and (
        top_is_root or bool(read_text(f"{top}/cgroup.subtree_control").split())
    )
    top_placement = f"tests below {top}/{SHARED_DIR}, the top of the cgroup2 mount"
    with session_lock(os.path.dirname(own) if own.endswith(PROCS_LEAF) else own):
        if own_is_root:
            base, placement = own, f"below the root cgroup {top}"
        elif os.path.basename(own) == PROCS_LEAF:
            base = os.path.dirname(own)
            placement = f"delegated: pytest in {hierarchy.cgpath_of(own)}"
        elif all(
            os.access(f"{own}/{f}", os.W_OK)
            for f in ("cgroup.procs", "cgroup.subtree_control", ".")
        ):
            try:
                leaf = _delegate(own, hierarchy, frozenset(CONTROLLERS))
                base = own
                placement = f"delegated: pytest moved into {hierarchy.cgpath_of(leaf)}"
            except CgroupUnavailable as e:
                if not top_ok:
                    fix = e.fix if top_is_root else f"{e.fix}; or, {FIX_CONTAINER}"
                    raise CgroupUnavailable(e.missing, fix) from None
                base, placement = top, top_placement
        elif top_ok:
            base, placement = top, top_placement
        else:
            raise CgroupUnavailable(
                f"cgroup v2: this process's cgroup {own_path} is not delegated to uid {euid} "
                f"(cannot write {own}/cgroup.subtree_control)",
                FIX_DELEGATE,
            )
    # Locked again on the base: every pytest sharing it serializes its layout changes.
    with session_lock(base):
        return _prepare(hierarchy, base, placement, owner)


def _prepare(hierarchy: Hierarchy, base: str, placement: str, owner: str) -> V2Manager:
    offered = frozenset(read_text(f"{base}/cgroup.controllers").split()) & set(CONTROLLERS)
    unavailable = {
        c: CgroupUnavailable(
            f"cgroup v2 controller {c!r} is not available to {hierarchy.cgpath_of(base)} "
            "(missing from its cgroup.controllers: the parent does not delegate it)",
            f"{FIX_DELEGATE}; for users, systemd before 252 delegates only memory and pids: "
            "add `[Service]\\nDelegate=cpu cpuset io memory pids` in "
            "/etc/systemd/system/user@.service.d/delegate.conf",
        )
        for c in CONTROLLERS
        if c not in offered
    }
    shared = f"{base}/{SHARED_DIR}"
    pdir = f"{shared}/{owner}"
    try:
        enabled = _enable(base, offered) if offered else frozenset()
        with contextlib.suppress(FileExistsError):
            os.mkdir(shared)
        enabled = _enable(shared, enabled)
        remove_stale(shared, hierarchy)
        os.mkdir(pdir)
        enabled = _enable(pdir, enabled)
    except FileExistsError:
        raise CgroupUnavailable(
            f"cgroup v2: {pdir} already exists (another manager with the same owner_tag "
            "in this process?)",
            "give each CgroupManager in one process its own owner_tag",
        ) from None
    except OSError as e:
        if e.errno == errno.EROFS:
            fix = (
                "inside a container, make the cgroup file system writable: "
                "`docker run --privileged` or `podman run --privileged` (see docs/limits.md)"
            )
        elif e.errno in (errno.EACCES, errno.EPERM):
            fix = FIX_DELEGATE
        else:
            fix = f"check that {base} is a cgroup v2 directory writable by uid {os.geteuid()}"
        why = f"{e.strerror}"
        if e.errno in (errno.EACCES, errno.EPERM):
            why += f": cgroup {hierarchy.cgpath_of(base)} is not delegated to uid {os.geteuid()}"
        raise CgroupUnavailable(
            f"cgroup v2: cannot create {e.filename or shared}: {why} ({placement})", fix
        ) from None
    for c in offered - enabled:
        unavailable[c] = CgroupUnavailable(
            f"cgroup v2 controller {c!r} could not be enabled in {hierarchy.cgpath_of(base)}"
            "/cgroup.subtree_control (the kernel refused it)",
            FIX_DELEGATE,
        )
    return V2Manager(
        hierarchy,
        base=base,
        pdir=pdir,
        placement=placement,
        controllers=enabled,
        unavailable=unavailable,
    )
