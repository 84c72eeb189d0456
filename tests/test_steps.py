"""The setup program (steps.py, _steps.c): a plan's root, hostname and
loopback compiled once by pytest's process and run in C by the test process.

Proved against the real kernel: a root built by the program has the mounts,
options, devices and links of one built by rootfs.apply_rootfs (as root and
in a user namespace, as rootless sandboxes are), a failed step is named as
the Python steps name it, and a malformed program is refused whole before
any step runs.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import requires
from initd_util import host_plan, with_ops

from pytest_isolate import sandbox, steps
from pytest_isolate import syscalls as sc
from pytest_isolate.rootfs import Op, RootfsPlan, apply_rootfs
from pytest_isolate.sandbox import SandboxPlan

# These tests make namespaces from the host: never inside a sandbox themselves.
pytestmark = [
    pytest.mark.isolated(False),
    pytest.mark.skipif(sandbox._native_steps is None, reason="pytest_isolate._steps was not built"),
]


def _plan(rootfs: RootfsPlan | None, **kwargs: object) -> SandboxPlan:
    return SandboxPlan(rootfs=rootfs, hostname="steps-box", **kwargs)  # type: ignore[arg-type]


def _view() -> dict[str, object]:
    """What a built sandbox shows: its mounts (mount point, per-mount
    options, file system, source), /dev, its hostname, its loopback."""
    table = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            rest = fields[fields.index("-") + 1 :]
            table.append([fields[4], fields[5], rest[0], rest[1]])
    dev = {
        name: os.readlink(f"/dev/{name}")
        if os.path.islink(f"/dev/{name}")
        else oct(os.lstat(f"/dev/{name}").st_mode)
        for name in sorted(os.listdir("/dev"))
    }
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = struct.pack("16sH22x", b"lo", 0)
        lo_flags = struct.unpack("16sH22x", fcntl.ioctl(sock, 0x8913, ifreq))[1]
    return {
        "mounts": sorted(table),
        "dev": dev,
        "cwd": os.getcwd(),
        "hostname": socket.gethostname(),
        "lo_up": bool(lo_flags & 1),
    }


def _in_child(body: Callable[[], object]) -> object:
    """``body()`` run in a child of pytest (its namespaces its own
    business); its JSON result, or the error it raised as "Type: text"."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read)
            try:
                result = body()
            except BaseException as exc:
                result = f"{type(exc).__name__}: {exc}"
            os.write(write, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 1 << 16):
        chunks.append(chunk)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(b"".join(chunks))


def _in_sandbox(plan: SandboxPlan, native: bool, userns: bool) -> dict[str, object]:
    """Build ``plan``'s root in new namespaces (a user namespace too when
    ``userns``, as a rootless sandbox's), by the program or by the Python
    steps; what the result shows, or the error it raised."""

    def build() -> object:
        if native:
            assert plan.setup_program is not None
            failed = sandbox._native_steps.run(plan.setup_program)  # type: ignore[union-attr]
            if failed is not None:
                raise steps.failure(plan, *failed)[1]
        else:
            if plan.rootfs is not None:
                apply_rootfs(plan.rootfs)
            sc.sethostname(plan.hostname)
            if plan.new_net:
                sc.loopback_up()
        return _view()

    def outer() -> object:
        if userns:
            uid, gid = os.getuid(), os.getgid()
            sc.unshare(sc.CLONE_NEWUSER)
            sandbox._map_ids(uid, gid)
        sc.unshare(sc.CLONE_NEWNS | sc.CLONE_NEWPID | sc.CLONE_NEWUTS | sc.CLONE_NEWNET)
        return _in_child(build)  # pid 1 of the new pid namespace: /proc is its own

    result = _in_child(outer)
    return result if isinstance(result, dict) else {"error": result}


def _both(plan: SandboxPlan, userns: bool) -> tuple[dict[str, object], dict[str, object]]:
    compiled = dataclasses.replace(plan, setup_program=steps.compile_setup(plan))
    assert compiled.setup_program is not None
    return _in_sandbox(compiled, True, userns), _in_sandbox(plan, False, userns)


def _modes() -> list[object]:
    root = requires("root")
    return [
        pytest.param(False, marks=root, id="root"),
        pytest.param(True, marks=requires("userns"), id="user-namespace"),
    ]


@pytest.mark.parametrize("userns", _modes())
@pytest.mark.parametrize("cgroup2", [False, True], ids=["v1", "cgroup2"])
def test_the_program_builds_the_root_the_python_steps_build(
    staging: Path, tmp_path: Path, userns: bool, cgroup2: bool
) -> None:
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    writable = tmp_path / "out"
    writable.mkdir()
    rootfs = host_plan(staging, project)
    rootfs = dataclasses.replace(rootfs, rootless=userns, cgroup2=cgroup2)
    rootfs = with_ops(
        rootfs,
        Op("bind", str(writable), source=str(writable), writable=True),
        Op("bind", "/hostname-view", source="/etc/hostname"),
        Op("mask_file", "/etc/not-there"),
        Op("mask_dir", "/etc/not-there-either"),
    )
    native, python = _both(_plan(rootfs, rootless=userns), userns)
    assert "error" not in python, python
    assert native == python
    assert native["hostname"] == "steps-box" and native["lo_up"]
    mounts = {m[0]: m for m in native["mounts"]}  # type: ignore[attr-defined]
    assert mounts["/usr"][1].startswith("ro")
    assert mounts[str(writable)][1].startswith("rw") and "nosuid" in mounts[str(writable)][1]
    assert mounts["/hostname-view"][1].startswith("ro")


@pytest.mark.parametrize("userns", _modes())
def test_without_a_network_namespace_or_root_the_program_does_what_python_does(
    userns: bool,
) -> None:
    plan = _plan(None, new_net=False, rootless=userns)
    native, python = _both(plan, userns)
    assert native == python
    assert native["hostname"] == "steps-box"


@pytest.mark.parametrize("userns", _modes())
@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(
            lambda tmp: Op("bind", str(tmp / "gone"), source=str(tmp / "gone")), id="missing-source"
        ),
        pytest.param(
            lambda tmp: Op("tmpfs", "/etc/hostname/below", size=4096), id="mkdir-under-a-file"
        ),
        pytest.param(
            lambda tmp: Op("bind", str(tmp / "sub"), source="/etc/hostname"),
            id="mount-a-file-on-a-directory",
        ),
    ],
)
def test_a_failed_step_is_named_as_the_python_steps_name_it(
    staging: Path, tmp_path: Path, userns: bool, extra: object
) -> None:
    (tmp_path / "sub").mkdir()
    rootfs = host_plan(staging, tmp_path)
    rootfs = dataclasses.replace(rootfs, rootless=userns)
    rootfs = with_ops(rootfs, extra(tmp_path))  # type: ignore[operator]
    native, python = _both(_plan(rootfs, rootless=userns), userns)
    assert "error" in python
    assert native == python
    assert native["error"].startswith("SetupStepError: ")  # type: ignore[union-attr]


def test_a_program_runs_its_steps_in_order_and_skips_what_its_checks_say(tmp_path: Path) -> None:
    prog = steps._Program()
    here = str(tmp_path)
    prog.emit(steps._MKDIR, f"{here}/a/b/c", a=0o755)  # parents made
    prog.emit(steps._MKDIR, f"{here}/a", a=0o755)  # there already: fine
    prog.emit(steps._MKFILE, f"{here}/d/e/file")
    prog.emit(steps._IF_LEXISTS, f"{here}/absent", skip=1)
    prog.emit(steps._MKDIR, f"{here}/skipped", a=0o755)
    prog.emit(steps._IF_ISDIR, f"{here}/a", skip=1)
    prog.emit(steps._SYMLINK, "a/b", f"{here}/link")
    prog.emit(steps._JUMP, skip=1)
    prog.emit(steps._MKDIR, f"{here}/jumped", a=0o755)
    prog.emit(steps._CHMOD, f"{here}/a", a=0o700)
    assert sandbox._native_steps.run(prog.blob()) is None  # type: ignore[union-attr]
    assert (tmp_path / "a/b/c").is_dir() and (tmp_path / "d/e/file").is_file()
    assert not (tmp_path / "skipped").exists() and not (tmp_path / "jumped").exists()
    assert os.readlink(tmp_path / "link") == "a/b"
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o700


def test_a_program_stops_at_the_first_failure_with_its_index_and_errno(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    prog = steps._Program()
    prog.emit(steps._MKDIR, f"{tmp_path}/ok", a=0o755)
    prog.emit(steps._MKDIR, f"{tmp_path}/file", a=0o755)  # a file is there
    prog.emit(steps._MKDIR, f"{tmp_path}/never", a=0o755)
    assert sandbox._native_steps.run(prog.blob()) == (1, errno.EEXIST)  # type: ignore[union-attr]
    assert not (tmp_path / "never").exists()
    prog = steps._Program()
    prog.emit(steps._REQUIRE, f"{tmp_path}/absent", onerr=1)  # an error that skips on
    prog.emit(steps._MKDIR, f"{tmp_path}/not-made", a=0o755)
    prog.emit(steps._MKDIR, f"{tmp_path}/made", a=0o755)
    assert sandbox._native_steps.run(prog.blob()) is None  # type: ignore[union-attr]
    assert (tmp_path / "made").is_dir() and not (tmp_path / "not-made").exists()


def test_directories_are_made_with_the_modes_python_gives_them(tmp_path: Path) -> None:
    """rootfs._mkdirs' modes: missing parents as os.makedirs makes them
    (0777 less the umask), the directory itself 0755 less the umask."""
    from pytest_isolate.rootfs import _mkdirs

    old = os.umask(0o002)
    try:
        prog = steps._Program()
        prog.mkdir(f"{tmp_path}/c/parent/leaf")
        assert sandbox._native_steps.run(prog.blob()) is None  # type: ignore[union-attr]
        _mkdirs(f"{tmp_path}/p/parent/leaf")
    finally:
        os.umask(old)
    for path in ("", "/parent", "/parent/leaf"):
        mode = (tmp_path / f"c{path}").stat().st_mode & 0o7777
        assert mode == (tmp_path / f"p{path}").stat().st_mode & 0o7777, path
    assert (tmp_path / "c/parent").stat().st_mode & 0o777 == 0o775


def test_a_long_program_runs_whole_and_counts_skipped_steps(tmp_path: Path) -> None:
    """No limit on a program's length (many binds make a long one); the
    index of a failed step counts the steps skipped before it."""
    prog = steps._Program()
    for n in range(3000):
        prog.emit(steps._MKDIR, f"{tmp_path}/d{n}", a=0o755)
    prog.emit(steps._IF_LEXISTS, f"{tmp_path}/absent", skip=2)
    prog.emit(steps._MKDIR, f"{tmp_path}/skipped-1", a=0o755)
    prog.emit(steps._MKDIR, f"{tmp_path}/skipped-2", a=0o755)
    (tmp_path / "file").write_text("")
    prog.emit(steps._MKDIR, f"{tmp_path}/file", a=0o755)
    assert sandbox._native_steps.run(prog.blob()) == (3003, errno.EEXIST)  # type: ignore[union-attr]
    assert len(list(tmp_path.glob("d*"))) == 3000
    assert not list(tmp_path.glob("skipped-*"))


@pytest.mark.parametrize(
    "program",
    [
        b"\x01",  # a header cut short
        struct.pack("=IiIIQQ", 1, -1, 0, 1, 0, 0)
        + struct.pack("=I", 5)
        + b"ab",  # string cut short
        struct.pack("=IiIIQQ", 1, -1, 0, 1, 0, 0) + struct.pack("=I", 2) + b"abc",  # no NUL
        struct.pack("=IiIIQQ", 1, -1, 0, 1, 0, 0) + struct.pack("=I", 3) + b"a\0b\0",  # NUL inside
        struct.pack("=IiIIQQ", 1, -1, 0, 0, 0, 0),  # mkdir without its path
        struct.pack("=IiIIQQ", 99, -1, 0, 0, 0, 0),  # no such step
    ],
    ids=["header", "string", "no-nul", "nul-inside", "strings", "unknown"],
)
def test_a_malformed_program_is_refused_before_any_step_runs(
    tmp_path: Path, program: bytes
) -> None:
    first = steps._Program()
    first.emit(steps._MKDIR, f"{tmp_path}/first", a=0o755)
    index, code = sandbox._native_steps.run(first.blob() + program)  # type: ignore[union-attr,misc]
    assert (index, code) == (-1, errno.EINVAL)
    assert not (tmp_path / "first").exists()


def test_plans_get_a_program_unless_python_must_build_the_root(
    staging: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rootfs = host_plan(staging, tmp_path)
    assert steps.compile_setup(_plan(rootfs)) is not None
    assert steps.compile_setup(_plan(None)) is not None  # hostname and loopback
    overlay = dataclasses.replace(rootfs, overlay=True)
    image = dataclasses.replace(rootfs, image_root=str(tmp_path))
    assert steps.compile_setup(_plan(overlay)) is None
    assert steps.compile_setup(_plan(image)) is None
    assert steps.compile_setup(_plan(rootfs, namespaces=False)) is None
    assert sandbox.native_steps()
    monkeypatch.setenv("PYTEST_ISOLATE_C_STEPS", "0")
    assert not sandbox.native_steps()


def _status(*fields: str) -> dict[str, str]:
    with open("/proc/self/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f) if k in fields}


_SECURE_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")


def _secured_in_child(plan: SandboxPlan, native: bool) -> dict[str, str]:
    """/proc/self/status of a child of pytest after the capability drop and
    the filter (no root: no Landlock), by the program or by Python."""

    def secure() -> object:
        if native:
            assert plan.secure_program is not None
            failed = sandbox._native_steps.run(plan.secure_program)  # type: ignore[union-attr]
            assert failed is None, failed
        else:
            from pytest_isolate.capabilities import apply_capabilities
            from pytest_isolate.seccomp import load_filter

            assert plan.caps is not None and plan.seccomp_program is not None
            apply_capabilities(plan.caps)
            load_filter(plan.seccomp_program)
        return _status(*_SECURE_FIELDS)

    status = _in_child(secure)
    assert isinstance(status, dict), status
    return status


@requires("root")
def test_the_secure_program_leaves_the_capabilities_and_filter_python_leaves() -> None:
    from pytest_isolate.capabilities import DEFAULT_ROOT_CAPS, resolve_caps
    from pytest_isolate.seccomp import build_filter, seccomp_available

    if seccomp_available():
        pytest.skip(seccomp_available())
    keep = resolve_caps(("CHOWN",), (), rootless=False)
    assert keep < DEFAULT_ROOT_CAPS
    plan = _plan(None, caps=keep, seccomp_program=build_filter(keep))
    assert sandbox.secure_parts(plan) == ["caps", "seccomp"]
    plan = dataclasses.replace(plan, secure_program=steps.compile_secure(plan))
    native, python = _secured_in_child(plan, True), _secured_in_child(plan, False)
    assert native == python
    assert native["NoNewPrivs"] == "1" and native["Seccomp"] == "2"
    assert native["CapEff"] == native["CapPrm"] == native["CapBnd"] != _status("CapEff")["CapEff"]
    assert native["CapInh"] == native["CapAmb"] == "0000000000000000"


@pytest.mark.parametrize("failed", ["(-1, 22)", "(1, 1)"], ids=["malformed", "second-step"])
def test_where_the_secure_program_fails_python_makes_the_rest(
    pytester: pytest.Pytester, failed: str
) -> None:
    """A malformed program (nothing ran) or one whose second step failed
    (Landlock, after the capability drop): Python makes the steps from there
    on, so the test process still ends up with every one of them."""
    pytester.makeconftest(
        f"""
        import pytest_isolate.sandbox as sandbox

        real = sandbox._native_steps

        class Failing:
            @staticmethod
            def run(program):
                head = int.from_bytes(program[:4], "little")
                if head not in (18, 19):  # not the secure program
                    return real.run(program)
                if {failed}[0] == 1:
                    assert real.run(program[:32]) is None  # the capability drop alone
                return {failed}

        sandbox._native_steps = Failing
        """
    )
    pytester.makepyfile(
        """
        def test_secured():
            with open("/proc/self/status") as f:
                status = dict(line.split(":", 1) for line in f)
            assert status["NoNewPrivs"].strip() == "1"
            assert status["Seccomp"].strip() == "2"
            assert status["CapInh"].strip() == status["CapAmb"].strip() == "0" * 16
            try:
                open("/proc/self/fd/0", "w")  # Landlock: nothing outside the root
            except OSError:
                pass
        """
    )
    result = pytester.runpytest_subprocess("--isolate", "-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=1)


def _born_in_child(plan: SandboxPlan, native: bool, again: bool) -> object:
    """In a new user namespace, the first steps of a rootless test process
    born there (ids mapped, a cgroup namespace of its own), by the program or
    by Python; ``again``: a second time, which fails. What it shows, or the
    error."""

    def born() -> object:
        cgroup_ns = os.readlink("/proc/self/ns/cgroup")
        sc.unshare(sc.CLONE_NEWUSER)
        for _ in range(2 if again else 1):
            if native:
                assert plan.born_program is not None
                failed = sandbox._native_steps.run(plan.born_program)  # type: ignore[union-attr]
                if failed is not None:
                    raise steps.failure(plan, *failed, born=True)[1]
            else:
                sandbox._map_ids(plan.uid, plan.gid)
                with sandbox.SetupStepErrorContext("unshare(CLONE_NEWCGROUP)"):
                    sc.unshare(sc.CLONE_NEWCGROUP)
        maps = [
            Path(f"/proc/self/{name}").read_text().split()
            for name in ("uid_map", "gid_map", "setgroups")
        ]
        return [*maps, os.readlink("/proc/self/ns/cgroup") != cgroup_ns, os.getuid(), os.getgid()]

    return _in_child(born)


@requires("userns")
@pytest.mark.parametrize("again", [False, True], ids=["once", "failing"])
def test_the_born_program_maps_the_ids_as_python_does(again: bool) -> None:
    plan = _plan(None, rootless=True)
    plan = dataclasses.replace(plan, born_program=steps.compile_born(plan))
    assert plan.born_program is not None
    native, python = _born_in_child(plan, True, again), _born_in_child(plan, False, again)
    assert native == python
    if again:
        assert native.startswith("SetupStepError: write 'deny' to /proc/self/setgroups")  # type: ignore[union-attr]
    else:
        uid, gid = os.getuid(), os.getgid()
        assert native == [[str(uid)] * 2 + ["1"], [str(gid)] * 2 + ["1"], ["deny"], True, uid, gid]
