#!/usr/bin/env bash
# One large tensor split across threads, as the worker pipeline does it
# (ZIPWIRE_PARTITION_BYTES partitions, each its own chunk, on
# ZIPWIRE_WORKER_THREADS compute threads): runs
#
#   build/bin/zipwire_codec_bench --size 67108864 --split 4194304 --threads 1 --json split1.json
#   build/bin/zipwire_codec_bench --size 67108864 --split 4194304 --threads N --json splitN.json
#
# alternately RUNS times (default 3) and prints, per codec and op, the median
# GB/s of the whole 64 MiB tensor with 1 and with N threads and the speed-up.
# memcpy is split and timed the same way in each run (its row shows how far
# the memory system itself scales). N defaults to the number of CPUs.
#
# Usage: perf/codec_split_bench.sh [N]   (env: RUNS, SIZE, SPLIT, CODECS='a;b')
# Exit status: 0 when every run completed, 1 otherwise. Speed-ups are
# meaningful on a quiet machine only.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bench=build/bin/zipwire_codec_bench
[ -x "$bench" ] || { echo "codec_split_bench.sh: $bench not built (needs libbenchmark-dev)" >&2; exit 1; }
threads=${1:-$(nproc)}
runs=${RUNS:-3}
size=${SIZE:-67108864}
split=${SPLIT:-4194304}
extra=()
[ -n "${CODECS:-}" ] && extra=(--codecs "$CODECS")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for r in $(seq 1 "$runs"); do
  for t in 1 "$threads"; do
    "$bench" --size "$size" --split "$split" --threads "$t" --min-time 0.5 "${extra[@]}" \
      --json "$tmp/t$t.r$r.json" >/dev/null
  done
done
python3 - "$tmp" "$threads" "$runs" "$size" "$split" <<'PY'
import json, statistics, sys
d, n, runs, size, split = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def load(t):
    out = {}
    for r in range(1, runs + 1):
        j = json.load(open(f"{d}/t{t}.r{r}.json"))
        out.setdefault(("memcpy", ""), []).append(j["memcpy_GBps"])
        for row in j["results"]:
            out.setdefault((row["codec"], row["op"]), []).append(row["GBps"])
    return {k: statistics.median(v) for k, v in out.items()}
one, many = load(1), load(n)
print(f"one tensor of {size} bytes in partitions of {split} bytes, medians of {runs} runs: 1 thread vs {n} threads")
print(f"{'codec':<28} {'op':<22} {'1 thr GB/s':>10} {f'{n} thr GB/s':>11} {'speed-up':>9}")
for k in one:
    if k in many:
        print(f"{k[0]:<28} {k[1]:<22} {one[k]:>10.3f} {many[k]:>11.3f} {many[k] / one[k]:>8.2f}x")
PY
