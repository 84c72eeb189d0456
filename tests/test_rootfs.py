"""The default root file system, proved from inside real isolated tests: the
host's system directories and the project are read-only (submounts too), the
rest of the host is absent, secrets are masked, /tmp, /var/tmp, /dev/shm and
$HOME are private and thrown away, tmp_path is writable and kept on the host,
writable mounts carry no devices, grants (``binds=``) are read-only unless
``:rw`` and stay so.

Each test writes a small inner test file, runs it with ``pytest --isolate`` in
a subprocess, and checks both the inner outcome and the host afterwards. Runs
as root and, through tests/test_rootless.py, as an unprivileged user; what
needs root on the host side (mounting, writing /run or /var) skips otherwise.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import requires
from rootless_util import BugSymptom, raise_on_bug_symptoms, run_isolated, write_hostinfo

# These tests watch the host from outside the sandboxes they start: they must
# themselves run on the host, also when the suite is run with --isolate.
pytestmark = pytest.mark.isolated(False)

#: Inner helper: what a directory may show inside, namely the first path
#: component of every mount point below it (the way to a granted path).
MOUNT_HELPERS = """
import os

def mount_points():
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]

def way_to_mounts(directory):
    prefix = directory.rstrip("/") + "/"
    return {m[len(prefix):].split("/")[0] for m in mount_points() if m.startswith(prefix)}
"""


@contextlib.contextmanager
def host_tmpfs(path: Path, options: str = "size=1m") -> Iterator[Path]:
    """A tmpfs mounted on the host (root only), always unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "pytest-isolate-test", str(path)], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@contextlib.contextmanager
def unix_listener(path: str) -> Iterator[socket.socket]:
    """A unix socket listening at ``path`` on the host, removed afterwards."""
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(path)
        sock.listen(8)
        yield sock
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# --------------------------------------------------------------------------- read-only host view


def test_host_system_directories_and_the_project_are_read_only(pytester: pytest.Pytester) -> None:
    name = f"pytest-isolate-written-{uuid.uuid4().hex}"
    write_hostinfo(pytester, NAME=name)
    test_file = pytester.makepyfile("""
        import errno, os, sys
        import pytest
        from hostinfo import NAME

        # Rootless, a file the user may not write anyway fails on permissions first.
        REFUSED = {errno.EROFS} if os.geteuid() == 0 else {errno.EROFS, errno.EACCES}
        PROJECT = os.path.dirname(os.path.abspath(__file__))
        DIRS = ["/", "/usr", "/usr/lib", "/etc", "/var", "/var/lib", "/opt", "/bin", PROJECT,
                sys.prefix, os.path.dirname(os.__file__),
                *[p for p in sys.path if os.path.isdir(p)]]

        @pytest.mark.parametrize("directory", sorted(set(DIRS)))
        def test_cannot_create_a_file_in(directory):
            with pytest.raises(OSError) as info:
                open(os.path.join(directory, NAME), "x")
            assert info.value.errno in REFUSED

        @pytest.mark.parametrize("path", ["/etc/passwd", __file__, os.__file__])
        def test_cannot_modify(path):
            with pytest.raises(OSError) as info:
                open(path, "a")
            assert info.value.errno in REFUSED

        def test_cannot_remove_rename_or_chmod_a_project_file():
            for attempt in (lambda: os.unlink(__file__),
                            lambda: os.rename(__file__, __file__ + ".moved"),
                            lambda: os.chmod(__file__, 0o777),
                            lambda: os.utime(__file__, (0, 0))):
                with pytest.raises(OSError) as info:
                    attempt()
                assert info.value.errno == errno.EROFS
    """)
    content = test_file.read_bytes()
    stat_before = test_file.stat()
    result = run_isolated(pytester)
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= 12 and set(outcomes) == {"passed"}, outcomes
    assert test_file.read_bytes() == content
    assert test_file.stat().st_mtime == stat_before.st_mtime
    assert test_file.stat().st_mode == stat_before.st_mode
    leaked = [
        d
        for d in ("/", "/usr", "/etc", "/var", "/opt", str(pytester.path))
        if os.path.lexists(os.path.join(d, name))
    ]
    assert leaked == []


def test_tmp_path_is_writable_and_kept_on_the_host(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        def test_writes_into_tmp_path(tmp_path):
            (tmp_path / "kept.txt").write_text("written inside")
    """)
    run_isolated(pytester).assert_outcomes(passed=1)
    kept = {p.resolve() for p in pytester.path.glob("runpytest-*/**/kept.txt")}
    assert [p.read_text() for p in kept] == ["written inside"]


def test_tmp_var_tmp_and_dev_shm_are_private_and_empty_per_test(pytester: pytest.Pytester) -> None:
    name = f"pytest-isolate-private-{uuid.uuid4().hex}"
    write_hostinfo(pytester, NAME=name)
    pytester.makepyfile(mounthelpers=MOUNT_HELPERS)
    pytester.makepyfile("""
        import os
        import pytest
        from hostinfo import NAME
        from mounthelpers import way_to_mounts

        PLACES = ("/tmp", "/var/tmp", "/dev/shm")

        @pytest.mark.parametrize("place", PLACES)
        def test_1_starts_empty_and_writes(place):
            # Only the way to granted paths (the project, tmp_path) is there.
            assert set(os.listdir(place)) <= way_to_mounts(place)
            with open(os.path.join(place, NAME), "w") as f:
                f.write("private")

        @pytest.mark.parametrize("place", PLACES)
        def test_2_does_not_see_what_the_first_wrote(place):
            assert not os.path.exists(os.path.join(place, NAME))
    """)
    run_isolated(pytester).assert_outcomes(passed=6)
    assert [p for p in ("/tmp", "/var/tmp", "/dev/shm") if os.path.lexists(f"{p}/{name}")] == []


def test_home_is_private_writable_empty_and_thrown_away(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "host-secret.txt").write_text("ssh keys, tokens")
    # pytester points HOME at the inner project itself; a home of its own is
    # what a real user has.
    monkeypatch.setenv("HOME", str(home))
    pytester.makepyfile("""
        import os

        def test_1_home_is_empty_and_writable():
            home = os.environ["HOME"]
            assert os.listdir(home) == []
            os.makedirs(f"{home}/.cache/tool")
            with open(f"{home}/.cache/tool/state", "w") as f:
                f.write("tool state")

        def test_2_next_test_gets_a_fresh_home():
            assert os.listdir(os.environ["HOME"]) == []
    """)
    run_isolated(pytester).assert_outcomes(passed=2)
    assert os.listdir(home) == ["host-secret.txt"]


@pytest.mark.parametrize("where", ["home", "tmp"])
def test_run_from_home_or_tmp_shows_only_what_it_collects_there(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """pytest run from $HOME or from /tmp itself (its rootdir then too, and on
    sys.path): the sandbox still gets its own writable /tmp and $HOME (where
    tempfile and capfd write), with only the directory pytest collects bound
    in, not the host's whole /tmp or home."""
    marker = f"isolate-host-marker-{uuid.uuid4().hex}"
    if where == "home":
        base = tmp_path / "home"
        base.mkdir()
        monkeypatch.setenv("HOME", str(base))
        project = base / "proj"
        project.mkdir()
    else:
        base = Path("/tmp")
        project = pytester.path
    (base / marker).write_text("the host's")
    private = '("/tmp", os.environ["HOME"])' if where == "home" else '("/tmp",)'
    (project / "test_inner.py").write_text(f"""
import os, tempfile

def test_scratch_is_private_and_writable(capfd):
    for place in {private}:
        assert not os.path.exists(os.path.join(place, {marker!r}))
        with tempfile.NamedTemporaryFile(dir=place) as f:
            f.write(b"x")
    os.write(1, b"out")
    assert capfd.readouterr().out == "out"

def test_the_project_is_there_read_only():
    assert os.path.isfile(__file__)
    try:
        open(__file__, "a").close()
    except OSError as exc:
        assert exc.errno == 30  # EROFS
    else:
        raise AssertionError("the project is writable")
""")
    monkeypatch.chdir(base)
    try:
        result = run_isolated(pytester, str(project))
    finally:
        (base / marker).unlink()
    result.assert_outcomes(passed=2)


def test_the_sandboxs_hostname_resolves_to_its_loopback(pytester: pytest.Pytester) -> None:
    """Code that resolves its own hostname (gethostbyname(gethostname()),
    servers binding to it) finds it in the sandbox's /etc/hosts, as on the
    host and in containers: the host's file, read-only, plus that name."""
    with open("/etc/hosts", "rb") as f:
        host_hosts = f.read()
    pytester.makepyfile("""
        import socket
        import pytest

        def test_default_name():
            assert socket.gethostname() == "isolated"
            assert socket.gethostbyname(socket.gethostname()) == "127.0.0.1"
            assert socket.gethostbyname("localhost") == "127.0.0.1"

        @pytest.mark.isolated(hostname="box-1.example")
        def test_own_name():
            assert socket.gethostbyname("box-1.example") == "127.0.0.1"
            server = socket.create_server((socket.gethostname(), 0))
            with socket.create_connection(server.getsockname()):
                pass

        def test_the_file_is_read_only():
            with pytest.raises(OSError):
                open("/etc/hosts", "a")
    """)
    run_isolated(pytester).assert_outcomes(passed=3)
    with open("/etc/hosts", "rb") as f:
        assert f.read() == host_hosts


def test_host_only_directories_are_empty(pytester: pytest.Pytester) -> None:
    # Unreadable ones (/root, rootless) are still checked for showing nothing
    # but the way to granted paths.
    listings = {
        d: sorted(os.listdir(d)) if os.access(d, os.R_OK) else []
        for d in ("/home", "/root", "/mnt", "/media", "/srv", "/run")
        if os.path.isdir(d)
    }
    write_hostinfo(pytester, HOST_LISTINGS=listings)
    pytester.makepyfile(mounthelpers=MOUNT_HELPERS)
    pytester.makepyfile("""
        import os
        import pytest
        from hostinfo import HOST_LISTINGS
        from mounthelpers import way_to_mounts

        @pytest.mark.parametrize("directory", sorted(HOST_LISTINGS))
        def test_shows_nothing_of_the_host(directory):
            seen = set(os.listdir(directory))
            assert seen <= way_to_mounts(directory)
            # e.g. other users' homes, /root/.ssh, /mnt/<disk>, /run/<daemon>
            hidden = set(HOST_LISTINGS[directory]) - way_to_mounts(directory)
            assert not seen & hidden

        def test_run_is_empty():
            assert os.listdir("/run") == []
            assert os.path.realpath("/var/run") in ("/run", "/var/run")
            assert os.listdir("/var/run") == []
    """)
    result = run_isolated(pytester)
    result.assert_outcomes(passed=len(listings) + 1)


def test_secrets_in_etc_are_masked(pytester: pytest.Pytester) -> None:
    secrets = [
        p
        for p in ("/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-")
        if os.path.isfile(p)
    ]
    secrets += sorted(str(p) for p in Path("/etc/ssh").glob("ssh_host_*_key"))
    if not secrets:
        pytest.skip("this host has no /etc/shadow, /etc/gshadow or ssh host keys to mask")
    write_hostinfo(pytester, SECRETS=secrets)
    pytester.makepyfile("""
        import os
        import pytest
        from hostinfo import SECRETS

        @pytest.mark.parametrize("path", SECRETS)
        def test_reads_empty(path):
            with open(path, "rb") as f:
                assert f.read() == b""

        def test_ssl_private_keys_are_hidden():
            if os.path.isdir("/etc/ssl/private"):
                try:
                    assert os.listdir("/etc/ssl/private") == []
                except PermissionError:
                    pass
    """)
    run_isolated(pytester).assert_outcomes(passed=len(secrets) + 1)


# --------------------------------------------------------------------------- unix sockets


@requires("root")
def test_unix_socket_under_run_is_unreachable(pytester: pytest.Pytester) -> None:
    path = f"/run/pytest-isolate-test-{uuid.uuid4().hex[:12]}.sock"
    with unix_listener(path):
        write_hostinfo(pytester, SOCK=path)
        pytester.makepyfile("""
            import os, socket
            import pytest
            from hostinfo import SOCK

            @pytest.mark.parametrize("path", [SOCK, SOCK.replace("/run/", "/var/run/", 1)])
            def test_cannot_connect(path):
                with socket.socket(socket.AF_UNIX) as s, pytest.raises(FileNotFoundError):
                    s.connect(path)
        """)
        run_isolated(pytester).assert_outcomes(passed=2)


@pytest.fixture
def var_socket_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory below the /var directory named by the parameter."""
    parent = Path(request.param)
    if not parent.is_dir():
        pytest.skip(f"this host has no {parent}")
    path = parent / f"pytest-isolate-test-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


VAR_SOCKET_CASES = [
    pytest.param("/var/lib", id="var-lib"),
    pytest.param("/var/spool", id="var-spool"),
    pytest.param("/var/cache", id="var-cache"),
]


@requires("root")
@pytest.mark.parametrize("var_socket_dir", VAR_SOCKET_CASES, indirect=True)
def test_unix_socket_under_var_is_masked(pytester: pytest.Pytester, var_socket_dir: Path) -> None:
    path = str(var_socket_dir / "s.sock")
    with unix_listener(path) as listener:
        write_hostinfo(pytester, SOCK=path)
        pytester.makepyfile("""
            import socket
            import pytest
            from hostinfo import SOCK

            def test_cannot_connect():
                with socket.socket(socket.AF_UNIX) as s:
                    with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
                        s.connect(SOCK)
        """)
        result = run_isolated(pytester)
        listener.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            listener.accept()[0].close()
            raise BugSymptom(f"a sandbox connected to the host socket {path}")
        result.assert_outcomes(passed=1)


def test_unix_socket_in_the_project_is_reachable_read_only_mounts_do_not_stop_connect(
    pytester: pytest.Pytester,
) -> None:
    # A documented limit: the project is shown read-only, and connect() on a
    # read-only mount works. A socket kept in the project tree is reachable.
    # Relative (pytester's and the sandbox's working directory is the project):
    # the absolute path may exceed the 108 bytes of sun_path.
    path = "p.sock"
    with unix_listener(path) as listener:
        write_hostinfo(pytester, SOCK=path)
        pytester.makepyfile("""
            import socket
            from hostinfo import SOCK

            def test_connects_to_the_host_socket():
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(SOCK)
                    s.sendall(b"reached the host")
        """)
        run_isolated(pytester).assert_outcomes(passed=1)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            assert conn.recv(64) == b"reached the host"


# --------------------------------------------------------------------------- device nodes

MKNOD_TESTS = """
    import errno, os, stat
    import pytest
    from hostinfo import DISK, DISK_DIR

    NULL = os.makedev(1, 3)  # opens wherever devices are allowed, harmlessly

    def places(tmp_path):
        return ["/tmp", "/var/tmp", "/dev/shm", os.environ["HOME"], str(tmp_path), "/data"]

    @pytest.mark.isolated(caps_add=["mknod"], binds=[f"{DISK_DIR}:/data:rw"])
    @pytest.mark.parametrize("kind, dev", [("char", NULL), ("block", DISK)])
    def test_node_cannot_be_opened(tmp_path, kind, dev):
        mode = (stat.S_IFCHR if kind == "char" else stat.S_IFBLK) | 0o666
        opened = []
        for place in places(tmp_path):
            node = os.path.join(place, f"node-{kind}")
            try:
                os.mknod(node, mode, dev)  # CAP_MKNOD was granted: creating works
            except OSError as e:
                raise AssertionError(f"mknod in {place}: {e}") from e
            try:
                os.close(os.open(node, os.O_RDONLY))
                opened.append(place)
            except OSError as e:
                # nodev answers EACCES; a host device cgroup may answer EPERM first
                assert e.errno in (errno.EACCES, errno.EPERM), (place, e)
            finally:
                os.unlink(node)
        assert opened == []
        with pytest.raises(OSError) as info:  # /dev itself is read-only
            os.mknod(f"/dev/node-{kind}", mode, dev)
        assert info.value.errno == errno.EROFS

    def test_mknod_is_refused_without_the_capability():
        with pytest.raises(PermissionError):
            os.mknod("/tmp/null", stat.S_IFCHR | 0o666, NULL)
"""


@requires("root")
def test_device_node_made_with_mknod_cannot_be_opened(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk_dir = tmp_path / "data"
    disk_dir.mkdir()
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # not pytester's project
    write_hostinfo(pytester, DISK=os.stat("/").st_dev, DISK_DIR=str(disk_dir))
    pytester.makepyfile(MKNOD_TESTS)
    run_isolated(pytester).assert_outcomes(passed=3)
    assert os.listdir(disk_dir) == []


def test_mknod_is_refused_by_default(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import os, stat
        import pytest

        def test_mknod_is_refused():
            with pytest.raises(PermissionError):
                os.mknod("/tmp/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    """)
    run_isolated(pytester).assert_outcomes(passed=1)


@requires("root")
def test_device_node_in_a_submount_of_a_writable_bind_cannot_be_opened(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    granted = tmp_path / "granted"
    with host_tmpfs(granted / "sub", "size=1m,mode=0777"):
        write_hostinfo(pytester, GRANTED=str(granted))
        pytester.makepyfile("""
            import errno, os, stat
            import pytest
            from hostinfo import GRANTED

            @pytest.mark.isolated(caps_add=["mknod"], binds=[f"{GRANTED}:/data:rw"])
            def test_node_in_submount_cannot_be_opened():
                os.mknod("/data/sub/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
                try:
                    os.close(os.open("/data/sub/null", os.O_RDONLY))
                except PermissionError:
                    return
                raise AssertionError("BUG-SYMPTOM: a device node opened in a writable grant")
        """)
        result = run_isolated(pytester)
        raise_on_bug_symptoms(result)
        result.assert_outcomes(passed=1)


# --------------------------------------------------------------------------- submounts, grants


@requires("root")
def test_submounts_of_read_only_views_are_read_only(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    granted = tmp_path / "granted"
    with (
        host_tmpfs(granted / "sub", "size=1m,mode=0777"),
        host_tmpfs(pytester.path / "mnt", "size=1m,mode=0777"),
    ):
        # Seen through the view: the submounts' own files, not the empty
        # directories beneath them.
        (granted / "sub" / "shown").write_text("sub")
        (pytester.path / "mnt" / "shown").write_text("mnt")
        write_hostinfo(pytester, GRANTED=str(granted))
        pytester.makepyfile("""
            import errno, os
            import pytest
            from hostinfo import GRANTED

            PROJECT = os.path.dirname(os.path.abspath(__file__))

            @pytest.mark.isolated(binds=[f"{GRANTED}:/data"])
            @pytest.mark.parametrize("directory", ["/data/sub", "mnt"])
            def test_submount_is_shown_read_only(directory):
                path = os.path.join(PROJECT if directory == "mnt" else "", directory)
                with open(os.path.join(path, "shown")) as f:
                    assert f.read() == os.path.basename(directory)
                with pytest.raises(OSError) as info:
                    open(os.path.join(path, "x"), "w")
                assert info.value.errno == errno.EROFS
        """)
        run_isolated(pytester).assert_outcomes(passed=2)
        assert os.listdir(granted / "sub") == ["shown"]
        assert os.listdir(pytester.path / "mnt") == ["shown"]


def test_kernel_file_systems_are_read_only(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import errno, os
        import pytest

        REFUSED = {errno.EROFS} if os.geteuid() == 0 else {errno.EROFS, errno.EACCES}

        @pytest.mark.parametrize("path", ["/proc/sys/kernel/hostname", "/proc/sys/vm/drop_caches",
                                          "/sys/kernel/mm/transparent_hugepage/enabled",
                                          "/sys/class/net/lo/mtu"])
        def test_cannot_write(path):
            if not os.path.exists(path):
                pytest.skip(f"{path} does not exist on this kernel")
            with pytest.raises(OSError) as info:
                with open(path, "w") as f:
                    f.write("1")
            assert info.value.errno in REFUSED

        def test_cgroup_tree_is_not_writable():
            if os.path.isdir("/sys/fs/cgroup"):
                with pytest.raises(OSError) as info:
                    os.mkdir("/sys/fs/cgroup/escape")
                assert info.value.errno in REFUSED | {errno.ENOENT}

        def test_sensitive_proc_files_read_empty():
            # runc's masks; whichever of them this kernel has.
            for path in ("/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                         "/proc/sched_debug", "/proc/sysrq-trigger"):
                if os.path.exists(path):
                    with open(path, "rb") as f:
                        assert f.read(16) == b"", path

        def test_dev_is_minimal():
            allowed = {"null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm",
                       "fd", "stdin", "stdout", "stderr"}
            assert set(os.listdir("/dev")) <= allowed
            with open("/dev/urandom", "rb") as f:
                assert len(f.read(8)) == 8
    """)
    result = run_isolated(pytester)
    outcomes = result.parseoutcomes()
    assert set(outcomes) <= {"passed", "skipped"} and outcomes.get("passed", 0) >= 5, outcomes


def test_read_only_bind_is_unwritable_and_cannot_be_remounted(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    granted = tmp_path / "granted"
    granted.mkdir()
    (granted / "file.txt").write_text("host content")
    write_hostinfo(pytester, GRANTED=str(granted))
    pytester.makepyfile("""
        import ctypes, errno, os, shutil, subprocess
        import pytest
        from hostinfo import GRANTED

        MS_RDONLY, MS_REMOUNT, MS_BIND, MNT_DETACH = 1, 32, 4096, 2
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]

        pytestmark = pytest.mark.isolated(binds=[f"{GRANTED}:/data"])

        def assert_read_only():
            with open("/data/file.txt") as f:
                assert f.read() == "host content"
            for attempt in (lambda: open("/data/new.txt", "w"),
                            lambda: open("/data/file.txt", "a"),
                            lambda: os.unlink("/data/file.txt")):
                with pytest.raises(OSError) as info:
                    attempt()
                assert info.value.errno == errno.EROFS

        def test_writes_fail():
            assert_read_only()

        def test_remount_read_write_is_refused():
            assert libc.mount(None, b"/data", None, MS_REMOUNT | MS_BIND, None) == -1
            assert ctypes.get_errno() == errno.EPERM
            assert libc.umount2(b"/data", MNT_DETACH) == -1
            assert ctypes.get_errno() == errno.EPERM
            assert_read_only()

        def test_mount_command_cannot_remount_it():
            if shutil.which("mount") is None:
                pytest.skip("no mount(8) here")
            done = subprocess.run(["mount", "-o", "remount,rw", "/data"], capture_output=True)
            assert done.returncode != 0
            assert_read_only()

        @pytest.mark.isolated(binds=[f"{GRANTED}:/data:rw"])
        def test_rw_grant_is_writable():
            with open("/data/new.txt", "w") as f:
                f.write("written inside")
    """)
    run_isolated(pytester).assert_outcomes(passed=4)
    assert sorted(os.listdir(granted)) == ["file.txt", "new.txt"]
    assert (granted / "new.txt").read_text() == "written inside"
    assert (granted / "file.txt").read_text() == "host content"


def test_bind_of_a_missing_host_path_is_a_clear_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.isolated(binds=["/nonexistent-pytest-isolate:/data"])
        def test_granted_missing_path():
            pass
    """)
    result = run_isolated(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*/nonexistent-pytest-isolate*"])


def test_writable_bind_of_a_missing_host_path_is_made_and_relative_paths_are_the_projects(
    pytester: pytest.Pytester,
) -> None:
    """A writable grant of a host directory that is not there yet (the
    project's .hypothesis on a first run) is made for it, as Docker does, and
    a relative host path is below the directory pytest runs in; a read-only
    grant of a missing path stays an error (above)."""
    pytester.makepyfile("""
        import os
        import pytest

        @pytest.mark.isolated(binds=[".state:rw"])
        def test_writes_its_state():
            here = os.getcwd()
            with open(os.path.join(here, ".state", "example"), "w") as f:
                f.write("kept")
            with pytest.raises(OSError):
                open(os.path.join(here, "elsewhere"), "w")
    """)
    run_isolated(pytester).assert_outcomes(passed=1)
    assert (pytester.path / ".state" / "example").read_text() == "kept"
    assert not (pytester.path / "elsewhere").exists()


@requires("root")
def test_strict_profile_shows_sys_path_entries_under_opt(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Virtualenvs and vendored packages often live in /opt; the rootless
    # tests' interpreter does (/opt/pytest-isolate-user-venv).
    opt_dir = Path(f"/opt/pytest-isolate-test-{uuid.uuid4().hex[:12]}")
    opt_dir.mkdir()
    try:
        (opt_dir / "optmod.py").write_text("VALUE = 42\n")
        monkeypatch.setenv(
            "PYTHONPATH", os.pathsep.join(filter(None, [str(opt_dir), os.getenv("PYTHONPATH")]))
        )
        pytester.makepyfile("""
            import pytest

            def test_default_profile_imports_from_opt():
                import optmod
                assert optmod.VALUE == 42

            @pytest.mark.isolated(strict=True)
            def test_strict_profile_imports_from_opt():
                import optmod
                assert optmod.VALUE == 42
        """)
        run_isolated(pytester).assert_outcomes(passed=2)
    finally:
        (opt_dir / "optmod.py").unlink()
        opt_dir.rmdir()
