#!/usr/bin/env bash
# The test command: sets up a fresh machine (packages), builds, and runs
# every GoogleTest suite through ctest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/build.sh
# Keep UCX (later backends) on loopback; one BLAS thread per process.
export UCX_NET_DEVICES=lo OPENBLAS_NUM_THREADS=1
cd build
ctest --output-on-failure --timeout 600 -j1 "$@"
# ASan+UBSan codec/core tests and a 60 s fuzz smoke run (a few minutes in
# all); ZIPWIRE_CI_EXTRA=0 skips them.
if [ "${ZIPWIRE_CI_EXTRA:-1}" != "0" ]; then
  cd "$root"
  scripts/sanitize.sh
  fuzz/run.sh 60
fi
