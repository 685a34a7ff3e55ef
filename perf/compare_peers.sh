#!/usr/bin/env bash
# Puts zipwire_perf (tcp backend) beside the standard TCP tools on loopback:
#   bandwidth: zipwire_perf write_bw 1 MiB  vs  iperf3 -l 1M   (MiB/s)
#   latency:   zipwire_perf write_lat 8 B   vs  qperf tcp_lat  (usec, one way)
# Each pair runs RUNS times, interleaved so that background load hits both
# alike; the medians and their ratio are printed.
#
# Usage: perf/compare_peers.sh        (after building build/bin/zipwire_perf)
# Environment: ZIPWIRE_PERF (binary, default build/bin/zipwire_perf), RUNS (3),
#   BW_SECONDS (4: target length of a write_bw run), LAT_ITERS (20000),
#   ZW_PERF_FLAGS (extra zipwire_perf flags, e.g. -e to block instead of spin).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PERF=${ZIPWIRE_PERF:-$ROOT/build/bin/zipwire_perf}
RUNS=${RUNS:-3}
BW_SECONDS=${BW_SECONDS:-4}
LAT_ITERS=${LAT_ITERS:-20000}
read -r -a EXTRA <<<"${ZW_PERF_FLAGS:-}"
# Extra flags for the bandwidth runs only (e.g. ZW_BW_FLAGS=-e to block in
# Poll as iperf3 blocks in the kernel; on a loaded 2-core machine spinning
# steals the cores that move the bytes). Default: busy-poll, like perftest.
read -r -a BW_EXTRA <<<"${ZW_BW_FLAGS:-}"
# Every command runs under a bound so that a stuck tool fails the script
# instead of hanging it.
STEP_TIMEOUT=60

die() {
  echo "compare_peers: $*" >&2
  exit 1
}

[[ -x $PERF ]] || die "$PERF not found; build it first (cmake --build build --target zipwire_perf)"
for tool in iperf3 qperf python3 ss timeout; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done

TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A port nobody listens on right now (the kernel picks; small reuse race).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits (bounded) until something listens on TCP port $1. Probing with ss
# rather than connecting matters: iperf3 -1 would take a probe as its client.
wait_listen() {
  for _ in $(seq 100); do
    ss -Hltn "sport = :$1" | grep -q . && return 0
    sleep 0.05
  done
  die "nothing listens on port $1 after 5 s"
}

json_field() {  # file, python expression over `d`
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"
}

median() {
  python3 -c 'import statistics,sys; print("%.2f" % statistics.median(float(x) for x in sys.argv[1:]))' "$@"
}

# The run_* helpers are called as $(...), i.e. in subshells: they wait for or
# kill their own servers, since the EXIT trap does not reach into subshells.

# zipwire_perf server + client; echoes the JSON path.
run_zw() {  # test size iters
  local port json
  port=$(free_port)
  json=$TMP/zw-$1-$RANDOM.json
  local mode=()
  [[ $1 == write_bw ]] && mode=("${BW_EXTRA[@]}")
  timeout "$STEP_TIMEOUT" "$PERF" "${EXTRA[@]}" "${mode[@]}" -p "$port" --test "$1" >"$TMP/zw-server.log" 2>&1 &
  local spid=$!
  PIDS+=("$spid")
  # The client retries its connect until the server listens (--timeout).
  if ! timeout "$STEP_TIMEOUT" "$PERF" "${EXTRA[@]}" "${mode[@]}" -p "$port" --test "$1" -s "$2" -n "$3" --json "$json" \
    127.0.0.1 >"$TMP/zw-client.log" 2>&1; then
    kill "$spid" 2>/dev/null || true
    cat "$TMP/zw-client.log" "$TMP/zw-server.log" >&2
    die "zipwire_perf $1 client failed"
  fi
  wait "$spid" || { cat "$TMP/zw-server.log" >&2; die "zipwire_perf $1 server failed"; }
  echo "$json"
}

run_iperf3() {  # -> MiB/s received
  local port
  port=$(free_port)
  timeout "$STEP_TIMEOUT" iperf3 -s -1 -p "$port" >"$TMP/iperf3-server.log" 2>&1 &
  local spid=$!
  PIDS+=("$spid")
  wait_listen "$port"
  if ! timeout "$STEP_TIMEOUT" iperf3 -c 127.0.0.1 -p "$port" -l 1M -t "$BW_SECONDS" -J >"$TMP/iperf3.json"; then
    kill "$spid" 2>/dev/null || true
    cat "$TMP/iperf3.json" >&2
    die "iperf3 client failed"
  fi
  wait "$spid" || die "iperf3 server failed"
  json_field "$TMP/iperf3.json" '"%.2f" % (d["end"]["sum_received"]["bits_per_second"] / 8 / 2**20)'
}

QPERF_PORT=
start_qperf() {
  QPERF_PORT=$(free_port)
  # qperf's server never exits by itself; cleanup kills it.
  timeout 600 qperf -lp "$QPERF_PORT" >"$TMP/qperf-server.log" 2>&1 &
  PIDS+=("$!")
  wait_listen "$QPERF_PORT"
}

run_qperf_lat() {  # -> usec
  local out
  out=$(timeout "$STEP_TIMEOUT" qperf 127.0.0.1 -lp "$QPERF_PORT" -m 8 tcp_lat) || die "qperf tcp_lat failed"
  python3 - "$out" <<'EOF'
import re, sys
m = re.search(r"latency\s*=\s*([0-9.]+)\s*(ns|us|ms|sec)", sys.argv[1])
if not m:
    sys.exit("cannot parse qperf output: " + sys.argv[1])
scale = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "sec": 1e6}[m.group(2)]
print("%.2f" % (float(m.group(1)) * scale))
EOF
}

echo "zipwire_perf: $PERF ${EXTRA[*]} (write_bw adds: ${BW_EXTRA[*]})"
echo "runs: $RUNS (interleaved); load average: $(cut -d' ' -f1-3 /proc/loadavg)"

# Size the write_bw runs to about BW_SECONDS from a short calibration run.
json=$(run_zw write_bw 1M 300)
rate=$(json_field "$json" 'd["results"][0]["bw_avg_MBps"]')
BW_ITERS=$(python3 -c "print(max(200, min(200000, int(float('$rate') * $BW_SECONDS))))")
echo "write_bw iterations: $BW_ITERS (calibrated at $rate MiB/s)"

zw_bw=()
ip_bw=()
for ((r = 1; r <= RUNS; r++)); do
  # Plain assignments, so that set -e sees a failing $(...).
  json=$(run_zw write_bw 1M "$BW_ITERS")
  v=$(json_field "$json" '"%.2f" % d["results"][0]["bw_avg_MBps"]')
  zw_bw+=("$v")
  v=$(run_iperf3)
  ip_bw+=("$v")
  echo "  run $r: zipwire ${zw_bw[-1]} MiB/s, iperf3 ${ip_bw[-1]} MiB/s"
done

start_qperf
zw_lat=()
qp_lat=()
for ((r = 1; r <= RUNS; r++)); do
  json=$(run_zw write_lat 8 "$LAT_ITERS")
  v=$(json_field "$json" '"%.2f" % d["results"][0]["t_typical_us"]')
  zw_lat+=("$v")
  v=$(run_qperf_lat)
  qp_lat+=("$v")
  echo "  run $r: zipwire ${zw_lat[-1]} us, qperf ${qp_lat[-1]} us"
done

zw_bw_med=$(median "${zw_bw[@]}")
ip_bw_med=$(median "${ip_bw[@]}")
zw_lat_med=$(median "${zw_lat[@]}")
qp_lat_med=$(median "${qp_lat[@]}")
ratio() { python3 -c "print('%.2f' % (float('$1') / float('$2')))"; }

echo
echo "bandwidth, 1 MiB messages, loopback (MiB/s = 2^20 B/s, median of $RUNS)"
printf '  %-28s %10s\n' "zipwire_perf tcp write_bw" "$zw_bw_med" "iperf3 -l 1M" "$ip_bw_med"
printf '  %-28s %10s\n' "ratio zipwire / iperf3" "$(ratio "$zw_bw_med" "$ip_bw_med")"
echo "latency, 8 B, loopback (usec one way, median of $RUNS)"
printf '  %-28s %10s\n' "zipwire_perf write_lat" "$zw_lat_med" "qperf tcp_lat" "$qp_lat_med"
printf '  %-28s %10s\n' "ratio zipwire / qperf" "$(ratio "$zw_lat_med" "$qp_lat_med")"
