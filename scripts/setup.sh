#!/usr/bin/env bash
# Create .venv (if missing) and install fastload with its test extras, pinned by constraints.txt
# (torch stays the CPU wheel). Safe to run again: when pyproject.toml, constraints.txt and the Python are
# what the last successful install saw (a stamp in .venv records them), pip is not run at all; set
# FASTLOAD_SETUP_FORCE=1 to run it anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.fastload-setup
want=$( { cat pyproject.toml constraints.txt; .venv/bin/python -VV; } | sha256sum | cut -d' ' -f1)
if [ "${FASTLOAD_SETUP_FORCE:-0}" = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
rm -f "$stamp"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'
echo "$want" > "$stamp"
