"""Helpers shared by the isolation property tests.

Two kinds:

* Host observation, for the outer side of a functional test: which mounts and
  processes exist on the host before and after an isolated run
  (``host_mounts``, ``processes_mentioning``), and ``run_isolated``, which runs
  an inner pytest with ``--isolate`` and asserts that it left no mount and no
  process behind.
* The rootless path: ``run_as_user`` runs test files of this checkout in a
  nested pytest as an unprivileged user (``isotest``), from a virtualenv of
  Debian's /usr/bin/python3 (the pyenv interpreters live under /root, mode
  700, out of the user's reach). The checkout is copied to a directory the user
  can read and installed there with ``pip install --target`` (a dist-info with
  the pytest11 entry point, so ``--isolate`` exists in every nested pytest),
  never into the shared virtualenv: two runs from different checkouts do not
  step on each other.

Usable from CI without pytest's help, as root::

    python tests/rootless_util.py tests/test_namespaces.py tests/test_rootfs.py -q

exits with the nested pytest's status.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

__all__ = [
    "REPO",
    "USER",
    "VENV",
    "BugSymptom",
    "ensure_user",
    "ensure_user_venv",
    "host_mounts",
    "processes_mentioning",
    "raise_on_bug_symptoms",
    "run_as_user",
    "run_isolated",
    "stage_checkout",
    "write_hostinfo",
]

#: The checkout these tests belong to.
REPO = Path(__file__).resolve().parent.parent
#: The unprivileged user the rootless path runs as.
USER = "isotest"
#: A virtualenv of Debian's python3, readable by every user.
VENV = Path("/opt/pytest-isolate-user-venv")
#: What the nested run needs besides the checkout itself (setuptools and wheel
#: build the checkout without build isolation, i.e. without a download per run).
VENV_PACKAGES = ("pytest", "pytest-xdist", "filelock", "python-prctl", "setuptools>=68", "wheel")
#: Never copied into the user's staging directory.
_COPY_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".tox",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "build",
    "dist",
    "*.egg-info",
    "site",
    "out",
)


# --------------------------------------------------------------------------- host observation


def host_mounts(*prefixes: str) -> set[str]:
    """Mount points of this process's mount namespace at or below ``prefixes``."""
    found = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, with spaces and tabs octal-escaped.
            point = line.split()[4].encode().decode("unicode_escape")
            if any(point == p or point.startswith(p.rstrip("/") + "/") for p in prefixes):
                found.add(point)
    return found


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Host processes whose command line contains ``text`` (zombies have none)."""
    found = []
    needle = text.encode()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue  # gone meanwhile
        if needle in cmdline:
            found.append((int(name), cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found


def run_isolated(pytester: pytest.Pytester, *args: str, timeout: float = 120) -> pytest.RunResult:
    """``pytest --isolate`` in a subprocess, then check the host it ran on: no
    mount it made is left under the inner project, the checkout or a staging
    directory, and no process of it is still alive (every sandbox's command
    line names the inner run's --basetemp, which lies in the inner project)."""
    watched = (str(pytester.path), str(REPO))
    before = host_mounts(*watched) | _staging_mounts()
    result = pytester.runpytest_subprocess(
        "--isolate", "-p", "no:cacheprovider", *args, timeout=timeout
    )
    after = host_mounts(*watched) | _staging_mounts()
    assert after <= before, f"mounts left on the host: {sorted(after - before)}"
    left = processes_mentioning(str(pytester.path))
    assert not left, f"processes of the inner run still alive on the host: {left}"
    return result


class BugSymptom(AssertionError):
    """The symptom of a known bug, seen for sure. Tests marked
    ``xfail(strict=True, raises=BugSymptom)`` fail outright on anything else
    (a broken harness must not pass for the bug)."""


def raise_on_bug_symptoms(
    result: pytest.RunResult, marker: str = "BUG-SYMPTOM:", *, expected_failures: int = 0
) -> None:
    """Raise BugSymptom when inner tests detected a known bug: their failing
    assertion's message carries ``marker``. Every other inner failure (beyond
    ``expected_failures``) is the harness's and fails as a plain AssertionError."""
    outcomes = result.parseoutcomes()
    broken = outcomes.get("failed", 0) + outcomes.get("errors", 0) - expected_failures
    symptoms = [
        line
        for line in result.outlines
        if marker in line and not line.startswith(("FAILED ", "ERROR "))
    ]
    if symptoms:
        raise BugSymptom("\n".join(symptoms))
    assert broken <= 0, f"inner tests failed without the bug's symptom: {outcomes}"


def write_hostinfo(pytester: pytest.Pytester, **values: object) -> None:
    """Hand host facts to the inner tests: ``from hostinfo import NAME``."""
    pytester.makepyfile(hostinfo="\n".join(f"{k} = {v!r}" for k, v in values.items()))


def _staging_mounts() -> set[str]:
    base = tempfile.gettempdir().rstrip("/") + "/"
    return {m for m in host_mounts(base) if m.startswith(base + "pytest-isolate-")}


# --------------------------------------------------------------------------- the rootless path


def ensure_user(user: str = USER) -> pwd.struct_passwd:
    """The unprivileged test user, created (with a home) if missing. Root only."""
    try:
        return pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "-m", user], check=True, capture_output=True)
        return pwd.getpwnam(user)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # One builder at a time across xdist workers and concurrent sessions.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_user_venv(venv: Path = VENV) -> Path:
    """Build, once, a virtualenv of /usr/bin/python3 with VENV_PACKAGES; return
    its python. Root only (it lives in /opt, readable by everyone)."""
    ready = venv / ".pytest-isolate-ready"
    wanted = "\n".join(VENV_PACKAGES)
    if ready.exists() and ready.read_text() == wanted:
        # Built already: no lock either (in the cgroup-v2 VM, /opt is the
        # host's, read-only, and the host's run built it).
        return venv / "bin" / "python"
    with _locked(venv.with_name(venv.name + ".lock")):
        if ready.exists() and ready.read_text() == wanted:
            return venv / "bin" / "python"
        subprocess.run(
            ["/usr/bin/python3", "-m", "venv", str(venv)], check=True, capture_output=True
        )
        pip = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", *VENV_PACKAGES],
            check=False,
            capture_output=True,
            text=True,
        )
        if pip.returncode:
            raise RuntimeError(
                f"pip install {' '.join(VENV_PACKAGES)} into {venv} failed "
                f"(status {pip.returncode}):\n{pip.stderr[-3000:]}"
            )
        ready.write_text(wanted)
    return venv / "bin" / "python"


def stage_checkout(
    dest: Path, *, checkout: Path = REPO, venv: Path = VENV, user: str = USER
) -> tuple[Path, Path]:
    """Copy ``checkout`` to ``dest/src`` and install it into ``dest/site``
    (``pip install --target``), both owned by ``user``; return (src, site)."""
    src, site = dest / "src", dest / "site"
    shutil.copytree(checkout, src, ignore=_COPY_IGNORE, symlinks=True)
    pip = subprocess.run(
        [
            str(venv / "bin" / "pip"),
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(src),
        ],
        check=False,
        capture_output=True,
        text=True,
        env={**_clean_env(), "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    if pip.returncode:
        raise RuntimeError(
            f"pip install --target {site} {src} failed (status "
            f"{pip.returncode}):\n{pip.stderr[-3000:]}"
        )
    # pip leaves its build products in the source copy: not part of the checkout.
    for leftover in (src / "build", *src.glob("*.egg-info")):
        shutil.rmtree(leftover, ignore_errors=True)
    entry = pwd.getpwnam(user)
    for top, dirs, files in os.walk(dest):
        for name in (top, *(os.path.join(top, n) for n in dirs + files)):
            os.lchown(name, entry.pw_uid, entry.pw_gid)
    return src, site


def _clean_env() -> dict[str, str]:
    # Nothing of the outer pytest (PYTEST_XDIST_WORKER, PYTEST_CURRENT_TEST,
    # PYTEST_ADDOPTS, COV_*) may leak into the nested one.
    keep = ("PATH", "LANG", "LC_ALL", "TERM", "TZ")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.setdefault("LANG", "C.UTF-8")
    return env


def run_as_user(
    test_files: Sequence[str],
    *pytest_args: str,
    checkout: Path = REPO,
    user: str = USER,
    venv: Path = VENV,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run ``test_files`` (paths relative to the checkout) in a nested pytest as
    ``user`` from a fresh copy of ``checkout``; return the finished process
    (stdout and stderr as text). Root only. The copy is removed afterwards."""
    if os.geteuid() != 0:
        raise RuntimeError("run_as_user needs root (it creates a user and runs runuser)")
    entry = ensure_user(user)
    python = ensure_user_venv(venv)
    dest = Path(tempfile.mkdtemp(prefix="pytest-isolate-rootless-"))
    try:
        os.chmod(dest, 0o755)
        src, site = stage_checkout(dest, checkout=checkout, venv=venv, user=user)
        env = {
            **_clean_env(),
            "PYTHONPATH": str(site),
            "PYTHONDONTWRITEBYTECODE": "1",
            "HOME": entry.pw_dir,
        }
        return subprocess.run(
            [
                "runuser",
                "-u",
                user,
                "--",
                str(python),
                "-m",
                "pytest",
                "-p",
                "no:cacheprovider",
                *test_files,
                *pytest_args,
            ],
            check=False,
            cwd=src,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def main(argv: Sequence[str]) -> int:
    """CI entry: ``python tests/rootless_util.py TEST_FILE... [PYTEST_ARGS...]``."""
    done = run_as_user(list(argv))
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    return done.returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
