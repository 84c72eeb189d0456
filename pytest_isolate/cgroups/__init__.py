"""Per-test cgroups: limits the kernel enforces, counters it keeps.

The engine calls ``open_cgroups()`` once per pytest process, then per test
``manager.create(limits)`` -> the child calls ``place_current_process`` ->
(test runs) -> ``tc.stats()`` -> ``tc.kill()`` if anything may be left ->
``tc.remove()``; and ``manager.close()`` at the end of the session.

Which hierarchy is used is decided at run time from what the host mounts:
cgroup v2 where it owns the memory controller, else cgroup v1. This package
never imports pytest.
"""

from __future__ import annotations

import contextlib

from .common import (
    CONTROLLERS,
    CgroupManager,
    CgroupStats,
    CgroupUnavailable,
    Limits,
    TestCgroup,
    cgroup_mounts,
    own_cgroups,
    place_current_process,
    read_text,
)
from .v1 import open_v1
from .v2 import FIX_DELEGATE, open_v2

__all__ = [
    "CgroupManager",
    "CgroupStats",
    "CgroupUnavailable",
    "Limits",
    "TestCgroup",
    "open_cgroups",
    "place_current_process",
]


def open_cgroups(*, owner_tag: str = "") -> CgroupManager:
    """Detect the host's cgroups, remove subtrees left by dead pytest runs, and
    prepare this process's own subtree.

    owner_tag tells apart several managers in one process (letters, digits,
    '_' and '.'). Raises CgroupUnavailable, whose message names what is
    missing and the fix, when no controller at all can be used; a manager
    whose ``controllers`` lack one keeps the reason in ``unavailable``.
    """
    mounts = cgroup_mounts()
    own = own_cgroups()
    v2 = next((h for h in mounts if h.key == ""), None)
    v1 = {c: h for h in mounts if h.key for c in h.key.split(",") if c in CONTROLLERS}
    v2_owns: set[str] = set()
    if v2 is not None:
        with contextlib.suppress(OSError):
            v2_owns = set(read_text(f"{v2.mountpoint}/cgroup.controllers").split())
    # Hybrid hosts mount an empty cgroup2 at /sys/fs/cgroup/unified beside v1:
    # the hierarchy that owns memory is the one to use.
    if v2 is not None and ("memory" in v2_owns or not v1):
        return open_v2(v2, own.get("", "/"), owner_tag)
    if v1:
        return open_v1(v1, own, owner_tag)
    raise CgroupUnavailable(
        "no cgroup file system is mounted (no cgroup2 or cgroup line in /proc/self/mountinfo)",
        "mount -t cgroup2 none /sys/fs/cgroup (as root); in a container, run it with "
        f"--cgroupns=private and a writable /sys/fs/cgroup; rootless: {FIX_DELEGATE}",
    )
