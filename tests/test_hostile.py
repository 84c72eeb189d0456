"""What a hostile test tries, from inside a real isolated test: the classic
chroot escape, a host directory descriptor left open by a wider fixture
(runc CVE-2024-21626), a new user namespace to remount a read-only grant, its
own mounts, hard links out of tmp_path, signals and ptrace against init.

Each test writes a small inner test file, runs it with ``pytest --isolate`` in
a subprocess and checks both the inner outcome and the host afterwards. Runs
as root and, through tests/test_rootless.py, as an unprivileged user.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import requires
from rootless_util import (
    BugSymptom,
    host_mounts,
    run_isolated,
    write_hostinfo,
)

# These tests watch the host from outside the sandboxes they start: they must
# themselves run on the host, also when the suite is run with --isolate.
pytestmark = pytest.mark.isolated(False)


@pytest.fixture
def host_dir(tmp_path: Path) -> Path:
    """A host directory no sandbox shows: the target of every escape attempt."""
    path = tmp_path / "host-only"
    path.mkdir()
    (path / "data.txt").write_text("host data")
    return path


@pytest.fixture
def host_sleeper() -> Iterator[subprocess.Popen[bytes]]:
    sleeper = subprocess.Popen(["sleep", "60"])
    yield sleeper
    sleeper.kill()
    sleeper.wait()


# --------------------------------------------------------------------------- the root


@requires("root")
def test_chroot_escape_reaches_nothing_of_the_host(
    pytester: pytest.Pytester, host_dir: Path
) -> None:
    # As root the default capabilities keep SYS_CHROOT: the classic escape
    # runs for real. Under pivot_root with the old root detached, climbing out
    # of the chroot ends at the sandbox's own root.
    hidden = [
        str(p) for d in ("/mnt", "/home", "/srv") if os.path.isdir(d) for p in Path(d).iterdir()
    ]
    write_hostinfo(pytester, HOST_DIR=str(host_dir), HIDDEN=hidden)
    pytester.makepyfile("""
        import os
        import pytest
        from hostinfo import HIDDEN, HOST_DIR

        def assert_still_in_the_sandbox(root, listing):
            st = os.stat("/")
            assert (st.st_dev, st.st_ino) == (root.st_dev, root.st_ino)
            assert sorted(os.listdir("/")) == listing
            assert not os.path.exists(HOST_DIR)
            assert [p for p in HIDDEN if os.path.exists(p)] == []
            with pytest.raises(OSError):
                open(os.path.join(HOST_DIR, "escaped"), "w")

        def test_mkdir_chroot_climb_chroot():
            root, listing = os.stat("/"), sorted(os.listdir("/"))
            os.makedirs("/tmp/jail/inner", exist_ok=True)
            os.chroot("/tmp/jail")  # the working directory stays outside the jail
            for _ in range(256):
                os.chdir("..")
            os.chroot(".")
            assert_still_in_the_sandbox(root, listing)

        def test_fchdir_to_a_descriptor_opened_before_the_chroot():
            root, listing = os.stat("/"), sorted(os.listdir("/"))
            os.makedirs("/tmp/jail", exist_ok=True)
            fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
            os.chroot("/tmp/jail")
            os.fchdir(fd)
            for _ in range(256):
                os.chdir("..")
            os.chroot(".")
            assert_still_in_the_sandbox(root, listing)
    """)
    run_isolated(pytester).assert_outcomes(passed=2)
    assert os.listdir(host_dir) == ["data.txt"]


def test_old_root_is_detached(pytester: pytest.Pytester) -> None:
    host_root = os.stat("/").st_dev
    write_hostinfo(pytester, HOST_ROOT_DEV=host_root)
    pytester.makepyfile("""
        import os
        from hostinfo import HOST_ROOT_DEV

        def test_no_mount_shows_the_whole_host_root():
            assert os.stat("/").st_dev != HOST_ROOT_DEV
            whole = f"{os.major(HOST_ROOT_DEV)}:{os.minor(HOST_ROOT_DEV)}"
            with open("/proc/self/mountinfo") as f:
                # fields: id parent major:minor root mount-point ...
                entries = [line.split()[2:5] for line in f]
            assert [e for e in entries if e[0] == whole and e[1] == "/"] == []
    """)
    run_isolated(pytester).assert_outcomes(passed=1)


def test_the_hosts_device_nodes_cannot_be_changed_from_inside(pytester: pytest.Pytester) -> None:
    """/dev/null and the other nodes are the host's own, bound into the
    sandbox (/dev/null also over each masked secret): as root (their owner)
    a test could chmod, chown or touch them on the host. Each attempt (the
    same mode and owner: harmless if it got through) fails on the read-only
    binds, the devices still work, and the host's nodes are untouched.
    In a sandbox made new, one reset, and roots built whole."""
    nodes = [f"/dev/{n}" for n in ("null", "zero", "full", "random", "urandom", "tty")]
    nodes = [n for n in nodes if os.path.exists(n)]
    before = {n: os.stat(n) for n in nodes}
    write_hostinfo(pytester, NODES=nodes)
    pytester.makepyfile("""
        import errno, os
        import pytest
        from hostinfo import NODES

        def _whole_build(n):
            # A root that is not the template's copy: built whole, binding
            # the host's nodes directly (a capability beyond the defaults).
            return pytest.param(n, marks=pytest.mark.isolated(caps_add=["SYS_PTRACE"]))

        @pytest.mark.parametrize("n", [*range(3), _whole_build(3), _whole_build(4)])
        def test_nodes_are_read_only(n):
            for node in NODES:
                st = os.stat(node)
                for change in (
                    lambda: os.chmod(node, st.st_mode & 0o7777),
                    lambda: os.chown(node, st.st_uid, st.st_gid),
                    lambda: os.utime(node),
                ):
                    with pytest.raises(OSError) as info:
                        change()
                    assert info.value.errno in (errno.EROFS, errno.EPERM), node
            # The masks over secrets are the host's /dev/null too.
            for mask in ("/etc/shadow", "/proc/kcore"):
                if os.path.exists(mask) and os.stat(mask).st_rdev == os.stat("/dev/null").st_rdev:
                    with pytest.raises(OSError) as info:
                        os.utime(mask)
                    assert info.value.errno in (errno.EROFS, errno.EPERM), mask
            with open("/dev/null", "wb") as f:
                f.write(b"still a device")
            with open("/dev/urandom", "rb") as f:
                assert len(f.read(16)) == 16
    """)
    run_isolated(pytester).assert_outcomes(passed=5)
    for node, st in before.items():
        now = os.stat(node)
        assert (now.st_mode, now.st_uid, now.st_gid, now.st_ctime_ns) == (
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_ctime_ns,
        ), node


def test_hard_link_or_rename_from_tmp_path_does_not_reach_the_project(
    pytester: pytest.Pytester,
) -> None:
    test_file = pytester.makepyfile("""
        import errno, os
        import pytest

        def test_link_and_rename_across_mounts_fail(tmp_path):
            with pytest.raises(OSError) as info:
                os.link(__file__, tmp_path / "linked.py")
            assert info.value.errno == errno.EXDEV
            with pytest.raises(OSError) as info:
                os.rename(__file__, tmp_path / "moved.py")
            assert info.value.errno in (errno.EXDEV, errno.EROFS)

        def test_symlink_from_tmp_path_still_meets_the_read_only_mount(tmp_path):
            os.symlink(__file__, tmp_path / "alias.py")
            with pytest.raises(OSError) as info:
                open(tmp_path / "alias.py", "a")
            assert info.value.errno in (errno.EROFS, errno.EACCES)
    """)
    content = test_file.read_bytes()
    run_isolated(pytester).assert_outcomes(passed=2)
    assert test_file.read_bytes() == content


def test_new_user_namespace_cannot_make_a_read_only_grant_writable(
    pytester: pytest.Pytester, host_dir: Path
) -> None:
    # Without the syscall filter a test may create a user namespace and hold
    # every capability in it; mounts it inherits from a more privileged
    # namespace are locked, so the grant stays read-only.
    write_hostinfo(pytester, HOST_DIR=str(host_dir))
    pytester.makepyfile("""
        import ctypes, errno, os
        import pytest
        from hostinfo import HOST_DIR

        CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
        MS_REMOUNT, MS_BIND, MNT_DETACH = 32, 4096, 2
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]

        def attempt():
            if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
                return "unshare refused"
            if libc.mount(None, b"/data", None, MS_REMOUNT | MS_BIND, None) == 0:
                return "remounted read-write"
            if libc.umount2(b"/data", MNT_DETACH) == 0:
                return "unmounted the grant"
            try:
                open("/data/escaped", "w").close()
            except OSError as e:
                return f"write refused: {errno.errorcode[e.errno]}"
            return "wrote into the grant"

        @pytest.mark.isolated(binds=[f"{HOST_DIR}:/data"], seccomp=False)
        def test_unshare_then_remount():
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.write(w, attempt().encode())
                os._exit(0)
            os.close(w)
            os.waitpid(pid, 0)
            outcome = os.read(r, 200).decode()
            assert outcome in ("unshare refused", "write refused: EROFS")
    """)
    run_isolated(pytester).assert_outcomes(passed=1)
    assert os.listdir(host_dir) == ["data.txt"]


def test_mount_made_inside_never_appears_on_the_host(pytester: pytest.Pytester) -> None:
    # Granted SYS_ADMIN, a test may mount; the sandbox's mounts are slaves of
    # the host's, so nothing propagates back (run_isolated checks the host).
    pytester.makepyfile("""
        import ctypes, os

        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]

        import pytest

        @pytest.mark.isolated(caps_add=["sys_admin"])
        def test_mounts_a_tmpfs_over_its_tmp_path(tmp_path):
            target = tmp_path / "mnt"
            target.mkdir()
            assert libc.mount(b"tmpfs", str(target).encode(), b"tmpfs", 0, None) == 0, \\
                os.strerror(ctypes.get_errno())
            (target / "inside-the-mount").write_text("private")
    """)
    run_isolated(pytester).assert_outcomes(passed=1)
    mnt = {p.resolve() for p in pytester.path.glob("runpytest-*/**/mnt")}
    assert len(mnt) == 1, mnt
    assert os.listdir(mnt.pop()) == []
    assert host_mounts(str(pytester.path)) == set()


# --------------------------------------------------------------------------- processes


def test_killing_init_and_everything_in_reach_spares_the_test_and_the_host(
    pytester: pytest.Pytester, host_sleeper: subprocess.Popen[bytes]
) -> None:
    pytester.makepyfile("""
        import contextlib, ctypes, errno, os, signal, time
        import pytest

        def test_kill_init_and_all():
            os.kill(1, signal.SIGKILL)  # init of a pid namespace ignores it from inside
            with contextlib.suppress(ProcessLookupError):
                os.kill(-1, signal.SIGKILL)
            time.sleep(0.1)

        def test_init_cannot_be_traced_or_read():
            libc = ctypes.CDLL(None, use_errno=True)
            libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                                    ctypes.c_void_p]
            assert libc.ptrace(16, 1, None, None) == -1  # PTRACE_ATTACH
            assert ctypes.get_errno() == errno.EPERM
            with pytest.raises(PermissionError):
                open("/proc/1/environ", "rb")
            with pytest.raises(PermissionError):
                os.readlink("/proc/1/root")
    """)
    run_isolated(pytester).assert_outcomes(passed=2)
    assert host_sleeper.poll() is None


def test_asking_init_to_kill_everything_ends_only_this_test(
    pytester: pytest.Pytester, host_sleeper: subprocess.Popen[bytes]
) -> None:
    # Rootless without a cgroup, pid 1 takes SIGRTMIN+5 (pytest's request to
    # kill the rest of the namespace, sandbox.KILL_ALL_SIGNAL); elsewhere it
    # ignores it. Either way only this test ends, and the next runs as usual.
    pytester.makepyfile("""
        import os, signal, time

        def test_asks_init_to_kill_everything():
            for sig in (signal.SIGRTMIN + 5, signal.SIGRTMIN + 3, signal.SIGRTMIN + 4):
                os.kill(1, sig)
            time.sleep(1)

        def test_next():
            pass
    """)
    result = run_isolated(pytester, "-v")
    result.stdout.fnmatch_lines(["*::test_next PASSED*"])
    outcomes = result.parseoutcomes()
    if outcomes.get("failed"):
        assert outcomes == {"failed": 1, "passed": 1}
        result.stdout.fnmatch_lines(["*the test process was killed by SIGKILL (9)*"])
    else:
        assert outcomes == {"passed": 2}
    assert host_sleeper.poll() is None


# --------------------------------------------------------------------------- descriptors

LEAKY_CONFTEST = """
    import os, socket
    import pytest
    from hostinfo import HOST_DIR

    @pytest.fixture(scope="session")
    def leaked():
        # Opened in pytest's process, before any sandbox exists.
        fds = {"dir": os.open(HOST_DIR, os.O_RDONLY | os.O_DIRECTORY),
               "path": os.open(HOST_DIR, os.O_PATH),
               "file": os.open(os.path.join(HOST_DIR, "data.txt"), os.O_RDONLY)}
        here, there = socket.socketpair()
        fds["socket"] = here.fileno()
        yield fds
        here.close()
        there.close()
        for name in ("dir", "path", "file"):
            os.close(fds[name])
"""

LEAKY_TESTS = """
    import errno, os, socket, stat
    import pytest
    from hostinfo import HOST_DIR, STDIO

    def open_fds():
        found = {}
        for name in os.listdir("/proc/self/fd"):
            try:
                found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
            except OSError:
                pass  # the listing's own descriptor
        return found

    def assert_closed(fd):
        with pytest.raises(OSError) as info:
            os.fstat(fd)
        assert info.value.errno == errno.EBADF

    def test_directory_descriptors_are_closed(leaked):
        assert_closed(leaked["dir"])
        assert_closed(leaked["path"])
        with pytest.raises(OSError):
            os.fchdir(leaked["dir"])  # CVE-2024-21626: fchdir + chroot(".")
        for fd in open_fds():
            with pytest.raises(OSError):
                os.listdir(f"/proc/self/fd/{fd}/")
        assert [t for t in open_fds().values() if t == HOST_DIR] == []

    def test_file_and_socket_descriptors_are_kept(leaked):
        assert os.pread(leaked["file"], 64, 0) == b"host data"
        with socket.socket(fileno=os.dup(leaked["socket"])) as s:
            s.sendall(b"still connected")

    @pytest.mark.isolated(strict=True)
    def test_strict_keeps_only_stdio_and_pytests_capture(leaked):
        for fd in leaked.values():
            assert_closed(fd)
        # What may remain: the result pipe, the memfds pytest's process reads
        # stdout, stderr and a stack dump from, and pytest's capture (/dev/null
        # and the real stdin, stdout and stderr it saved: pipes and files).
        extra = {fd: t for fd, t in open_fds().items() if fd > 2}
        strays = {fd: t for fd, t in extra.items()
                  if not (t.startswith(("pipe:", "/memfd:isolate-")) or t == "/dev/null"
                          or t in STDIO)}
        assert strays == {}
"""


def test_leaked_host_descriptors_are_closed_and_others_kept(
    pytester: pytest.Pytester, host_dir: Path
) -> None:
    # pytest's fd capture keeps the real stdout and stderr: pytester's files.
    stdio = [str(pytester.path / "stdout"), str(pytester.path / "stderr")]
    write_hostinfo(pytester, HOST_DIR=str(host_dir), STDIO=stdio)
    pytester.makeconftest(LEAKY_CONFTEST)
    tests = pytester.makepyfile(LEAKY_TESTS)
    result = run_isolated(
        pytester,
        "-v",
        f"{tests.name}::test_directory_descriptors_are_closed",
        f"{tests.name}::test_file_and_socket_descriptors_are_kept",
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*::test_directory_descriptors_are_closed PASSED [[]isolated[]]*",
            "*::test_file_and_socket_descriptors_are_kept PASSED [[]isolated[]]*",
        ]
    )


def test_strict_profile_closes_every_inherited_descriptor(
    pytester: pytest.Pytester, host_dir: Path
) -> None:
    stdio = [str(pytester.path / "stdout"), str(pytester.path / "stderr")]
    write_hostinfo(pytester, HOST_DIR=str(host_dir), STDIO=stdio)
    pytester.makeconftest(LEAKY_CONFTEST)
    tests = pytester.makepyfile(LEAKY_TESTS)
    result = run_isolated(
        pytester, "-v", f"{tests.name}::test_strict_keeps_only_stdio_and_pytests_capture"
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["*::test_strict_keeps_only_stdio_and_pytests_capture PASSED [[]isolated[]]*"]
    )


def test_read_only_descriptor_of_a_host_file_cannot_be_reopened_for_writing(
    pytester: pytest.Pytester, host_dir: Path
) -> None:
    write_hostinfo(pytester, HOST_DIR=str(host_dir))
    pytester.makeconftest(LEAKY_CONFTEST)
    pytester.makepyfile("""
        import errno, os
        import pytest
        from hostinfo import HOST_DIR

        def test_reopen_through_proc_for_writing(leaked):
            assert not os.path.exists(HOST_DIR)
            with pytest.raises(OSError) as info:
                with open(f"/proc/self/fd/{leaked['file']}", "a") as f:
                    f.write("written through a read-only descriptor")
            assert info.value.errno in (errno.EROFS, errno.EACCES)
    """)
    result = run_isolated(pytester)
    if (host_dir / "data.txt").read_text() != "host data":
        raise BugSymptom(f"the test wrote {host_dir / 'data.txt'} on the host")
    result.assert_outcomes(passed=1)


def test_strict_profile_keeps_pytest_capture_working(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.isolated(strict=True)
        def test_prints():
            print("hello from a strict sandbox")
            assert False
    """)
    result = run_isolated(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Captured stdout call*", "hello from a strict sandbox"])


def test_no_descriptor_of_a_host_namespace_reaches_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import os

        def test_no_namespace_handle():
            handles = {}
            for name in os.listdir("/proc/self/fd"):
                try:
                    target = os.readlink(f"/proc/self/fd/{name}")
                except OSError:
                    continue
                if target.split(":")[0] in ("pid", "net", "mnt", "user", "uts", "ipc",
                                            "cgroup", "time"):
                    handles[int(name)] = target
            assert handles == {}
    """)
    run_isolated(pytester).assert_outcomes(passed=1)


def test_no_channel_to_pytest_or_its_helpers_reaches_the_test(pytester: pytest.Pytester) -> None:
    """pytest's process talks to the init factory (a root process outside
    every sandbox) and to the zygote (a copy of pytest that forks sandboxes)
    over unix seqpacket sockets: a test that inherited one could ask for
    inits, or unsandboxed forks of pytest, of its own making. Sockets of
    pytest's plugins and fixtures are inherited as under any forking runner;
    these, and the pidfds of other sandboxes, are not. Several tests, so
    that the later ones come from the zygote; then tests of a spec the
    zygote does not know, which pytest's process forks while the zygote
    lives (and holds its channel)."""
    pytester.makepyfile("""
        import os, socket, stat
        import pytest

        @pytest.mark.parametrize("i", range(4))
        def test_no_factory_socket_or_pidfd_inherited(i):
            check()

        @pytest.mark.isolated(hostname="later")
        @pytest.mark.parametrize("i", range(3))
        def test_forked_by_pytest_beside_the_zygote(i):
            check()

        def check():
            found = {}
            for name in os.listdir("/proc/self/fd"):
                fd = int(name)
                try:
                    mode = os.fstat(fd).st_mode
                    target = os.readlink(f"/proc/self/fd/{name}")
                except OSError:
                    continue
                if target == "anon_inode:[pidfd]":
                    found[fd] = target
                elif stat.S_ISSOCK(mode):
                    sock = socket.socket(fileno=os.dup(fd))
                    if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_SEQPACKET:
                        found[fd] = target
                    sock.close()
            assert found == {}
    """)
    run_isolated(pytester).assert_outcomes(passed=7)
