"""Copy-on-write roots: ``isolated(fs="overlay")`` makes the whole root writable, and
every write lands in the sandbox's private tmpfs and vanishes with it.

Each test runs a real pytest (pytester, in a subprocess) whose isolated tests write
into their own project directory, /etc, ~/.cache and a new top-level directory and
read it back; the outer test then checks that nothing of it reached the host.
Without overlay the same writes fail with EROFS. Rootless (run nested as an
unprivileged user), files owned by other users appear as nobody's and stay
unwritable.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

ROOTLESS = os.geteuid() != 0

SUITE = """
import errno
import os
import pathlib

import pytest

TOKEN = "{token}"
HERE = pathlib.Path(__file__).resolve().parent
TARGETS = {{
    "project": HERE / f"written-{{TOKEN}}.txt",
    "etc": pathlib.Path(f"/etc/written-{{TOKEN}}"),
    "home": pathlib.Path(os.path.expanduser(f"~/.cache/written-{{TOKEN}}/data")),
    "newdir": pathlib.Path(f"/newdir-{{TOKEN}}/data"),
}}


def write(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TOKEN)
    return path.read_text()


@pytest.mark.isolated(fs="overlay")
@pytest.mark.parametrize("where", {overlay_targets!r})
def test_overlay_write_reads_back(where):
    assert write(TARGETS[where]) == TOKEN


@pytest.mark.isolated
@pytest.mark.parametrize("where", ["project", "etc", "newdir"])
def test_readonly_write_fails_with_erofs(where):
    with pytest.raises(OSError) as info:
        write(TARGETS[where])
    assert info.value.errno == errno.EROFS == 30


@pytest.mark.isolated
def test_readonly_home_is_private_and_writable():
    assert write(TARGETS["home"]) == TOKEN
"""

ROOTLESS_SUITE = """
import errno
import os

import pytest


@pytest.mark.isolated(fs="overlay")
def test_other_users_file_is_nobodys_and_unwritable():
    assert os.stat("/etc/hostname").st_uid == 65534
    with pytest.raises(PermissionError) as info:
        open("/etc/hostname", "a").close()
    assert info.value.errno == errno.EACCES


@pytest.mark.isolated(fs="overlay")
def test_other_users_directory_refuses_new_files():
    assert os.stat("/usr/lib").st_uid == 65534
    with pytest.raises(PermissionError) as info:
        open("/usr/lib/written-{token}", "w").close()
    assert info.value.errno == errno.EACCES


@pytest.mark.isolated(fs="overlay")
def test_own_files_stay_writable():
    with open(__file__, "a") as f:
        f.write("# appended inside the sandbox\\n")
"""


@pytest.fixture
def home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME outside the inner run's project: pytester points HOME at the project
    directory, where the project's read-only view would cover the private HOME."""
    path = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(path))
    return path


def targets_on_host(base: Path, token: str) -> list[str]:
    """What the suite wrote, if any of it reached the host."""
    candidates = [
        base / f"written-{token}.txt",
        Path(f"/etc/written-{token}"),
        Path(os.path.expanduser(f"~/.cache/written-{token}")),
        Path(f"/newdir-{token}"),
        Path(f"/usr/lib/written-{token}"),
    ]
    return [str(p) for p in candidates if os.path.lexists(p)]


def test_overlay_writes_everywhere_read_back_and_none_reach_the_host(
    pytester: pytest.Pytester, home: Path
) -> None:
    token = uuid.uuid4().hex[:12]
    # Rootless, /etc belongs to root: its case is the nobody test below.
    overlay_targets = ["project", "home", "newdir"] + ([] if ROOTLESS else ["etc"])
    pytester.makepyfile(test_suite=SUITE.format(token=token, overlay_targets=overlay_targets))
    result = pytester.runpytest_subprocess("-v", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(
        [f"*test_overlay_write_reads_back[[]{where}[]] PASSED*" for where in overlay_targets]
        + [
            f"*test_readonly_write_fails_with_erofs[[]{where}[]] PASSED*"
            for where in ("project", "etc", "newdir")
        ]
        + [
            "*test_readonly_home_is_private_and_writable PASSED*",
            f"*= {len(overlay_targets) + 4} passed in *",
        ]
    )
    assert result.ret == 0
    assert targets_on_host(pytester.path, token) == []
    assert list(home.iterdir()) == []


def test_isolate_fs_overlay_from_the_command_line_applies_to_every_test(
    pytester: pytest.Pytester,
) -> None:
    token = uuid.uuid4().hex[:12]
    pytester.makepyfile(
        test_plain=f"""
        import pathlib

        def test_writes_where_it_stands():
            here = pathlib.Path(__file__).resolve().parent / "written-{token}.txt"
            here.write_text("x")
            assert here.read_text() == "x"
    """
    )
    result = pytester.runpytest_subprocess(
        "--isolate", "--isolate-fs=overlay", "-v", "-p", "no:cacheprovider"
    )
    result.stdout.fnmatch_lines(["*test_writes_where_it_stands PASSED*", "*= 1 passed in *"])
    assert targets_on_host(pytester.path, token) == []


@pytest.mark.skipif(not ROOTLESS, reason="rootless only: run nested as an unprivileged user")
def test_rootless_overlay_shows_other_users_files_as_nobodys_and_unwritable(
    pytester: pytest.Pytester,
) -> None:
    token = uuid.uuid4().hex[:12]
    path = pytester.makepyfile(test_rootless=ROOTLESS_SUITE.format(token=token))
    before = path.read_text()
    result = pytester.runpytest_subprocess("-v", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(
        [
            "*test_other_users_file_is_nobodys_and_unwritable PASSED*",
            "*test_other_users_directory_refuses_new_files PASSED*",
            "*test_own_files_stay_writable PASSED*",
            "*= 3 passed in *",
        ]
    )
    assert path.read_text() == before
    assert targets_on_host(pytester.path, token) == []
