"""The cgroups layer against the real kernel: limits bite, counters count,
nothing is left behind.

Runs natively on cgroup v1 (this machine) and cgroup v2 (the cg2vm VM, as root
and as a delegated unprivileged user); tests skip with the reason where the
host lacks what they need.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from pytest_isolate.cgroups import (
    CgroupManager,
    CgroupUnavailable,
    Limits,
    TestCgroup,
    open_cgroups,
    place_current_process,
)
from pytest_isolate.cgroups.common import process_starttime, read_pids
from pytest_isolate.cgroups.v1 import V1Manager
from pytest_isolate.cgroups.v2 import PROCS_LEAF, V2Manager, _exe, _foreign_processes

MiB = 1024 * 1024
TAG = "tests" + os.environ.get("PYTEST_XDIST_WORKER", "")


@pytest.fixture(scope="module")
def manager() -> Iterator[CgroupManager]:
    try:
        m = open_cgroups(owner_tag=TAG)
    except CgroupUnavailable as e:
        pytest.skip(f"no usable cgroup here: {e}")
    yield m
    m.close()
    assert not os.path.exists(own_dir(m)), "close() left this process's subtree behind"


def own_dir(m: CgroupManager) -> str:
    if isinstance(m, V2Manager):
        return m.pdir or "/nonexistent"
    assert isinstance(m, V1Manager)
    return next(iter(m.pdirs.values()), "/nonexistent")


def shared_dir(m: CgroupManager) -> str:
    if isinstance(m, V2Manager):
        return os.path.dirname(m.pdir)
    assert isinstance(m, V1Manager)
    return os.path.dirname(m.pdirs["memory"])


def requires(m: CgroupManager, *controllers: str) -> None:
    for c in controllers:
        if c not in m.controllers:
            pytest.skip(f"cgroup controller {c!r} not usable here: {m.unavailable[c]}")


def run_in(tc: TestCgroup, body: Callable[[int], int]) -> tuple[int, bytes]:
    """Fork a child that places itself in tc, then runs body(write_fd) and
    exits with its return value. Returns (wait status, what body wrote)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.close(r)
            place_current_process(tc.procs_files)
            code = body(w)
        finally:
            os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    # Read what is there, not until EOF: processes the body left behind
    # (a fork bomb's children) hold the write end open.
    os.set_blocking(r, False)
    out = b""
    try:
        while chunk := os.read(r, 65536):
            out += chunk
    except BlockingIOError:
        pass
    os.close(r)
    return status, out


def make(manager: CgroupManager, **limits: float) -> TestCgroup:
    return manager.create(Limits(**limits))  # type: ignore[arg-type]


@pytest.fixture
def cleanup() -> Iterator[list[TestCgroup]]:
    made: list[TestCgroup] = []
    yield made
    for tc in made:
        tc.kill()
        tc.remove()


# ------------------------------------------------------------------ memory


def test_memory_hog_over_limit_is_oom_killed_and_counted(
    manager: CgroupManager, cleanup: list[TestCgroup]
) -> None:
    requires(manager, "memory")
    tc = make(manager, memory=100 * MiB)
    cleanup.append(tc)

    def hog(w: int) -> int:
        data = b"\x01" * (300 * MiB)  # memset: every page is touched and charged
        os.write(w, b"survived")
        return len(data) and 0

    status, out = run_in(tc, hog)
    stats = tc.stats()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (status, out)
    assert stats.oom_kills >= 1
    if stats.peak_memory is not None:
        assert 90 * MiB <= stats.peak_memory <= 101 * MiB, stats


def test_allocation_under_memory_limit_passes_and_peak_is_measured(
    manager: CgroupManager, cleanup: list[TestCgroup]
) -> None:
    requires(manager, "memory")
    tc = make(manager, memory=100 * MiB)
    cleanup.append(tc)

    def modest(w: int) -> int:
        data = b"\x01" * (50 * MiB)
        return len(data) and 0

    status, _ = run_in(tc, modest)
    stats = tc.stats()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert stats.oom_kills == 0
    if stats.peak_memory is not None:
        assert 50 * MiB <= stats.peak_memory < 100 * MiB, stats


def test_test_without_limits_still_gets_peak_memory(
    manager: CgroupManager, cleanup: list[TestCgroup]
) -> None:
    requires(manager, "memory")
    tc = make(manager)
    cleanup.append(tc)
    status, _ = run_in(tc, lambda w: len(b"\x01" * (20 * MiB)) and 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    stats = tc.stats()
    if isinstance(manager, V2Manager) and not manager.has_peak:
        assert stats.peak_memory is None
    else:
        assert stats.peak_memory is not None and stats.peak_memory >= 20 * MiB


# -------------------------------------------------------------------- pids


def test_fork_bomb_under_pids_limit_gets_eagain_and_is_counted(
    manager: CgroupManager, cleanup: list[TestCgroup]
) -> None:
    requires(manager, "pids")
    tc = make(manager, pids=32)
    cleanup.append(tc)

    def bomb(w: int) -> int:
        for _ in range(1000):
            try:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
            except BlockingIOError:  # EAGAIN from pids.max
                return 42
        return 1

    status, _ = run_in(tc, bomb)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 42, status
    assert tc.stats().pids_max_hits > 0
    assert len(read_pids(tc.procs_files[-1])) == 31  # the bomb's children, still sleeping
    tc.kill()
    assert all(read_pids(f) == [] for f in tc.procs_files)


# --------------------------------------------------------------------- cpu


def test_cpu_limit_throttles_a_busy_loop(manager: CgroupManager, cleanup: list[TestCgroup]) -> None:
    requires(manager, "cpu")
    tc = make(manager, cpu=0.2)
    cleanup.append(tc)

    def spin(w: int) -> int:
        start, cpu0 = time.monotonic(), time.process_time()
        while time.monotonic() - start < 1.0:
            pass
        os.write(w, struct.pack("d", time.process_time() - cpu0))
        return 0

    status, out = run_in(tc, spin)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    (cpu_seconds,) = struct.unpack("d", out)
    stats = tc.stats()
    assert cpu_seconds < 0.4, cpu_seconds
    assert stats.nr_throttled is not None and stats.nr_throttled > 0, stats
    assert stats.throttled_usec is not None and stats.throttled_usec > 0


# ------------------------------------------------------------ kill, remove


def test_kill_ends_a_double_forked_grandchild(manager: CgroupManager) -> None:
    tc = manager.create(Limits())

    def escape(w: int) -> int:
        ready_r, ready_w = os.pipe()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.write(w, str(os.getpid()).encode())
                os.write(ready_w, b"x")
                time.sleep(60)
            os._exit(0)
        os.close(ready_w)
        os.read(ready_r, 1)  # the grandchild has written its pid
        os.wait()
        return 0

    status, out = run_in(tc, escape)
    grandchild = int(out)
    assert os.WIFEXITED(status)
    assert grandchild in read_pids(tc.procs_files[0])
    tc.kill()
    assert all(read_pids(f) == [] for f in tc.procs_files)
    tc.remove()
    assert not any(os.path.exists(os.path.dirname(f)) for f in tc.procs_files)


def test_signal_all_skips_only_the_pids_already_signalled(manager: CgroupManager) -> None:
    """The engine passes the test process it has just sent SIGKILL (not reaped,
    so its number is still its own): every other member is signalled all
    the same."""
    tc = manager.create(Limits())

    def leave_a_sleeper(w: int) -> int:
        if os.fork() == 0:
            os.write(w, str(os.getpid()).encode())
            time.sleep(60)
            os._exit(0)
        time.sleep(60)  # the "test process": signalled by the caller
        return 0

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        place_current_process(tc.procs_files)
        os.close(r)
        os._exit(leave_a_sleeper(w))
    os.close(w)
    try:
        sleeper = int(os.read(r, 32))
        os.kill(pid, signal.SIGKILL)
        sleeper_fd = os.pidfd_open(sleeper)
        tc.signal_all(signalled=(pid,))
        # The sleeper is not our child: its pidfd says when it has exited.
        assert select.select([sleeper_fd], [], [], 10)[0], "the other member was not signalled"
        os.close(sleeper_fd)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
        tc.remove()  # kills what is left, if the test failed


def test_remove_leaves_no_directory_and_tolerates_a_second_call(manager: CgroupManager) -> None:
    tc = manager.create(Limits())
    dirs = [os.path.dirname(f) for f in tc.procs_files]
    assert dirs and all(os.path.isdir(d) for d in dirs)
    tc.remove()
    assert not any(os.path.exists(d) for d in dirs)
    tc.remove()  # ENOENT is not an error


def test_remove_kills_what_is_left_instead_of_failing(manager: CgroupManager) -> None:
    tc = manager.create(Limits())

    def leave_a_sleeper(w: int) -> int:
        if os.fork() == 0:
            time.sleep(60)
        return 0

    run_in(tc, leave_a_sleeper)
    assert len(read_pids(tc.procs_files[0])) == 1
    tc.remove()
    assert not any(os.path.exists(os.path.dirname(f)) for f in tc.procs_files)


# ----------------------------------------------------------------- layout


def _parked_process() -> tuple[int, int, int]:
    """A child blocked on a pipe: (pid, starttime, write end that frees it)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    start = process_starttime(pid)
    assert start is not None
    return pid, start, w


def test_stale_dir_of_a_dead_owner_is_removed_and_a_live_ones_kept(
    manager: CgroupManager,
) -> None:
    shared = shared_dir(manager)
    dead_pid, dead_start, w = _parked_process()
    os.close(w)
    os.waitpid(dead_pid, 0)
    live_pid, live_start, live_w = _parked_process()
    stale = os.path.join(shared, f"p{dead_pid}-{dead_start}-x")
    live = os.path.join(shared, f"p{live_pid}-{live_start}")
    os.mkdir(stale)
    os.mkdir(live)
    os.mkdir(f"{stale}/t0")
    leftover = os.fork()
    if leftover == 0:
        place_current_process([f"{stale}/t0/cgroup.procs"])
        time.sleep(60)
        os._exit(0)
    try:
        deadline = time.monotonic() + 5
        while leftover not in read_pids(f"{stale}/t0/cgroup.procs"):
            assert time.monotonic() < deadline
            time.sleep(0.001)
        second = open_cgroups(owner_tag=TAG + "second")
        try:
            assert not os.path.exists(stale)
            assert os.path.isdir(live)
            _, status = os.waitpid(leftover, 0)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        finally:
            second.close()
    finally:
        os.close(live_w)
        os.waitpid(live_pid, 0)
        os.rmdir(live)
        if os.path.exists(stale):
            os.kill(leftover, signal.SIGKILL)


def test_two_managers_in_one_process_keep_their_own_subtrees(manager: CgroupManager) -> None:
    other = open_cgroups(owner_tag=TAG + "other")
    assert own_dir(other) != own_dir(manager)
    tc = other.create(Limits())
    other.close()
    assert not os.path.exists(os.path.dirname(tc.procs_files[0]))
    assert os.path.isdir(own_dir(manager))


def test_prime_moves_a_helper_into_a_cgroup_of_ours_and_close_removes_it(
    manager: CgroupManager,
) -> None:
    """v1's prime(): a helper process writes itself into ``<own>/primer`` (the
    move that puts the kernel's cgroup lock on its slow path for the first
    sandbox's placement); it exits at once, and close() leaves nothing."""
    if manager.version != 1:
        pytest.skip("prime() is a no-op on cgroup v2 (sandboxes are cloned into their cgroup)")
    other = open_cgroups(owner_tag=TAG + "primer")
    try:
        other.prime()
        primer = other._primer  # type: ignore[attr-defined]
        assert primer is not None
        assert primer.wait(timeout=10) == 0  # the shell's write to cgroup.procs succeeded
        path = f"{own_dir(other)}/primer"
        assert os.path.isdir(path)
        assert read_pids(f"{path}/cgroup.procs") == []  # the helper has exited
        other.prime()
        assert other._primer is primer  # type: ignore[attr-defined]  # once per manager
    finally:
        other.close()
    assert not os.path.exists(own_dir(other))


def test_same_owner_tag_twice_in_one_process_is_refused(manager: CgroupManager) -> None:
    with pytest.raises(CgroupUnavailable, match="own owner_tag"):
        open_cgroups(owner_tag=TAG)


def test_describe_names_the_version_and_the_controllers(manager: CgroupManager) -> None:
    text = manager.describe()
    assert text.startswith(f"cgroup v{manager.version} (")
    for c in manager.controllers:
        assert c in text


def test_limit_on_an_unusable_controller_raises_with_the_fix(manager: CgroupManager) -> None:
    missing = {"memory", "pids", "cpu"} - manager.controllers
    if not missing:
        pytest.skip("every controller is usable here")
    name = sorted(missing)[0]
    with pytest.raises(CgroupUnavailable, match="fix: "):
        manager.create(Limits(**{name: 1000000 if name != "cpu" else 0.5}))  # type: ignore[arg-type]


def test_limits_below_what_the_kernel_accepts_are_rejected_with_the_value() -> None:
    with pytest.raises(ValueError, match=r"cpu=0\.001"):
        Limits(cpu=0.001)
    with pytest.raises(ValueError, match="pids=0"):
        Limits(pids=0)


def test_delegated_v2_cgroup_holds_pytest_in_the_procs_leaf(manager: CgroupManager) -> None:
    if not (isinstance(manager, V2Manager) and manager.placement.startswith("delegated")):
        pytest.skip("not running in a delegated cgroup v2 (run in cg2vm --user)")
    with open("/proc/self/cgroup") as f:
        assert f.read().strip().endswith("/" + PROCS_LEAF)
    assert manager.pdir.startswith(manager.base + "/pytest-isolate/")


# ----------------------------------------------------- no usable cgroup


def _open_as_unprivileged_user() -> str:
    """Fork, drop to nobody, try open_cgroups; return its error text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            try:
                m = open_cgroups(owner_tag="nobody")
            except CgroupUnavailable as e:
                os.write(w, str(e).encode())
                code = 0
            else:
                m.close()
                os.write(w, b"OPENED")
        finally:
            os._exit(code)
    os.close(w)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return out.decode()


def test_without_delegation_the_error_names_what_is_missing_and_the_fix() -> None:
    if os.geteuid() == 0:
        text = _open_as_unprivileged_user()
    else:
        try:
            open_cgroups(owner_tag="nodelegation").close()
        except CgroupUnavailable as e:
            text = str(e)
        else:
            pytest.skip("this user's cgroup is delegated: the error path needs one that is not")
    if text == "OPENED":
        pytest.skip("an unprivileged user can create cgroups here")
    missing, _, fix = text.partition("\nfix: ")
    assert "cgroup" in missing and fix, text
    assert "systemd-run --user --scope -p Delegate=yes" in fix, text


def test_place_current_process_names_the_path_on_failure() -> None:
    with pytest.raises(OSError) as info:
        place_current_process(["/nonexistent/cgroup.procs"])
    assert info.value.errno == errno.ENOENT
    assert "/nonexistent/cgroup.procs" in str(info.value)


def test_delegation_counts_a_parent_running_another_program_as_foreign() -> None:
    me, parent = os.getpid(), os.getppid()
    child = os.fork()
    if child == 0:
        time.sleep(60)
        os._exit(0)
    try:
        # An unreadable exe (a parent owned by another user) is not ours either.
        same = _exe(parent) == _exe(me)
        # Our own descendants are ours; a parent is ours only if it runs the
        # same interpreter (an xdist controller), never a shell or a CI agent.
        assert _foreign_processes([me, child, parent]) == ([] if same else [parent])
        assert _foreign_processes([me, child]) == []
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
