"""The syscall filter against the real kernel.

Each environment (capabilities plus filter) is set up once in a forked child;
every probe then runs in its own grandchild, so one probe's side effect (a
new namespace, a changed personality) cannot change the next one's result.
Probe arguments are chosen to be harmless if a call did reach the kernel
(missing paths, bad descriptors, wrong magic numbers): the unfiltered
baseline runs them too, as root, to prove that the EPERM comes from the
filter and not from the kernel.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import platform
import random
import re
import signal
import subprocess
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_isolate import syscalls
from pytest_isolate.capabilities import apply_capabilities, normalize_cap_names, resolve_caps
from pytest_isolate.seccomp import (
    _CMP_GT,
    _CMP_MASKED_EQ,
    DEFAULT_RULES,
    _any_value_except,
    build_filter,
    load_filter,
    seccomp_available,
    syscall_number,
)

ROOTLESS = os.geteuid() != 0
X86_64 = platform.machine() == "x86_64"

pytestmark = pytest.mark.skipif(
    seccomp_available() is not None, reason=f"seccomp unavailable: {seccomp_available()}"
)

# ------------------------------------------------------------------ helpers


class ChildError(Exception):
    def __init__(self, message: str, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno


def enter_namespaces(flags: int = 0) -> None:
    """Rootless, become uid 0 of a new user namespace first (see test_capabilities)."""
    if ROOTLESS:
        uid, gid = os.geteuid(), os.getegid()
        syscalls.unshare(syscalls.CLONE_NEWUSER | flags)
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    elif flags:
        syscalls.unshare(flags)
    if flags & syscalls.CLONE_NEWNS:
        syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)


def run_in_child(body: Callable[[], object], namespaces: int = 0, *, enter: bool = True) -> object:
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with xdist's thread
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        result: dict[str, object]
        try:
            os.close(read_fd)
            if enter:
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
    return resolve_caps(normalize_cap_names(drop), normalize_cap_names(add), rootless=ROOTLESS)


def held_caps() -> frozenset[str]:
    """Every capability this process holds (rootless: within its user namespace)."""
    return resolve_caps((), ("ALL",), rootless=False)


# -------------------------------------------------------------------- probes

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
NOWHERE = b"/nonexistent-pytest-isolate"
SIGCHLD = int(signal.SIGCHLD)
_NAMESPACE_FLAGS = {
    "CLONE_NEWNS": 0x20000,
    "CLONE_NEWCGROUP": 0x2000000,
    "CLONE_NEWUTS": 0x4000000,
    "CLONE_NEWIPC": 0x8000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
Probe = Callable[[], int]  # 0 on success, else the errno


def raw(nr: int, *args: object) -> int:
    """syscall(nr, *args): the result, or -errno."""
    converted: list[object] = []
    for arg in args:
        if isinstance(arg, int):
            converted.append(ctypes.c_long(arg))
        elif isinstance(arg, bytes) or arg is None:
            converted.append(ctypes.c_char_p(arg))
        else:
            converted.append(arg)
    rc: int = _libc.syscall(ctypes.c_long(nr), *converted)
    return -ctypes.get_errno() if rc == -1 else rc


def call(name: str, *args: int | bytes | None) -> Probe:
    def probe() -> int:
        rc = raw(syscall_number(name), *args)
        return -rc if rc < 0 else 0

    return probe


def clone_with(flags: int) -> Probe:
    def probe() -> int:
        # Raw clone with no new stack: the new process continues on a copy of
        # this one's, like fork, and leaves at once.
        rc = raw(syscall_number("clone"), flags | SIGCHLD, 0, 0, 0, 0)
        if rc == 0:  # pragma: no cover - the clone
            os._exit(0)
        if rc < 0:
            return -rc
        os.waitpid(rc, 0)
        return 0

    return probe


def ioctl_on_pipe(request: int) -> Probe:
    def probe() -> int:
        read_end, _ = os.pipe()
        byte = ctypes.c_int(0)
        rc = raw(syscall_number("ioctl"), read_end, request, ctypes.byref(byte))
        return -rc if rc < 0 else 0

    return probe


def i386_keyctl() -> int:
    """keyctl(KEYCTL_GET_KEYRING_ID, thread keyring, 0) through the i386 ABI."""
    code = bytes(
        [
            0x53,  # push rbx (callee-saved)
            0xB8,
            0x20,
            0x01,
            0x00,
            0x00,  # mov eax, 288: keyctl in syscall_32.tbl
            0x31,
            0xDB,  # xor ebx, ebx
            0xB9,
            0xFF,
            0xFF,
            0xFF,
            0xFF,  # mov ecx, -1
            0x31,
            0xD2,  # xor edx, edx
            0xCD,
            0x80,  # int 0x80
            0x5B,  # pop rbx
            0xC3,  # ret
        ]
    )
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    function = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
    rc: int = function()
    return -rc if rc < 0 else 0


def x32_keyctl() -> int:
    # x32 calls arrive with the x86_64 audit arch and bit 30 set in the number.
    rc = raw(0x40000000 | syscall_number("keyctl"), 0, -1, 0)
    return -rc if rc < 0 else 0


#: Calls the default filter refuses, and the errno it answers with. A probe is
#: named after its syscall, with ":detail" when one syscall has several.
BLOCKED: dict[str, tuple[Probe, int]] = {
    "keyctl": (call("keyctl", 0, -1, 0), errno.EPERM),
    "add_key": (call("add_key", None, None, None, 0, -2), errno.EPERM),
    "request_key": (call("request_key", None, None, None, 0), errno.EPERM),
    "kexec_load": (call("kexec_load", 0, 1000, None, 0), errno.EPERM),
    "kexec_file_load": (call("kexec_file_load", -1, -1, 0, None, 0), errno.EPERM),
    "init_module": (call("init_module", None, 0, None), errno.EPERM),
    "finit_module": (call("finit_module", -1, b"", 0), errno.EPERM),
    "delete_module": (call("delete_module", b"pytest_isolate_no_such_module", 0), errno.EPERM),
    "io_uring_setup": (call("io_uring_setup", 0, None), errno.EPERM),
    "io_uring_enter": (call("io_uring_enter", -1, 0, 0, 0, None, 0), errno.EPERM),
    "io_uring_register": (call("io_uring_register", -1, 0, None, 0), errno.EPERM),
    "open_by_handle_at": (call("open_by_handle_at", -1, None, 0), errno.EPERM),
    "acct": (call("acct", NOWHERE + b"/acct"), errno.EPERM),
    "swapon": (call("swapon", NOWHERE, 0), errno.EPERM),
    "swapoff": (call("swapoff", NOWHERE), errno.EPERM),
    "reboot": (call("reboot", 0, 0, 0, None), errno.EPERM),  # wrong magic: EINVAL if reached
    "syslog": (call("syslog", 10, None, 0), errno.EPERM),  # SYSLOG_ACTION_SIZE_BUFFER
    "vhangup": (call("vhangup"), errno.EPERM),  # after setsid: no terminal to hang up
    "quotactl": (call("quotactl", 0xFF, None, 0, None), errno.EPERM),  # no such quota type
    "quotactl_fd": (call("quotactl_fd", -1, 0xFF, 0, None), errno.EPERM),
    "lookup_dcookie": (call("lookup_dcookie", 0, None, 0), errno.EPERM),
    "nfsservctl": (call("nfsservctl", 0, None, None), errno.EPERM),
    "userfaultfd": (call("userfaultfd", os.O_CLOEXEC), errno.EPERM),
    "personality:ADDR_NO_RANDOMIZE": (call("personality", 0x0040000), errno.EPERM),
    "personality:READ_IMPLIES_EXEC": (call("personality", 0x0400000), errno.EPERM),
    "personality:PER_LINUX32 with bit 32 set": (call("personality", 1 << 32 | 8), errno.EPERM),
    "mount": (call("mount", b"none", NOWHERE, b"tmpfs", 0, None), errno.EPERM),
    "umount2": (call("umount2", NOWHERE, 0), errno.EPERM),
    "pivot_root": (call("pivot_root", NOWHERE, NOWHERE), errno.EPERM),
    "fsopen": (call("fsopen", b"pytest_isolate_nofs", 0), errno.EPERM),
    "fsconfig": (call("fsconfig", -1, 0, None, None, 0), errno.EPERM),
    "fsmount": (call("fsmount", -1, 0, 0), errno.EPERM),
    "fspick": (call("fspick", -100, NOWHERE, 0), errno.EPERM),
    "move_mount": (call("move_mount", -1, NOWHERE, -1, NOWHERE, 0), errno.EPERM),
    "open_tree": (call("open_tree", -100, NOWHERE, 0), errno.EPERM),
    "mount_setattr": (call("mount_setattr", -100, NOWHERE, 0, None, 0), errno.EPERM),
    "setns": (call("setns", -1, 0), errno.EPERM),
    **{
        f"unshare:{name}": (call("unshare", flag), errno.EPERM)
        for name, flag in {**_NAMESPACE_FLAGS, "CLONE_NEWTIME": 0x80}.items()
    },
    **{f"clone:{name}": (clone_with(flag), errno.EPERM) for name, flag in _NAMESPACE_FLAGS.items()},
    "clone3": (call("clone3", None, 0), errno.ENOSYS),
    "bpf": (call("bpf", 0xFFFF, None, 0), errno.EPERM),
    "perf_event_open": (call("perf_event_open", None, 0, -1, -1, 0), errno.EPERM),
    "fanotify_init": (call("fanotify_init", 0, 0), errno.EPERM),
    "ioctl:TIOCSTI": (ioctl_on_pipe(0x5412), errno.EPERM),
    "ioctl:TIOCSTI with bit 32 set": (ioctl_on_pipe(1 << 32 | 0x5412), errno.EPERM),
    "ioctl:TIOCLINUX": (ioctl_on_pipe(0x541C), errno.EPERM),
}
# umount(2) exists only in the i386 table, where libseccomp adds the rule.
UNPROBED = {"umount"}


def _fork_works() -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        os._exit(7)
    return 0 if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7 else 1


def _thread_works() -> int:
    # pthread_create tries clone3 first: this checks the ENOSYS fallback.
    done: list[bool] = []
    thread = threading.Thread(target=lambda: done.append(True))
    thread.start()
    thread.join()
    return 0 if done else 1


def _subprocess_works() -> int:
    return subprocess.run(["true"], check=False).returncode


#: Calls the filter lets through.
ALLOWED: dict[str, Probe] = {
    "getpid": call("getpid"),
    "fork": _fork_works,
    "clone without namespace flags": clone_with(0),
    "a thread": _thread_works,
    "a subprocess": _subprocess_works,
    "personality query": call("personality", 0xFFFFFFFF),
    "personality PER_LINUX": call("personality", 0),
    "personality PER_LINUX32": call("personality", 0x8),
    "personality UNAME26|PER_LINUX32": call("personality", 0x20008),
    "unshare without namespace flags": call("unshare", 0),
    "ioctl FIONREAD": ioctl_on_pipe(0x541B),
}


def run_probes(probes: dict[str, Probe]) -> dict[str, str]:
    """Run each probe in a grandchild of this process; name -> 'ok', 'EPERM', 'SIGSEGV'."""
    results: dict[str, str] = {}
    for name, probe in probes.items():
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the grandchild
            code = 254
            try:
                os.setsid()  # no controlling terminal: vhangup and TIOCSTI touch nothing
                code = probe()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            results[name] = signal.Signals(os.WTERMSIG(status)).name
        else:
            code = os.WEXITSTATUS(status)
            results[name] = "ok" if code == 0 else errno.errorcode.get(code, str(code))
    return results


def probe_environment(
    keep: frozenset[str] | None,
    program: bytes | None,
    probes: dict[str, Probe],
    namespaces: int = 0,
) -> dict[str, str]:
    """Set up capabilities (None: keep all held) and the filter in a child, then probe."""

    def body() -> dict[str, str]:
        apply_capabilities(held_caps() if keep is None else keep)
        if program is not None:
            load_filter(program)
        return run_probes(probes)

    result = run_in_child(body, namespaces)
    assert isinstance(result, dict)
    return result


_cache: dict[str, dict[str, str]] = {}


def results_for(environment: str) -> dict[str, str]:
    """Probe results per environment, computed once per module run."""
    if environment not in _cache:
        every = {**{name: probe for name, (probe, _) in BLOCKED.items()}, **ALLOWED}
        if environment == "baseline":  # every capability held, no filter
            _cache[environment] = probe_environment(None, None, every)
        elif environment == "filter":  # every capability held, filter granting nothing
            _cache[environment] = probe_environment(None, build_filter(frozenset()), every)
        elif environment == "default":  # the default policy, as a test gets it
            _cache[environment] = probe_environment(policy(), build_filter(policy()), every)
        else:
            raise AssertionError(environment)
    return _cache[environment]


def errno_name(code: int) -> str:
    return errno.errorcode[code]


# --------------------------------------------------------------- pure checks


def test_seccomp_is_available_on_this_host() -> None:
    assert seccomp_available() is None


@pytest.mark.parametrize(
    "allowed",
    [
        (0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF),
        (0,),
        (0xFFFFFFFF,),
        (5, 6, 1 << 31),
    ],
)
def test_any_value_except_matches_exactly_the_other_values(allowed: tuple[int, ...]) -> None:
    alternatives = _any_value_except(0, allowed)

    def matched(value: int) -> bool:
        for tests in alternatives:
            ((_, op, a, b),) = tests
            if (op == _CMP_GT and value > a) or (op == _CMP_MASKED_EQ and value & a == b):
                return True
        return False

    rng = random.Random(1)
    samples = set(allowed)
    for value in allowed:
        samples |= {value - 1, value + 1, value | 1 << 32, value ^ 1 << 31}
    samples |= {1 << bit for bit in range(64)} | {(1 << bit) - 1 for bit in range(65)}
    samples |= {rng.getrandbits(32) for _ in range(2000)} | {
        rng.getrandbits(64) for _ in range(500)
    }
    for value in samples:
        if 0 <= value < 1 << 64:
            assert matched(value) == (value not in allowed), hex(value)


def test_every_filtered_syscall_is_known_to_libseccomp_and_probed() -> None:
    probed = {name.partition(":")[0] for name in BLOCKED}
    for rule in DEFAULT_RULES:
        for name in rule.syscalls:
            syscall_number(name)  # raises if libseccomp does not know it
            assert name in probed or name in UNPROBED, f"no probe for {name}"


def test_docs_explain_every_filtered_syscall() -> None:
    page = (Path(__file__).parent.parent / "docs" / "security.md").read_text()
    for rule in DEFAULT_RULES:
        for name in rule.syscalls:
            assert re.search(rf"\b{name}\b", page), f"docs/security.md does not mention {name}"


def test_filter_is_compiled_once_per_granted_set() -> None:
    assert build_filter(frozenset({"CHOWN"})) is build_filter(frozenset({"CHOWN"}))
    default, admin = build_filter(frozenset()), build_filter(frozenset({"SYS_ADMIN"}))
    assert len(default) % 8 == 0 and len(default) // 8 <= 4096
    assert len(admin) < len(default)


def test_load_filter_rejects_a_program_that_is_not_bpf() -> None:
    with pytest.raises(ValueError, match="instructions of 8 bytes; got 7 bytes"):
        load_filter(b"1234567")


# ------------------------------------------------------------- kernel checks


@pytest.mark.parametrize("probe", list(BLOCKED))
def test_filtered_syscall_fails(probe: str) -> None:
    expected = errno_name(BLOCKED[probe][1])
    assert results_for("filter")[probe] == expected
    assert results_for("default")[probe] == expected
    if not ROOTLESS:
        # Every capability held and no filter: the kernel answers otherwise,
        # so the answer above came from the filter.
        assert results_for("baseline")[probe] != expected


@pytest.mark.parametrize("probe", list(ALLOWED))
def test_allowed_syscall_works(probe: str) -> None:
    assert results_for("filter")[probe] == "ok"
    assert results_for("default")[probe] == "ok"


GRANTS = sorted({cap for rule in DEFAULT_RULES for cap in rule.unless})


@pytest.mark.parametrize("cap", GRANTS)
def test_granting_a_capability_lifts_the_rules_it_governs(cap: str) -> None:
    names = {name for rule in DEFAULT_RULES if cap in rule.unless for name in rule.syscalls}
    probes = {probe: fn for probe, (fn, _) in BLOCKED.items() if probe.partition(":")[0] in names}
    granted = probe_environment(None, build_filter(frozenset({cap})), probes)
    baseline = results_for("baseline")
    assert granted == {probe: baseline[probe] for probe in probes}


def _unshare_and_mount_under_default_filter(target: str) -> bool:
    keep = policy(add=("sys_admin",))
    apply_capabilities(keep)
    load_filter(build_filter(keep))
    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.mount("pytest-isolate-test", target, "tmpfs", syscalls.MS_NOSUID, "size=1M")
    return os.path.ismount(target)


def test_with_sys_admin_a_test_can_unshare_a_mount_namespace_and_mount(tmp_path: Path) -> None:
    assert (
        run_in_child(
            lambda: _unshare_and_mount_under_default_filter(str(tmp_path)),
            namespaces=syscalls.CLONE_NEWNS,
        )
        is True
    )
    assert not os.path.ismount(tmp_path)


def _keyctl_from_a_thread_started_before_the_filter() -> int:
    start, result = threading.Event(), []

    def worker() -> None:
        start.wait()
        result.append(call("keyctl", 0, -1, 0)())

    thread = threading.Thread(target=worker)
    thread.start()
    apply_capabilities(policy())
    load_filter(build_filter(policy()))
    start.set()
    thread.join()
    return result[0]


def test_filter_covers_threads_that_already_run() -> None:
    assert run_in_child(_keyctl_from_a_thread_started_before_the_filter) == errno.EPERM


@pytest.mark.skipif(not X86_64, reason="the i386 and x32 ABIs exist on x86_64 only")
@pytest.mark.parametrize("abi", ["i386", "x32"])
def test_compat_abis_are_filtered_too(abi: str) -> None:
    probes = {abi: i386_keyctl if abi == "i386" else x32_keyctl}
    baseline = probe_environment(None, None, probes)[abi]
    if baseline.startswith("SIG"):
        pytest.skip(f"this kernel cannot run {abi} syscalls ({baseline})")
    assert probe_environment(None, build_filter(frozenset()), probes)[abi] == "EPERM"


def _load_without_no_new_privs() -> None:
    if not ROOTLESS:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)  # and with it every capability
    load_filter(build_filter(frozenset()))


def test_loading_without_no_new_privs_fails_naming_the_fix() -> None:
    with pytest.raises(ChildError, match=r"EACCES.*no_new_privs is not set.*apply_capabilities"):
        run_in_child(_load_without_no_new_privs, enter=False)
