#!/usr/bin/env bash
# The first process of a training pod: starts the trainer, forwards a preemption's SIGTERM to every
# training process, waits until all of them have saved and exited, and keeps the pod's console in
# <runs_root>/<run_name>/logs/pod-<node>.log. It holds no resume logic: the trainer resumes by itself.
#
# usage: runai/pod_train.sh RUN_NAME CONFIG.yaml [key=value ...]
#
# Environment:
#   PREFIX_RUNS_ROOT  runs root on the PVC                      (default /home/apluser/runs)
#   PREFIX_GPUS       training processes in this pod            (default: the GPUs visible, or 1)
#   PREFIX_NNODES     pods in the workload                      (default 1)
#   PREFIX_OVERRIDES  more key=value overrides: base64 (unpadded) of a JSON list (submit_train.sh passes them so)
#   RANK, MASTER_ADDR, MASTER_PORT, and PET_NNODES or WORLD_SIZE (pods): set by the PyTorch operator
#   GLOO_SOCKET_IFNAME  gloo's network interface   (default with several pods: the one that routes to MASTER_ADDR)
set -uo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 RUN_NAME CONFIG.yaml [key=value ...]" >&2
  exit 2
fi
run_name=$1
config=$2
shift 2
if ! [[ $run_name =~ ^[a-z0-9][a-z0-9._-]{0,62}$ ]]; then
  echo "pod_train: run name '$run_name' is not allowed: use lowercase letters, digits, -, _ and ." >&2
  exit 2
fi

runs_root=${PREFIX_RUNS_ROOT:-/home/apluser/runs}
nnodes=${PREFIX_NNODES:-1}
node=0
# The operator counts the workload's pods: a pod that thinks otherwise would train alone, or wait forever.
operator_pods=${PET_NNODES:-${WORLD_SIZE:-}}
if [ -n "$operator_pods" ] && [ "$operator_pods" != "$nnodes" ]; then
  echo "pod_train: the PyTorch operator runs $operator_pods pods (PET_NNODES/WORLD_SIZE) but PREFIX_NNODES is $nnodes: refusing to start; submit with runai/submit_train.sh --nodes $operator_pods" >&2
  exit 2
fi
if [ -n "${PREFIX_OVERRIDES:-}" ]; then
  # Undecodable overrides would train the wrong experiment: refuse to start instead.
  decoded=$(mktemp)
  if ! python3 -c '
import base64, binascii, json, os, sys
try:
    encoded = os.environ["PREFIX_OVERRIDES"]
    overrides = json.loads(base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True))
except (binascii.Error, ValueError) as e:
    sys.exit(f"pod_train: PREFIX_OVERRIDES is not base64 of a JSON list ({e}): refusing to start; submit with runai/submit_train.sh")
if not isinstance(overrides, list) or not all(isinstance(a, str) and "=" in a for a in overrides):
    sys.exit("pod_train: PREFIX_OVERRIDES must hold a JSON list of key=value strings: refusing to start")
sys.stdout.write("".join(a + "\0" for a in overrides))' > "$decoded"; then
    rm -f "$decoded"
    exit 2
  fi
  mapfile -d '' -t from_env < "$decoded"
  rm -f "$decoded"
  set -- "$@" ${from_env[@]+"${from_env[@]}"}
fi
# A start in a pod is a cluster's: it waits for a predecessor still in its grace period (prefix.run.runlock).
export PREFIX_POD=${HOSTNAME:-pod}
if [ -z "${PREFIX_GPUS:-}" ]; then
  PREFIX_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "$PREFIX_GPUS" -ge 1 ] 2>/dev/null || PREFIX_GPUS=1
fi

cmd=(composer -n "$PREFIX_GPUS")
if [ "$nnodes" -gt 1 ]; then
  node=${RANK:?RANK (the index of this pod) must be set for a multi-node run}
  cmd+=(--world_size "$((nnodes * PREFIX_GPUS))" --node_rank "$node"
        --master_addr "${MASTER_ADDR:?MASTER_ADDR must be set for a multi-node run}"
        --master_port "${MASTER_PORT:?MASTER_PORT must be set for a multi-node run}")
fi
# Gloo (prefix's per-step agreement, DCP's checkpoint group) finds its address by resolving the pod's
# hostname, which in many clusters is unresolvable or names a loopback address: then the pods cannot
# connect. Use the interface that routes to the master instead, unless the user chose one.
gloo_note=
if [ "$nnodes" -gt 1 ] && [ -z "${GLOO_SOCKET_IFNAME:-}" ]; then
  if GLOO_SOCKET_IFNAME=$(python3 - "$MASTER_ADDR" <<'PY'
import fcntl, socket, struct, sys
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.connect((socket.gethostbyname(sys.argv[1]), 9))  # a UDP connect sends nothing: it picks the route's source
    source = s.getsockname()[0]
    for _, name in socket.if_nameindex():
        try:
            address = fcntl.ioctl(s.fileno(), 0x8915, struct.pack('256s', name.encode()[:15]))[20:24]  # SIOCGIFADDR
        except OSError:
            continue
        if socket.inet_ntoa(address) == source:
            print(name)
            sys.exit(0)
sys.exit(f'no interface holds {source}')
PY
  ); then
    export GLOO_SOCKET_IFNAME
    gloo_note=" GLOO_SOCKET_IFNAME=$GLOO_SOCKET_IFNAME (the route to $MASTER_ADDR)"
  else
    unset GLOO_SOCKET_IFNAME
    gloo_note=" GLOO_SOCKET_IFNAME unset: no interface found for $MASTER_ADDR; set it if the pods cannot connect"
  fi
fi
# The launcher reads these from the environment too; the flags above are the ones that count.
unset WORLD_SIZE RANK
cmd+=(-m prefix.train "$config" "run_name=$run_name" "runs_root=$runs_root" "$@")

log_dir="$runs_root/$run_name/logs"
mkdir -p "$log_dir"
# The console goes to the pod's log through a copy of this script's own, so that the launcher's only
# children are the training ranks; the training runs in a session of its own. The copy (prefix.run.tee,
# as each rank's own) writes the console at once and the file when its volume answers: a PVC that hangs
# holds neither the console nor the training nor this script.
exec 3> >(exec python3 -m prefix.run.tee "$log_dir/pod-$node.log")
copy=$!
say() { echo "pod_train: $*" >&3; }
say "$(date -u +%FT%TZ) node $node of $nnodes on $(hostname):$gloo_note ${cmd[*]}"
setsid "${cmd[@]}" >&3 2>&1 &
pid=$!
# The launcher's children: the training ranks (/proc, so that the image needs no procps).
# shellcheck disable=SC2329  # invoked by forward
ranks() {
  local stat fields ppid
  for stat in /proc/[0-9]*/stat; do
    fields=$(<"$stat") 2>/dev/null || continue
    fields=${fields##*) }
    read -r _ ppid _ <<<"$fields"
    [ "$ppid" = "$pid" ] && echo "${stat//[^0-9]/}"
  done
}
# Whether a process of the training's session is still running, other than the ranks' console copies
# (prefix.run.tee), which are waited for apart.
training_left() {
  local stat fields state pgrp args
  for stat in /proc/[0-9]*/stat; do
    { read -r fields <"$stat"; } 2>/dev/null || continue
    read -r state _ pgrp _ <<<"${fields##*) }"
    [ "$pgrp" = "$pid" ] && [ "$state" != Z ] || continue
    { mapfile -d '' -t args <"${stat%stat}cmdline"; } 2>/dev/null || continue
    [[ " ${args[*]} " == *" prefix.run.tee "* ]] || return 0
  done
  return 1
}
# Wait at most 12 s while process $1 (or group -$1) runs: a console copy gives up on a file that does not
# answer 10 s after its input ended; one that has not by then (stopped, stuck in the kernel) is killed.
wait_for_copy() {
  local i
  for ((i = 0; i < 24; i++)); do
    kill -0 -- "$1" 2>/dev/null || return 0
    sleep 0.5
  done
  echo "pod_train: $(date -u +%FT%TZ) a console copy into $log_dir did not finish in 12 s: its last lines are not there" >&2
  kill -KILL -- "$1" 2>/dev/null || true
}
# To the ranks, not to the composer launcher: on SIGTERM the launcher passes it on and kills its ranks
# 30 s later, which would cut a long final checkpoint short. Before the ranks exist, to the launcher.
# shellcheck disable=SC2329  # invoked by the traps below
forward() {
  say "$1 received, forwarding it to the training processes"
  local targets
  targets=$(ranks)
  # shellcheck disable=SC2086  # one pid per word
  kill -TERM ${targets:-$pid} 2>/dev/null || true
}
trap 'forward SIGTERM' TERM
trap 'forward SIGINT' INT

while true; do
  wait "$pid"
  status=$?
  kill -0 "$pid" 2>/dev/null || break  # else wait was interrupted by a trapped signal
done
# Ranks outlive a launcher ended by SIGTERM while they save: wait for them, however long, then for their
# console copies, a bounded time.
while training_left; do
  sleep 0.5
done
wait_for_copy "-$pid"
trap '' TERM INT  # the training is over: nothing left to forward
say "$(date -u +%FT%TZ) training exited with status $status"
exec 3>&-
wait_for_copy "$copy"
exit "$status"
