"""Pods: a network namespace shared by isolated tests, with a real server in it.

The functional tests run a real pytest (pytester, in a subprocess) whose session
fixture starts an HTTP server in a pod; isolated tests that join the pod fetch
from it, a default isolated test and a test on the host cannot connect. The
kernel tests drive the Pod API directly. Run as root and, nested, as an
unprivileged user (the rootless path joins the pod's user namespace first).
"""

from __future__ import annotations

import functools
import http.server
import os
import signal
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_isolate.pods import Pod, PodError, lookup_pod, pod

ROOTLESS = os.geteuid() != 0

# The module a pytester run executes: a session-scoped pod with a real HTTP
# server, shared by the isolated tests that join it.
POD_SUITE = """
import errno
import functools
import http.server
import os
import urllib.request

import pytest

from pytest_isolate.pods import pod

PORT = {port}
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from the pod of {{WORKER}}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve(port):
    http.server.HTTPServer(("127.0.0.1", port), Hello).serve_forever()


@pytest.fixture(scope="session")
def web():
    with pod("web") as p:
        p.spawn(functools.partial(serve, PORT))
        p.wait_for_port(PORT)
        yield f"http://127.0.0.1:{{PORT}}/"


def fetch(url):
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


@pytest.mark.isolated(pod="web")
@pytest.mark.parametrize("n", range({count}))
def test_isolated_test_in_the_pod_reaches_its_server(web, n):
    # Each xdist worker starts its own pod: the answer comes from this worker's.
    assert fetch(web) == f"hello from the pod of {{WORKER}}"


@pytest.mark.isolated
def test_isolated_test_outside_the_pod_is_refused(web):
    with pytest.raises(urllib.error.URLError) as info:
        fetch(web)
    assert info.value.reason.errno == errno.ECONNREFUSED


def test_host_test_is_refused(web):
    with pytest.raises(urllib.error.URLError) as info:
        fetch(web)
    assert info.value.reason.errno == errno.ECONNREFUSED
"""


def free_port() -> int:
    """A port nothing on the host listens on, so the host's refusal is the pod's doing."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_hello(port: int) -> None:
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

    http.server.HTTPServer(("127.0.0.1", port), Hello).serve_forever()


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.fixture
def web_pod() -> Iterator[Pod]:
    try:
        with pod("unit-web") as started:
            yield started
    except PodError as exc:
        if ROOTLESS and "user namespace" in str(exc):
            pytest.skip(f"rootless pods need unprivileged user namespaces: {exc}")
        raise


# ------------------------------------------------------------------ through pytest


def test_isolated_tests_in_a_pod_reach_its_server_while_the_rest_are_refused(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_web=POD_SUITE.format(port=free_port(), count=3))
    result = pytester.runpytest_subprocess("-v", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(
        [
            "test_web.py::test_isolated_test_in_the_pod_reaches_its_server[[]0[]] PASSED*",
            "test_web.py::test_isolated_test_in_the_pod_reaches_its_server[[]1[]] PASSED*",
            "test_web.py::test_isolated_test_in_the_pod_reaches_its_server[[]2[]] PASSED*",
            "test_web.py::test_isolated_test_outside_the_pod_is_refused PASSED*",
            "test_web.py::test_host_test_is_refused PASSED*",
            "*= 5 passed in *",
        ]
    )
    assert result.ret == 0


def test_under_xdist_each_worker_starts_its_own_pod_on_the_same_port(
    pytester: pytest.Pytester,
) -> None:
    pytest.importorskip("xdist", reason="pytest-xdist is not installed")
    pytester.makepyfile(test_web=POD_SUITE.format(port=free_port(), count=12))
    result = pytester.runpytest_subprocess("-n", "2", "-v", "-p", "no:cacheprovider")
    # Both workers ran pod tests, each against the server of its own pod (the
    # test asserts the answer names its worker), both servers on one port.
    result.stdout.fnmatch_lines(["*[[]gw0[]]*PASSED*test_isolated_test_in_the_pod_reaches*"])
    result.stdout.fnmatch_lines(["*[[]gw1[]]*PASSED*test_isolated_test_in_the_pod_reaches*"])
    result.stdout.fnmatch_lines(["*= 14 passed in *"])
    assert result.ret == 0


def test_unknown_pod_name_is_an_error_on_that_test_naming_the_fix(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_nopod="""
        import pytest

        @pytest.mark.isolated(pod="nope")
        def test_needs_a_pod():
            pass

        @pytest.mark.isolated
        def test_other():
            pass
    """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_needs_a_pod*",
            "test_nopod.py::test_needs_a_pod: isolated(pod='nope'): no pod named 'nope' is running "
            "in this pytest process; start it in a fixture: `with pytest_isolate.pod('nope') as p: "
            "...` and request that fixture from the test (see docs/pods.md)",
            "*= 1 passed, 1 error in *",
        ]
    )
    result.stdout.no_fnmatch_line("*INTERNALERROR*")
    assert result.ret == 1


# ------------------------------------------------------------------ the Pod API


def test_spawned_server_is_reachable_in_the_pod_and_refused_on_the_host(web_pod: Pod) -> None:
    port = free_port()
    web_pod.spawn(functools.partial(serve_hello, port))
    web_pod.wait_for_port(port)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    # From inside: a program the pod runs fetches the page.
    fetch = web_pod.popen(
        [
            "python3",
            "-c",
            "import urllib.request; print(urllib.request."
            f"urlopen('http://127.0.0.1:{port}/', timeout=5).read().decode())",
        ],
        stdout=-1,
        text=True,
    )
    out, _ = fetch.communicate(timeout=10)
    assert (fetch.returncode, out) == (0, "hello\n")


def test_host_listener_is_not_reachable_from_the_pod(web_pod: Pod) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(
            PodError,
            match=rf"127.0.0.1:{port} .* \(last error: Connection "
            r"refused\)",
        ):
            web_pod.wait_for_port(port, timeout=0.3)


def test_pod_has_its_own_network_namespace_with_only_loopback(web_pod: Pod) -> None:
    assert os.readlink(web_pod.netns_path) != os.readlink("/proc/self/ns/net")
    show = web_pod.popen(["cat", "/proc/net/dev"], stdout=-1, text=True)
    out, _ = show.communicate(timeout=10)
    # /proc/net follows the reader's network namespace (the pod has no mount namespace).
    interfaces = [line.split(":")[0].strip() for line in out.splitlines()[2:]]
    assert interfaces == ["lo"]
    assert lookup_pod("unit-web") == (web_pod.netns_path, web_pod.userns_path)
    assert (web_pod.userns_path is not None) == ROOTLESS


def test_close_kills_a_daemonized_grandchild_and_unregisters(web_pod: Pod, tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"

    def daemonize() -> None:
        if os.fork():
            return
        os.setsid()
        if os.fork():
            os._exit(0)
        # /proc is the host's here: /proc/self names the host pid.
        pidfile.write_text(os.readlink("/proc/self"))
        signal.pause()

    relay = web_pod.spawn(daemonize)
    _, status = os.waitpid(relay, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    deadline = time.monotonic() + 5
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline, "the daemon did not start"
        time.sleep(0.01)
    daemon = int(pidfile.read_text())
    assert alive(daemon)
    holder = web_pod.pid
    web_pod.close()
    deadline = time.monotonic() + 5
    while alive(daemon):
        assert time.monotonic() < deadline, "the daemon outlived its pod"
        time.sleep(0.01)
    assert not alive(holder)
    with pytest.raises(PodError, match="no pod named 'unit-web' is running"):
        lookup_pod("unit-web")
    with pytest.raises(PodError, match=r"spawn\(\) called after close\(\)"):
        web_pod.spawn(lambda: None)


def test_popen_relays_signals_and_exit_status(web_pod: Pod) -> None:
    sleeper = web_pod.popen(["sleep", "30"])
    time.sleep(0.1)
    sleeper.terminate()
    assert sleeper.wait(timeout=5) == -signal.SIGTERM
    assert web_pod.popen(["sh", "-c", "exit 7"]).wait(timeout=5) == 7
    # In the pod's pid namespace: the shell is not pid 1 (the pod's init is).
    shell = web_pod.popen(["sh", "-c", "echo $$"], stdout=-1, text=True)
    out, _ = shell.communicate(timeout=5)
    assert int(out) > 1


def test_popen_of_a_missing_program_raises_file_not_found_at_once(web_pod: Pod) -> None:
    with pytest.raises(FileNotFoundError, match="'no-such-program' was not found on PATH"):
        web_pod.popen(["no-such-program"])
    with pytest.raises(PodError, match="takes a list of arguments, not a shell string"):
        web_pod.popen("echo hi")


def test_server_that_never_listens_fails_wait_for_port_with_its_log(web_pod: Pod) -> None:
    def broken() -> None:
        print("starting up")
        raise RuntimeError("no config file")

    relay = web_pod.spawn(broken)
    with pytest.raises(PodError) as info:
        web_pod.wait_for_port(free_port(), timeout=0.3)
    message = str(info.value)
    assert "(last error: Connection refused)" in message
    assert f"spawn() pid {relay} ended: exit status 1" in message
    assert "starting up" in message
    assert "RuntimeError: no config file" in message


def test_second_pod_with_a_running_name_or_a_bad_name_is_refused(web_pod: Pod) -> None:
    with pytest.raises(
        PodError,
        match=r"pod\('unit-web'\): a pod named 'unit-web' is already "
        r"running in this pytest process \(holder pid \d+\)",
    ):
        Pod("unit-web")
    with pytest.raises(PodError, match=r"pod\('a b'\): invalid pod name 'a b'"):
        Pod("a b")


def test_pod_used_from_a_forked_process_is_refused_and_not_torn_down(web_pod: Pod) -> None:
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns when forking a multi-threaded process (xdist's execnet
        # thread); the child only calls the pod and leaves via os._exit.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            web_pod.spawn(lambda: None)
            answer = "no error"
        except PodError as exc:
            answer = str(exc)
        web_pod.close()  # a copy: must leave the real pod alone
        os.write(write_fd, answer.encode())
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    assert "spawn() called from another process" in message
    assert web_pod.holder_status() is None
    assert lookup_pod("unit-web")[0] == web_pod.netns_path


def test_killed_holder_is_reported_by_lookup(web_pod: Pod) -> None:
    os.kill(web_pod.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while web_pod.holder_status() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(
        PodError,
        match=r"the pod's holder process \(pid \d+\) has ended "
        r"\(killed by SIGKILL\)",
    ):
        lookup_pod("unit-web")
