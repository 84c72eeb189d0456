#!/usr/bin/env bash
# setup-dev.sh: make a fresh Debian/Ubuntu checkout ready to run pytest-isolate.
#
#   1. the system packages python-prctl needs to build (libcap-dev, gcc) and the
#      ones a venv and a C extension need (python3-venv, python3-dev), installed
#      with apt only when missing (through sudo when not root);
#   2. a virtualenv at .venv, made with `python3` from PATH (or $PYTHON), which
#      must be Python 3.10 or newer;
#   3. the package itself, editable, with its test and dev extras.
#
# Safe to run again: each step is skipped when already done (the install is
# redone when pyproject.toml changes, or with --force). Prints one line a step.
#
# Usage: scripts/setup-dev.sh [--force]
#   env PYTHON   interpreter for the venv     (default: python3)
#   env VENV     where to put the venv        (default: <checkout>/.venv)
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
venv=${VENV:-$root/.venv}
python=${PYTHON:-python3}
force=0
[ "${1:-}" = --force ] && force=1

say() { printf 'setup-dev: %s\n' "$*"; }
die() { printf 'setup-dev: error: %s\n' "$*" >&2; exit 1; }

# ---- 1. system packages ------------------------------------------------------------
# python-prctl has no wheel: pip compiles it against libcap's headers with gcc.
need=()
for pkg in libcap-dev gcc python3-venv python3-dev; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  command -v apt-get >/dev/null \
    || die "missing ${need[*]} and no apt-get here; install them with your package manager"
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "missing ${need[*]}; run as root or install sudo"
    sudo=(sudo)
  fi
  say "installing ${need[*]} with apt-get"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
  say "system packages present (libcap-dev gcc python3-venv python3-dev)"
fi

# ---- 2. the virtualenv ----------------------------------------------------------------
command -v "$python" >/dev/null || die "no '$python' on PATH; install Python 3.10+ or set PYTHON=/path/to/python3"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "$("$python" -V 2>&1) is too old: pytest-isolate needs Python 3.10 or newer; set PYTHON=python3.X"
want=$("$python" -c 'import sys; print(sys.version.split()[0])')
have=
[ -x "$venv/bin/python" ] && have=$("$venv/bin/python" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || true)
if [ -z "$have" ] || [ "$have" != "$want" ]; then
  [ -n "$have" ] && say "replacing $venv (Python $have, wanted $want)"
  rm -rf -- "$venv"
  "$python" -m venv "$venv" || die "could not create $venv with $python (Debian/Ubuntu: apt-get install python3-venv)"
  say "created $venv (Python $want)"
  force=1
else
  say "venv $venv present (Python $have)"
fi

# ---- 3. the package ------------------------------------------------------------------
# A stamp keyed on pyproject.toml and the compiled parts (setup.py, _pid1.c, _steps.c: the
# editable install builds it in place) skips the (slow-ish) pip run when nothing changed.
stamp=$venv/.pytest-isolate-installed
key=$(cat "$root/pyproject.toml" "$root/setup.py" "$root/pytest_isolate/_pid1.c" "$root/pytest_isolate/_steps.c" | sha256sum | cut -d' ' -f1):$root
if [ "$force" = 1 ] || [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$key" ] \
   || ! "$venv/bin/python" -c 'import pytest_isolate, xdist, mypy, ruff' 2>/dev/null; then
  say "installing pytest-isolate-linux (editable) with [test,dev] into $venv"
  # pip's and the build backend's chatter goes to a log, shown only on failure.
  log=$venv/pip-install.log
  if ! { "$venv/bin/python" -m pip install --disable-pip-version-check --upgrade pip \
         && "$venv/bin/python" -m pip install --disable-pip-version-check -e "$root[test,dev]"; } \
       >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    die "pip install failed (full log: $log); python-prctl needs gcc, libcap-dev and Python's headers"
  fi
  printf '%s\n' "$key" > "$stamp"
else
  say "pytest-isolate-linux already installed in $venv"
fi
say "ready: $venv/bin/python -m pytest"
