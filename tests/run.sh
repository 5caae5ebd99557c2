#!/usr/bin/env bash
# The test command (README): installs what is needed, then runs the whole suite on the CPU,
# one pytest-xdist worker per core (TEST_WORKERS=N to choose; 0 runs in this process). The
# benchmarks run once each, as tests (--benchmark-disable). Extra arguments go to pytest,
# e.g. `bash tests/run.sh -k quanta`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install
exec "${PYTHON:-python3}" -m pytest tests benchmarks --benchmark-disable -q -p no:cacheprovider \
    -n "${TEST_WORKERS:-auto}" --durations=25 "$@"
