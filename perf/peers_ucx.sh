#!/usr/bin/env bash
# Puts zipwire_perf -t ucx beside ucx_perftest on the same UCX path, over tcp
# (UCX_TLS=tcp) and over shared memory (UCX_TLS=posix,sysv,cma,self), both
# with UCX_NET_DEVICES=lo and the same UCX_TLS on both tools:
#   bandwidth: zipwire_perf write_bw 1 MiB  vs  ucx_perftest ucp_put_bw -s 1048576  (MB/s, MB = 2^20)
#   latency:   zipwire_perf write_lat 8 B   vs  ucx_perftest ucp_put_lat -s 8      (usec one way, median)
# Each pair runs RUNS times, interleaved so that background load hits both
# alike; the table shows medians, the ratio zipwire / peer, the acceptance
# limit (bandwidth >= 0.95, latency <= 1.1) and whether it holds.
#
# Usage: perf/peers_ucx.sh   (after building build/bin/zipwire_perf with UCX)
# Environment: ZIPWIRE_PERF (binary, default build/bin/zipwire_perf), RUNS (3),
#   BW_ITERS (2000), LAT_ITERS (20000), PATHS ("tcp shm"), ZW_PERF_FLAGS (extra
#   zipwire_perf flags), STEP_TIMEOUT (60 s per command), ZIPWIRE_TRANSPORT_BENCH
#   (default beside zipwire_perf: with it, each shm run also measures the
#   cross-core floor, printed beside the figures without a limit).
# Exit status: 0 when everything was measured (whether or not a ratio holds),
# 1 when a tool failed or is missing.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PERF=${ZIPWIRE_PERF:-$ROOT/build/bin/zipwire_perf}
FLOOR_BENCH=${ZIPWIRE_TRANSPORT_BENCH:-$(dirname "$PERF")/zipwire_transport_bench}
RUNS=${RUNS:-3}
BW_ITERS=${BW_ITERS:-2000}
LAT_ITERS=${LAT_ITERS:-20000}
PATHS=${PATHS:-tcp shm}
STEP_TIMEOUT=${STEP_TIMEOUT:-60}
read -r -a EXTRA <<<"${ZW_PERF_FLAGS:-}"

die() {
  echo "peers_ucx: $*" >&2
  exit 1
}

[[ -x $PERF ]] || die "$PERF not found; build it first (cmake --build build --target zipwire_perf)"
for tool in ucx_perftest python3 ss timeout; do
  command -v "$tool" >/dev/null || die "$tool is not installed (ucx_perftest: Debian ucx-utils)"
done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer"

TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_listen() {  # port server_pid
  for _ in $(seq 200); do
    ss -Hltn "sport = :$1" | grep -q . && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}

tls_of() {
  case $1 in
    tcp) echo tcp ;;
    shm) echo posix,sysv,cma,self ;;
    *) die "unknown path '$1' (tcp or shm)" ;;
  esac
}

# zipwire_perf server + client under the path's UCX_TLS; echoes the result
# (MB/s for write_bw, median usec for write_lat).
run_zw() {  # tls test size iters
  local port json log=$TMP/zw-$2.log
  port=$(free_port)
  json=$TMP/zw-$2-$RANDOM.json
  UCX_TLS=$1 UCX_NET_DEVICES=lo timeout "$STEP_TIMEOUT" "$PERF" -t ucx "${EXTRA[@]}" -p "$port" --bind 127.0.0.1 \
    --test "$2" >"$log.server" 2>&1 &
  local spid=$!
  PIDS+=("$spid")
  # The client retries its connect until the server listens.
  if ! UCX_TLS=$1 UCX_NET_DEVICES=lo timeout "$STEP_TIMEOUT" "$PERF" -t ucx "${EXTRA[@]}" -p "$port" --test "$2" \
    -s "$3" -n "$4" --json "$json" 127.0.0.1 >"$log" 2>&1; then
    kill "$spid" 2>/dev/null || true
    cat "$log" "$log.server" >&2
    die "zipwire_perf -t ucx $2 client failed (UCX_TLS=$1)"
  fi
  wait "$spid" || { cat "$log.server" >&2; die "zipwire_perf -t ucx $2 server failed (UCX_TLS=$1)"; }
  python3 - "$json" "$2" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))["results"][0]
print("%.2f" % (r["bw_avg_MBps"] if sys.argv[2] == "write_bw" else r["t_typical_us"]))
EOF
}

# ucx_perftest server + client; echoes overall bandwidth (MB/s) for put_bw
# or the median (50.0%ile) latency in usec for put_lat.
run_upt() {  # tls test size iters
  local port log=$TMP/upt-$2.log
  port=$(free_port)
  UCX_TLS=$1 UCX_NET_DEVICES=lo timeout "$STEP_TIMEOUT" ucx_perftest -p "$port" >"$log.server" 2>&1 &
  local spid=$!
  PIDS+=("$spid")
  wait_listen "$port" "$spid" || { cat "$log.server" >&2; die "ucx_perftest server did not listen (UCX_TLS=$1)"; }
  local warm=()
  [[ $2 == ucp_put_bw ]] && warm=(-w 100)
  if ! UCX_TLS=$1 UCX_NET_DEVICES=lo timeout "$STEP_TIMEOUT" ucx_perftest 127.0.0.1 -p "$port" -t "$2" -s "$3" \
    -n "$4" "${warm[@]}" >"$log" 2>&1; then
    kill "$spid" 2>/dev/null || true
    cat "$log" "$log.server" >&2
    die "ucx_perftest $2 failed (UCX_TLS=$1)"
  fi
  wait "$spid" || { cat "$log.server" >&2; die "ucx_perftest server failed (UCX_TLS=$1)"; }
  python3 - "$log" "$2" <<'EOF'
import sys
# Final: iters lat50 lat_avg lat_overall bw_avg bw_overall rate_avg rate_overall
final = [l.split() for l in open(sys.argv[1]) if l.startswith("Final:")]
if not final or len(final[-1]) < 9:
    sys.exit("cannot parse ucx_perftest output: " + open(sys.argv[1]).read()[-2000:])
f = final[-1]
print("%.2f" % float(f[6] if sys.argv[2] == "ucp_put_bw" else f[2]))
EOF
}

# The hardware's floor under any shared-memory notification, one way, usec:
# two threads ping-pong one 8-byte store (zipwire_transport_bench's
# CrossCoreLinePingPong), nothing else. Not a figure with a limit: it shows
# how much of each latency above is the cache line crossing cores.
run_floor() {
  timeout "$STEP_TIMEOUT" "$FLOOR_BENCH" --benchmark_filter=CrossCore --benchmark_format=json 2>/dev/null |
    python3 -c 'import json, sys; print("%.3f" % (json.load(sys.stdin)["benchmarks"][0]["one_way_ns"] * 1e6))' ||
    die "zipwire_transport_bench (the shared-memory floor) failed"
}

median() {
  python3 -c 'import statistics,sys; print("%.2f" % statistics.median(float(x) for x in sys.argv[1:]))' "$@"
}

echo "zipwire_perf: $PERF -t ucx ${EXTRA[*]}; ucx_perftest: $(command -v ucx_perftest)"
echo "runs: $RUNS (interleaved); UCX_NET_DEVICES=lo; load average: $(cut -d' ' -f1-3 /proc/loadavg)"

ROWS=()
floors=()
for path in $PATHS; do
  tls=$(tls_of "$path")
  zw_bw=() up_bw=() zw_lat=() up_lat=()
  for ((r = 1; r <= RUNS; r++)); do
    # Plain assignments, so that set -e sees a failing $(...).
    v=$(run_zw "$tls" write_bw 1M "$BW_ITERS")
    zw_bw+=("$v")
    v=$(run_upt "$tls" ucp_put_bw 1048576 "$BW_ITERS")
    up_bw+=("$v")
    v=$(run_zw "$tls" write_lat 8 "$LAT_ITERS")
    zw_lat+=("$v")
    v=$(run_upt "$tls" ucp_put_lat 8 "$LAT_ITERS")
    up_lat+=("$v")
    floor_note=""
    if [[ $path == shm && -x $FLOOR_BENCH ]]; then
      v=$(run_floor)
      floors+=("$v")
      floor_note=" (floor $v us)"
    fi
    echo "  $path run $r: bw zipwire ${zw_bw[-1]} / ucx_perftest ${up_bw[-1]} MB/s;" \
      "lat zipwire ${zw_lat[-1]} / ucx_perftest ${up_lat[-1]} us$floor_note"
  done
  ROWS+=("$path|bw 1 MiB (MB/s)|$(median "${zw_bw[@]}")|$(median "${up_bw[@]}")|ge|0.95")
  ROWS+=("$path|lat 8 B (us)|$(median "${zw_lat[@]}")|$(median "${up_lat[@]}")|le|1.1")
done

echo
echo "zipwire_perf -t ucx vs ucx_perftest (ucp_put_bw / ucp_put_lat), medians of $RUNS"
python3 - "${ROWS[@]}" <<'EOF'
import sys
fmt = "  %-5s %-17s %10s %13s %7s %7s %6s"
print(fmt % ("path", "figure", "zipwire", "ucx_perftest", "ratio", "limit", "holds"))
for row in sys.argv[1:]:
    path, what, zw, peer, op, limit = row.split("|")
    zw, peer, limit = float(zw), float(peer), float(limit)
    ratio = zw / peer if peer > 0 else float("inf")
    holds = ratio >= limit if op == "ge" else ratio <= limit
    print(fmt % (path, what, "%.2f" % zw, "%.2f" % peer, "%.2f" % ratio,
                 (">= " if op == "ge" else "<= ") + "%g" % limit, "yes" if holds else "no"))
# The same as markdown rows (compare_peers.sh's summary reads these).
print()
print("| figure | zipwire -t ucx | ucx_perftest | ratio | limit | holds |")
print("| --- | --- | --- | --- | --- | --- |")
for row in sys.argv[1:]:
    path, what, zw, peer, op, limit = row.split("|")
    zw, peer, limit = float(zw), float(peer), float(limit)
    ratio = zw / peer if peer > 0 else float("inf")
    holds = ratio >= limit if op == "ge" else ratio <= limit
    print("| ucx %s %s | %.2f | %.2f | %.3f | %s %g | %s |" % (path, what, zw, peer, ratio,
          ">=" if op == "ge" else "<=", limit, "yes" if holds else "no"))
EOF
if ((${#floors[@]} > 0)); then
  echo
  echo "shm floor, two threads ping-pong one 8-byte store (no software), one way: median $(median "${floors[@]}") us"
fi
