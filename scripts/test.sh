#!/usr/bin/env bash
# test.sh: the project's tests, in one command. Sets up (scripts/setup-dev.sh),
# then runs, each under a clear header:
#
#   main          the test suite as the calling user (root in CI)
#   rootless      the suite again as the unprivileged user `isotest`, from a
#                 copy it can read, with Debian's /usr/bin/python3 in its own venv
#                 (/opt/pytest-isolate-ci-venv, /tmp/pytest-isolate-ci-rootless)
#                 (needs root to create the user; skipped otherwise)
#   vm-root       in a VM with only cgroup v2 (../shared/tools/cg2vm), as root
#   vm-rootless   same VM, as `isotest` in a delegated cgroup (systemd-style)
#                 (both VM parts need root and cg2vm beside the checkout)
#   py313         the engine's and the zygote's tests on Python 3.13, through tox
#                 (scripts/tox.sh: pyenv's newest 3.13)
#   lint          ruff check and ruff format --check
#   types         mypy --strict (configured in pyproject.toml)
#   docs          mkdocs build --strict: the documentation builds without a
#                 warning (into a temporary directory)
#
# The last line sums every part, e.g. "312 passed, 0 failed, 20 skipped"; the
# exit status is 0 only when every part passed. pytest's "no tests collected"
# (exit 5) counts as a pass with no tests.
#
# Usage: scripts/test.sh [PART...]        (default: every part)
#   env ISOLATE_TEST_WORKERS  pytest-xdist workers for the suite runs (default:
#                             the CPU count, at most 4; 0 runs without xdist)
#   env ISOLATE_VM_K          pytest -k expression for the VM runs (default: the
#                             cgroup-related tests; "" runs the whole suite)
#   env CG2VM                 path to cg2vm (default ../shared/tools/cg2vm)
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$root"
python=${VENV:-$root/.venv}/bin/python
cpus=$(nproc)
workers=${ISOLATE_TEST_WORKERS:-$(( cpus > 4 ? 4 : cpus ))}
xdist=(); [ "$workers" -gt 1 ] && xdist=(-n "$workers")
vm_k=${ISOLATE_VM_K-test_cgroups or test_limits or test_doctor or test_zygote or test_template or test_reuse or (test_engine and (memory or oom or peak or limit or cgroup))}
cg2vm=${CG2VM:-$root/../shared/tools/cg2vm}
user=isotest
# Not the paths tests/rootless_util.py uses: its venv must stay free of any
# installed copy of the package, and ours holds one.
user_venv=/opt/pytest-isolate-ci-venv
user_copy=/tmp/pytest-isolate-ci-rootless
# pytest as a part: warnings are errors (pyproject), no cache written into the tree.
pytest_args=(-p no:cacheprovider -ra)

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(main rootless vm-root vm-rootless py313 lint types docs)

start=$(date +%s)
passed=0 failed=0 skipped=0 errors=0 xfailed=0 xpassed=0
table=()
any_failed=0

header() { printf '\n%s\n== %s\n%s\n' "$(printf '=%.0s' {1..78})" "$*" "$(printf '=%.0s' {1..78})"; }
record() {  # record PART STATUS SECONDS DETAIL
  table+=("$(printf '  %-12s %-8s %5ss  %s' "$1" "$2" "$3" "$4")")
  [ "$2" = FAILED ] && any_failed=1
  return 0
}
count() {  # count LINE WORD -> the number before WORD in a pytest summary line
  { grep -oE "[0-9]+ $2" <<<"$1" || echo 0; } | head -n1 | cut -d' ' -f1
}

# run_pytest PART TIMEOUT CMD... : run one pytest invocation, tee its output,
# and add the counts of its summary line to the totals.
run_pytest() {
  local part=$1 limit=$2; shift 2
  local log t0 rc line p f s e xf xp
  log=$(mktemp "${TMPDIR:-/tmp}/pytest-isolate-$part.XXXXXX")
  t0=$(date +%s)
  set +e
  timeout --kill-after=30 "$limit" "$@" 2>&1 </dev/null | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  # The summary: the last line that names a count and a duration ("... in 12.34s").
  line=$(grep -E '[0-9]+ (passed|failed|errors?|skipped|xfailed|xpassed)|no tests ran' "$log" \
         | grep -E ' in [0-9.]+s' | tail -n1 || true)
  rm -f -- "$log"
  p=$(count "$line" passed); f=$(count "$line" failed); s=$(count "$line" skipped)
  e=$(count "$line" 'errors?'); xf=$(count "$line" xfailed); xp=$(count "$line" xpassed)
  local secs=$(( $(date +%s) - t0 )) status=ok detail
  detail=$(sed -E 's/^=+ //; s/ =+$//' <<<"${line:-no summary line}")
  case $rc in
    0) ;;
    5) detail="no tests collected (exit 5): $detail" ;;
    1) status=FAILED ;;
    124|137) status=FAILED; detail="timed out after ${limit}s: $detail"; [ "$f$e" = 00 ] && e=1 ;;
    *) status=FAILED; detail="exit $rc: $detail"; [ "$f$e" = 00 ] && e=1 ;;
  esac
  passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
  errors=$((errors + e)); xfailed=$((xfailed + xf)); xpassed=$((xpassed + xp))
  record "$part" "$status" "$secs" "$detail"
}

# run_check PART CMD... : a non-pytest check (lint, types); a failure counts as one failed.
run_check() {
  local part=$1 t0 rc; shift
  t0=$(date +%s)
  set +e; "$@" 2>&1 </dev/null; rc=$?; set -e
  if [ "$rc" = 0 ]; then
    record "$part" ok $(( $(date +%s) - t0 )) "$*"
  else
    failed=$((failed + 1))
    record "$part" FAILED $(( $(date +%s) - t0 )) "exit $rc: $*"
  fi
}

skip_part() { record "$1" skipped 0 "$2"; echo "skipped: $2"; }

# Make $user_copy a copy of this tree that `isotest` can read,
# and $user_venv a venv of Debian's python3 with the package.
# The pyenv interpreters live under /root (mode 700), out of the user's reach.
prepare_rootless() {
  id "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
  local sys_python=/usr/bin/python3
  [ -x "$sys_python" ] || { echo "no $sys_python for the unprivileged venv" >&2; return 1; }
  if ! "$user_venv/bin/python" -c 'import sys' 2>/dev/null; then
    rm -rf -- "$user_venv"
    "$sys_python" -m venv "$user_venv"
  fi
  rm -rf -- "$user_copy"
  mkdir -p "$user_copy"
  tar -C "$root" --exclude=./.git --exclude=./.venv --exclude=./.tox --exclude=./site \
      --exclude='*.egg-info' --exclude=__pycache__ --exclude=.mypy_cache --exclude=.ruff_cache \
      --exclude=.pytest_cache --exclude=./benchmarks/out -cf - . | tar -C "$user_copy" -xf -
  local log=$user_venv/pip-install.log
  if ! "$user_venv/bin/python" -m pip install --disable-pip-version-check -e "$user_copy[test]" \
       >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "pip install into $user_venv failed (log: $log)" >&2
    return 1
  fi
  chown -R "$user:" "$user_copy"
  chmod -R a+rX "$user_venv"
}

# The test user's command prefix: a clean, predictable environment. (An array,
# not a function: `timeout` can only run commands.)
user_env() {
  local home
  home=$(getent passwd "$user" | cut -d: -f6)
  as_user=(env -i HOME="$home" USER="$user" LOGNAME="$user" LANG=C.UTF-8
           PATH=/usr/local/bin:/usr/bin:/bin CI="${CI:-}")
}

"$root/scripts/setup-dev.sh"
is_root=0; [ "$(id -u)" -eq 0 ] && is_root=1

# What only the tests need: a static busybox (the image tests build a busybox
# root from it; they skip, naming it, without), unshare/runuser (util-linux).
missing=()
for pkg in busybox-static util-linux; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=(); [ "$is_root" = 1 ] || sudo=(sudo -n)
  echo "test.sh: installing ${missing[*]} with apt-get"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
    && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
       apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || echo "test.sh: could not install ${missing[*]}; the tests that need them skip"
fi
# The VM's packages and kernel first, so that the timings below are the tests'.
if [ "$is_root" = 1 ] && [ -f "$cg2vm" ] && [[ " ${parts[*]} " == *" vm-"* ]]; then
  bash "$(dirname -- "$cg2vm")/cg2vm-setup"
fi
rootless_ready=

for part in "${parts[@]}"; do
  case $part in
    main)
      header "main: the suite as $(id -un) (${workers} workers)"
      run_pytest main 900 "$python" -m pytest "${pytest_args[@]}" "${xdist[@]}" tests/
      ;;
    rootless)
      header "rootless: the suite as the unprivileged user '$user'"
      if [ "$is_root" = 0 ]; then
        skip_part rootless "needs root to create '$user' (the main part already ran rootless)"
        continue
      fi
      if prepare_rootless; then
        rootless_ready=1
        user_env
        cd "$user_copy"
        run_pytest rootless 900 runuser -u "$user" -- "${as_user[@]}" \
          "$user_venv/bin/python" -m pytest "${pytest_args[@]}" "${xdist[@]}" tests/
        cd "$root"
      else
        errors=$((errors + 1)); record rootless FAILED 0 "setting up the user's venv failed"
      fi
      ;;
    vm-root|vm-rootless)
      header "$part: cgroup v2 only, in a VM ($cg2vm)"
      if [ ! -f "$cg2vm" ]; then skip_part "$part" "no $cg2vm"; continue; fi
      if [ "$is_root" = 0 ]; then skip_part "$part" "cg2vm-setup needs root"; continue; fi
      k=(); [ -n "$vm_k" ] && k=(-k "$vm_k")
      # No xdist in the VM: its loopback is down, and pytest-rerunfailures'
      # xdist mode talks to the controller over 127.0.0.1 (rootless cannot bring
      # lo up); emulated CPUs also make worker start-up expensive.
      if [ "$part" = vm-root ]; then
        run_pytest vm-root 1500 bash "$cg2vm" --timeout 1200 -- \
          sh -c 'ip link set lo up 2>/dev/null; exec "$@"' sh \
          "$python" -m pytest "${pytest_args[@]}" --durations=5 "${k[@]}" tests/
      else
        if [ -z "$rootless_ready" ]; then
          prepare_rootless || { errors=$((errors + 1)); record vm-rootless FAILED 0 "setting up the user's venv failed"; continue; }
          rootless_ready=1
        fi
        # cg2vm shares the working directory; /tmp inside the VM is a fresh tmpfs,
        # so the copy is shared by being the working directory.
        user_env
        cd "$user_copy"
        run_pytest vm-rootless 1500 bash "$cg2vm" --timeout 1200 --user "$user" -- "${as_user[@]}" \
          "$user_venv/bin/python" -m pytest "${pytest_args[@]}" --durations=5 "${k[@]}" tests/
        cd "$root"
      fi
      ;;
    py313)
      # The newest Python: 3.12+ changed fork (a warning when a multi-threaded
      # process forks, which the suite treats as an error) and the
      # interpreter's at-fork hooks the zygote calls.
      header "py313: the engine's tests on Python 3.13 (tox)"
      run_pytest py313 900 "$root/scripts/tox.sh" -e py313 -- tests/test_engine.py tests/test_zygote.py tests/test_reuse.py
      ;;
    lint)
      header "lint: ruff check, ruff format --check"
      run_check lint bash -c '"$0" -m ruff check "$@" && "$0" -m ruff format --check "$@"' \
        "$python" pytest_isolate tests examples benchmarks
      ;;
    types)
      header "types: mypy --strict"
      run_check types "$python" -m mypy
      ;;
    docs)
      header "docs: mkdocs build --strict"
      site=$(mktemp -d)
      run_check docs "$python" -m mkdocs build --strict --site-dir "$site"
      rm -rf "$site"
      ;;
    *) echo "test.sh: unknown part '$part' (main rootless vm-root vm-rootless py313 lint types docs)" >&2; exit 2 ;;
  esac
done

header "summary"
printf '%s\n' "${table[@]}"
extra=
[ "$errors" -gt 0 ] && extra+=", $errors errors"
[ "$xfailed" -gt 0 ] && extra+=", $xfailed xfailed"
[ "$xpassed" -gt 0 ] && extra+=", $xpassed xpassed"
echo
echo "every part took $(( $(date +%s) - start ))s${extra:+ (also$extra)}"
# The closing line in the plain form CI reads: errors count as failures.
echo "all parts: $passed passed, $((failed + errors)) failed, $skipped skipped"
exit "$any_failed"
