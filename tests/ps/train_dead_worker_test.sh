#!/usr/bin/env bash
# Kills one worker of a training cluster and checks that the launcher stops
# the job, fails, and names the process that died by the index the bootstrap
# gave it ("worker 1 (pid P) was killed by signal 9"), so a report never points
# at the wrong node.
set -euo pipefail
bin="$1"
out="$(mktemp -d)"
job=""
trap '[ -n "$job" ] && kill "$job" 2>/dev/null; rm -rf "$out"' EXIT
OPENBLAS_NUM_THREADS=1 "$bin" --epochs 3 >"$out/log" 2>&1 &
job=$!
victim=""
for _ in $(seq 1200); do  # up to 120 s for the first epoch to finish
  victim=$(pgrep -f -- "--role worker --index 1 " | head -1 || true)
  if [ -n "$victim" ] && grep -q "^epoch 1/3:" "$out/log" 2>/dev/null; then break; fi
  sleep 0.1
done
[ -n "$victim" ] || { cat "$out/log"; echo "FAIL: worker 1 never started"; exit 1; }
kill -9 "$victim"
rc=0
timeout 60 tail --pid="$job" -f /dev/null || { echo "FAIL: the job did not stop within 60 s"; exit 1; }
wait "$job" || rc=$?
job=""
cat "$out/log"
[ "$rc" -ne 0 ] || { echo "FAIL: the job exited 0 after a worker died"; exit 1; }
grep -q "worker 1 (pid $victim) was killed by signal 9" "$out/log" ||
  { echo "FAIL: the launcher did not name worker 1 (pid $victim)"; exit 1; }
echo "ok: worker 1 (pid $victim) named, job failed with $rc"
