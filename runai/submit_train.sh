#!/usr/bin/env bash
# Submit a preemptible prefix training workload to Run:ai. Run the same command again to continue
# the run: the trainer resumes from <runs_root>/<run_name>/ on the PVC; this script has no resume logic.
#
# usage: runai/submit_train.sh [options] RUN_NAME [CONFIG.yaml] [key=value ...]
#
# options (environment variable, default):
#   --image IMAGE        PREFIX_IMAGE       container image with prefix's dependencies (prefix:latest)
#   --project NAME       RUNAI_PROJECT      Run:ai project (the CLI's configured default)
#   --pvc NAME           PREFIX_PVC         PVC mounted at /home/apluser (home-apluser)
#   --workdir DIR        PREFIX_WORKDIR     prefix checkout inside the pod (/home/apluser/prefix)
#   --gpus N             PREFIX_GPUS        GPUs (= training processes) per pod (1)
#   --nodes N            PREFIX_NODES       pods; more than 1 submits a distributed PyTorch workload (1)
#   --cpu N              PREFIX_CPU         CPU cores requested per pod (8)
#   --memory SIZE        PREFIX_MEMORY      memory requested per pod (32G)
#   --node-pool NAME     PREFIX_NODE_POOL   Run:ai node pool (any)
#   --env KEY=VALUE      PREFIX_EXTRA_ENV   extra environment in the pod; repeatable (space-separated in the variable)
#   --cli new|old|auto   PREFIX_RUNAI_CLI   'runai training ...' (v2.18+) or 'runai submit ...' (auto: ask runai)
#   --dry-run                               print the runai commands, run none
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}
die() {
  echo "submit_train: $*" >&2
  exit 2
}

image=${PREFIX_IMAGE:-prefix:latest}
project=${RUNAI_PROJECT:-}
pvc=${PREFIX_PVC:-home-apluser}
workdir=${PREFIX_WORKDIR:-/home/apluser/prefix}
gpus=${PREFIX_GPUS:-1}
nodes=${PREFIX_NODES:-1}
cpu=${PREFIX_CPU:-8}
memory=${PREFIX_MEMORY:-32G}
node_pool=${PREFIX_NODE_POOL:-}
cli=${PREFIX_RUNAI_CLI:-auto}
dry_run=0
read -r -a extra_env <<< "${PREFIX_EXTRA_ENV:-}"

while [ $# -gt 0 ]; do
  case $1 in
    --image) image=${2:?--image needs a value}; shift 2 ;;
    --project) project=${2:?--project needs a value}; shift 2 ;;
    --pvc) pvc=${2:?--pvc needs a value}; shift 2 ;;
    --workdir) workdir=${2:?--workdir needs a value}; shift 2 ;;
    --gpus) gpus=${2:?--gpus needs a value}; shift 2 ;;
    --nodes) nodes=${2:?--nodes needs a value}; shift 2 ;;
    --cpu) cpu=${2:?--cpu needs a value}; shift 2 ;;
    --memory) memory=${2:?--memory needs a value}; shift 2 ;;
    --node-pool) node_pool=${2:?--node-pool needs a value}; shift 2 ;;
    --env) extra_env+=("${2:?--env needs KEY=VALUE}"); shift 2 ;;
    --cli) cli=${2:?--cli needs new, old or auto}; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done

[ $# -ge 1 ] || die "a run name is required: runai/submit_train.sh RUN_NAME [CONFIG.yaml] [key=value ...]"
run_name=$1
shift
[[ $run_name =~ ^[a-z0-9][a-z0-9._-]{0,62}$ ]] ||
  die "run name '$run_name' is not allowed: use lowercase letters, digits, -, _ and . (at most 63, starting with a letter or digit)"
config=yamls/base.yaml
if [ $# -ge 1 ] && [[ $1 != *=* ]]; then
  config=$1
  shift
fi
[ -f "$config" ] || die "config file $config does not exist (paths are relative to the prefix checkout, also in the pod)"
for override in "$@"; do
  [[ $override == *=* ]] || die "override '$override' is not of the form key=value"
  case $override in
    run_name=*|runs_root=*) die "$override cannot be overridden here: the run name is the first argument and runs live on the PVC" ;;
  esac
done
for setting in "gpus=$gpus" "nodes=$nodes" "cpu=$cpu"; do
  [[ ${setting#*=} =~ ^[1-9][0-9]*$ ]] || die "--${setting%%=*} must be a positive whole number, got '${setting#*=}'"
done
for kv in ${extra_env[@]+"${extra_env[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$kv' is not of the form KEY=VALUE"
done
case $cli in new|old|auto) ;; *) die "--cli must be new, old or auto, got '$cli'" ;; esac

# A Kubernetes name (lowercase letters, digits, '-'), stable for a run name. Run:ai adds suffixes for
# pods, so it stays short; a run name that had to be changed gets a hash so that 'a_b' and 'a.b' differ.
workload=${run_name//[._]/-}
workload=${workload:0:32}
workload=${workload%-}
if [ "$workload" != "$run_name" ]; then
  workload="$workload-$(printf '%s' "$run_name" | cksum | cut -c1-6)"
fi

if ! command -v runai >/dev/null 2>&1; then
  [ "$dry_run" = 1 ] || { echo "submit_train: the runai CLI is not on PATH; install it and log in (runai login)" >&2; exit 1; }
  [ "$cli" != auto ] || cli=new
elif [ "$cli" = auto ]; then
  if runai training --help >/dev/null 2>&1; then cli=new; else cli=old; fi
fi

project_args=()
[ -z "$project" ] || project_args=(-p "$project")
pod_env=(-e "PREFIX_RUNS_ROOT=/home/apluser/runs" -e "PREFIX_GPUS=$gpus" -e "PREFIX_NNODES=$nodes")
for kv in ${extra_env[@]+"${extra_env[@]}"}; do
  pod_env+=(-e "$kv")
done
pool_args=()
pod_command=(--command -- bash runai/pod_train.sh "$run_name" "$config" "$@")

if [ "$cli" = new ]; then
  [ -z "$node_pool" ] || pool_args=(--node-pools "$node_pool")
  common=("${project_args[@]+"${project_args[@]}"}" -i "$image" -g "$gpus" --cpu-core-request "$cpu"
          --cpu-memory-request "$memory" "${pool_args[@]+"${pool_args[@]}"}"
          --existing-pvc "claimname=$pvc,path=/home/apluser" --working-dir "$workdir" "${pod_env[@]}")
  if [ "$nodes" -gt 1 ]; then
    kind=(training pytorch)
    submit=(runai training pytorch submit "$workload" --workers "$((nodes - 1))" --master-gpu-devices-request "$gpus"
            "${common[@]}" "${pod_command[@]}")
  else
    kind=(training)
    submit=(runai training submit "$workload" "${common[@]}" "${pod_command[@]}")
  fi
  describe=(runai "${kind[@]}" describe "$workload" "${project_args[@]+"${project_args[@]}"}" -o json)
  delete=(runai "${kind[@]}" delete "$workload" "${project_args[@]+"${project_args[@]}"}")
else
  [ -z "$node_pool" ] || pool_args=(--node-pools "$node_pool")
  common=("${project_args[@]+"${project_args[@]}"}" -i "$image" -g "$gpus" --cpu "$cpu" --memory "$memory"
          "${pool_args[@]+"${pool_args[@]}"}" --existing-pvc "claimname=$pvc,path=/home/apluser"
          --working-dir "$workdir" --preemptible "${pod_env[@]}")
  if [ "$nodes" -gt 1 ]; then
    submit=(runai submit-dist pytorch "$workload" --workers "$((nodes - 1))" "${common[@]}" "${pod_command[@]}")
  else
    submit=(runai submit "$workload" "${common[@]}" "${pod_command[@]}")
  fi
  describe=(runai describe job "$workload" "${project_args[@]+"${project_args[@]}"}" -o json)
  delete=(runai delete job "$workload" "${project_args[@]+"${project_args[@]}"}")
fi

show() {
  printf '%q ' "$@" | sed 's/ $//'
  echo
}

if [ "$dry_run" = 1 ]; then
  echo "# workload $workload for run $run_name ($cli Run:ai CLI); an existing finished or failed workload of that name is deleted first:"
  show "${delete[@]}"
  show "${submit[@]}"
  exit 0
fi

# A workload of this name from an earlier submission: still active means the run is training now,
# so refuse; finished or failed means it only holds the name, so delete it and submit again.
if status=$("${describe[@]}" 2>/dev/null); then
  if grep -Eqi '"?(status|phase)"?[": ]+"?(running|pending|initializing|creating|containercreating|scheduled|queued|resuming|restarting|terminating)' <<< "$status"; then
    echo "submit_train: workload $workload is still active, training run $run_name; follow it with: runai $([ "$cli" = new ] && echo 'training ')logs $workload" >&2
    echo "submit_train: to restart it anyway (it checkpoints on SIGTERM), delete it first: $(show "${delete[@]}")" >&2
    exit 1
  fi
  echo "submit_train: deleting the finished or failed workload $workload (the run itself is safe on the PVC)"
  "${delete[@]}"
fi
echo "submit_train: submitting run $run_name as workload $workload"
show "${submit[@]}"
"${submit[@]}"
echo "submit_train: follow it with: runai $([ "$cli" = new ] && echo 'training ')logs $workload -f; outputs in /home/apluser/runs/$run_name/ on PVC $pvc"
