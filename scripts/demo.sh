#!/usr/bin/env bash
# demo.sh: the main job in one command. Sets up (scripts/setup-dev.sh), then runs
# the demonstration suite in examples/ with every test isolated:
#
#   test_passes                 PASSED   (own hostname, no network, read-only /)
#   test_fails_with_assertion   FAILED   (pytest's normal assertion message)
#   test_exceeds_memory_limit   FAILED   (300 MB under memory="100M": OOM-killed)
#
# pytest itself exits 1 because two tests fail; that is the point of the demo.
# This script exits 0 when exactly those three outcomes happened, and 1
# (naming what differed) otherwise. Extra arguments go to pytest.
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
"$root/scripts/setup-dev.sh"
python=${VENV:-$root/.venv}/bin/python
cd "$root"

log=$(mktemp "${TMPDIR:-/tmp}/pytest-isolate-demo.XXXXXX")
trap 'rm -f -- "$log"' EXIT
echo
echo "\$ python -m pytest examples/ -v --isolate"
set +e
"$python" -m pytest -p no:cacheprovider examples/ -v --isolate "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

echo
problems=()
expect() {  # expect REGEX DESCRIPTION
  grep -Eq -- "$1" "$log" || problems+=("$2")
}
expect 'test_demo\.py::test_passes PASSED' "test_passes did not pass"
expect 'test_demo\.py::test_fails_with_assertion FAILED' "test_fails_with_assertion did not fail"
expect 'assert 42 == 43' "the assertion message (assert 42 == 43) is missing"
expect 'test_demo\.py::test_exceeds_memory_limit FAILED' "test_exceeds_memory_limit did not fail"
grep -A3 -E '_+ test_exceeds_memory_limit _+' "$log" | grep -Eqi 'memory limit|out of memory|OOM' \
  || problems+=("test_exceeds_memory_limit was not reported as killed for its memory limit")
expect '2 failed, 1 passed' "the summary is not '2 failed, 1 passed'"
[ "$status" = 1 ] || problems+=("pytest exited $status, expected 1 (tests failed)")

if [ ${#problems[@]} -eq 0 ]; then
  echo "demo: as expected: 1 passed, 1 failed on its assertion, 1 killed for breaking its memory limit"
  exit 0
fi
echo "demo: NOT as expected:"
printf '  - %s\n' "${problems[@]}"
if grep -q "no usable cgroup" "$log"; then
  # Rootless, a memory limit needs a cgroup v2 subtree delegated to the user.
  echo "demo: the memory limit needs a cgroup pytest may manage: run as root" \
       "(sudo $0), or on cgroup v2 in a delegated scope:" \
       "systemd-run --user --scope -p Delegate=yes $0"
fi
exit 1
