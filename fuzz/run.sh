#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan + UBSan) into build-fuzz/ and runs
# each for its share of a time budget, on a scratch copy of its committed seed
# corpus (fuzz/corpus/<target>/), after replaying its regression inputs
# (fuzz/regressions/<target>/*: past crashes, which must keep passing).
#
#   fuzz/run.sh [SECONDS_TOTAL]   default 60; each target gets
#                                 max(1, SECONDS_TOTAL / number of targets)
#   fuzz/run.sh --regen-corpus    rewrites fuzz/corpus/ from the generator
#                                 (fuzz/make_corpus.cc); commit the result
#
# Exits non-zero if any target crashes (or a regression input fails), naming
# the target and the reproducer; replay one with
#   build-fuzz/bin/<target> <reproducer>
# New inputs the fuzzers find stay in build-fuzz/fuzz-work/, never in the
# committed corpus. Environment: ZIPWIRE_FUZZ_JOBS (build parallelism, default
# nproc), ZIPWIRE_FUZZ_TARGETS (space-separated subset to run),
# ZIPWIRE_FUZZ_ARGS (extra libFuzzer flags, e.g. -jobs=4 or -max_len=4096).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

regen=0
total=60
case "${1:-}" in
  --regen-corpus) regen=1 ;;
  "") ;;
  *)
    if ! [[ "$1" =~ ^[0-9]+$ ]] || [ "$1" -eq 0 ]; then
      echo "usage: fuzz/run.sh [SECONDS_TOTAL] | --regen-corpus" >&2
      exit 2
    fi
    total="$1"
    ;;
esac

if ! command -v clang++ >/dev/null; then
  echo "fuzz/run.sh: clang++ not found (scripts/install-deps.sh installs clang and libclang-rt-14-dev)" >&2
  exit 1
fi

bdir=build-fuzz
if [ ! -f "$bdir/build.ninja" ]; then
  # -O1 -g without NDEBUG: asserts stay on and reports symbolize well, at a
  # speed libFuzzer is still happy with. Tests are not needed here.
  cmake -S . -B "$bdir" -G Ninja -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" \
    -DZIPWIRE_FUZZ=ON -DZIPWIRE_BUILD_TESTS=OFF >/dev/null
else
  cmake -S . -B "$bdir" >/dev/null
fi
ninja -C "$bdir" -j"${ZIPWIRE_FUZZ_JOBS:-$(nproc)}" zipwire_fuzzers

if [ "$regen" = 1 ]; then
  # ASan's leak check would flag the registry's intentional never-freed codecs.
  ASAN_OPTIONS=detect_leaks=0 "$bdir/bin/zipwire_fuzz_make_corpus" fuzz/corpus
  echo "fuzz/run.sh: corpus regenerated under fuzz/corpus/"
  exit 0
fi

read -r -a targets <<<"${ZIPWIRE_FUZZ_TARGETS:-$(tr '\n' ' ' <"$bdir/fuzz_targets.txt")}"
per=$((total / ${#targets[@]}))
if [ "$per" -lt 1 ]; then per=1; fi

work="$bdir/fuzz-work"
logs="$bdir/fuzz-logs"
artifacts="$bdir/fuzz-artifacts"
rm -rf "$work" "$logs"
mkdir -p "$work" "$logs" "$artifacts"
export ASAN_OPTIONS="${ASAN_OPTIONS:-abort_on_error=1:symbolize=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

failed=()
report() {  # target, log, what
  local reproducer
  reproducer="$(grep -o "Test unit written to .*" "$2" | tail -1 | sed 's/Test unit written to //' || true)"
  echo "fuzz/run.sh: CRASH in $1 ($3); log $2" >&2
  grep -E "ERROR: |runtime error:|contract violated|SUMMARY:" "$2" | head -5 >&2 || true
  if [ -n "$reproducer" ]; then
    echo "fuzz/run.sh:   reproducer: $reproducer  (replay: $bdir/bin/$1 $reproducer)" >&2
  fi
  failed+=("$1")
}

echo "fuzz/run.sh: ${#targets[@]} targets, ${per}s each"
for t in "${targets[@]}"; do
  bin="$bdir/bin/$t"
  if [ ! -x "$bin" ]; then
    echo "fuzz/run.sh: no fuzz target $t (see $bdir/fuzz_targets.txt)" >&2
    failed+=("$t")
    continue
  fi
  if [ -d "fuzz/regressions/$t" ] && [ -n "$(ls -A "fuzz/regressions/$t")" ]; then
    # Given files instead of directories, libFuzzer runs each once and exits.
    if ! "$bin" -runs=1 "fuzz/regressions/$t"/* >"$logs/$t.regressions.log" 2>&1; then
      report "$t" "$logs/$t.regressions.log" "regression input"
      continue
    fi
  fi
  mkdir -p "$work/$t"
  if [ -d "fuzz/corpus/$t" ]; then cp -r "fuzz/corpus/$t/." "$work/$t/"; fi
  # shellcheck disable=SC2086  # ZIPWIRE_FUZZ_ARGS is a list of flags
  if "$bin" -max_total_time="$per" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$artifacts/$t-" ${ZIPWIRE_FUZZ_ARGS:-} "$work/$t" >"$logs/$t.log" 2>&1; then
    echo "  ok   $t: $(grep -o 'stat::number_of_executed_units: *[0-9]*' "$logs/$t.log" | grep -o '[0-9]*$') runs," \
      "corpus $(ls "$work/$t" | wc -l)"
  else
    report "$t" "$logs/$t.log" "fuzzing"
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz/run.sh: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz/run.sh: all targets clean"
