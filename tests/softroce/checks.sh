#!/bin/bash
# checks.sh CHECK [ARGS...]: the soft-RoCE checks, run INSIDE the guest
# (tests/softroce/guest.sh starts it there). One boot can run several:
#   perftest                 ib_write_bw server + client on rxe0 (the self-check)
#   conformance BIN          the verbs backend's conformance tests (gtest BIN):
#                            side-channel and rdma_cm connections (verbs,
#                            verbs_rdmacm), then a rdma_cm subset with 4 QPs
#   perf BIN [DEV_S DEV_C]   zipwire_perf -t verbs beside ib_write_bw, same sizes;
#                            server on DEV_S, client on DEV_C (default rxe0 both);
#                            then both once more with rdma_cm (-R) and 2 QPs
set -u
IP=10.11.0.1

# pair NAME SERVER-CMD... -- CLIENT-CMD...: the client retries until the
# server listens; both must exit 0.
pair() {
  local name=$1; shift
  local srv=()
  while [ "$1" != -- ]; do srv+=("$1"); shift; done
  shift
  timeout 120 "${srv[@]}" >"/tmp/$name.srv" 2>&1 &
  local sp=$! tries=0
  until timeout 120 "$@" >"/tmp/$name.cli" 2>&1; do
    tries=$((tries + 1))
    if [ $tries -ge 20 ]; then break; fi
    sleep 0.5
  done
  wait $sp
  local rs=$?
  cat "/tmp/$name.cli"
  if [ $tries -lt 20 ] && [ $rs -eq 0 ]; then
    echo "PASS $name"
    return 0
  fi
  echo "FAIL $name (client tries=$tries, server rc=$rs)"
  cat "/tmp/$name.srv"
  return 1
}

check=${1:?usage: checks.sh perftest|conformance BIN|perf BIN [DEV_S DEV_C]}
shift
case "$check" in
  perftest)
    rdma link show
    pair ib_write_bw ib_write_bw -d rxe0 -x 1 -F -n 1000 -- ib_write_bw -d rxe0 -x 1 -F -n 1000 $IP
    ;;
  conformance)
    bin=${1:?conformance needs the test binary}
    export ZIPWIRE_IB_DEVICE=${ZIPWIRE_IB_DEVICE:-rxe0} ZIPWIRE_IB_GID_INDEX=${ZIPWIRE_IB_GID_INDEX:-1}
    # verbs_rdmacm listens and connects on rxe0's address (rdma_cm needs one).
    export ZIPWIRE_TEST_RDMACM_HOST=${ZIPWIRE_TEST_RDMACM_HOST:-$IP}
    # The host skips these (no device); here a skip means the backend did not
    # see rxe0, which is a failure. verbs_rdmacm leaves out the long data-path
    # cases (the same code as verbs once connected) to keep the tier short;
    # its large write runs below, striped over 4 QPs.
    skip_cm='*ThousandsOf*/verbs_rdmacm:*ReadsFetchRemoteBytes*/verbs_rdmacm:*LargeWrite*/verbs_rdmacm'
    out=$("$bin" --gtest_filter="*verbs*:*Verbs*:-$skip_cm" 2>&1)
    rc=$?
    # rdma_cm with several QPs per peer (one cm_id each): connection, striping,
    # refusal and loss, the cases where the QP count matters.
    multi='*ImmediatesArrive*/verbs_rdmacm:*LargeWrite*/verbs_rdmacm:*DuplicateRank*/verbs_rdmacm'
    multi+=':*PeerDestroyFailsPendingOperations/verbs_rdmacm:*PostRightAfterConnect*/verbs_rdmacm'
    out+=$'\n'$(ZIPWIRE_IB_QPS=4 "$bin" --gtest_filter="$multi" 2>&1)
    rc2=$?
    echo "$out" | grep -vE '^\[ +(RUN|OK) +\]'
    if echo "$out" | grep -q 'no RDMA device\|ZIPWIRE_TEST_RDMACM_HOST'; then
      echo "FAIL conformance: the verbs tests found no device (or rdma_cm address) inside the guest"
      exit 1
    fi
    [ $rc -eq 0 ] && exit $rc2
    exit $rc
    ;;
  perf)
    bin=${1:?perf needs the zipwire_perf binary}
    dev_s=${2:-rxe0} dev_c=${3:-rxe0}
    ip_s=$IP
    [ "$dev_s" = rxe1 ] && ip_s=10.12.0.1
    sizes=${ZIPWIRE_SOFTROCE_PERF_SIZES:-65536}
    iters=${ZIPWIRE_SOFTROCE_PERF_ITERS:-500}
    fail=0
    for s in $sizes; do
      pair "ib_write_bw_$s" ib_write_bw -d "$dev_s" -x 1 -F -s "$s" -n "$iters" -- \
        ib_write_bw -d "$dev_c" -x 1 -F -s "$s" -n "$iters" "$ip_s" || fail=1
    done
    port=18515
    for s in $sizes; do
      pair "zipwire_perf_$s" env ZIPWIRE_IB_DEVICE="$dev_s" ZIPWIRE_IB_GID_INDEX=1 \
        "$bin" -t verbs -p $port --timeout 60 -- \
        env ZIPWIRE_IB_DEVICE="$dev_c" ZIPWIRE_IB_GID_INDEX=1 \
        "$bin" -t verbs -p $port -s "$s" -n "$iters" --timeout 60 "$ip_s" || fail=1
      port=$((port + 1))
    done
    # rdma_cm (perftest -R) at the first size, 2 QPs each: rdma_cm resolves
    # the device from the address, which must agree with DEV_S / DEV_C.
    s=${sizes%% *}
    pair "ib_write_bw_R_$s" ib_write_bw -R -d "$dev_s" -x 1 -F -q 2 -s "$s" -n "$iters" -- \
      ib_write_bw -R -d "$dev_c" -x 1 -F -q 2 -s "$s" -n "$iters" "$ip_s" || fail=1
    pair "zipwire_perf_R_$s" "$bin" -t verbs -R -d "$dev_s" -q 2 -p $port --timeout 60 -- \
      "$bin" -t verbs -R -d "$dev_c" -q 2 -p $port -s "$s" -n "$iters" --timeout 60 "$ip_s" || fail=1
    exit $fail
    ;;
  *)
    echo "unknown check '$check'" >&2
    exit 2
    ;;
esac
