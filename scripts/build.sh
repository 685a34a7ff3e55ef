#!/usr/bin/env bash
# Installs what is missing, then configures and builds zipwire (CMake,
# Ninja, Release) incrementally into build/. Extra arguments go to CMake.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/install-deps.sh
werror=OFF
if [ "${CI:-}" = "true" ] || [ "${ZIPWIRE_WERROR:-0}" = "1" ]; then werror=ON; fi
if [ ! -f build/build.ninja ]; then
  cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DZIPWIRE_WERROR="$werror" "$@" >/dev/null
else
  cmake -S . -B build -DZIPWIRE_WERROR="$werror" "$@" >/dev/null
fi
ninja -C build -j"$(nproc)"
