"""Capabilities: which of root's powers a test keeps, and no_new_privs.

The only module that touches python-prctl. It uses the C extension ``_prctl``
that python-prctl ships rather than its ``prctl.py`` wrapper: that wrapper
(1.8.1) calls ``warnings.warn`` on line 64 without importing ``warnings``, so
importing it raises NameError on any host whose libcap knows a capability the
wrapper cannot name, and it also lists the constant CAP_LAST_CAP as a
capability called ``last_cap``. ``_prctl`` is a thin layer over prctl(2) and
libcap's cap_set_proc(3) with none of those problems. It drops the bounding
set in a zygote (drop_bounding_once). A test process's own drop
(apply_capabilities) makes its few calls through ctypes, prepared before the
fork: prctl(2) through ``syscalls.prctl`` (python-prctl 1.8.1 does not cover
the ambient set at all) and one capset(2) of all 64 bits, which each test
process would otherwise have paid libcap's allocations and python-prctl's
argument lists for.

Names are the kernel's, upper case, without the ``CAP_`` prefix
(``"SYS_ADMIN"``); the bit number of a name is its index in the kernel's list.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import os
from collections.abc import Iterable
from functools import cache
from types import ModuleType

from . import syscalls

__all__ = [
    "ALL_CAPS",
    "DEFAULT_ROOT_CAPS",
    "apply_capabilities",
    "caps_from_mask",
    "caps_to_mask",
    "current_caps",
    "normalize_cap_names",
    "resolve_caps",
]

# include/uapi/linux/capability.h, in bit order. The numbering is kernel ABI and
# never changes; new capabilities are only ever appended.
_KERNEL_CAP_NAMES = (
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
)


def _read_cap_last_cap() -> int:
    # The highest capability the running kernel knows (Linux 3.2+). Older
    # kernels lack the file; the table above is the best guess there.
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return len(_KERNEL_CAP_NAMES) - 1


#: The highest capability number of the running kernel.
CAP_LAST_CAP = _read_cap_last_cap()

#: Every capability the running kernel has, by name, in bit order.
ALL_CAPS: tuple[str, ...] = _KERNEL_CAP_NAMES[: CAP_LAST_CAP + 1]

#: What a test running as root keeps by default: Docker's 14 minus MKNOD.
#: Docker can keep MKNOD only because its device cgroup denies access to the
#: nodes; here writable mounts are nodev and tests do not need device nodes.
DEFAULT_ROOT_CAPS: frozenset[str] = frozenset(
    {
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "NET_BIND_SERVICE",
        "NET_RAW",
        "SYS_CHROOT",
        "AUDIT_WRITE",
        "SETFCAP",
    }
)

_BIT = {name: bit for bit, name in enumerate(_KERNEL_CAP_NAMES)}

# prctl(2) options python-prctl 1.8.1 does not know.
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4


def normalize_cap_names(names: Iterable[str]) -> tuple[str, ...]:
    """Turn user-written names into kernel names: ``"cap_chown"`` -> ``"CHOWN"``.

    Any case, with or without the ``CAP_`` prefix; ``"all"`` becomes ``"ALL"``.
    Duplicates are dropped, order is kept. An unknown name raises SpecError
    listing the valid names.
    """
    # Imported lazily: spec.py imports this module lazily too (a cycle otherwise).
    from .spec import SpecError

    result: list[str] = []
    for raw in names:
        name = raw.strip().upper()
        if name.startswith("CAP_"):
            name = name[4:]
        if name != "ALL" and name not in ALL_CAPS:
            if name in _BIT:
                raise SpecError(
                    f"capability {raw!r} is not supported by this kernel "
                    f"(its highest is {ALL_CAPS[-1].lower()}, number {CAP_LAST_CAP}); "
                    f"remove it or run on a newer kernel"
                )
            valid = ", ".join(cap.lower() for cap in ALL_CAPS)
            raise SpecError(f"unknown capability {raw!r}; valid names: {valid} or all")
        if name not in result:
            result.append(name)
    return tuple(result)


def resolve_caps(drop: tuple[str, ...], add: tuple[str, ...], *, rootless: bool) -> frozenset[str]:
    """The set a test keeps, from normalized ``caps_drop`` and ``caps_add``.

    As root the start is DEFAULT_ROOT_CAPS. Rootless the start is empty: an
    unprivileged user has no capabilities on the host, and handing it the
    default set within its user namespace (where it is uid 0) would make file
    permissions inside mean something else than outside (DAC_OVERRIDE, FOWNER).

    ``ALL`` in ``add`` means every capability there is to keep: all of them
    within a user namespace (rootless), and as root the ones this process holds
    (a host or an outer container may have removed some, e.g. SYS_RESOURCE).
    Explicit names beat ``ALL``: ``drop=("ALL",), add=("CHOWN",)`` keeps CHOWN,
    ``add=("ALL",), drop=("SYS_ADMIN",)`` keeps everything but SYS_ADMIN. A name
    in both lists is kept (add is applied after drop).
    """
    keep = set() if rootless else set(DEFAULT_ROOT_CAPS)
    explicit_drop = {name for name in drop if name != "ALL"}
    explicit_add = {name for name in add if name != "ALL"}
    if "ALL" in drop:
        keep.clear()
    keep -= explicit_drop
    if "ALL" in add:
        everything = set(ALL_CAPS)
        if not rootless:
            status = current_caps()
            everything &= caps_from_mask(status["CapPrm"] & status["CapBnd"])
        keep |= everything - explicit_drop
    keep |= explicit_add
    return frozenset(keep)


def caps_to_mask(names: Iterable[str]) -> int:
    """The bit mask of capability names, as /proc/self/status shows it."""
    mask = 0
    for name in names:
        mask |= 1 << _BIT[name]
    return mask


def caps_from_mask(mask: int) -> frozenset[str]:
    """Capability names set in ``mask``; unnamed bits appear as ``"CAP_<n>"``."""
    return frozenset(
        _KERNEL_CAP_NAMES[bit] if bit < len(_KERNEL_CAP_NAMES) else f"CAP_{bit}"
        for bit in range(64)
        if mask >> bit & 1
    )


def current_caps() -> dict[str, int]:
    """CapInh, CapPrm, CapEff, CapBnd and CapAmb of this process, as ints."""
    result: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Cap"):
                key, _, value = line.partition(":")
                result[key] = int(value, 16)
    return result


def privileged() -> bool:
    """Root with CAP_SYS_ADMIN: the sandboxes are made with the host's
    privileges. Root without it (a container's root) makes them as an
    unprivileged user does, in a user namespace of its own."""
    if os.geteuid() != 0:
        return False
    try:
        return bool(current_caps()["CapEff"] & caps_to_mask(["SYS_ADMIN"]))
    except (OSError, KeyError, ValueError):
        return True


@cache
def _prctl() -> ModuleType:
    # Imported on first use: normalize_cap_names runs in the parent during spec
    # parsing and must not need the extension.
    return importlib.import_module("_prctl")


def _describe(mask: int) -> str:
    return ",".join(sorted(name.lower() for name in caps_from_mask(mask))) or "none"


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# Made once, here: a forked test process that created them (a function
# pointer, an array type, two structures) paid 0.2 ms in copied pages.
_libc_capget = _libc.capget
_CAP_HEADER = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
_CAP_DATA = (_CapData * 2)()
_CAP_HEADER_REF = ctypes.byref(_CAP_HEADER)


def _capget() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of this thread, by capget(2).

    One syscall instead of parsing /proc/self/status, which costs ~0.3 ms as
    the first file a freshly forked child reads.
    """
    _CAP_HEADER.version = _LINUX_CAPABILITY_VERSION_3
    _CAP_HEADER.pid = 0
    if _libc_capget(_CAP_HEADER_REF, _CAP_DATA) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capget: {os.strerror(err)}")
    low, high = _CAP_DATA[0], _CAP_DATA[1]
    return (
        low.effective | high.effective << 32,
        low.permitted | high.permitted << 32,
        low.inheritable | high.inheritable << 32,
    )


def _missing_message(keep: frozenset[str]) -> str | None:
    # Only on the error path: read what the process holds and name the gap.
    status = current_caps()
    missing = caps_to_mask(keep) & ~(status["CapPrm"] & status["CapBnd"])
    if not missing:
        return None
    return (
        f"apply_capabilities: cannot keep {_describe(missing)}: the process running the "
        f"test does not hold it (CapPrm={status['CapPrm']:016x}, "
        f"CapBnd={status['CapBnd']:016x}); remove it from caps_add or run pytest with it"
    )


#: Dropped from the bounding set by this process already (a zygote, for every
#: plan it serves: drop_bounding_once): its children need not drop them again.
BOUNDING_DROPPED: frozenset[str] = frozenset()


def drop_bounding_once(names: Iterable[str]) -> None:
    """In a zygote, once: drop ``names`` from the bounding set, which only
    matters to its children (a bounding set limits what an execve can give;
    the zygote never execs, and keeps its effective capabilities). Nothing
    is recorded unless every drop succeeded."""
    global BOUNDING_DROPPED
    prctl = _prctl()
    wanted = frozenset(names) & frozenset(ALL_CAPS)
    for name in wanted:
        if _BIT[name] > prctl.CAP_LAST_CAP:
            return
        try:
            prctl.prctl(prctl.PR_CAPBSET_DROP, _BIT[name])
        except OSError:
            return
    BOUNDING_DROPPED = wanted
    _APPLY.clear()  # planned with the bits dropped before


#: What apply_capabilities does for a kept set: the bounding-set bits still
#: to drop, the kept bits, their mask. Made where the forks happen (a
#: zygote, for each plan it serves: prepare_capabilities), so that a test
#: process does not work them out again.
_APPLY: dict[frozenset[str], tuple[tuple[int, ...], tuple[int, ...], int]] = {}
_PR_CAPBSET_READ = 23
_libc_capset = _libc.capset


def prepare_capabilities(keep: frozenset[str]) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """apply_capabilities' plan for ``keep`` (made once per process)."""
    found = _APPLY.get(keep)
    if found is None:
        dropped = keep | BOUNDING_DROPPED
        drop = tuple(bit for bit in range(CAP_LAST_CAP + 1) if _name(bit) not in dropped)
        keep_bits = tuple(sorted(_BIT[name] for name in keep))
        found = _APPLY[keep] = (drop, keep_bits, caps_to_mask(keep))
    return found


def _name(bit: int) -> str:
    return _KERNEL_CAP_NAMES[bit] if bit < len(_KERNEL_CAP_NAMES) else f"CAP_{bit}"


def apply_capabilities(keep: frozenset[str]) -> None:
    """Reduce this process to ``keep`` and set no_new_privs. Call in the child.

    Afterwards bounding = permitted = effective = ``keep``, inheritable and
    ambient are empty, and no exec (setuid binary, file capabilities) can
    raise privileges again. Raises OSError naming the step and the capability.
    """
    drop, keep_bits, want = prepare_capabilities(keep)

    # 1. The bounding set first: dropping from it needs CAP_SETPCAP, which the
    #    next steps may take away. It is what uid 0 regains on every execve, so
    #    it must equal `keep` or a test could exec its way back to more.
    #    Dropping a capability that is not there is a no-op, so no read first.
    for bit in drop:
        try:
            syscalls.prctl(_PR_CAPBSET_DROP, bit)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"apply_capabilities: dropping {_name(bit)} from the "
                f"bounding set (prctl PR_CAPBSET_DROP): {exc.strerror}; "
                f"CAP_SETPCAP is needed for that",
            ) from exc

    # 2. Ambient capabilities survive execve of unprivileged programs: a set
    #    left here by whatever started pytest would outlive the drop.
    try:
        syscalls.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: kernel before 4.3, no ambient set
            raise OSError(
                exc.errno,
                "apply_capabilities: clearing the ambient set "
                f"(prctl PR_CAP_AMBIENT_CLEAR_ALL): {exc.strerror}",
            ) from exc

    # 3. Inheritable empty, permitted and effective = keep, in one capset(2)
    #    of all 64 bits: lowering permitted is always allowed, and effective
    #    must stay within it. A non-empty inheritable set let programs with
    #    inheritable file capabilities gain them at execve in Moby/containerd
    #    (CVE-2022-24769).
    _CAP_HEADER.version = _LINUX_CAPABILITY_VERSION_3
    _CAP_HEADER.pid = 0
    for word, data in enumerate(_CAP_DATA):
        data.effective = data.permitted = (want >> (32 * word)) & 0xFFFFFFFF
        data.inheritable = 0
    if _libc_capset(_CAP_HEADER_REF, _CAP_DATA) != 0:
        err = ctypes.get_errno()
        message = _missing_message(keep) or (
            f"apply_capabilities: setting permitted and effective to "
            f"{_describe(want)} (capset): {os.strerror(err)}"
        )
        raise OSError(err, message)

    # 4. no_new_privs, always: setuid/setgid bits and file capabilities stop
    #    granting anything on execve, and it is what lets an unprivileged
    #    process load the seccomp filter next.
    try:
        syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"apply_capabilities: setting no_new_privs (prctl PR_SET_NO_NEW_PRIVS): {exc.strerror}",
        ) from exc

    # 5. Check the kernel's view: a capability missing from the bounding set
    #    passes steps 1-3 silently.
    effective, permitted, inheritable = _capget()
    in_bounding = all(syscalls.prctl(_PR_CAPBSET_READ, bit) for bit in keep_bits)
    if (effective, permitted, inheritable) != (want, want, 0) or not in_bounding:
        raise OSError(
            errno.EPERM,
            _missing_message(keep)
            or (
                f"apply_capabilities: after the drop effective={effective:x}, "
                f"permitted={permitted:x}, inheritable={inheritable:x}; expected {want:x}, "
                f"{want:x}, 0"
            ),
        )
