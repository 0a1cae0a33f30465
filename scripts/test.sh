#!/usr/bin/env bash
# Install what the tests need, then run the whole suite. The servers the tests use
# (HTTP Range server, moto's S3 server) are started by pytest fixtures on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# Three workers (pytest-xdist; FASTLOAD_TEST_WORKERS=0 runs in one process): most tests wait on their
# servers, so on our 2-core machines three processes take the suite from about 11 to about 6 minutes.
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${FASTLOAD_TEST_WORKERS:-3}" "$@"
