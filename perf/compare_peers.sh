#!/usr/bin/env bash
# Puts every zipwire backend beside the standard tool on the same path, in
# one run, and ends with a summary of every pair's ratio and its limit:
#
#   tcp    zipwire_perf -t tcp on loopback (this script):
#            bandwidth: write_bw 1 MiB  vs  iperf3 -l 1M   (MiB/s)
#            latency:   write_lat 8 B   vs  qperf tcp_lat  (usec, one way)
#   ucx    perf/peers_ucx.sh: zipwire_perf -t ucx vs ucx_perftest, UCX_TLS=tcp
#            and shared memory
#   verbs  perf/peers_softroce.sh: zipwire_perf -t verbs vs ib_write_bw /
#            ib_write_lat inside the soft-RoCE guest
#
# Each pair runs RUNS times, interleaved so that background load hits both
# alike; medians and their ratio are printed. The ucx and verbs scripts print
# their own tables and exit 0 when they measured, nonzero when a tool failed
# (77: the soft-RoCE guest cannot start here); a missing one is reported as
# such, not skipped silently.
#
# Usage: perf/compare_peers.sh [--softroce] [--only tcp|ucx|verbs] [-h]
#   --softroce      only the soft-RoCE guest part (same as --only verbs)
#   --only NAME     only that backend's section
# Environment: ZIPWIRE_PERF (binary, default build/bin/zipwire_perf), RUNS (3),
#   BW_SECONDS (4: target length of a tcp write_bw run), LAT_ITERS (20000),
#   ZW_PERF_FLAGS (extra zipwire_perf flags, e.g. -e to block instead of spin).
#   RUNS and ZIPWIRE_PERF reach the ucx and verbs scripts too.
# Exit status: 0 when every section that ran measured its pairs (whether or
# not the limits hold: the summary says), 1 when a tool failed or a section
# asked for is missing, 2 on a usage error.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PERF=${ZIPWIRE_PERF:-$ROOT/build/bin/zipwire_perf}
RUNS=${RUNS:-3}
export ZIPWIRE_PERF=$PERF RUNS

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}
ONLY=
while [[ $# -gt 0 ]]; do
  case $1 in
    --softroce) ONLY=verbs ;;
    --only)
      [[ $# -ge 2 ]] || { echo "compare_peers: --only needs tcp, ucx or verbs" >&2; exit 2; }
      case $2 in
        tcp | ucx | verbs) ONLY=$2 ;;
        *) echo "compare_peers: --only '$2': expected tcp, ucx or verbs" >&2; exit 2 ;;
      esac
      shift
      ;;
    -h | --help) usage; exit 0 ;;
    *) echo "compare_peers: unknown argument '$1' (try -h)" >&2; exit 2 ;;
  esac
  shift
done
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
command -v python3 >/dev/null || die "python3 is not installed"

LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT
trap 'exit 130' INT TERM

# --- tcp: this script's own section ----------------------------------------
# Runs in a subshell (its die() ends only the section) with its own cleanup.
tcp_section() {
for tool in iperf3 qperf ss timeout; do
  command -v "$tool" >/dev/null || die "$tool is not installed (scripts/install-deps.sh)"
done
TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

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
  timeout "$STEP_TIMEOUT" "$PERF" -t tcp "${EXTRA[@]}" "${mode[@]}" -p "$port" --test "$1" >"$TMP/zw-server.log" 2>&1 &
  local spid=$!
  PIDS+=("$spid")
  # The client retries its connect until the server listens (--timeout).
  if ! timeout "$STEP_TIMEOUT" "$PERF" -t tcp "${EXTRA[@]}" "${mode[@]}" -p "$port" --test "$1" -s "$2" -n "$3" --json "$json" \
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
echo
echo "tcp vs iperf3 / qperf, loopback, medians of $RUNS runs"
python3 - "$zw_bw_med" "$ip_bw_med" "$zw_lat_med" "$qp_lat_med" <<'EOF'
import sys
zb, ib, zl, ql = map(float, sys.argv[1:])
print("| figure | zipwire -t tcp | peer | ratio | limit | holds |")
print("| --- | --- | --- | --- | --- | --- |")
for name, z, p, unit, op, limit in [("1 MiB write_bw vs iperf3 -l 1M", zb, ib, "MiB/s", ">=", 0.9),
                                    ("8 B write_lat vs qperf tcp_lat", zl, ql, "usec", "<=", 1.2)]:
    r = z / p
    holds = r >= limit if op == ">=" else r <= limit
    print("| %s | %.2f %s | %.2f %s | %.3f | %s %.2f | %s |" % (name, z, unit, p, unit, r, op, limit,
                                                               "yes" if holds else "no"))
EOF
}

# --- every section, then the summary ----------------------------------------
# section NAME: runs it, teeing its output to $LOGS/NAME.log, and records how
# it ended in $LOGS/NAME.status (measured / failed / skipped / missing).
section() {
  local name=$1 rc=0
  echo
  echo "=== $name ==="
  if [[ $name == tcp ]]; then
    if (tcp_section) 2>&1 | tee "$LOGS/$name.log"; then rc=0; else rc=${PIPESTATUS[0]}; fi
  else
    local script=$ROOT/perf/peers_ucx.sh
    [[ $name == verbs ]] && script=$ROOT/perf/peers_softroce.sh
    if [[ ! -f $script ]]; then
      echo "compare_peers: $script is missing: the $name backend is NOT compared in this run"
      echo missing >"$LOGS/$name.status"
      return
    fi
    if bash "$script" 2>&1 | tee "$LOGS/$name.log"; then rc=0; else rc=${PIPESTATUS[0]}; fi
  fi
  if [[ $rc -eq 0 ]]; then
    echo measured >"$LOGS/$name.status"
  elif [[ $rc -eq 77 ]]; then
    echo "skipped (exit 77: cannot run on this machine, see above)" >"$LOGS/$name.status"
  else
    echo "failed (exit $rc)" >"$LOGS/$name.status"
  fi
}

echo "zipwire_perf: $PERF ${EXTRA[*]} (tcp write_bw adds: ${BW_EXTRA[*]})"
echo "runs: $RUNS (interleaved); load average: $(cut -d' ' -f1-3 /proc/loadavg)"
SECTIONS=(tcp ucx verbs)
[[ -n $ONLY ]] && SECTIONS=("$ONLY")
for name in "${SECTIONS[@]}"; do section "$name"; done

echo
echo "=== summary: every pair, ratio against its limit (RUNS=$RUNS, $(date -u +%F)) ==="
status=0
for name in "${SECTIONS[@]}"; do
  st=$(cat "$LOGS/$name.status")
  echo "$name: $st"
  # Every section prints markdown rows: | figure | zipwire | peer | ratio | limit | holds |
  if [[ -f $LOGS/$name.log ]]; then
    python3 - "$LOGS/$name.log" <<'EOF'
import re, sys
for line in open(sys.argv[1], errors="replace"):
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 6 and re.match(r"^(>=|<=|≥|≤) ?[0-9.]+$", cells[4]):
        print("  %-44s ratio %-7s limit %-7s holds: %s" % (cells[0], cells[3], cells[4], cells[5]))
EOF
  fi
  [[ $st == measured || $st == skipped* ]] || status=1
done
exit $status
