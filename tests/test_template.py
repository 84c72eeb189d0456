"""The template mount namespace (rootfs.split_template, initd): as root, the
init factory builds the read-only part of a spec's root once and each init
copies it, adding only its own mounts (every writable tmpfs, /proc, /dev,
/sys). Proved against the real kernel: a copy has the mounts a whole build
has, with the same options; what one sandbox writes no other sees; the shared
part cannot be written; and only tests with the default capabilities (which
cannot remount or reach pid 1) share one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import requires
from initd_util import host_plan, mounts, pid_of, shared_mount, with_ops
from rootless_util import run_isolated

from pytest_isolate.capabilities import DEFAULT_ROOT_CAPS
from pytest_isolate.initd import AHEAD, InitFactory, InitFactoryError
from pytest_isolate.rootfs import Op, RootfsPlan, split_template
from pytest_isolate.sandbox import SandboxPlan, _init_setup

# These tests look at sandboxes from the host: never inside one themselves.
pytestmark = pytest.mark.isolated(False)


# --------------------------------------------------------------------------- the split


def test_the_split_shares_read_only_views_and_keeps_writable_mounts_per_sandbox() -> None:
    plan = RootfsPlan(
        staging="/s/root",
        cwd="/w",
        rootless=False,
        ops=(
            Op("bind", "/usr", "/usr"),
            Op("symlink", "/bin", "usr/bin"),
            Op("dir", "/home"),
            Op("tmpfs", "/tmp", writable=True, size=1),
            Op("proc", "/proc"),
            Op("dev", "/dev", size=1),
            Op("sys", "/sys"),
            Op("mask_file", "/etc/shadow"),
            Op("bind", "/w", "/w"),
            Op("bind", "/tmp/project", "/tmp/project"),
            Op("bind", "/tmp/project/data", "/tmp/project/data", writable=True),
        ),
    )
    split = split_template(plan)
    assert split is not None
    shared, own = split
    assert [op.target for op in shared] == ["/usr", "/bin", "/home", "/w"]
    # /dev first (the copy reaches the host's /dev/null only through it), then
    # the plan's order, which puts a mount before what is mounted inside it.
    # Masks are each sandbox's own: a mount stays on the file it was made on.
    assert [op.target for op in own] == [
        "/dev",
        "/tmp",
        "/proc",
        "/sys",
        "/etc/shadow",
        "/tmp/project",
        "/tmp/project/data",
    ]
    assert sorted(shared + own, key=plan.ops.index) == list(plan.ops)


def test_no_template_for_an_overlay_or_an_image_root(tmp_path: Path) -> None:
    for kwargs in ({"overlay": True}, {"image_root": str(tmp_path)}):
        assert split_template(host_plan(tmp_path / "root", tmp_path, **kwargs)) is None


def test_only_tests_with_the_default_capabilities_share_a_template(tmp_path: Path) -> None:
    rootfs = host_plan(tmp_path / "root", tmp_path)

    def shares(caps: frozenset[str] | None) -> bool:
        setup = _init_setup(SandboxPlan(rootfs=rootfs, caps=caps))
        assert setup is not None
        return setup[3]

    assert shares(DEFAULT_ROOT_CAPS)
    assert shares(DEFAULT_ROOT_CAPS - {"CHOWN"})
    # A test that can remount (SYS_ADMIN), or reach pid 1, which can (SYS_PTRACE),
    # or that keeps every capability, builds its whole root as before.
    assert not shares(DEFAULT_ROOT_CAPS | {"SYS_ADMIN"})
    assert not shares(DEFAULT_ROOT_CAPS | {"SYS_PTRACE"})
    assert not shares(None)


# --------------------------------------------------------------------------- real inits


@pytest.fixture
def factory(staging: Path, factory: InitFactory) -> InitFactory:
    """conftest's factory, made after ``staging`` and so closed before
    it is removed: the factory builds templates ahead, in the background,
    and one still building made its mount points in a staging directory
    removed under it (the next test of that xdist worker then failed with
    FileExistsError, in CI under load)."""
    return factory


@contextlib.contextmanager
def init(factory: InitFactory, setup: tuple[RootfsPlan, str, bool, bool]) -> Iterator[int]:
    """A ready init of ``setup``; its pid on the host. Killed afterwards."""
    pidfd = factory.new_init(setup)
    try:
        yield pid_of(pidfd)
    finally:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.close(pidfd)


@requires("root")
def test_a_copy_of_the_template_has_the_mounts_of_a_whole_build(
    factory: InitFactory, staging: Path, tmp_path: Path
) -> None:
    (tmp_path / "project").mkdir()
    rootfs = host_plan(staging, tmp_path / "project")
    with init(factory, (rootfs, "box", True, False)) as whole:
        expected = mounts(whole)
    assert factory.copied == 0
    with init(factory, (rootfs, "box", True, True)) as copy:
        got = mounts(copy)
    assert factory.copied == 1  # the factory says which way this root was built
    assert got == expected


@requires("root")
@pytest.mark.parametrize("project", ["/tmp", "HOME"])
def test_a_project_on_a_path_the_root_mounts_a_tmpfs_on_is_copied_too(
    factory: InitFactory, staging: Path, project: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pytest run from /tmp or from $HOME: the project's directory is a path
    the root also mounts a tmpfs on, and its bind covers that tmpfs. A copy
    of the template makes that mount point too (it made none, the copy
    failed with EROFS, and every sandbox of the run was built whole)."""
    path = project
    if project == "HOME":
        # A home of its own, not one of the root's empty directories.
        path = f"/home/pytest-isolate-home-{os.getpid()}"
        os.mkdir(path)
        monkeypatch.setenv("HOME", path)
    try:
        _copy_matches_whole_build(factory, staging, path)
    finally:
        if project == "HOME":
            os.rmdir(path)


def _copy_matches_whole_build(factory: InitFactory, staging: Path, path: str) -> None:
    rootfs = host_plan(staging, Path(path))
    assert [op.kind for op in rootfs.ops if op.target == path][-2:] == ["tmpfs", "bind"]
    # With the project at /tmp, the bind of /tmp also shows the staging
    # directory (under /tmp here) as each build left it: not compared.
    building = str(staging.parent)
    with init(factory, (rootfs, "box", True, False)) as whole:
        expected = [m for m in mounts(whole) if not m[0].startswith(building)]
    with init(factory, (rootfs, "box", True, True)) as copy:
        got = [m for m in mounts(copy) if not m[0].startswith(building)]
    assert factory.copied == 1
    assert got == expected


@requires("root")
def test_an_init_the_factory_cannot_make_is_counted_with_its_reason(
    factory: InitFactory, staging: Path, tmp_path: Path
) -> None:
    """-vv says when the factory failed (pytest then makes that sandbox
    itself, and a template that failed is given up: every later root is
    built whole, the same mounts for more CPU): the count and the last
    reason the factory gave."""
    missing = str(tmp_path / "gone")
    rootfs = with_ops(host_plan(staging, tmp_path), Op("bind", missing, missing))
    with pytest.raises(InitFactoryError, match="does not exist"):
        factory.new_init((rootfs, "box", True, True))
    assert factory.init_failures == 1
    assert factory.last_init_failure.startswith("SetupStepError: bind " + missing)


@requires("root")
def test_inits_asked_for_ahead_are_the_ones_handed_out(
    factory: InitFactory, staging: Path, tmp_path: Path
) -> None:
    """prepare(): the engine asks for a plan's inits as soon as its root is
    planned (engine._build_plan), so the factory builds the template while
    pytest finishes the plan. At most AHEAD are asked for, however often; the
    first new_init() takes one of them, made for that very setup."""
    (tmp_path / "project").mkdir()
    setup = (host_plan(staging, tmp_path / "project"), "box", True, True)
    factory.prepare(setup)
    factory.prepare(setup)
    ident = factory._id_of(setup)
    assert list(factory._pending) == [ident] * AHEAD
    other = (host_plan(staging, tmp_path / "project"), "other", True, True)
    factory.prepare(other)  # after the first setup's, not instead of them
    assert list(factory._pending) == [ident] * AHEAD + [factory._id_of(other)] * AHEAD
    with init(factory, setup):
        # Taken from those asked for: nothing more was asked.
        assert list(factory._pending) == [ident] + [factory._id_of(other)] * AHEAD
    assert factory.copied == 1


@requires("root")
def test_sandboxes_of_one_template_share_nothing_writable(
    factory: InitFactory, staging: Path, tmp_path: Path
) -> None:
    (tmp_path / "project").mkdir()
    setup = (host_plan(staging, tmp_path / "project"), "box", True, True)
    with init(factory, setup) as first, init(factory, setup) as second:
        one, two = Path(f"/proc/{first}/root"), Path(f"/proc/{second}/root")
        for writable in ("tmp", "var/tmp", "dev/shm"):
            (one / writable / "left-by-first").write_text("x")
            assert not (two / writable / "left-by-first").exists(), writable
        # The shared part is read-only for everyone, root included; so is
        # each one's /dev (rootfs._seal_dev).
        for shared in ("", "usr", "etc", "dev"):
            with pytest.raises(OSError) as excinfo:
                (one / shared / "written-into-the-template").write_text("x")
            assert excinfo.value.errno == errno.EROFS, shared
        # Each has its own /proc, showing its own pid namespace.
        assert os.stat(one / "proc").st_dev != os.stat(two / "proc").st_dev


@requires("root")
def test_host_files_replaced_during_the_session_are_seen_and_stay_masked(
    factory: InitFactory, staging: Path, tmp_path: Path
) -> None:
    """A mount stays on the file or directory it was made on, and one in another
    mount namespace is dropped when the host removes or renames over it. A
    mask in the template would then uncover a replaced secret (a daemon's new
    socket, a new /etc/shadow), and a bind of a replaced directory would show
    the old one: masks are made in each copy, and a template whose bound host
    paths changed is made again."""
    (tmp_path / "project").mkdir()
    data = tmp_path / "data"
    data.mkdir()
    (data / "secret").write_text("old secret")
    (data / "plain").write_text("first")
    base = host_plan(staging, tmp_path / "project")
    extra = (Op("bind", "/data", str(data)), Op("mask_file", "/data/secret"))
    setup = (with_ops(base, *extra), "box", True, True)

    def seen(pid: int) -> tuple[str, str]:
        root = Path(f"/proc/{pid}/root/data")
        return (root / "secret").read_text(), (root / "plain").read_text()

    def fresh() -> tuple[str, str]:
        """What an init made after now sees (AHEAD of them were made already)."""
        for _ in range(AHEAD):
            with init(factory, setup):
                pass
        with init(factory, setup) as pid:
            return seen(pid)

    assert fresh() == ("", "first")
    with init(factory, setup) as running:
        assert seen(running) == ("", "first")
        # The host replaces the secret (write a new file, rename it over the old).
        (data / "secret.new").write_text("new secret")
        os.rename(data / "secret.new", data / "secret")
        # The documented limit (docs/known-limitations.md): a sandbox that
        # exists at that moment loses its mask and shows the new file...
        assert seen(running) == ("new secret", "first")
    # ...and every sandbox made afterwards masks it.
    assert fresh() == ("", "first")
    # The host replaces the whole directory, made aside and swapped in at
    # once: the factory makes inits ahead meanwhile, and one made between a
    # mkdir and the files written would find no secret to mask (and fail).
    newer = tmp_path / "data.new"
    newer.mkdir()
    (newer / "secret").write_text("newer secret")
    (newer / "plain").write_text("second")
    _exchange(newer, data)
    assert fresh() == ("", "second")


def _exchange(one: Path, other: Path) -> None:
    """renameat2(RENAME_EXCHANGE): both paths exist at every instant."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, bytes(one), at_fdcwd, bytes(other), rename_exchange) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@requires("root")
def test_the_run_says_how_many_roots_were_copied(pytester: pytest.Pytester) -> None:
    """-vv ends with how the sandboxes were made, the template included; a
    test granted CAP_SYS_ADMIN gets a root built whole."""
    pytester.makepyfile("""
        import pytest

        def test_a():
            pass

        def test_b():
            pass

        @pytest.mark.isolated(caps_add=["sys_admin"])
        def test_admin():
            pass
    """)
    result = run_isolated(pytester, "-vv")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "isolate: 3 sandboxes, *, 2 roots copied from their spec's template, "
            "0 sandboxes reset and used again"
        ]
    )


@requires("root")
def test_host_mounts_made_during_the_session_are_seen_as_in_a_root_built_whole(
    staging: Path, tmp_path: Path
) -> None:
    """Where the host's mounts are shared (systemd makes them so), a root
    built whole receives the host's mount events beneath what it binds (its
    binds are slaves of the host's mounts); a copy of the template does too,
    and sends none back. Here the bound directory is made a shared mount
    before the factory starts, as it would be under systemd."""
    (tmp_path / "project").mkdir()
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    base = host_plan(staging, tmp_path / "project")
    plan = with_ops(base, Op("bind", "/data", str(data)))
    with shared_mount(data):
        factory = InitFactory()
        factory.start()
        try:
            for template in (False, True):
                with init(factory, (plan, "box", True, template)) as pid:
                    shown = Path(f"/proc/{pid}/root/data/sub/shown")
                    subprocess.run(
                        [
                            "mount",
                            "-t",
                            "tmpfs",
                            "-o",
                            "size=1m",
                            "isolate-test",
                            str(data / "sub"),
                        ],
                        check=True,
                    )
                    try:
                        (data / "sub" / "shown").write_text("mounted later")
                        assert shown.read_text() == "mounted later", template
                    finally:
                        subprocess.run(["umount", str(data / "sub")], check=True)
                    assert not shown.exists(), template
            assert factory.copied == 1
        finally:
            factory.close()
