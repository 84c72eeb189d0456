"""The rootless path passes the same isolation tests, run as an unprivileged
user: a nested pytest of tests/test_namespaces.py, test_rootfs.py and
test_hostile.py as ``isotest`` (see rootless_util.run_as_user). Root is needed
here only to create the user, its virtualenv and its copy of the checkout;
the nested run is entirely unprivileged, so the plugin takes its user
namespace path. What needs root on the host side skips there, by name.
"""

from __future__ import annotations

import re
import subprocess

import pytest
from conftest import requires
from rootless_util import USER, ensure_user, run_as_user

pytestmark = pytest.mark.isolated(False)

ISOLATION_TESTS = ("tests/test_namespaces.py", "tests/test_rootfs.py", "tests/test_hostile.py")
#: Skip reasons allowed in the nested run: root-only host set-up, host gaps.
ALLOWED_SKIPS = re.compile(r"needs root|this host has no ")


def _summary_counts(output: str) -> dict[str, int]:
    """'3 passed, 1 error in 2.0s' -> {'passed': 3, 'errors': 1} (as parseoutcomes)."""
    line = output.strip().splitlines()[-1]
    plural = {"error": "errors", "warning": "warnings"}
    return {plural.get(word, word): int(n) for n, word in re.findall(r"(\d+) (\w+)", line)}


@pytest.fixture(scope="module")
def user_can_unshare() -> None:
    ensure_user(USER)
    probe = subprocess.run(
        ["runuser", "-u", USER, "--", "unshare", "--user", "--map-current-user", "true"],
        check=False,
        capture_output=True,
        text=True,
    )
    if probe.returncode:
        pytest.skip(f"user {USER} cannot create a user namespace here: {probe.stderr.strip()}")


@requires("root")
def test_rootless_path_passes_the_isolation_tests(user_can_unshare: None) -> None:
    done = run_as_user(ISOLATION_TESTS, "-q", "-rsxX", "-p", "no:randomly")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-8000:]
    counts = _summary_counts(done.stdout)
    assert counts.get("passed", 0) >= 30, counts
    assert not counts.get("failed") and not counts.get("errors"), counts
    skips = re.findall(r"^SKIPPED \[\d+\] (.*)$", done.stdout, re.MULTILINE)
    assert skips, "expected the root-only host set-ups to skip"
    assert [s for s in skips if not ALLOWED_SKIPS.search(s)] == []
    # The header shows the nested run took the user namespace path.
    assert "isolate: root" not in done.stdout
