#!/usr/bin/env bash
# Puts zipwire_perf -t verbs beside perftest inside the soft-RoCE guest, on
# the same rxe device (rxe0, loopback within the device):
#   write_bw 64 KiB and 1 MiB   vs  ib_write_bw   (BW average, MiB/s)
#   write_lat 8 B               vs  ib_write_lat  (t_typical = median, usec)
# One guest boot (tests/softroce/guest.sh); inside it every pair runs RUNS
# times, interleaved (and the order within a pair alternates) so that host
# load hits both tools alike. Prints medians, the ratio, the acceptance limit
# (bandwidth >= 0.95x, latency <= 1.1x) and whether it holds.
#
# Usage: perf/peers_softroce.sh          (after building build/bin/zipwire_perf)
# Environment: ZIPWIRE_PERF (binary, default build/bin/zipwire_perf), RUNS (3),
#   BW64K_ITERS (600), BW1M_ITERS (60), LAT_ITERS (1500),
#   ZW_PERF_FLAGS (extra zipwire_perf flags), FIGURES (which pairs, default
#   "bw64 bw1m lat"), PEERS_SOFTROCE_TSV (also copy
#   the raw per-run figures there).
# Exit status: 0 when every figure was measured (whether or not the limits
# hold; the table says), 1 when a tool failed, 77 when the guest cannot start
# at all (guest.sh says why in one line).
set -euo pipefail

# --- inside the guest --------------------------------------------------------
if [[ ${1:-} == --in-guest ]]; then
  out=$2 perf=$3 runs=$4 bw64=$5 bw1m=$6 lat=$7
  read -r -a extra <<<"${8:-}"
  figures=${9:-bw64 bw1m lat}
  IP=10.11.0.1 DEV=rxe0
  port=20000
  fail=0
  export ZIPWIRE_IB_DEVICE=$DEV ZIPWIRE_IB_GID_INDEX=1
  # softroce_pair NAME SERVER... -- CLIENT... (client output in /tmp/NAME.cli)
  source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/softroce_pair.sh"
  # perftest prints one result row starting with the size.
  perftest_col() {  # file size column
    awk -v s="$2" -v c="$3" '$1 == s && NF >= c {v = $c} END {if (v == "") exit 1; print v}' "$1"
  }
  record() {  # tool test size run value
    echo "$1	$2	$3	$4	$5" >>"$out/results.tsv"
  }
  peer_bw() {  # size iters run
    port=$((port + 1))
    local n=ib_write_bw_$1_$3
    softroce_pair $n ib_write_bw -d $DEV -x 1 -F -p $port -s "$1" -n "$2" -- \
      ib_write_bw -d $DEV -x 1 -F -p $port -s "$1" -n "$2" $IP || return 1
    record ib_write_bw write_bw "$1" "$3" "$(perftest_col /tmp/$n.cli "$1" 4)"
  }
  peer_lat() {  # size iters run
    port=$((port + 1))
    local n=ib_write_lat_$1_$3
    softroce_pair $n ib_write_lat -d $DEV -x 1 -F -p $port -s "$1" -n "$2" -- \
      ib_write_lat -d $DEV -x 1 -F -p $port -s "$1" -n "$2" $IP || return 1
    record ib_write_lat write_lat "$1" "$3" "$(perftest_col /tmp/$n.cli "$1" 5)"
  }
  zw() {  # test size iters run
    port=$((port + 1))
    local n=zipwire_$1_$2_$4 json=/tmp/zw_$1_$2_$4.json field=bw_avg_MBps
    [[ $1 == write_lat ]] && field=t_typical_us
    softroce_pair $n "$perf" -t verbs "${extra[@]}" -p $port --test "$1" --timeout 60 -- \
      "$perf" -t verbs "${extra[@]}" -p $port --test "$1" -s "$2" -n "$3" --timeout 60 --json "$json" $IP ||
      return 1
    record zipwire "$1" "$2" "$4" \
      "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["results"][0][sys.argv[2]])' "$json" $field)"
  }
  both() {  # run peer-fn peer-args -- zw-args: alternate who goes first
    local r=$1 pf=$2
    shift 2
    local pa=()
    while [[ $1 != -- ]]; do pa+=("$1"); shift; done
    shift
    if ((r % 2)); then
      $pf "${pa[@]}" "$r" || fail=1
      zw "$@" "$r" || fail=1
    else
      zw "$@" "$r" || fail=1
      $pf "${pa[@]}" "$r" || fail=1
    fi
  }
  : >"$out/results.tsv"
  echo "peers_softroce: guest cpus $(nproc), $(rdma link show | awk '{print $2}' | tr '\n' ' ')"
  for ((r = 1; r <= runs; r++)); do
    [[ " $figures " == *" bw64 "* ]] && both $r peer_bw 65536 "$bw64" -- write_bw 65536 "$bw64"
    [[ " $figures " == *" bw1m "* ]] && both $r peer_bw 1048576 "$bw1m" -- write_bw 1048576 "$bw1m"
    [[ " $figures " == *" lat "* ]] && both $r peer_lat 8 "$lat" -- write_lat 8 "$lat"
    echo "peers_softroce: run $r/$runs done at $(cut -d' ' -f1 /proc/uptime)s guest uptime"
  done
  exit $fail
fi

# --- on the host ---------------------------------------------------------------
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PERF=$(readlink -f "${ZIPWIRE_PERF:-$ROOT/build/bin/zipwire_perf}")
RUNS=${RUNS:-3}
BW64K_ITERS=${BW64K_ITERS:-600}
BW1M_ITERS=${BW1M_ITERS:-60}
LAT_ITERS=${LAT_ITERS:-1500}
[[ -x $PERF ]] || { echo "peers_softroce: $PERF not found; build zipwire_perf first" >&2; exit 1; }
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || { echo "peers_softroce: RUNS must be a positive integer" >&2; exit 2; }
FIGURES=${FIGURES:-bw64 bw1m lat}
for f in $FIGURES; do
  [[ $f == bw64 || $f == bw1m || $f == lat ]] || {
    echo "peers_softroce: FIGURES: unknown '$f' (bw64, bw1m, lat)" >&2
    exit 2
  }
done
command -v python3 >/dev/null || { echo "peers_softroce: python3 is not installed" >&2; exit 1; }

TMP=$(mktemp -d /tmp/zw-peers-softroce.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
echo "peers_softroce: $PERF, RUNS=$RUNS (interleaved), iterations: 64 KiB $BW64K_ITERS," \
  "1 MiB $BW1M_ITERS, 8 B $LAT_ITERS; host load $(cut -d' ' -f1-3 /proc/loadavg)"
rc=0
# Bounded: about 4 min is expected at RUNS=3; the guest's own watchdog ends a hang.
SOFTROCE_RW_DIR=$TMP SOFTROCE_TIMEOUT=${SOFTROCE_TIMEOUT:-540} \
  "$ROOT/tests/softroce/guest.sh" bash "$ROOT/perf/peers_softroce.sh" --in-guest "$TMP" "$PERF" \
  "$RUNS" "$BW64K_ITERS" "$BW1M_ITERS" "$LAT_ITERS" "${ZW_PERF_FLAGS:-}" "$FIGURES" || rc=$?
if ((rc == 77)); then exit 77; fi
[[ -n ${PEERS_SOFTROCE_TSV:-} && -f $TMP/results.tsv ]] && cp "$TMP/results.tsv" "$PEERS_SOFTROCE_TSV"
python3 - "$TMP/results.tsv" "$RUNS" "$FIGURES" <<'EOF' || rc=1
import collections, statistics, sys
rows = collections.defaultdict(list)
try:
    for line in open(sys.argv[1]):
        tool, test, size, run, value = line.split("\t")
        rows[(tool, test, int(size))].append(float(value))
except FileNotFoundError:
    pass
cases = [("write_bw", 65536, "ib_write_bw", "MiB/s", ">=", 0.95, "bw64"),
         ("write_bw", 1048576, "ib_write_bw", "MiB/s", ">=", 0.95, "bw1m"),
         ("write_lat", 8, "ib_write_lat", "usec", "<=", 1.10, "lat")]
cases = [c[:6] for c in cases if c[6] in sys.argv[3].split()]
print("\nverbs vs perftest, soft-RoCE rxe0 in the QEMU guest (TCG), medians of %s runs" % sys.argv[2])
print("| figure | zipwire -t verbs | peer | ratio | limit | holds |")
print("| --- | --- | --- | --- | --- | --- |")
missing = False
for test, size, peer, unit, op, limit in cases:
    zw, pr = rows.get(("zipwire", test, size)), rows.get((peer, test, size))
    name = "%s %s vs %s" % ({65536: "64 KiB", 1048576: "1 MiB", 8: "8 B"}[size], test, peer)
    if not zw or not pr:
        missing = True
        print("| %s | %s | %s | - | %s %.2f | not measured |" % (
            name, "%.2f %s" % (statistics.median(zw), unit) if zw else "failed",
            "%.2f %s" % (statistics.median(pr), unit) if pr else "failed", op, limit))
        continue
    z, p = statistics.median(zw), statistics.median(pr)
    ratio = z / p
    holds = ratio >= limit if op == ">=" else ratio <= limit
    print("| %s | %.2f %s | %.2f %s | %.3f | %s %.2f | %s |" % (
        name, z, unit, p, unit, ratio, op, limit, "yes" if holds else "no"))
print("\nper run (zipwire / peer):")
for test, size, peer, unit, _, _ in cases:
    zw, pr = rows.get(("zipwire", test, size), []), rows.get((peer, test, size), [])
    print("  %-9s %7d B: zipwire %s | %s %s" % (test, size, " ".join("%.2f" % v for v in zw), peer,
                                                " ".join("%.2f" % v for v in pr)))
sys.exit(1 if missing else 0)
EOF
exit $rc
