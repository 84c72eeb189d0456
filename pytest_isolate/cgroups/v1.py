"""cgroup v1: one hierarchy per controller, one directory per test in each.

Layout, in each hierarchy H in use, beneath the cgroup this process runs in
there (so memory under our own memory cgroup; pids and cpu under the
hierarchy root only where our own cgroup there is the root):

    <own cgroup in H>/pytest-isolate/p<pid>-<starttime>[-tag]/t<N>

Per test, only the hierarchies it needs get a directory: memory always (its
peak memory is measured for every test), pids and cpu only when that limit is
set, because every hierarchy joined is one more cgroup.procs write in the
child and one more mkdir/rmdir pair in the parent.

v1 has no cgroup.kill: kill() SIGKILLs every pid it lists until the cgroup is
empty (a freezer would close the fork race too, but costs a hierarchy more
per test; a test's pid namespace init dying ends the rest anyway).
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Mapping

from .common import (
    CONTROLLERS,
    DRAIN_TIMEOUT,
    CgroupManager,
    CgroupStats,
    CgroupUnavailable,
    Hierarchy,
    Limits,
    TestCgroup,
    drain,
    owner_dir_name,
    read_keyed,
    read_text,
    remove_stale,
    remove_tree,
    rmdir_draining,
    rmdir_quiet,
    session_lock,
    write_file,
)

__all__ = ["V1Manager", "V1TestCgroup", "open_v1"]

_FIX_ROOT = (
    "cgroup v1 cannot be delegated to an unprivileged user: run pytest as root, or boot "
    "the host with systemd.unified_cgroup_hierarchy=1 and run "
    "`systemd-run --user --scope -p Delegate=yes pytest ...`"
)


class V1TestCgroup(TestCgroup):
    __test__ = False

    def __init__(
        self, dirs: Mapping[str, str], hierarchies: Mapping[str, Hierarchy], limits: Limits
    ) -> None:
        self.dirs = dict(dirs)  # controller -> directory
        self.limits = limits
        self._where = {hierarchies[c].key: hierarchies[c].cgpath_of(d) for c, d in dirs.items()}
        self._hierarchies = hierarchies
        self.procs_files = tuple(f"{d}/cgroup.procs" for d in self.dirs.values())
        self.clone_into = None
        first = next(iter(self.dirs.values()), "")
        self.path_for_display = (
            first
            if len(self.dirs) < 2
            else (f"{first} (+{', '.join(c for c in self.dirs if c != 'memory')})")
        )

    def stats(self) -> CgroupStats:
        mem = self.dirs.get("memory")
        peak = oom = None
        if mem is not None:
            peak = int(read_text(f"{mem}/memory.max_usage_in_bytes"))
            # failcnt stays 0 on a real OOM kill when memsw equals the limit;
            # the oom_kill counter (4.13+) counts the kills themselves.
            oom = read_keyed(f"{mem}/memory.oom_control").get("oom_kill", 0)
        pids = self.dirs.get("pids")
        hits = read_keyed(f"{pids}/pids.events").get("max", 0) if pids else 0
        cpu = self.dirs.get("cpu")
        throttled = throttled_us = None
        if cpu is not None:
            stat = read_keyed(f"{cpu}/cpu.stat")
            throttled = stat.get("nr_throttled", 0)
            throttled_us = stat.get("throttled_time", 0) // 1000  # v1 counts nanoseconds
        return CgroupStats(peak, oom or 0, hits, throttled, throttled_us)

    def kill(self) -> None:
        drain(self.procs_files, self._where)

    def _membership(self) -> Mapping[str, str]:
        return self._where

    def remove(self) -> None:
        for controller, path in self.dirs.items():
            rmdir_draining(path, self._hierarchies[controller])


class V1Manager(CgroupManager):
    version = 1

    def __init__(
        self,
        pdirs: Mapping[str, str],
        hierarchies: Mapping[str, Hierarchy],
        unavailable: Mapping[str, CgroupUnavailable],
        memsw: bool,
    ) -> None:
        self.pdirs = dict(pdirs)  # controller -> this process's directory
        self.hierarchies = dict(hierarchies)
        self.controllers = frozenset(pdirs)
        self.unavailable = dict(unavailable)
        self._memsw = memsw
        self._next = 0
        self._primer: subprocess.Popen[bytes] | None = None
        notes = []
        if "memory" in self.controllers and not memsw:
            notes.append("swap not accounted (no memory.memsw.*): swappiness=0 instead")
        self.notes = tuple(notes)

    def create(self, limits: Limits) -> V1TestCgroup:
        self.check(limits)
        needed = limits.controllers() | ({"memory"} & self.controllers)
        n = self._next
        self._next += 1
        dirs: dict[str, str] = {}
        try:
            for controller in CONTROLLERS:
                if controller in needed:
                    path = f"{self.pdirs[controller]}/t{n}"
                    os.mkdir(path)
                    dirs[controller] = path
            self._apply(dirs, limits)
        except BaseException:
            for controller, path in dirs.items():
                rmdir_draining(path, self.hierarchies[controller])
            raise
        return V1TestCgroup(dirs, self.hierarchies, limits)

    def prime(self) -> None:
        """Have a helper process move itself into a cgroup of ours now, so that
        a sandbox placed within the next few milliseconds finds the kernel's
        cgroup lock already on its slow path and does not wait a whole RCU
        grace period (10 to 15 ms here) for it: docs/performance.md, Trap 1.
        The helper (``/bin/sh``, spawned without copying pytest's memory) does
        the waiting. Called once, before the first test's plan is built, the
        only placement with that much warning; nothing depends on it."""
        if self._primer is not None or not self.pdirs or not os.access("/bin/sh", os.X_OK):
            return
        path = f"{next(iter(self.pdirs.values()))}/primer"
        try:
            os.mkdir(path)
            self._primer = subprocess.Popen(
                ["/bin/sh", "-c", 'echo 0 > "$0"', f"{path}/cgroup.procs"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=True,
            )
        except OSError:
            rmdir_quiet(path)

    def _apply(self, dirs: Mapping[str, str], limits: Limits) -> None:
        if limits.memory is not None:
            mem = dirs["memory"]
            value = str(limits.memory).encode()
            # limit first: memsw may never be below it, and it starts unlimited.
            write_file(f"{mem}/memory.limit_in_bytes", value)
            if self._memsw:
                write_file(f"{mem}/memory.memsw.limit_in_bytes", value)
            else:
                # No swap accounting: keep the memcg from swapping its anon
                # pages so the limit still bites.
                write_file(f"{mem}/memory.swappiness", b"0")
        if limits.pids is not None:
            write_file(f"{dirs['pids']}/pids.max", str(limits.pids).encode())
        if limits.cpu is not None:
            # A new v1 cgroup starts with the default 100 ms period, so only
            # the quota is written.
            write_file(f"{dirs['cpu']}/cpu.cfs_quota_us", str(limits.cpu_quota_us()).encode())

    def close(self) -> None:
        if self._primer is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._primer.wait(timeout=DRAIN_TIMEOUT)  # it exits at once
        for controller, pdir in self.pdirs.items():
            hierarchy = self.hierarchies[controller]
            shared = os.path.dirname(pdir)
            with session_lock(shared):
                remove_tree(pdir, hierarchy)
                rmdir_quiet(shared)  # busy while another pytest still uses it: fine
        self.pdirs.clear()


def _prepare_hierarchy(controller: str, hierarchy: Hierarchy, own_path: str, owner: str) -> str:
    """Create <own>/pytest-isolate/<owner> in one hierarchy; return its path.
    Raises CgroupUnavailable with the reason and the fix."""
    own = hierarchy.dir_of(own_path)
    if own is None:
        raise CgroupUnavailable(
            f"cgroup v1 {controller}: this process's cgroup {own_path} is outside the "
            f"mount at {hierarchy.mountpoint} (which shows {hierarchy.root})",
            "run pytest in a cgroup namespace of its own, or mount the hierarchy so it "
            "shows the process's cgroup",
        )
    shared = f"{own}/pytest-isolate"
    pdir = f"{shared}/{owner}"
    try:
        with session_lock(shared):
            with contextlib.suppress(FileExistsError):
                os.mkdir(shared)
            remove_stale(shared, hierarchy)
            os.mkdir(pdir)
    except FileExistsError:
        raise CgroupUnavailable(
            f"cgroup v1 {controller}: {pdir} already exists (another manager with the "
            "same owner_tag in this process?)",
            "give each CgroupManager in one process its own owner_tag",
        ) from None
    except OSError as e:
        if e.errno == errno.EROFS:
            fix = (
                "inside a container, give it a writable cgroup hierarchy: "
                "`docker run --privileged ...` (cgroup v1 hosts)"
            )
        elif e.errno in (errno.EACCES, errno.EPERM):
            fix = _FIX_ROOT
        else:
            fix = f"check that {own} is a writable cgroup directory"
        raise CgroupUnavailable(
            f"cgroup v1 {controller}: cannot create {shared}: {e.strerror} (uid {os.geteuid()})",
            fix,
        ) from None
    return pdir


def open_v1(
    hierarchies: Mapping[str, Hierarchy], own: Mapping[str, str], owner_tag: str
) -> V1Manager:
    """Prepare this process's directory in every v1 hierarchy we can use.

    hierarchies: controller -> its v1 hierarchy (only controllers on v1).
    own: /proc/self/cgroup as hierarchy key -> path.
    """
    owner = owner_dir_name(owner_tag)
    pdirs: dict[str, str] = {}
    unavailable: dict[str, CgroupUnavailable] = {}
    for controller in CONTROLLERS:
        hierarchy = hierarchies.get(controller)
        if hierarchy is None:
            unavailable[controller] = CgroupUnavailable(
                f"cgroup v1 controller {controller!r} is not mounted",
                f"mkdir -p /sys/fs/cgroup/{controller} && "
                f"mount -t cgroup -o {controller} cgroup /sys/fs/cgroup/{controller}",
            )
            continue
        own_path = own.get(hierarchy.key)
        if own_path is None:
            unavailable[controller] = CgroupUnavailable(
                f"cgroup v1 {controller}: /proc/self/cgroup has no line for {hierarchy.key}",
                "mount the hierarchy in this process's mount namespace",
            )
            continue
        try:
            pdirs[controller] = _prepare_hierarchy(controller, hierarchy, own_path, owner)
        except CgroupUnavailable as e:
            unavailable[controller] = e
    memsw = "memory" in pdirs and os.path.exists(f"{pdirs['memory']}/memory.memsw.limit_in_bytes")
    if not pdirs:
        first = unavailable["memory"]
        raise CgroupUnavailable(first.missing, first.fix)
    return V1Manager(pdirs, {c: hierarchies[c] for c in pdirs}, unavailable, memsw)
