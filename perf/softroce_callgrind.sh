#!/usr/bin/env bash
# Instructions per message of the verbs backend's small-write path, counted
# by callgrind inside the soft-RoCE guest: a zipwire_perf write_lat server
# runs natively, its client under `valgrind --tool=callgrind`, and the
# inclusive instruction counts of the per-message functions are divided by
# the number of round trips (iterations + warm-up). Exact and repeatable
# where wall-clock figures in the guest are not; compare two builds with it.
#
# Usage: perf/softroce_callgrind.sh [BINARY] [ITERS]
#   BINARY  zipwire_perf (default build/bin/zipwire_perf), ITERS (default 1000)
# Leaves the profile in $CALLGRIND_DIR (default /tmp/zw-callgrind) for
# callgrind_annotate.
set -euo pipefail

if [[ ${1:-} == --in-guest ]]; then
  bin=$2 iters=$3 dir=$4
  export ZIPWIRE_IB_DEVICE=rxe0 ZIPWIRE_IB_GID_INDEX=1
  "$bin" -t verbs -p 21900 --test write_lat --timeout 120 >"$dir/server.out" 2>&1 &
  sleep 1
  valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" "$bin" -t verbs -p 21900 \
    --test write_lat -s 8 -n "$iters" --timeout 120 10.11.0.1 >"$dir/client.out" 2>&1
  wait
  exit 0
fi

bin=$(readlink -f "${1:-build/bin/zipwire_perf}")
iters=${2:-1000}
dir=${CALLGRIND_DIR:-/tmp/zw-callgrind}
[[ -x $bin ]] || { echo "softroce_callgrind: $bin is not an executable" >&2; exit 2; }
[[ $iters =~ ^[1-9][0-9]*$ ]] || { echo "softroce_callgrind: ITERS must be a positive integer" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "softroce_callgrind: needs valgrind" >&2; exit 2; }
mkdir -p "$dir"
rm -f "$dir/callgrind.out"
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
flock /tmp/zw-guest.lock env SOFTROCE_RW_DIR="$dir" "$root/tests/softroce/guest.sh" \
  bash "$(readlink -f "$0")" --in-guest "$bin" "$iters" "$dir" >/dev/null
[[ -s $dir/callgrind.out ]] || { echo "softroce_callgrind: no profile; see $dir/client.out" >&2; exit 1; }
# Round trips: the iterations plus zipwire_perf's warm-up (from its banner).
warm=$(sed -n 's/.*Warm-up: \([0-9]*\).*/\1/p' "$dir/client.out" | head -1)
trips=$((iters + ${warm:-0}))
echo "$bin: $trips round trips, instructions per message (inclusive), client side"
callgrind_annotate --inclusive=yes "$dir/callgrind.out" 2>/dev/null |
  awk -v n="$trips" '
    match($0, /VerbsBackend::(PostWrite|PostMboxWrite|PostChain|ProcessMboxRecord|ApplyAck|HandleWriteLocked|ProgressLocked|Poll)\(/) {
      f = substr($0, RSTART + 14, RLENGTH - 15)
      v = $1; gsub(",", "", v)
      if (!(f in seen)) { seen[f] = 1; printf "  %-20s %8.0f\n", f, v / n }
    }'
