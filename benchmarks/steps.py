"""Where an isolated test's time goes: each primitive of pytest_isolate timed alone.

Every per-test step runs in a freshly forked child, as in a sandbox, and the
child reports how long the step took; the parent also times the whole round
trip (fork to reaped), whose excess over a bare fork is what the kernel spends
tearing the step's objects down (a namespace, a mount tree) when the child
exits. Steps that pytest-isolate does once per session (planning the root,
compiling the filter, opening the cgroup tree) are timed in this process.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pytest_isolate import syscalls as sc
from pytest_isolate.syscalls import loopback_up  # the sandbox's own code, imported before forking

__all__ = ["Step", "TrapRow", "measure_steps", "measure_trap"]

NS_FLAGS = (
    ("mount", sc.CLONE_NEWNS),
    ("uts", sc.CLONE_NEWUTS),
    ("ipc", sc.CLONE_NEWIPC),
    ("cgroup", sc.CLONE_NEWCGROUP),
    ("network", sc.CLONE_NEWNET),
)
SANDBOX_FLAGS = (
    sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | sc.CLONE_NEWCGROUP | sc.CLONE_NEWNET
)


@dataclass(frozen=True)
class Step:
    name: str
    median_ms: float
    p90_ms: float
    where: str  # "sandbox" (per test), "parent" (per test) or "once" (per session)
    note: str = ""


@dataclass(frozen=True)
class TrapRow:
    gap_ms: float
    median_ms: float
    p90_ms: float
    how: str


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]


def _step(name: str, values: list[float], where: str, note: str = "") -> Step:
    return Step(name, statistics.median(values), _p90(values), where, note)


def _fork() -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


def _enter_user_namespace() -> None:
    uid, gid = os.getuid(), os.getgid()
    sc.unshare(sc.CLONE_NEWUSER)
    for path, text in (
        ("/proc/self/setgroups", "deny"),
        ("/proc/self/uid_map", f"{uid} {uid} 1"),
        ("/proc/self/gid_map", f"{gid} {gid} 1"),
    ):
        with open(path, "w") as f:
            f.write(text)


def in_child(
    step: Callable[[], None], prepare: Callable[[], None] | None = None
) -> tuple[float, float, float]:
    """Fork; the child runs ``prepare`` (untimed) then ``step`` (timed) and exits.

    Returns (ms the step took in the child, ms of the round trip fork -> reaped
    seen from the parent, ms the parent spent inside fork()).
    """
    read_fd, write_fd = os.pipe()
    start = time.perf_counter()
    pid = _fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(read_fd)
            if prepare is not None:
                prepare()
            begin = time.perf_counter()
            step()
            took = time.perf_counter() - begin
            os.write(write_fd, json.dumps({"ms": took * 1000}).encode())
        except BaseException as exc:
            os.write(write_fd, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        finally:
            os._exit(0)
    forked = time.perf_counter() - start
    os.close(write_fd)
    data = b""
    while chunk := os.read(read_fd, 65536):
        data += chunk
    os.close(read_fd)
    os.waitpid(pid, 0)
    total = (time.perf_counter() - start) * 1000
    result = json.loads(data or b'{"error": "the child died"}')
    if "error" in result:
        raise RuntimeError(f"benchmark step failed in the child: {result['error']}")
    return float(result["ms"]), total, forked * 1000


def settle() -> None:
    """Let the kernel finish tearing down what earlier measurements left: a
    network namespace is destroyed asynchronously (cleanup_net holds the rtnl
    lock while it runs), and a burst of them delays the next group's steps."""
    time.sleep(0.25)


def _repeat(
    reps: int, step: Callable[[], None], prepare: Callable[[], None] | None = None, gap: float = 0.0
) -> tuple[list[float], list[float], list[float]]:
    settle()
    steps, totals, forks = [], [], []
    for _ in range(reps):
        took, total, forked = in_child(step, prepare)
        steps.append(took)
        totals.append(total)
        forks.append(forked)
        if gap:
            time.sleep(gap)
    return steps, totals, forks


def _nothing() -> None:
    return None


@contextlib.contextmanager
def _ballast(size: int) -> Iterator[None]:
    """Make this process ``size`` bytes bigger, every page touched (resident)."""
    block = bytearray(size)
    block[::4096] = b"\x01" * len(range(0, size, 4096))
    try:
        yield
    finally:
        del block


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# --------------------------------------------------------------------------- the steps


def _plan(staging: str, *, rootless: bool, cgroup2: bool) -> Any:
    """The default root's plan for the benchmark's working directory."""
    from pytest_isolate.rootfs import plan_rootfs, project_paths

    return plan_rootfs(
        staging=staging,
        cwd=os.getcwd(),
        home=os.environ.get("HOME"),
        project=project_paths([os.getcwd()]),
        binds=(),
        writable_paths=(),
        tmpfs_size=512 << 20,
        rootless=rootless,
        cgroup2=cgroup2,
    )


def measure_steps(reps: int, heavy: str | None, ballast: bool) -> list[Step]:
    """Every step of an isolated test, in the order the sandbox takes them."""
    rootless = os.geteuid() != 0
    user = _enter_user_namespace if rootless else None
    steps: list[Step] = []
    _, base_totals, base_forks = _repeat(reps, _nothing)
    base_total = statistics.median(base_totals)
    steps.append(
        _step(
            f"fork() in the parent ({_rss_mib():.0f} MiB resident)",
            base_forks,
            "parent",
            "page tables are copied: grows with the parent's memory",
        )
    )
    steps.append(_step("fork + exit + reap, round trip", base_totals, "parent"))
    if ballast:
        for size in (256 << 20, 1 << 30):
            with _ballast(size):
                _, _, forks = _repeat(max(5, reps // 3), _nothing)
            steps.append(
                _step(
                    f"fork() with {size >> 20} MiB more resident",
                    forks,
                    "parent",
                    "why the parent must stay small (gc.freeze does not help)",
                )
            )

    def teardown_note(totals: list[float], took: list[float]) -> str:
        extra = statistics.median(totals) - base_total - statistics.median(took)
        return f"+{max(extra, 0):.2f} ms at exit (teardown)"

    took, totals, _ = _repeat(reps, _enter_user_namespace)
    steps.append(
        _step(
            "unshare user namespace + id maps",
            took,
            "sandbox",
            ("rootless only; " if not rootless else "rootless only (here: root); ")
            + teardown_note(totals, took),
        )
    )
    for name, flag in NS_FLAGS:
        took, totals, _ = _repeat(reps, _unshare(flag), user)
        steps.append(
            _step(f"unshare {name} namespace", took, "sandbox", teardown_note(totals, took))
        )
    took, totals, _ = _repeat(reps, _pid_namespace, user)
    steps.append(
        _step(
            "pid namespace: unshare + fork pid 1 + reap",
            took,
            "sandbox",
            teardown_note(totals, took),
        )
    )
    took, totals, _ = _repeat(reps, lambda: sc.unshare(SANDBOX_FLAGS), user)
    steps.append(
        _step(
            "unshare mount+uts+ipc+cgroup+net at once", took, "sandbox", teardown_note(totals, took)
        )
    )
    if not rootless:
        steps.extend(_rootfs_steps(reps, base_total))

    def uts_and_net() -> None:
        if user is not None:
            user()
        sc.unshare(sc.CLONE_NEWUTS | sc.CLONE_NEWNET)

    took, _, _ = _repeat(reps, _hostname_and_loopback, uts_and_net)
    steps.append(_step("sethostname + loopback up", took, "sandbox"))
    steps.extend(_cgroup_steps(reps))
    steps.extend(_filter_steps(reps, rootless, user))
    steps.extend(_report_steps(reps))
    if heavy:
        took, _, _ = _repeat(max(5, reps // 3), lambda: _import(heavy))
        steps.append(
            _step(
                f"import {heavy} in a child whose parent never imported it",
                took,
                "sandbox",
                "paid by every test that imports it, once by plain pytest",
            )
        )
    steps.extend(_sandbox_steps(reps, rootless))
    return steps


def _unshare(flag: int) -> Callable[[], None]:
    return lambda: sc.unshare(flag)


def _place(procs_files: tuple[str, ...]) -> Callable[[], None]:
    from pytest_isolate.cgroups.common import place_current_process

    return lambda: place_current_process(procs_files)


def _import(name: str) -> None:
    importlib.import_module(name)


def _no_new_privs() -> None:
    sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)


def _pid_namespace() -> None:
    sc.unshare(sc.CLONE_NEWPID)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - pid 1
        os._exit(0)
    os.waitpid(pid, 0)


def _hostname_and_loopback() -> None:
    sc.sethostname("isolated")
    loopback_up()


def _rootfs_steps(reps: int, base_total: float) -> list[Step]:
    from pytest_isolate.rootfs import apply_rootfs

    staging_parent = tempfile.mkdtemp(prefix="pytest-isolate-bench-")
    staging = os.path.join(staging_parent, "root")
    os.mkdir(staging)
    try:
        plans = []
        timings = []
        for _ in range(max(3, reps // 5)):
            begin = time.perf_counter()
            plan = _plan(staging, rootless=False, cgroup2=False)
            timings.append((time.perf_counter() - begin) * 1000)
            plans.append(plan)
        plan = plans[-1]
        mounts = sum(
            op.kind in ("bind", "tmpfs", "mask_file", "mask_dir", "overlay") for op in plan.ops
        )
        took, totals, _ = _repeat(
            reps, lambda: apply_rootfs(plan), lambda: sc.unshare(SANDBOX_FLAGS)
        )
        extra = statistics.median(totals) - base_total - statistics.median(took)
        steps = [
            _step(
                f"plan the root ({len(plan.ops)} operations)",
                timings,
                "once",
                "walks /var for unix sockets to mask",
            ),
            _step(
                f"build the root: {mounts} mounts, /proc, /dev, /sys, pivot_root",
                took,
                "sandbox",
                f"+{max(extra, 0):.2f} ms at exit (mount tree teardown)",
            ),
        ]
        steps.extend(_template_steps(reps, base_total, plan))
        return steps
    finally:
        shutil.rmtree(staging_parent, ignore_errors=True)


def _template_steps(reps: int, base_total: float, plan: Any) -> list[Step]:
    """As root, where this version has one: the init's copy of the spec's
    template mount namespace plus its own mounts, instead of the whole build."""
    try:
        from pytest_isolate.initd import _make_template
        from pytest_isolate.rootfs import apply_own, close_detached, detach_sources
    except ImportError:
        return []
    if os.geteuid() != 0:
        return []
    template = _make_template((plan, "isolated", True, True))
    if template is None:
        return [Step("copy the template", math.nan, math.nan, "-", "no template here")]
    try:

        def copy() -> None:
            detached = detach_sources(template.taken)
            sc.setns(template.fd, sc.CLONE_NEWNS)
            sc.unshare(sc.CLONE_NEWNS)
            apply_own(plan, template.own, detached)
            close_detached(detached)

        took, totals, _ = _repeat(reps, copy, lambda: sc.unshare(SANDBOX_FLAGS))
        extra = statistics.median(totals) - base_total - statistics.median(took)
        own = sum(op.kind in ("bind", "tmpfs", "mask_file", "mask_dir") for op in template.own)
        return [
            _step(
                f"or copy the spec's template, then {own} mounts, /proc, /dev, /sys",
                took,
                "sandbox",
                f"+{max(extra, 0):.2f} ms at exit; as root, default capabilities",
            ),
            *_reset_steps(reps, plan),
        ]
    finally:
        os.close(template.fd)


def _reset_steps(reps: int, plan: Any) -> list[Step]:
    """As root, where this version has them: a sandbox used again, reset by
    its pid 1 between two tests (initd._reset), timed from pytest's side:
    the request sent until the answer, and the machine's CPU for it."""
    from pytest_isolate.initd import InitFactory

    if not hasattr(InitFactory, "recycle"):
        return []
    factory = InitFactory()
    factory.start()
    try:
        setup = (plan, "isolated", True, True)
        pidfd = factory.new_init(setup)
        settle()
        took = []
        start = _machine_cpu()
        for _ in range(reps):
            begin = time.perf_counter()
            recycled = factory.recycle(pidfd, lambda: True)
            if recycled is None:
                return [Step("or reset a sandbox used again", math.nan, math.nan, "-", "no reset")]
            while recycled.settled() is None:
                recycled.gone(1.0)
            took.append((time.perf_counter() - begin) * 1000)
            if not recycled.settled():
                reason = factory.last_reset_failure
                return [Step("or reset a sandbox used again", math.nan, math.nan, "-", reason)]
            pidfd = factory.new_init(setup)
        cpu = (_machine_cpu() - start) * 1000 / reps  # ticks: only a sum is precise
        tick = 1000 / os.sysconf("SC_CLK_TCK") / reps
        return [
            _step(
                "or reset a sandbox used again (pid 1 between two tests: kill and wait, "
                "check the mounts, new uts+ipc+net, its writable mounts with /dev/pts and "
                "/dev/shm, /sys again)",
                took,
                "sandbox",
                f"machine CPU {cpu:.2f} ms a reset (+-{tick:.2f}: clock ticks; all cores, "
                "the kernel's teardown included)",
            )
        ]
    finally:
        factory.close()


def _machine_cpu() -> float:
    """Seconds of busy CPU of the whole machine (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    ticks = sum(int(v) for i, v in enumerate(fields) if i not in (3, 4))
    return ticks / os.sysconf("SC_CLK_TCK")


def _cgroup_steps(reps: int) -> list[Step]:
    from pytest_isolate.cgroups import CgroupUnavailable, Limits, open_cgroups

    begin = time.perf_counter()
    try:
        manager = open_cgroups(owner_tag="bench")
    except CgroupUnavailable as exc:
        return [Step("cgroups", math.nan, math.nan, "-", f"unavailable: {exc.missing}")]
    opened = (time.perf_counter() - begin) * 1000
    steps = [Step(f"open the cgroup tree ({manager.describe()})", opened, opened, "once")]
    try:
        for label, gap in (("back to back", 0.0), ("30 ms apart", 0.03)):
            settle()
            creates, places, removes = [], [], []
            for _ in range(reps):
                begin = time.perf_counter()
                cgroup = manager.create(Limits())
                creates.append((time.perf_counter() - begin) * 1000)
                took, _, _ = in_child(_place(cgroup.procs_files))
                places.append(took)
                begin = time.perf_counter()
                cgroup.stats()
                cgroup.remove()
                removes.append((time.perf_counter() - begin) * 1000)
                time.sleep(gap)
            if not gap:
                steps.append(_step("create the test's cgroup (mkdir)", creates, "parent"))
            steps.append(
                _step(
                    f"place the sandbox in it, {label}",
                    places,
                    "sandbox",
                    "v1: cgroup.procs write"
                    if manager.version == 1
                    else "v2: cgroup.procs write (clone3 avoids it)",
                )
            )
            if not gap:
                steps.append(_step("read its counters + remove it", removes, "parent"))
    finally:
        manager.close()
    return steps


def _filter_steps(reps: int, rootless: bool, user: Callable[[], None] | None) -> list[Step]:
    from pytest_isolate.capabilities import _prctl, apply_capabilities, resolve_caps
    from pytest_isolate.seccomp import build_filter, load_filter, seccomp_available

    _prctl()  # the engine loads python-prctl's extension before forking; so do we
    keep = resolve_caps((), (), rootless=rootless)
    took, _, _ = _repeat(reps, lambda: apply_capabilities(keep), user)
    steps = [_step(f"drop capabilities (keep {len(keep)}) + no_new_privs", took, "sandbox")]
    reason = seccomp_available()
    if reason:
        return [*steps, Step("seccomp", math.nan, math.nan, "-", reason)]
    timings = []
    for _ in range(max(3, reps // 5)):
        begin = time.perf_counter()
        program = build_filter.__wrapped__(keep)  # uncached: functools.cache keeps __wrapped__
        timings.append((time.perf_counter() - begin) * 1000)
    steps.append(
        _step(f"compile the filter ({len(program) // 8} BPF instructions)", timings, "once")
    )
    took, _, _ = _repeat(reps, lambda: load_filter(program), _no_new_privs)
    steps.append(_step("load the filter (seccomp, TSYNC)", took, "sandbox"))
    return steps


def _report_steps(reps: int) -> list[Step]:
    import pytest

    from pytest_isolate.protocol import FrameReader, encode_frame

    reports = [
        pytest.TestReport(
            "tests/test_module.py::TestClass::test_something[param-1]",
            ("tests/test_module.py", 41, "TestClass.test_something[param-1]"),
            {"test_something[param-1]": 1, "TestClass": 1, "test_module.py": 1, "tests": 1},
            "passed",
            None,
            when,
            sections=[],
            duration=0.0012,
            start=time.time(),
            stop=time.time(),
        )
        for when in ("setup", "call", "teardown")
    ]
    timings = []
    for _ in range(reps * 10):
        begin = time.perf_counter()
        reader = FrameReader()
        for report in reports:
            # What pytest_report_to_serializable / _from_serializable do for a
            # TestReport (the hooks need a Config this script does not have).
            data: dict[str, Any] = report._to_json()
            data["$report_type"] = "TestReport"
            for message in reader.feed(encode_frame("report", data)):
                pytest.TestReport._from_json(message.payload)
        timings.append((time.perf_counter() - begin) * 1000)
    return [_step("3 reports: to JSON, frame, parse, rebuild", timings, "both")]


def _sandbox_steps(reps: int, rootless: bool) -> list[Step]:
    """pytest_isolate.sandbox.spawn end to end with cumulative plans: the
    sandbox's cost without pytest (setup, an empty test, its 'done' frame)."""
    from pytest_isolate.capabilities import resolve_caps
    from pytest_isolate.cgroups import CgroupUnavailable, Limits, open_cgroups
    from pytest_isolate.sandbox import SandboxPlan, spawn
    from pytest_isolate.seccomp import build_filter, seccomp_available

    staging_parent = tempfile.mkdtemp(prefix="pytest-isolate-bench-")
    staging = os.path.join(staging_parent, "root")
    os.mkdir(staging)
    try:
        manager = open_cgroups(owner_tag="benchspawn")
    except CgroupUnavailable:
        manager = None
    factory = _init_factory(spawn, rootless)
    try:
        rootfs = _plan(staging, rootless=rootless, cgroup2=getattr(manager, "version", 0) == 2)
        caps = resolve_caps((), (), rootless=rootless)
        program = build_filter(caps) if seccomp_available() is None else None
        plans: list[tuple[str, SandboxPlan, bool]] = [
            ("fork only", SandboxPlan(namespaces=False, rootless=False, new_net=False), False),
            ("+ namespaces", SandboxPlan(namespaces=True, rootless=rootless), False),
            ("+ root", SandboxPlan(namespaces=True, rootless=rootless, rootfs=rootfs), False),
            ("+ cgroup", SandboxPlan(namespaces=True, rootless=rootless, rootfs=rootfs), True),
            (
                "+ capabilities",
                SandboxPlan(namespaces=True, rootless=rootless, rootfs=rootfs, caps=caps),
                True,
            ),
            (
                "+ seccomp (all layers)",
                SandboxPlan(
                    namespaces=True,
                    rootless=rootless,
                    rootfs=rootfs,
                    caps=caps,
                    seccomp_program=program,
                ),
                True,
            ),
        ]
        steps = []
        for label, plan, with_cgroup in plans:
            if with_cgroup and manager is None:
                continue
            for gap_label, gap in (("back to back", 0.0), ("30 ms apart", 0.03)):
                settle()
                ready, total, release = [], [], []
                for _ in range(reps):
                    ms = _one_sandbox(
                        plan, manager if with_cgroup else None, spawn, Limits, factory
                    )
                    ready.append(ms[0])
                    total.append(ms[1])
                    release.append(ms[2])
                    time.sleep(gap)
                steps.append(
                    _step(
                        f"sandbox {label}, {gap_label}: spawn to 'done'",
                        total,
                        "parent",
                        f"spawn() returns after {statistics.median(ready):.2f}"
                        f" ms; kill + reap {statistics.median(release):.2f} ms",
                    )
                )
        return steps
    finally:
        if factory is not None:
            factory.close()
        if manager is not None:
            manager.close()
        shutil.rmtree(staging_parent, ignore_errors=True)


def _init_factory(spawn: Any, rootless: bool) -> Any:
    """The engine's init factory (pytest_isolate.initd), where this version has
    one: as root it makes each sandbox's pid 1, so pytest forks a test once."""
    if rootless or "init_factory" not in inspect.signature(spawn).parameters:
        return None
    from pytest_isolate.initd import InitFactory, InitFactoryError

    factory = InitFactory()
    try:
        factory.start()
    except InitFactoryError:
        factory.close()
        return None
    return factory


def _one_sandbox(
    plan: Any, manager: Any, spawn: Any, limits: Any, factory: Any
) -> tuple[float, float, float]:
    begin = time.perf_counter()
    cgroup = manager.create(limits()) if manager is not None else None
    extra = {"init_factory": factory} if factory is not None else {}
    sandbox = spawn(
        plan,
        cgroup_procs=tuple(cgroup.procs_files) if cgroup else (),
        run_test=lambda ctx: lambda: None,
        foreign_fds=set,
        cleanup=cgroup.remove if cgroup else None,
        **extra,
    )
    spawned = time.perf_counter()
    sandbox.go()
    outcome = sandbox.collect(30.0)
    done = time.perf_counter()
    sandbox.close()
    closed = time.perf_counter()
    if not any(m.type == "done" for m in outcome.messages):
        failure = [m.payload for m in outcome.messages if m.type == "setup_failed"]
        raise RuntimeError(f"the sandbox did not run its test: {failure or outcome}")
    return ((spawned - begin) * 1000, (done - begin) * 1000, (closed - done) * 1000)


# --------------------------------------------------------------------------- the trap


def measure_trap(reps: int, gaps_ms: tuple[float, ...] = (0, 5, 10, 15, 20, 30)) -> list[TrapRow]:
    """The cgroup move trap: a fresh child writes "0" into a new memory cgroup's
    cgroup.procs, back to back or with gaps between placements. Only cgroups
    beneath this process's own are created (open_cgroups' layout), and removed."""
    from pytest_isolate.cgroups import Limits, open_cgroups

    manager = open_cgroups(owner_tag="benchtrap")
    rows = []
    try:
        for gap in gaps_ms:
            settle()
            values = []
            for _ in range(reps):
                cgroup = manager.create(Limits())
                try:
                    took, _, _ = in_child(_place(cgroup.procs_files))
                finally:
                    cgroup.remove()
                values.append(took)
                time.sleep(gap / 1000)
            rows.append(
                TrapRow(
                    gap,
                    statistics.median(values),
                    _p90(values),
                    f"cgroup v{manager.version}: write 0 to cgroup.procs",
                )
            )
        if manager.version == 2:
            rows.extend(_clone3_rows(manager, reps, gaps_ms))
    finally:
        manager.close()
    return rows


def _clone3_rows(manager: Any, reps: int, gaps_ms: tuple[float, ...]) -> list[TrapRow]:
    """v2 only: fork straight into the cgroup with clone3(CLONE_INTO_CGROUP),
    timed in the parent around the call (the child does nothing but exit)."""
    from pytest_isolate.cgroups import Limits
    from pytest_isolate.doctor import clone3_into_cgroup

    rows = []
    for gap in gaps_ms:
        clone_ms, fork_ms = [], []
        for _ in range(reps):
            cgroup = manager.create(Limits())
            try:
                fd = os.open(cgroup.clone_into, os.O_RDONLY | os.O_DIRECTORY)
                begin = time.perf_counter()
                pid = clone3_into_cgroup(fd)
                if pid == 0:  # pragma: no cover - child
                    os._exit(0)
                clone_ms.append((time.perf_counter() - begin) * 1000)
                os.close(fd)
                os.waitpid(pid, 0)
                begin = time.perf_counter()
                pid = _fork()
                if pid == 0:  # pragma: no cover - child
                    os._exit(0)
                fork_ms.append((time.perf_counter() - begin) * 1000)
                os.waitpid(pid, 0)
            finally:
                cgroup.remove()
            time.sleep(gap / 1000)
        rows.append(
            TrapRow(
                gap,
                statistics.median(clone_ms),
                _p90(clone_ms),
                "cgroup v2: clone3(CLONE_INTO_CGROUP), no write (parent's call)",
            )
        )
        rows.append(
            TrapRow(
                gap,
                statistics.median(fork_ms),
                _p90(fork_ms),
                "plain fork() for comparison (parent's call)",
            )
        )
    return rows
