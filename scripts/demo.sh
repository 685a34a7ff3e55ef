#!/usr/bin/env bash
# The demo: sets up a fresh machine, builds, and trains an MLP on
# Fashion-MNIST with 2 workers and 1 server over zipwire, onebit compression
# with error feedback in both directions. Arguments go to zipwire_train
# (see build/bin/zipwire_train --help), e.g. scripts/demo.sh --codec none
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/build.sh
export OPENBLAS_NUM_THREADS=1
exec build/bin/zipwire_train "$@"
