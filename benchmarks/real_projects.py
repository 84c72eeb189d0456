"""Real projects' own test suites: plain pytest versus ``--isolate``, test by test.

    python benchmarks/real_projects.py                      # every project below
    python benchmarks/real_projects.py attrs click          # some of them
    python benchmarks/real_projects.py --list               # the projects and versions
    python benchmarks/real_projects.py --modes plain,isolated --markdown out.md

For each project it
1. builds a venv under the work dir (default /tmp/isolate-real-projects/<name>)
   with the dev interpreter, downloads the project's sdist from PyPI
   (``pip download --no-deps --no-binary :all:``) and unpacks it: the sdist
   carries the tests, so the suite is exactly the one the release shipped;
2. installs the project (editable, as a developer would), its test
   requirements, pytest 9.2 and pytest-isolate-linux from the repository
   (editable, so the engine under test is the working tree's);
3. runs the suite three ways, one after the other, from the unpacked tree:
   ``plain``, ``isolated`` (``--isolate``: the read-only default) and
   ``overlay`` (``--isolate --isolate-fs=overlay``), each with
   ``-p no:cacheprovider`` and ``--junitxml`` for per-test outcomes. Before each
   run the tree is put back as the install left it (``__pycache__``,
   ``.hypothesis``, ... removed) and ``$HOME`` is a fresh empty directory, so
   every mode starts from the same state; what the plain run wrote into the
   tree and into ``$HOME`` is listed, because those are exactly the writes that
   meet a read-only file system under isolation;
4. prints a table: tests, plain outcomes, the tests whose outcome differs from
   plain in each isolated mode (with the first line of the failure), and the
   wall time of each mode.

The full text of every differing test goes to <work>/<name>/diffs.txt. The
machine may be shared: the timings are indicative, the outcomes are not.
docs/compatibility.md reports a run and explains each difference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV_PYTHON = "/root/.pyenv/versions/3.11.7/bin/python3.11"
WORK = "/tmp/isolate-real-projects"
PYTEST = "pytest==9.2.*"
COMMON = ("-p", "no:cacheprovider", "-q")
#: mode name -> the extra pytest arguments that make it
MODES: dict[str, tuple[str, ...]] = {
    "plain": (),
    "isolated": ("--isolate",),
    "overlay": ("--isolate", "--isolate-fs=overlay"),
}
#: Written by the runs themselves; never part of the tree's own state.
RUN_ARTIFACTS = ("__pycache__", ".hypothesis", ".pytest_cache", ".benchmarks")


@dataclass(frozen=True)
class Project:
    """One project: its release, what its suite needs, and how to run it."""

    name: str  # the PyPI name
    version: str
    deps: tuple[str, ...] = ()  # test requirements, as the project lists them
    args: tuple[str, ...] = ()  # test paths and options, as its tox/CI runs them
    why: str = ""  # what the suite exercises that isolation may touch
    env: dict[str, str] = field(default_factory=dict)


PROJECTS: tuple[Project, ...] = (
    Project(
        "attrs",
        "26.1.0",
        ("hypothesis", "pympler", "cloudpickle"),
        ("tests",),
        "hypothesis database in the working directory, --import-mode=importlib",
    ),
    Project("more-itertools", "11.2.1", (), ("tests",), "unittest-style classes, doctests off"),
    # 59,000 of packaging's 64,000 tests are parametrized string parsing
    # (versions, requirements, markers, specifiers, ranges): left out for time.
    Project(
        "packaging",
        "26.4",
        ("hypothesis", "pretend", "pip", "tomli_w"),
        (
            "tests",
            "--ignore=tests/test_version.py",
            "--ignore=tests/test_requirements.py",
            "--ignore=tests/test_markers.py",
            "--ignore=tests/test_specifiers.py",
            "--ignore=tests/test_ranges.py",
        ),
        "reads the interpreter and ELF files for tags, runs the interpreter in subprocesses",
    ),
    Project("idna", "3.20", ("hypothesis",), ("tests",), "data-heavy, pure computation"),
    Project(
        "python-dateutil",
        "4.0.0",
        ("freezegun", "hypothesis", "pytest-cov", "attrs", "tzdata"),
        ("tests",),
        "time zones: /usr/share/zoneinfo, TZ, /etc/localtime; filterwarnings=error",
        {"DATEUTIL_MAY_CHANGE_TZ": "1"},
    ),
    Project(
        "toolz",
        "1.2.0",
        ("pycodestyle",),
        ("toolz",),
        "tests inside the package, doctest-like signature checks",
    ),
    Project(
        "click",
        "8.5.1",
        (),
        ("tests",),
        "terminals, subprocesses, temporary files, filterwarnings=error",
    ),
    Project(
        "jinja2",
        "3.1.6",
        ("trio",),
        ("tests",),
        "template loaders reading the tree, async, filterwarnings=error",
    ),
    Project("markupsafe", "3.0.4", (), ("tests",), "a C extension, filterwarnings=error"),
    Project(
        "pluggy",
        "1.7.0",
        ("pytest-benchmark",),
        ("testing",),
        "pytest plugin machinery, pytest-benchmark",
    ),
    Project("iniconfig", "2.3.1", (), ("testing",), "tmp_path files"),
    Project("six", "1.17.0", (), ("test_six.py",), "one module at the root of the tree"),
    Project(
        "wcwidth",
        "0.9.4",
        ("pytest-cov", "pytest-codspeed"),
        ("tests", "wcwidth"),
        "pytest-cov from its addopts (coverage data in the working directory), doctests",
    ),
    Project(
        "docutils",
        "0.23",
        ("pygments",),
        ("test",),
        "functional tests write their output files into the test tree",
    ),
    # test_legacy.py calls warnings.simplefilter("error") when imported, which
    # turns a later collection warning into an error: it is collected last.
    Project(
        "markdown",
        "3.11.3",
        ("pyyaml",),
        (
            "tests/test_syntax",
            "tests/test_apis.py",
            "tests/test_extensions.py",
            "tests/test_meta.py",
            "tests/test_legacy.py",
        ),
        "unittest-style suites reading test files from the tree",
    ),
    Project("ptyprocess", "0.7.0", (), ("tests",), "pseudo-terminals (/dev/pts), fork, exec"),
    Project(
        "requests",
        "2.34.2",
        ("pytest-httpbin==2.1.0", "httpbin~=0.10.0", "pytest-mock", "trustme", "PySocks"),
        ("tests",),
        "a local HTTP server in a thread of pytest's process (pytest-httpbin), TLS",
    ),
)


# --------------------------------------------------------------------------- preparing


def _run(
    cmd: Sequence[str],
    *,
    cwd: str | None = None,
    log: str | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """Run a setup command; on failure show its tail and stop."""
    proc = subprocess.run(
        list(cmd),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n")
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-25:])
        raise SystemExit(f"command failed with status {proc.returncode}: {' '.join(cmd)}\n{tail}")


@dataclass(frozen=True)
class Engine:
    """The pytest-isolate-linux under test: a snapshot of a commit, or the
    working tree itself (editable: it changes while other work goes on)."""

    path: str
    label: str
    editable: bool


def prepare_engine(base: str, which: str) -> Engine:
    """``which`` is "head" (a ``git archive`` of HEAD, so a run measures one
    commit even while the repository changes), "worktree" (editable), or the
    path of another source tree (a patched copy: installed as it is now)."""
    if which not in ("head", "worktree"):
        path = os.path.abspath(which)
        if not os.path.isfile(os.path.join(path, "pyproject.toml")):
            raise SystemExit(
                f"--engine={which}: not a source tree of pytest-isolate-linux "
                f"(no pyproject.toml); use head, worktree or such a directory"
            )
        stamp = max(
            os.stat(os.path.join(top, name)).st_mtime
            for top, _, names in os.walk(os.path.join(path, "pytest_isolate"))
            for name in names
            if name.endswith(".py")
        )
        return Engine(path, f"tree {path} @{stamp:.0f}", False)
    sha = subprocess.run(
        ["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if which == "worktree":
        dirty = subprocess.run(
            ["git", "-C", REPO, "status", "--porcelain", "pytest_isolate"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return Engine(REPO, f"worktree {sha[:12]}{'+changes' if dirty else ''}", True)
    path = os.path.join(base, "_engine", sha[:12])
    if not os.path.isdir(path):
        os.makedirs(path + ".part", exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", REPO, "archive", "HEAD"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "x", "-C", path + ".part"], input=archive, check=True)
        os.rename(path + ".part", path)
    return Engine(path, f"commit {sha[:12]}", False)


def ensure_engine(vpython: str, engine: Engine, log: str) -> None:
    """Install ``engine`` into the venv unless it is there already."""
    marker = os.path.join(os.path.dirname(os.path.dirname(vpython)), "engine.txt")
    if os.path.exists(marker):
        with open(marker) as f:
            if f.read().strip() == engine.label and not engine.editable:
                return
    pip = [vpython, "-m", "pip", "--disable-pip-version-check", "-q", "install"]
    if engine.editable:
        # A plain install replaced by an editable one leaves its package
        # directory behind with what pip did not record (pytest's rewritten
        # bytecode): a namespace package there then shadows the editable
        # one's subpackages ("cannot import name ... (unknown location)").
        purelib = subprocess.run(
            [vpython, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        shutil.rmtree(os.path.join(purelib, "pytest_isolate"), ignore_errors=True)
        _run([*pip, "-e", engine.path], log=log)
    else:
        # A plain install copies the files: the snapshot directory may go.
        _run([*pip, "--force-reinstall", "--no-deps", engine.path], log=log)
        _run([*pip, engine.path], log=log)
    with open(marker, "w") as f:
        f.write(engine.label + "\n")


def prepare_project(
    project: Project, base: str, python: str, engine: Engine, *, reuse: bool
) -> tuple[str, str]:
    """Create venv and unpacked tree for ``project``; returns (python, tree).

    With ``reuse`` an existing, complete preparation is kept (marked by a
    stamp file naming the version and test requirements), so reruns only run
    the suites; the engine is reinstalled when it changed.
    """
    home = os.path.join(base, project.name)
    venv = os.path.join(home, "venv")
    vpython = os.path.join(venv, "bin", "python")
    stamp = os.path.join(home, "prepared")
    tree_file = os.path.join(home, "tree")
    wanted = f"{project.name}=={project.version} {' '.join(project.deps)}".strip()
    if reuse and os.path.exists(stamp):
        with open(stamp) as f:
            if f.read().strip() == wanted:
                ensure_engine(vpython, engine, os.path.join(home, "prepare.log"))
                with open(tree_file) as t:
                    return vpython, t.read().strip()
    shutil.rmtree(home, ignore_errors=True)
    os.makedirs(home)
    log = os.path.join(home, "prepare.log")
    print(f"[{project.name}] preparing {project.name}=={project.version} in {home}", flush=True)
    _run([python, "-m", "venv", venv], log=log)
    pip = [vpython, "-m", "pip", "--disable-pip-version-check", "-q"]
    download = os.path.join(home, "sdist")
    _run(
        [
            *pip,
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            download,
            f"{project.name}=={project.version}",
        ],
        log=log,
    )
    (archive,) = (os.path.join(download, n) for n in os.listdir(download))
    _extract(archive, os.path.join(home, "src"))
    (top,) = os.listdir(os.path.join(home, "src"))
    tree = os.path.join(home, "src", top)
    _run([*pip, "install", "-e", tree, PYTEST, *project.deps], log=log)
    ensure_engine(vpython, engine, log)
    with open(tree_file, "w") as f:
        f.write(tree)
    _snapshot_tree(tree, os.path.join(home, "tree.manifest"))
    with open(stamp, "w") as f:
        f.write(wanted + "\n")
    return vpython, tree


def _walk(root: str) -> set[str]:
    found: set[str] = set()
    for top, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            found.add(os.path.relpath(os.path.join(top, name), root))
    return found


def _snapshot_tree(tree: str, manifest: str) -> None:
    with open(manifest, "w") as f:
        f.write("\n".join(sorted(_walk(tree))) + "\n")


def reset_tree(tree: str, manifest: str) -> list[str]:
    """Remove everything a run added to the tree; returns what was added
    (directories collapsed: ``pkg/__pycache__/`` once, not each .pyc)."""
    with open(manifest) as f:
        known = set(f.read().split("\n")) - {""}
    added = sorted(_walk(tree) - known)
    tops: list[str] = []
    for rel in added:
        if any(rel.startswith(t.rstrip("/") + "/") for t in tops):
            continue
        path = os.path.join(tree, rel)
        tops.append(rel + "/" if os.path.isdir(path) and not os.path.islink(path) else rel)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    return tops


# --------------------------------------------------------------------------- running


@dataclass
class Outcome:
    """One test's result in one run."""

    status: str  # passed | failed | error | skipped | xfailed
    message: str  # the first line of the failure, error or skip reason
    text: str  # the full text pytest wrote for it (failures and errors)
    seconds: float


@dataclass
class RunResult:
    mode: str
    returncode: int
    wall: float
    outcomes: dict[str, Outcome]
    tree_writes: list[str]
    home_writes: list[str]
    log: str
    engine: str = ""

    def counts(self) -> Counter[str]:
        return Counter(o.status for o in self.outcomes.values())


def _extract(archive: str, dest: str) -> None:
    """Unpack an sdist with tarfile's "data" filter (no absolute paths, no
    way out of ``dest``, no devices). Pythons before 3.10.12 and 3.11.4 lack
    the filter (Debian 12's python3 is 3.11.2): there the same checks by
    hand, regular files and directories only."""
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
            return
        root = os.path.realpath(dest)
        members = []
        for member in tar.getmembers():
            target = os.path.realpath(os.path.join(dest, member.name))
            if not (member.isfile() or member.isdir()):
                continue
            if os.path.isabs(member.name) or os.path.commonpath([root, target]) != root:
                raise ValueError(f"{archive}: {member.name!r} would land outside {dest}")
            members.append(member)
        tar.extractall(dest, members=members)  # each member checked above


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


_SEVERITY = {"passed": 0, "skipped": 1, "xfailed": 1, "failed": 2, "error": 3}


def parse_junit(path: str) -> dict[str, Outcome]:
    """Per-test outcomes from pytest's junitxml; the worst of a test's
    phases wins (a failure in the call and an error in teardown: error)."""
    outcomes: dict[str, Outcome] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        key = f"{case.get('classname', '')}::{case.get('name', '')}"
        status, message, text = "passed", "", ""
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed" if child.tag == "failure" else "error"
                text = child.text or ""
                message = _first_line(child.get("message") or "") or _first_line(text)
            elif child.tag == "skipped":
                status = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
                message = _first_line(child.get("message") or "")
        new = Outcome(status, message, text, float(case.get("time") or 0))
        old = outcomes.get(key)
        if old is None or _SEVERITY[new.status] > _SEVERITY[old.status]:
            outcomes[key] = new
    return outcomes


def run_mode(
    project: Project, vpython: str, tree: str, home: str, mode: str, timeout: float, engine: Engine
) -> RunResult:
    """Run the suite once in ``mode`` from a reset tree with a fresh $HOME."""
    manifest = os.path.join(home, "tree.manifest")
    reset_tree(tree, manifest)
    fake_home = os.path.join(home, f"home-{mode}")
    shutil.rmtree(fake_home, ignore_errors=True)
    os.makedirs(fake_home)
    junit = os.path.join(home, f"{mode}.xml")
    log = os.path.join(home, f"{mode}.log")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(junit)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST_", "VIRTUAL_ENV", "PYTHON", "XDG_"))
    }
    env.update(
        HOME=fake_home, PATH=f"{os.path.dirname(vpython)}:{env.get('PATH', '')}", **project.env
    )
    cmd = [vpython, "-m", "pytest", *COMMON, *MODES[mode], f"--junitxml={junit}", *project.args]
    start = time.perf_counter()
    with open(log, "w") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(
            cmd, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # The session we started, and only it: pytest and whatever it spawned.
            os.killpg(proc.pid, signal.SIGKILL)
            returncode = proc.wait()
            out.write(f"\n*** killed after {timeout:.0f} s\n")
    wall = time.perf_counter() - start
    outcomes = parse_junit(junit) if os.path.exists(junit) else {}
    tree_writes = reset_tree(tree, manifest)
    # Two levels say enough (.cache/hypothesis, .config/foo) without listing files.
    home_writes = sorted({"/".join(p.split("/")[:2]) for p in _walk(fake_home)})
    run = RunResult(mode, returncode, wall, outcomes, tree_writes, home_writes, log, engine.label)
    save_mode(project, home, run)
    return run


def save_mode(project: Project, home: str, run: RunResult) -> None:
    """What --report-only needs besides the junitxml file."""
    with open(os.path.join(home, f"{run.mode}.json"), "w") as f:
        json.dump(
            {
                "project": f"{project.name}=={project.version}",
                "engine": run.engine,
                "returncode": run.returncode,
                "wall": run.wall,
                "tree_writes": run.tree_writes,
                "home_writes": run.home_writes,
            },
            f,
        )


def load_mode(project: Project, home: str, mode: str) -> RunResult | None:
    """A saved run of ``mode`` (for --report-only), or None if there is none."""
    meta_path = os.path.join(home, f"{mode}.json")
    junit = os.path.join(home, f"{mode}.xml")
    if not os.path.exists(meta_path):
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    if meta["project"] != f"{project.name}=={project.version}":
        return None
    outcomes = parse_junit(junit) if os.path.exists(junit) else {}
    return RunResult(
        mode,
        meta["returncode"],
        meta["wall"],
        outcomes,
        meta["tree_writes"],
        meta["home_writes"],
        os.path.join(home, f"{mode}.log"),
        meta.get("engine", "?"),
    )


# --------------------------------------------------------------------------- reporting


@dataclass
class ProjectResult:
    project: Project
    runs: dict[str, RunResult]

    def differences(self, mode: str) -> list[tuple[str, Outcome | None, Outcome | None]]:
        """Tests whose outcome in ``mode`` differs from plain (missing counts)."""
        plain = self.runs["plain"].outcomes
        other = self.runs[mode].outcomes
        diffs = []
        for key in sorted(set(plain) | set(other)):
            a, b = plain.get(key), other.get(key)
            if a is None or b is None or a.status != b.status:
                diffs.append((key, a, b))
        # Subtests (pytest 9) are not in the junitxml: their counts, from the
        # summary line, must match too.
        plain_subtests = subtest_counts(self.runs["plain"].log)
        other_subtests = subtest_counts(self.runs[mode].log)
        for kind in sorted(set(plain_subtests) | set(other_subtests)):
            a_n, b_n = plain_subtests.get(kind, 0), other_subtests.get(kind, 0)
            if a_n != b_n:
                diffs.append(
                    (
                        f"<subtests {kind}>",
                        Outcome(f"{a_n} {kind}", "", "", 0.0),
                        Outcome(f"{b_n} {kind}", "", "", 0.0),
                    )
                )
        return diffs


_SUBTESTS = re.compile(r"(\d+) subtests? (\w+)")


def subtest_counts(log: str) -> dict[str, int]:
    """The subtests pytest's last summary line counts, by outcome (``log``:
    the run's log file)."""
    try:
        with open(log, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return {}
    lines = [line for line in text.splitlines() if _SUBTESTS.search(line) and " in " in line]
    return {kind: int(n) for n, kind in _SUBTESTS.findall(lines[-1])} if lines else {}


def _status(o: Outcome | None) -> str:
    return "missing" if o is None else o.status


def _fmt_counts(run: RunResult) -> str:
    c = run.counts()
    bad = c["failed"] + c["error"]
    text = f"{c['passed']}/{bad}/{c['skipped'] + c['xfailed']}"
    if run.returncode not in (0, 1, 5):
        text += f" rc={run.returncode}"
    return text


def write_diffs(result: ProjectResult, path: str) -> None:
    """Every difference with the full text pytest gave, for reading causes."""
    with open(path, "w") as f:
        for mode in result.runs:
            if mode == "plain":
                continue
            for key, a, b in result.differences(mode):
                f.write(f"=== [{mode}] {key}: {_status(a)} -> {_status(b)}\n")
                if b is not None:
                    f.write((b.text or b.message) + "\n")
            f.write("\n")
        for mode, run in result.runs.items():
            f.write(f"--- [{mode}] written into the tree: {run.tree_writes}\n")
            f.write(f"--- [{mode}] written into $HOME: {run.home_writes}\n")


def _grouped(
    name: str, mode: str, diffs: list[tuple[str, Outcome | None, Outcome | None]]
) -> list[str]:
    """One line per (module, change, first line of the failure): thousands of
    parametrized cases failing for one reason read as one line."""
    groups: dict[tuple[str, str, str], list[tuple[str, str]]] = {}
    for key, a, b in diffs:
        module = key.split("::")[0]
        reason = (b.message if b is not None else "not reported")[:150]
        # Quoted values (paths, expected strings) differ between cases of one cause.
        shape = re.sub(r"'[^']*'|\"[^\"]*\"|\d+", "_", reason)
        groups.setdefault((module, f"{_status(a)} -> {_status(b)}", shape), []).append(
            (key, reason)
        )
    lines = []
    for (module, change, _), cases in groups.items():
        key, reason = cases[0]
        what = f"`{key}`" if len(cases) == 1 else f"{len(cases)} tests in `{module}`, e.g. `{key}`"
        lines.append(f"- {name} [{mode}] {what}: {change}: {reason}")
    return lines


def _brief(paths: Sequence[str]) -> str:
    """Bytecode caches counted, files of one directory counted, the rest named."""
    caches = sum(1 for p in paths if p.rstrip("/").endswith("__pycache__"))
    by_dir: dict[str, list[str]] = {}
    for path in paths:
        if not path.rstrip("/").endswith("__pycache__"):
            by_dir.setdefault(os.path.dirname(path.rstrip("/")), []).append(path)
    parts = [f"{caches} __pycache__/"] if caches else []
    for folder, names in by_dir.items():
        if len(names) == 1 or not folder:
            parts.extend(names)
        else:
            parts.append(f"{folder}/ ({len(names)} files)")
    return ", ".join(parts) or "nothing"


def summarize(results: Iterable[ProjectResult], modes: Sequence[str]) -> str:
    """The markdown table and, below it, each difference on a line."""
    results = list(results)
    iso_modes = [m for m in modes if m != "plain"]
    head = ["project", "tests", "plain pass/fail/skip"]
    head += [f"{m} differs" for m in iso_modes]
    head += ["time " + "/".join(modes) + " (s)"]
    head += [f"{m} ms/test over plain" for m in iso_modes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    details: list[str] = []
    for r in results:
        plain = r.runs["plain"]
        n = len(plain.outcomes)
        row = [f"{r.project.name} {r.project.version}", str(n), _fmt_counts(plain)]
        for m in iso_modes:
            diffs = r.differences(m)
            row.append(
                str(len(diffs))
                + ("" if r.runs[m].returncode in (0, 1, 5) else f" (rc={r.runs[m].returncode})")
            )
            details.extend(_grouped(r.project.name, m, diffs))
        row.append(" / ".join(f"{r.runs[m].wall:.1f}" for m in modes))
        for m in iso_modes:
            if n < 10 or plain.returncode not in (0, 1):
                row.append("n/a")
                continue
            extra = (r.runs[m].wall - plain.wall) * 1000 / n
            row.append(f"{extra:.0f}")
        lines.append("| " + " | ".join(row) + " |")
    total = sum(len(r.runs["plain"].outcomes) for r in results)
    engines = sorted({run.engine for r in results for m, run in r.runs.items() if m != "plain"})
    summary = [
        f"\n{total} tests in {len(results)} projects; pytest-isolate-linux: {', '.join(engines)}."
    ]
    for m in iso_modes:
        count = sum(len(r.differences(m)) for r in results)
        summary.append(f"{m}: {count} tests differ from plain.")
    writes = [
        f"- {r.project.name}: tree: {_brief(r.runs['plain'].tree_writes)}; "
        f"$HOME: {_brief(r.runs['plain'].home_writes)}"
        for r in results
    ]
    out = "\n".join(lines) + "\n" + "\n".join(summary) + "\n"
    out += (
        "\nWhat the plain runs left in the project tree and $HOME (writes there meet a "
        "read-only root when a test, not pytest's process, makes them):\n"
    )
    out += "\n".join(writes) + "\n"
    if details:
        out += "\nDifferences:\n" + "\n".join(details) + "\n"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("projects", nargs="*", help="project names (default: all)")
    parser.add_argument("--work-dir", default=WORK, help=f"default {WORK}")
    parser.add_argument(
        "--python",
        default=DEV_PYTHON,
        help="interpreter for the venvs (needs libcap-dev for python-prctl)",
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated, among " + ", ".join(MODES)
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every mode (interleaved); times are medians",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="rebuild venvs and trees even if a complete one exists"
    )
    parser.add_argument("--markdown", help="also write the report to this file")
    parser.add_argument(
        "--engine",
        default="head",
        help="pytest-isolate-linux to test: 'head' (a snapshot of the "
        "repository's HEAD, the default), 'worktree' (editable), or the "
        "path of another source tree, e.g. a patched copy",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: build the report from the runs saved in the work dir",
    )
    parser.add_argument("--list", action="store_true", help="list the projects and exit")
    args = parser.parse_args(argv)
    if args.list:
        for p in PROJECTS:
            print(f"{p.name}=={p.version:10} deps: {', '.join(p.deps) or '-':40} {p.why}")
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or "plain" not in modes:
        parser.error(
            f"--modes={args.modes}: modes are {', '.join(MODES)} and must "
            f"include plain (the reference)"
        )
    by_name = {p.name: p for p in PROJECTS}
    missing = [n for n in args.projects if n not in by_name]
    if missing:
        parser.error(f"unknown project(s) {', '.join(missing)}; --list shows them")
    chosen = [by_name[n] for n in args.projects] or list(PROJECTS)
    results: list[ProjectResult] = []
    engine = prepare_engine(args.work_dir, args.engine)
    if not args.report_only:
        print(f"pytest-isolate-linux under test: {engine.label} ({engine.path})", flush=True)
    for project in chosen:
        home = os.path.join(args.work_dir, project.name)
        runs: dict[str, RunResult] = {}
        if args.report_only:
            saved = {m: load_mode(project, home, m) for m in modes}
            if any(run is None for run in saved.values()):
                print(f"[{project.name}] no saved run of every mode: left out", flush=True)
                continue
            results.append(ProjectResult(project, {m: r for m, r in saved.items() if r}))
            continue
        vpython, tree = prepare_project(
            project, args.work_dir, args.python, engine, reuse=not args.fresh
        )
        walls: dict[str, list[float]] = {m: [] for m in modes}
        flaky: set[str] = set()
        # Rounds interleave the modes, so that load from other work on the
        # machine spreads over all of them alike; the median wall time counts.
        for _ in range(args.repeat):
            for mode in modes:
                run = run_mode(project, vpython, tree, home, mode, args.timeout, engine)
                walls[mode].append(run.wall)
                previous = runs.get(mode)
                if previous is not None:
                    flaky.update(
                        k
                        for k, o in run.outcomes.items()
                        if k in previous.outcomes and previous.outcomes[k].status != o.status
                    )
                runs[mode] = run
                print(
                    f"[{project.name}] {mode:9} {run.wall:7.1f} s  rc={run.returncode}  "
                    f"{dict(run.counts())}",
                    flush=True,
                )
        for mode, run in runs.items():
            run.wall = statistics.median(walls[mode])
            save_mode(project, home, run)
        if flaky:
            print(
                f"[{project.name}] outcome changed between rounds (flaky): "
                f"{', '.join(sorted(flaky)[:10])}",
                flush=True,
            )
        result = ProjectResult(project, runs)
        write_diffs(result, os.path.join(home, "diffs.txt"))
        results.append(result)
    report = summarize(results, modes)
    print()
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
