#!/usr/bin/env bash
# zipwire_perf's command line (bad flags and combinations exit 2 with a clear
# message) and a short tcp loopback run of every --test mode, --bidir and
# --codec, checking the JSON each one writes. Run by ctest (zipwire_perf_cli).
# Environment: ZIPWIRE_PERF (the binary; default build/bin/zipwire_perf).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PERF=${ZIPWIRE_PERF:-$ROOT/build/bin/zipwire_perf}
[[ -x $PERF ]] || { echo "zipwire_perf_test: $PERF not found" >&2; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
failures=0

fail() {
  echo "FAIL: $*" >&2
  failures=$((failures + 1))
}

# expect_usage "message fragment" args...: exit 2, the fragment on stderr.
expect_usage() {
  local want=$1
  shift
  local rc=0
  timeout 30 "$PERF" "$@" >"$TMP/out" 2>"$TMP/err" || rc=$?
  if [[ $rc -ne 2 ]]; then
    fail "zipwire_perf $* exited $rc, expected 2 ($(head -c 300 "$TMP/err"))"
  elif ! grep -qF -- "$want" "$TMP/err"; then
    fail "zipwire_perf $*: stderr lacks '$want': $(head -c 300 "$TMP/err")"
  else
    echo "ok: usage error for: $*"
  fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# run_pair NAME "python check over d" client-args...: a server and a client
# on loopback; the client writes JSON that the check must accept.
run_pair() {
  local name=$1 check=$2
  shift 2
  local port json=$TMP/$name.json rc=0
  port=$(free_port)
  timeout 60 "$PERF" -p "$port" --timeout 20 >"$TMP/$name.server" 2>&1 &
  local spid=$!
  timeout 60 "$PERF" -p "$port" --timeout 20 "$@" --json "$json" 127.0.0.1 >"$TMP/$name.client" 2>&1 || rc=$?
  local src=0
  wait "$spid" || src=$?
  if [[ $rc -ne 0 || $src -ne 0 ]]; then
    fail "$name: client rc $rc, server rc $src"
    cat "$TMP/$name.client" "$TMP/$name.server" >&2
    return
  fi
  if ! python3 - "$json" "$check" <<'PYEOF'
import json, sys
d = json.load(open(sys.argv[1]))
r = d["results"]
ok = eval(sys.argv[2])
if not ok:
    sys.exit("check failed: %s on %s" % (sys.argv[2], json.dumps(d)))
PYEOF
  then
    fail "$name: JSON check"
  else
    echo "ok: $name"
  fi
}

# --- bad flags and combinations -------------------------------------------
expect_usage "unknown --test 'bogus'" --test bogus 127.0.0.1
expect_usage "unknown --transport 'carrier'" -t carrier 127.0.0.1
expect_usage "--bidir applies to the *_bw tests" --test write_lat --bidir 127.0.0.1
expect_usage "--bidir applies to the *_bw tests" --test send_lat -b 127.0.0.1
expect_usage "--codec applies to write_bw and write_lat" --test read_bw --codec onebit 127.0.0.1
expect_usage "--codec applies to write_bw and write_lat" --test send_bw --codec fp16 127.0.0.1
expect_usage "bad --codec 'nosuchcodec'" --codec nosuchcodec 127.0.0.1
expect_usage "not a whole number of fp32 values" --codec onebit -s 1023 127.0.0.1
expect_usage "--codec and --bidir" --codec onebit --bidir 127.0.0.1
expect_usage "apply to -t verbs only" -t tcp -d rxe0 127.0.0.1
expect_usage "apply to -t verbs only" -t tcp -x 1 127.0.0.1
expect_usage "apply to -t verbs only" -t tcp -q 2 127.0.0.1
expect_usage "apply to -t verbs only" -t tcp -R 127.0.0.1
expect_usage "bad --gid-index '300'" -t verbs -x 300 127.0.0.1
expect_usage "bad --qp '0'" -t verbs -q 0 127.0.0.1
expect_usage "--all and --size exclude each other" -a -s 64K 127.0.0.1
expect_usage "--gpu: send_bw copies host messages" --gpu --test send_bw 127.0.0.1
expect_usage "max_control_bytes" -t tcp --test send_bw -s 1M 127.0.0.1
expect_usage "max_control_bytes" -t tcp --test send_lat -s 128K 127.0.0.1
expect_usage "needs a value" --test
expect_usage "unexpected argument" 127.0.0.1 extra
if "$PERF" -t ucx --help >/dev/null 2>&1 && UCX_NET_DEVICES=lo timeout 30 "$PERF" -t ucx --test read_bw 127.0.0.1 \
  >"$TMP/out" 2>"$TMP/err"; then
  fail "read_bw over ucx ran; expected 'not supported by ucx' (or update this test if ucx gained PostRead)"
else
  rc=$?
  if grep -qF "not supported by ucx" "$TMP/err"; then
    [[ $rc -eq 2 ]] && echo "ok: read_bw not supported by ucx" || fail "read_bw over ucx exited $rc, expected 2"
  elif grep -qF "is not built" "$TMP/err"; then
    echo "skip: ucx backend not built"
  else
    echo "note: ucx read_bw: $(head -c 200 "$TMP/err") (ucx may offer PostRead now)"
  fi
fi
# --gpu without a CUDA build is a usage error; with one but no device, a run error naming --gpu.
rc=0
timeout 30 "$PERF" --gpu -t tcp 127.0.0.1 >"$TMP/out" 2>"$TMP/err" || rc=$?
if [[ $rc -eq 0 ]] || ! grep -qF -- "--gpu" "$TMP/err"; then
  fail "--gpu over tcp: rc $rc, stderr: $(head -c 300 "$TMP/err")"
else
  echo "ok: --gpu over tcp refused (rc $rc): $(head -1 "$TMP/err")"
fi
# -t auto says what it picked and why.
if timeout 30 "$PERF" -t auto -p 1 --timeout 1 127.0.0.1 >"$TMP/out" 2>&1; then :; fi
if grep -qE "^transport: auto -> (verbs|ucx|tcp) \(.+\)" "$TMP/out"; then
  echo "ok: $(grep -E '^transport: auto' "$TMP/out")"
else
  fail "-t auto did not say what it chose: $(head -c 300 "$TMP/out")"
fi

# --- a short tcp run of every mode ------------------------------------------
run_pair write_bw 'd["test"] == "write_bw" and r[0]["bytes"] == 65536 and r[0]["bw_avg_MBps"] > 0 and r[0]["bw_peak_MBps"] >= r[0]["bw_avg_MBps"]' \
  --test write_bw -n 300
run_pair write_lat 'd["test"] == "write_lat" and r[0]["bytes"] == 8 and 0 < r[0]["t_min_us"] <= r[0]["t_typical_us"] <= r[0]["t_max_us"]' \
  --test write_lat -s 8 -n 200
run_pair read_bw 'd["test"] == "read_bw" and r[0]["bytes"] == 1048576 and r[0]["bw_avg_MBps"] > 0' \
  --test read_bw -s 1M -n 100
run_pair send_bw 'd["test"] == "send_bw" and r[0]["bytes"] == 4096 and r[0]["msg_rate_Mpps"] > 0' \
  --test send_bw -s 4K -n 500
run_pair send_lat 'd["test"] == "send_lat" and r[0]["iterations"] == 200 and r[0]["t_typical_us"] > 0' \
  --test send_lat -s 64 -n 200
run_pair write_bw_bidir 'd.get("bidir") is True and r[0]["bw_avg_MBps"] > 0' --test write_bw -b -s 16K -n 500
run_pair read_bw_bidir 'd.get("bidir") is True and r[0]["bw_avg_MBps"] > 0' --test read_bw -b -s 16K -n 500
run_pair send_bw_bidir 'd.get("bidir") is True and r[0]["bw_avg_MBps"] > 0' --test send_bw -b -s 1K -n 500
run_pair codec_onebit 'd["codec"] == "onebit" and r[0]["wire_MBps"] > 0 and r[0]["effective_MBps"] > 20 * r[0]["wire_MBps"] and r[0]["wire_MBps"] == r[0]["bw_avg_MBps"]' \
  --test write_bw --codec onebit -s 1M -n 100
run_pair codec_lat 'd["codec"] == "fp16" and r[0]["wire_bytes"] < r[0]["bytes"] and r[0]["t_typical_us"] > 0' \
  --test write_lat --codec fp16 -s 4K -n 100
run_pair all_sizes 'len(r) == 23 and [x["bytes"] for x in r][:2] == [2, 4] and r[-1]["bytes"] == 8 << 20' \
  --test write_bw -a -n 20 --tx-depth 8

if [[ $failures -ne 0 ]]; then
  echo "zipwire_perf_test: $failures failure(s)" >&2
  exit 1
fi
echo "zipwire_perf_test: all passed"
