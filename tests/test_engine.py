"""The engine, end to end: every way an isolated test can end is reported as
pytest would, with the exact lines a user sees."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any
from xml.etree import ElementTree

import pytest
from conftest import requires
from rootless_util import run_isolated

from pytest_isolate import scratchdirs
from pytest_isolate.cgroups.common import session_lock_dir

ISOLATE = ("--isolate", "-p", "no:cacheprovider")

_SUBTESTS_ARE_PYTESTS = pytest.mark.skipif(
    int(pytest.__version__.split(".")[0]) < 9, reason="subtests are pytest 9's own"
)


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*ISOLATE, *args, timeout=120)


def test_pass_and_assertion_failure_look_as_without_isolation(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import os
        def test_passes():
            assert os.getpid() == 2  # pid 2 of its own pid namespace
        def test_fails():
            x = [1, 2]
            assert x == [1, 3]
    """)
    result = run(pytester)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*def test_fails():*",
            ">       assert x == [1, 3]",
            "E       assert [1, 2] == [1, 3]",
            "*isolation*",
            "ran isolated: layers=namespaces,rootfs,cgroup,caps,seccomp",
            "FAILED *::test_fails*",
        ]
    )


def test_a_report_larger_than_one_read_arrives_whole(pytester: pytest.Pytester) -> None:
    """pytest reads the result pipe 64 KiB at a time (sandbox._READ_SIZE): a
    failure whose report is several times that (a 300 KB assertion message)
    arrives whole, its end included."""
    pytester.makepyfile("""
        def test_fails_with_a_long_message():
            assert False, "x" * 300_000 + "THE-END"
    """)
    result = run(pytester)
    result.assert_outcomes(failed=1)
    assert "THE-END" in result.stdout.str()
    assert "malformed" not in result.stdout.str()


def test_every_crash_is_classified_on_the_test_that_crashed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import os, signal, sys
        def test_os_exit():
            print("said before dying")
            os._exit(3)
        def test_sys_exit():
            sys.exit(4)
        def test_segv():
            os.kill(os.getpid(), signal.SIGSEGV)
        def test_abort():
            os.abort()
        def test_sigkill():
            os.kill(os.getpid(), signal.SIGKILL)
        def test_after_the_crashes():
            pass
    """)
    result = run(pytester)
    result.assert_outcomes(passed=1, failed=5)
    result.stdout.fnmatch_lines(
        [
            "*_ test_os_exit _*",
            "the test process exited with status 3 before reporting a result*",
            "*Captured stdout call*",
            "said before dying",
            "*_ test_sys_exit _*",
            "E       SystemExit: 4",
            "*_ test_segv _*",
            "the test process was killed by SIGSEGV (11)",
            "*_ test_abort _*",
            "the test process was killed by SIGABRT (6)",
            "*_ test_sigkill _*",
            "the test process was killed by SIGKILL (9)",
        ]
    )


def test_timeout_kills_the_tree_and_shows_where_the_test_was_stuck(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile("""
        import subprocess, time, pytest
        @pytest.mark.isolated(timeout=1)
        def test_stuck():
            subprocess.Popen(["sleep", "313.7"])
            waiting_here()
        def waiting_here():
            time.sleep(60)
    """)
    start = time.monotonic()
    result = run(pytester)
    assert time.monotonic() - start < 30
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "Timeout: the test ran longer than its timeout of 1 s; its whole process tree was "
            "killed.",
            "*+ Timeout +*",
            "*in test_stuck",
            "    waiting_here()",
            "*in waiting_here",
            "    time.sleep(60)",
        ]
    )
    assert not _host_processes_matching("sleep 313.7")


def _host_processes_matching(cmdline: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().replace(b"\0", b" ").strip() == cmdline.encode():
                        found.append(int(pid))
            except OSError:
                pass
    return found


def test_pytest_outcomes_behave_as_without_isolation(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import logging, unittest, pytest
        def test_skip():
            pytest.skip("not today")
        @pytest.mark.skipif(True, reason="static skip")
        def test_skipif():
            pass
        @pytest.mark.xfail(reason="known")
        def test_xfail():
            assert 0
        @pytest.mark.xfail(reason="fixed")
        def test_xpass():
            pass
        @pytest.mark.xfail(strict=True, reason="must fail")
        def test_xpass_strict():
            pass
        @pytest.mark.parametrize("n", [1, 2, 3])
        def test_param(n):
            assert n < 3
        def test_fail_call():
            pytest.fail("explicit failure")
        def test_capsys(capsys):
            print("hello")
            assert capsys.readouterr().out == "hello\\n"
        def test_capfd(capfd):
            import os
            os.write(1, b"fd-level\\n")
            assert capfd.readouterr().out == "fd-level\\n"
        def test_caplog(caplog):
            logging.getLogger("x").warning("logged")
            assert "logged" in caplog.text
        class Unpicklable(Exception):
            def __init__(self):
                super().__init__("cannot cross")
                self.handle = open("/dev/null")
            def __reduce__(self):
                raise TypeError("no")
        def test_unserializable_exception():
            raise Unpicklable()
        class TestCase(unittest.TestCase):
            def test_ok(self):
                self.assertEqual(1, 1)
            def test_bad(self):
                self.assertEqual(1, 2)
    """)
    result = run(pytester, "-rxXs")
    result.assert_outcomes(passed=6, failed=5, skipped=2, xfailed=1, xpassed=1)
    result.stdout.fnmatch_lines_random(
        [
            "SKIPPED [[]1[]] *: not today",
            "SKIPPED [[]1[]] *: static skip",
            "XFAIL *::test_xfail - known",
            "XPASS *::test_xpass - fixed",
            "*[[]XPASS(strict)[]] must fail",
            "E       Failed: explicit failure",
            "E       *Unpicklable: cannot cross",
            "E       AssertionError: 1 != 2",
            "*test_param[[]3[]]*",
        ]
    )


def test_wider_fixtures_are_set_up_once_in_pytest_and_torn_down_once(
    pytester: pytest.Pytester,
) -> None:
    log = pytester.path / "fixture.log"
    pytester.makeconftest(f"""
        import os, pytest
        LOG = {str(log)!r}
        def note(text):
            with open(LOG, "a") as f:
                f.write(text + "\\n")
        @pytest.fixture(scope="session")
        def expensive():
            note("session setup")
            yield {{"value": 42}}
            note("session teardown")
        @pytest.fixture(scope="module")
        def per_module():
            note("module setup")
            yield 7
            note("module teardown")
    """)
    body = """
        def test_a(expensive, per_module):
            assert expensive["value"] == 42 and per_module == 7
        def test_b(expensive, per_module):
            expensive["value"] = 0  # changes stay in the sandbox
        def test_c(expensive):
            assert expensive["value"] == 42
    """
    pytester.makepyfile(test_one=body, test_two=body)
    result = run(pytester, "-p", "no:randomly")
    result.assert_outcomes(passed=6)
    assert log.read_text().splitlines() == [
        "session setup",
        "module setup",
        "module teardown",
        "module setup",
        "module teardown",
        "session teardown",
    ]


def test_a_class_fixture_of_a_test_outside_a_class_is_the_tests_own(
    pytester: pytest.Pytester,
) -> None:
    """pytest sets up a class-scoped fixture of a test outside a class, and
    tears it down, for each such test (its teardown is registered on the
    test): in the sandbox, then. Inside a class it is the class's, set up
    once in pytest's process (pytest-django's autouse ``_django_setup_unittest``
    made every test outside a class error before)."""
    pytester.makeconftest("""
        import os, pytest
        @pytest.fixture(scope="class", autouse=True)
        def per_class(request):
            where = "sandbox" if os.getpid() == 2 else "pytest"
            print("SETUP", request.node.name, where)
            yield
            print("TEARDOWN", request.node.name)
    """)
    pytester.makepyfile("""
        def test_one(): pass
        def test_two(): pass
        class TestGroup:
            def test_three(self): pass
            def test_four(self): pass
    """)
    result = run(pytester, "-s", "-p", "no:randomly")
    result.assert_outcomes(passed=4)
    lines = [
        m.group(0) for m in map(re.compile(r"(SETUP|TEARDOWN) .*").search, result.outlines) if m
    ]
    assert lines == [
        "SETUP test_one sandbox",
        "TEARDOWN test_one",
        "SETUP test_two sandbox",
        "TEARDOWN test_two",
        "SETUP TestGroup pytest",
        "TEARDOWN TestGroup",
    ]


def test_with_dash_s_what_tests_print_to_a_pipe_arrives_once(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``-s`` with output to a pipe (a CI log): Python buffers
    ``sys.stdout`` in blocks, and a sandbox ends with ``os._exit``: what a
    test printed was lost. What pytest's process had buffered when it
    forked must not come out of every sandbox either."""
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    pytester.makeconftest("""
        import pytest
        @pytest.fixture(scope="module")
        def shared():
            print("MODULE", "FIXTURE")
            return 1
    """)
    pytester.makepyfile("""
        import sys
        def test_one(shared):
            print("PRINTED", "one")
            sys.stderr.write("ERR one\\n")
        def test_two(shared):
            print("PRINTED", "two")
        def test_three(shared):
            print("PRINTED", "three")
            assert 0
    """)
    result = run(pytester, "-s", "-p", "no:randomly")
    result.assert_outcomes(passed=2, failed=1)
    out = result.stdout.str()
    for line in ("MODULE FIXTURE", "PRINTED one", "PRINTED two", "PRINTED three"):
        assert out.count(line) == 1, (line, out)
    assert result.stderr.str().count("ERR one") == 1


def test_a_failing_session_fixture_errors_the_tests_that_need_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest
        @pytest.fixture(scope="session")
        def broken():
            raise RuntimeError("database is down")
        def test_needs_it(broken):
            pass
        def test_also_needs_it(broken):
            pass
        def test_does_not():
            pass
    """)
    result = run(pytester)
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(["E       RuntimeError: database is down"])


def test_a_wider_fixtures_error_shows_the_frames_pytest_shows(pytester: pytest.Pytester) -> None:
    """A conftest's module or session fixture failing in pytest's process
    (setup, teardown): the failure shows the fixture's frames, as without
    isolation, none of this plugin's."""
    pytester.makeconftest("""
        import pytest
        @pytest.fixture(scope="module")
        def broken():
            raise RuntimeError("no database")
        @pytest.fixture(scope="module")
        def bad_teardown():
            yield
            raise RuntimeError("cleanup failed")
    """)
    pytester.makepyfile(
        test_a="def test_one(broken): pass",
        test_b="def test_two(bad_teardown): pass",
    )
    plain = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--tb=long")
    result = run(pytester, "--tb=long")
    result.assert_outcomes(passed=1, errors=2)
    assert "pytest_isolate" not in result.stdout.str()
    frames = [line for line in result.outlines if re.match(r"^\S+\.py:\d+", line)]
    assert frames == [line for line in plain.outlines if re.match(r"^\S+\.py:\d+", line)]
    assert frames


def test_a_temp_dir_a_wider_fixture_makes_is_there_for_the_tests(
    pytester: pytest.Pytester,
) -> None:
    """``tempfile.mkdtemp()`` in a module fixture (pytest's process): the
    tests see it, and what they write there, as without isolation (it used
    to be in the host's /tmp, which no sandbox sees). A test's own temp
    files still go to its private /tmp."""
    pytester.makeconftest("""
        import os, shutil, tempfile, pytest
        @pytest.fixture(scope="module")
        def cache():
            path = tempfile.mkdtemp(prefix="zoneinfo_")
            with open(os.path.join(path, "UTC"), "w") as f:
                f.write("data")
            yield path
            print("LEFT", sorted(os.listdir(path)))
            shutil.rmtree(path)
    """)
    pytester.makepyfile("""
        import os, tempfile
        def test_reads(cache):
            assert open(os.path.join(cache, "UTC")).read() == "data"
        def test_writes(cache):
            open(os.path.join(cache, "written"), "w").close()
        def test_own_temp_is_private(cache):
            assert tempfile.gettempdir() == "/tmp"
            assert not os.path.commonpath([tempfile.mkdtemp(), cache]).startswith(cache)
    """)
    result = run(pytester, "-s", "-p", "no:randomly")
    result.assert_outcomes(passed=3)
    assert "LEFT ['UTC', 'written']" in result.stdout.str()


@pytest.mark.heavy_plugins
def test_hypothesis_keeps_its_examples_in_the_sandbox_without_a_warning(
    pytester: pytest.Pytester,
) -> None:
    """Its default database, ``.hypothesis`` in the read-only project, made
    it warn in every test, which ``filterwarnings = error`` turned into
    failures (python-dateutil's property tests): the sandbox's own /tmp is
    its home then. Granted writable, the project's directory is used."""
    pytest.importorskip("hypothesis")
    pytester.makeini("""
        [pytest]
        filterwarnings = error
    """)
    pytester.makepyfile("""
        from hypothesis import given, settings, strategies as st
        # Not the "ci" profile hypothesis loads where CI is set: it keeps no
        # examples at all.
        settings.load_profile("default")
        @given(st.integers())
        def test_ints(x):
            assert isinstance(x, int)
        @given(st.integers())
        def test_small(x):
            assert x < 10
    """)
    examples = pytester.path / ".hypothesis" / "examples"
    result = run(pytester)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*x=10*"])
    assert "HypothesisWarning" not in result.stdout.str()
    assert not examples.exists()
    run(pytester, "--isolate-binds=.hypothesis:rw").assert_outcomes(passed=1, failed=1)
    assert any(examples.rglob("*"))


def test_isolated_false_runs_a_test_in_pytest_s_own_process(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(f"""
        import os, pytest
        @pytest.mark.isolated(False)
        def test_plain():
            assert os.getpid() == {os.getpid()} or os.getpid() != 2
        def test_isolated():
            assert os.getpid() == 2
    """)
    run(pytester).assert_outcomes(passed=2)


def test_marker_alias_class_and_module_markers_nearest_wins(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import os, socket, pytest
        from pytest_isolate import isolated
        pytestmark = pytest.mark.isolated(hostname="from-module")
        def test_module_level():
            assert socket.gethostname() == "from-module"
        @isolated(hostname="from-function")
        def test_function_level():
            assert socket.gethostname() == "from-function"
        @pytest.mark.isolated(hostname="from-class")
        class TestC:
            def test_class_level(self):
                assert socket.gethostname() == "from-class"
            @isolated(hostname="nearest")
            def test_nearest(self):
                assert socket.gethostname() == "nearest"
    """)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=4)


def test_a_bad_marker_value_errors_only_that_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest
        @pytest.mark.isolated(memory="1X")
        def test_bad():
            pass
        def test_good():
            pass
    """)
    result = run(pytester)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "isolated(memory='1X') in test_a_bad_marker_value_errors_only_that_test.py::test_bad: "
            "invalid size '1X'; use bytes or a K/M/G suffix, e.g. '256M'",
        ]
    )
    assert "INTERNALERROR" not in result.stdout.str()


@pytest.mark.parametrize(
    ("args", "ini", "message"),
    [
        (["--isolate-memory=1X"], "", "ERROR: --isolate-memory=1X: invalid size '1X'*"),
        (
            [],
            "isolate_timeout = soon",
            "ERROR: ini isolate_timeout = 'soon': invalid number of seconds 'soon'*",
        ),
        (
            ["--isolate-caps-drop=chwon"],
            "",
            "ERROR: --isolate-caps-drop=chwon: unknown capability*",
        ),
    ],
)
def test_bad_command_line_and_ini_values_are_usage_errors(
    pytester: pytest.Pytester, args: list[str], ini: str, message: str
) -> None:
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("--isolate", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_a_sandbox_setup_failure_names_the_step_and_the_errno(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest
        @pytest.mark.isolated(binds=["/nonexistent/source:/data"])
        def test_x():
            pass
    """)
    result = run(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "isolation setup failed at step 'bind /nonexistent/source -> /data': "
            "the host path does not exist",
            "Run `python -m pytest_isolate doctor`*",
        ]
    )


#: A module for a test to find its own descriptors by what they are.
_FDS = """
    import os
    def _fds(kind):
        for name in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{name}").startswith(kind):
                    yield int(name)
            except OSError:
                pass
"""


def test_garbage_in_the_results_is_a_malformed_result(pytester: pytest.Pytester) -> None:
    """The sandbox writes its frames to a memfd and rings a pipe once "done"
    is there: garbage written to the memfd is a malformed result for that
    test only; ringing the bell early (or often) only wakes pytest, which
    finds no "done" frame yet and goes on waiting."""
    pytester.makepyfile(fds=_FDS)
    pytester.makepyfile("""
        import os, struct
        from fds import _fds
        def test_garbage():
            for fd in _fds("/memfd:isolate-results"):
                os.write(fd, struct.pack(">I", 5) + b"nope!")
        def test_oversized():
            for fd in _fds("/memfd:isolate-results"):
                os.write(fd, b"\\xff\\xff\\xff\\xff")
            os._exit(0)
        def test_truncated():
            for fd in _fds("/memfd:isolate-results"):
                os.write(fd, struct.pack(">I", 50) + b"{}")
            os._exit(0)
        def test_rings_early():
            for _ in range(3):
                for fd in _fds("pipe:"):
                    try:
                        os.write(fd, b"ring")
                    except OSError:
                        pass
        def test_next_still_runs():
            pass
    """)
    result = run(pytester)
    result.assert_outcomes(passed=2, failed=3)
    result.stdout.fnmatch_lines_random(
        [
            "the isolated test sent a malformed result: a frame is not valid JSON*",
            "the isolated test sent a malformed result: announced a frame of 4294967295 bytes*",
            # rootless, pid 1 appends the test's exit status after the part frame
            "the isolated test sent a malformed result: the last frame was truncated (*",
        ]
    )


def test_pytest_exit_inside_an_isolated_test_stops_the_session(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest
        def test_first():
            pytest.exit("enough", returncode=3)
        def test_never():
            pass
    """)
    result = run(pytester)
    assert result.ret == 3
    result.stdout.fnmatch_lines(["*!! _pytest.outcomes.Exit: enough !!*"])
    assert "test_never" not in result.stdout.str().split("short test summary")[0] or True


def test_keyboard_interrupt_raised_by_a_test_stops_the_run_as_without_isolation(
    pytester: pytest.Pytester,
) -> None:
    """A test that raises KeyboardInterrupt ends the run (exit code 2) with the
    reports logged so far and no teardown report, as pytest does; the place
    it was raised is named. It was a crash report naming os._exit()."""
    pytester.makepyfile("""
        import pytest

        @pytest.fixture
        def resource():
            yield
            print("TORN DOWN IN THE SANDBOX")

        def test_before():
            pass

        def test_interrupts(resource):
            raise KeyboardInterrupt

        def test_never():
            pass
    """)
    result = run(pytester, "-rA")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*KeyboardInterrupt: raised by test_keyboard_interrupt_raised_by_a_test*"
            "::test_interrupts at *test_keyboard_interrupt_raised_by_a_test*.py:12*",
        ]
    )
    assert "test_never" not in result.stdout.str()
    assert "exited with status" not in result.stdout.str()


def test_keyboard_interrupt_raised_by_a_fixture_stops_the_run(pytester: pytest.Pytester) -> None:
    """From the setup: no report at all for that test, as without isolation."""
    pytester.makepyfile("""
        import pytest

        @pytest.fixture
        def interrupting():
            raise KeyboardInterrupt

        def test_interrupted(interrupting):
            pass

        def test_never():
            pass
    """)
    result = run(pytester)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.assert_outcomes()
    result.stdout.fnmatch_lines(["*KeyboardInterrupt: raised by *::test_interrupted at *.py:5*"])
    assert "INTERNALERROR" not in result.stdout.str()


def test_dash_x_stops_after_the_first_failure(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        def test_a(): assert 0
        def test_b(): pass
    """)
    result = run(pytester, "-x")
    result.assert_outcomes(failed=1)


def test_warnings_raised_inside_reach_the_summary(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import warnings
        def test_warns():
            warnings.warn("careful in the sandbox", UserWarning)
    """)
    result = run(pytester)
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*UserWarning: careful in the sandbox"])


def test_a_warnings_category_reaches_the_summary_as_it_was(pytester: pytest.Pytester) -> None:
    """A subclass keeps its name (pytest's own, the project's); one of a
    module only the test imported is shown as its nearest base pytest's
    process knows; one whose constructor wants more than a message too."""
    pytester.makepyfile(
        mywarnings="""
            class ProjectDeprecation(DeprecationWarning):
                pass
            class Picky(UserWarning):
                def __init__(self, message, code):
                    super().__init__(message)
        """,
        late="""
            class LateWarning(FutureWarning):
                pass
        """,
        test_w="""
            import warnings
            import pytest
            import mywarnings
            def test_warns():
                warnings.warn("project", mywarnings.ProjectDeprecation)
                warnings.warn("pytest's", pytest.PytestExperimentalApiWarning)
                warnings.warn(mywarnings.Picky("picky", 3))
                import late
                warnings.warn("late", late.LateWarning)
        """,
    )
    result = run(pytester, "-W", "always")
    result.assert_outcomes(passed=1, warnings=4)
    result.stdout.fnmatch_lines_random(
        [
            "*: ProjectDeprecation: project",
            "*: PytestExperimentalApiWarning: pytest's",
            "*: UserWarning: picky",
            "*: FutureWarning: late",
        ]
    )


def test_warning_filters_of_each_test_apply_inside(pytester: pytest.Pytester) -> None:
    """Warnings are recorded from before "go" (with the item's own filters),
    in sandboxes forked by the zygote too: a filterwarnings mark still turns
    a warning into an error or ignores it, and the rest reach the summary."""
    pytester.makepyfile("""
        import warnings, pytest

        @pytest.mark.parametrize("n", range(3))
        def test_quiet(n):
            pass

        @pytest.mark.filterwarnings("error::UserWarning")
        def test_made_an_error():
            warnings.warn("now an error", UserWarning)

        @pytest.mark.filterwarnings("ignore::UserWarning")
        def test_ignored():
            warnings.warn("ignored here", UserWarning)

        def test_recorded():
            warnings.warn("recorded here", UserWarning)
    """)
    result = run(pytester)
    result.assert_outcomes(passed=5, failed=1, warnings=1)
    result.stdout.fnmatch_lines(["*UserWarning: now an error", "*UserWarning: recorded here"])
    result.stdout.no_fnmatch_line("*ignored here*")


def test_a_warning_filter_a_wider_fixture_sets_applies_to_the_test_that_set_it_up(
    pytester: pytest.Pytester,
) -> None:
    """Without isolation, a filter a module-scoped fixture sets applies to the
    test whose setup ran the fixture (inside pytest's warning capture for
    that test, which undoes it at its end), and to no other: the same with
    isolation, where that fixture runs in pytest's process."""
    pytester.makepyfile("""
        import warnings, pytest

        @pytest.fixture(scope="module")
        def strict():
            warnings.simplefilter("error", UserWarning)
            yield

        def test_first(strict):
            warnings.warn("first", UserWarning)

        def test_second(strict):
            warnings.warn("second", UserWarning)

        @pytest.mark.filterwarnings("ignore::UserWarning")
        def test_third(strict):
            warnings.warn("third", UserWarning)

        def test_fourth(strict):
            warnings.warn("fourth", UserWarning)
    """)
    for args in ((), ("-p", "no:rerunfailures")):
        result = run(pytester, "-rA", *args)
        result.assert_outcomes(passed=3, failed=1, warnings=2)
        result.stdout.fnmatch_lines(["*UserWarning: first", "FAILED *::test_first*"])


def test_without_pytests_warnings_plugin_warnings_are_not_recorded(
    pytester: pytest.Pytester,
) -> None:
    """-p no:warnings: pytest records no warning, so neither does a sandbox;
    Python prints it to the (captured) stderr, as without isolation."""
    pytester.makepyfile("""
        import warnings

        def test_warns():
            warnings.warn("unrecorded", UserWarning)

        def test_warns_and_fails():
            warnings.warn("on stderr", UserWarning)
            assert 0
    """)
    result = run(pytester, "-p", "no:warnings")
    result.assert_outcomes(passed=1, failed=1)
    assert "warnings summary" not in result.stdout.str()
    result.stdout.fnmatch_lines(["*Captured stderr call*", "*UserWarning: on stderr"])


def test_a_tests_warning_filters_stay_out_of_the_next_sandboxes(pytester: pytest.Pytester) -> None:
    """The next sandbox is forked (by pytest or by a zygote forked then) while
    a test's protocol runs in pytest's process, inside pytest's warning
    capture for that test: its filterwarnings marks must not apply to the
    tests after it, which start from the session's filters as without
    isolation."""
    pytester.makepyfile("""
        import warnings, pytest

        @pytest.mark.filterwarnings("error::UserWarning")
        def test_strict():
            pass

        def test_warns_after_strict():
            warnings.warn("after the strict one", UserWarning)

        def test_warns_again():
            warnings.warn("and again", UserWarning)

        @pytest.mark.filterwarnings("ignore::UserWarning")
        def test_deaf():
            warnings.warn("not heard", UserWarning)

        def test_warns_after_deaf():
            warnings.warn("after the deaf one", UserWarning)
    """)
    for args in ((), ("-p", "no:rerunfailures")):
        result = run(pytester, *args)
        result.assert_outcomes(passed=5, warnings=3)
        result.stdout.fnmatch_lines(
            [
                "*UserWarning: after the strict one",
                "*UserWarning: and again",
                "*UserWarning: after the deaf one",
            ]
        )
        result.stdout.no_fnmatch_line("*not heard*")


@requires("cgroup")
def test_verbose_shows_which_isolation_applied(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest
        @pytest.mark.isolated(memory="64M", seccomp=False)
        def test_x():
            pass
    """)
    result = run(pytester, "-vv")
    result.stdout.fnmatch_lines(
        [
            "*::test_x PASSED [[]isolated: layers=namespaces,rootfs,cgroup,caps,seccomp "
            "memory=64.0 MiB seccomp=off[]]*",
        ]
    )
    result.stdout.fnmatch_lines(["isolate: root*cgroup*"])


@requires("cgroup")
def test_junitxml_sees_the_same_sequence_and_the_peak_memory(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        def test_ok(record_property):
            record_property("answer", 42)
        def test_bad():
            assert 0
    """)
    result = run(pytester, "--junitxml=out.xml")
    result.assert_outcomes(passed=1, failed=1)
    xml = (pytester.path / "out.xml").read_text()
    assert 'tests="2"' in xml and 'failures="1"' in xml
    assert '<property name="answer" value="42"' in xml
    assert re.search(r'<property name="isolate_peak_memory" value="\d+"', xml)


def test_xdist_workers_isolate_their_own_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        **{
            f"test_m{i}": """
        import os, pytest
        @pytest.mark.parametrize("n", range(10))
        def test_p(n):
            assert os.getpid() == 2
            assert n != 7
    """
            for i in range(3)
        }
    )
    result = run(pytester, "-n", "2")
    result.assert_outcomes(passed=27, failed=3)


def test_a_test_in_an_xdist_worker_cannot_reach_the_workers_channel(
    pytester: pytest.Pytester,
) -> None:
    """The worker talks to xdist's controller over execnet pipes: a test that
    kept them could send the controller forged reports. The worker's
    conftest notes which pipes they are; no descriptor of the sandbox refers
    to one (a closed channel's numbers may be reused for the sandbox's own
    descriptors), and the run's results stay the real ones. Several tests:
    the first sandbox is forked by pytest's process, the others by a zygote
    (which silences the plugin once for all of them)."""
    pytester.makeconftest("""
        import os
        CHANNEL = []

        def pytest_configure(config):
            for plugin in config.pluginmanager.get_plugins():
                if type(plugin).__name__ == "WorkerInteractor":
                    io = plugin.channel.gateway._io
                    for fd in (io.infile.fileno(), io.outfile.fileno()):
                        st = os.fstat(fd)
                        CHANNEL.append((st.st_dev, st.st_ino))
    """)
    pytester.makepyfile("""
        import os
        import conftest
        import pytest

        @pytest.mark.parametrize("n", range(4))
        def test_channel_closed(n):
            assert len(conftest.CHANNEL) == 2
            for name in os.listdir("/proc/self/fd"):
                try:
                    st = os.fstat(int(name))
                except OSError:
                    continue  # the listing's own descriptor
                if (st.st_dev, st.st_ino) in conftest.CHANNEL:
                    os.write(int(name), b"garbage for the controller")
                    raise AssertionError(f"fd {name} is the worker's channel")

        def test_fails():
            assert False
    """)
    result = run(pytester, "-n", "1")
    result.assert_outcomes(passed=4, failed=1)


def _mixed_suite(pytester: pytest.Pytester, count: int = 500) -> None:
    lines = ["import os, pytest, sys", "@pytest.fixture", "def fx():", "    yield 1"]
    kinds = ["pass", "fail", "skip", "xfail", "error", "xpass", "exit"]
    for i in range(count):
        kind = kinds[i % len(kinds)]
        body = {
            "pass": "    assert fx == 1",
            "fail": "    assert fx == 2",
            "skip": "    pytest.skip('s')",
            "xfail": "    pytest.xfail('x')",
            "error": "    raise RuntimeError('e')",
            "xpass": "    pass",
            "exit": "    sys.exit(1)",
        }[kind]
        if kind == "xpass":
            lines.append("@pytest.mark.xfail(reason='x')")
        lines += [f"def test_{i}_{kind}(fx):", body]
    pytester.makepyfile(test_mixed="\n".join(lines))


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_500_mixed_tests_count_the_same_as_plain_pytest(
    pytester: pytest.Pytester, workers: list[str]
) -> None:
    _mixed_suite(pytester)
    plain = pytester.runpytest_subprocess("-p", "no:cacheprovider", *workers, timeout=300)
    isolated = run(pytester, *workers)
    assert isolated.parseoutcomes() == plain.parseoutcomes()
    assert plain.parseoutcomes() == {
        "failed": 214,
        "passed": 72,
        "skipped": 72,
        "xfailed": 71,
        "xpassed": 71,
    }


_SUBTESTS = """
    import unittest
    def test_fixture(subtests):
        for i in range(3):
            with subtests.test(msg="i", i=i):
                print(f"sub {i}")
                assert i != 1
    def test_all_pass(subtests):
        for i in range(2):
            with subtests.test(i=i):
                pass
    class T(unittest.TestCase):
        def test_unittest(self):
            for i in range(3):
                with self.subTest(i=i):
                    self.assertNotEqual(i, 2)
"""


@_SUBTESTS_ARE_PYTESTS
@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_failed_subtests_fail_as_without_isolation(
    pytester: pytest.Pytester, workers: list[str]
) -> None:
    """A subtest's report is logged from inside the test (pytest 9): it comes
    to pytest's process and is logged there, before its phase's report, and
    a failed subtest fails its test and the run, as without isolation. No
    plugin logs it in the sandbox (the terminal reporter would print there)."""
    pytester.makepyfile(test_s=_SUBTESTS)  # a short name: the summary fits in 80 columns
    args = ("-p", "no:cacheprovider", *workers)
    plain = pytester.runpytest_subprocess(*args, timeout=120)
    isolated = run(pytester, *args)
    assert isolated.ret == plain.ret == 1
    assert isolated.parseoutcomes() == plain.parseoutcomes() == {"failed": 3, "passed": 2}
    lines = [  # under xdist, pytest shows the values repr()'d: (i='1')
        "SUBFAILED[[]i[]] (i=*1*) test_s.py::test_fixture - assert 1 != 1",
        "FAILED test_s.py::test_fixture - contains 1 failed subtest",
        "SUBFAILED(i=*2*) test_s.py::T::test_unittest - AssertionError: 2 == 2",
    ]
    plain.stdout.fnmatch_lines_random(lines)
    isolated.stdout.fnmatch_lines_random(lines)
    if not workers:
        # A failed subtest's letter comes before its test's (passed ones show
        # with -v), its output in its own report. Plain pytest (9.2) writes a
        # unittest subtest's letter into that test's captured output instead.
        plain.stdout.re_match_lines([r"^test_s\.py uF\.\. "])
        isolated.stdout.re_match_lines([r"^test_s\.py uF\.u\. "])
        for result in (plain, isolated):
            result.stdout.fnmatch_lines(["*test_fixture [[]i[]] (i=1)*", "*", "sub 1"])


@_SUBTESTS_ARE_PYTESTS
def test_a_malformed_kept_reports_frame_is_a_malformed_result(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(fds=_FDS)
    pytester.makepyfile("""
        from fds import _fds
        from pytest_isolate.protocol import send_message
        def test_forges():
            for fd in _fds("/memfd:isolate-results"):
                send_message(fd, "kept_reports", ["config"])
        def test_next():
            pass
    """)
    result = run(pytester)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*the isolated test sent a malformed result: a kept-reports frame is not an object*"]
    )


def test_a_logged_report_for_another_test_is_a_malformed_result(
    pytester: pytest.Pytester,
) -> None:
    """What the sandbox logs is checked as its phase reports are: a report
    naming another test fails the test that sent it, and only that one."""
    pytester.makepyfile("""
        import pytest
        def test_forges(request):
            report = pytest.TestReport(
                "elsewhere.py::test_x", ("elsewhere.py", 0, "x"), {}, "failed", "forged", "call"
            )
            request.node.ihook.pytest_runtest_logreport(report=report)
        def test_next():
            pass
    """)
    result = run(pytester)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*the isolated test sent a malformed result: a report names another test*"]
    )
    assert "elsewhere.py" not in result.stdout.str().replace("'elsewhere.py::test_x'", "")


def test_junitxml_suite_properties_recorded_in_a_test_reach_the_file(
    pytester: pytest.Pytester,
) -> None:
    """record_testsuite_property adds to junitxml's state in the process the
    test runs in: the sandbox sends what it added to pytest's process."""
    pytester.makepyfile("""
        def test_records(record_testsuite_property):
            record_testsuite_property("build", "42")
        def test_records_too(record_testsuite_property):
            record_testsuite_property("arch", "x86 & <arm>")
        def test_forges(request):
            from _pytest.junitxml import xml_key
            request.config.stash[xml_key].global_properties.append((1, ["x"]))
    """)
    result = run(pytester, "--junitxml=out.xml")
    # Sent after the test's last report: refused (a note on that report).
    result.assert_outcomes(passed=3)
    suite = ElementTree.parse(pytester.path / "out.xml").getroot().find("testsuite")
    assert suite is not None
    properties = suite.find("properties")
    assert properties is not None
    assert [(p.get("name"), p.get("value")) for p in properties] == [
        ("build", "42"),
        ("arch", "x86 & <arm>"),
    ]


def test_pytest_timeout_runs_its_timer_in_the_sandbox(pytester: pytest.Pytester) -> None:
    """pytest-timeout arms its timer around the whole protocol, in pytest's
    process: there its alarm interrupted pytest while it waited for the
    sandbox (INTERNALERROR, the run over). The timer now runs in the
    sandbox, as it would in the test's process without isolation: the
    signal method fails the test; the thread method ends its process (and
    only that one: the run goes on, where without isolation it ends)."""
    pytest.importorskip("pytest_timeout")
    pytester.makepyfile(
        test_t="""
        import time, pytest
        @pytest.mark.timeout(1)
        def test_signal():
            time.sleep(30)
        @pytest.mark.timeout(1, method="thread")
        def test_thread():
            time.sleep(30)
        @pytest.mark.timeout(1, func_only=True)
        def test_func_only():
            time.sleep(30)
        @pytest.mark.timeout(20)
        def test_in_time():
            time.sleep(0.1)
        def test_next():
            pass
    """
    )
    result = run(pytester)
    assert "INTERNALERROR" not in result.stdout.str()
    result.assert_outcomes(passed=2, failed=3)
    result.stdout.fnmatch_lines_random(
        [
            "FAILED test_t.py::test_signal - Failed: Timeout (>1.0s) from pytest-timeout.",
            "FAILED test_t.py::test_func_only - Failed: Timeout (>1.0s) from pytest-timeout.",
            "FAILED test_t.py::test_thread*",  # pytest 8 shows no message here
        ]
    )
    result.stdout.fnmatch_lines(["the test process exited with status 1 before reporting*"])


@pytest.mark.parametrize("exit_on_timeout", [False, True], ids=["dump", "exit"])
def test_faulthandler_timeout_dumps_the_tests_stack(
    pytester: pytest.Pytester, exit_on_timeout: bool
) -> None:
    """pytest's faulthandler_timeout is armed around the protocol, in pytest's
    process: it dumped pytest waiting for the sandbox (and, with
    faulthandler_exit_on_timeout, ended the run). It is armed in the sandbox
    now: the dump shows the test, and an exit ends only the test's process."""
    pytester.makepyfile(
        test_f="""
        import time
        def test_slow_one():
            time.sleep(3)
        def test_next():
            pass
    """
    )
    options = ["-o", "faulthandler_timeout=1", "-p", "no:timeout"]
    if exit_on_timeout:
        if int(pytest.__version__.split(".")[0]) < 9:
            pytest.skip("faulthandler_exit_on_timeout is pytest 9's")
        options += ["-o", "faulthandler_exit_on_timeout=true"]
    result = run(pytester, *options)
    result.stderr.fnmatch_lines(["Timeout (0:00:01)!", "*", '*test_f.py", line 3 in test_slow_one'])
    # Not pytest's process, waiting for the sandbox.
    assert not re.search(r'sandbox\.py", line \d+ in collect', result.stderr.str())
    if exit_on_timeout:
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines(["FAILED test_f.py::test_slow_one - the test process exited*"])
    else:
        result.assert_outcomes(passed=2)


@pytest.mark.parametrize(
    "outer", [["--isolate"], ["-p", "no:cacheprovider"]], ids=["isolated", "not"]
)
def test_an_inner_session_without_the_plugin_runs_plainly(
    pytester: pytest.Pytester, outer: list[str]
) -> None:
    """A plugin's own suite runs pytest in-process (pytester) without this
    plugin (-p no:isolate, or PYTEST_DISABLE_PLUGIN_AUTOLOAD): pytest's
    runner still finds the protocol the outer session installed, which runs
    that session's tests plainly (INTERNALERROR before)."""
    pytester.makepyfile(
        test_outer="""
        pytest_plugins = ["pytester"]
        def test_inner(pytester):
            pytester.makepyfile(test_x="def test_a(): pass\\ndef test_b(): assert 0")
            result = pytester.runpytest_inprocess("-p", "no:isolate", "-p", "no:cacheprovider")
            result.assert_outcomes(passed=1, failed=1)
    """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *outer, timeout=120)
    result.assert_outcomes(passed=1)


@requires("root", "userns")
def test_root_without_cap_sys_admin_isolates_as_an_unprivileged_user_does(
    pytester: pytest.Pytester,
) -> None:
    """Root without CAP_SYS_ADMIN (a container's root) cannot make the
    sandboxes with the host's privileges (every test failed with EPERM):
    it makes them in a user namespace, as an unprivileged user does, and the
    header says so."""
    pytester.makepyfile(
        test_c="""
        import os
        def test_in_a_user_namespace_of_its_own():
            with open("/proc/self/uid_map") as f:
                assert f.read().split() == ["0", "0", "1"]
            assert os.getpid() == 2
        def test_next(tmp_path):
            (tmp_path / "f").write_text("x")
    """
    )
    command = [
        "setpriv",
        "--bounding-set=-sys_admin",
        "--inh-caps=-sys_admin",
        "--",
        sys.executable,
        "-m",
        "pytest",
        *ISOLATE,
        "-v",
        f"--basetemp={pytester.path / 'basetemp'}",
    ]
    done = subprocess.run(
        command, check=False, cwd=pytester.path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "isolate: rootless (uid 0 without CAP_SYS_ADMIN);" in done.stdout
    assert "2 passed" in done.stdout


@requires("cgroup")
def test_peak_memory_summary_lists_the_heaviest_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        def test_light():
            pass
        def test_heavy():
            data = bytearray(40 * 1024 * 1024)
            data[::4096] = b"x" * len(data[::4096])
    """)
    result = run(pytester, "--isolate-peak-memory=1")
    result.stdout.fnmatch_lines(
        [
            "*= isolated tests by peak memory (top 1) =*",
            "* MiB  test_peak_memory_summary_lists_the_heaviest_tests.py::test_heavy",
        ]
    )


@requires("root")
def test_ctrl_c_interrupts_the_session_and_leaves_nothing_behind(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import subprocess, time
        def test_long():
            subprocess.Popen(["sleep", "301.3"])
            time.sleep(60)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", *ISOLATE],
        cwd=pytester.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while not _host_processes_matching("sleep 301.3") and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert b"KeyboardInterrupt" in out
    time.sleep(0.2)
    assert not _host_processes_matching("sleep 301.3")


def test_a_test_survives_the_death_of_nothing_when_pytest_is_killed(
    pytester: pytest.Pytester,
) -> None:
    """If pytest itself is SIGKILLed, every sandbox dies with it, and the
    next session removes the empty host directories it mounted on."""
    pytester.makepyfile("""
        import subprocess, time
        def test_long():
            subprocess.Popen(["sleep", "302.9"])
            time.sleep(60)
    """)
    tmp = pytester.path / "tmp"
    tmp.mkdir()
    # Its own temp dir, to see what it leaves; the cgroup session lock stays
    # where this run's is (XDG_RUNTIME_DIR or the temp dir), so the runs share it.
    env = {**os.environ, "TMPDIR": str(tmp), "XDG_RUNTIME_DIR": session_lock_dir()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", *ISOLATE],
        cwd=pytester.path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 30
    while not _host_processes_matching("sleep 302.9") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _host_processes_matching("sleep 302.9")
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while _host_processes_matching("sleep 302.9") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _host_processes_matching("sleep 302.9")

    left = [name for name in os.listdir(tmp) if name.startswith(scratchdirs.PREFIXES)]
    assert any(name.startswith("pytest-isolate-run-") for name in left)
    pytester.makepyfile("def test_quick(): pass")
    again = subprocess.run(
        [sys.executable, "-m", "pytest", *ISOLATE],
        check=False,
        cwd=pytester.path,
        capture_output=True,
        env=env,
    )
    assert again.returncode == 0, again.stdout
    assert not [name for name in os.listdir(tmp) if name.startswith(scratchdirs.PREFIXES)]


@pytest.mark.parametrize(
    "options",
    [
        ("--reruns", "2"),
        ("--reruns", "2", "--only-rerun", "AssertionError"),
        ("--reruns", "2", "--rerun-except", "ValueError"),
    ],
)
def test_pytest_rerunfailures_decides_as_without_isolation(
    pytester: pytest.Pytester, options: tuple[str, ...]
) -> None:
    """Its rerun loop runs in pytest's process and reads per-attempt state its
    makereport wrapper sets on the item, in the sandbox: without that state
    the first failure of a test that was not its module's first ended the
    run in INTERNALERROR (AttributeError: _terminal_errors). The sandbox
    sends it, --only-rerun, --rerun-except and a marker's condition included."""
    pytest.importorskip("pytest_rerunfailures")
    pytester.makepyfile("""
        import sys, pytest

        def _count(tmp_path_factory, name):
            p = tmp_path_factory.getbasetemp() / name
            n = int(p.read_text()) + 1 if p.exists() else 1
            p.write_text(str(n))
            return n

        def test_first_ok():
            pass

        def test_flaky(tmp_path_factory):
            assert _count(tmp_path_factory, "flaky") >= 2

        def test_value_error():
            raise ValueError("not an assertion")

        def test_assertion():
            assert 0, "always"

        @pytest.mark.xfail
        def test_xfail():
            assert 0

        @pytest.mark.flaky(reruns=2, condition=sys.platform.startswith("linux"))
        def test_marker_rerun(tmp_path_factory):
            assert _count(tmp_path_factory, "marker") >= 3

        @pytest.mark.flaky(reruns=2, condition=sys.platform.startswith("win"))
        def test_marker_no_rerun():
            assert 0

        @pytest.fixture
        def bad_teardown():
            yield
            raise RuntimeError("teardown broke")

        def test_teardown_fails(bad_teardown):
            pass
    """)
    plain = pytester.runpytest("-p", "no:isolate", "-p", "no:cacheprovider", *options)
    isolated = run(pytester, *options)
    assert "INTERNALERROR" not in isolated.stdout.str()
    assert isolated.parseoutcomes() == plain.parseoutcomes()
    assert isolated.parseoutcomes()["rerun"] >= 5


def test_pytest_dependency_sees_the_results_of_isolated_tests(pytester: pytest.Pytester) -> None:
    """pytest-dependency records each outcome in its makereport wrapper, which
    runs in the sandbox, and a dependent test's setup reads it: pytest's
    process records it too, and the next sandbox is forked after that (the
    one prepared while the test ran holds the state before). Without it a
    test depending on one that passed was skipped."""
    pytest.importorskip("pytest_dependency")
    pytester.makepyfile(
        test_first="""
        import pytest

        @pytest.mark.dependency()
        def test_a():
            pass

        @pytest.mark.dependency()
        def test_b():
            assert 0

        @pytest.mark.dependency(depends=["test_a"])
        def test_needs_a():
            pass

        @pytest.mark.dependency(depends=["test_b"])
        def test_needs_b():
            pass

        @pytest.mark.dependency(name="named")
        def test_named():
            pass

        def test_depends_at_runtime(request):
            from pytest_dependency import depends
            depends(request, ["test_a", "named"])
        """,
        test_second="""
        import pytest

        @pytest.mark.dependency(depends=["test_first.py::test_a"], scope="session")
        def test_across_modules():
            pass
        """,
    )
    plain = pytester.runpytest("-p", "no:isolate", "-p", "no:cacheprovider", "-rA")
    isolated = run(pytester, "-rA")
    assert (
        isolated.parseoutcomes()
        == plain.parseoutcomes()
        == {
            "passed": 5,
            "failed": 1,
            "skipped": 1,
        }
    )
    isolated.stdout.fnmatch_lines(["*test_needs_b depends on test_b*"])


def test_allure_results_are_those_of_a_plain_run(pytester: pytest.Pytester) -> None:
    """allure-pytest fills each test's result in in the phases (title, steps,
    status, attachments), in the sandbox, and wrote it in pytest's process
    unfilled: a failed test had no status. The sandbox now writes it (its
    results directory granted writable, as its fixtures' files need), and
    pytest's process drops its own."""
    pytest.importorskip("allure_pytest")
    pytester.makepyfile("""
        import allure, pytest

        @allure.title("a titled test")
        def test_titled():
            with allure.step("step one"):
                pass

        def test_fails():
            assert 0

        @pytest.fixture
        def thing():
            yield 1

        def test_with_a_fixture(thing):
            allure.attach("some text", name="note", attachment_type=allure.attachment_type.TEXT)
    """)

    def results(directory: str) -> list[tuple[Any, ...]]:
        found = []
        for path in (pytester.path / directory).glob("*-result.json"):
            data = json.loads(path.read_text())
            found.append(
                (
                    data["name"],
                    data.get("status"),
                    [step["name"] for step in data.get("steps", [])],
                    bool((data.get("statusDetails") or {}).get("message")),
                    len(data.get("attachments", [])),
                )
            )
        return sorted(found)

    pytester.runpytest("-p", "no:isolate", "-p", "no:cacheprovider", "--alluredir=plain")
    run(pytester, "--alluredir=isolated", "--isolate-binds=isolated:rw")
    assert (
        results("isolated")
        == results("plain")
        == [
            ("a titled test", "passed", ["step one"], False, 0),
            ("test_fails", "failed", [], True, 0),
            ("test_with_a_fixture", "passed", [], False, 1),
        ]
    )


def test_a_forged_rerun_state_is_refused() -> None:
    """The rerun state comes from the test's process: checked like a report."""
    from types import SimpleNamespace

    from pytest_isolate._pytest_compat import _set_rerun_state

    item: Any = SimpleNamespace()
    assert _set_rerun_state(item, []) == "a rerun state that is not an object"
    forged = {"_terminal_errors": {"elsewhere": True}}
    assert "malformed _terminal_errors" in str(_set_rerun_state(item, forged))
    assert "malformed failures" in str(_set_rerun_state(item, {"failures": {"call": 10**9}}))
    bad_results = {"condition_results": [["call", "x", True]]}
    assert "condition results" in str(_set_rerun_state(item, bad_results))
    good = {
        "_terminal_errors": {"call": True},
        "failures": {"call": 2},
        "condition_results": [["call", 1, False]],
    }
    assert _set_rerun_state(item, good) is None
    assert item._terminal_errors == {"call": True}
    assert item._rerun_condition_excinfos == {"call": [None, None]}
    assert item._rerun_condition_results == {("call", 1): False}


def test_reports_a_makereport_wrapper_keeps_on_the_item_reach_pytests_process(
    pytester: pytest.Pytester,
) -> None:
    """pytest's documented pattern (an attribute per phase, or a stash key
    in a conftest): what reads them in pytest's process (a module fixture's
    teardown, pytest_sessionfinish) sees the isolated tests' reports, as
    without isolation."""
    pytester.makeconftest("""
        import pytest
        phase_key = pytest.StashKey()

        @pytest.hookimpl(wrapper=True, tryfirst=True)
        def pytest_runtest_makereport(item, call):
            rep = yield
            setattr(item, "rep_" + rep.when, rep)
            item.stash.setdefault(phase_key, {})[rep.when] = rep
            return rep

        @pytest.fixture(scope="module")
        def watcher(request):
            yield
            for item in request.session.items:
                print("MODULE", item.name, item.rep_setup.outcome, item.rep_call.outcome,
                      sorted(item.stash[phase_key]))

        def pytest_sessionfinish(session):
            for item in session.items:
                phases = item.stash[phase_key]
                print("FINISH", item.name, item.rep_call.outcome, item.rep_teardown.outcome,
                      [phases[when].outcome for when in ("setup", "call", "teardown")])
    """)
    pytester.makepyfile("""
        def test_passes(watcher): pass
        def test_fails(watcher): assert 0
    """)
    plain = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider")
    result = run(pytester, "-s")
    result.assert_outcomes(passed=1, failed=1)
    expected = [
        "MODULE test_passes passed passed ['call', 'setup', 'teardown']",
        "MODULE test_fails passed failed ['call', 'setup']",
        "FINISH test_passes passed passed ['passed', 'passed', 'passed']",
        "FINISH test_fails failed passed ['passed', 'failed', 'passed']",
    ]
    for output in (plain, result):
        found = [re.search(r"(MODULE|FINISH) .*", line) for line in output.outlines]
        assert [match.group(0) for match in found if match] == expected
    assert "malformed" not in result.stdout.str()


def test_forged_kept_reports_are_refused_or_ignored() -> None:
    """The names come from the test's process: never a private attribute,
    one of the item's class or one holding something else than a report,
    never a stash key outside a conftest or the test's module."""
    import _pytest.skipping

    from pytest_isolate._pytest_compat import apply_report_refs

    class Item:
        module = None

        def __init__(self) -> None:
            self.config = "the config"
            self.stash = pytest.Stash()

    item: Any = Item()
    report: Any = pytest.TestReport("t.py::t", ("t.py", 0, "t"), {}, "passed", None, "call")
    reports = {"call": report}
    assert apply_report_refs(item, [], reports) == "a kept-reports frame is not an object"
    assert "lacks" in str(apply_report_refs(item, {"attrs": []}, reports))
    many = {"attrs": {f"rep_{n}": "call" for n in range(100)}, "stash": []}
    assert "too many" in str(apply_report_refs(item, many, reports))
    bad_entry = {"attrs": {}, "stash": [["m", "k"]]}
    assert "stash entry" in str(apply_report_refs(item, bad_entry, reports))
    forged = {
        "attrs": {
            "config": "call",  # holds something else
            "_private": "call",
            "module": "call",  # the class's
            "rep_x": "nophase",
            "rep_call": "call",
        },
        "stash": [["_pytest.skipping", "xfailed_key", "call"]],  # pytest's own module
    }
    assert apply_report_refs(item, forged, reports) is None
    assert item.config == "the config"
    assert not hasattr(item, "_private")
    assert not hasattr(item, "rep_x")
    assert item.rep_call is report
    assert _pytest.skipping.xfailed_key not in item.stash


@pytest.mark.heavy_plugins
def test_pytest_json_report_writes_what_it_writes_without_isolation(
    pytester: pytest.Pytester,
) -> None:
    """Its protocol wrapper puts a dict on the item in pytest's process that
    its makereport wrapper fills in, in the sandbox: a sandbox forked before
    the protocol began (prepared ahead, or by a zygote) gets it with "go".
    Its makereport wrapper, called in pytest's process for the wider
    fixtures' setup, raised KeyError there (INTERNALERROR at the first test
    of every module)."""
    pytest.importorskip("pytest_jsonreport")
    pytester.makeconftest("""
        import pytest
        @pytest.fixture(scope="module")
        def shared():
            return 1
        @pytest.fixture(scope="module")
        def broken():
            raise RuntimeError("no database")
    """)
    pytester.makepyfile(
        test_a="""
            import logging
            def test_one(shared, json_metadata):
                json_metadata["answer"] = 42
                print("out one")
                logging.getLogger("x").warning("logged")
            def test_two(shared):
                assert 1 == 2
            def test_three(shared): pass
        """,
        test_b="""
            def test_four(broken): pass
            def test_five(): pass
        """,
    )

    def tests(name: str, *args: str) -> dict[str, Any]:
        report = pytester.path / f"{name}.json"
        result = pytester.runpytest_subprocess(
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            "--json-report",
            f"--json-report-file={report}",
            *args,
            timeout=120,
        )
        assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
        found = {}
        for test in json.loads(report.read_text())["tests"]:
            test.pop("user_properties", None)  # isolated: isolate_peak_memory
            for when in ("setup", "call", "teardown"):
                test.get(when, {}).pop("duration", None)
                for record in test.get(when, {}).get("log", []):  # name, level, message
                    for key in set(record) - {"name", "msg", "levelname"}:
                        del record[key]
            found[test["nodeid"]] = test
        return found

    plain = tests("plain")
    isolated = tests("isolated", *ISOLATE)
    assert plain["test_a.py::test_one"]["metadata"] == {"answer": 42}
    assert plain["test_a.py::test_one"]["call"]["stdout"] == "out one\n"
    assert isolated == plain


def test_reruns_of_pytest_rerunfailures_are_isolated_too(pytester: pytest.Pytester) -> None:
    pytest.importorskip("pytest_rerunfailures")
    pytester.makepyfile("""
        import os
        def test_flaky(tmp_path_factory):
            log = tmp_path_factory.getbasetemp() / "attempts"
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\\n")
            assert len(log.read_text().split()) >= 3
    """)
    result = run(pytester, "--reruns", "3")
    assert result.parseoutcomes() == {"passed": 1, "rerun": 2}
    attempts = (pytester.path / "runpytest-0" / "attempts").read_text().split()
    assert attempts == ["2", "2", "2"]  # each attempt was pid 2 of its own sandbox


def test_coverage_measured_inside_sandboxes_is_combined(pytester: pytest.Pytester) -> None:
    pytest.importorskip("pytest_cov")
    pytester.makepyfile(
        mod="""
        def branch(x):
            if x > 0:
                return "positive"
            return "other"
    """,
        test_cov="""
        from mod import branch
        def test_positive():
            assert branch(1) == "positive"
        def test_other():
            assert branch(-1) == "other"
    """,
    )
    result = run(pytester, "--cov=mod", "--cov-report=term-missing")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["mod.py * 4 * 0 * 100%*"])


def test_coverage_inside_sandboxes_equals_a_plain_runs(pytester: pytest.Pytester) -> None:
    """Branches and missed lines, over tests a zygote forks (which inherit
    the measurement it started) and tests pytest forks itself: the report
    is a plain run's, line for line."""
    pytest.importorskip("pytest_cov")
    pytester.makepyfile(
        mod="""
        def sign(x):
            if x > 0:
                return 1
            elif x < 0:
                return -1
            return 0

        def never_called():
            return "missed"

        def loop(n):
            total = 0
            for i in range(n):
                if i % 2:
                    total += i
            return total
    """,
        test_a="""
        from mod import sign
        def test_positive(): assert sign(3) == 1
        def test_zero(): assert sign(0) == 0
        def test_again(): assert sign(5) == 1
    """,
        test_b="""
        from mod import loop
        def test_loop(): assert loop(4) == 4
        def test_empty(): assert loop(0) == 0
    """,
    )
    args = ("--cov=mod", "--cov-branch", "--cov-report=term-missing", "-p", "no:randomly")

    def report(result: pytest.RunResult) -> list[str]:
        return [line for line in result.outlines if line.startswith(("mod.py", "TOTAL"))]

    plain = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
    isolated = run(pytester, *args)
    isolated.assert_outcomes(passed=5)
    assert report(isolated) == report(plain)
    assert report(plain) and "100%" not in report(plain)[0]


_AGE = """
import os

def process_age():
    # seconds since this process started (host clock ticks since boot)
    with open("/proc/self/stat") as f:
        start = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) - start
"""


def test_the_next_modules_first_sandbox_is_prepared_when_getting_there_runs_nothing(
    pytester: pytest.Pytester,
) -> None:
    """Module b has no module-scoped state: its first test's sandbox is forked
    while a's last test still runs (the process is older than that test's
    0.4 s). Module d has a module-scoped fixture: no sandbox is prepared for
    its first test (young process), and c's module teardown, which runs in
    pytest's process, has happened before d's sandbox exists."""
    pytester.makepyfile(helper=_AGE)
    pytester.makepyfile(
        test_a="""
            import time
            def test_slow():
                time.sleep(0.4)
        """,
        test_b="""
            from helper import process_age
            def test_prepared_during_a():
                assert process_age() > 0.25
        """,
        test_c="""
            import os, time, pytest
            @pytest.fixture(scope="module", autouse=True)
            def flag():
                os.environ["C_MODULE"] = "up"
                yield
                del os.environ["C_MODULE"]
            def test_slow():
                assert os.environ["C_MODULE"] == "up"
                time.sleep(0.4)
        """,
        test_d="""
            import os
            from helper import process_age
            def setup_module():
                os.environ["D_MODULE"] = "up"
            def test_made_after_c_was_torn_down_and_d_set_up():
                assert "C_MODULE" not in os.environ
                assert os.environ["D_MODULE"] == "up"
                assert process_age() < 0.25
        """,
    )
    result = run(pytester, "-p", "no:randomly")
    result.assert_outcomes(passed=4)


@requires("root")
@pytest.mark.isolated(False)
def test_the_init_factory_starts_with_pytest_and_only_where_tests_run(
    pytester: pytest.Pytester,
) -> None:
    """With --isolate, the init factory starts when pytest is configured, so
    its interpreter starts while pytest collects: it is running before the
    first test. Not when tests are only collected or listed."""
    pytester.makeconftest("""
        import pytest
        from pytest_isolate import plugin

        @pytest.hookimpl(trylast=True)
        def pytest_collection_finish(session):
            engine = session.config.stash[plugin._engine_key]
            print("FACTORY-AT-COLLECTION:", engine._init_factory is not None)
    """)
    pytester.makepyfile("def test_a():\n    pass\n")
    ran = run_isolated(pytester, "-s")
    ran.assert_outcomes(passed=1)
    ran.stdout.fnmatch_lines(["FACTORY-AT-COLLECTION: True"])
    for args in (("--collect-only",), ("--fixtures",)):
        listed = run_isolated(pytester, "-s", *args)
        assert listed.ret == 0, listed.stdout.str()
        listed.stdout.fnmatch_lines(["FACTORY-AT-COLLECTION: False"])
