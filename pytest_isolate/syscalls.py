"""The kernel calls the sandbox needs, each raising OSError with its errno.

The standard library is used where it has the call (os.unshare and os.setns
from Python 3.12 on, os.pidfd_open, os.memfd_create); everything else goes
through libc with ``use_errno=True``. Flags are rendered by name in errors so
a failed step reads as ``mount('/proc', MS_NOSUID|MS_NODEV): EPERM``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct

__all__ = [
    "CLONE_NEWCGROUP",
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWUSER",
    "CLONE_NEWUTS",
    "MNT_DETACH",
    "MS_BIND",
    "MS_NODEV",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "MS_SLAVE",
    "SyscallError",
    "landlock_writes_beneath",
    "mount",
    "mount_setattr_nosuid_nodev",
    "mount_setattr_rdonly",
    "move_mount_to",
    "open_tree_clone",
    "pivot_root",
    "prctl",
    "sethostname",
    "setns",
    "umount2",
    "unshare",
]

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_STRICTATIME = 1 << 24

MNT_DETACH = 2

_MS_NAMES = {
    MS_RDONLY: "MS_RDONLY",
    MS_NOSUID: "MS_NOSUID",
    MS_NODEV: "MS_NODEV",
    MS_NOEXEC: "MS_NOEXEC",
    MS_REMOUNT: "MS_REMOUNT",
    MS_BIND: "MS_BIND",
    MS_MOVE: "MS_MOVE",
    MS_REC: "MS_REC",
    MS_PRIVATE: "MS_PRIVATE",
    MS_SLAVE: "MS_SLAVE",
    MS_STRICTATIME: "MS_STRICTATIME",
}
_CLONE_NAMES = {
    CLONE_NEWNS: "CLONE_NEWNS",
    CLONE_NEWCGROUP: "CLONE_NEWCGROUP",
    CLONE_NEWUTS: "CLONE_NEWUTS",
    CLONE_NEWIPC: "CLONE_NEWIPC",
    CLONE_NEWUSER: "CLONE_NEWUSER",
    CLONE_NEWPID: "CLONE_NEWPID",
    CLONE_NEWNET: "CLONE_NEWNET",
}

#: The CPU architecture (os.uname, not platform: this module runs in the small
#: init factory, which keeps its imports few).
_MACHINE = os.uname().machine

# mount_setattr(2), Linux 5.12+: the one call that makes a whole tree read-only.
_SYS_MOUNT_SETATTR = {"x86_64": 442, "aarch64": 442}.get(_MACHINE)
_AT_RECURSIVE = 0x8000
_AT_EMPTY_PATH = 0x1000
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4

# open_tree(2) and move_mount(2), Linux 5.2+: a bind mount taken in one mount
# namespace and attached in another.
_SYS_OPEN_TREE = {"x86_64": 428, "aarch64": 428}.get(_MACHINE)
_SYS_MOVE_MOUNT = {"x86_64": 429, "aarch64": 429}.get(_MACHINE)
_OPEN_TREE_CLONE = 1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
# Every function a test process calls is looked up here, in pytest's process:
# ctypes makes a function object on first access and stores it in the
# library's __dict__, which a forked child doing that would copy pages of.
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]


class SyscallError(OSError):
    """OSError whose message names the call and its arguments."""


def flag_names(flags: int, table: dict[int, str] | None = None) -> str:
    table = _MS_NAMES if table is None else table
    names = [name for bit, name in table.items() if flags & bit]
    rest = flags & ~sum(b for b in table if flags & b)
    if rest:
        names.append(hex(rest))
    return "|".join(names) or "0"


def _raise(call: str) -> None:
    err = ctypes.get_errno()
    raise SyscallError(err, f"{call}: {errno.errorcode.get(err, err)} ({os.strerror(err)})")


def _b(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    if _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        shown = f"mount({source!r}, {target!r}, {fstype!r}, {flag_names(flags)}"
        _raise(shown + (f", {data!r})" if data else ")"))


def umount2(target: str, flags: int = 0) -> None:
    if _libc.umount2(_b(target), flags) != 0:
        _raise(f"umount2({target!r}, {'MNT_DETACH' if flags & MNT_DETACH else flags})")


def pivot_root(new_root: str, put_old: str) -> None:
    # glibc has no wrapper for pivot_root: call it by number.
    nr = {"x86_64": 155, "aarch64": 41}[_MACHINE]
    if _libc.syscall(nr, _b(new_root), _b(put_old)) != 0:
        _raise(f"pivot_root({new_root!r}, {put_old!r})")


def open_tree_clone(path: str, *, recursive: bool) -> int:
    """A detached bind mount of ``path`` (close-on-exec descriptor), to be
    attached with move_mount_to() in this or another mount namespace.
    ``recursive``: with the mounts beneath it, as MS_BIND|MS_REC."""
    if _SYS_OPEN_TREE is None:
        raise SyscallError(errno.ENOSYS, f"open_tree({path!r}): not on {_MACHINE}")
    flags = _OPEN_TREE_CLONE | os.O_CLOEXEC | (_AT_RECURSIVE if recursive else 0)
    fd = _libc.syscall(_SYS_OPEN_TREE, -100, _b(path), flags)
    if fd < 0:
        shown = "OPEN_TREE_CLONE|AT_RECURSIVE" if recursive else "OPEN_TREE_CLONE"
        _raise(f"open_tree({path!r}, {shown})")
    return int(fd)


def move_mount_to(fd: int, target: str) -> None:
    """Attach the detached mount ``fd`` (open_tree_clone) at ``target``."""
    if _SYS_MOVE_MOUNT is None:
        raise SyscallError(errno.ENOSYS, f"move_mount(-> {target!r}): not on {_MACHINE}")
    if _libc.syscall(_SYS_MOVE_MOUNT, fd, b"", -100, _b(target), _MOVE_MOUNT_F_EMPTY_PATH) != 0:
        _raise(f"move_mount(<detached mount>, {target!r}, MOVE_MOUNT_F_EMPTY_PATH)")


class _MountAttr(ctypes.Structure):
    """struct mount_attr of mount_setattr(2)."""

    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _mount_setattr_recursive(path: str, attr_set: int, shown: str) -> bool:
    if _SYS_MOUNT_SETATTR is None:
        return False
    attr = _MountAttr(attr_set, 0, 0, 0)
    rc = _libc.syscall(
        _SYS_MOUNT_SETATTR, -100, _b(path), _AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)
    )
    if rc != 0:
        if ctypes.get_errno() == errno.ENOSYS:
            return False
        _raise(f"mount_setattr({path!r}, AT_RECURSIVE, {shown})")
    return True


def mount_setattr_rdonly(path: str, *, nosuid_nodev: bool = False) -> bool:
    """Make the mount at ``path`` and every submount read-only in one call.

    Returns False where the kernel lacks mount_setattr (before 5.12), so the
    caller falls back to remounting each submount.
    """
    if nosuid_nodev:
        return _mount_setattr_recursive(
            path,
            _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV,
            "MOUNT_ATTR_RDONLY|MOUNT_ATTR_NOSUID|MOUNT_ATTR_NODEV",
        )
    return _mount_setattr_recursive(path, _MOUNT_ATTR_RDONLY, "MOUNT_ATTR_RDONLY")


def mount_setattr_nosuid_nodev(path: str) -> bool:
    """Make the mount at ``path`` and every submount nosuid,nodev (writability
    unchanged) in one call; False where the kernel lacks mount_setattr."""
    return _mount_setattr_recursive(
        path, _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, "MOUNT_ATTR_NOSUID|MOUNT_ATTR_NODEV"
    )


# Landlock (Linux 5.13+; TRUNCATE from ABI 3, 6.2).
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_ACCESS_FS_WRITE_FILE = 1 << 1
_LANDLOCK_ACCESS_FS_TRUNCATE = 1 << 14
_LANDLOCK_RULE_PATH_BENEATH = 1
_LANDLOCK_CREATE_RULESET_VERSION = 1 << 0


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_writes_beneath(root: str) -> bool:
    """Allow opening files for writing (and truncating them) only beneath
    ``root`` of this mount namespace, for this process and its children.

    Returns False where the kernel has no Landlock. Needs no_new_privs.
    """
    abi = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0, _LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        return False
    access = _LANDLOCK_ACCESS_FS_WRITE_FILE | (_LANDLOCK_ACCESS_FS_TRUNCATE if abi >= 3 else 0)
    handled = ctypes.c_uint64(access)
    ruleset = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(handled), 8, 0)
    if ruleset < 0:
        _raise("landlock_create_ruleset(WRITE_FILE|TRUNCATE)")
    try:
        beneath = os.open(root, os.O_PATH | os.O_CLOEXEC)
        try:
            rule = _PathBeneath(access, beneath)
            if (
                _libc.syscall(
                    _SYS_LANDLOCK_ADD_RULE,
                    ruleset,
                    _LANDLOCK_RULE_PATH_BENEATH,
                    ctypes.byref(rule),
                    0,
                )
                != 0
            ):
                _raise(f"landlock_add_rule(PATH_BENEATH {root!r})")
        finally:
            os.close(beneath)
        if _libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
            _raise("landlock_restrict_self()")
    finally:
        os.close(ruleset)
    return True


def unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        _raise(f"unshare({flag_names(flags, _CLONE_NAMES)})")


def setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        _raise(f"setns({fd}, {flag_names(nstype, _CLONE_NAMES)})")


def set_process_name(name: str) -> None:
    """The name ps, top and /proc/PID/comm show (at most 15 bytes)."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _libc.prctl(PR_SET_NAME, ctypes.addressof(buf), 0, 0, 0)


def loopback_up() -> None:
    """Bring the loopback interface of this network namespace up."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, siocgifflags, ifreq))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH22x", b"lo", flags | iff_up))


def sethostname(name: str) -> None:
    raw = name.encode()
    if _libc.sethostname(raw, len(raw)) != 0:
        _raise(f"sethostname({name!r})")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    rc: int = _libc.prctl(option, arg2, arg3, arg4, arg5)
    if rc < 0:
        _raise(f"prctl({option}, {arg2})")
    return rc


PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36


# clone(2) with CLONE_PARENT: a "fork" whose child is the caller's sibling,
# a child of the caller's parent (the zygote of zygote.py forks test
# processes that are pytest's own children).
_CLONE_PARENT = 0x00008000
_CLONE_CHILD_SETTID = 0x01000000
_SIGCHLD = 17
_SYS_CLONE = {"x86_64": 56}.get(_MACHINE)
#: glibc caches each thread's kernel tid in its thread descriptor (struct
#: pthread, at pthread_self()): glibc's own fork() refreshes it in the child
#: with CLONE_CHILD_SETTID. The offset is glibc's x86_64 layout, checked at
#: run time against gettid() before it is trusted.
_GLIBC_TID_OFFSET = {"x86_64": 0x2D0}.get(_MACHINE)


_libc.pthread_self.restype = ctypes.c_ulong
#: syscall() through PyDLL: the GIL stays held across the call, as os.fork()
#: holds it across fork().
_syscall_holding_gil = ctypes.PyDLL(None, use_errno=True).syscall
# Resolved here, as _libc's (PyOS_AfterFork_Child is only ever called in a child).
_before_fork = ctypes.pythonapi.PyOS_BeforeFork
_after_fork_child = ctypes.pythonapi.PyOS_AfterFork_Child
_after_fork_parent = ctypes.pythonapi.PyOS_AfterFork_Parent
_syscall_holding_gil.restype = ctypes.c_long
_syscall_holding_gil.argtypes = [ctypes.c_long, ctypes.c_ulong] + [ctypes.c_void_p] * 4


def glibc_tid_address() -> int | None:
    """Where glibc keeps the calling thread's tid (a raw clone's
    CLONE_CHILD_SETTID), if its layout is the one expected (the value there
    is the thread's tid)."""
    if _GLIBC_TID_OFFSET is None:
        return None
    import threading

    address = int(_libc.pthread_self()) + _GLIBC_TID_OFFSET
    if ctypes.c_int.from_address(address).value != threading.get_native_id():
        return None
    return address


def sibling_fork_unavailable() -> str | None:
    """Why fork_sibling() cannot work here (None: it can)."""
    if _SYS_CLONE is None:
        return f"clone(CLONE_PARENT) is only wired for x86_64, this is {_MACHINE}"
    if glibc_tid_address() is None:
        return "the C library's thread descriptor is not the glibc layout this was checked on"
    return None


#: clone3(2) (Linux 5.3+) and its flag that makes the child in a given cgroup
#: v2 directory (5.7+): the child is born there, no cgroup.procs write.
_SYS_CLONE3 = {"x86_64": 435}.get(_MACHINE)
CLONE_INTO_CGROUP = 0x200000000


class _CloneArgs(ctypes.Structure):
    """struct clone_args, as far as the cgroup field (CLONE_ARGS_SIZE_VER2)."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "flags",
            "pidfd",
            "child_tid",
            "parent_tid",
            "exit_signal",
            "stack",
            "stack_size",
            "tls",
            "set_tid",
            "set_tid_size",
            "cgroup",
        )
    ]


def fork_sibling(cgroup_fd: int = -1, *, sibling: bool = True, flags: int = 0) -> int:
    """os.fork(), except that the child's parent is the caller's parent.

    clone() is called directly (libc has no wrapper for this flag), between
    Python's own before/after-fork steps, as os.fork() does: at-fork
    handlers run, the interpreter's locks and thread state are reset in the
    child. The GIL stays held across the call (PyDLL). Only for a process
    with a single thread: no other thread may hold a lock at that moment
    (glibc's own at-fork steps, its allocator's locks, are skipped).

    ``cgroup_fd``: a cgroup v2 directory the child is born in, with clone3
    and CLONE_INTO_CGROUP (Linux 5.7+), so nobody writes the child's pid to
    a cgroup.procs file, whose wait for the kernel is the cost docs/
    performance.md calls trap 1. Raises OSError where that fails (ENOSYS
    before 5.3 or under a seccomp profile that refuses clone3, EOPNOTSUPP
    or EBADF when the descriptor is no cgroup v2 directory, EACCES...),
    and nothing was forked then. ``sibling=False``: the child is the
    caller's own (the caller must still have a single thread). ``flags``:
    more clone flags, the namespaces the child is born in (CLONE_NEWUSER
    with the others: an unprivileged caller may make them all at once).
    """
    tid = glibc_tid_address()
    if _SYS_CLONE is None or tid is None:
        raise OSError(errno.ENOSYS, "fork_sibling: " + str(sibling_fork_unavailable()))
    if cgroup_fd >= 0 and _SYS_CLONE3 is None:
        raise OSError(errno.ENOSYS, f"clone3 is only wired for x86_64, this is {_MACHINE}")
    flags |= _CLONE_CHILD_SETTID | (_CLONE_PARENT if sibling else 0)
    _before_fork()
    if cgroup_fd >= 0:
        args = _CloneArgs(
            flags=flags | CLONE_INTO_CGROUP,
            child_tid=tid,
            # CLONE_PARENT: the child's exit signal is the caller's own, and
            # clone3 refuses any other (EINVAL).
            exit_signal=0 if sibling else _SIGCHLD,
            cgroup=cgroup_fd,
        )
        pid = _syscall_holding_gil(
            _SYS_CLONE3, ctypes.addressof(args), ctypes.sizeof(args), None, None, None
        )
    else:
        pid = _syscall_holding_gil(_SYS_CLONE, flags | _SIGCHLD, None, None, tid, None)
    if pid == 0:
        _after_fork_child()
        return 0
    err = ctypes.get_errno()
    _after_fork_parent()
    if pid < 0:
        names = _CLONE_NAMES | {CLONE_INTO_CGROUP: "CLONE_INTO_CGROUP"}
        shown = flags & ~(_CLONE_CHILD_SETTID | _CLONE_PARENT)
        call = "clone3" if cgroup_fd >= 0 else "clone"
        named = flag_names(shown | (CLONE_INTO_CGROUP if cgroup_fd >= 0 else 0), names)
        raise OSError(err, f"{call}({named}): {os.strerror(err)}")
    return int(pid)
