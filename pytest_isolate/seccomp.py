"""The default syscall filter: compiled once in the parent, loaded last in the child.

The filter is a block list modelled on Docker's default profile: everything is
allowed except the calls that let a process leave or weaken the sandbox or
reach rarely used kernel code; those fail with EPERM unless the capability
that governs them was granted (clone3 fails with ENOSYS instead, so libc falls
back to clone, whose flags a filter can read; clone3 passes them in memory).

libseccomp (2.5+, ``libseccomp.so.2``) compiles the rules through ctypes: it is
the library Docker, runc, podman and systemd use, it knows every
architecture's syscall numbers and the x86 quirks (the i386 ABI through
``int 0x80`` and x32 syscalls, which bypass a naive filter), and its Python
binding is packaged only for Debian's own interpreter. ``build_filter``
exports the program as classic BPF bytes, so the forked child only makes one
seccomp(2) call: no library, no allocation, no compilation per test.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

__all__ = [
    "DEFAULT_RULES",
    "Rule",
    "SeccompUnavailable",
    "build_filter",
    "load_filter",
    "seccomp_available",
    "syscall_number",
]

_FIX = "install libseccomp 2.5 or newer: apt-get install libseccomp2"

# libseccomp's seccomp.h.
_ACT_ALLOW = 0x7FFF0000
_ACT_KILL_PROCESS = 0x80000000
_FLTATR_ACT_BADARCH = 2
#: SCMP_FLTATR_CTL_OPTIMIZE (libseccomp 2.5+): 2 = a binary tree of syscall
#: numbers instead of a linear list.
_FLTATR_CTL_OPTIMIZE = 8
_CMP_GT = 6
_CMP_MASKED_EQ = 7
_NR_SCMP_ERROR = -1


def _act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


#: One comparison on a syscall argument: (argument index, op, datum_a, datum_b).
#: ``(i, _CMP_MASKED_EQ, mask, value)`` matches when ``arg[i] & mask == value``.
ArgTest = tuple[int, int, int, int]


def _flag_set(arg: int, bit: int) -> tuple[ArgTest, ...]:
    return ((arg, _CMP_MASKED_EQ, bit, bit),)


def _any_value_except(arg: int, allowed: Iterable[int]) -> tuple[tuple[ArgTest, ...], ...]:
    """Alternatives that together match every value of ``arg`` except ``allowed``.

    libseccomp cannot combine two comparisons on one argument in a rule, so the
    complement of a set of 32-bit values is written as masked-equality blocks:
    walk the values' bits (those on which they agree first, to keep the list
    short) and emit, at each step, the branch that holds none of them. Anything
    above 32 bits is one more block; the kernel reads these arguments as
    ``unsigned int``, so high bits are refused rather than truncated.
    """
    values = sorted(set(allowed))
    bits = sorted(
        range(32),
        key=lambda b: min(sum(v >> b & 1 for v in values), sum(not v >> b & 1 for v in values)),
    )
    result: list[tuple[ArgTest, ...]] = [((arg, _CMP_GT, 0xFFFFFFFF, 0),)]

    def walk(group: list[int], depth: int, mask: int, prefix: int) -> None:
        if depth == len(bits):
            return
        bit = 1 << bits[depth]
        for side in (0, bit):
            members = [v for v in group if v & bit == side]
            if members:
                walk(members, depth + 1, mask | bit, prefix | side)
            else:
                result.append(((arg, _CMP_MASKED_EQ, mask | bit, prefix | side),))

    walk(values, 0, 0, 0)
    return tuple(result)


@dataclass(frozen=True)
class Rule:
    """Syscalls that fail with ``error`` unless one capability of ``unless`` is granted.

    ``when`` lists alternatives (any one matching triggers the rule), each a
    tuple of argument tests that must all hold; ``((),)`` means always.
    """

    syscalls: tuple[str, ...]
    why: str
    unless: frozenset[str] = frozenset()
    error: int = errno.EPERM
    when: tuple[tuple[ArgTest, ...], ...] = ((),)


_NAMESPACE_FLAGS = (
    0x00020000,
    0x02000000,
    0x04000000,
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
)  # CLONE_NEWNS, NEWCGROUP ... NEWNET: mask 0x7E020000
_CLONE_NEWTIME = 0x80  # unshare and clone3 only: for clone it is part of the exit signal
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C
_ADMIN = frozenset({"SYS_ADMIN"})

#: The default filter, in the order of docs/security.md.
DEFAULT_RULES: tuple[Rule, ...] = (
    Rule(
        ("keyctl", "add_key", "request_key"),
        "the kernel keyring is not namespaced: a test could read or plant keys of the "
        "host's users, and the keys code has a long CVE history",
    ),
    Rule(("kexec_load", "kexec_file_load"), "replaces the running kernel"),
    Rule(
        ("init_module", "finit_module", "delete_module"),
        "loads code into, or removes it from, the host kernel",
        unless=frozenset({"SYS_MODULE"}),
    ),
    Rule(
        ("io_uring_setup", "io_uring_enter", "io_uring_register"),
        "a second syscall interface that bypasses this filter for the operations it "
        "carries, and a frequent source of kernel exploits",
    ),
    Rule(
        ("open_by_handle_at",),
        "opens any file of a file system by its handle, ignoring the mount the "
        "container sees: the 'shocker' escape from Docker 0.11",
        unless=frozenset({"DAC_READ_SEARCH"}),
    ),
    Rule(
        ("acct",), "switches process accounting of the whole host", unless=frozenset({"SYS_PACCT"})
    ),
    Rule(("swapon", "swapoff"), "changes the host's swap devices", unless=_ADMIN),
    Rule(
        ("reboot",),
        "reboots the host, or kills the test's pid namespace",
        unless=frozenset({"SYS_BOOT"}),
    ),
    Rule(
        ("syslog",),
        "reads or clears the host kernel's log, which leaks kernel addresses",
        unless=frozenset({"SYSLOG"}),
    ),
    Rule(
        ("vhangup",), "hangs up the terminal pytest runs on", unless=frozenset({"SYS_TTY_CONFIG"})
    ),
    Rule(("quotactl", "quotactl_fd"), "changes disk quotas of host file systems", unless=_ADMIN),
    Rule(
        ("lookup_dcookie", "nfsservctl"),
        "obsolete interfaces (removed from newer "
        "kernels); refused so an old kernel's implementation is not reachable",
        unless=_ADMIN,
    ),
    Rule(
        ("userfaultfd",),
        "lets a process stall the kernel in the middle of a copy "
        "from user memory, the standard way to win kernel races in exploits",
        unless=frozenset({"SYS_PTRACE"}),
    ),
    Rule(
        ("personality",),
        "execution domains other than Linux and Linux32 switch off "
        "exploit mitigations (ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC, MMAP_PAGE_ZERO); "
        "0, PER_LINUX32, UNAME26, both, and the query 0xffffffff stay allowed",
        when=_any_value_except(0, (0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)),
    ),
    Rule(
        (
            "mount",
            "umount",
            "umount2",
            "pivot_root",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "move_mount",
            "open_tree",
            "mount_setattr",
        ),
        "changes the file system tree: could uncover what the new root hides",
        unless=_ADMIN,
    ),
    Rule(
        ("setns",), "joins another namespace, e.g. one of the host's through /proc", unless=_ADMIN
    ),
    Rule(
        ("unshare",),
        "a new user namespace hands the test every capability again "
        "within it, and each new namespace exposes more kernel code",
        unless=_ADMIN,
        when=tuple(_flag_set(0, flag) for flag in (*_NAMESPACE_FLAGS, _CLONE_NEWTIME)),
    ),
    Rule(
        ("clone",),
        "the same as unshare, while creating a process",
        unless=_ADMIN,
        when=tuple(_flag_set(0, flag) for flag in _NAMESPACE_FLAGS),
    ),
    Rule(
        ("clone3",),
        "its flags are in memory a filter cannot read; ENOSYS makes libc "
        "fall back to clone, whose flags are checked above",
        unless=_ADMIN,
        error=errno.ENOSYS,
    ),
    Rule(
        ("bpf",),
        "loads programs into the kernel; the verifier is a large attack surface",
        unless=frozenset({"SYS_ADMIN", "BPF"}),
    ),
    Rule(
        ("perf_event_open",),
        "profiles the whole host and exposes a large, exploit-prone interface",
        unless=frozenset({"SYS_ADMIN", "PERFMON"}),
    ),
    Rule(("fanotify_init",), "watches file access across the host's file systems", unless=_ADMIN),
    Rule(
        ("ioctl",),
        "TIOCSTI and TIOCLINUX push keystrokes into the terminal pytest "
        "runs on, to be executed by the shell after pytest exits (CVE-2017-5226); "
        "compared on 32 bits because the kernel ignores the upper half",
        when=(
            ((1, _CMP_MASKED_EQ, 0xFFFFFFFF, _TIOCSTI),),
            ((1, _CMP_MASKED_EQ, 0xFFFFFFFF, _TIOCLINUX),),
        ),
    ),
)

# Every ABI a process can enter the kernel through on this machine: a filter
# for the native one only would let `int 0x80` (i386) or x32 calls pass.
_EXTRA_ARCHES = {"x86_64": ("x86", "x32"), "aarch64": ("arm",)}

# seccomp(2) by number: glibc 2.36 has no wrapper.
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277, "i686": 354, "armv7l": 383}
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1


class SeccompUnavailable(Exception):
    """libseccomp or the kernel's filter support is missing; the message names the fix."""


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


@cache
def _libseccomp() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError as exc:
        raise SeccompUnavailable(f"libseccomp.so.2 cannot be loaded ({exc}); {_FIX}") from None
    lib.seccomp_version.restype = ctypes.POINTER(_Version)
    version = lib.seccomp_version().contents
    if (version.major, version.minor) < (2, 5):
        raise SeccompUnavailable(
            f"libseccomp {version.major}.{version.minor}.{version.micro} is too old "
            f"(it lacks the new mount API and clone3 syscalls); {_FIX}"
        )
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.restype = None
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def _check(rc: int, step: str) -> None:
    # libseccomp returns -errno rather than setting errno.
    if rc < 0:
        raise OSError(
            -rc, f"build_filter: {step}: {errno.errorcode.get(-rc, -rc)} ({os.strerror(-rc)})"
        )


@cache
def seccomp_available() -> str | None:
    """None if the filter can be built and loaded here, else the reason and the fix.

    Cached: the host does not change during a session."""
    try:
        with open("/proc/sys/kernel/seccomp/actions_avail") as f:
            actions = f.read().split()
    except OSError:
        return (
            "the kernel has no seccomp filter support (no "
            "/proc/sys/kernel/seccomp/actions_avail; Linux 4.14+ with CONFIG_SECCOMP_FILTER "
            "is needed); run with seccomp=false"
        )
    missing = {"errno", "kill_process"} - set(actions)
    if missing:
        return (
            f"the kernel's seccomp lacks the action(s) {', '.join(sorted(missing))}; "
            f"run with seccomp=false"
        )
    if platform.machine() not in _SYS_SECCOMP:
        return f"no seccomp syscall number known for {platform.machine()}; run with seccomp=false"
    try:
        _libseccomp()
    except SeccompUnavailable as exc:
        return str(exc)
    return None


def syscall_number(name: str) -> int:
    """The native number of syscall ``name``, from libseccomp's tables (negative
    when the syscall does not exist on this architecture)."""
    nr: int = _libseccomp().seccomp_syscall_resolve_name(name.encode())
    if nr == _NR_SCMP_ERROR:
        raise SeccompUnavailable(f"libseccomp does not know the syscall {name!r}; {_FIX}")
    return nr


@cache
def build_filter(granted: frozenset[str]) -> bytes:
    """Compile DEFAULT_RULES, minus those lifted by ``granted`` capabilities, to BPF.

    ``granted`` holds capability names as capabilities.resolve_caps returns them.
    The result is cached per set: compile once per session, load per test.
    """
    lib = _libseccomp()
    ctx = lib.seccomp_init(_ACT_ALLOW)
    if not ctx:
        raise OSError(errno.ENOMEM, "build_filter: seccomp_init failed")
    try:
        # An ABI the filter does not list (none on x86_64 or aarch64 after the
        # additions below) kills the process rather than running unfiltered.
        _check(
            lib.seccomp_attr_set(ctx, _FLTATR_ACT_BADARCH, _ACT_KILL_PROCESS),
            "seccomp_attr_set(ACT_BADARCH, KILL_PROCESS)",
        )
        # A tree: the kernel runs the filter for every syscall number when it
        # is loaded (its allow cache), once per test; the list took 0.1 ms
        # more. Older libseccomp refuses the attribute: the list it is.
        lib.seccomp_attr_set(ctx, _FLTATR_CTL_OPTIMIZE, 2)
        for arch in _EXTRA_ARCHES.get(platform.machine(), ()):
            token = lib.seccomp_arch_resolve_name(arch.encode())
            _check(lib.seccomp_arch_add(ctx, token), f"seccomp_arch_add({arch})")
        for rule in DEFAULT_RULES:
            if rule.unless & granted or ("ALL" in granted and rule.unless):
                continue
            for name in rule.syscalls:
                nr = syscall_number(name)
                for tests in rule.when:
                    array = (_ArgCmp * max(len(tests), 1))(*(_ArgCmp(*t) for t in tests))
                    _check(
                        lib.seccomp_rule_add_array(
                            ctx, _act_errno(rule.error), nr, len(tests), array
                        ),
                        f"seccomp_rule_add({name}, {tests})",
                    )
        fd = os.memfd_create("pytest-isolate-seccomp", os.MFD_CLOEXEC)
        try:
            _check(lib.seccomp_export_bpf(ctx, fd), "seccomp_export_bpf")
            size = os.lseek(fd, 0, os.SEEK_CUR)
            program = os.pread(fd, size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)
    if len(program) != size or size % 8:
        raise OSError(errno.EIO, f"build_filter: exported {len(program)} of {size} bytes")
    _fprog(program)  # made here, before any fork: a test process only loads it
    return program


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


_NR_SECCOMP = _SYS_SECCOMP.get(platform.machine())
#: program -> (its buffer, the sock_fprog pointing at it), made once in pytest's
#: process: building them in a forked test process cost 0.15 ms of Python
#: (and its page copies) per test.
_FPROGS: dict[bytes, tuple[ctypes.Array[ctypes.c_char], _SockFprog]] = {}


def _fprog(program: bytes) -> _SockFprog:
    made = _FPROGS.get(program)
    if made is None:
        count = len(program) // 8
        if not program or len(program) % 8 or count > 4096:  # BPF_MAXINSNS
            raise ValueError(
                f"load_filter: a BPF program is 1..4096 instructions of 8 bytes; "
                f"got {len(program)} bytes"
            )
        buffer = ctypes.create_string_buffer(program, len(program))
        made = _FPROGS[program] = (buffer, _SockFprog(count, ctypes.cast(buffer, ctypes.c_void_p)))
    return made[1]


def load_filter(program: bytes) -> None:
    """Install ``program`` (from build_filter) on this process and all its threads.

    Needs no_new_privs (capabilities.apply_capabilities sets it) or CAP_SYS_ADMIN.
    Uses seccomp(2) with SECCOMP_FILTER_FLAG_TSYNC rather than prctl, so a thread
    that a plugin started in the child cannot stay unfiltered. Irreversible.
    """
    fprog = _fprog(program)
    if _NR_SECCOMP is None:
        raise SeccompUnavailable(f"no seccomp syscall number known for {platform.machine()}")
    rc = _libc.syscall(
        ctypes.c_long(_NR_SECCOMP),
        ctypes.c_ulong(_SECCOMP_SET_MODE_FILTER),
        ctypes.c_ulong(_SECCOMP_FILTER_FLAG_TSYNC),
        ctypes.byref(fprog),
    )
    if rc == 0:
        return
    if rc > 0:
        raise OSError(
            errno.EBUSY,
            f"load_filter: thread {rc} of this process cannot be "
            f"synchronized (it has a different filter)",
        )
    err = ctypes.get_errno()
    hint = ""
    if err == errno.EACCES:
        hint = (
            "; no_new_privs is not set and CAP_SYS_ADMIN is missing: call "
            "capabilities.apply_capabilities() first"
        )
    raise OSError(
        err,
        f"load_filter: seccomp(SECCOMP_SET_MODE_FILTER, TSYNC): "
        f"{errno.errorcode.get(err, err)} ({os.strerror(err)}){hint}",
    )
