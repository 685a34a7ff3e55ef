#!/usr/bin/env bash
# Reproduces the codec throughput acceptance run and checks its ratios:
#
#   build/bin/zipwire_codec_bench --size 67108864 --threads 1 --json codec_bench.json
#
# 64 MiB of fp32 standard-normal input, one thread; every figure is fp32 bytes
# per second as a ratio to memcpy of the same buffer in the same run (see the
# top of perf/codec_bench.cc). Criteria, one PASS/FAIL line each:
#   onebit compress_ef            >= 0.5x memcpy
#   onebit decompress_accumulate  >= 0.5x memcpy
#   topk_sampled:0.01 compress    >= 0.3x memcpy
#   topk:0.01 compress            >= 10x the nth_element baseline (GB/s / GB/s)
#   dithering:s=16 compress_ef    >= 0.3x memcpy
#   fp16, bf16 compress and decompress >= 0.5x memcpy
# A criterion whose codec is not registered in this build reports SKIP.
#
# Usage: perf/codec_bench.sh [--check-only JSON] [extra zipwire_codec_bench args]
#   --check-only JSON  only evaluate an existing result file.
# Exit status: 0 when every present criterion passes, 1 otherwise. Ratios are
# meaningful on a quiet machine only; on a shared one, repeat before judging.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

json=codec_bench.json
if [ "${1:-}" = "--check-only" ]; then
  json="${2:?--check-only needs a JSON file}"
else
  bench=build/bin/zipwire_codec_bench
  if [ ! -x "$bench" ]; then
    echo "codec_bench.sh: $bench not built (scripts/build.sh; needs libbenchmark-dev)" >&2
    exit 1
  fi
  "$bench" --size 67108864 --threads 1 --json "$json" "$@"
fi

python3 - "$json" <<'EOF'
import json
import sys

with open(sys.argv[1]) as f:
    d = json.load(f)
memcpy = d["memcpy_GBps"]
gbps = {(r["codec"], r["op"]): r["GBps"] for r in d["results"]}
print(f"\nacceptance ({d['size_bytes']} bytes, {d['threads']} thread(s), memcpy {memcpy:.3f} GB/s):")

failed = False


def check(label, value, reference, ref_name, need):
    global failed
    if value is None or reference is None:
        print(f"  SKIP  {label}: not in the results (codec not registered?)")
        return
    ratio = value / reference
    ok = ratio >= need
    failed |= not ok
    print(f"  {'PASS' if ok else 'FAIL'}  {label}: {value:.3f} GB/s = {ratio:.3f}x {ref_name} (need >= {need}x)")


def vs_memcpy(codec, op, need):
    check(f"{codec} {op}", gbps.get((codec, op)), memcpy, "memcpy", need)


vs_memcpy("onebit", "compress_ef", 0.5)
vs_memcpy("onebit", "decompress_accumulate", 0.5)
vs_memcpy("topk_sampled:0.01", "compress", 0.3)
check("topk:0.01 compress vs nth_element", gbps.get(("topk:0.01", "compress")),
      gbps.get(("nth_element", "topk_baseline")), "nth_element", 10)
vs_memcpy("dithering:s=16", "compress_ef", 0.3)
for codec in ("fp16", "bf16"):
    for op in ("compress", "decompress"):
        vs_memcpy(codec, op, 0.5)
sys.exit(1 if failed else 0)
EOF
