"""Shared test helpers: one gate for host features, named by what is missing."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

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


#: Test extras that cost every nested pytest run about 0.15 s to load
#: (hypothesis imports itself whole, pytest-json-report brings
#: pytest-metadata) and that few tests use: left out of nested runs unless a
#: test is marked ``heavy_plugins``. With them, the suite took 40 % longer
#: (the cgroup-v2 VM's parts 50 %).
_HEAVY_PLUGINS_OFF = "-p no:hypothesispytest -p no:pytest_jsonreport -p no:metadata"


@pytest.fixture(autouse=True)
def _lean_nested_runs(request: pytest.FixtureRequest) -> None:
    """Nested runs of a pytester test leave the heavy plugins out
    (PYTEST_ADDOPTS, set after pytester, which clears it)."""
    if "pytester" not in request.fixturenames:
        return
    if request.node.get_closest_marker("heavy_plugins") is not None:
        return
    request.getfixturevalue("pytester")
    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setenv("PYTEST_ADDOPTS", _HEAVY_PLUGINS_OFF)


@pytest.fixture
def staging() -> Iterator[Path]:
    """An empty host directory for a root to be built on (test_template,
    test_steps). Not under tmp_path: /tmp is the sandbox's own tmpfs, and
    the staging directory only needs to exist on the host. A name of its
    own: never one a killed run left behind."""
    parent = Path(tempfile.mkdtemp(prefix="pytest-isolate-staging-"))
    (parent / "root").mkdir()
    try:
        yield parent / "root"
    finally:
        shutil.rmtree(parent)


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
