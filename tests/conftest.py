"""Shared test helpers: one gate for host features, named by what is missing."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator

import pytest

from pytest_isolate.initd import InitFactory

pytest_plugins = ["pytester"]


@functools.cache
def _userns_works() -> bool:
    try:
        return (
            subprocess.run(
                ["unshare", "--user", "--map-root-user", "true"],
                check=False,
                capture_output=True,
                timeout=10,
            ).returncode
            == 0
        )
    except (OSError, subprocess.SubprocessError):
        return False


@functools.cache
def _cgroup_version() -> int:
    with open("/proc/self/mounts") as f:
        kinds = {line.split()[2] for line in f}
    return 1 if "cgroup" in kinds else 2 if "cgroup2" in kinds else 0


@functools.cache
def _cgroup_usable() -> bool:
    """Can this process get per-test cgroups (v1 as root, v2 root or delegated)?"""
    try:
        from pytest_isolate.cgroups import open_cgroups

        manager = open_cgroups(owner_tag="probe" + os.environ.get("PYTEST_XDIST_WORKER", ""))
    except Exception:
        return False
    usable = "memory" in manager.controllers
    manager.close()
    return usable


_FEATURES: dict[str, tuple[Callable[[], bool], str]] = {
    "root": (lambda: os.geteuid() == 0, "needs root"),
    "rootless": (lambda: os.geteuid() != 0, "needs an unprivileged user"),
    "userns": (_userns_works, "needs unprivileged user namespaces"),
    "cgroup2": (lambda: _cgroup_version() == 2, "needs a pure cgroup v2 host"),
    "cgroup1": (lambda: _cgroup_version() == 1, "needs cgroup v1 (hybrid) mounts"),
    "cgroup": (
        _cgroup_usable,
        "needs a usable cgroup with the memory controller (root, or a delegated cgroup v2)",
    ),
    "busybox": (lambda: shutil.which("busybox") is not None, "needs busybox-static"),
}


def requires(*features: str) -> pytest.MarkDecorator:
    """Skip unless every named host feature is present; the reason names it."""
    missing = [_FEATURES[f][1] for f in features if not _FEATURES[f][0]()]
    return pytest.mark.skipif(bool(missing), reason="; ".join(missing) or "ok")


@pytest.fixture
def factory() -> Iterator[InitFactory]:
    """A running init factory (test_template, test_reuse), closed with every
    init it holds afterwards."""
    made = InitFactory()
    made.start()
    try:
        yield made
    finally:
        made.close()
