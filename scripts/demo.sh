#!/usr/bin/env bash
# Load a real checkpoint (all-MiniLM-L6-v2) through fastload from local disk, HTTP and S3
# servers on loopback, and print what was loaded, how fast, and where the time went.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
