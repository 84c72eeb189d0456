"""Benchmark: the per-test cost of pytest-isolate against plain pytest and pytest-forked.

    python benchmarks/run.py                 # everything, 3 repetitions (about 10 minutes)
    python benchmarks/run.py --quick         # smoke run: smaller suites, 1 repetition
    python benchmarks/run.py --out results.md --only suites,steps

What it measures (docs/performance.md explains each figure):

suites  four generated suites (trivial, 30 ms sleeps, a heavy import inside each
        test, a function-scoped fixture) under plain pytest, pytest-forked (in
        its own pytest 8.4 venv, benchmarks/.venv-forked, created on first use)
        and --isolate with cumulative --isolate-layers; wall time (median of
        --repeat runs), user+sys CPU of the whole process tree, the overhead
        per test over plain pytest and its ratio to pytest-forked's overhead.
rss     peak RSS of pytest's own process (VmHWM, children not counted) over
        10,000 trivial tests, isolated and plain, and its growth per test.
xdist   the speed-up of -n 2 on the 30 ms suite under --isolate.
steps   per-step costs of an isolated test, measured on pytest_isolate's own
        primitives (fork, each namespace, the root, the cgroup, the filter,
        the reports) and on whole sandboxes without pytest.
trap    the cgroup move trap: placing a fresh child into a new cgroup back to
        back vs with gaps (and clone3 CLONE_INTO_CGROUP on cgroup v2).

Runs are interleaved (one of each configuration per round) so that noise from
other work on the machine spreads over all of them alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)  # this checkout's pytest_isolate, for the steps section

from suites import Suite, write_rss_suite, write_suites  # noqa: E402

FORKED_VENV = os.path.join(HERE, ".venv-forked")
FORKED_REQUIREMENTS = ("pytest==8.4.*", "pytest-forked==1.7.5")
LAYER_STEPS = (
    "none",
    "namespaces",
    "namespaces,rootfs",
    "namespaces,rootfs,cgroup",
    "namespaces,rootfs,cgroup,caps",
    "all",
)
SECTIONS = ("suites", "rss", "xdist", "steps", "trap")
COMMON = ("-q", "-p", "no:cacheprovider")


@dataclass(frozen=True)
class Runner:
    name: str
    python: str
    args: tuple[str, ...]
    baseline: str = ""  # the plain runner whose time is subtracted
    kind: str = "isolate"  # plain | forked | isolate
    env: tuple[tuple[str, str], ...] = ()  # set for this runner only
    #: This checkout first on PYTHONPATH: not for the pytest 8.4 venv, whose
    #: pytest-forked children would look for every module they import there
    #: first (a cost that is not pytest-forked's).
    repo_on_path: bool = True


@dataclass(frozen=True)
class Sample:
    wall: float  # seconds from start to exit
    cpu: float  # user+sys of pytest and what it reaped (os.wait4's rusage)
    machine: float  # busy CPU seconds of the whole machine meanwhile (/proc/stat)
    text: str


@dataclass
class Result:
    runner: Runner
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def median(self, attr: str) -> float:
        values = [getattr(s, attr) for s in self.samples]
        return statistics.median(values) if values else float("nan")

    @property
    def wall(self) -> float:
        return self.median("wall")

    @property
    def cpu(self) -> float:
        return self.median("cpu")

    @property
    def machine(self) -> float:
        return self.median("machine")


# --------------------------------------------------------------------------- running


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (/proc/stat, all CPUs)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def settle(window: float = 0.1, limit: float = 3.0) -> float:
    """Wait (at most ``limit`` seconds) until the machine is idle: less than one
    clock tick of busy time in a ``window``. The kernel finishes a run's work
    after it has exited (namespaces torn down, cgroups freed, RCU callbacks):
    before a run, so that it does not pay for the one before; after it, so
    that its machine CPU includes its own. Returns machine_busy() as the
    quiet window began."""
    tick = 1.0 / os.sysconf("SC_CLK_TCK")
    end = time.monotonic() + limit
    while True:
        before = machine_busy()
        time.sleep(window)
        if machine_busy() - before < tick or time.monotonic() > end:
            return before


def run_once(
    cmd: Sequence[str],
    cwd: str,
    env: dict[str, str] | None = None,
    expect: int | None = None,
    timeout: float = 900.0,
) -> Sample:
    """Run one pytest; its wall time, CPU by rusage, machine CPU and output.

    os.wait4 reports the rusage of the child including its reaped descendants.
    It misses a test process whose sandbox init was killed before reaping it
    (pid 1 of a pid namespace: the kernel reaps the rest without passing their
    times up) and the kernel's own asynchronous work (namespace teardown, RCU
    callbacks). The machine's busy time catches both, and everything else
    running on the machine: it is only meaningful on an otherwise idle host.
    """
    # Each run gets its own temp root (pytest's basetemp parent): pytest
    # keeps numbered directories whose lock files a forked child never
    # removes (pytest-forked leaves one per test using tmp_path), and every
    # later run that creates a basetemp scans them all at its end.
    env = dict(os.environ if env is None else env)
    temproot = tempfile.mkdtemp(prefix="bench-temproot-")
    env["PYTEST_DEBUG_TEMPROOT"] = temproot
    with tempfile.TemporaryFile() as out:
        settle()
        busy = machine_busy()
        begin = time.perf_counter()
        proc = subprocess.Popen(list(cmd), cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        # Woken by the exit itself (a pidfd): no polling beside the run.
        pidfd = os.pidfd_open(proc.pid)
        try:
            if not select.select([pidfd], [], [], timeout)[0]:
                proc.kill()  # a hung run must not hang the benchmark
        finally:
            os.close(pidfd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - begin
        busy = settle() - busy
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    shutil.rmtree(temproot, ignore_errors=True)
    if expect is not None:
        passed = re.search(r"(\d+) passed", text)
        if proc.returncode != 0 or not passed or int(passed.group(1)) != expect:
            tail = "\n".join(text.splitlines()[-15:])
            raise RuntimeError(
                f"{' '.join(cmd)} in {cwd}: exit {proc.returncode}, expected "
                f"{expect} passed:\n{tail}"
            )
    return Sample(wall, usage.ru_utime + usage.ru_stime, busy, text)


def clean_env(repo_on_path: bool = True, **extra: str) -> dict[str, str]:
    """The environment of each run: this checkout's pytest_isolate first on the
    path, so the benchmark measures the tree it lives in, even where another
    copy is installed (an editable install of a tree that is being edited)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST_", "COV_", "PYTHONBREAKPOINT"))
        # Bytecode caches as a user has them: without, every run compiles
        # the plugin (and the rewritten tests) again.
        and k != "PYTHONDONTWRITEBYTECODE"
    }
    if repo_on_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


_PLUGINS_SCRIPT = """
import importlib.metadata as m
seen = set()
for d in m.distributions():
    name = (d.metadata["Name"] or "").lower()
    if name in seen or name in ("pytest-isolate-linux", "pytest-forked", "pytest"):
        continue
    if any(ep.group == "pytest11" for ep in d.entry_points):
        seen.add(name)
        print(name + "==" + d.version)
"""


def pytest_plugins_of(python: str) -> list[str]:
    """``name==version`` of every installed distribution with a pytest11 entry
    point (a plugin pytest loads by itself), pytest-isolate excepted."""
    found = subprocess.run(
        [python, "-c", _PLUGINS_SCRIPT], capture_output=True, text=True, check=False
    ).stdout.split()
    return sorted(found)


def forked_python(
    base_python: str, venv: str, log: Callable[[str], None], plugins: Sequence[str] = ()
) -> str:
    """The pytest 8.4 + pytest-forked 1.7.5 venv (pytest-forked fails on pytest 9),
    with ``plugins`` installed too: the measured venv's own pytest plugins, so
    that both runners' test processes carry the same plugins (each loads them,
    runs their hooks and writes their pages). The same versions where they
    install beside pytest 8.4, else the newest that do."""
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        base = subprocess.run(
            [
                base_python,
                "-c",
                "import sys; print(getattr(sys, '_base_executable', sys.executable))",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        log(f"creating {venv} with {base} and {' '.join(FORKED_REQUIREMENTS)}")
        subprocess.run([base, "-m", "venv", venv], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", *FORKED_REQUIREMENTS], check=True)
        # For the import suite; without it both sides use a generated module instead.
        subprocess.run([python, "-m", "pip", "install", "-q", "numpy"], check=False)
    wanted = sorted(plugins)
    have = {line.split("==")[0] for line in pytest_plugins_of(python)}
    missing = [p for p in wanted if p.split("==")[0] not in have]
    if missing:
        log(f"installing into {venv} the measured venv's pytest plugins: {' '.join(missing)}")
        pip = [python, "-m", "pip", "install", "-q", *FORKED_REQUIREMENTS]
        if subprocess.run([*pip, *missing], check=False).returncode != 0:
            # Some version needs pytest 9: the newest of each that does not.
            for plugin in missing:
                name = plugin.split("==")[0]
                if subprocess.run([*pip, name], check=False).returncode != 0:
                    log(f"could not install {name} beside pytest 8.4: left out")
    return python


def ensure_heavy(pythons: Sequence[str], log: Callable[[str], None], install: bool) -> str:
    """numpy where every interpreter has it (installed when asked), else a
    generated module of thousands of functions."""

    def lacks_numpy(python: str) -> bool:
        return (
            subprocess.run(
                [python, "-c", "import numpy"], capture_output=True, check=False
            ).returncode
            != 0
        )

    missing = [p for p in pythons if lacks_numpy(p)]
    if missing and install:
        for python in missing:
            log(f"installing numpy into {python}")
            subprocess.run([python, "-m", "pip", "install", "-q", "numpy"], check=False)
        missing = [p for p in pythons if lacks_numpy(p)]
    return "numpy" if not missing else "heavymod"


def runners(dev: str, forked: str | None) -> list[Runner]:
    result = [Runner("pytest (plain)", dev, ("-p", "no:isolate"), kind="plain")]
    if forked:
        result.append(
            Runner("pytest 8.4 (plain, forked venv)", forked, (), kind="plain", repo_on_path=False)
        )
        result.append(
            Runner(
                "pytest-forked 1.7.5",
                forked,
                ("--forked",),
                baseline="pytest 8.4 (plain, forked venv)",
                kind="forked",
                repo_on_path=False,
            )
        )
    for layers in LAYER_STEPS:
        label = "all (default)" if layers == "all" else layers
        result.append(
            Runner(
                f"--isolate layers={label}",
                dev,
                ("--isolate", f"--isolate-layers={layers}"),
                baseline="pytest (plain)",
            )
        )
    # The same, every test in a sandbox made for it (docs/how-it-works.md,
    # "Sandboxes used again"): what reuse saves, in the same invocation.
    result.append(
        Runner(
            "--isolate, no sandbox used again",
            dev,
            ("--isolate",),
            baseline="pytest (plain)",
            env=(("PYTEST_ISOLATE_REUSE", "0"),),
        )
    )
    return result


def run_suite(
    suite: Suite, configs: list[Runner], repeat: int, log: Callable[[str], None]
) -> list[Result]:
    results = {r.name: Result(r) for r in configs}
    # Warm-up: the first run writes the assertion-rewrite caches of each pytest.
    for python in dict.fromkeys(r.python for r in configs):
        subprocess.run(
            [python, "-m", "compileall", "-q", os.path.join(REPO, "pytest_isolate")],
            stdout=subprocess.DEVNULL,
            env=clean_env(),
            check=False,
        )
        run_once([python, "-m", "pytest", *COMMON, "-p", "no:isolate"], suite.path, clean_env())
    for round_ in range(repeat):
        for runner in configs:
            cmd = [runner.python, "-m", "pytest", *COMMON, *runner.args]
            try:
                sample = run_once(
                    cmd,
                    suite.path,
                    clean_env(runner.repo_on_path, **dict(runner.env)),
                    expect=suite.tests,
                )
            except RuntimeError as exc:
                results[runner.name].errors.append(str(exc))
                log(f"  ! {runner.name}: {str(exc).splitlines()[0]}")
                continue
            results[runner.name].samples.append(sample)
        log(f"  {suite.name}: round {round_ + 1}/{repeat} done")
    return list(results.values())


# --------------------------------------------------------------------------- report


class Report:
    """Collects text for the terminal and markdown for --out."""

    def __init__(self) -> None:
        self.markdown: list[str] = []

    def say(self, line: str = "") -> None:
        print(line, flush=True)

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]], title: str = "") -> None:
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
        if title:
            self.say(title)
        self.say("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        for row in rows:
            self.say("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
        self.say()
        if title:
            self.markdown.append(f"**{title}**\n")
        self.markdown.append("| " + " | ".join(header) + " |")
        self.markdown.append("|" + "|".join("---" for _ in header) + "|")
        self.markdown.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
        self.markdown.append("")

    def heading(self, text: str) -> None:
        self.say(f"== {text}")
        self.markdown.append(f"### {text}\n")

    def note(self, text: str) -> None:
        self.say(text)
        self.markdown.append(text + "\n")


def fmt(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def suite_table(report: Report, suite: Suite, results: list[Result]) -> dict[str, float]:
    by_name = {r.runner.name: r for r in results}
    forked = next((r for r in results if r.runner.kind == "forked"), None)

    def overhead(result: Result, attr: str) -> float:
        base = by_name.get(result.runner.baseline)
        if base is None or not result.samples or not base.samples:
            return float("nan")
        value: float = (getattr(result, attr) - getattr(base, attr)) / suite.tests * 1000
        return value

    forked_ms = overhead(forked, "wall") if forked else float("nan")
    rows = []
    ratios = {}
    for result in results:
        if result.runner.kind == "plain":
            rows.append(
                [
                    result.runner.name,
                    fmt(result.wall),
                    fmt(result.cpu),
                    fmt(result.machine),
                    "",
                    "",
                    "",
                ]
            )
            continue
        ms = overhead(result, "wall")
        ratio = ms / forked_ms if forked_ms > 0 else float("nan")  # NaN > 0 is False
        ratios[result.runner.name] = ratio
        rows.append(
            [
                result.runner.name + (" (failed)" if result.errors else ""),
                fmt(result.wall),
                fmt(result.cpu),
                fmt(result.machine),
                fmt(ms),
                fmt(overhead(result, "machine")),
                fmt(ratio),
            ]
        )
    report.table(
        [
            "runner",
            "wall s",
            "rusage cpu s",
            "machine cpu s",
            "overhead ms/test",
            "machine cpu ms/test",
            "ratio to pytest-forked",
        ],
        rows,
        title=f"{suite.name}: {suite.tests} {suite.what}",
    )
    for result in results:
        for error in result.errors[:1]:
            report.note(f"{result.runner.name} failed: {error.splitlines()[0]}")
    return ratios


# --------------------------------------------------------------------------- sections


def section_suites(
    args: argparse.Namespace,
    report: Report,
    base: str,
    dev: str,
    forked: str | None,
    log: Callable[[str], None],
) -> None:
    heavy = ensure_heavy([dev, *([forked] if forked else [])], log, install=args.install_numpy)
    suites = [s for s in write_suites(base, args.scale, heavy) if s.name in args.suites]
    report.heading("Suites: wall time, CPU and overhead per test")
    report.note(
        f"Median of {args.repeat} interleaved run(s) each; overhead = (runner - its "
        "plain pytest) / tests; the ratio divides by pytest-forked's overhead on the "
        "same suite in the same invocation. CPU is user+sys of pytest and every "
        "process it reaped."
    )
    configs = runners(dev, forked)
    for suite in suites:
        log(f"suite {suite.name} ({suite.tests} tests)")
        suite_table(report, suite, run_suite(suite, configs, args.repeat, log))


def section_rss(
    args: argparse.Namespace, report: Report, base: str, dev: str, log: Callable[[str], None]
) -> None:
    tests = args.rss_tests
    suite = write_rss_suite(base, tests)
    early = max(1, tests // 10)
    report.heading(f"Peak RSS of pytest's own process over {tests} trivial tests")
    rows = []
    for name, extra in (
        ("pytest (plain)", ("-p", "no:isolate")),
        ("--isolate (all layers)", ("--isolate",)),
    ):
        log(f"rss: {name}")
        path = os.path.join(base, "rss.json")
        wall = run_once(
            [dev, "-m", "pytest", *COMMON, *extra],
            suite.path,
            clean_env(BENCH_RSS_FILE=path, BENCH_RSS_EARLY=str(early)),
            expect=tests,
        ).wall
        with open(path) as f:
            data = json.load(f)
        growth = (data["rss"] - data["early"]) / max(1, data["count"] - data["early_at"])
        rows.append(
            [
                name,
                f"{data['hwm'] / 2**20:.1f}",
                f"{data['early'] / 2**20:.1f}",
                f"{data['rss'] / 2**20:.1f}",
                f"{growth:.0f}",
                fmt(wall, 1),
            ]
        )
    report.table(
        [
            "run",
            "peak RSS MiB (VmHWM)",
            f"RSS after {early} tests MiB",
            "RSS at the end MiB",
            "growth bytes/test",
            "wall s",
        ],
        rows,
    )
    report.note(
        "Read from /proc/self/status of the pytest process by a conftest hook "
        "(pytest_sessionfinish), so no sandbox's memory is counted."
    )


def section_xdist(
    args: argparse.Namespace, report: Report, base: str, dev: str, log: Callable[[str], None]
) -> None:
    # Four times the 30 ms suite: xdist's start-up (about a second for two
    # workers here) would otherwise hide what parallel workers gain.
    suite = next(
        s
        for s in write_suites(os.path.join(base, "xdist"), args.scale * 4, "heavymod")
        if s.name == "sleep30"
    )
    configs = [
        ("pytest", ("-p", "no:isolate")),
        ("pytest -n 2", ("-p", "no:isolate", "-n", "2")),
        ("--isolate", ("--isolate",)),
        ("--isolate -n 2", ("--isolate", "-n", "2")),
    ]
    walls: dict[str, list[float]] = {name: [] for name, _ in configs}
    cpus: dict[str, list[float]] = {name: [] for name, _ in configs}
    for round_ in range(args.repeat):
        for name, extra in configs:
            sample = run_once(
                [dev, "-m", "pytest", *COMMON, *extra], suite.path, clean_env(), expect=suite.tests
            )
            walls[name].append(sample.wall)
            cpus[name].append(sample.machine)
        log(f"  xdist: round {round_ + 1}/{args.repeat} done")
    med = {name: statistics.median(v) for name, v in walls.items()}
    report.heading(f"xdist: -n 2 on the 30 ms suite, {suite.tests} tests")
    report.table(
        ["run", "wall s", "machine cpu s", "speed-up of -n 2"],
        [
            [
                name,
                fmt(med[name]),
                fmt(statistics.median(cpus[name])),
                fmt(med[name.replace(" -n 2", "")] / med[name]) if "-n 2" in name else "",
            ]
            for name, _ in configs
        ],
    )


def section_steps(args: argparse.Namespace, report: Report, heavy: str | None) -> None:
    from steps import measure_steps

    report.heading("Per-step breakdown of an isolated test")
    report.note(
        "Each per-test step runs in a freshly forked child, as in a sandbox; 'once' "
        "steps run once per session in pytest's process. Median and 90th percentile "
        f"of {args.step_reps} repetitions."
    )
    rows = [
        [s.name, fmt(s.median_ms, 3), fmt(s.p90_ms, 3), s.where, s.note]
        for s in measure_steps(args.step_reps, heavy, ballast=not args.quick)
    ]
    report.table(["step", "median ms", "p90 ms", "runs in", "note"], rows)


def section_trap(args: argparse.Namespace, report: Report) -> None:
    from steps import measure_trap

    report.heading("The cgroup move trap: placing a fresh child into a new cgroup")
    try:
        rows = measure_trap(args.step_reps)
    except Exception as exc:  # no usable cgroup here: say so, keep the other sections
        report.note(f"not measured: {exc}")
        return
    report.table(
        ["gap between placements ms", "median ms", "p90 ms", "how"],
        [[fmt(r.gap_ms, 0), fmt(r.median_ms, 3), fmt(r.p90_ms, 3), r.how] for r in rows],
    )


# --------------------------------------------------------------------------- main


def machine_line() -> str:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024 // 1024
    kinds = set()
    with open("/proc/self/mounts") as f:
        for line in f:
            kinds.add(line.split()[2])
    cgroup = (
        "cgroup v1 (hybrid)"
        if "cgroup" in kinds
        else "cgroup v2"
        if "cgroup2" in kinds
        else "no cgroups"
    )
    who = "root" if os.geteuid() == 0 else "rootless"
    return (
        f"{os.cpu_count()} cores, {mem + 1} GiB, Linux {platform.release()}, {cgroup}, "
        f"{who}, Python {platform.python_version()}"
    )


def checkout_label() -> str:
    described = subprocess.run(
        ["git", "-C", REPO, "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return f"commit {described.stdout.strip()}" if described.returncode == 0 else "no git"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: suites at a fifth, 1 repetition, 1,000 RSS tests",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="runs of each configuration (median taken; default 3)",
    )
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated sections: {','.join(SECTIONS)}"
    )
    parser.add_argument(
        "--suites",
        default="trivial,sleep30,import,fixture",
        help="which suites of the suites section",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter with pytest 9 and pytest-isolate (default: this one)",
    )
    parser.add_argument(
        "--no-forked", action="store_true", help="skip pytest-forked (no venv created)"
    )
    parser.add_argument(
        "--forked-venv",
        default=FORKED_VENV,
        help="venv with pytest 8.4 and pytest-forked (created if missing; "
        "default benchmarks/.venv-forked)",
    )
    parser.add_argument(
        "--forked-lean",
        action="store_true",
        help="do not install the measured venv's pytest plugins into pytest-forked's venv "
        "(by default both runners' test processes carry the same plugins)",
    )
    parser.add_argument(
        "--install-numpy",
        action="store_true",
        help="pip install numpy into the interpreters that lack it",
    )
    parser.add_argument("--rss-tests", type=int, default=None, help="default 10000")
    parser.add_argument(
        "--scale",
        type=float,
        default=None,
        help="size of the suites relative to the defaults (--quick: 0.2)",
    )
    parser.add_argument(
        "--step-reps",
        type=int,
        default=None,
        help="repetitions of each step measurement (default 40, --quick 10)",
    )
    parser.add_argument(
        "--label",
        default="",
        help="what is measured, printed with the machine (default: git describe)",
    )
    parser.add_argument("--out", help="also write the results as markdown to this file")
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.scale = args.scale or (0.2 if args.quick else 1.0)
    args.rss_tests = args.rss_tests or (1000 if args.quick else 10000)
    args.step_reps = args.step_reps or (10 if args.quick else 40)
    args.only = [s for s in args.only.split(",") if s]
    args.suites = [s for s in args.suites.split(",") if s]
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; use {', '.join(SECTIONS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = Report()

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    report.heading("Machine")
    report.note(machine_line() + f"; load average before: {os.getloadavg()[0]:.2f}")
    report.note(f"Measured: pytest-isolate from {REPO} ({args.label or checkout_label()}).")
    base = tempfile.mkdtemp(prefix="pytest-isolate-bench-")
    started = time.monotonic()
    try:
        forked = None
        if "suites" in args.only and not args.no_forked:
            measured = pytest_plugins_of(args.python)
            forked = forked_python(
                args.python, args.forked_venv, log, [] if args.forked_lean else measured
            )
            theirs = pytest_plugins_of(forked)
            report.note(
                "pytest plugins of the measured venv: "
                f"{', '.join(measured) or 'none'}; of pytest-forked's venv: "
                f"{', '.join(theirs) or 'none'}"
                + (" (--forked-lean)." if args.forked_lean else ".")
            )
        if "suites" in args.only:
            section_suites(args, report, base, args.python, forked, log)
        if "xdist" in args.only:
            section_xdist(args, report, base, args.python, log)
        if "rss" in args.only:
            section_rss(args, report, base, args.python, log)
        if "steps" in args.only:
            heavy = ensure_heavy([sys.executable], log, install=False)
            # "heavymod" lives in a generated suite, not on this path: without
            # numpy here the import step is left out.
            importable = importlib.util.find_spec(heavy) is not None
            section_steps(args, report, heavy if importable else None)
        if "trap" in args.only:
            section_trap(args, report)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    report.note(
        f"Total benchmark time {time.monotonic() - started:.0f} s; load average after: "
        f"{os.getloadavg()[0]:.2f}."
    )
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(report.markdown) + "\n")
        log(f"markdown written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
