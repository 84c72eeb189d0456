"""The generated test suites the benchmark runs, each in a directory of its own."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["RSS_CONFTEST", "Suite", "write_heavy_module", "write_rss_suite", "write_suites"]


@dataclass(frozen=True)
class Suite:
    name: str
    path: str
    tests: int
    what: str


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _files(root: str, tests: int, per_file: int, body: str, header: str = "") -> None:
    """``tests`` test functions spread over files of ``per_file`` each: real
    suites change module often, and a new module is where an engine cannot
    have prepared the next sandbox in advance."""
    _write(os.path.join(root, "pytest.ini"), "[pytest]\n")
    for start in range(0, tests, per_file):
        count = min(per_file, tests - start)
        lines = [header] if header else []
        for i in range(start, start + count):
            lines.append(body.format(i=i))
        _write(os.path.join(root, f"test_{start // per_file:03d}.py"), "\n".join(lines))


def write_heavy_module(root: str, functions: int = 4000) -> str:
    """A stand-in for numpy where it cannot be installed: one big module whose
    import costs milliseconds (code objects to unmarshal, a dict to build)."""
    parts = ["TABLE = {" + ", ".join(f"'k{i}': {i}" for i in range(functions)) + "}"]
    parts.extend(f"def f{i}(x):\n    return x * {i} + len(TABLE)\n" for i in range(functions))
    _write(os.path.join(root, "heavymod.py"), "\n".join(parts))
    return "heavymod"


def write_suites(base: str, scale: float, heavy: str) -> list[Suite]:
    """The four suites of docs/performance.md; ``scale`` shrinks them for --quick.

    ``heavy`` is the module the import suite imports inside each test (numpy
    where both interpreters have it): the parent never imported it, so every
    forked child imports it again while plain pytest imports it once.
    """

    def n(count: int) -> int:
        return max(10, int(count * scale))

    suites = []
    root = os.path.join(base, "trivial")
    _files(root, n(200), 20, "def test_{i}():\n    pass\n")
    suites.append(Suite("trivial", root, n(200), "tests that do nothing"))

    root = os.path.join(base, "sleep30")
    _files(root, n(50), 10, "def test_{i}():\n    time.sleep(0.03)\n", "import time\n")
    suites.append(
        Suite(
            "sleep30",
            root,
            n(50),
            "tests that each sleep 30 ms (gaps between "
            "tests: per-test costs that only show with time between tests)",
        )
    )

    root = os.path.join(base, "import")
    if heavy == "heavymod":
        write_heavy_module(root)
        call = "heavymod.f1(1)"
    else:
        call = f"{heavy}.zeros(3).sum()"
    _files(
        root, n(100), 20, f"def test_{{i}}():\n    import {heavy}\n    assert {call} == {call}\n"
    )
    suites.append(
        Suite(
            "import",
            root,
            n(100),
            f"tests that import {heavy} inside the test "
            "(not at module level: the parent never imports it)",
        )
    )

    root = os.path.join(base, "fixture")
    _files(root, n(200), 20, "def test_{i}(resource):\n    assert resource.read_text() == 'x'\n")
    _write(
        os.path.join(root, "conftest.py"),
        "import pytest\n\n\n@pytest.fixture\ndef resource(tmp_path):\n"
        "    path = tmp_path / 'data.txt'\n    path.write_text('x')\n    yield path\n"
        "    path.unlink()\n",
    )
    suites.append(
        Suite(
            "fixture",
            root,
            n(200),
            "tests using a function-scoped fixture (built on tmp_path, torn down after each test)",
        )
    )
    return suites


#: Reads pytest's own peak RSS (VmHWM of the main process only; the children
#: are other processes and never count) and its RSS after the first tenth of
#: the tests and at the end, for the growth per test.
RSS_CONFTEST = """\
import json
import os

_state = {"count": 0, "early": None, "early_at": 0}


def _status():
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def pytest_runtest_logfinish(nodeid, location):
    _state["count"] += 1
    if _state["count"] == int(os.environ["BENCH_RSS_EARLY"]):
        _state["early"] = _status()["VmRSS"]
        _state["early_at"] = _state["count"]


def pytest_sessionfinish(session):
    status = _status()
    with open(os.environ["BENCH_RSS_FILE"], "w") as f:
        json.dump({"hwm": status["VmHWM"], "rss": status["VmRSS"], "early": _state["early"],
                   "early_at": _state["early_at"], "count": _state["count"]}, f)
"""


def write_rss_suite(base: str, tests: int) -> Suite:
    root = os.path.join(base, "rss")
    per_file = 500
    _write(os.path.join(root, "pytest.ini"), "[pytest]\n")
    _write(os.path.join(root, "conftest.py"), RSS_CONFTEST)
    for index, start in enumerate(range(0, tests, per_file)):
        count = min(per_file, tests - start)
        _write(
            os.path.join(root, f"test_{index:03d}.py"),
            f"import pytest\n\n\n@pytest.mark.parametrize('i', range({count}))\n"
            "def test_trivial(i):\n    pass\n",
        )
    return Suite("rss", root, tests, "trivial parametrized tests, 500 a module")
