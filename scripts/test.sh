#!/usr/bin/env bash
# Install what the tests need, then run the whole suite. The servers the tests use
# (HTTP Range server, moto's S3 server) are started by pytest fixtures on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
