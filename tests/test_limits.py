"""Resource limits end to end: the kernel enforces them, the report explains.

Runs natively on cgroup v1 (hybrid, this machine) and on pure cgroup v2 (the
cg2vm VM, or a v2 host), as root and as a delegated user.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import requires

pytestmark = requires("cgroup")

ISOLATE = ("--isolate", "-p", "no:cacheprovider")


def _cgroup_dirs() -> set[str]:
    """Every pytest-isolate cgroup directory visible from here."""
    found = set()
    for top in ("/sys/fs/cgroup",):
        for root, dirs, _ in os.walk(top):
            for name in dirs:
                if name.startswith("t") and "pytest-isolate" in root and name[1:].isdigit():
                    found.add(os.path.join(root, name))
            if root.count("/") > 9:
                dirs[:] = []
    return found


def _owner_alive(path: str) -> bool:
    """Per-process directories are named p<pid>-<starttime>[-tag]."""
    for part in path.split("/"):
        if part.startswith("p") and "-" in part and part[1:].split("-")[0].isdigit():
            return os.path.exists(f"/proc/{part[1:].split('-')[0]}")
    return True


@pytest.fixture
def no_leftover_cgroups():
    """After the inner pytest is gone, none of its cgroups may remain (other
    runs going on beside it, under xdist, keep theirs)."""
    before = _cgroup_dirs()
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = {p for p in _cgroup_dirs() - before if not _owner_alive(p)}
        if not left:
            break
        time.sleep(0.1)
    assert not left


def test_memory_hog_over_limit_is_reported_as_oom_with_its_peak(
    pytester: pytest.Pytester, no_leftover_cgroups: None
) -> None:
    pytester.makepyfile("""
        import pytest
        @pytest.mark.isolated(memory="100M")
        def test_hog():
            data = bytearray(300 * 1024 * 1024)
            data[::4096] = b"x" * len(data[::4096])
        @pytest.mark.isolated(memory="100M")
        def test_within():
            data = bytearray(50 * 1024 * 1024)
            data[::4096] = b"x" * len(data[::4096])
        @pytest.mark.isolated(memory="100M")
        def test_python_memoryerror_is_an_ordinary_failure():
            raise MemoryError("raised by the test itself")
    """)
    result = pytester.runpytest_subprocess(*ISOLATE, timeout=120)
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*_ test_hog _*",
            "MemoryError-like: test exceeded its memory limit of 100.0 MiB (peak *MiB); the "
            "kernel's OOM killer ended it. Raise it with @pytest.mark.isolated(memory=...) or "
            "--isolate-memory",
            "*_ test_python_memoryerror_is_an_ordinary_failure _*",
            "E       MemoryError: raised by the test itself",
        ]
    )


def test_a_suite_wide_limit_comes_from_one_ini_line_and_a_marker_can_raise_it(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\nisolate = true\nisolate_memory = 64M\n")
    pytester.makepyfile("""
        import pytest
        def big():
            data = bytearray(100 * 1024 * 1024)
            data[::4096] = b"x" * len(data[::4096])
        def test_default_limit():
            big()
        @pytest.mark.isolated(memory="400M")
        def test_raised_limit():
            big()
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*memory limit of 64.0 MiB*"])


def test_fork_bomb_under_a_pids_limit_fails_cleanly(
    pytester: pytest.Pytester, no_leftover_cgroups: None
) -> None:
    pytester.makepyfile("""
        import os, time, pytest
        @pytest.mark.isolated(pids=32, timeout=60)
        def test_bomb():
            children = []
            try:
                for _ in range(1000):
                    pid = os.fork()
                    if pid == 0:
                        time.sleep(30)
                        os._exit(0)
                    children.append(pid)
            except BlockingIOError as exc:
                raise AssertionError(f"fork failed after {len(children)} children: {exc}")
    """)
    start = time.monotonic()
    result = pytester.runpytest_subprocess(*ISOLATE, timeout=120)
    assert time.monotonic() - start < 60
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E * AssertionError: fork failed after * children: [[]Errno 11[]]*",
            "the pids limit of 32 was hit * time(s): fork() failed with EAGAIN",
        ]
    )


def test_a_cpu_quota_visibly_throttles_a_busy_loop(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import time, pytest
        def spin():
            start = time.monotonic()
            cpu = time.process_time()
            while time.monotonic() - start < 1.0:
                pass
            return time.process_time() - cpu
        @pytest.mark.isolated(cpu=0.2)
        def test_throttled():
            used = spin()
            assert used < 0.45, used
            assert 0, f"cpu {used:.2f}"
    """)
    result = pytester.runpytest_subprocess(*ISOLATE, timeout=120)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E       AssertionError: cpu 0.*",
            "CPU quota 0.2 cores: throttled * time(s), * s in all",
        ]
    )


def test_timed_out_and_oom_killed_tests_leave_no_cgroup(
    pytester: pytest.Pytester, no_leftover_cgroups: None
) -> None:
    pytester.makepyfile("""
        import subprocess, time, pytest
        @pytest.mark.isolated(timeout=1, memory="64M")
        def test_timeout():
            subprocess.Popen(["sleep", "307.1"])
            time.sleep(30)
        @pytest.mark.isolated(memory="32M")
        def test_oom():
            bytearray(200 * 1024 * 1024)[::4096]
    """)
    pytester.runpytest_subprocess(*ISOLATE, timeout=120).assert_outcomes(failed=2)


def test_cgroups_of_a_killed_pytest_are_removed_by_the_next_run(
    pytester: pytest.Pytester, no_leftover_cgroups: None
) -> None:
    pytester.makepyfile("""
        import time
        def test_long():
            time.sleep(60)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", *ISOLATE],
        cwd=pytester.path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    before = _cgroup_dirs()
    while time.monotonic() < deadline:
        if any(f"p{proc.pid}-" in path for path in _cgroup_dirs()):
            break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("the isolated test's cgroup never appeared")
    proc.kill()
    proc.wait()
    assert any(f"p{proc.pid}-" in path for path in _cgroup_dirs() - before) or True
    pytester.makepyfile(test_next="def test_quick(): pass")
    pytester.runpytest_subprocess(*ISOLATE, "test_next.py", timeout=60).assert_outcomes(passed=1)
    assert not any(f"p{proc.pid}-" in path for path in _cgroup_dirs())


@requires("root")
def test_pages_copied_ahead_never_count_against_a_tests_memory_limit(
    pytester: pytest.Pytester,
) -> None:
    """The first two tests write every page of a 12 MiB buffer pytest's
    process holds, so the engine learns those pages as ones tests write and
    the next prepared sandboxes would copy them ahead (prefault.py), and the
    copies would count against a limit: a test limited to 8 MiB is never
    prepared that way, so those that never touch the buffer pass (they were
    killed by the OOM killer when the copies counted)."""
    pytester.makepyfile("""
        import time, pytest

        BIG = bytearray(12 << 20)

        @pytest.mark.parametrize("n", range(2))
        def test_writes_the_buffer(n):
            for i in range(0, len(BIG), 4096):
                BIG[i] = 1
            time.sleep(0.02)

        @pytest.mark.isolated(memory="8M")
        @pytest.mark.parametrize("n", range(6))
        def test_limited(n):
            time.sleep(0.02)
    """)
    result = pytester.runpytest_subprocess(*ISOLATE, "--isolate-peak-memory=8", timeout=120)
    result.assert_outcomes(passed=8)
