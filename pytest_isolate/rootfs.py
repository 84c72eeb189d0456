"""The new root file system: planned once per session, built in each sandbox.

``plan_rootfs`` (in pytest's process, once per distinct spec) turns the spec
and the host into a list of typed mount operations, as bubblewrap does with its
options; ``apply_rootfs`` (in the sandbox, already in its own mount, pid and
user namespaces) executes them in order on a fresh tmpfs, then pivots into it
and detaches the old root. Nothing here imports pytest.

The default view (see docs/how-it-works.md):
- host system directories read-only, recursively (submounts included);
- the project, the Python installation and sys.path read-only, wherever they live;
- /home, /root, /run, /mnt, /media, /srv empty unless granted; secrets masked;
- private writable tmpfs for /tmp, /var/tmp and $HOME; the test's temp base bound
  writable; a fresh /proc with runc's masks, a minimal /dev, /sys read-only;
- every writable mount nodev,nosuid.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import stat
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from . import syscalls as sc

TYPE_CHECKING = False  # not typing's: the init factory imports this module
if TYPE_CHECKING:
    from typing import Literal

    from .spec import Bind

__all__ = [
    "Op",
    "RootfsPlan",
    "SetupStepError",
    "apply_rootfs",
    "finish_joined_rootfs",
    "plan_rootfs",
]

#: Host directories shown read-only (symlinks such as /bin -> usr/bin are copied as links).
SYSTEM_DIRS = (
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc",
    "/opt",
    "/var",
)
#: Strict mode shows only what Python and its subprocesses need to run.
STRICT_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
#: Directories that exist but stay empty unless a path inside them is granted.
EMPTY_DIRS = ("/home", "/root", "/run", "/mnt", "/media", "/srv", "/tmp", "/var/tmp")
#: Secrets inside the read-only system view, masked with an empty file or directory.
MASKED_FILES = (
    "/etc/shadow",
    "/etc/gshadow",
    "/etc/shadow-",
    "/etc/gshadow-",
    "/etc/security/opasswd",
)
MASKED_GLOBS = ("/etc/ssh/ssh_host_*_key",)
MASKED_DIRS = ("/etc/ssl/private",)
#: Too big to scan for sockets and no business of a test: shown empty.
VAR_HIDDEN_DIRS = ("/var/lib/docker", "/var/lib/containers")
# runc's defaults: kernel information and knobs a container has no business with.
PROC_MASKED_FILES = (
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/sysrq-trigger",
)
PROC_MASKED_DIRS = ("/proc/acpi", "/proc/asound", "/proc/scsi")
PROC_READONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys")
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


class SetupStepError(Exception):
    """A sandbox setup step failed; names the step, and the OSError's call and errno."""

    def __init__(self, step: str, error: OSError) -> None:
        self.error = str(error.strerror or error)
        super().__init__(f"{step}: {self.error}")
        self.step = step
        self.errno = error.errno


@dataclass(frozen=True)
class Op:
    """One step of building the root. ``target`` is the path inside the sandbox."""

    kind: str  # dir | symlink | bind | overlay | tmpfs | mask_file | mask_dir | proc | dev | sys
    # (| devpts: only in what a reset makes again, plan_renewal)
    target: str
    source: str = ""
    writable: bool = False
    size: int = 0


@dataclass(frozen=True)
class RootfsPlan:
    staging: str  # host directory the new root is mounted on
    ops: tuple[Op, ...]
    cwd: str  # working directory inside the sandbox
    rootless: bool
    cgroup2: bool = False  # mount the (namespaced) cgroup2 tree at /sys/fs/cgroup
    overlay: bool = False  # fs="overlay": the root stays writable, writes discarded
    image_root: str | None = None
    scratch_size: int = 512 * 1024 * 1024


def _exists(path: str) -> bool:
    return os.path.lexists(path)


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def project_paths(
    extra: Iterable[str], shown: Sequence[str] = SYSTEM_DIRS, scratch: Iterable[str] = ()
) -> list[str]:
    """Directories the test needs to import: sys.path, the interpreter, the
    project and the packages already imported (editable installs point outside
    sys.path). Collapsed so that no path is listed below another, and none
    below a system directory the view already shows (``shown``). A
    ``scratch`` directory (/tmp, $HOME: the sandbox gets a private, writable
    one) is never listed whole, only what the test needs below it: pytest
    run from /tmp or from $HOME puts that directory on sys.path, and binding
    it would show the host's whole /tmp or home and make the sandbox's own
    read-only (tempfile, capfd)."""
    skipped = {os.path.abspath(p) for p in scratch if p and os.path.isabs(p)}
    skipped |= {os.path.realpath(p) for p in skipped}
    candidates: set[str] = set()
    for entry in (
        *sys.path,
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        os.path.dirname(sys.executable),
        *extra,
    ):
        if entry and os.path.isabs(entry) and os.path.exists(entry):
            candidates.add(os.path.abspath(entry))
            candidates.add(os.path.realpath(entry))
    # Hundreds of modules live in a few dozen directories: resolve each
    # directory once, and a module file only when it is itself a link.
    resolved: dict[str, str] = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not (isinstance(path, str) and os.path.isabs(path)):
            continue
        if os.path.islink(path):
            candidates.add(os.path.dirname(os.path.realpath(path)))
            continue
        directory = os.path.dirname(path)
        if directory not in resolved:
            resolved[directory] = os.path.realpath(directory)
        candidates.add(resolved[directory])
    with contextlib.suppress(OSError):
        candidates.add(os.path.realpath(sys.executable))
    kept: list[str] = []
    for path in sorted(candidates, key=lambda p: (p.count("/"), p)):
        if path == "/" or any(_under(path, d) for d in (*shown, "/proc", "/sys", "/dev")):
            continue
        if path in skipped:
            continue
        if any(_under(path, k) for k in kept):
            continue
        kept.append(path)
    return sorted(kept)


def python_paths(project: Sequence[str]) -> list[str]:
    """For an image root: the interpreter (each hop of its symlink chain), the
    standard library, lib-dynload, site-packages and the environment's prefix,
    where project_paths() skipped them for living under a system directory.
    Never a system directory itself: /usr bound whole would hide the image's."""
    import sysconfig

    candidates: set[str] = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        candidates.add(sysconfig.get_path(key))
    candidates.update(p for p in sys.path if p and os.path.isabs(p))
    candidates.update((sys.prefix, sys.exec_prefix))
    hop = sys.executable
    for _ in range(40):  # the symlink chain: venv/bin/python -> python3 -> /usr/bin/python3.11
        candidates.add(os.path.abspath(hop))
        if not os.path.islink(hop):
            break
        hop = os.path.join(os.path.dirname(hop), os.readlink(hop))
    kept: list[str] = []
    for path in sorted(candidates, key=lambda p: (p.count("/"), p)):
        if not os.path.exists(path) or path in SYSTEM_DIRS or path == "/":
            continue
        if any(_under(path, k) for k in (*kept, *project)):
            continue
        kept.append(path)
    return sorted(kept)


def _var_sockets(limit: int = 20000) -> list[str]:
    """Unix sockets under /var (read-only mounts do not stop connect()).
    The scan is bounded; /var/run and /var/lock usually link to the empty /run.
    The directory entries' types (d_type) say which entries may be sockets:
    only those, rarely any, are stat()ed."""
    found: list[str] = []
    seen = 0
    # Container stores are hidden whole (VAR_HIDDEN_DIRS), /var/tmp is a
    # private tmpfs: neither is shown, so neither needs a scan.
    skipped = (*VAR_HIDDEN_DIRS, "/var/tmp")
    pending = ["/var"]
    while pending and seen <= limit:
        try:
            entries = os.scandir(pending.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                seen += 1
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if entry.path not in skipped:
                            pending.append(entry.path)
                    elif (
                        not entry.is_file(follow_symlinks=False)
                        and not entry.is_symlink()
                        and stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode)
                    ):
                        found.append(entry.path)
                except OSError:
                    pass
    return sorted(found)


def scan_once() -> Callable[[], list[str]]:
    """The /var scan, made by the first call and remembered."""
    found: list[list[str]] = []

    def result() -> list[str]:
        if not found:
            found.append(_var_sockets())
        return found[0]

    return result


def start_var_scan() -> Callable[[], list[str]]:
    """Run the /var socket scan (tens of milliseconds on a host with a big
    package cache) in a forked process, on another core while pytest
    collects. Returns the function that gives its result, which scans here
    instead if the helper failed."""
    import warnings

    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # xdist's thread: see spawn()
            pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return _var_sockets
    if pid == 0:  # pragma: no cover - the helper process
        code = 1
        try:
            os.close(read_end)
            data = memoryview("\0".join(_var_sockets()).encode("utf-8", "surrogateescape"))
            while data:
                data = data[os.write(write_end, data) :]
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    found: list[list[str]] = []

    def result() -> list[str]:
        if not found:
            chunks = []
            try:
                while chunk := os.read(read_end, 1 << 16):
                    chunks.append(chunk)
            finally:
                os.close(read_end)
                _, status = os.waitpid(pid, 0)
            text = b"".join(chunks).decode("utf-8", "surrogateescape")
            ok = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
            found.append((text.split("\0") if text else []) if ok else _var_sockets())
        return found[0]

    return result


def plan_rootfs(
    *,
    staging: str,
    cwd: str,
    home: str | None,
    project: Sequence[str],
    binds: Sequence[Bind],
    writable_paths: Sequence[str],
    tmpfs_size: int,
    rootless: bool,
    cgroup2: bool,
    overlay: bool = False,
    image_root: str | None = None,
    strict: bool = False,
    var_sockets: Callable[[], list[str]] | None = None,
    hosts: str | None = None,
) -> RootfsPlan:
    """Build the ordered list of operations for the sandbox's root.

    Default: the host's system directories read-only. ``image_root``: an
    unpacked image instead (the host's Python and project still bound in).
    ``overlay``: every read-only view becomes an overlay whose writes land in
    a private tmpfs and vanish with the sandbox. ``hosts``: a file shown
    read-only as /etc/hosts (the host's, plus the sandbox's hostname).
    """
    ops: list[Op] = []
    shown = "overlay" if overlay else "bind"
    if image_root is None:
        for path in STRICT_SYSTEM_DIRS if strict else SYSTEM_DIRS:
            if os.path.islink(path):
                ops.append(Op("symlink", path, source=os.readlink(path)))
            elif os.path.isdir(path):
                ops.append(Op(shown, path, source=path))
        for path in EMPTY_DIRS:
            if path in ("/tmp", "/var/tmp"):
                ops.append(Op("tmpfs", path, writable=True, size=tmpfs_size))
            elif not os.path.islink(path):
                ops.append(Op("dir", path))
        for path in MASKED_FILES:
            if os.path.isfile(path):
                ops.append(Op("mask_file", path))
        for pattern in MASKED_GLOBS:
            ops.extend(Op("mask_file", p) for p in sorted(glob.glob(pattern)))
        for path in (*MASKED_DIRS, *VAR_HIDDEN_DIRS):
            if os.path.isdir(path):
                ops.append(Op("mask_dir", path))
        ops.extend(Op("mask_file", p) for p in (var_sockets or _var_sockets)())
        if hosts is not None and os.path.isfile("/etc/hosts"):
            ops.append(Op("bind", "/etc/hosts", source=hosts))
    else:
        ops.append(Op("tmpfs", "/tmp", writable=True, size=tmpfs_size))
    if (
        home
        and os.path.isabs(home)
        and home != "/"
        and not any(_under(home, d) for d in SYSTEM_DIRS)
    ):
        # A private, writable, throw-away $HOME: tools that write ~/.cache work.
        ops.append(Op("tmpfs", home, writable=True, size=tmpfs_size))
    for path in project:
        ops.append(Op(shown, path, source=path))
    if image_root is not None:
        # The image has no Python of ours. project_paths() leaves out what lives
        # under system directories (the default view shows those whole), so a
        # Debian /usr/bin/python3 or a venv in /opt would find no standard
        # library inside the image: bind the interpreter's own trees too.
        for path in python_paths(project):
            ops.append(Op(shown if os.path.isdir(path) else "bind", path, source=path))
    for path in writable_paths:
        ops.append(Op("bind", path, source=path, writable=True))
    for bind in binds:
        ops.append(Op("bind", bind.target, source=bind.source, writable=bind.writable))
    # Kernel file systems come last among the parents they live in.
    ops.append(Op("proc", "/proc"))
    ops.append(Op("dev", "/dev", size=tmpfs_size))
    ops.append(Op("sys", "/sys"))
    # Depth order: a mount must exist before anything is mounted inside it.
    # sorted() is stable, so same-depth operations keep their order above.
    ordered = sorted(ops, key=lambda op: op.target.rstrip("/").count("/"))
    return RootfsPlan(
        staging=staging,
        ops=tuple(ordered),
        cwd=cwd,
        rootless=rootless,
        cgroup2=cgroup2,
        overlay=overlay,
        image_root=image_root,
        scratch_size=tmpfs_size,
    )


# --------------------------------------------------------------------------- in the sandbox


def _step(name: str) -> _Step:
    return _Step(name)


class _Step:
    """Context manager turning an OSError into a SetupStepError naming the step."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> Literal[False]:
        if isinstance(exc, OSError) and not isinstance(exc, SetupStepError):
            raise SetupStepError(self.name, exc) from exc
        return False


def _mkdirs(path: str) -> None:
    # Nearly always the parent exists: one mkdir, not os.makedirs' walk (an
    # init made 19 of them, 0.4 ms of its CPU).
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
    except FileNotFoundError:
        os.makedirs(path, mode=0o755, exist_ok=True)


def _mountpoint(dest: str, source_is_dir: bool) -> None:
    if source_is_dir:
        _mkdirs(dest)
    elif not os.path.lexists(dest):
        _mkdirs(os.path.dirname(dest))
        os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


def _make_readonly(dest: str) -> None:
    # A read-only bind takes a second call; MS_BIND|MS_RDONLY alone stays writable.
    # mount_setattr covers submounts too (/sys/fs/cgroup under /sys, ...).
    if not sc.mount_setattr_rdonly(dest):
        sc.mount(None, dest, None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY | sc.MS_REC)


def _bind(op: Op, root: str, detached: Detached | None = None) -> None:
    dest = root + op.target
    # In a template's copy the host path was taken (detached) before the copy
    # was joined; elsewhere it is bound by its path.
    taken = detached.get(op.target) if detached is not None else None
    if taken is None and (detached is not None or not os.path.lexists(op.source)):
        raise SetupStepError(
            f"bind {op.source} -> {op.target}", FileNotFoundError(2, "the host path does not exist")
        )
    if taken is not None:
        _mountpoint(dest, taken[1])
        sc.move_mount_to(taken[0], dest)
    else:
        _mountpoint(dest, os.path.isdir(op.source))
        sc.mount(op.source, dest, None, sc.MS_BIND | sc.MS_REC)
    if op.writable:
        # Writable grants never carry devices or setuid programs (CAP_MKNOD + a
        # writable mount with devices = the host's disk).
        # Submounts included: a tmpfs mounted below the granted path would
        # otherwise keep its device nodes usable.
        if not sc.mount_setattr_nosuid_nodev(dest):
            sc.mount(None, dest, None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_NOSUID | sc.MS_NODEV)
    else:
        _make_readonly(dest)


def _escape_overlay_path(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def _overlay(lower: str, dest: str, scratch: str, name: str, rootless: bool) -> None:
    upper = f"{scratch}/upper/{name}"
    work = f"{scratch}/work/{name}"
    os.makedirs(upper, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    # The overlay's root directory takes its owner and mode from the upper
    # directory, not the lower one: copy them, or /etc (or another user's
    # project directory) would show as the sandbox's, mode 0755. Rootless, an
    # owner outside the user namespace cannot be set: the top stays ours.
    st = os.stat(lower)
    os.chmod(upper, stat.S_IMODE(st.st_mode))
    with contextlib.suppress(OSError):
        os.chown(upper, st.st_uid, st.st_gid)
    options = (
        f"lowerdir={_escape_overlay_path(lower)},upperdir={_escape_overlay_path(upper)},"
        f"workdir={_escape_overlay_path(work)}"
    )
    if rootless:
        # In a user namespace overlayfs keeps its metadata in user.* xattrs.
        options += ",userxattr"
    sc.mount("overlay", dest, "overlay", sc.MS_NOSUID | sc.MS_NODEV, options)


def _tmpfs(dest: str, size: int, mode: str = "1777", readonly: bool = False) -> None:
    _mkdirs(dest)
    flags = sc.MS_NOSUID | sc.MS_NODEV
    sc.mount("tmpfs", dest, "tmpfs", flags, f"mode={mode},size={max(size, 4096)}")
    if readonly:
        sc.mount(None, dest, None, sc.MS_REMOUNT | sc.MS_RDONLY | flags)


def _mask_file(root: str, target: str) -> None:
    dest = root + target
    if os.path.lexists(dest):
        sc.mount("/dev/null", dest, None, sc.MS_BIND)
        # The host's /dev/null: read-only, as the device binds (_setup_dev).
        _make_readonly(dest)


def _setup_proc(root: str) -> None:
    dest = root + "/proc"
    _mkdirs(dest)
    # A fresh proc: only the sandbox's pid namespace is visible, so no
    # /proc/<host pid>/root leads back to the host.
    sc.mount("proc", dest, "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    for path in PROC_MASKED_FILES:
        _mask_file(root, path)
    for path in PROC_MASKED_DIRS:
        if os.path.isdir(root + path):
            _tmpfs(root + path, 4096, mode="0555", readonly=True)
    for path in PROC_READONLY:
        if os.path.exists(root + path):
            sc.mount(root + path, root + path, None, sc.MS_BIND | sc.MS_REC)
            _make_readonly(root + path)


#: Target in the sandbox -> (detached mount of its host source, is a directory).
Detached = dict[str, tuple[int, bool]]


#: What an init takes from the host before joining a template's copy, where
#: the host is out of reach: (target in the sandbox, host path, with its
#: submounts as MS_BIND|MS_REC, is a directory).
Sources = tuple[tuple[str, str, bool, bool], ...]


def own_sources(own: Sequence[Op]) -> Sources:
    """The host paths the ``own`` operations bind, and the host's device
    nodes for /dev: decided once per template, with the paths present now."""
    wanted = [(op.target, op.source, True) for op in own if op.kind == "bind"]
    if any(op.kind == "dev" for op in own):
        wanted += [("/dev/" + name, "/dev/" + name, False) for name in DEVICES]
    return tuple(
        (target, source, recursive, os.path.isdir(source))
        for target, source, recursive in wanted
        if os.path.lexists(source)
    )


def detach_sources(sources: Sources) -> Detached:
    """Per init, before it joins the template's copy: each source as a
    detached bind mount. One gone since is left out: binding it fails as it
    would without a template."""
    detached: Detached = {}
    try:
        for target, source, recursive, is_dir in sources:
            try:
                fd = sc.open_tree_clone(source, recursive=recursive)
            except FileNotFoundError:
                continue
            detached[target] = (fd, is_dir)
    except OSError:
        close_detached(detached)
        raise
    return detached


def close_detached(detached: Detached) -> None:
    for fd, _ in detached.values():
        with contextlib.suppress(OSError):
            os.close(fd)


def _setup_dev(root: str, size: int, rootless: bool, detached: Detached | None) -> None:
    dest = root + "/dev"
    # nodev on the tmpfs itself: a node made with mknod here cannot be opened;
    # the bound host nodes below are mounts of their own and keep working.
    _tmpfs(dest, 1024 * 1024, mode="0755")
    for name in DEVICES:
        node = f"{dest}/{name}"
        if detached is not None:
            if "/dev/" + name not in detached:
                continue
            _mountpoint(node, False)
            sc.move_mount_to(detached["/dev/" + name][0], node)
        elif os.path.exists("/dev/" + name):
            _mountpoint(node, False)
            sc.mount("/dev/" + name, node, None, sc.MS_BIND)
        else:
            continue
        # The host's own node: read-only, or a test running as root (its
        # owner) could chmod, chown or touch it on the host. Reading and
        # writing the device itself are not writes to the file system.
        _make_readonly(node)
    if _devpts(dest + "/pts", rootless):
        os.symlink("pts/ptmx", dest + "/ptmx")
    _tmpfs(dest + "/shm", size)
    for link, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"{dest}/{link}")
    os.chmod(dest, 0o755)


def _devpts(dest: str, rootless: bool) -> bool:
    """A private devpts instance on ``dest``; False where there is none to have."""
    _mkdirs(dest)
    opts = "newinstance,ptmxmode=0666,mode=0620" + ("" if rootless else ",gid=5")
    try:
        sc.mount("devpts", dest, "devpts", sc.MS_NOSUID | sc.MS_NOEXEC, opts)
    except OSError:
        return False  # no private pty: programs needing one fail as on a host without devpts
    return True


def _seal_dev(dest: str) -> None:
    """/dev itself read-only once everything beneath it is made: what a test
    can write there are its own /dev/shm and /dev/pts (file systems of their
    own, made again for each test of a reused sandbox, renew_own), never
    /dev's own entries, so a reused sandbox keeps /dev as it is."""
    sc.mount(
        None, dest, None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV
    )


def _setup_sys(root: str, cgroup2: bool) -> None:
    dest = root + "/sys"
    _mkdirs(dest)
    flags = sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC | sc.MS_RDONLY
    try:
        # A fresh sysfs shows the sandbox's own network devices (lo only).
        sc.mount("sysfs", dest, "sysfs", flags)
    except OSError:
        # Not allowed without an own network namespace (net="host" rootless).
        sc.mount("/sys", dest, None, sc.MS_BIND | sc.MS_REC)
        _make_readonly(dest)
        return
    if cgroup2:
        _mount_cgroup2(dest + "/fs/cgroup")


def _mount_cgroup2(dest: str) -> None:
    # Informational only: the limits are enforced from outside. Rooted at the
    # mounter's cgroup namespace: made by the test process, after it joined
    # its cgroup and unshared that namespace.
    with contextlib.suppress(OSError):
        sc.mount(
            "cgroup2", dest, "cgroup2", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC | sc.MS_RDONLY
        )


def apply_rootfs(plan: RootfsPlan) -> None:
    """Build the root described by ``plan`` and pivot into it.

    Runs in the sandbox after its mount, pid (and user) namespaces exist and
    before the capability drop. Every failure raises SetupStepError naming the
    step, the syscall, the path and the errno.
    """
    root = _prepare_staging(plan)
    _run_ops(plan, plan.ops, root)
    _pivot(plan)
    with _step(f"chdir {plan.cwd}"):
        os.chdir(plan.cwd if os.path.isdir(plan.cwd) else "/")


#: What each sandbox must mount for itself: a writable file system of its own,
#: a view of its own pid (/proc) or network (/sys) namespace, and the masks. A
#: mount stays on the file it was made on: when the host replaces a masked
#: file (a daemon's new socket, a new /etc/shadow), a mask in the template
#: would be left on the old one, and the new file shown.
_OWN_KINDS = frozenset({"tmpfs", "proc", "dev", "sys", "overlay", "mask_file", "mask_dir"})
#: Own operations that need a mount point made in the template (a mask goes
#: on a file or directory that is there already, or is skipped).
_NEEDS_MOUNT_POINT = frozenset({"tmpfs", "proc", "dev", "sys", "overlay", "bind"})


def split_template(plan: RootfsPlan) -> tuple[tuple[Op, ...], tuple[Op, ...]] | None:
    """(shared, own): the operations a template mount namespace can hold for
    every sandbox of this plan (the binds of host paths, directories,
    symlinks), and those each sandbox makes in its copy of it (every writable
    tmpfs, /proc, /dev, /sys, the masks, and whatever lies beneath them). None
    when nothing can be shared: an overlay or an image root is writable as a
    whole."""
    if plan.overlay or plan.image_root is not None:
        return None
    shared: list[Op] = []
    own: list[Op] = []
    own_targets: list[str] = []
    for op in plan.ops:
        if op.kind in _OWN_KINDS or any(_under(op.target, t) for t in own_targets):
            own.append(op)
            own_targets.append(op.target)
        else:
            shared.append(op)
    # /dev first: in the copy, the host's /dev/null that masks files in /proc
    # is only reachable through the sandbox's own /dev.
    own.sort(key=lambda op: op.kind != "dev")
    return tuple(shared), tuple(own)


def template_sources(shared: Sequence[Op]) -> tuple[tuple[str, int, int], ...]:
    """(path, device, inode) of each host path the shared part binds: a
    template whose sources no longer match was made from files the host has
    replaced since (its mounts stay on the old ones) and is made again."""
    found = []
    for op in shared:
        if op.kind == "bind":
            st = os.stat(op.source)
            found.append((op.source, st.st_dev, st.st_ino))
    return tuple(found)


def template_current(sources: Sequence[tuple[str, int, int]]) -> bool:
    for path, dev, ino in sources:
        try:
            st = os.stat(path)
        except OSError:
            return False
        if (st.st_dev, st.st_ino) != (dev, ino):
            return False
    return True


def build_template(plan: RootfsPlan, shared: Sequence[Op], own: Sequence[Op]) -> None:
    """In a new mount namespace: the root with only the ``shared``
    operations applied, read-only, pivoted into, every mount a slave or
    private (a copy made for a sandbox receives the host's mount events as a
    root built whole does, and sends none). The mount points of the ``own``
    operations that lie in the shared part are made here, since the copies
    cannot write there."""
    root = _prepare_staging(plan)
    _run_ops(plan, shared, root)
    # Outermost: beneath no other own operation's target. Two on one path
    # (the project's bind over the tmpfs of /tmp or $HOME, pytest run from
    # there) are both outermost: the copy still needs that mount point.
    outer = [
        op
        for op in own
        if op.kind in _NEEDS_MOUNT_POINT
        and not any(_under(op.target, o.target) and o.target != op.target for o in own)
    ]
    for op in outer:
        with _step(f"make the mount point {op.target}"):
            is_dir = op.kind != "bind" or os.path.isdir(op.source)
            with contextlib.suppress(OSError):
                # A mount point that cannot be made here fails in the sandbox,
                # with the sandbox's own error message.
                _mountpoint(root + op.target, is_dir)
    _pivot(plan)
    with _step("make the template's mounts slaves"):
        # As a root built whole: the host's mount events beneath a bound path
        # come in (its binds are slaves of the host's mounts), none go out,
        # and none cross from one copy to another (a copy of a slave is a
        # slave of the same master, never a peer of the other copies).
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_SLAVE)


def apply_own(plan: RootfsPlan, own: Sequence[Op], detached: Detached) -> None:
    """In a copy of the template's mount namespace (build_template): this
    sandbox's own mounts, then its working directory. ``detached``: from
    detach_sources(), taken before the copy was joined."""
    _run_ops(plan, own, "", detached)
    with _step(f"chdir {plan.cwd}"):
        os.chdir(plan.cwd if os.path.isdir(plan.cwd) else "/")


#: Own operations made again when a sandbox is reset for another test: the
#: writable file systems (/dev's own included: plan_renewal), and /sys (it
#: shows the network namespace it was mounted in).
_RENEWED_KINDS = frozenset({"tmpfs", "devpts", "sys"})


#: What renew_own does between two tests: the mount points it detaches, the
#: operations it runs again, and what it takes first from the sandbox's own
#: mounts (Sources whose source is the path inside the sandbox).
Renewal = tuple[tuple[str, ...], tuple[Op, ...], Sources]


def plan_renewal(own: Sequence[Op], taken: Sources) -> Renewal:
    """Decided once per template, from its ``own`` operations and what each
    init takes from the host for them (own_sources). /dev is read-only
    (_seal_dev): only its /dev/pts and /dev/shm are made again."""
    ops: list[Op] = []
    for op in own:
        if op.kind == "dev":
            ops += [Op("devpts", op.target + "/pts"), Op("tmpfs", op.target + "/shm", size=op.size)]
        else:
            ops.append(op)
    tops = [op.target for op in ops if op.kind in _RENEWED_KINDS]
    tops = [t for t in tops if not any(_under(t, o) and t != o for o in tops)]
    again = tuple(op for op in ops if any(_under(op.target, t) for t in tops))
    sources = tuple(
        (target, target, recursive, is_dir)
        for target, _, recursive, is_dir in taken
        if any(_under(target, t) for t in tops)
    )
    return tuple(tops), again, sources


def renew_own(plan: RootfsPlan, renewal: Renewal) -> None:
    """In a sandbox copied from a template (apply_own), between two tests:
    detach every writable file system of the sandbox (with all that is
    mounted beneath it) and /sys, and make them again as apply_own made
    them. The host paths bound beneath them (the device nodes of /dev, a
    project under /tmp) are taken from the sandbox's own mounts first, where
    they are the ones apply_own attached."""
    tops, again, sources = renewal
    detached = detach_sources(sources)
    try:
        os.chdir("/")
        for top in tops:
            with _step(f"detach {top}"):
                try:
                    sc.umount2(top, sc.MNT_DETACH)
                except OSError as exc:
                    # Not a mount point: /dev/pts where devpts could not be
                    # mounted (_devpts). Made again all the same.
                    if exc.errno != errno.EINVAL:
                        raise
        _run_ops(plan, again, "", detached)
    finally:
        close_detached(detached)
    with _step(f"chdir {plan.cwd}"):
        os.chdir(plan.cwd if os.path.isdir(plan.cwd) else "/")


def _prepare_staging(plan: RootfsPlan) -> str:
    root = plan.staging
    scratch = os.path.dirname(root)
    with _step("make / a recursive slave mount"):
        # First, or every mount below would propagate back to the host.
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_SLAVE)
    with _step(f"mount the scratch tmpfs on {scratch}"):
        # Holds the new root's mount point and the overlays' upper layers; it is
        # left behind with the old root, but overlays keep their own reference.
        sc.mount(
            "tmpfs",
            scratch,
            "tmpfs",
            sc.MS_NOSUID | sc.MS_NODEV,
            f"mode=0700,size={plan.scratch_size}",
        )
        os.mkdir(root, 0o755)
    if plan.image_root is not None:
        with _step(f"mount the image {plan.image_root} as the root"):
            # An overlay even when read-only: mount points for the host's Python
            # and project can be made in its upper layer, never in the image.
            _overlay(plan.image_root, root, scratch, "image", plan.rootless)
    else:
        with _step(f"mount tmpfs on {root}"):
            sc.mount("tmpfs", root, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755,size=1m")
    return root


def _run_ops(
    plan: RootfsPlan, ops: Sequence[Op], root: str, detached: Detached | None = None
) -> None:
    scratch = os.path.dirname(plan.staging)
    for index, op in enumerate(ops):
        with _step(f"{op.kind} {op.target}"):
            if op.kind == "dir":
                _mkdirs(root + op.target)
            elif op.kind == "symlink":
                os.symlink(op.source, root + op.target)
            elif op.kind == "bind":
                _bind(op, root, detached)
            elif op.kind == "overlay":
                _mountpoint(root + op.target, True)
                _overlay(op.source, root + op.target, scratch, str(index), plan.rootless)
            elif op.kind == "tmpfs":
                _tmpfs(root + op.target, op.size)
            elif op.kind == "mask_file":
                _mask_file(root, op.target)
            elif op.kind == "mask_dir":
                if os.path.isdir(root + op.target):
                    _tmpfs(root + op.target, 4096, mode="0000", readonly=True)
            elif op.kind == "proc":
                _setup_proc(root)
            elif op.kind == "dev":
                _setup_dev(root, op.size, plan.rootless, detached)
            elif op.kind == "sys":
                _setup_sys(root, plan.cgroup2)
            elif op.kind == "devpts":
                _devpts(root + op.target, plan.rootless)
            else:  # pragma: no cover - plans are built by plan_rootfs only
                raise SetupStepError(op.kind, OSError(22, "unknown operation"))
    for op in ops:
        if op.kind == "dev":  # last: binds beneath /dev need their mount points
            with _step(f"make {op.target} read-only"):
                _seal_dev(root + op.target)


def _pivot(plan: RootfsPlan) -> None:
    with _step("pivot_root into the new root"):
        # runc's way: no directory for the old root is needed, and the old root
        # ends up stacked on "." where it is made a slave and detached, so no
        # path leads back to the host (a bare chroot is escapable).
        os.chdir(plan.staging)
        sc.pivot_root(".", ".")
        sc.mount(None, ".", None, sc.MS_REC | sc.MS_SLAVE)
        sc.umount2(".", sc.MNT_DETACH)
        os.chdir("/")
    if not plan.overlay:
        with _step("remount the new root read-only"):
            sc.mount(None, "/", None, sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV)


def finish_joined_rootfs(plan: RootfsPlan) -> None:
    """In a test process that joined the namespaces of an init which built the
    root (initd.py): what only the test process itself can do there."""
    if plan.cgroup2 and any(op.kind == "sys" for op in plan.ops):
        _mount_cgroup2("/sys/fs/cgroup")
    with _step(f"chdir {plan.cwd}"):
        os.chdir(plan.cwd if os.path.isdir(plan.cwd) else "/")
