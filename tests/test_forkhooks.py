"""Python's at-fork handlers in the forks of a zygote (forkhooks.py): the
standard library's are skipped only where they have nothing to do, and
everything a test can observe of them is as after os.fork()."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ISOLATE = ("--isolate", "-p", "no:cacheprovider")

# A "zygote" in a plain interpreter: finds the lists, quiets them, forks
# children with os.fork() (which then runs no Python handler) and calls what
# each child must call. Prints what the children saw.
_ZYGOTE = """
import json, logging, os, random, threading
{register}
from pytest_isolate.forkhooks import find_handlers
handlers = find_handlers()
sizes = [len(handlers.before), len(handlers.parent), len(handlers.child)]
after = handlers.quiet()
print(json.dumps({{"quiet": after is not None, "lists": sizes,
                   "zygote": [len(handlers.before), len(handlers.parent), len(handlers.child)]}}))
random.random()
for _ in range(2):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        if after is not None:
            after()
        seen = {{"random": random.random(), "count": COUNT[0]}}
        # logging's lock is free: a thread can log, and so can this one.
        t = threading.Thread(target=logging.getLogger("t").warning, args=("x",))
        t.start(); t.join(5)
        seen["thread_logged"] = not t.is_alive()
        seen["native_id"] = threading.current_thread().native_id == threading.get_native_id()
        seen["lists"] = [len(handlers.before), len(handlers.parent), len(handlers.child)]
        # A fork the test makes runs every handler again.
        gr, gw = os.pipe()
        grandchild = os.fork()
        if grandchild == 0:
            os.write(gw, json.dumps([random.random(), COUNT[0]]).encode()); os._exit(0)
        os.close(gw)
        seen["grandchild"] = json.loads(os.read(gr, 1000)); os.waitpid(grandchild, 0)
        os.write(w, json.dumps(seen).encode()); os._exit(0)
    os.close(w)
    print(os.read(r, 10000).decode()); os.waitpid(pid, 0)
"""


def _zygote(register: str, stderr: list[str] | None = None) -> list[dict[str, object]]:
    import json

    code = _ZYGOTE.format(register=textwrap.dedent(register))
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(Path(__file__).parents[1])},
        timeout=60,
    )
    if stderr is not None:
        stderr.append(done.stderr)
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_the_standard_librarys_handlers_are_skipped_and_their_effects_kept() -> None:
    head, *children = _zygote("""
        COUNT = [0]
        import concurrent.futures  # its lock around forks, before and after
        import concurrent.futures.thread
        def counted():
            COUNT[0] += 1
        os.register_at_fork(after_in_child=counted)  # a library's own: runs
    """)
    assert head["quiet"] is True
    assert head["zygote"] == [0, 0, 0]  # it forks without any
    before, parent, child = head["lists"]  # type: ignore[misc]
    randoms = set()
    for seen in children:
        # The lists are back (the zygote's are empty), the library's handler
        # ran once per fork, random was reseeded in each child and grandchild.
        assert seen["lists"] == [before, parent, child]
        assert seen["count"] == 1
        assert seen["thread_logged"] is True
        assert seen["native_id"] is True
        grandchild_random, grandchild_count = seen["grandchild"]  # type: ignore[misc]
        assert grandchild_count == 2
        randoms |= {seen["random"], grandchild_random}
    assert len(randoms) == 4


def test_an_unknown_handler_around_the_fork_keeps_the_usual_path() -> None:
    head, *children = _zygote("""
        COUNT = [0]
        def before():
            COUNT[0] += 1  # in the parent, before each fork
        os.register_at_fork(before=before)
    """)
    assert head["quiet"] is False
    assert head["zygote"] == head["lists"]
    assert [seen["count"] for seen in children] == [1, 2]
    assert len({seen["random"] for seen in children}) == 2


def test_a_handler_that_raises_is_reported_as_the_interpreter_does() -> None:
    stderr: list[str] = []
    head, *children = _zygote(
        """
        COUNT = [0]
        def boom():
            raise ValueError("boom in a handler")
        os.register_at_fork(after_in_child=boom)
        """,
        stderr,
    )
    assert head["quiet"] is True
    assert len(children) == 2  # the children went on
    # Two children and their two grandchildren (os.fork's own report).
    assert stderr[0].count("ValueError: boom in a handler") == 4
    assert stderr[0].count("Exception ignored in") == 4


def test_isolated_tests_of_a_zygote_see_their_handlers_run(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("""
        import os
        PIDS = []
        os.register_at_fork(after_in_child=lambda: PIDS.append(os.getpid()))
    """)
    pytester.makepyfile("""
        import os, random, threading, logging, pytest
        import conftest

        @pytest.mark.parametrize("n", range(6))
        def test_state(n, tmp_path_factory):
            assert conftest.PIDS[-1] == os.getpid()  # ran in this process
            assert threading.current_thread() is threading.main_thread()
            t = threading.Thread(target=logging.getLogger("t").warning, args=("x",))
            t.start(); t.join(5)
            assert not t.is_alive()
            # The lists are back: a fork the test makes runs the handlers.
            pid = os.fork()
            if pid == 0:
                os._exit(0 if conftest.PIDS[-1] == os.getpid() else 1)
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
            (tmp_path_factory.getbasetemp() / f"r{n}").write_text(repr(random.random()))
    """)
    result = pytester.runpytest_subprocess(*ISOLATE, "-vv", timeout=120)
    result.assert_outcomes(passed=6)
    assert "forked by 1 zygote" in result.stdout.str()
    values = {path.read_text() for path in pytester.path.glob("runpytest-0/r*")}
    assert len(values) == 6  # random reseeded in each test process
