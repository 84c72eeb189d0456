"""Sandboxes used again (initd.InitFactory.recycle, initd._reset): as root,
after a test that ended cleanly its pid 1 is not killed but asked to make the
sandbox new for the next test of the same spec. Proved against the real
kernel: nothing the last test made reaches the next one (files in every
writable file system, processes, SysV IPC, sockets and ports, the network's
counters), the next test is pid 2 again, a sandbox whose mount table changed
is never handed on, nor is one whose test timed out.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import requires
from initd_util import host_plan, mounts, pid_of, shared_mount, with_ops
from rootless_util import run_isolated

from pytest_isolate.initd import InitFactory
from pytest_isolate.rootfs import RootfsPlan

# These tests look at sandboxes from the host: never inside one themselves.
pytestmark = pytest.mark.isolated(False)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[RootfsPlan, str, bool, bool]]:
    # The staging directory only needs to exist on the host, not under /tmp
    # (the sandbox's own tmpfs when these tests run isolated). A name of its
    # own: never one a killed run left behind.
    parent = Path(tempfile.mkdtemp(prefix="pytest-isolate-reuse-"))
    (parent / "root").mkdir()
    project = tmp_path / "project"
    project.mkdir()
    plan = host_plan(parent / "root", project)
    try:
        yield (plan, "box", True, True)
    finally:
        shutil.rmtree(parent)


@pytest.fixture
def factory(setup: tuple[RootfsPlan, str, bool, bool], factory: InitFactory) -> InitFactory:
    """conftest's factory, made after ``setup``'s staging directory and so closed before
    it is removed: the factory builds templates ahead, in the background,
    and one still building made its mount points in a staging directory
    removed under it (the next test of that xdist worker then failed with
    FileExistsError, in CI under load)."""
    return factory


def _namespaces(pid: int) -> dict[str, int]:
    return {
        ns: os.stat(f"/proc/{pid}/ns/{ns}").st_ino for ns in ("mnt", "pid", "net", "ipc", "uts")
    }


def _reset(factory: InitFactory, pidfd: int) -> bool | None:
    recycled = factory.recycle(pidfd, lambda: True)
    assert recycled is not None, "an init copied from a template can be reset"
    deadline = time.monotonic() + 10
    while recycled.settled() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return recycled.settled()


@requires("root")
def test_a_reset_sandbox_has_new_namespaces_file_systems_and_no_process_of_the_last_test(
    factory: InitFactory, setup: tuple[RootfsPlan, str, bool, bool]
) -> None:
    pidfd = factory.new_init(setup)
    pid = pid_of(pidfd)
    before, table = _namespaces(pid), mounts(pid)
    root = Path(f"/proc/{pid}/root")
    # Left by the last test in every writable file system of the sandbox.
    writable = [op.target.lstrip("/") for op in setup[0].ops if op.kind == "tmpfs"]
    writable += ["dev/shm"]
    assert {"tmp", "var/tmp"} <= set(writable)
    for path in writable:
        (root / path / "marker").write_text("left by the last test")
    # /dev itself is read-only, for root too: it is kept, not made again.
    with pytest.raises(OSError) as info:
        (root / "dev" / "marker").write_text("left by the last test")
    assert info.value.errno == errno.EROFS
    # A pty of the last test, its master held open across the reset.
    master = os.open(root / "dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY)
    assert sorted(os.listdir(root / "dev/pts")) == ["0", "ptmx"]
    # /sys shows the network namespace it was mounted in.
    loopback = os.stat(root / "sys/class/net/lo").st_ino
    # A packet of the last test through the loopback: the network
    # namespace is made again (test_a_reset_keeps_the_network_namespace...).
    _leave_in_netns(pid, "udp")
    # A process of the last test, still running in its pid namespace.
    left = subprocess.Popen(["nsenter", "-t", str(pid), "-p", "--", "sleep", "1000"])
    try:
        time.sleep(0.2)
        assert left.poll() is None
        assert _reset(factory, pidfd) is True
        assert left.wait(timeout=5) != 0, "the process left in the sandbox was ended"
    finally:
        if left.poll() is None:
            left.kill()
            left.wait()
    again = factory.new_init(setup)
    assert again == pidfd and factory.reused == 1, "the reset init is handed out again"
    after = _namespaces(pid)
    # The same pid and mount namespaces; new uts, ipc and network ones.
    assert {ns for ns in before if before[ns] != after[ns]} == {"net", "ipc", "uts"}
    # Every writable file system is a new one, /sys is the new network
    # namespace's, and the mounts are the ones made before.
    assert [path for path in writable if (root / path / "marker").exists()] == []
    assert os.stat(root / "sys/class/net/lo").st_ino != loopback
    assert os.listdir(root / "dev/pts") == ["ptmx"], "a new devpts instance"
    os.close(master)
    assert mounts(pid) == table
    hostname = subprocess.check_output(["nsenter", "-t", str(pid), "-u", "--", "hostname"])
    assert hostname.decode().strip() == "box"
    # Killed first: once its socket is closed, the init ends by itself.
    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    factory.forget(pidfd)
    os.close(pidfd)


#: What a test can leave in its network namespace, run there by nsenter.
_NET_TRACES = {
    "nothing": "pass",
    # A packet through the loopback (its counters, and the IP and UDP ones).
    "udp": "import socket\n"
    "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', 9))",
    # Unix sockets bound to an abstract name, alive after the process only as
    # descriptors in flight (each sent over itself): the name stays taken.
    "in flight": "import array, socket\n"
    "a, b = socket.socketpair()\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
    "s.bind(b'\\0pytest-isolate-left')\n"
    "fds = array.array('i', [a.fileno(), b.fileno(), s.fileno()])\n"
    "a.sendmsg([b'x'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])\n",
    # A socket bound and closed, no packet: nothing stays.
    "bound": "import socket\n"
    "s = socket.socket(); s.bind(('127.0.0.1', 8124)); s.listen(); s.close()",
}


def _leave_in_netns(pid: int, trace: str) -> None:
    subprocess.run(
        ["nsenter", "-t", str(pid), "-n", "--", sys.executable, "-c", _NET_TRACES[trace]],
        check=True,
    )


@requires("root")
@pytest.mark.parametrize("trace", list(_NET_TRACES))
def test_a_reset_keeps_the_network_namespace_only_when_the_test_left_nothing_there(
    factory: InitFactory, setup: tuple[RootfsPlan, str, bool, bool], trace: str
) -> None:
    """A network namespace costs about 0.8 ms of CPU to make and tear down:
    a reset keeps it when the last test left no socket, sent no packet and
    moved no counter there (what else could stay needs CAP_NET_ADMIN, which
    no test of a reset sandbox has); otherwise the next test gets a new one."""
    pidfd = factory.new_init(setup)
    pid = pid_of(pidfd)
    before = _namespaces(pid)["net"]
    _leave_in_netns(pid, trace)
    assert _reset(factory, pidfd) is True
    assert factory.new_init(setup) == pidfd
    kept = _namespaces(pid)["net"] == before
    assert kept == (trace in ("nothing", "bound")), trace
    if kept:
        # The next reset compares against the same state: still kept.
        assert _reset(factory, pidfd) is True
        assert factory.new_init(setup) == pidfd
        assert _namespaces(pid)["net"] == before
    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    factory.forget(pidfd)
    os.close(pidfd)


@requires("root")
def test_a_sandbox_whose_mount_table_changed_is_not_handed_on(
    factory: InitFactory, setup: tuple[RootfsPlan, str, bool, bool]
) -> None:
    """A test with the default capabilities cannot mount; were a mount made
    in its sandbox all the same, the init refuses to reset it and ends."""
    pidfd = factory.new_init(setup)
    pid = pid_of(pidfd)
    subprocess.run(
        ["nsenter", "-t", str(pid), "-m", "--", "mount", "-t", "tmpfs", "none", "/mnt"], check=True
    )
    state = _reset(factory, pidfd)
    reason = factory.last_reset_failure
    assert state is False, "a changed mount table fails the reset"
    assert factory.reset_failures == 1, reason
    assert "the sandbox's mount table changed" in reason, reason
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not os.path.exists(f"/proc/{pid}/ns"), "the init ended with its sandbox"
    fresh = factory.new_init(setup)
    try:
        assert factory.reused == 0 and pid_of(fresh) != pid
    finally:
        signal.pidfd_send_signal(fresh, signal.SIGKILL)
        factory.forget(fresh)
        os.close(fresh)


@requires("root")
def test_a_mount_the_host_makes_meanwhile_does_not_fail_the_reset(tmp_path: Path) -> None:
    """Where the host's mounts are shared (systemd), a mount the host makes
    beneath a path the sandbox binds reaches the sandbox (as it reaches one
    made now): not a change the last test made. A mount made inside does
    fail it (the test above)."""
    from pytest_isolate.rootfs import Op

    parent = Path(tempfile.mkdtemp(prefix="pytest-isolate-reuse-host-"))
    (parent / "root").mkdir()
    (tmp_path / "project").mkdir()
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    plan = with_ops(
        host_plan(parent / "root", tmp_path / "project"), Op("bind", "/data", str(data))
    )
    setup = (plan, "box", True, True)
    try:
        with shared_mount(data):
            made = InitFactory()
            made.start()
            try:
                pidfd = made.new_init(setup)
                pid = pid_of(pidfd)
                subprocess.run(
                    ["mount", "-t", "tmpfs", "-o", "size=1m", "isolate-test", str(data / "sub")],
                    check=True,
                )
                try:
                    (data / "sub" / "shown").write_text("mounted by the host")
                    shown = Path(f"/proc/{pid}/root/data/sub/shown")
                    assert shown.read_text() == "mounted by the host"
                    assert _reset(made, pidfd) is True, made.last_reset_failure
                    assert made.new_init(setup) == pidfd
                    assert shown.read_text() == "mounted by the host"
                finally:
                    subprocess.run(["umount", str(data / "sub")], check=True)
                # The host's unmount reaches it too: that one fails the reset
                # (a mount gone is never taken for the host's).
                assert _reset(made, pidfd) is False
            finally:
                made.close()
    finally:
        shutil.rmtree(parent)


_STATE_SUITE = """
    import ctypes, errno, os, signal, socket, subprocess
    import pytest

    PORT = 8123

    @pytest.mark.parametrize("i", range(8))
    def test_state(i):
        # Nothing of the test before: no process, file, IPC object, socket...
        assert os.getpid() == 2
        assert sorted(int(p) for p in os.listdir("/proc") if p.isdigit()) == [1, 2]
        for path in ("/tmp", "/var/tmp", os.path.expanduser("~"), "/dev/shm"):
            assert "marker" not in os.listdir(path), path
        assert os.stat("/dev/shm").st_mode & 0o7777 == 0o1777
        assert os.listdir("/dev/pts") == ["ptmx"], "a pty of the last test"
        for kind in ("shm", "msg", "sem"):
            with open(f"/proc/sysvipc/{kind}") as f:
                assert len(f.read().splitlines()) == 1, kind
        with open("/proc/net/tcp") as f:
            assert len(f.read().splitlines()) == 1, "a socket of the last test"
        with open("/sys/class/net/lo/statistics/tx_packets") as f:
            assert f.read().strip() == "0", "the loopback's counters of the last test"
        assert socket.gethostname() == "isolated"

        # ...and this one leaves all of that behind.
        for path in ("/tmp", "/var/tmp", os.path.expanduser("~"), "/dev/shm"):
            with open(os.path.join(path, "marker"), "w") as f:
                f.write("x")
        # /dev itself is read-only: nothing of a test can stay there.
        with pytest.raises(OSError) as info:
            open("/dev/marker", "w")
        assert info.value.errno == errno.EROFS
        os.chmod("/dev/shm", 0o700)  # the file system's root itself is made again
        master, _ = os.openpty()
        subprocess.Popen(["sleep", "1000"], pass_fds=[master], start_new_session=True)
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.shmget(1234 + i, 4096, 0o1666) >= 0
        assert libc.msgget(1234 + i, 0o1666) >= 0
        assert libc.semget(1234 + i, 1, 0o1666) >= 0
        # Bound without SO_REUSEADDR: a TIME_WAIT left on the port would refuse it.
        server = socket.socket()
        server.bind(("127.0.0.1", PORT))
        server.listen()
        client = socket.create_connection(("127.0.0.1", PORT))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: TIME_WAIT stays here
        client.close()
        server.close()
        subprocess.Popen(["sleep", "1000"], start_new_session=True)
        subprocess.Popen(["sh", "-c", "trap '' TERM HUP INT; sleep 1000"])
        # pid 1 ignores what its namespace sends it, Python's SIGINT included.
        os.kill(1, signal.SIGINT)
        os.kill(1, signal.SIGTERM)
"""


@requires("root")
def test_nothing_of_a_test_reaches_the_next_one_in_a_sandbox_used_again(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(_STATE_SUITE)
    monkeypatch.setenv("HOME", "/root")  # a writable $HOME of its own (tmpfs)
    result = run_isolated(pytester, "-vv")
    result.assert_outcomes(passed=8)
    line = result.stdout.str().split("roots copied from their spec's template, ")[1]
    assert int(line.split()[0]) >= 3, line


@requires("root")
def test_with_reuse_off_every_test_gets_a_new_sandbox(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(_STATE_SUITE)
    monkeypatch.setenv("HOME", "/root")
    monkeypatch.setenv("PYTEST_ISOLATE_REUSE", "0")
    result = run_isolated(pytester, "-vv")
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(["*, 0 sandboxes reset and used again"])


@requires("root")
def test_a_sandbox_whose_test_timed_out_is_never_used_again(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a test that ended with its "done" frame hands its sandbox on; the
    control run shows the same suite's sandboxes used again when it passes."""
    pytester.makepyfile("""
        import os, time
        import pytest

        @pytest.mark.parametrize("i", range(6))
        @pytest.mark.isolated(timeout=1)
        def test_slow(i):
            time.sleep(0.05 if os.environ.get("FAST") else 10)
    """)
    result = run_isolated(pytester, "-vv")
    result.assert_outcomes(failed=6)
    result.stdout.fnmatch_lines(["*, 0 sandboxes reset and used again"])
    monkeypatch.setenv("FAST", "1")
    result = run_isolated(pytester, "-vv")
    result.assert_outcomes(passed=6)
    line = result.stdout.str().split("roots copied from their spec's template, ")[1]
    assert int(line.split()[0]) >= 1, line


def test_reset_ops_cover_every_writable_file_system_and_what_lies_beneath() -> None:
    from pytest_isolate.rootfs import Op, plan_renewal

    own = (
        Op("dev", "/dev"),
        Op("tmpfs", "/tmp", writable=True),
        Op("proc", "/proc"),
        Op("mask_file", "/etc/shadow"),
        Op("tmpfs", "/root", writable=True),
        Op("sys", "/sys"),
        Op("bind", "/tmp/project", "/tmp/project"),
        Op("bind", "/root/.pyenv", "/root/.pyenv"),
        Op("dir", "/tmp/project/sub"),
    )
    # What each init takes from the host for them (rootfs.own_sources): a
    # bind under a renewed file system is taken again from inside, the
    # others (a path bound elsewhere) are left alone.
    taken = (
        ("/tmp/project", "/host/project", True, True),
        ("/root/.pyenv", "/root/.pyenv", True, True),
        ("/dev/null", "/dev/null", False, False),
        ("/opt/tool", "/opt/tool", True, True),
    )
    tops, again, sources = plan_renewal(own, taken)
    # /dev itself is read-only (rootfs._seal_dev): its pts and shm are made
    # again, and the host's nodes in it stay.
    assert tops == ("/dev/pts", "/dev/shm", "/tmp", "/root", "/sys")
    assert sources == (
        ("/tmp/project", "/tmp/project", True, True),
        ("/root/.pyenv", "/root/.pyenv", True, True),
    )
    assert [(op.kind, op.target) for op in again] == [
        ("devpts", "/dev/pts"),
        ("tmpfs", "/dev/shm"),
        ("tmpfs", "/tmp"),
        ("tmpfs", "/root"),
        ("sys", "/sys"),
        ("bind", "/tmp/project"),
        ("bind", "/root/.pyenv"),
        ("dir", "/tmp/project/sub"),
    ]
