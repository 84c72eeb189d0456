"""The capabilities layer against the real kernel.

Each kernel test forks a child, applies the layer there and reports back
through a pipe; the child always leaves with os._exit. As root the child
changes only itself (and a private mount namespace where it mounts). Run as
an unprivileged user, the child first enters a user namespace (the rootless
path), so the same policy acts within that namespace.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import requires

from pytest_isolate import syscalls
from pytest_isolate.capabilities import (
    ALL_CAPS,
    CAP_LAST_CAP,
    DEFAULT_ROOT_CAPS,
    apply_capabilities,
    caps_from_mask,
    caps_to_mask,
    current_caps,
    normalize_cap_names,
    resolve_caps,
)
from pytest_isolate.spec import SpecError

ROOTLESS = os.geteuid() != 0


# ------------------------------------------------------------------ helpers


class ChildError(Exception):
    """The child's body raised; carries its errno when it had one."""

    def __init__(self, message: str, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno


def enter_namespaces(flags: int = 0) -> None:
    """The part of the engine's setup these tests need before the layer runs.

    Rootless, a user namespace comes first, mapping the user's own uid and gid
    as the engine does: its creator holds every capability of that namespace,
    which is what the layer then reduces.
    """
    if ROOTLESS:
        uid, gid = os.geteuid(), os.getegid()
        syscalls.unshare(syscalls.CLONE_NEWUSER | flags)
        # setgroups must be denied before an unprivileged gid_map is accepted.
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    elif flags:
        syscalls.unshare(flags)
    if flags & syscalls.CLONE_NEWNS:
        # Private first, or a mount made in the child would reach the host.
        syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)


def run_in_child(body: Callable[[], object], namespaces: int = 0) -> object:
    """Run ``body`` in a forked child after enter_namespaces; return its JSON result."""
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns when forking a multi-threaded process (xdist's
        # execnet thread); the child only runs `body` and leaves via os._exit.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        result: dict[str, object]
        try:
            os.close(read_fd)
            enter_namespaces(namespaces)
        except OSError as exc:
            result = {"setup": str(exc)}
        else:
            try:
                result = {"ok": body()}
            except BaseException as exc:
                result = {
                    "error": f"{type(exc).__name__}: {exc}",
                    "errno": getattr(exc, "errno", None),
                }
        try:
            os.write(write_fd, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"child ended with status {status:#x}"
    outcome = json.loads(data)
    if "setup" in outcome:
        assert ROOTLESS, f"entering the test's namespaces failed: {outcome['setup']}"
        pytest.skip(f"rootless runs need unprivileged user namespaces: {outcome['setup']}")
    if "error" in outcome:
        raise ChildError(outcome["error"], outcome["errno"])
    return outcome["ok"]


def policy(drop: tuple[str, ...] = (), add: tuple[str, ...] = ()) -> frozenset[str]:
    """The set a test keeps on this host (root or rootless), as the engine resolves it."""
    return resolve_caps(normalize_cap_names(drop), normalize_cap_names(add), rootless=ROOTLESS)


# ------------------------------------------------------------- names, policy


def test_names_in_any_case_with_or_without_prefix_are_normalized() -> None:
    assert normalize_cap_names(["chown", "CAP_NET_RAW", "Cap_Sys_Admin", "all", "CHOWN"]) == (
        "CHOWN",
        "NET_RAW",
        "SYS_ADMIN",
        "ALL",
    )


def test_unknown_name_is_an_error_listing_the_valid_names() -> None:
    with pytest.raises(
        SpecError,
        match=r"unknown capability 'foo'; valid names: chown, "
        r"dac_override, .* or all$",
    ):
        normalize_cap_names(["chown", "foo"])


def test_all_caps_lists_what_the_running_kernel_has() -> None:
    assert int(Path("/proc/sys/kernel/cap_last_cap").read_text()) == CAP_LAST_CAP
    assert len(ALL_CAPS) == CAP_LAST_CAP + 1
    assert ALL_CAPS[:3] == ("CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH")
    assert ALL_CAPS[21] == "SYS_ADMIN"


def test_default_root_set_is_dockers_without_mknod() -> None:
    docker = {
        "CHOWN",
        "DAC_OVERRIDE",
        "FSETID",
        "FOWNER",
        "MKNOD",
        "NET_RAW",
        "SETGID",
        "SETUID",
        "SETFCAP",
        "SETPCAP",
        "NET_BIND_SERVICE",
        "SYS_CHROOT",
        "KILL",
        "AUDIT_WRITE",
    }
    assert docker - DEFAULT_ROOT_CAPS == {"MKNOD"}
    assert DEFAULT_ROOT_CAPS - docker == set()


def test_root_policy_is_default_minus_drop_plus_add() -> None:
    keep = resolve_caps(("CHOWN", "NET_RAW"), ("SYS_ADMIN",), rootless=False)
    assert keep == DEFAULT_ROOT_CAPS - {"CHOWN", "NET_RAW"} | {"SYS_ADMIN"}
    assert resolve_caps(("ALL",), (), rootless=False) == frozenset()


def test_rootless_policy_starts_empty() -> None:
    assert resolve_caps((), (), rootless=True) == frozenset()
    assert resolve_caps(("CHOWN",), ("SYS_ADMIN", "NET_RAW"), rootless=True) == {
        "SYS_ADMIN",
        "NET_RAW",
    }
    assert resolve_caps(("SYS_ADMIN",), ("ALL",), rootless=True) == set(ALL_CAPS) - {"SYS_ADMIN"}


def test_explicit_names_beat_all() -> None:
    assert resolve_caps(("ALL",), ("CHOWN",), rootless=False) == {"CHOWN"}
    assert "SYS_ADMIN" not in resolve_caps(("SYS_ADMIN",), ("ALL",), rootless=False)


def _all_and_held() -> list[list[str]]:
    status = current_caps()
    held = caps_from_mask(status["CapPrm"] & status["CapBnd"]) & set(ALL_CAPS)
    return [sorted(resolve_caps((), ("ALL",), rootless=False)), sorted(held)]


def test_add_all_as_root_keeps_only_what_this_process_holds() -> None:
    # In the child: rootless, only within a user namespace is anything held.
    result = run_in_child(_all_and_held)
    assert isinstance(result, list)
    everything, held = result
    assert everything == held


def test_masks_round_trip() -> None:
    assert caps_to_mask({"CHOWN", "SYS_ADMIN"}) == 1 | 1 << 21
    assert caps_from_mask(caps_to_mask(DEFAULT_ROOT_CAPS)) == DEFAULT_ROOT_CAPS


# ------------------------------------------------------------ kernel: sets


def _apply_and_read(keep: frozenset[str]) -> dict[str, object]:
    apply_capabilities(keep)
    status = Path("/proc/self/status").read_text()
    nnp = next(line.split()[1] for line in status.splitlines() if line.startswith("NoNewPrivs"))
    return {"caps": current_caps(), "no_new_privs": nnp}


@pytest.mark.parametrize(
    ("drop", "add"),
    [
        ((), ()),
        (("chown", "net_raw"), ("sys_admin",)),
        (("all",), ()),
        (("all",), ("net_admin", "sys_ptrace")),
    ],
    ids=["default", "drop-chown-net_raw-add-sys_admin", "drop-all", "only-net_admin-sys_ptrace"],
)
def test_status_sets_match_the_policy_exactly(drop: tuple[str, ...], add: tuple[str, ...]) -> None:
    keep = policy(drop, add)
    result = run_in_child(lambda: _apply_and_read(keep))
    assert isinstance(result, dict)
    caps = result["caps"]
    mask = caps_to_mask(keep)
    assert (caps["CapBnd"], caps["CapPrm"], caps["CapEff"]) == (mask, mask, mask)
    assert (caps["CapInh"], caps["CapAmb"]) == (0, 0)
    assert result["no_new_privs"] == "1"


def _raise_ambient_then_apply() -> dict[str, int]:
    prctl = importlib.import_module("_prctl")  # python-prctl's C part, as the layer uses
    net_admin = ALL_CAPS.index("NET_ADMIN")
    prctl.set_caps([], [], [net_admin], [], [], [])  # inheritable += NET_ADMIN
    syscalls.prctl(47, 2, net_admin)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE
    before = current_caps()
    assert before["CapAmb"] and before["CapInh"], before
    apply_capabilities(policy())
    return current_caps()


def test_ambient_and_inheritable_sets_inherited_from_the_runner_are_cleared() -> None:
    after = run_in_child(_raise_ambient_then_apply)
    assert isinstance(after, dict)
    assert (after["CapAmb"], after["CapInh"]) == (0, 0)


def _status_of_an_exec() -> int:
    apply_capabilities(policy(add=("sys_admin",)))
    out = subprocess.run(
        ["cat", "/proc/self/status"], capture_output=True, text=True, check=True
    ).stdout
    return int(next(line.split()[1] for line in out.splitlines() if line.startswith("CapEff")), 16)


def test_a_program_run_by_the_test_gets_no_more_than_the_policy() -> None:
    effective = run_in_child(_status_of_an_exec)
    if ROOTLESS:
        # The test keeps the user's uid, not 0: the kernel gives a non-root
        # uid's program no capabilities at execve (ambient is empty).
        assert effective == 0
    else:
        # uid 0 regains its bounding set on execve: that is why it must equal the policy.
        assert effective == caps_to_mask(policy(add=("sys_admin",)))


def _keep_a_dropped_cap() -> None:
    apply_capabilities(policy(add=("setpcap",)))
    apply_capabilities(policy(add=("setpcap", "sys_nice")))


def test_keeping_a_capability_the_process_lacks_is_an_error_naming_it() -> None:
    with pytest.raises(
        ChildError,
        match=r"cannot keep sys_nice: the process running the "
        r"test does not hold it",
    ):
        run_in_child(_keep_a_dropped_cap)


def _drop_without_setpcap() -> None:
    apply_capabilities(policy(drop=("all",), add=("chown",)))
    apply_capabilities(frozenset())


def test_dropping_without_setpcap_is_an_error_naming_the_step() -> None:
    with pytest.raises(
        ChildError,
        match=r"dropping CHOWN from the bounding set .*"
        r"CAP_SETPCAP is needed",
    ):
        run_in_child(_drop_without_setpcap)


# ---------------------------------------------------------- kernel: effects


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_text("x")
    return path


def _chown_as(keep: frozenset[str], path: Path) -> None:
    apply_capabilities(keep)
    os.chown(path, 12345, -1)  # another uid: chown to one's own uid needs nothing


@requires("root")  # rootless only one uid is mapped: any other uid gives EINVAL
def test_chown_to_another_uid_fails_with_eperm_without_cap_chown(victim: Path) -> None:
    with pytest.raises(ChildError) as info:
        run_in_child(lambda: _chown_as(policy(drop=("chown",)), victim))
    assert info.value.errno == 1  # EPERM
    assert victim.stat().st_uid == 0


@requires("root")
def test_chown_to_another_uid_works_with_cap_chown(victim: Path) -> None:
    run_in_child(lambda: _chown_as(policy(), victim))
    assert victim.stat().st_uid == 12345


def _open_raw_socket(keep: frozenset[str]) -> None:
    apply_capabilities(keep)
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()


def test_raw_socket_fails_without_net_raw() -> None:
    # Rootless the network namespace is the test's own (owned by its user
    # namespace): NET_RAW there is what decides, not the host's.
    with pytest.raises(ChildError) as info:
        run_in_child(
            lambda: _open_raw_socket(policy(drop=("net_raw",))),
            namespaces=syscalls.CLONE_NEWNET if ROOTLESS else 0,
        )
    assert info.value.errno == 1


def test_raw_socket_works_with_net_raw() -> None:
    run_in_child(
        lambda: _open_raw_socket(policy(add=("net_raw",))),
        namespaces=syscalls.CLONE_NEWNET if ROOTLESS else 0,
    )


def _mount_tmpfs(keep: frozenset[str], target: str) -> bool:
    apply_capabilities(keep)
    syscalls.mount(
        "pytest-isolate-test", target, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "size=1M"
    )
    return os.path.ismount(target)


def test_mount_fails_without_sys_admin(tmp_path: Path) -> None:
    with pytest.raises(ChildError) as info:
        run_in_child(lambda: _mount_tmpfs(policy(), str(tmp_path)), namespaces=syscalls.CLONE_NEWNS)
    assert info.value.errno == 1


def test_mount_works_with_sys_admin_inside_the_childs_mount_namespace(tmp_path: Path) -> None:
    assert (
        run_in_child(
            lambda: _mount_tmpfs(policy(add=("sys_admin",)), str(tmp_path)),
            namespaces=syscalls.CLONE_NEWNS,
        )
        is True
    )
    assert not os.path.ismount(tmp_path), "the mount reached the host"


@pytest.fixture
def setuid_id() -> Iterator[Path]:
    """A setuid-root copy of id(1), in a directory user 65534 can reach."""
    directory = Path(tempfile.mkdtemp(prefix="pytest-isolate-setuid-"))
    try:
        if os.statvfs(directory).f_flag & os.ST_NOSUID:
            pytest.skip(f"{directory} is on a nosuid mount: setuid bits do nothing there")
        directory.chmod(0o755)
        helper = directory / "id"
        shutil.copy("/usr/bin/id", helper)
        helper.chmod(0o4755)
        yield helper
    finally:
        shutil.rmtree(directory)


def _euid_of_setuid_helper(helper: Path, apply: bool) -> str:
    if apply:
        apply_capabilities(policy())
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    return subprocess.run(
        [str(helper), "-u"], capture_output=True, text=True, check=True
    ).stdout.strip()


@requires("root")  # a setuid-root file needs root to create, and a second uid to run it
def test_setuid_root_helper_does_not_raise_euid(setuid_id: Path) -> None:
    # Without the layer the helper does raise euid: the check below means something.
    assert run_in_child(lambda: _euid_of_setuid_helper(setuid_id, apply=False)) == "0"
    assert run_in_child(lambda: _euid_of_setuid_helper(setuid_id, apply=True)) == "65534"
