#!/usr/bin/env bash
# What a write_bw run puts on the wire, inside one soft-RoCE guest boot:
# zipwire_perf -t verbs and ib_write_bw alternately on rxe0, ROUNDS times,
# each run with the device's hardware counters read before and after. Per run:
# bandwidth (MiB/s), packets sent per message, SENDs per message (zipwire: a
# META after each large write's data, and the target's ACK), duplicate
# requests per message (packets rxe retransmitted and the responder saw
# twice) and transport retries. Packets are counted on rxe0, both directions
# (the client and server share the device), and divided by the messages the
# client posted: zipwire_perf's iterations plus its warm-up (min(n, 128)),
# ib_write_bw's iterations.
#
# Usage: perf/softroce_pkts.sh [-s SIZE] [-n ITERS] [-r ROUNDS] [BINARY]
#   SIZE 65536, ITERS 600, ROUNDS 3, BINARY build/bin/zipwire_perf
# Exit status: 0 when every run gave a figure, 1 otherwise, 77 when the
# guest cannot start (tests/softroce/guest.sh says why).
set -euo pipefail

if [[ ${1:-} == --in-guest ]]; then
  bin=$2 size=$3 iters=$4 rounds=$5
  export ZIPWIRE_IB_DEVICE=rxe0 ZIPWIRE_IB_GID_INDEX=1
  IP=10.11.0.1 port=21400 fail=0
  C=/sys/class/infiniband/rxe0/ports/1/hw_counters
  for f in sent_pkts rdma_sends duplicate_request completer_retry_err; do
    [[ -r $C/$f ]] || { echo "softroce_pkts: $C/$f not found (this kernel's rxe has no such counter)" >&2; exit 1; }
  done
  counters() { echo "$(cat $C/sent_pkts) $(cat $C/rdma_sends) $(cat $C/duplicate_request) $(cat $C/completer_retry_err)"; }
  source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/softroce_pair.sh"
  # run zipwire|peer: one client/server pair; prints the row.
  run() {
    local who=$1 before after msgs
    port=$((port + 1))
    before=$(counters)
    if [[ $who == peer ]]; then
      softroce_pair "pkts_$who" ib_write_bw -d rxe0 -x 1 -F -p $port -s "$size" -n "$iters" -- \
        ib_write_bw -d rxe0 -x 1 -F -p $port -s "$size" -n "$iters" $IP || true
      msgs=$iters
    else
      softroce_pair "pkts_$who" "$bin" -t verbs -p $port --test write_bw --timeout 60 -- \
        "$bin" -t verbs -p $port --test write_bw -s "$size" -n "$iters" --timeout 60 $IP || true
      msgs=$((iters + (iters < 128 ? iters : 128)))
    fi
    after=$(counters)
    local bw
    bw=$(awk -v s="$size" '$1 == s && NF >= 4 {v = $4} END {if (v == "") print "-"; else print v}' \
      "/tmp/pkts_$who.cli")
    [[ $bw == - ]] && fail=1
    python3 - "$who" "$bw" "$msgs" $before $after <<'EOF'
import sys
who, bw, msgs = sys.argv[1], sys.argv[2], int(sys.argv[3])
b = [int(x) for x in sys.argv[4:8]]
a = [int(x) for x in sys.argv[8:12]]
d = [y - x for x, y in zip(b, a)]
print("  %-12s %9s %9.2f %9.2f %9.2f %8d" % (who, bw, d[0] / msgs, d[1] / msgs, d[2] / msgs, d[3]))
EOF
  }
  echo "  write_bw $size B, $iters iterations; per message: packets sent, SENDs, duplicate requests; retries per run"
  printf '  %-12s %9s %9s %9s %9s %8s\n' run MiB/s pkts sends dups retries
  for ((r = 1; r <= rounds; r++)); do
    run zipwire
    run peer
  done
  exit $fail
fi

size=65536 iters=600 rounds=3
while getopts "s:n:r:" opt; do
  case $opt in
    s) size=$OPTARG ;;
    n) iters=$OPTARG ;;
    r) rounds=$OPTARG ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
for v in "$size" "$iters" "$rounds"; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "softroce_pkts: '$v' is not a positive integer" >&2; exit 2; }
done
bin=$(readlink -f "${1:-build/bin/zipwire_perf}")
[[ -x $bin ]] || { echo "softroce_pkts: $bin is not an executable" >&2; exit 2; }
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec flock /tmp/zw-guest.lock "$root/tests/softroce/guest.sh" bash "$(readlink -f "$0")" --in-guest \
  "$bin" "$size" "$iters" "$rounds"
