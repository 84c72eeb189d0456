#!/usr/bin/env bash
# tox.sh: run tox with every installed Python 3.10 to 3.13 reachable.
#
# tox finds interpreters as python3.10 ... python3.13 on PATH. pyenv's shims
# only answer for the versions pyenv has activated, so this puts the newest
# installed patch release of each minor version first on PATH. tox itself is
# installed into .venv on first use. Arguments go to tox, e.g.
#   scripts/tox.sh -e py310,py313
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
"$root/scripts/setup-dev.sh" >/dev/null
venv=${VENV:-$root/.venv}
"$venv/bin/python" -c 'import tox' 2>/dev/null \
  || "$venv/bin/python" -m pip install -q --disable-pip-version-check 'tox>=4.11'
if command -v pyenv >/dev/null; then
  pyroot=$(pyenv root)
  for minor in 3.10 3.11 3.12 3.13; do
    best=$(ls -d "$pyroot"/versions/"$minor".* 2>/dev/null | grep -E "/$minor\.[0-9]+$" | sort -V | tail -n1 || true)
    [ -n "$best" ] && PATH=$best/bin:$PATH
  done
  export PATH
fi
cd "$root"
exec "$venv/bin/python" -m tox "$@"
