#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the codec and core
# tests: configures build-asan/ (the default compiler, gcc on Debian), builds
# zipwire_kernels_test and zipwire_core_test only, and runs them. The codecs
# decode untrusted network bytes with hand-written bounds checks and SIMD
# tails, which is exactly what the sanitizers check and a Release build hides.
#
#   scripts/sanitize.sh [GTEST ARGS...]     e.g. --gtest_filter='Onebit*'
#
# Any sanitizer report is fatal (-fno-sanitize-recover=undefined, ASan aborts),
# so the script fails on the first one. ZIPWIRE_SANITIZE_JOBS sets the build
# parallelism (default nproc).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bdir=build-asan
san="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
if [ ! -f "$bdir/build.ninja" ]; then
  # -O2 -g without NDEBUG: optimised like the real build (vectorised loops,
  # inlined tails) but with asserts on and symbolized reports.
  cmake -S . -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 -g" \
    -DCMAKE_CXX_FLAGS="$san" -DCMAKE_C_FLAGS="$san" -DCMAKE_EXE_LINKER_FLAGS="$san" >/dev/null
else
  cmake -S . -B "$bdir" >/dev/null
fi
ninja -C "$bdir" -j"${ZIPWIRE_SANITIZE_JOBS:-$(nproc)}" zipwire_kernels_test zipwire_core_test

export ASAN_OPTIONS="${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1:strict_string_checks=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
for t in zipwire_core_test zipwire_kernels_test; do
  echo "sanitize.sh: $t (ASan + UBSan)"
  "$bdir/bin/$t" --gtest_brief=1 "$@"
done
echo "sanitize.sh: clean"
