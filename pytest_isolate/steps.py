"""A test process's setup after its namespaces, compiled once per plan and run
in C (_steps.c): the root (rootfs.apply_rootfs), the hostname, the loopback.

apply_rootfs in Python costs the test process far more than its system calls:
every line touches objects on pages it shares with pytest, and each page
written is copied (docs/performance.md, point 31). Here pytest's process
turns the plan into a program once (``compile_setup``), and the test process
hands it to ``_steps.run``, which makes the same calls in the same order and
writes nothing of pytest's.

The program holds no decision about the host that apply_rootfs makes when it
runs: whether a bind's source is there, a directory or a file, whether a
mask's target exists, are steps of the program, checked in the test process
as before. So a program depends on its plan alone, and when a step fails the
test process compiles the plan again (``failure``) to name the step and the
call as apply_rootfs would have. Nothing here imports pytest.
"""

from __future__ import annotations

import errno as _errno
import os
import struct
from collections.abc import Callable

from . import syscalls as sc
from .rootfs import (
    DEVICES,
    PROC_MASKED_DIRS,
    PROC_MASKED_FILES,
    PROC_READONLY,
    Op,
    RootfsPlan,
    SetupStepError,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .sandbox import SandboxPlan

# The steps of _steps.c.
_MKDIR, _MKFILE, _SYMLINK, _MOUNT, _SETATTR, _REQUIRE = 1, 2, 3, 4, 5, 6
_IF_LEXISTS, _IF_ISDIR, _IF_EXISTS, _JUMP, _CHMOD, _CHDIR = 7, 8, 9, 10, 11, 12
_PIVOT, _UMOUNT, _HOSTNAME, _LOOPBACK, _WRITE = 13, 14, 15, 16, 17
_CAPS, _NO_NEW_PRIVS, _LANDLOCK, _SECCOMP, _PRCTL, _UNSHARE = 18, 19, 20, 21, 22, 23
_HEAD = struct.Struct("=IiIIQQ")
_RDONLY_FALLBACK = sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY | sc.MS_REC
_NOSUID_FALLBACK = sc.MS_REMOUNT | sc.MS_BIND | sc.MS_NOSUID | sc.MS_NODEV

#: What a failed step raises, given its errno.
Describe = Callable[[int], BaseException]


def _os_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _call_error(call: str) -> Describe:
    """A failed call as syscalls.py reports it (syscalls._raise)."""

    def describe(code: int) -> OSError:
        name = _errno.errorcode.get(code, str(code))
        return sc.SyscallError(code, f"{call}: {name} ({os.strerror(code)})")

    return describe


class _Program:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        #: Per step: the sandbox's step (sandbox._sandbox_main), the name
        #: the error carries, and what the error is.
        self.steps: list[tuple[str, str, Describe]] = []
        self.outer = "build the root file system"
        self.name = ""

    def __len__(self) -> int:
        return len(self.steps)

    def emit(
        self,
        op: int,
        *strings: str | bytes | None,
        a: int = 0,
        b: int = 0,
        skip: int = 0,
        onerr: int = -1,
        describe: Describe = _os_error,
    ) -> None:
        raw = [s if isinstance(s, bytes) else os.fsencode(s or "") for s in strings]
        self.parts.append(_HEAD.pack(op, onerr, skip, len(raw), a, b))
        for item in raw:
            self.parts.append(struct.pack("=I", len(item)) + item + b"\0")
        self.steps.append((self.outer, self.name, describe))

    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: int = 0,
        data: str | None = None,
        *,
        onerr: int = -1,
    ) -> None:
        shown = f"mount({source!r}, {target!r}, {fstype!r}, {sc.flag_names(flags)}"
        shown += f", {data!r})" if data else ")"
        self.emit(
            _MOUNT, source, target, fstype, data, a=flags, onerr=onerr, describe=_call_error(shown)
        )

    def readonly(self, path: str) -> None:  # rootfs._make_readonly
        self.emit(
            _SETATTR,
            path,
            a=sc._MOUNT_ATTR_RDONLY,
            b=_RDONLY_FALLBACK,
            describe=_call_error(f"mount_setattr({path!r}, AT_RECURSIVE, MOUNT_ATTR_RDONLY)"),
        )

    def mkdir(self, path: str) -> None:  # rootfs._mkdirs
        self.emit(_MKDIR, path, a=0o755)

    def tmpfs(self, dest: str, size: int, mode: str = "1777", readonly: bool = False) -> None:
        self.mkdir(dest)
        flags = sc.MS_NOSUID | sc.MS_NODEV
        self.mount("tmpfs", dest, "tmpfs", flags, f"mode={mode},size={max(size, 4096)}")
        if readonly:
            self.mount(None, dest, None, sc.MS_REMOUNT | sc.MS_RDONLY | flags)

    def mask_file(self, dest: str) -> None:
        self.emit(_IF_LEXISTS, dest, skip=2)
        self.mount("/dev/null", dest, None, sc.MS_BIND)
        self.readonly(dest)

    def masked_dir(self, dest: str, mode: str) -> None:
        self.emit(_IF_ISDIR, dest, skip=3)
        self.tmpfs(dest, 4096, mode=mode, readonly=True)

    def blob(self) -> bytes:
        return b"".join(self.parts)


def _bind(prog: _Program, op: Op, root: str) -> None:  # rootfs._bind, without a template
    dest = root + op.target
    source = op.source or ""
    missing = SetupStepError(
        f"bind {op.source} -> {op.target}", FileNotFoundError(2, "the host path does not exist")
    )
    prog.emit(_REQUIRE, source, describe=lambda code: missing)
    prog.emit(_IF_ISDIR, source, skip=2)
    prog.mkdir(dest)
    prog.emit(_JUMP, skip=1)
    prog.emit(_MKFILE, dest)
    prog.mount(source, dest, None, sc.MS_BIND | sc.MS_REC)
    if op.writable:
        prog.emit(
            _SETATTR,
            dest,
            a=sc._MOUNT_ATTR_NOSUID | sc._MOUNT_ATTR_NODEV,
            b=_NOSUID_FALLBACK,
            describe=_call_error(
                f"mount_setattr({dest!r}, AT_RECURSIVE, MOUNT_ATTR_NOSUID|MOUNT_ATTR_NODEV)"
            ),
        )
    else:
        prog.readonly(dest)


def _proc(prog: _Program, root: str) -> None:  # rootfs._setup_proc
    dest = root + "/proc"
    prog.mkdir(dest)
    prog.mount("proc", dest, "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    for path in PROC_MASKED_FILES:
        prog.mask_file(root + path)
    for path in PROC_MASKED_DIRS:
        prog.masked_dir(root + path, "0555")
    for path in PROC_READONLY:
        prog.emit(_IF_EXISTS, root + path, skip=2)
        prog.mount(root + path, root + path, None, sc.MS_BIND | sc.MS_REC)
        prog.readonly(root + path)


def _dev(prog: _Program, root: str, size: int, rootless: bool) -> None:  # rootfs._setup_dev
    dest = root + "/dev"
    prog.tmpfs(dest, 1024 * 1024, mode="0755")
    for name in DEVICES:
        node = f"{dest}/{name}"
        prog.emit(_IF_EXISTS, "/dev/" + name, skip=3)
        prog.emit(_MKFILE, node)
        prog.mount("/dev/" + name, node, None, sc.MS_BIND)
        prog.readonly(node)
    prog.mkdir(dest + "/pts")
    opts = "newinstance,ptmxmode=0666,mode=0620" + ("" if rootless else ",gid=5")
    # No private pty where devpts cannot be had: no ptmx link either.
    prog.mount("devpts", dest + "/pts", "devpts", sc.MS_NOSUID | sc.MS_NOEXEC, opts, onerr=1)
    prog.emit(_SYMLINK, "pts/ptmx", dest + "/ptmx")
    prog.tmpfs(dest + "/shm", size)
    for link, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        prog.emit(_SYMLINK, target, f"{dest}/{link}")
    prog.emit(_CHMOD, dest, a=0o755)


def _sys(prog: _Program, root: str, cgroup2: bool) -> None:  # rootfs._setup_sys
    dest = root + "/sys"
    prog.mkdir(dest)
    flags = sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC | sc.MS_RDONLY
    # Refused without a network namespace of its own: /sys bound instead.
    prog.mount("sysfs", dest, "sysfs", flags, onerr=2 if cgroup2 else 1)
    if cgroup2:
        cgroup = dest + "/fs/cgroup"
        prog.mount(
            "cgroup2",
            cgroup,
            "cgroup2",
            sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC | sc.MS_RDONLY,
            onerr=0,
        )
    prog.emit(_JUMP, skip=2)
    prog.mount("/sys", dest, None, sc.MS_BIND | sc.MS_REC)
    prog.readonly(dest)


def _rootfs(prog: _Program, plan: RootfsPlan) -> bool:
    """rootfs.apply_rootfs as steps; False where it has no program (an
    overlay or an image as the root)."""
    if plan.overlay or plan.image_root is not None:
        return False
    root = plan.staging
    scratch = os.path.dirname(root)
    prog.name = "make / a recursive slave mount"
    prog.mount(None, "/", None, sc.MS_REC | sc.MS_SLAVE)
    prog.name = f"mount the scratch tmpfs on {scratch}"
    prog.mount(
        "tmpfs", scratch, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, f"mode=0700,size={plan.scratch_size}"
    )
    prog.mkdir(root)
    prog.name = f"mount tmpfs on {root}"
    prog.mount("tmpfs", root, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755,size=1m")
    for op in plan.ops:
        prog.name = f"{op.kind} {op.target}"
        dest = root + op.target
        if op.kind == "dir":
            prog.mkdir(dest)
        elif op.kind == "symlink":
            prog.emit(_SYMLINK, op.source, dest)
        elif op.kind == "bind":
            _bind(prog, op, root)
        elif op.kind == "tmpfs":
            prog.tmpfs(dest, op.size)
        elif op.kind == "mask_file":
            prog.mask_file(dest)
        elif op.kind == "mask_dir":
            prog.masked_dir(dest, "0000")
        elif op.kind == "proc":
            _proc(prog, root)
        elif op.kind == "dev":
            _dev(prog, root, op.size, plan.rootless)
        elif op.kind == "sys":
            _sys(prog, root, plan.cgroup2)
        elif op.kind == "devpts":
            prog.mkdir(dest)
            opts = "newinstance,ptmxmode=0666,mode=0620" + ("" if plan.rootless else ",gid=5")
            prog.mount("devpts", dest, "devpts", sc.MS_NOSUID | sc.MS_NOEXEC, opts, onerr=0)
        else:
            return False  # an overlay, or a kind this program does not know
    for op in plan.ops:
        if op.kind == "dev":  # rootfs._seal_dev
            prog.name = f"make {op.target} read-only"
            prog.mount(
                None,
                root + op.target,
                None,
                sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV,
            )
    prog.name = "pivot_root into the new root"  # rootfs._pivot
    prog.emit(_CHDIR, plan.staging)
    prog.emit(_PIVOT, describe=_call_error("pivot_root('.', '.')"))
    prog.mount(None, ".", None, sc.MS_REC | sc.MS_SLAVE)
    prog.emit(_UMOUNT, ".", a=sc.MNT_DETACH, describe=_call_error("umount2('.', MNT_DETACH)"))
    prog.emit(_CHDIR, "/")
    prog.name = "remount the new root read-only"
    prog.mount(None, "/", None, sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV)
    prog.name = f"chdir {plan.cwd}"
    prog.emit(_IF_ISDIR, plan.cwd, skip=2)
    prog.emit(_CHDIR, plan.cwd)
    prog.emit(_JUMP, skip=1)
    prog.emit(_CHDIR, "/")
    return True


def _compile(plan: SandboxPlan) -> _Program | None:
    prog = _Program()
    if plan.rootfs is not None and not _rootfs(prog, plan.rootfs):
        return None
    # sandbox._sandbox_main's steps after the root.
    prog.outer = "set the hostname"
    prog.name = f"sethostname({plan.hostname!r})"
    prog.emit(_HOSTNAME, plan.hostname, describe=_call_error(prog.name))
    if plan.new_net:
        prog.name = "bring the loopback interface up"
        prog.emit(_LOOPBACK)
    return prog


def compile_setup(plan: SandboxPlan) -> bytes | None:
    """The program of ``plan``'s root, hostname and loopback, for
    ``_steps.run``; None where Python does them (an overlay or image root,
    no namespaces)."""
    if not plan.namespaces:
        return None
    prog = _compile(plan)
    return prog.blob() if prog is not None else None


def _compile_born(plan: SandboxPlan) -> _Program:
    """sandbox._sandbox_main's first steps in a rootless test process born
    in its namespaces as the C pid 1's child: its ids mapped (dumpable for
    those writes only), then a cgroup namespace of its own."""
    prog = _Program()
    prog.outer = "map the user namespace"
    prog.emit(
        _PRCTL, a=sc.PR_SET_DUMPABLE, b=1, describe=_call_error(f"prctl({sc.PR_SET_DUMPABLE}, 1)")
    )
    from .sandbox import id_map_writes

    for path, text in id_map_writes(plan.uid, plan.gid):
        prog.name = f"write {text!r} to {path}"
        prog.emit(_WRITE, path, text)
    prog.name = ""
    prog.emit(
        _PRCTL, a=sc.PR_SET_DUMPABLE, b=0, describe=_call_error(f"prctl({sc.PR_SET_DUMPABLE}, 0)")
    )
    prog.outer = "unshare the cgroup namespace"
    prog.name = "unshare(CLONE_NEWCGROUP)"
    flags = sc.flag_names(sc.CLONE_NEWCGROUP, sc._CLONE_NAMES)
    prog.emit(_UNSHARE, a=sc.CLONE_NEWCGROUP, describe=_call_error(f"unshare({flags})"))
    return prog


def compile_born(plan: SandboxPlan) -> bytes | None:
    """The program of ``_compile_born``, for a rootless plan (else None)."""
    return _compile_born(plan).blob() if plan.rootless and plan.namespaces else None


def compile_secure(plan: SandboxPlan) -> bytes | None:
    """The program of sandbox._test_main's last steps before pytest's:
    the capability drop (or no_new_privs alone), Landlock, the filter, in
    the order of sandbox.secure_parts. A step that fails there is made
    again by Python, which raises its own error (or succeeds, and the next
    steps are Python's too)."""
    from .sandbox import secure_parts

    prog = _Program()
    for part in secure_parts(plan):
        if part == "caps":
            from .capabilities import prepare_capabilities

            assert plan.caps is not None
            drop, _, want = prepare_capabilities(plan.caps)
            if any(bit >= 64 for bit in drop):
                return None
            prog.emit(_CAPS, a=sum(1 << bit for bit in drop), b=want)
        elif part == "no_new_privs":
            prog.emit(_NO_NEW_PRIVS)
        elif part == "landlock":
            prog.emit(_LANDLOCK, "/")
        else:
            prog.emit(_SECCOMP, plan.seccomp_program)
    return prog.blob()


def failure(
    plan: SandboxPlan, index: int, code: int, *, born: bool = False
) -> tuple[str, BaseException]:
    """The sandbox's step and the exception of the program's step ``index``
    that failed with ``code``, as the Python steps would have raised it:
    of the program of compile_setup, or of compile_born (``born``)."""
    prog = _compile_born(plan) if born else _compile(plan)
    if prog is None or not 0 <= index < len(prog):
        return "build the root file system", SetupStepError(
            "run the setup program", OSError(code, os.strerror(code))
        )
    outer, name, describe = prog.steps[index]
    exc = describe(code)
    if name and isinstance(exc, OSError) and not isinstance(exc, SetupStepError):
        exc = SetupStepError(name, exc)
    return outer, exc
