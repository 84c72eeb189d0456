"""The zygote (zygote.py): a copy of pytest's process forks the sandboxes
while pytest's state stays the same. Against the real kernel: the test
processes it forks are pytest's children, see exactly the state a fork of
pytest would, and never reach the zygote; pytest goes on without it."""

from __future__ import annotations

import os
import random
import re
import signal
import sys
import textwrap
import time

import pytest
from conftest import requires

from pytest_isolate import sandbox
from pytest_isolate import syscalls as sc
from pytest_isolate.sandbox import fork_born

ISOLATE = ("--isolate", "-p", "no:randomly", "-p", "no:cacheprovider")


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*ISOLATE, *args, timeout=120)


def _forks(result: pytest.RunResult) -> dict[str, int]:
    """The -vv summary line: how the sandboxes were made."""
    text = "\n".join(result.outlines)
    found = re.search(
        r"isolate: (\d+) sandboxes, (\d+) prepared during the previous test, "
        r"(\d+) forked by (\d+) zygotes?",
        text,
    )
    assert found, text
    sandboxes, prepared, by_zygote, zygotes = map(int, found.groups())
    return {
        "sandboxes": sandboxes,
        "prepared": prepared,
        "by_zygote": by_zygote,
        "zygotes": zygotes,
    }


needs_sibling_fork = pytest.mark.skipif(
    sc.sibling_fork_unavailable() is not None, reason=str(sc.sibling_fork_unavailable())
)


@needs_sibling_fork
def test_fork_sibling_makes_a_child_of_the_callers_parent() -> None:
    """clone(CLONE_PARENT) from Python: the child's parent is ours, it runs
    Python's after-fork steps (a new random state), and knows its own tid."""
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:  # pragma: no cover - the forked middle process
        try:
            child = sc.fork_sibling()
            if child == 0:
                signal.signal(signal.SIGUSR1, lambda *_: None)
                signal.raise_signal(signal.SIGUSR1)  # to itself, not to the middle
                os.write(write_end, f"{os.getppid()} {random.random()}\n".encode())
                os._exit(5)
            os._exit(0)
        finally:
            os._exit(1)
    os.close(write_end)
    statuses = {}
    for _ in range(2):
        pid, status = os.waitpid(-1, 0)  # both are ours: the middle and its sibling
        statuses[pid] = os.waitstatus_to_exitcode(status)
    parent, drawn = os.read(read_end, 200).decode().split()
    os.close(read_end)
    assert int(parent) == os.getpid()
    assert statuses.pop(middle) == 0
    assert list(statuses.values()) == [5]
    assert float(drawn) != random.random()  # not our state continued


def test_modules_whose_collectors_do_nothing_share_one_zygote(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_a="\n".join(f"def test_{i}():\n    pass\n" for i in range(6)),
        test_b="\n".join(f"def test_{i}():\n    pass\n" for i in range(6)),
    )
    result = run(pytester, "-vv")
    result.assert_outcomes(passed=12)
    forks = _forks(result)
    if sc.sibling_fork_unavailable() is not None:
        assert forks["by_zygote"] == 0
        return
    # The first sandbox is pytest's; the second is prepared during the
    # first, by a new zygote. Leaving module a and entering b runs no code
    # in pytest's process (no fixture, no setup_module): the same zygote
    # forks every other sandbox, b's first one prepared across the boundary.
    assert forks == {"sandboxes": 12, "prepared": 11, "by_zygote": 11, "zygotes": 1}


def test_setup_or_teardown_code_between_modules_makes_a_new_zygote(
    pytester: pytest.Pytester,
) -> None:
    """A module fixture torn down, or a setup_module, runs in pytest's process:
    the sandboxes after it come from a zygote forked after it, and see what
    it did."""
    pytester.makepyfile(
        test_a="""
            import os, pytest

            @pytest.fixture(scope="module", autouse=True)
            def leaves_a_mark():
                yield
                os.environ["TORN_DOWN_A"] = "1"

            def test_0(): pass
            def test_1(): pass
            def test_2(): pass
        """,
        test_b="""
            import os

            def setup_module():
                os.environ["SET_UP_B"] = "1"

            def test_0(): assert os.environ.get("TORN_DOWN_A") == "1"
            def test_1(): assert os.environ.get("TORN_DOWN_A") == "1"
            def test_2(): assert os.environ.get("SET_UP_B") == "1"
        """,
        test_c="""
            import os

            def test_0(): assert os.environ.get("SET_UP_B") == "1"
            def test_1(): assert os.environ.get("SET_UP_B") == "1"
            def test_2(): assert os.environ.get("TORN_DOWN_A") == "1"
        """,
    )
    result = run(pytester, "-vv")
    result.assert_outcomes(passed=9)
    forks = _forks(result)
    if sc.sibling_fork_unavailable() is None:
        # One zygote a module: each boundary runs code in pytest's process.
        assert forks["zygotes"] == 3


def test_the_zygote_can_be_turned_off(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("\n".join(f"def test_{i}():\n    pass\n" for i in range(4)))
    os.environ["PYTEST_ISOLATE_ZYGOTE"] = "0"
    try:
        result = run(pytester, "-vv")
    finally:
        del os.environ["PYTEST_ISOLATE_ZYGOTE"]
    result.assert_outcomes(passed=4)
    assert _forks(result)["by_zygote"] == 0
    result.stdout.fnmatch_lines(["*zygote off: PYTEST_ISOLATE_ZYGOTE=0*"])


def test_tests_of_one_zygote_start_from_the_same_state_each(pytester: pytest.Pytester) -> None:
    """Each sandbox forked by the zygote starts from pytest's state, not from
    what an earlier test of the zygote changed, and draws its own random
    numbers (Python's after-fork steps ran)."""
    pytester.makepyfile("""
        import os, random
        import pytest

        SEEN = []

        @pytest.fixture(scope="module")
        def shared():
            return {"calls": 0}

        @pytest.mark.parametrize("i", range(5))
        def test_fresh(i, shared, tmp_path_factory):
            shared["calls"] += 1
            SEEN.append(i)
            assert shared["calls"] == 1 and SEEN == [i]
            out = tmp_path_factory.getbasetemp() / "draws"
            with open(out, "a") as f:
                f.write(f"{random.random()}\\n")
    """)
    result = run(pytester, "-vv")
    result.assert_outcomes(passed=5)
    draws = (pytester.path / "runpytest-0" / "draws").read_text().split()
    assert len(set(draws)) == 5


def test_state_pytest_changes_between_tests_is_seen(pytester: pytest.Pytester) -> None:
    """A zygote is a snapshot: after pytest's process changed (a test run
    without isolation, a module fixture set up for a later test), the next
    sandboxes come from a process that has the change."""
    pytester.makepyfile("""
        import pytest

        STATE = {"plain": 0}

        @pytest.fixture(scope="module")
        def late():
            return "set up for test_4"

        def test_0():
            assert STATE["plain"] == 0

        def test_1():
            assert STATE["plain"] == 0

        @pytest.mark.isolated(False)
        def test_2_in_pytest():
            STATE["plain"] += 1

        def test_3():
            assert STATE["plain"] == 1

        def test_4(late):
            assert STATE["plain"] == 1 and late == "set up for test_4"

        def test_5(late):
            assert STATE["plain"] == 1 and late == "set up for test_4"

        def test_6():
            assert STATE["plain"] == 1
    """)
    result = run(pytester, "-vv")
    result.assert_outcomes(passed=7)


def test_pytest_goes_on_when_its_zygote_dies(pytester: pytest.Pytester) -> None:
    """Killed between two tests, the zygote is replaced (or pytest forks
    itself): every test still runs, and nothing is left behind."""
    pytester.makeconftest("""
        import os, signal
        from pytest_isolate.plugin import _engine_key

        def pytest_runtest_logreport(report):
            if report.when != "call" or not report.nodeid.endswith("[2]"):
                return
            engine = pytest_runtest_logreport.config.stash[_engine_key]
            zygote = engine._zygote
            if zygote is not None and zygote.pid > 0:
                os.kill(zygote.pid, signal.SIGKILL)

        def pytest_configure(config):
            pytest_runtest_logreport.config = config
    """)
    pytester.makepyfile("""
        import os, pytest
        @pytest.mark.parametrize("i", range(8))
        def test_many(i):
            assert os.getpid() == 2  # alone in its pid namespace, after its init
    """)
    result = run(pytester, "-vv")
    result.assert_outcomes(passed=8)


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only")
def test_zygotes_end_with_the_session(pytester: pytest.Pytester) -> None:
    """No zygote outlives pytest: the session waits for each one it ended."""
    pytester.makepyfile(
        **{f"test_{m}": "\n".join(f"def test_{i}():\n    pass\n" for i in range(4)) for m in "abc"}
    )
    pytester.makeconftest("""
        import os
        def pytest_unconfigure(config):
            with open("children.txt", "w") as f:
                f.write(open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read())
    """)
    result = run(pytester, "-vv")
    result.assert_outcomes(passed=12)
    deadline = time.monotonic() + 5
    children = (pytester.path / "children.txt").read_text().split()
    while children and time.monotonic() < deadline:
        time.sleep(0.1)
        children = [c for c in children if os.path.exists(f"/proc/{c}")]
    assert children == []


def test_a_spec_the_zygote_does_not_know_is_forked_by_pytest(pytester: pytest.Pytester) -> None:
    """A plan made after the zygote was forked (another spec, a pod's) is not
    in its copy of pytest's state: pytest forks that sandbox itself, and the
    zygote goes on serving the others."""
    pytester.makepyfile("""
        import pytest

        def test_0():
            pass

        def test_1():
            pass

        def test_2():
            pass

        @pytest.mark.isolated(hostname="other")
        def test_3_other_spec():
            import socket
            assert socket.gethostname() == "other"

        def test_4():
            import socket
            assert socket.gethostname() == "isolated"

        def test_5():
            pass
    """)
    result = run(pytester, "-vv")
    result.assert_outcomes(passed=6)
    assert "zygote off" not in result.stdout.str()
    if sc.sibling_fork_unavailable() is None:
        assert _forks(result)["by_zygote"] >= 3


ZYGOTE_CONFTEST = """
    import os

    def bounding():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 16) for line in f if line.startswith("CapBnd"))

    def pytest_configure(config):
        # pytest's own bounding set, for the sandboxes without the capability layer.
        os.environ["PYTEST_BOUNDING"] = str(bounding())
        # A directory descriptor pytest's process holds when the zygote is forked.
        os.environ["HELD_DIR_FD"] = str(os.open("/", os.O_RDONLY | os.O_DIRECTORY))
"""

ZYGOTE_CHECKS = """
    import errno, os, stat
    import pytest
    from conftest import bounding

    def effective():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 16) for line in f if line.startswith("CapEff"))

    def no_directory_fd():
        # Closed, or its number since given to another descriptor.
        try:
            assert not stat.S_ISDIR(os.fstat(int(os.environ["HELD_DIR_FD"])).st_mode)
        except OSError as exc:
            assert exc.errno == errno.EBADF
        for name in os.listdir("/proc/self/fd"):
            path = f"/proc/self/fd/{name}"
            assert not os.path.isdir(path + "/") or not os.path.exists(path), os.readlink(path)
"""


@pytest.mark.skipif(sc.sibling_fork_unavailable() is not None, reason="no zygote here")
def test_a_zygotes_children_hold_no_directory_descriptor_and_their_own_bounding_set(
    pytester: pytest.Pytester,
) -> None:
    """The zygote closes pytest's directory descriptors and drops from its
    bounding set what none of its plans keeps, once; its children then skip
    both. Each test process still ends with bounding = effective = its
    spec's set, and none holds a directory descriptor."""
    pytester.makeconftest(ZYGOTE_CONFTEST)
    pytester.makepyfile(
        ZYGOTE_CHECKS
        + """
    FEWER = pytest.mark.isolated(caps_drop=["chown", "kill"])

    @FEWER
    def test_0_fewer():  # its plan is known to the zygote forked during it
        assert bounding() == effective()

    @pytest.mark.parametrize("n", range(6))
    def test_1_default(n):
        no_directory_fd()
        assert bounding() == effective() != int(os.environ["PYTEST_BOUNDING"])

    @FEWER
    @pytest.mark.parametrize("n", range(3))
    def test_2_fewer(n):  # drops chown and kill itself: the default plan keeps them
        no_directory_fd()
        assert bounding() == effective()
    """
    )
    result = run(pytester, "-vv")
    result.assert_outcomes(passed=10)
    assert _forks(result)["by_zygote"] >= 8


@pytest.mark.skipif(sc.sibling_fork_unavailable() is not None, reason="no zygote here")
def test_a_plan_without_the_capability_layer_keeps_the_whole_bounding_set(
    pytester: pytest.Pytester,
) -> None:
    """A zygote whose plans include one without the capability layer drops
    nothing from its bounding set: those sandboxes keep pytest's, the others
    drop their own."""
    pytester.makeconftest(ZYGOTE_CONFTEST)
    pytester.makepyfile(
        ZYGOTE_CHECKS
        + """
    NO_CAPS = pytest.mark.isolated(layers="namespaces,rootfs,cgroup,seccomp")

    def keeps_pytests_bounding_set():
        # All of pytest's (rootless, a new user namespace's is all of them).
        pytests = int(os.environ["PYTEST_BOUNDING"])
        assert bounding() & pytests == pytests

    @NO_CAPS
    def test_0_no_caps():
        keeps_pytests_bounding_set()

    @pytest.mark.parametrize("n", range(4))
    def test_1_default(n):
        no_directory_fd()
        assert bounding() == effective() != int(os.environ["PYTEST_BOUNDING"])

    @NO_CAPS
    @pytest.mark.parametrize("n", range(3))
    def test_2_no_caps(n):
        no_directory_fd()
        keeps_pytests_bounding_set()
    """
    )
    result = run(pytester, "-vv")
    result.assert_outcomes(passed=8)
    assert _forks(result)["by_zygote"] >= 5


@pytest.mark.skipif(sc.sibling_fork_unavailable() is not None, reason="no zygote here")
def test_a_timed_out_test_forked_by_the_zygote_shows_its_stack(pytester: pytest.Pytester) -> None:
    """The dump handlers are installed once in the zygote, for a descriptor
    each test process points at its own stack memfd: the Python stack of a
    test that timed out, and faulthandler's C-level one when Python code
    cannot run its handler (the signal blocked here), still reach pytest."""
    pytester.makepyfile("""
        import signal, time, pytest

        # One spec (so one plan) for every test: the zygote knows it.
        pytestmark = pytest.mark.isolated(timeout=1)

        @pytest.mark.parametrize("n", range(3))
        def test_quick(n):
            pass

        def test_stuck_in_python():
            waiting_here()

        def waiting_here():
            time.sleep(60)

        def test_stuck_with_the_python_handler_blocked():
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGRTMIN + 3})
            time.sleep(60)
    """)
    result = run(pytester, "-vv")
    result.assert_outcomes(passed=3, failed=2)
    assert _forks(result)["by_zygote"] >= 4
    assert "in fork_sandbox" not in result.stdout.str()  # both forked by the zygote
    result.stdout.fnmatch_lines(
        [
            "*+ Timeout +*",
            "*in test_stuck_in_python",
            "    waiting_here()",
            "*in waiting_here",
            "*_ test_stuck_with_the_python_handler_blocked _*",
            "*most recent call first*",
            "*line * in test_stuck_with_the_python_handler_blocked",
        ]
    )


@pytest.mark.skipif(sc.sibling_fork_unavailable() is not None, reason="no zygote here")
@pytest.mark.skipif(
    os.geteuid() != 0,
    reason="pages are learned as root only (where the test process is pytest's own child)",
)
def test_pages_learned_after_the_zygote_started_are_sent_to_it(pytester: pytest.Pytester) -> None:
    """The zygote is forked before pytest's process has learned which pages
    tests write (prefault.py); what is learned later goes to it with the next
    request that copies pages ahead, so one zygote serves the whole run and
    its sandboxes still copy them."""
    pytester.makeconftest("""
        from pytest_isolate.plugin import _engine_key

        def pytest_sessionfinish(session):
            engine = session.config.stash[_engine_key]
            with open("state.txt", "w") as f:
                f.write(f"{len(engine._hot_pages)} {engine._pages_known is engine._hot_pages}")
    """)
    pytester.makepyfile("""
        import time, pytest

        @pytest.mark.parametrize("n", range(8))
        def test_long_enough(n):
            time.sleep(0.02)
    """)
    result = run(pytester, "-vv")
    result.assert_outcomes(passed=8)
    assert _forks(result)["zygotes"] == 1
    learned, sent = (pytester.path / "state.txt").read_text().split()
    assert int(learned) > 0 and sent == "True"


def test_test_processes_find_their_items_location_computed(pytester: pytest.Pytester) -> None:
    """pytest's process computes every item's location (a cached property)
    before it forks a zygote: the test processes it forks do not compute
    it again for their reports. A fixture sees it already there, before the
    setup report (which would compute it) is made."""
    pytester.makeconftest("""
        import pytest

        @pytest.fixture(autouse=True)
        def located(request):
            assert "location" in vars(request.node)
    """)
    for name in ("a", "b", "c"):
        pytester.makepyfile(
            **{f"test_{name}": "\n".join(f"def test_{i}():\n    pass\n" for i in range(4))}
        )
    result = run(pytester, "-vv")
    result.assert_outcomes(passed=12)
    if sc.sibling_fork_unavailable() is None:
        assert _forks(result)["by_zygote"] == 11


def test_quick_tests_copy_no_pages_ahead_however_busy_pytest_is(pytester: pytest.Pytester) -> None:
    """Whether a prepared sandbox copies pages ahead depends on how long the
    test before it ran (its phases, timed in the test process), not on the
    time pytest's process took meanwhile: 12 quick tests, with pytest's
    process slowed down by 150 ms while each runs, learn and copy nothing.
    The threshold is raised to 100 ms for the run: quick tests take more
    than the usual 10 ms on a slow machine (the cgroup-v2 VM)."""
    pytester.makeconftest("""
        import time
        from pytest_isolate import engine
        from pytest_isolate.plugin import _engine_key

        engine._PREFAULT_MIN_RUN = 0.1
        prepare = engine.Engine._prepare_next

        def slow_prepare(self, item, nextitem):
            time.sleep(0.15)
            return prepare(self, item, nextitem)

        engine.Engine._prepare_next = slow_prepare

        def pytest_sessionfinish(session):
            e = session.config.stash[_engine_key]
            with open("state.txt", "w") as f:
                f.write(f"{len(e._hot_pages)} {e._last_run}")
    """)
    pytester.makepyfile("\n".join(f"def test_{i}():\n    pass\n" for i in range(12)))
    result = run(pytester)
    result.assert_outcomes(passed=12)
    learned, last_run = (pytester.path / "state.txt").read_text().split()
    assert int(learned) == 0
    assert 0 < float(last_run) < 0.1


@requires("cgroup2", "cgroup")
def test_on_cgroup_v2_test_processes_are_born_in_their_cgroup(pytester: pytest.Pytester) -> None:
    """clone3(CLONE_INTO_CGROUP): whether pytest's process (the first test)
    or the zygote forks it, a test process starts in its own cgroup and
    writes nothing to a cgroup.procs file (no wait for the kernel)."""
    pytester.makepyfile(
        test_born="""
            import pytest
            from pytest_isolate import sandbox

            @pytest.mark.isolated(memory="200M")
            @pytest.mark.parametrize("n", range(4))
            def test_born(n):
                with open("/proc/self/cgroup") as f:
                    where = f.read()
                assert sandbox._BORN_IN_CGROUP, where
                assert where == "0::/\\n"  # the root of its cgroup namespace: its own
                with open("/sys/fs/cgroup/memory.max") as f:
                    assert f.read() == str(200 << 20) + "\\n"
        """
    )
    # pytest-rerunfailures keeps a thread in pytest's process: with a second
    # thread there, pytest forks with os.fork and the child moves itself.
    result = run(pytester, "-vv", "-p", "no:rerunfailures")
    result.assert_outcomes(passed=4)
    forks = _forks(result)
    if sc.sibling_fork_unavailable() is None:
        assert forks["by_zygote"] >= 1
    assert forks["sandboxes"] - forks["by_zygote"] >= 1  # the first, forked by pytest


def test_a_fork_into_a_cgroup_that_cannot_be_had_falls_back(tmp_path: object) -> None:
    """No such directory, or none of cgroup v2: the fallback forks (the child
    then writes itself to cgroup.procs), and the child knows it was not born
    in a cgroup."""
    read_end, write_end = os.pipe()
    with open("/proc/self/mounts") as f:
        v1 = [line.split()[1] for line in f if line.split()[2] == "cgroup"]
    for into in ["/nonexistent/cgroup", *v1[:1], str(tmp_path)]:
        pid = fork_born(into, 0, os.fork, sibling=False)
        if pid == 0:  # pragma: no cover - the child
            from pytest_isolate import sandbox

            os.write(write_end, b"1" if sandbox._BORN_IN_CGROUP else b"0")
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert os.read(read_end, 1) == b"0", into
    os.close(read_end)
    os.close(write_end)


@requires("rootless", "userns")
def test_rootless_pid_1_is_born_in_its_namespaces(pytester: pytest.Pytester) -> None:
    """Rootless, without a pod: one clone, by pytest's process (the first
    test) or the zygote, makes the sandbox's pid 1 in its user, pid, mount,
    uts, ipc and net namespaces, with no outer process to relay its end."""
    pytester.makepyfile(
        test_born="""
            import os, socket
            from pytest_isolate import sandbox

            def test_born():
                assert sandbox._BORN_IN_NAMESPACES
                assert os.getpid() == 2 and os.getppid() == 1
                assert socket.if_nameindex() == [(1, "lo")]

            def test_born_again():
                assert sandbox._BORN_IN_NAMESPACES
                assert os.getpid() == 2
        """
    )
    result = run(pytester, "-vv", "-p", "no:rerunfailures")
    result.assert_outcomes(passed=2)
    assert _forks(result)["sandboxes"] == 2


def _native_pid1_expected() -> bool:
    from pytest_isolate import sandbox

    return sandbox._NATIVE[0] and sc.sibling_fork_unavailable() is None


@requires("rootless", "userns")
@pytest.mark.parametrize("c_pid1", ["1", "0"])
def test_rootless_pid_1_in_c_serves_the_test_as_pid_1_in_python_did(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, c_pid1: str
) -> None:
    """Rootless, a zygote's sandboxes have the C pid 1 (_pid1.c) where it is
    built: the test process is its child, pid 2, in its namespaces; pid 1
    reaps orphans, kills what the test left when it ends, reports the test
    process's exit status and signal, and forwards the stack dump on a
    timeout. Nothing in the sandbox can trace pid 1 or read its memory, which
    is the zygote's, not even with CAP_SYS_PTRACE in the sandbox. With
    PYTEST_ISOLATE_C_PID1=0, pid 1 in Python does the same."""
    monkeypatch.setenv("PYTEST_ISOLATE_C_PID1", c_pid1)
    marker = f"pid1-native-leftover-{os.getpid()}-{random.randrange(1 << 30)}"
    pytester.makepyfile(
        test_native=f"""
            import ctypes, errno, os, signal, subprocess, sys, time
            import pytest
            from pytest_isolate import sandbox

            pytestmark = pytest.mark.isolated(caps_add=["SYS_PTRACE"])

            def test_0_first_by_pytest():
                pass

            def test_1_shape():
                print("NATIVE", sandbox._NATIVE_PID1)
                assert os.getpid() == 2 and os.getppid() == 1
                assert sandbox._BORN_IN_NAMESPACES

            def test_2_pid_1_cannot_be_traced_or_read():
                libc = ctypes.CDLL(None, use_errno=True)
                libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                                        ctypes.c_void_p]
                assert libc.ptrace(16, 1, None, None) == -1  # PTRACE_ATTACH
                assert ctypes.get_errno() == errno.EPERM
                for name in ("mem", "environ"):
                    with pytest.raises(PermissionError):
                        open(f"/proc/1/{{name}}", "rb")

            def test_3_orphans_are_reaped():
                # A double fork: the grandchild's parent dies, pid 1 adopts it.
                subprocess.run(["sh", "-c", "sleep 0.2 &"], check=True)
                time.sleep(0.5)
                with open("/proc/1/status") as f:
                    assert "State:\tS" in f.read()
                states = []
                for pid in os.listdir("/proc"):
                    if pid.isdigit():
                        with open(f"/proc/{{pid}}/stat") as f:
                            states.append(f.read().split(")")[1].split()[0])
                assert "Z" not in states, states

            def test_4_leaves_a_process_behind():
                subprocess.Popen(
                    ["sh", "-c", "sleep 1000; true", "{marker}"], start_new_session=True
                )

            def test_5_exits_with_status():
                sys.stdout.flush()
                os._exit(7)

            def test_6_killed_by_signal():
                os.kill(os.getpid(), signal.SIGKILL)

            @pytest.mark.isolated(timeout=1)
            def test_7_times_out_in_a_named_function():
                def waiting_here_for_ever():
                    time.sleep(60)
                waiting_here_for_ever()

            def test_8_after_all_that():
                assert os.getpid() == 2
        """
    )
    result = run(pytester, "-vv", "-rP", "-p", "no:rerunfailures")
    result.assert_outcomes(passed=6, failed=3)
    result.stdout.fnmatch_lines(
        [
            "*test_5_exits_with_status*",
            "*the test process exited with status 7 before reporting a result*",
        ]
    )
    result.stdout.fnmatch_lines(["*the test process was killed by SIGKILL (9)*"])
    result.stdout.fnmatch_lines(["*waiting_here_for_ever*"])
    expected = "True" if c_pid1 == "1" and _native_pid1_expected() else "False"
    result.stdout.fnmatch_lines([f"NATIVE {expected}"])
    left = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    left.append(pid)
        except OSError:
            continue
    assert not left


@requires("rootless", "userns")
def test_rootless_sandboxes_are_prepared_two_tests_ahead(pytester: pytest.Pytester) -> None:
    """Rootless, while a test runs the sandboxes of the next two are made
    (engine._prepare_next): a test process was started before the test
    before it ran. Each test says when its process started (clock ticks
    since boot) and when it ran (CLOCK_BOOTTIME); tests of 0.1 s keep the
    ticks' 10 ms apart from the answer."""
    pytester.makepyfile(
        test_ahead="""
            import os, time
            import pytest

            @pytest.mark.parametrize("n", range(6))
            def test_at(n):
                with open("/proc/self/stat") as f:
                    ticks = int(f.read().rsplit(")", 1)[1].split()[19])
                started = ticks / os.sysconf("SC_CLK_TCK")
                print(f"AT {n} {started:.3f} {time.clock_gettime(time.CLOCK_BOOTTIME):.3f}")
                time.sleep(0.1)
        """
    )
    result = run(pytester, "-vv", "-s", "-p", "no:rerunfailures")
    result.assert_outcomes(passed=6)
    seen = {}
    for found in re.finditer(r"AT (\d+) ([\d.]+) ([\d.]+)", result.stdout.str()):
        n, started, ran = found.groups()
        seen[int(n)] = (float(started), float(ran))
    assert sorted(seen) == list(range(6))
    # From the third on: made while the test two before ran, so before the
    # test just before it began.
    early = [n for n in range(2, 6) if seen[n][0] + 0.03 < seen[n - 1][1]]
    assert len(early) >= 3, seen
    assert _forks(result)["prepared"] == 5


@requires("rootless", "userns")
@pytest.mark.parametrize("steps", ["program", "python"])
def test_rootless_a_failed_root_is_reported_with_its_step(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, steps: str
) -> None:
    """Rootless, pid 1 forks the test process first and the test process
    builds the root: a failure there still reaches pytest as a setup error
    naming the step, for the first sandbox (pytest's fork) and the next ones
    (the zygote's); by the program in C (steps.py) and by the Python steps
    (PYTEST_ISOLATE_C_STEPS=0) alike."""
    if steps == "python":
        monkeypatch.setenv("PYTEST_ISOLATE_C_STEPS", "0")
        planted = """
            def planted(plan):
                raise OSError(2, "planted failure")

            sandbox.apply_rootfs = planted
        """
        expected = "*isolation setup failed at step 'build the root file system'*planted failure*"
    else:
        if sandbox._native_steps is None:
            pytest.skip("pytest_isolate._steps was not built")
        # The root's program (its first step a mount) fails at that step:
        # the step it names is apply_rootfs's.
        planted = """
            real = sandbox._native_steps

            class Failing:
                @staticmethod
                def run(program):
                    if int.from_bytes(program[:4], "little") == 4:
                        return (0, 2)
                    return real.run(program)

            sandbox._native_steps = Failing
        """
        expected = (
            "*isolation setup failed at step 'make / a recursive slave mount': "
            "mount(None, '/', None, MS_REC|MS_SLAVE): ENOENT*"
        )
    pytester.makeconftest("import pytest_isolate.sandbox as sandbox\n" + textwrap.dedent(planted))
    pytester.makepyfile("def test_a():\n    pass\n\ndef test_b():\n    pass\n")
    result = run(pytester, "-p", "no:rerunfailures")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([expected] * 2)
