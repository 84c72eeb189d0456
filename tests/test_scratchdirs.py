"""The host directories a session mounts on: locked while in use, removed by
the next session when a killed one left them behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pytest_isolate import scratchdirs
from pytest_isolate.scratchdirs import LockedDir, remove_stale

# A process that makes a staging-like directory (with its empty "root"),
# says where, and waits: killed, it leaves the directory behind.
_HOLDER = """
import os, sys, tempfile
tempfile.tempdir = sys.argv[1]
from pytest_isolate import scratchdirs
scratchdirs._swept = True
held = scratchdirs.LockedDir("pytest-isolate-run-")
os.mkdir(os.path.join(held.path, "root"))
print(held.path, flush=True)
sys.stdin.read()
"""


def _holder(directory: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def test_a_killed_holders_directory_is_removed_a_live_ones_kept(tmp_path: Path) -> None:
    live, live_dir = _holder(tmp_path)
    dead, dead_dir = _holder(tmp_path)
    try:
        _kill(dead)
        assert (dead_dir / "root").is_dir()  # what a killed session leaves

        assert remove_stale(str(tmp_path)) == [str(dead_dir)]
        assert not dead_dir.exists()
        assert (live_dir / "root").is_dir()
        assert remove_stale(str(tmp_path)) == []
    finally:
        _kill(live)
    assert remove_stale(str(tmp_path)) == [str(live_dir)]
    assert os.listdir(tmp_path) == []


def test_only_empty_directories_of_ours_are_removed(tmp_path: Path) -> None:
    with_file = tmp_path / "pytest-isolate-run-file"
    (with_file / "root").mkdir(parents=True)
    (with_file / "root" / "data").write_text("kept")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "pytest-isolate-initd-link").symlink_to(target)
    (tmp_path / "pytest-isolate-run-plain").write_text("a file")
    (tmp_path / "pytest-isolate-other").mkdir()  # not one of our prefixes
    empty = tmp_path / "pytest-isolate-initd-empty"
    empty.mkdir()
    if os.geteuid() == 0:
        foreign = tmp_path / "pytest-isolate-run-foreign"
        foreign.mkdir()
        os.chown(foreign, 65534, 65534)

    assert remove_stale(str(tmp_path)) == [str(empty)]
    assert (with_file / "root" / "data").read_text() == "kept"
    assert target.is_dir() and (tmp_path / "pytest-isolate-initd-link").is_symlink()
    assert (tmp_path / "pytest-isolate-run-plain").read_text() == "a file"
    assert (tmp_path / "pytest-isolate-other").is_dir()
    if os.geteuid() == 0:
        assert (tmp_path / "pytest-isolate-run-foreign").is_dir()


def test_our_generated_files_go_with_their_directory_and_nothing_else(tmp_path: Path) -> None:
    """A killed session's /etc/hosts for its sandboxes (a regular file named
    generated-*) is removed with its directory; any other file keeps it, and
    a link or directory named so is not followed or removed."""
    ours = tmp_path / "pytest-isolate-run-ours"
    ours.mkdir()
    (ours / "generated-hosts-isolated").write_text("127.0.0.1 isolated")
    (ours / "generated-hosts-isolated.tmp").write_text("half")
    mixed = tmp_path / "pytest-isolate-run-mixed"
    mixed.mkdir()
    (mixed / "generated-hosts-x").write_text("x")
    (mixed / "data").write_text("kept")
    target = tmp_path / "target"
    target.write_text("not ours")
    (mixed / "generated-link").symlink_to(target)

    assert remove_stale(str(tmp_path)) == [str(ours)]
    assert sorted(os.listdir(mixed)) == ["data", "generated-link"]
    assert target.read_text() == "not ours"


def test_the_first_directory_a_process_makes_sweeps_and_remove_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead, dead_dir = _holder(tmp_path)
    _kill(dead)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(scratchdirs, "_swept", False)

    made = LockedDir("pytest-isolate-initd-")
    assert not dead_dir.exists()
    assert remove_stale(str(tmp_path)) == []  # held
    second = LockedDir("pytest-isolate-run-")  # no second sweep needed
    (Path(second.path) / "root").mkdir()
    made.remove()
    second.remove()
    second.remove()  # twice is harmless
    assert os.listdir(tmp_path) == []
