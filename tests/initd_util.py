"""Helpers for the tests that drive the init factory directly (test_template,
test_reuse; their `factory` fixture is in conftest.py): which process an
init's pidfd names, and its mount table."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from pytest_isolate.rootfs import Op, RootfsPlan, plan_rootfs, project_paths


def pid_of(pidfd: int) -> int:
    """The host pid of the process a pidfd refers to."""
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pid:"))


def mounts(pid: int) -> list[tuple[str, str, str, str]]:
    """(mount point, file system, per-mount options, source) of each mount,
    sorted: what must not differ between two builds of the same root."""
    table = []
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            rest = fields[fields.index("-") + 1 :]
            table.append((fields[4], rest[0], fields[5], rest[1]))
    return sorted(table)


def host_plan(staging: Path, project: Path, **kwargs: object) -> RootfsPlan:
    """The default root (the host's view) of a test in ``project``, as root."""
    return plan_rootfs(
        staging=str(staging),
        cwd=str(project),
        home=os.environ.get("HOME"),
        project=project_paths([str(project)]),
        binds=(),
        writable_paths=(),
        tmpfs_size=8 << 20,
        rootless=False,
        cgroup2=False,
        **kwargs,  # type: ignore[arg-type]
    )


def with_ops(plan: RootfsPlan, *ops: Op) -> RootfsPlan:
    """``plan`` with more operations, in depth order as plan_rootfs makes it."""
    ordered = sorted((*plan.ops, *ops), key=lambda op: op.target.rstrip("/").count("/"))
    return dataclasses.replace(plan, ops=tuple(ordered))


@contextlib.contextmanager
def shared_mount(path: Path) -> Iterator[None]:
    """``path`` made a shared mount of its own, as systemd makes the host's:
    mounts made beneath it later reach every copy of it."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)
