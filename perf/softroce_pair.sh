# Sourced by the perf scripts that run inside the soft-RoCE guest
# (peers_softroce.sh, softroce_ab.sh, softroce_pkts.sh).
#
# softroce_pair NAME SERVER... -- CLIENT...
#   Starts SERVER in the background, runs CLIENT until it gets through (it
#   retries while the server is not listening yet, up to 40 tries 0.25 s
#   apart), then waits for SERVER. Each command runs under a timeout of
#   ${SOFTROCE_PAIR_TIMEOUT:-90} s. The client's output is left in
#   /tmp/NAME.cli, the server's in /tmp/NAME.srv. Returns 0 when both exited 0,
#   else 1 after saying which failed and showing the end of both outputs.
softroce_pair() {
  local name=$1 t=${SOFTROCE_PAIR_TIMEOUT:-90}
  shift
  local srv=()
  while [[ $1 != -- ]]; do
    srv+=("$1")
    shift
  done
  shift
  timeout "$t" "${srv[@]}" >"/tmp/$name.srv" 2>&1 &
  local sp=$! tries=0
  until timeout "$t" "$@" >"/tmp/$name.cli" 2>&1; do
    tries=$((tries + 1))
    if ((tries >= 40)); then break; fi
    sleep 0.25
  done
  local rs=0
  wait $sp || rs=$?
  if ((tries < 40 && rs == 0)); then return 0; fi
  echo "softroce_pair: $name failed (client tries=$tries, server rc=$rs)" >&2
  tail -5 "/tmp/$name.cli" "/tmp/$name.srv" >&2
  return 1
}
