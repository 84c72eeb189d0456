"""What isolation this host supports, tried for real, with the fix for each gap.

``run_doctor`` (``python -m pytest_isolate doctor``, ``pytest --isolate-doctor``)
tries every kernel feature the sandbox uses in a throw-away child process:
files such as /proc/sys/user/max_user_namespaces say what should work, but a
container's seccomp profile, an AppArmor policy or a missing kernel option
only show when the call is made. Each probe runs in its own forked child, so a
namespace, mount or filter it creates dies with it. ``header_line`` is the
cheap one-line summary for the pytest session header: no forks, cached.

This module never imports pytest.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib
import json
import os
import platform
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from . import syscalls as sc
from .capabilities import apply_capabilities, current_caps, privileged, resolve_caps
from .cgroups import CgroupUnavailable, Limits, open_cgroups, place_current_process
from .cgroups.common import CONTROLLERS
from .cgroups.v2 import FIX_DELEGATE
from .rootfs import plan_rootfs, project_paths
from .sandbox import SandboxPlan, spawn
from .seccomp import build_filter, load_filter, seccomp_available, syscall_number

__all__ = ["Check", "header_line", "run_checks", "run_doctor"]

_PACKAGES_FIX = (
    "apt-get install libcap-dev gcc python3-dev && pip install python-prctl "
    "(python-prctl builds against libcap's headers)"
)
_CONTAINER_FIX = (
    "in Docker or Podman: `docker run --privileged ...`, or at least "
    "`--cap-add SYS_ADMIN --security-opt seccomp=unconfined "
    "--security-opt apparmor=unconfined`"
)


@dataclass(frozen=True)
class Check:
    """One row of the doctor's table."""

    feature: str
    works: bool | None  # None: not applicable here
    needed_by: str  # what uses the feature ("defaults" makes a failure fatal)
    detail: str
    fix: str = ""
    required: bool = False  # the default isolation cannot run without it


# --------------------------------------------------------------------------- probes


def _probe(body: Callable[[], str], timeout: float = 20.0) -> tuple[bool, str, int | None]:
    """Run ``body`` in a forked child; (worked, what it said or why not, errno).

    The child leaves with os._exit: whatever it set up (namespaces, mounts, a
    filter) is gone with it, and no atexit handler of the parent runs twice.
    """
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    with warnings.catch_warnings():
        # Python 3.12+ warns about forking a multi-threaded process; the probe
        # touches no lock another thread could hold.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the probe child
        try:
            os.close(read_fd)
            sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
            try:
                result: dict[str, Any] = {"ok": True, "detail": body(), "errno": None}
            except BaseException as exc:  # every failure is a finding
                result = {
                    "ok": False,
                    "detail": _describe_error(exc),
                    "errno": getattr(exc, "errno", None),
                }
            os.write(write_fd, json.dumps(result).encode()[:60000])
        finally:
            os._exit(0)
    os.close(write_fd)
    data = b""
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([read_fd], [], [], max(left, 0))
            if not ready:
                timed_out = True
                break
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read_fd)
        if timed_out:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    if timed_out:
        return False, f"the probe did not finish within {timeout:g} s", None
    try:
        result = json.loads(data)
        return bool(result["ok"]), str(result["detail"]), result["errno"]
    except (ValueError, KeyError, TypeError):
        if os.WIFSIGNALED(status):
            name = signal.Signals(os.WTERMSIG(status)).name
            return False, f"the probe was killed by {name}", None
        return False, f"the probe ended without a result (wait status {status})", None


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return exc.strerror if name in exc.strerror else f"{exc.strerror} ({name})"
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _enter_user_namespace() -> None:
    """What the rootless sandbox does first: its own user namespace, with the
    user's own ids mapped (the only mapping an unprivileged process may write)."""
    uid, gid = os.getuid(), os.getgid()
    sc.unshare(sc.CLONE_NEWUSER)
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")


def _prepare(rootless: bool, flags: int = 0) -> None:
    if rootless:
        _enter_user_namespace()
    if flags:
        sc.unshare(flags)


def _probe_userns() -> str:
    _enter_user_namespace()
    return f"unshare(CLONE_NEWUSER), uid {os.getuid()} mapped"


def _probe_namespace(flag: int, rootless: bool) -> Callable[[], str]:
    def body() -> str:
        _prepare(rootless, flag)
        if flag == sc.CLONE_NEWPID:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - pid 1 of the new namespace
                os._exit(0 if os.getpid() == 1 else 1)
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                raise RuntimeError("the first child of the new pid namespace is not pid 1")
            return "the first child is pid 1"
        if flag == sc.CLONE_NEWUTS:
            sc.sethostname("doctor")
            return "sethostname works inside"
        return "unshare works"

    return body


def _pivot_root_probe(staging: str, rootless: bool) -> Callable[[], str]:
    def body() -> str:
        _prepare(rootless, sc.CLONE_NEWNS)
        # Slave first, or the tmpfs below would propagate to the host.
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_SLAVE)
        sc.mount("tmpfs", staging, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "size=64k")
        os.chdir(staging)
        sc.pivot_root(".", ".")
        sc.mount(None, ".", None, sc.MS_REC | sc.MS_SLAVE)
        sc.umount2(".", sc.MNT_DETACH)
        os.chdir("/")
        left = os.listdir("/")
        if left:
            raise RuntimeError(f"the old root is still reachable: / holds {left[:5]}")
        return 'pivot_root(".", ".") with the old root detached'

    return body


def _mount_setattr_probe(staging: str, rootless: bool) -> Callable[[], str]:
    def body() -> str:
        _prepare(rootless, sc.CLONE_NEWNS)
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_SLAVE)
        sc.mount("tmpfs", staging, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "size=64k")
        os.mkdir(f"{staging}/sub")
        sc.mount("tmpfs", f"{staging}/sub", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "size=64k")
        if not sc.mount_setattr_rdonly(staging):
            raise OSError(errno.ENOSYS, "mount_setattr is not in this kernel (Linux < 5.12)")
        try:
            os.close(os.open(f"{staging}/sub/x", os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError as exc:
            if exc.errno == errno.EROFS:
                return "a submount became read-only with its parent (AT_RECURSIVE)"
            raise
        raise RuntimeError("a submount stayed writable after mount_setattr(AT_RECURSIVE)")

    return body


def _detached_bind_probe(staging: str, rootless: bool) -> Callable[[], str]:
    """What a template copy needs (rootfs.detach_sources, apply_own): a bind
    taken in one mount namespace, attached in another, submounts included."""

    def body() -> str:
        _prepare(rootless, sc.CLONE_NEWNS)
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_SLAVE)
        sc.mount("tmpfs", staging, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "size=64k")
        for name in ("source", "source/sub", "target"):
            os.mkdir(f"{staging}/{name}")
        sc.mount("tmpfs", f"{staging}/source/sub", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "size=64k")
        with open(f"{staging}/source/sub/shown", "w") as f:
            f.write("x")
        fd = sc.open_tree_clone(f"{staging}/source", recursive=True)
        try:
            sc.unshare(sc.CLONE_NEWNS)
            sc.move_mount_to(fd, f"{staging}/target")
        finally:
            os.close(fd)
        if not os.path.exists(f"{staging}/target/sub/shown"):
            raise RuntimeError("the attached copy lacks its submount")
        return "a bind taken before unshare, attached after it, with its submount"

    return body


def _overlay_probe(staging: str, rootless: bool) -> Callable[[], str]:
    def body() -> str:
        _prepare(rootless, sc.CLONE_NEWNS)
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_SLAVE)
        sc.mount("tmpfs", staging, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "size=1m")
        for name in ("lower", "upper", "work", "merged"):
            os.mkdir(f"{staging}/{name}")
        with open(f"{staging}/lower/file", "w") as f:
            f.write("lower")
        options = f"lowerdir={staging}/lower,upperdir={staging}/upper,workdir={staging}/work"
        if rootless:
            options += ",userxattr"  # as rootfs.py mounts it in a user namespace
        sc.mount("overlay", f"{staging}/merged", "overlay", sc.MS_NOSUID | sc.MS_NODEV, options)
        with open(f"{staging}/merged/file", "a") as f:
            f.write("+upper")
        with open(f"{staging}/lower/file") as f:
            if f.read() != "lower":
                raise RuntimeError("a write through the overlay reached its lower layer")
        return "writes land in the upper layer" + (" (user namespace)" if rootless else "")

    return body


def _caps_probe(rootless: bool) -> Callable[[], str]:
    def body() -> str:
        _prepare(rootless)
        keep = resolve_caps((), (), rootless=rootless)
        apply_capabilities(keep)
        effective = current_caps()["CapEff"]
        return f"dropped to {len(keep)} capabilities (CapEff={effective:016x}), no_new_privs set"

    return body


def _landlock_probe(staging: str) -> Callable[[], str]:
    def body() -> str:
        inside = os.path.join(staging, "landlock-inside")
        outside = staging + "-landlock-outside"
        try:
            sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
            if not sc.landlock_writes_beneath(staging):
                raise OSError(errno.EOPNOTSUPP, "Landlock is not enabled in this kernel")
            os.close(os.open(inside, os.O_WRONLY | os.O_CREAT, 0o600))
            try:
                os.close(os.open(outside, os.O_WRONLY | os.O_CREAT, 0o600))
            except PermissionError:
                return "writes confined beneath one directory (a write outside was refused)"
            raise RuntimeError("a write outside the allowed directory was not refused")
        finally:
            with contextlib.suppress(OSError):
                os.unlink(outside)

    return body


def _seccomp_probe(program: bytes) -> Callable[[], str]:
    def body() -> str:
        sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
        load_filter(program)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        # keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0): the filter
        # must answer EPERM whatever the keyring would have said.
        rc = libc.syscall(
            ctypes.c_long(syscall_number("keyctl")),
            ctypes.c_long(0),
            ctypes.c_long(-3),
            ctypes.c_long(0),
        )
        err = ctypes.get_errno()
        if rc != -1 or err != errno.EPERM:
            raise RuntimeError(
                f"keyctl was not refused by the loaded filter (rc={rc}, "
                f"errno={errno.errorcode.get(err, err)})"
            )
        return f"{len(program) // 8} BPF instructions loaded; keyctl refused with EPERM"

    return body


# --------------------------------------------------------------------------- clone3


def _clone3_probe(directory: str, cgpath: str) -> Callable[[], str]:
    def body() -> str:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # The engine's own call (a child of ours: not the zygote's sibling).
        pid = sc.fork_sibling(fd, sibling=False)
        if pid == 0:  # pragma: no cover - the child born in the cgroup
            with open("/proc/self/cgroup") as f:
                inside = f"0::{cgpath}\n" in f.read()
            os._exit(0 if inside else 1)
        os.close(fd)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"the child was not born in {cgpath}")
        return "the child is born in its cgroup: no cgroup.procs write per test"

    return body


# --------------------------------------------------------------------------- fixes


def _sysctl(name: str) -> str | None:
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return f.read().strip()
    except OSError:
        return None


@cache
def in_container() -> bool:
    """A best guess, used only to choose which fix to print."""
    if os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv"):
        return True
    if os.environ.get("container"):  # noqa: SIM112 - systemd and podman set it lower case
        return True
    try:
        with open("/proc/1/cgroup") as f:
            text = f.read()
    except OSError:
        return False
    return any(word in text for word in ("docker", "kubepods", "containerd", "lxc", "libpod"))


def userns_fix() -> str:
    """The command that enables unprivileged user namespaces on this host."""
    fixes = []
    if _sysctl("kernel.unprivileged_userns_clone") == "0":
        fixes.append(
            "sysctl -w kernel.unprivileged_userns_clone=1 (Debian/Ubuntu kernels; "
            "persist it in /etc/sysctl.d/)"
        )
    if _sysctl("user.max_user_namespaces") == "0":
        fixes.append("sysctl -w user.max_user_namespaces=15000")
    if _sysctl("kernel.apparmor_restrict_unprivileged_userns") == "1":
        fixes.append(
            "Ubuntu 23.10+/24.04: sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"
            " (or an AppArmor profile granting `userns,` to this Python)"
        )
    if in_container():
        fixes.append(_CONTAINER_FIX + " (the default seccomp profile refuses unshare)")
    if not fixes:
        fixes.append(
            "run as root with CAP_SYS_ADMIN, or allow unprivileged user namespaces "
            "(sysctl user.max_user_namespaces > 0)"
        )
    return "; ".join(fixes)


def _namespace_fix(kernel_option: str, err: int | None, rootless: bool) -> str:
    if err == errno.EINVAL:
        return f"a kernel built with {kernel_option}=y"
    if rootless:
        return userns_fix()
    if in_container():
        return _CONTAINER_FIX
    return f"run as root on a kernel with {kernel_option}=y (the call failed with errno {err})"


def _mount_fix(err: int | None, rootless: bool) -> str:
    if rootless and err in (errno.EPERM, errno.EACCES):
        return userns_fix()
    if in_container():
        return _CONTAINER_FIX
    if err == errno.EINVAL:
        return (
            "pivot_root cannot leave an initramfs root: run from a real root file system "
            "(or `switch_root` first)"
        )
    return "run as root (CAP_SYS_ADMIN) outside a restricted container"


# --------------------------------------------------------------------------- the checks


def run_checks() -> list[Check]:
    """Try every feature here; one Check per row of the doctor's table."""
    rootless = not privileged()
    checks: list[Check] = []
    staging = tempfile.mkdtemp(prefix="pytest-isolate-doctor-")
    try:
        checks.extend(_namespace_checks(staging, rootless))
        checks.extend(_cgroup_checks(rootless))
        checks.extend(_filter_checks(rootless))
        checks.append(_landlock_check(staging))
        checks.append(_c_pid1_check(rootless))
        checks.append(_c_steps_check(staging))
        checks.append(_sandbox_check(staging, rootless))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return checks


def _namespace_checks(staging: str, rootless: bool) -> list[Check]:
    checks = []
    ok, detail, err = _probe(_probe_userns)
    checks.append(
        Check(
            "user namespaces",
            ok,
            "defaults" if rootless else "rootless only",
            detail,
            "" if ok else userns_fix(),
            required=rootless,
        )
    )
    if rootless and not ok:
        return checks  # every other probe would fail the same way
    where = " (in a user namespace)" if rootless else ""
    for name, flag, option in (
        ("pid namespace", sc.CLONE_NEWPID, "CONFIG_PID_NS"),
        ("mount namespace", sc.CLONE_NEWNS, "CONFIG_NAMESPACES"),
        ("network namespace", sc.CLONE_NEWNET, "CONFIG_NET_NS"),
        ("uts namespace", sc.CLONE_NEWUTS, "CONFIG_UTS_NS"),
        ("ipc namespace", sc.CLONE_NEWIPC, "CONFIG_IPC_NS"),
        ("cgroup namespace", sc.CLONE_NEWCGROUP, "CONFIG_CGROUPS"),
    ):
        ok, detail, err = _probe(_probe_namespace(flag, rootless))
        checks.append(
            Check(
                name,
                ok,
                "defaults",
                detail + ("" if not ok else where),
                "" if ok else _namespace_fix(option, err, rootless),
                required=True,
            )
        )
    for name, probe, needed, required in (
        ("pivot_root", _pivot_root_probe, "defaults", True),
        (
            "mount_setattr (recursive read-only)",
            _mount_setattr_probe,
            "a faster read-only root",
            False,
        ),
        (
            "overlayfs" + (" in a user namespace" if rootless else ""),
            _overlay_probe,
            "fs='overlay', rootfs= images",
            False,
        ),
        ("open_tree + move_mount", _detached_bind_probe, "a cheaper root (template)", False),
    ):
        if probe is _detached_bind_probe and rootless:
            checks.append(
                Check(
                    "open_tree + move_mount",
                    None,
                    "a cheaper root (template)",
                    "rootless: each sandbox builds its root itself",
                )
            )
            continue
        ok, detail, err = _probe(probe(staging, rootless))
        fix = ""
        if not ok and probe is _mount_setattr_probe:
            fix = "Linux 5.12+ (without it the sandbox remounts each submount read-only)"
        elif not ok and probe is _detached_bind_probe:
            fix = "Linux 5.2+ (without it each root is built whole: same isolation, more CPU)"
        elif not ok and probe is _overlay_probe:
            fix = (
                "modprobe overlay"
                if err == errno.ENODEV
                else "Linux 5.11+ for overlayfs in a user namespace"
                if rootless
                else _mount_fix(err, rootless)
            )
        elif not ok:
            fix = _mount_fix(err, rootless)
        checks.append(Check(name, ok, needed, detail, fix, required=required))
    return checks


def _cgroup_checks(rootless: bool) -> list[Check]:
    needed = {"memory": "memory=, peak memory", "pids": "pids=", "cpu": "cpu="}
    try:
        manager = open_cgroups(owner_tag="doctor")
    except CgroupUnavailable as exc:
        checks = [Check("cgroups", False, "memory=, pids=, cpu=", exc.missing, exc.fix)]
        checks.extend(
            Check(
                f"cgroup {c} controller",
                False,
                needed[c],
                "no usable cgroup",
                "see the cgroups row",
            )
            for c in CONTROLLERS
        )
        return checks
    checks = []
    try:
        checks.append(Check("cgroups", True, "memory=, pids=, cpu=", manager.describe()))
        peak_check = swap_check = None
        for controller in CONTROLLERS:
            if controller not in manager.controllers:
                problem = manager.unavailable.get(controller)
                checks.append(
                    Check(
                        f"cgroup {controller} controller",
                        False,
                        needed[controller],
                        problem.missing if problem else "not usable",
                        problem.fix if problem else "see the cgroups row",
                    )
                )
                continue
            limits = {
                "memory": Limits(memory=64 << 20),
                "pids": Limits(pids=64),
                "cpu": Limits(cpu=0.5),
            }[controller]
            ok, detail, err = False, "", None
            try:
                cgroup = manager.create(limits)
            except (OSError, CgroupUnavailable) as exc:
                detail = _describe_error(exc)
            else:
                try:
                    ok, detail, err = _probe(
                        _place_probe(cgroup.procs_files, controller, place_current_process)
                    )
                    if ok and controller == "memory":
                        # Read while the cgroup exists: its files are the evidence.
                        peak_check = _peak_check(cgroup.stats().peak_memory, manager.version)
                        swap_check = _swap_check(
                            os.path.dirname(cgroup.procs_files[0]), manager.version
                        )
                finally:
                    cgroup.remove()
            checks.append(
                Check(
                    f"cgroup {controller} controller",
                    ok,
                    needed[controller],
                    detail,
                    "" if ok else _cgroup_fix(rootless, err),
                )
            )
        if peak_check and swap_check:
            checks.extend((peak_check, swap_check))
        checks.append(_clone3_check(manager, rootless))
    finally:
        manager.close()
    return checks


def _place_probe(
    procs_files: tuple[str, ...], controller: str, place: Callable[[tuple[str, ...]], None]
) -> Callable[[], str]:
    def body() -> str:
        place(procs_files)
        if controller == "memory":
            ballast = bytearray(8 << 20)  # touched: charged to the test's cgroup
            del ballast
        return f"{controller} limit written, a child placed in the test cgroup"

    return body


def _cgroup_fix(rootless: bool, err: int | None) -> str:
    if rootless or err in (errno.EPERM, errno.EACCES):
        return FIX_DELEGATE
    return "check that the cgroup file system is writable (see the cgroups row)"


def _peak_check(peak: int | None, version: int) -> Check:
    name = (
        "peak memory (memory.peak)" if version == 2 else "peak memory (memory.max_usage_in_bytes)"
    )
    if peak:
        return Check(name, True, "peak memory", f"{peak / 2**20:.1f} MiB measured")
    return Check(
        name,
        False,
        "peak memory",
        "the kernel keeps no peak counter",
        "Linux 5.19+ for memory.peak (limits work without it)",
    )


def _swap_check(directory: str, version: int) -> Check:
    control = "memory.swap.max" if version == 2 else "memory.memsw.limit_in_bytes"
    with open("/proc/swaps") as f:
        swap_on = len(f.read().splitlines()) > 1
    if os.path.exists(f"{directory}/{control}"):
        return Check(
            "swap accounting",
            True,
            "memory= without swap",
            f"{control} present" + ("" if swap_on else " (no swap configured)"),
        )
    if not swap_on:
        return Check(
            "swap accounting",
            None,
            "memory= without swap",
            f"no {control}, but no swap is configured: limits hold",
        )
    return Check(
        "swap accounting",
        False,
        "memory= without swap",
        f"no {control}: a test over its limit swaps instead of being killed",
        "boot with swapaccount=1 (kernel command line) or turn swap off",
    )


def _clone3_check(manager: Any, rootless: bool) -> Check:
    name = "clone3 CLONE_INTO_CGROUP"
    need = "cheaper placement (v2)"
    if manager.version != 2:
        return Check(
            name,
            None,
            need,
            "cgroup v1: each test is placed by a cgroup.procs "
            "write (10-15 ms when tests are 15 ms or more apart, see "
            "docs/performance.md)",
        )
    cgroup = manager.create(Limits())
    try:
        cgpath = manager.hierarchy.cgpath_of(cgroup.clone_into)
        ok, detail, err = _probe(_clone3_probe(cgroup.clone_into, cgpath))
    finally:
        cgroup.remove()
    if not ok:
        detail += (
            "; each test process then moves itself by a cgroup.procs write "
            "(10-24 ms when tests are apart, see docs/performance.md)"
        )
    fix = (
        ""
        if ok
        else (
            "Linux 5.7+"
            if err == errno.ENOSYS
            else _CONTAINER_FIX + " (Docker's seccomp profile answers ENOSYS)"
            if in_container()
            else ""
        )
    )
    return Check(name, ok, need, detail, fix)


def _filter_checks(rootless: bool) -> list[Check]:
    checks = []
    try:
        # python-prctl's C extension, which capabilities.py loads on first use.
        importlib.import_module("_prctl")
    except ImportError as exc:
        checks.append(
            Check(
                "capabilities (python-prctl)",
                False,
                "defaults",
                str(exc),
                _PACKAGES_FIX,
                required=True,
            )
        )
        granted: frozenset[str] = frozenset()
    else:
        ok, detail, err = _probe(_caps_probe(rootless))
        checks.append(
            Check(
                "capabilities (python-prctl)",
                ok,
                "defaults",
                detail,
                "" if ok else (_CONTAINER_FIX if in_container() else _PACKAGES_FIX),
                required=True,
            )
        )
        granted = resolve_caps((), (), rootless=rootless)
    reason = seccomp_available()
    if reason is not None:
        checks.append(
            Check(
                "seccomp filter (libseccomp)",
                False,
                "defaults",
                reason,
                "apt-get install libseccomp2 (2.5+), or run with --isolate-seccomp=false",
                required=True,
            )
        )
        return checks
    try:
        program = build_filter(granted)
    except OSError as exc:
        checks.append(
            Check(
                "seccomp filter (libseccomp)",
                False,
                "defaults",
                _describe_error(exc),
                "apt-get install libseccomp2 (2.5+)",
                required=True,
            )
        )
        return checks
    ok, detail, err = _probe(_seccomp_probe(program))
    fix = (
        ""
        if ok
        else ("a kernel with CONFIG_SECCOMP_FILTER=y" if err == errno.EINVAL else _CONTAINER_FIX)
    )
    checks.append(Check("seccomp filter (libseccomp)", ok, "defaults", detail, fix, required=True))
    return checks


def _landlock_check(staging: str) -> Check:
    ok, detail, _ = _probe(_landlock_probe(staging))
    fix = (
        ""
        if ok
        else (
            "Linux 5.13+ with Landlock among the active security modules "
            "(CONFIG_SECURITY_LANDLOCK=y; boot with lsm=landlock,... if "
            "/sys/kernel/security/lsm does not list it)"
        )
    )
    return Check("Landlock (writes confined)", ok, "kept descriptors read-only", detail, fix)


_C_PID1 = "pid 1 in C (rootless)"
_C_PID1_NEED = "faster rootless sandboxes"


def _c_pid1_check(rootless: bool) -> Check:
    """Rootless, whether a zygote's sandboxes get the C pid 1 (_pid1.c)."""
    from . import sandbox

    if not rootless:
        return Check(_C_PID1, None, _C_PID1_NEED, "root: pid 1 is the init factory's")
    if sandbox._native_pid1 is None:
        return Check(
            _C_PID1,
            False,
            _C_PID1_NEED,
            "pytest_isolate._pid1 was not built when the package was installed; "
            "pid 1 is then a copy of pytest's process (same isolation, about 0.8 ms "
            "more a test)",
            "install a C compiler and Python's headers (Debian: apt-get install gcc "
            "python3-dev), then reinstall pytest-isolate-linux",
        )
    if not sandbox._native_pid1.available() or sc.sibling_fork_unavailable() is not None:
        return Check(
            _C_PID1,
            None,
            _C_PID1_NEED,
            "x86_64 with glibc only: pid 1 is a copy of pytest's process here",
        )
    if os.environ.get("PYTEST_ISOLATE_C_PID1", "1") == "0":
        return Check(
            _C_PID1, False, _C_PID1_NEED, "turned off (PYTEST_ISOLATE_C_PID1=0)", "unset it"
        )
    ok, detail, err = _probe(_c_pid1_probe)
    fix = ""
    if not ok:
        fix = (
            _CONTAINER_FIX + " (Docker's seccomp profile answers ENOSYS for clone3)"
            if err == errno.ENOSYS and in_container()
            else "Linux 5.3+ (clone3)"
            if err == errno.ENOSYS
            else "report it with this output; pid 1 is a copy of pytest's process meanwhile"
        )
    return Check(_C_PID1, ok, _C_PID1_NEED, detail, fix)


def _c_pid1_probe() -> str:  # pragma: no cover - probe child
    """The engine's call, in new user and pid namespaces: the child must be
    pid 2 under the C pid 1, which reports its exit status in a frame."""
    from .protocol import FrameReader
    from .sandbox import native_spawn

    frames = os.memfd_create("isolate-doctor", os.MFD_CLOEXEC)
    pid = native_spawn(sc.CLONE_NEWUSER | sc.CLONE_NEWPID, sibling=False, result_fd=frames)
    if pid == 0:
        os._exit(7 if (os.getpid(), os.getppid()) == (2, 1) else 3)
    _, status = os.waitpid(pid, 0)
    messages = FrameReader().feed(os.pread(frames, 4096, 0))
    exits = [m.payload["status"] for m in messages if m.type == "exit"]
    if os.waitstatus_to_exitcode(status) != 0 or exits != [7 << 8]:
        raise RuntimeError(f"pid 1 ended with {status}, the test process's frames: {exits}")
    return "the test process's pid 1 is a few lines of C, not a copy of pytest's process"


_C_STEPS = "setup steps in C"
_C_STEPS_NEED = "less CPU a test"


def _c_steps_check(staging: str) -> Check:
    """Whether test processes run their setup as programs in C (_steps.c)."""
    from . import sandbox

    if sandbox._native_steps is None:
        return Check(
            _C_STEPS,
            False,
            _C_STEPS_NEED,
            "pytest_isolate._steps was not built when the package was installed; the "
            "test processes make their root, capability drop and filter in Python "
            "(same isolation, about 1.4 ms more CPU a test rootless)",
            "install a C compiler and Python's headers (Debian: apt-get install gcc "
            "python3-dev), then reinstall pytest-isolate-linux",
        )
    if not sandbox.native_steps():
        return Check(
            _C_STEPS, False, _C_STEPS_NEED, "turned off (PYTEST_ISOLATE_C_STEPS=0)", "unset it"
        )
    ok, detail, _ = _probe(lambda: _c_steps_probe(staging))
    fix = "" if ok else "report it with this output; the steps run in Python meanwhile"
    return Check(_C_STEPS, ok, _C_STEPS_NEED, detail, fix)


def _c_steps_probe(staging: str) -> str:  # pragma: no cover - probe child
    """A program of the engine's kind run for real: a directory made, a check
    that skips, a link."""
    from . import sandbox, steps

    base = os.path.join(staging, "steps")
    prog = steps._Program()
    prog.emit(steps._MKDIR, base + "/a/b", a=0o755)
    prog.emit(steps._IF_LEXISTS, base + "/absent", skip=1)
    prog.emit(steps._MKDIR, base + "/skipped", a=0o755)
    prog.emit(steps._SYMLINK, "a/b", base + "/link")
    assert sandbox._native_steps is not None
    failed = sandbox._native_steps.run(prog.blob())
    if (
        failed is not None
        or os.path.lexists(base + "/skipped")
        or not os.path.isdir(base + "/link")
    ):
        raise RuntimeError(f"the program did not do its steps (it returned {failed})")
    return "test processes make their root, capability drop and filter by raw system calls"


def _sandbox_check(staging: str, rootless: bool) -> Check:
    """The real thing: spawn a sandbox with the default plan and run code in it."""
    ok, detail, _ = _probe(lambda: _default_sandbox(staging, rootless), timeout=60)
    fix = ""
    if not ok:
        fix = (
            "the rows above name the missing feature; docs/troubleshooting.md lists each "
            "setup step's errors"
        )
    return Check("default sandbox (every layer)", ok, "defaults", detail, fix, required=True)


def _default_sandbox(staging: str, rootless: bool) -> str:  # pragma: no cover - probe child
    root = os.path.join(staging, "root")
    os.makedirs(root, exist_ok=True)
    caps = resolve_caps((), (), rootless=rootless)
    rootfs = plan_rootfs(
        staging=root,
        cwd=os.getcwd(),
        home=os.environ.get("HOME"),
        project=project_paths([os.getcwd()]),
        binds=(),
        writable_paths=(),
        tmpfs_size=64 << 20,
        rootless=rootless,
        cgroup2=os.path.exists("/sys/fs/cgroup/cgroup.controllers"),
    )
    program = build_filter(caps) if seccomp_available() is None else None
    plan = SandboxPlan(
        namespaces=True,
        rootless=rootless,
        hostname="isolated",
        rootfs=rootfs,
        caps=caps,
        seccomp_program=program,
    )
    sandbox = spawn(plan, cgroup_procs=(), run_test=_inside_sandbox, foreign_fds=set)
    try:
        sandbox.go()
        outcome = sandbox.collect(30.0)
    finally:
        sandbox.close()
    for message in outcome.messages:
        if message.type == "setup_failed" and isinstance(message.payload, dict):
            error = str(message.payload.get("error", "?")).strip().splitlines()[-1]
            raise RuntimeError(f"setup failed at step '{message.payload.get('step')}': {error}")
    if not any(message.type == "done" for message in outcome.messages):
        raise RuntimeError(
            f"the sandbox ended without running its test (wait status "
            f"{outcome.wait_status}, test status {outcome.test_status})"
        )
    return (
        "namespaces, read-only root, hostname, capabilities"
        + (", seccomp" if program else "")
        + ": a test ran inside"
    )


def _inside_sandbox(ctx: Any) -> Callable[[], None]:  # pragma: no cover - in the sandbox
    return _check_inside


def _check_inside() -> None:  # pragma: no cover - runs in the sandbox, after "go"
    if socket.gethostname() != "isolated":
        raise RuntimeError(f"hostname is {socket.gethostname()!r}, not 'isolated'")
    try:
        os.close(os.open("/usr/.pytest-isolate-doctor", os.O_WRONLY | os.O_CREAT, 0o600))
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES):
            raise
    else:
        raise RuntimeError("/usr is writable inside the sandbox")


# --------------------------------------------------------------------------- output


def format_table(checks: list[Check]) -> list[str]:
    rows = [("feature", "works", "needed by", "detail")]
    for check in checks:
        works = (
            "n/a"
            if check.works is None
            else "yes"
            if check.works
            else "NO"
            if check.required
            else "no"
        )
        rows.append((check.feature, works, check.needed_by, check.detail))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for index, row in enumerate(rows):
        lines.append(
            "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3]
        )
        if index == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
        elif checks[index - 1].fix and checks[index - 1].works is False:
            lines.append(f"{'':{widths[0]}}  fix: {checks[index - 1].fix}")
    return lines


def _who() -> str:
    """Root, or rootless and as whom: how the sandboxes are made here."""
    uid = os.geteuid()
    if privileged():
        return "root"
    if uid == 0:
        return "rootless (uid 0 without CAP_SYS_ADMIN)"
    return f"rootless (uid {uid})"


def _host_line() -> str:
    who = _who()
    where = ", in a container" if in_container() else ""
    return (
        f"pytest-isolate doctor: {who}{where}; Linux {platform.release()} "
        f"{platform.machine()}; Python {platform.python_version()} ({sys.executable})"
    )


def run_doctor(write: Callable[[str], None]) -> int:
    """Print the table; 0 if everything the default isolation needs works here."""
    write(_host_line())
    write("Each feature below was tried for real in a throw-away child process.")
    write("")
    checks = run_checks()
    for line in format_table(checks):
        write(line)
    write("")
    fatal = [c.feature for c in checks if c.required and c.works is False]
    optional = [
        use
        for c in checks
        if not c.required and c.works is False
        for use in c.needed_by.split(", ")
    ]
    if fatal:
        write(
            f"--isolate cannot run with its defaults here: {', '.join(fatal)} "
            f"({len(fatal)} missing). Apply the fixes above, then run the doctor again."
        )
        return 1
    text = "--isolate works here with every default layer"
    if optional:
        text += f"; not available here: {', '.join(dict.fromkeys(optional))}"
    write(text + ".")
    return 0


# --------------------------------------------------------------------------- header


@cache
def _userns_summary() -> str:
    # From sysctls only: the header must not fork. The doctor tries it for real.
    if _sysctl("user.max_user_namespaces") == "0":
        return "user namespaces disabled"
    if os.geteuid() != 0 and (
        _sysctl("kernel.unprivileged_userns_clone") == "0"
        or _sysctl("kernel.apparmor_restrict_unprivileged_userns") == "1"
    ):
        return "unprivileged user namespaces restricted"
    return "user namespaces available"


@cache
def _seccomp_summary() -> str:
    reason = seccomp_available()
    return (
        "seccomp available"
        if reason is None
        else "seccomp unavailable (" + reason.split(";")[0] + ")"
    )


def header_line(engine: Any) -> str:
    """One line for pytest's session header: what isolation is in force here.

    Cheap: the cgroup manager is the engine's own (opened once per session),
    the rest comes from files and is cached; nothing forks.
    """
    who = _who()
    manager = engine.cgroups()
    if manager is not None:
        cgroups = manager.describe()
    else:
        reason = str(getattr(engine, "_cgroup_error", None) or "unknown reason").splitlines()[0]
        cgroups = f"no cgroups, so no limits ({reason})"
    return f"isolate: {who}; {cgroups}; {_userns_summary()}; {_seccomp_summary()}"
