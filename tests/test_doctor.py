"""The doctor and the session header, on this host, as an unprivileged user and
in the cgroup-v2 VM.

Each run of the doctor forks its probes for real, so these tests check what a
user sees on each kind of host: as root here (cgroup v1, everything works), as
the unprivileged user ``isotest`` (user namespaces, no cgroup delegation on
v1), and on cgroup v2 (run inside tools/cg2vm by CI, or booted from here when
PYTEST_ISOLATE_VM=1).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import rootless_util
from conftest import requires

import pytest_isolate
from pytest_isolate.__main__ import main
from pytest_isolate.doctor import Check, format_table

#: A virtualenv of Debian's /usr/bin/python3 that an unprivileged user can read
#: (pyenv interpreters live under /root): pytest, filelock and python-prctl.
#: Built when missing (rootless_util.ensure_user_venv), as is the user.
USER_VENV = os.environ.get("PYTEST_ISOLATE_USER_VENV", str(rootless_util.VENV))
TEST_USER = os.environ.get("PYTEST_ISOLATE_TEST_USER", rootless_util.USER)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(pytest_isolate.__file__)))

CORE_ROWS = [
    "pid namespace * yes * defaults *",
    "mount namespace * yes * defaults *",
    "network namespace * yes * defaults *",
    "uts namespace * yes * defaults *",
    "ipc namespace * yes * defaults *",
    "cgroup namespace * yes * defaults *",
    "pivot_root * yes * defaults *",
    "mount_setattr (recursive read-only) * yes *",
]
FILTER_ROWS = [
    "capabilities (python-prctl) * yes * defaults *",
    "seccomp filter (libseccomp) * yes * defaults *keyctl refused with EPERM",
    "Landlock (writes confined) * * kept descriptors read-only *",
    "default sandbox (every layer) * yes * defaults *a test ran inside",
]


def _cg2vm() -> str | None:
    found = os.environ.get("CG2VM") or shutil.which("cg2vm")
    if found:
        return found
    beside = os.path.join(os.path.dirname(REPO), "shared", "tools", "cg2vm")
    return beside if os.access(beside, os.X_OK) else None


# --------------------------------------------------------------------------- as root here


@requires("root")
def test_doctor_as_root_reports_every_default_feature_working(pytester: pytest.Pytester) -> None:
    result = pytester.run(sys.executable, "-m", "pytest_isolate", "doctor")
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "pytest-isolate doctor: root*; Linux *; Python *",
            "Each feature below was tried for real in a throw-away child process.",
            "feature * works * needed by * detail",
            "user namespaces * yes * rootless only *",
            *CORE_ROWS,
            "overlayfs * yes *",
            "open_tree + move_mount * yes * a cheaper root (template) *with its submount",
            "cgroups * yes *cgroup v[12] (memory, pids, cpu)*",
            "cgroup memory controller * yes *",
            "cgroup pids controller * yes *",
            "cgroup cpu controller * yes *",
            "peak memory (memory.*) * yes * MiB measured",
            "swap accounting * *",
            "clone3 CLONE_INTO_CGROUP * *",
            *FILTER_ROWS,
            "--isolate works here with every default layer.",
        ]
    )
    result.stdout.fnmatch_lines(["pid 1 in C (rootless) * n/a * root: pid 1 is the init factory's"])
    result.stdout.fnmatch_lines(["setup steps in C * yes * less CPU a test * by raw system calls"])
    result.stdout.no_fnmatch_line("*fix:*")


@requires("root", "cgroup1")
def test_doctor_on_cgroup_v1_says_clone3_does_not_apply(pytester: pytest.Pytester) -> None:
    result = pytester.run(sys.executable, "-m", "pytest_isolate", "doctor")
    result.stdout.fnmatch_lines(
        [
            "peak memory (memory.max_usage_in_bytes) * yes *",
            "clone3 CLONE_INTO_CGROUP * n/a * cgroup v1: each test is placed by a "
            "cgroup.procs write*",
        ]
    )


@requires("root")
def test_isolate_doctor_option_prints_the_table_and_runs_no_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_would_fail():\n    assert False\n")
    result = pytester.runpytest_subprocess("--isolate-doctor")
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        [
            "pytest-isolate doctor: root*",
            "default sandbox (every layer) * yes *",
            "--isolate works here with every default layer.",
        ]
    )
    result.stdout.no_fnmatch_line("*test_would_fail*")
    result.stdout.no_fnmatch_line("*collected*")


@requires("root")
def test_console_main_runs_the_doctor_and_returns_its_status(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["doctor"]) == 0
    assert "--isolate works here with every default layer." in capsys.readouterr().out


def test_console_main_without_a_command_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "required: COMMAND" in capsys.readouterr().err


@requires("root", "cgroup1")
def test_session_header_names_root_cgroup_v1_controllers_userns_and_seccomp(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile("def test_ok():\n    pass\n")
    result = pytester.runpytest_subprocess("--isolate")
    result.stdout.fnmatch_lines(
        [
            "isolate: root; cgroup v1 (memory, pids, cpu)*; user namespaces available; "
            "seccomp available",
            "*1 passed*",
        ]
    )


def test_session_header_is_left_out_without_isolate_or_verbose(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_ok():\n    pass\n")
    result = pytester.runpytest_subprocess()
    result.stdout.no_fnmatch_line("isolate: *")
    result.stdout.fnmatch_lines(["*1 passed*"])


def test_table_prints_a_fix_only_under_a_feature_that_fails() -> None:
    lines = format_table(
        [
            Check("pid namespace", True, "defaults", "the first child is pid 1"),
            Check(
                "seccomp filter",
                False,
                "defaults",
                "no libseccomp",
                "apt-get install libseccomp2",
                required=True,
            ),
            Check("overlayfs", False, "fs='overlay'", "ENODEV", "modprobe overlay"),
            Check("clone3", None, "v2", "cgroup v1", "never shown"),
        ]
    )
    pytest.LineMatcher(lines).fnmatch_lines(
        [
            "feature * works * needed by * detail",
            "---*",
            "pid namespace * yes * defaults * the first child is pid 1",
            "seccomp filter * NO * defaults * no libseccomp",
            " * fix: apt-get install libseccomp2",
            "overlayfs * no * fs='overlay' * ENODEV",
            " * fix: modprobe overlay",
            "clone3 * n/a * v2 * cgroup v1",
        ]
    )
    assert not any("never shown" in line for line in lines)


# --------------------------------------------------------------------------- unprivileged


@pytest.fixture(scope="module")
def as_user() -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """Run a command as the unprivileged test user with a readable copy of the
    package first on its PYTHONPATH (the repository may sit under /root)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to the unprivileged test user")
    if not shutil.which("runuser"):
        pytest.skip("needs runuser (util-linux)")
    try:
        rootless_util.ensure_user(TEST_USER)
        python = str(rootless_util.ensure_user_venv(Path(USER_VENV)))
    except OSError as exc:  # in the cgroup-v2 VM /opt is the host's, read-only
        pytest.skip(f"no venv at {USER_VENV} and none can be built here: {exc}")
    copy = tempfile.mkdtemp(prefix="pytest-isolate-doctor-user-")
    try:
        os.chmod(copy, 0o755)
        shutil.copytree(
            os.path.dirname(pytest_isolate.__file__),
            os.path.join(copy, "pytest_isolate"),
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        for top, dirs, files in os.walk(copy):
            for name in dirs:
                os.chmod(os.path.join(top, name), 0o755)
            for name in files:
                os.chmod(os.path.join(top, name), 0o644)
        check = subprocess.run(
            ["runuser", "-u", TEST_USER, "--", python, "-c", "import _prctl, filelock, pytest"],
            capture_output=True,
            text=True,
            cwd=copy,
            check=False,
        )
        if check.returncode != 0:
            pytest.skip(
                f"{USER_VENV} lacks a package: {check.stderr.strip().splitlines()[-1]}; "
                f"{USER_VENV}/bin/pip install pytest filelock python-prctl"
            )

        def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
            env = {
                "PATH": "/usr/bin:/bin",
                "HOME": copy,
                "PYTHONPATH": copy,
                "PYTHONDONTWRITEBYTECODE": "1",
                "LANG": "C.UTF-8",
                **(env or {}),
            }
            return subprocess.run(
                [
                    "runuser",
                    "-u",
                    TEST_USER,
                    "--",
                    "env",
                    "-i",
                    *(f"{k}={v}" for k, v in env.items()),
                    python,
                    *args,
                ],
                capture_output=True,
                text=True,
                cwd=copy,
                timeout=120,
                check=False,
            )

        yield run
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def test_doctor_as_unprivileged_user_uses_user_namespaces_for_every_layer(
    as_user: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    result = as_user("-m", "pytest_isolate", "doctor")
    lines = pytest.LineMatcher(result.stdout.splitlines())
    lines.fnmatch_lines(
        [
            "pytest-isolate doctor: rootless (uid *)*",
            "user namespaces * yes * defaults *uid * mapped",
            *(
                row.replace("defaults *", "defaults *(in a user namespace)")
                if "namespace" in row
                else row
                for row in CORE_ROWS
            ),
            "overlayfs in a user namespace * yes *",
            "open_tree + move_mount * n/a * rootless: each sandbox builds its root itself",
            "capabilities (python-prctl) * yes * defaults * dropped to 0 capabilities*",
            *FILTER_ROWS[1:],
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The compiled parts (the C pid 1, the setup steps in C), tried for real
    # where the user's interpreter can load the copy's extensions (built for
    # ours: the same ABI tag); each turned off by its variable.
    for module, row, need, works, variable in (
        (
            "_pid1",
            "pid 1 in C (rootless)",
            "faster rootless sandboxes",
            "a few lines of C*",
            "C_PID1",
        ),
        ("_steps", "setup steps in C", "less CPU a test", "by raw system calls", "C_STEPS"),
    ):
        built = as_user("-c", f"import pytest_isolate.{module}").returncode == 0
        lines.fnmatch_lines(
            [
                f"{row} * yes * {need} * {works}"
                if built
                else f"{row} * no * {need} * was not built*"
            ]
        )
        if built:
            turned_off = as_user(
                "-m", "pytest_isolate", "doctor", env={f"PYTEST_ISOLATE_{variable}": "0"}
            )
            pytest.LineMatcher(turned_off.stdout.splitlines()).fnmatch_lines(
                [f"{row} * no * turned off (PYTEST_ISOLATE_{variable}=0)", "* fix: unset it"]
            )


@requires("cgroup1")
def test_doctor_as_unprivileged_user_on_cgroup_v1_explains_that_limits_need_root(
    as_user: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    result = as_user("-m", "pytest_isolate", "doctor")
    pytest.LineMatcher(result.stdout.splitlines()).fnmatch_lines(
        [
            "cgroups * no * memory=, pids=, cpu= * cgroup v1 memory: cannot create *: "
            "Permission denied (uid *)",
            " * fix: cgroup v1 cannot be delegated to an unprivileged user: run pytest as root, or*"
            "systemd-run --user --scope -p Delegate=yes pytest ...`",
            "cgroup memory controller * no * no usable cgroup",
            " * fix: see the cgroups row",
            "--isolate works here with every default layer; not available here: "
            "memory=, pids=, cpu=, peak memory.",
        ]
    )
    assert result.returncode == 0


@requires("cgroup1")
def test_session_header_as_unprivileged_user_says_rootless_and_why_no_limits(
    as_user: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    test_dir = tempfile.mkdtemp(prefix="pytest-isolate-header-")
    try:
        os.chmod(test_dir, 0o777)
        with open(os.path.join(test_dir, "test_one.py"), "w") as f:
            f.write("def test_ok():\n    pass\n")
        registered = (
            as_user(
                "-c", "import importlib.metadata as m; m.distribution('pytest-isolate-linux')"
            ).returncode
            == 0
        )
        plugin = [] if registered else ["-p", "pytest_isolate.plugin"]
        result = as_user("-m", "pytest", *plugin, "--isolate", "-p", "no:cacheprovider", test_dir)
    finally:
        shutil.rmtree(test_dir, ignore_errors=True)
    pytest.LineMatcher(result.stdout.splitlines()).fnmatch_lines(
        [
            "isolate: rootless (uid *); no cgroups, so no limits (cgroup v1 memory: cannot create "
            "*: Permission denied (uid *)); user namespaces available; seccomp available",
            "*1 passed*",
        ]
    )


# --------------------------------------------------------------------------- cgroup v2


@requires("root", "cgroup2")
def test_doctor_on_cgroup_v2_reports_v2_controllers_and_clone3_into_cgroup(
    pytester: pytest.Pytester,
) -> None:
    """Runs where the host is pure cgroup v2: CI runs it inside tools/cg2vm."""
    result = pytester.run(sys.executable, "-m", "pytest_isolate", "doctor")
    result.stdout.fnmatch_lines(
        [
            "cgroups * yes * cgroup v2 (memory, pids, cpu)*",
            "peak memory (memory.peak) * yes * MiB measured",
            "swap accounting * yes * memory.swap.max present*",
            "clone3 CLONE_INTO_CGROUP * yes * the child is born in its cgroup*",
            "--isolate works here with every default layer.",
        ]
    )
    assert result.ret == 0


@pytest.mark.slow
@requires("root")
@pytest.mark.skipif(
    os.environ.get("PYTEST_ISOLATE_VM") != "1" or _cg2vm() is None,
    reason="boots the cgroup-v2 VM (about a minute): set PYTEST_ISOLATE_VM=1 "
    "where tools/cg2vm is installed",
)
def test_doctor_in_the_cg2vm_vm_reports_cgroup_v2_and_clone3() -> None:
    result = _doctor_in_vm([], [sys.executable])
    pytest.LineMatcher(result.stdout.splitlines()).fnmatch_lines(
        [
            "pytest-isolate doctor: root*",
            "cgroups * yes * cgroup v2 (memory, pids, cpu); below the root cgroup /sys/fs/cgroup",
            "clone3 CLONE_INTO_CGROUP * yes *",
            "default sandbox (every layer) * yes *",
            "--isolate works here with every default layer.",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]


_DOCTOR = ("-m", "pytest_isolate", "doctor")


def _doctor_in_vm(vm_args: list[str], command: list[str]) -> subprocess.CompletedProcess[str]:
    """``python -m pytest_isolate doctor`` in the cgroup-v2 VM; ``command``
    ends with the interpreter (after any environment settings)."""
    vm = _cg2vm()
    assert vm is not None
    return subprocess.run(
        [vm, "--timeout", "600", *vm_args, "--", "env", f"PYTHONPATH={REPO}", *command, *_DOCTOR],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=700,
        check=False,
    )


def _readable_by_others(path: str) -> bool:
    """Can any user reach and read ``path`` (every directory above it o+x)?"""
    parts = os.path.abspath(path).split(os.sep)
    for index in range(2, len(parts) + 1):
        mode = os.stat(os.sep.join(parts[:index]) or os.sep).st_mode
        if not mode & 0o001:
            return False
    return bool(os.stat(path).st_mode & 0o004)


@pytest.mark.slow
@requires("root")
@pytest.mark.skipif(
    os.environ.get("PYTEST_ISOLATE_VM") != "1" or _cg2vm() is None,
    reason="boots the cgroup-v2 VM (about a minute): set PYTEST_ISOLATE_VM=1 "
    "where tools/cg2vm is installed",
)
def test_doctor_in_the_cg2vm_vm_as_a_delegated_user_finds_every_controller() -> None:
    python = os.path.join(USER_VENV, "bin", "python")
    package = os.path.join(REPO, "pytest_isolate")
    if not os.access(python, os.X_OK) or not _readable_by_others(package):
        pytest.skip(f"needs {USER_VENV} and a repository readable by {TEST_USER}")
    result = _doctor_in_vm(
        ["--user", TEST_USER], ["PYTHONDONTWRITEBYTECODE=1", "HOME=/tmp", python]
    )
    pytest.LineMatcher(result.stdout.splitlines()).fnmatch_lines(
        [
            "pytest-isolate doctor: rootless (uid *)*",
            "cgroups * yes * cgroup v2 (memory, pids, cpu); delegated: *",
            "cgroup cpu controller * yes *",
            "clone3 CLONE_INTO_CGROUP * yes *",
            "default sandbox (every layer) * yes *",
            "--isolate works here with every default layer.",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
