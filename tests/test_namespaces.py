"""Namespaces, proved from inside real isolated tests: pid (init reaps, the
host's processes are out of reach, nothing outlives the test), network (only
loopback, up; the host's listeners unreachable; the same port in two parallel
tests), uts (a private hostname), ipc, and the environment.

Each test writes a small inner test file, runs it with ``pytest --isolate`` in
a subprocess, and checks both the inner outcome and the host afterwards. Runs
as root and, through tests/test_rootless.py, as an unprivileged user.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest
from rootless_util import (
    processes_mentioning,
    raise_on_bug_symptoms,
    run_isolated,
    write_hostinfo,
)

# These tests watch the host from outside the sandboxes they start: they must
# themselves run on the host, also when the suite is run with --isolate.
pytestmark = pytest.mark.isolated(False)

PROC_HELPERS = """
import os

def pids():
    return {int(p) for p in os.listdir("/proc") if p.isdigit()}

def state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0]
    except OSError:
        return None
"""


@pytest.fixture
def host_sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process on the host that no isolated test may reach."""
    sleeper = subprocess.Popen(["sleep", "60"])
    yield sleeper
    sleeper.kill()
    sleeper.wait()


# --------------------------------------------------------------------------- pid namespace


def test_orphan_of_a_double_fork_is_reaped_by_pid_1(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(prochelpers=PROC_HELPERS)
    pytester.makepyfile("""
        import os, time
        from prochelpers import pids, state

        def test_test_sees_only_init_and_itself():
            # pid 2 beside the init (pid 1); the parent is pytest, outside the
            # namespace (ppid 0), or the init itself where pytest is rootless.
            assert os.getpid() == 2 and os.getppid() in (0, 1)
            assert pids() == {1, 2}

        def test_orphan_is_adopted_and_reaped_by_pid_1():
            r, w = os.pipe()
            middle = os.fork()
            if middle == 0:
                if os.fork() == 0:
                    time.sleep(0.2)  # its parent is gone by now: it is an orphan
                    os.write(w, f"{os.getpid()} {os.getppid()}".encode())
                    os._exit(0)
                os._exit(0)
            os.close(w)
            os.waitpid(middle, 0)
            orphan, adopter = map(int, os.read(r, 64).split())
            assert adopter == 1
            deadline = time.monotonic() + 5
            while state(orphan) is not None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert state(orphan) is None, f"orphan {orphan} left in state {state(orphan)!r}"
            assert pids() == {1, 2}
    """)
    result = run_isolated(pytester, "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*::test_test_sees_only_init_and_itself PASSED [[]isolated[]]*",
            "*::test_orphan_is_adopted_and_reaped_by_pid_1 PASSED [[]isolated[]]*",
        ]
    )


def test_test_runs_as_the_callers_own_uid(pytester: pytest.Pytester) -> None:
    # Rootless the user namespace maps the caller's ids to themselves: file
    # ownership means the same inside and out. As root, the test is root.
    write_hostinfo(pytester, UID=os.getuid(), GID=os.getgid())
    pytester.makepyfile("""
        import os
        from hostinfo import GID, UID

        def test_same_ids(tmp_path):
            assert (os.getuid(), os.geteuid(), os.getgid()) == (UID, UID, GID)
            (tmp_path / "owned").write_text("mine")
            st = os.stat(tmp_path / "owned")
            assert (st.st_uid, st.st_gid) == (UID, GID)
    """)
    run_isolated(pytester).assert_outcomes(passed=1)
    owned = {p.resolve() for p in pytester.path.glob("runpytest-*/**/owned")}
    assert [(p.stat().st_uid, p.stat().st_gid) for p in owned] == [(os.getuid(), os.getgid())]


def test_host_process_cannot_be_signalled_traced_or_read(
    pytester: pytest.Pytester, host_sleeper: subprocess.Popen[bytes]
) -> None:
    write_hostinfo(pytester, HOST_PID=host_sleeper.pid)
    pytester.makepyfile("""
        import contextlib, ctypes, errno, os, signal
        import pytest
        from hostinfo import HOST_PID

        def test_host_pid_does_not_exist_here():
            with pytest.raises(ProcessLookupError):
                os.kill(HOST_PID, 0)
            with pytest.raises(ProcessLookupError):
                os.kill(HOST_PID, signal.SIGKILL)
            with pytest.raises(ProcessLookupError):
                os.pidfd_open(HOST_PID)
            assert not os.path.exists(f"/proc/{HOST_PID}")
            with pytest.raises(FileNotFoundError):
                open(f"/proc/{HOST_PID}/environ", "rb")
            with pytest.raises(FileNotFoundError):
                os.readlink(f"/proc/{HOST_PID}/root")

        def test_host_pid_cannot_be_traced():
            libc = ctypes.CDLL(None, use_errno=True)
            libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                                    ctypes.c_void_p]
            assert libc.ptrace(16, HOST_PID, None, None) == -1  # PTRACE_ATTACH
            assert ctypes.get_errno() in (errno.ESRCH, errno.EPERM)

        def test_signal_to_every_process_in_reach():
            with contextlib.suppress(ProcessLookupError):
                os.kill(-1, signal.SIGKILL)
    """)
    result = run_isolated(pytester)
    result.assert_outcomes(passed=3)
    assert host_sleeper.poll() is None, "the host process died during the isolated run"


def test_double_forked_daemon_is_gone_after_the_test(pytester: pytest.Pytester) -> None:
    mark = f"pytest-isolate-daemon-{uuid.uuid4().hex}"
    write_hostinfo(pytester, MARK=mark)
    pytester.makepyfile("""
        import os, time
        from hostinfo import MARK

        def test_starts_a_daemon(tmp_path):
            beat = tmp_path / "beat"
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    # Deaf to the polite signals, in a session of its own.
                    script = f"trap '' HUP INT TERM; while :; do echo x >> {beat}; sleep 0.05; done"
                    os.execv("/bin/sh", ["/bin/sh", "-c", script, MARK])
                os._exit(0)
            os.wait()
            deadline = time.monotonic() + 5
            while not (beat.exists() and beat.stat().st_size > 0):
                assert time.monotonic() < deadline, "the daemon never started"
                time.sleep(0.01)
    """)
    result = run_isolated(pytester)
    result.assert_outcomes(passed=1)
    beats = {p.resolve() for p in pytester.path.glob("runpytest-*/**/beat")}
    assert len(beats) == 1, beats
    beat = beats.pop()
    size = beat.stat().st_size
    time.sleep(0.3)
    assert beat.stat().st_size == size, "the daemon still writes into tmp_path"
    assert processes_mentioning(mark) == []


DAEMON_PAIRS = 32


@pytest.mark.parametrize("ballast", [0, 256], ids=["lean", "heavy-pytest"])
def test_next_test_starts_after_the_previous_tests_daemon_is_gone(
    pytester: pytest.Pytester, ballast: int
) -> None:
    # The daemon answers on a unix socket in its tmp_path (a host path): the
    # next test, on the host, asks right away whether it still runs user code.
    # One pair hits a short window; several make a miss very unlikely (with 8,
    # rootless, a wait for pid 1 taken out was caught once in 3 runs; with 32,
    # in 5 of 5).
    body = [
        """
        import contextlib, os, socket, time
        import pytest

        @contextlib.contextmanager
        def inside(directory):
            # Relative socket paths: the absolute ones exceed sun_path's 108 bytes.
            cwd = os.getcwd()
            os.chdir(directory)
            try:
                yield
            finally:
                os.chdir(cwd)

        def start_daemon(tmp_path):
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    os.chdir(tmp_path)
                    server = socket.socket(socket.AF_UNIX)
                    server.bind("d.sock")
                    server.listen(8)
                    while True:
                        conn, _ = server.accept()
                        conn.sendall(b"alive")
                        conn.close()
                os._exit(0)
            os.wait()
            deadline = time.monotonic() + 5
            while not (tmp_path / "d.sock").exists():
                assert time.monotonic() < deadline, "the daemon never listened"
                time.sleep(0.001)
            (tmp_path.parent / "last-daemon").write_text(str(tmp_path))

        def daemon_answers(tmp_path):
            directory = (tmp_path.parent / "last-daemon").read_text()
            with inside(directory), socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect("d.sock")
                    s.settimeout(2)
                    return s.recv(5) == b"alive"
                except (ConnectionRefusedError, ConnectionResetError):
                    return False
    """
    ]
    for i in range(DAEMON_PAIRS):
        body.append(f"""
        def test_{i}_starts_a_daemon(tmp_path):
            start_daemon(tmp_path)

        @pytest.mark.isolated(False)
        def test_{i}_next_test_on_the_host(tmp_path):
            assert not daemon_answers(tmp_path), "BUG-SYMPTOM: the previous test's daemon runs"
        """)
    args: tuple[str, ...] = ()
    if ballast:
        # MiB of pytest's memory written, so every copy of pytest's process
        # (a rootless pid 1 is one) takes milliseconds to end: the daemon
        # must be gone before the next test all the same, not only once pid
        # 1 has ended (the kernel kills the rest of the namespace last).
        pytester.makeconftest(f"BALLAST = b'x' * ({ballast} << 20)")
        # pytest-rerunfailures runs a thread in pytest's process, which then
        # forks its sandboxes with an outer process (sandbox.fork_born): not
        # the shape whose pid 1 answers (Sandbox.stopped). The lean run keeps
        # whichever shape the environment gives.
        args = ("-p", "no:rerunfailures")
    pytester.makepyfile("".join(body))
    result = run_isolated(pytester, *args)
    raise_on_bug_symptoms(result)
    result.assert_outcomes(passed=2 * DAEMON_PAIRS)


# --------------------------------------------------------------------------- network namespace


def test_only_loopback_exists_and_it_is_up(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import errno, socket
        import pytest

        def test_only_lo():
            import os
            assert os.listdir("/sys/class/net") == ["lo"]
            assert socket.if_nameindex() == [(1, "lo")]
            with open("/sys/class/net/lo/flags") as f:
                assert int(f.read(), 16) & 0x1, "lo is down"  # IFF_UP

        def test_loopback_carries_a_connection():
            with socket.create_server(("127.0.0.1", 0)) as server:
                port = server.getsockname()[1]
                with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                    conn, _ = server.accept()
                    with conn:
                        client.sendall(b"ping")
                        assert conn.recv(4) == b"ping"

        def test_no_route_out():
            with socket.socket() as s, pytest.raises(OSError) as info:
                s.connect(("192.0.2.1", 80))  # TEST-NET-1, never answers anyway
            assert info.value.errno == errno.ENETUNREACH
    """)
    result = run_isolated(pytester)
    result.assert_outcomes(passed=3)


def test_host_loopback_listener_is_unreachable(pytester: pytest.Pytester) -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=8) as listener:
        abstract = f"\0pytest-isolate-{uuid.uuid4().hex}"
        with socket.socket(socket.AF_UNIX) as unix_listener:
            unix_listener.bind(abstract)
            unix_listener.listen(8)
            write_hostinfo(pytester, PORT=listener.getsockname()[1], ABSTRACT=abstract)
            pytester.makepyfile("""
                import socket
                import pytest
                from hostinfo import ABSTRACT, PORT

                def test_host_tcp_listener_refuses():
                    with pytest.raises(ConnectionRefusedError):
                        socket.create_connection(("127.0.0.1", PORT), timeout=5)

                def test_host_abstract_unix_socket_refuses():
                    with socket.socket(socket.AF_UNIX) as s, pytest.raises(ConnectionRefusedError):
                        s.connect(ABSTRACT)

                @pytest.mark.isolated(net="host")
                def test_net_host_reaches_it():
                    with socket.create_connection(("127.0.0.1", PORT), timeout=5) as s:
                        s.sendall(b"from net=host")
            """)
            result = run_isolated(pytester)
            result.assert_outcomes(passed=3)
            listener.setblocking(False)
            received = []
            with contextlib.suppress(BlockingIOError):
                while True:
                    conn, _ = listener.accept()
                    with conn:
                        conn.settimeout(5)
                        received.append(conn.recv(64))
            assert received == [b"from net=host"], "only the net='host' test may get through"


def test_two_parallel_tests_bind_the_same_port(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    with contextlib.ExitStack() as stack:
        # Hold the port on the host too when it is free: the sandboxes must not care.
        with contextlib.suppress(OSError):
            stack.enter_context(socket.create_server(("127.0.0.1", 8080)))
        pytester.makepyfile("""
            import socket, time

            def hold_8080(tmp_path):
                with socket.create_server(("127.0.0.1", 8080)) as server:
                    start = time.time()
                    time.sleep(1.0)
                    with socket.create_connection(("127.0.0.1", 8080), timeout=5):
                        server.accept()[0].close()
                    (tmp_path / "span").write_text(f"{start} {time.time()}")

            def test_first_binds_8080(tmp_path):
                hold_8080(tmp_path)

            def test_second_binds_8080(tmp_path):
                hold_8080(tmp_path)
        """)
        result = run_isolated(pytester, "-n", "2")
    result.assert_outcomes(passed=2)
    files = {p.resolve() for p in pytester.path.glob("runpytest-*/**/span")}
    spans = [tuple(map(float, p.read_text().split())) for p in files]
    assert len(spans) == 2, spans
    (start1, end1), (start2, end2) = spans
    assert start1 < end2 and start2 < end1, f"the two tests did not overlap: {spans}"


def test_every_test_has_namespaces_of_its_own(pytester: pytest.Pytester) -> None:
    """Whoever made them (as root, the init factory's pid 1; rootless, the
    sandbox itself), no namespace is the host's and none is handed on: the
    first test changes every namespace it is in, the second (same module,
    same options: prepared while the first runs) sees none of it. Namespace
    inode numbers are recycled once a namespace is gone, so only the host's,
    alive throughout, can be compared by number."""
    kinds = ("mnt", "net", "uts", "ipc", "pid", "cgroup")
    host = {kind: os.stat(f"/proc/self/ns/{kind}").st_ino for kind in kinds}
    pytester.makepyfile(f"""
        import ctypes, errno, fcntl, os, socket, struct
        import pytest

        pytestmark = pytest.mark.isolated(caps_add=["sys_admin", "net_admin"])
        libc = ctypes.CDLL(None, use_errno=True)
        libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
        KEY = 0x150C4

        def lo_flags(sock, flags=None):
            if flags is None:
                ifreq = fcntl.ioctl(sock, 0x8913, struct.pack("16sH22x", b"lo", 0))
                return struct.unpack("16sH22x", ifreq)[1]
            fcntl.ioctl(sock, 0x8914, struct.pack("16sH22x", b"lo", flags))

        def test_not_the_hosts():
            for kind, inode in {host!r}.items():
                assert os.stat(f"/proc/self/ns/{{kind}}").st_ino != inode, kind

        def test_first_changes_every_namespace():
            assert libc.sethostname(b"changed", 7) == 0
            assert libc.mount(b"tmpfs", b"/mnt", b"tmpfs", 0, None) == 0
            assert libc.shmget(KEY, 4096, 0o1600) >= 0
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                lo_flags(sock, lo_flags(sock) & ~1)

        def test_second_sees_none_of_it():
            assert socket.gethostname() == "isolated"
            assert not os.path.ismount("/mnt")
            assert libc.shmget(KEY, 0, 0) == -1 and ctypes.get_errno() == errno.ENOENT
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                assert lo_flags(sock) & 1, "lo is down: the first test's network namespace"
            assert sorted(int(p) for p in os.listdir("/proc") if p.isdigit())[:2] == [1, 2]
            with open("/proc/self/cgroup") as f:
                assert all(line.rstrip().endswith(":/") for line in f), "cgroup namespace"
    """)
    result = run_isolated(pytester)
    result.assert_outcomes(passed=3)


@pytest.mark.parametrize("layers", ["namespaces", "namespaces,rootfs"])
def test_the_working_directory_is_kept(pytester: pytest.Pytester, layers: str) -> None:
    pytester.makepyfile(f"""
        import os
        def test_cwd():
            assert os.getcwd() == {str(pytester.path)!r}
            assert os.path.exists("test_the_working_directory_is_kept.py")
    """)
    result = run_isolated(pytester, f"--isolate-layers={layers}")
    result.assert_outcomes(passed=1)


# --------------------------------------------------------------------------- uts and ipc


def test_hostname_is_private(pytester: pytest.Pytester) -> None:
    before = socket.gethostname()
    pytester.makepyfile("""
        import ctypes, errno, os, socket
        import pytest

        libc = ctypes.CDLL(None, use_errno=True)

        def test_default_hostname():
            assert socket.gethostname() == "isolated"
            assert os.uname().nodename == "isolated"

        @pytest.mark.isolated(hostname="box-7")
        def test_hostname_option():
            assert socket.gethostname() == "box-7"

        def test_sethostname_is_refused():
            assert libc.sethostname(b"pwned", 5) == -1
            assert ctypes.get_errno() == errno.EPERM

        @pytest.mark.isolated(caps_add=["sys_admin"])
        def test_sethostname_with_sys_admin_changes_only_its_own():
            assert libc.sethostname(b"changed-inside", 14) == 0, os.strerror(ctypes.get_errno())
            assert socket.gethostname() == "changed-inside"
    """)
    result = run_isolated(pytester)
    result.assert_outcomes(passed=4)
    assert socket.gethostname() == before


def test_host_sysv_shared_memory_is_invisible(pytester: pytest.Pytester) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
    ipc_private, ipc_creat, ipc_rmid = 0, 0o1000, 0
    shmid = libc.shmget(ipc_private, 4096, ipc_creat | 0o600)
    assert shmid >= 0, os.strerror(ctypes.get_errno())
    try:
        write_hostinfo(pytester, SHMID=shmid)
        pytester.makepyfile("""
            import ctypes, errno
            from hostinfo import SHMID

            def test_no_segment_of_the_host():
                with open("/proc/sysvipc/shm") as f:
                    assert f.read().splitlines()[1:] == []
                libc = ctypes.CDLL(None, use_errno=True)
                libc.shmat.restype = ctypes.c_void_p
                assert libc.shmat(SHMID, None, 0) in (None, 2**64 - 1)
                assert ctypes.get_errno() == errno.EINVAL
        """)
        result = run_isolated(pytester)
        result.assert_outcomes(passed=1)
    finally:
        libc.shmctl(shmid, ipc_rmid, None)


# --------------------------------------------------------------------------- environment

ENV_TESTS = """
    import fnmatch, os
    import pytest

    STRICT_ENV = ("PATH", "LANG", "LC_*", "TERM", "TZ", "PYTHONHASHSEED", "PYTEST_*", "HOME")

    def test_inherits_the_parent_environment():
        assert os.environ["ISOLATE_OUTER_SECRET"] == "s3cret"

    @pytest.mark.isolated(env=["PATH"])
    def test_allow_list_keeps_only_path():
        # pytest itself sets PYTEST_CURRENT_TEST again inside the test.
        assert set(os.environ) - {"PYTEST_CURRENT_TEST"} == {"PATH"}

    @pytest.mark.isolated(env=["ISOLATE_*"])
    def test_allow_list_prefix():
        assert set(os.environ) - {"PYTEST_CURRENT_TEST"} == {"ISOLATE_OUTER_SECRET"}

    @pytest.mark.isolated(strict=True)
    def test_strict_keeps_only_the_documented_names():
        assert "ISOLATE_OUTER_SECRET" not in os.environ
        assert "PATH" in os.environ
        strays = [n for n in os.environ if not any(fnmatch.fnmatchcase(n, p) for p in STRICT_ENV)]
        assert strays == []
"""


def test_environment_is_inherited_and_allow_lists_filter_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISOLATE_OUTER_SECRET", "s3cret")
    tests = pytester.makepyfile(ENV_TESTS)
    result = run_isolated(
        pytester,
        "-v",
        *(
            f"{tests.name}::{name}"
            for name in (
                "test_inherits_the_parent_environment",
                "test_allow_list_keeps_only_path",
                "test_allow_list_prefix",
            )
        ),
    )
    result.assert_outcomes(passed=3)


def test_strict_profile_keeps_only_the_documented_environment(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISOLATE_OUTER_SECRET", "s3cret")
    tests = pytester.makepyfile(ENV_TESTS)
    result = run_isolated(
        pytester, "-v", f"{tests.name}::test_strict_keeps_only_the_documented_names"
    )
    result.assert_outcomes(passed=1)
