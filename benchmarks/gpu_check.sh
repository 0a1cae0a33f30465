#!/usr/bin/env bash
# The GPU check (tests + throughput benchmark), from anywhere, on a machine with CUDA and no network.
#   benchmarks/gpu_check.sh [--size-gb 4] [--runs 3] [--skip-tests]
# Results: $OUT/gpu_check.json (+ .md) when OUT is set, else benchmarks/results/gpu_check.json.
# Python: $PYTHON, else the first of .venv/bin/python and python3 whose torch sees CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
has_cuda() { "$1" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; }
py=${PYTHON:-}
for candidate in .venv/bin/python python3; do
  if [ -z "$py" ] && command -v "$candidate" >/dev/null && has_cuda "$candidate"; then py=$candidate; fi
done
py=${py:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}  # reports "no CUDA" itself
out_dir=${OUT:-benchmarks/results}
mkdir -p "$out_dir"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 470 "$py" benchmarks/gpu_check.py --out "$out_dir/gpu_check.json" "$@"
