#!/usr/bin/env bash
# A short training run through the whole cluster: 1 epoch, onebit with error
# feedback both ways; passes when test accuracy reaches 80% and every
# worker ends with the same model.
set -euo pipefail
bin="$1"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
OPENBLAS_NUM_THREADS=1 "$bin" --epochs 1 --json "$out/summary.json" >"$out/log" 2>&1 || { cat "$out/log"; exit 1; }
cat "$out/log"
python3 - "$out/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
assert s["models_identical"], "worker models differ"
assert s["test_accuracy"] >= 0.80, f"test accuracy {s['test_accuracy']} < 0.80"
assert s["bytes_sent"] * 20 <= s["dense_bytes"], "onebit moved fewer than 20x fewer bytes than dense"
print(f"ok: accuracy {s['test_accuracy']:.4f}, {s['dense_bytes']/s['bytes_sent']:.1f}x fewer bytes")
PY
