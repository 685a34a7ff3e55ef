#!/usr/bin/env bash
# Interleaved A/B rounds inside one soft-RoCE guest boot: each zipwire_perf
# build given (each with its own environment), then perftest, on rxe0, for
# every size, ROUNDS times; the order of the zipwire builds alternates from
# round to round. Prints each round and the median per column. For comparing
# builds, or a build with a setting on and off, where separate runs of
# perf/peers_softroce.sh would differ by more than the effect (the guest's
# figures jump between host states from one minute to the next).
#
# Usage: perf/softroce_ab.sh [-t write_lat|write_bw] [-s SIZES] [-n ITERS] [-r ROUNDS]
#          [NAME=BINARY[,VAR=VALUE...] ...]
#   -t   the test (default write_lat; the peer is ib_write_lat / ib_write_bw)
#   -s   comma-separated message sizes in bytes (default 8)
#   -n   iterations per run (default 3000)
#   -r   rounds (default 7)
# With no NAME=BINARY only perftest runs (e.g. its latency by size:
# `perf/softroce_ab.sh -s 8,64,128 -r 6`). Figures: t_typical (median, usec)
# for write_lat, BW average (MiB/s) for write_bw.
#   perf/softroce_ab.sh -r 15 old=/tmp/zipwire_perf.old new=build/bin/zipwire_perf
#   perf/softroce_ab.sh -t write_bw -s 65536 -n 600 events=build/bin/zipwire_perf \
#       mailbox_off=build/bin/zipwire_perf,ZIPWIRE_IB_MAILBOX=0
# Exit status: 0 when every run gave a figure, 1 otherwise, 77 when the
# guest cannot start (tests/softroce/guest.sh says why).
set -euo pipefail

if [[ ${1:-} == --in-guest ]]; then
  shift
  test=$1 sizes=$2 iters=$3 rounds=$4
  shift 4
  export ZIPWIRE_IB_DEVICE=rxe0 ZIPWIRE_IB_GID_INDEX=1
  IP=10.11.0.1 port=21000 fail=0
  peer=ib_${test}
  col=5 && [[ $test == write_bw ]] && col=4
  source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/softroce_pair.sh"
  # run NAME BINARY ENV SIZE: one client/server pair; prints the figure ("-"
  # when there is none; softroce_pair says why on stderr).
  run() {
    local name=$1 bin=$2 env=$3 size=$4
    local -a envs=()
    [[ -n $env ]] && IFS=, read -r -a envs <<<"$env"
    port=$((port + 1))
    if [[ $bin == peer ]]; then
      softroce_pair "ab_$name" "$peer" -d rxe0 -x 1 -F -p $port -s "$size" -n "$iters" -- \
        "$peer" -d rxe0 -x 1 -F -p $port -s "$size" -n "$iters" $IP || true
    else
      softroce_pair "ab_$name" env "${envs[@]}" "$bin" -t verbs -p $port --test "$test" --timeout 60 -- \
        env "${envs[@]}" "$bin" -t verbs -p $port --test "$test" -s "$size" -n "$iters" --timeout 60 $IP || true
    fi
    awk -v s="$size" -v c=$col '$1 == s && NF >= c {v = $c} END {if (v == "") print "-"; else print v}' \
      "/tmp/ab_$name.cli"
  }
  names=() bins=() envs=()
  for spec in "$@"; do
    names+=("${spec%%=*}")
    rest=${spec#*=}
    bins+=("${rest%%,*}")
    [[ $rest == *,* ]] && envs+=("${rest#*,}") || envs+=("")
  done
  IFS=, read -r -a size_list <<<"$sizes"
  : >/tmp/ab.tsv
  for ((r = 1; r <= rounds; r++)); do
    for size in "${size_list[@]}"; do
      order=()
      for ((i = 0; i < ${#names[@]}; i++)); do order+=($i); done
      if ((r % 2 == 0)); then
        rev=()
        for ((i = ${#order[@]} - 1; i >= 0; i--)); do rev+=("${order[$i]}"); done
        order=("${rev[@]}")
      fi
      line="round $r size $size:"
      for i in "${order[@]}"; do
        v=$(run "${names[$i]}" "${bins[$i]}" "${envs[$i]}" "$size")
        [[ $v == - ]] && fail=1
        echo "${names[$i]}	$size	$v" >>/tmp/ab.tsv
        line+=" ${names[$i]} $v"
      done
      v=$(run peer peer "" "$size")
      [[ $v == - ]] && fail=1
      echo "$peer	$size	$v" >>/tmp/ab.tsv
      echo "$line $peer $v"
    done
  done
  echo
  echo "medians of $rounds rounds ($test, $( [[ $test == write_lat ]] && echo usec || echo MiB/s)):"
  python3 - /tmp/ab.tsv <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, size, v = line.rstrip("\n").split("\t")
    if v != "-":
        rows.setdefault((name, int(size)), []).append(float(v))
for (name, size), vals in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    print(f"  {size:>8} B  {name:<16} {statistics.median(vals):10.2f}   (n={len(vals)}, "
          f"{min(vals):.2f}-{max(vals):.2f})")
EOF
  exit $fail
fi

test=write_lat sizes=8 iters=3000 rounds=7
while getopts "t:s:n:r:" o; do
  case $o in
    t) test=$OPTARG ;;
    s) sizes=$OPTARG ;;
    n) iters=$OPTARG ;;
    r) rounds=$OPTARG ;;
    *) sed -n '2,25p' "$0" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ $test == write_lat || $test == write_bw ]] || { echo "softroce_ab: -t write_lat or write_bw" >&2; exit 2; }
[[ $sizes =~ ^[0-9]+(,[0-9]+)*$ && $iters =~ ^[1-9][0-9]*$ && $rounds =~ ^[1-9][0-9]*$ ]] ||
  { echo "softroce_ab: -s SIZES (comma-separated), -n and -r positive integers" >&2; exit 2; }
specs=()
for spec in "$@"; do
  [[ $spec == *=* ]] || { echo "softroce_ab: '$spec' is not NAME=BINARY[,VAR=VALUE...]" >&2; exit 2; }
  bin=${spec#*=}
  bin=${bin%%,*}
  [[ -x $bin ]] || { echo "softroce_ab: $bin is not an executable" >&2; exit 2; }
  specs+=("${spec%%=*}=$(readlink -f "$bin")${spec#*="$bin"}")
done
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec flock /tmp/zw-guest.lock "$root/tests/softroce/guest.sh" bash "$(readlink -f "$0")" --in-guest \
  "$test" "$sizes" "$iters" "$rounds" "${specs[@]}"
