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
#   --grace DURATION     PREFIX_GRACE       termination grace period: time a preempted pod has to save, and
#                                           how long its replacement waits for it (lock_wait) (600s)
#   --node-pool NAME     PREFIX_NODE_POOL   Run:ai node pool (any)
#   --env KEY=VALUE      PREFIX_EXTRA_ENV   extra environment in the pod; repeatable (space-separated in the variable).
#                                           The value is stored in the workload's spec in plain text, so a KEY that
#                                           names a secret (holds KEY, TOKEN, SECRET, PASSWORD, PASSWD or CREDENTIAL,
#                                           in any case) is refused: use --secret-env
#   --secret-env NAME=SECRET:KEY            environment variable NAME in the pod from key KEY of the Kubernetes
#                        PREFIX_SECRET_ENV  secret SECRET in the project's namespace; repeatable. Only this reference
#                                           reaches the spec (the current CLI's --env-secret, the older one's
#                                           -e NAME=SECRET:SECRET,KEY); not with --nodes > 1 on the current CLI
#   --cli new|old|auto   PREFIX_RUNAI_CLI   'runai training ...' (Run:ai 2.18+) or 'runai submit ...' (auto: ask runai)
#   --dry-run                               print the runai commands, run none
#
# The config and overrides are checked first (python -m prefix check, with PREFIX_PYTHON, default python3).
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
  exit 0
}
die() {
  echo "submit_train: $*" >&2
  exit 2
}
fail() {
  echo "submit_train: $*" >&2
  exit 1
}

image=${PREFIX_IMAGE:-prefix:latest}
project=${RUNAI_PROJECT:-}
pvc=${PREFIX_PVC:-home-apluser}
workdir=${PREFIX_WORKDIR:-/home/apluser/prefix}
gpus=${PREFIX_GPUS:-1}
nodes=${PREFIX_NODES:-1}
cpu=${PREFIX_CPU:-8}
memory=${PREFIX_MEMORY:-32G}
grace=${PREFIX_GRACE:-600s}
grace_given=${PREFIX_GRACE:+1}
node_pool=${PREFIX_NODE_POOL:-}
cli=${PREFIX_RUNAI_CLI:-auto}
dry_run=0
read -r -a extra_env <<< "${PREFIX_EXTRA_ENV:-}"
read -r -a secret_env <<< "${PREFIX_SECRET_ENV:-}"

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
    --grace) grace=${2:?--grace needs a duration}; grace_given=1; shift 2 ;;
    --node-pool) node_pool=${2:?--node-pool needs a value}; shift 2 ;;
    --env) extra_env+=("${2:?--env needs KEY=VALUE}"); shift 2 ;;
    --secret-env) secret_env+=("${2:?--secret-env needs NAME=SECRET:KEY}"); shift 2 ;;
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
[[ $config != /* && /$config/ != */../* ]] ||
  die "config path '$config' is outside the checkout: the pod reads it from its own checkout ($workdir); copy it into yamls/"
[ -f "$config" ] || die "config file $config does not exist (paths are relative to the prefix checkout, also in the pod)"
[[ $config =~ ^[A-Za-z0-9._/-]+$ ]] || die "config path '$config' may hold only letters, digits, '.', '_', '-' and '/'"
for override in "$@"; do
  [[ $override == *=* ]] || die "override '$override' is not of the form key=value"
  case $override in
    run_name=*|runs_root=*) die "$override cannot be overridden here: the run name is the first argument and runs live on the PVC" ;;
  esac
done
for setting in "gpus=$gpus" "nodes=$nodes" "cpu=$cpu"; do
  [[ ${setting#*=} =~ ^[1-9][0-9]*$ ]] || die "--${setting%%=*} must be a positive whole number, got '${setting#*=}'"
done
[[ $grace =~ ^[1-9][0-9]*(s|m|h)$ ]] || die "--grace must be a duration like 600s, 10m or 1h, got '$grace'"
reserved=" PREFIX_RUNS_ROOT PREFIX_GPUS PREFIX_NNODES PREFIX_OVERRIDES PREFIX_POD "
# No message here shows an --env value, or a --secret-env argument past its name: either may be a secret.
env_names=" "
for kv in ${extra_env[@]+"${extra_env[@]}"}; do
  name=${kv%%=*}
  [[ $kv == *=* ]] || die "an --env argument without '=' is not of the form KEY=VALUE (not shown: it may be a secret)"
  [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--env '$name=...' is not of the form KEY=VALUE"
  [[ $reserved != *" $name "* ]] || die "--env $name is set by this script (use --gpus, --nodes or an override instead)"
  # The spec holds an --env value in plain text (runai describe shows it): a secret's name is refused.
  [[ ! $(tr '[:lower:]' '[:upper:]' <<< "$name") =~ KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL ]] ||
    die "--env $name looks like a secret, and its value would be stored in plain text in the workload's spec: put it in a Kubernetes secret in the project's namespace and pass --secret-env $name=SECRET_NAME:KEY"
  env_names+="$name "
done
secret_names=" "
for ref in ${secret_env[@]+"${secret_env[@]}"}; do
  name=${ref%%=*}
  [[ $ref == *=* && $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] ||
    die "--secret-env takes NAME=SECRET:KEY (a variable name, a Kubernetes secret's name and one of its keys), not a value"
  # A Kubernetes secret's name (a DNS subdomain) and a key of its data: neither holds ',', ':' or '='.
  [[ ${ref#*=} =~ ^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?:[-._A-Za-z0-9]{1,253}$ ]] ||
    die "--secret-env $name: expected $name=SECRET:KEY, a Kubernetes secret's name (lowercase letters, digits, '-', '.') and one of its keys, not a value"
  [[ $reserved != *" $name "* ]] || die "--secret-env $name is set by this script"
  [[ $env_names != *" $name "* ]] || die "$name is given by both --env and --secret-env"
  [[ $secret_names != *" $name "* ]] || die "--secret-env $name is given twice"
  secret_names+="$name "
done
case $cli in new|old|auto) ;; *) die "--cli must be new, old or auto, got '$cli'" ;; esac
# The config as the trainer will read it, checked here (without torch, in well under a second) rather than
# after the pod waited for its GPUs. Paths on the PVC (a model's folder) are the pod's business.
python=${PREFIX_PYTHON:-python3}
check_status=0
check=$("$python" -m prefix check --no-paths "$config" "run_name=$run_name" "$@" 2>&1) || check_status=$?
case $check_status in
  0) ;;
  2) die "${check##*$'\n'}" ;;
  *) die "cannot check the config with $python (${check##*$'\n'}): set PREFIX_PYTHON to the Python of prefix's .venv" ;;
esac

# A Kubernetes Service name (Run:ai makes one per distributed workload): lowercase letters, digits and
# '-', starting with a letter, short (Run:ai adds suffixes for pods). Stable for a run name; a name
# that had to change gets a hash of the run name, so that 'a_b' and 'a.b' differ.
workload=${run_name//[._]/-}
[[ $workload =~ ^[a-z] ]] || workload="run-$workload"
workload=${workload:0:32}
workload=${workload%-}
if [ "$workload" != "$run_name" ]; then
  crc=$(printf '%s' "$run_name" | cksum)
  workload="$workload-$(printf '%06d' "$(( ${crc%% *} % 1000000 ))")"
fi

# A replacement pod waits for its predecessor as long as that one may save (an explicit lock_wait= wins).
lock_wait=lock_wait=${grace/%m/min}
for override in "$@"; do
  [[ $override != lock_wait=* ]] || lock_wait=
done
# The overrides travel to the pod as base64 of a JSON list, unpadded: spaces and quotes reach the trainer intact,
# and no CLI can cut them (every override holds '=', at which the older CLI's chart splits an -e value).
overrides_b64=$(python3 -c '
import base64, json, sys
print(base64.b64encode(json.dumps([a for a in sys.argv[1:] if a]).encode()).decode().rstrip("="))' "$lock_wait" "$@")

have_runai=1
command -v runai >/dev/null 2>&1 || have_runai=0
[ "$have_runai" = 1 ] || [ "$dry_run" = 1 ] || fail "the runai CLI is not on PATH; install it and log in (runai login)"

# What the cluster's CLI documents, asked of the exact subcommand (flags differ between versions).
help_of() {
  [ "$have_runai" = 1 ] || return 1
  runai "$@" --help 2>/dev/null
}
knows() {  # knows "HELP TEXT" FLAG
  grep -Eq -- "(^|[ ,])$2([ =,]|\$)" <<< "$1"
}

if [ "$cli" = auto ]; then
  if [ "$have_runai" = 0 ] || help_of training submit >/dev/null; then cli=new; else cli=old; fi
fi

if [ "$cli" = new ]; then
  if [ "$nodes" -gt 1 ]; then
    kind=(training pytorch)
  else
    kind=(training)
  fi
  if ! help=$(help_of "${kind[@]}" submit) && [ "$have_runai" = 1 ]; then
    if [ "$nodes" -gt 1 ] && help_of distributed submit >/dev/null; then
      fail "this runai CLI (Run:ai 2.18) has 'runai distributed submit' but not 'runai training pytorch submit', which multi-node runs need to give the master pod the workers' command: upgrade the CLI, or use --nodes 1"
    fi
    fail "this runai CLI has no 'runai ${kind[*]} submit': use --cli old, or upgrade it"
  fi
  [ "$have_runai" = 1 ] || help='--termination-grace-period --env-secret --master-environment-variable --master-command --master-cpu-core-request --master-cpu-memory-request --master-gpu-devices-request'
  env_flag=-e
  submit=(runai "${kind[@]}" submit "$workload")
  [ -z "$project" ] || submit+=(-p "$project")
  submit+=(-i "$image" -g "$gpus" --cpu-core-request "$cpu" --cpu-memory-request "$memory" --large-shm
           --existing-pvc "claimname=$pvc,path=/home/apluser" --working-dir "$workdir")
  [ -z "$node_pool" ] || submit+=(--node-pools "$node_pool")
else
  kind=()
  if [ "$nodes" -gt 1 ]; then
    sub=(submit-dist pytorch)
  else
    sub=(submit)
  fi
  if ! help=$(help_of "${sub[@]}") && [ "$have_runai" = 1 ]; then
    fail "this runai CLI has no 'runai ${sub[*]}': use --cli new, or check the CLI"
  fi
  [ "$have_runai" = 1 ] || help='--existing-pvc --name'
  env_flag=-e
  if knows "$help" --name; then name_args=(--name "$workload"); else name_args=("$workload"); fi
  if knows "$help" --existing-pvc; then pvc_flag=--existing-pvc; else pvc_flag=--pvc-exists; fi
  submit=(runai "${sub[@]}" "${name_args[@]}")
  [ -z "$project" ] || submit+=(-p "$project")
  submit+=(-i "$image" -g "$gpus" --cpu "$cpu" --memory "$memory" --large-shm
           "$pvc_flag" "claimname=$pvc,path=/home/apluser" --working-dir "$workdir")
  [ -z "$node_pool" ] || submit+=(--node-pools "$node_pool")
fi
[ "$nodes" -le 1 ] || submit+=(--workers "$((nodes - 1))")

if knows "$help" --termination-grace-period; then
  submit+=(--termination-grace-period "$grace")
elif [ -n "$grace_given" ]; then
  fail "this runai CLI has no --termination-grace-period: the pods keep Kubernetes' 30 s, too short for --grace $grace; upgrade the CLI"
else
  echo "submit_train: warning: this runai CLI has no --termination-grace-period; a preempted pod has Kubernetes' 30 s to save" >&2
fi

pod_env=("PREFIX_RUNS_ROOT=/home/apluser/runs" "PREFIX_GPUS=$gpus" "PREFIX_NNODES=$nodes"
         "PREFIX_OVERRIDES=$overrides_b64" ${extra_env[@]+"${extra_env[@]}"})
for kv in "${pod_env[@]}"; do
  submit+=("$env_flag" "$kv")
done
# Secrets pass by reference only: the spec names the Kubernetes secret and key, the pod reads the value from it.
if [ "$secret_names" != " " ]; then
  if [ "$cli" = new ]; then
    knows "$help" --env-secret ||
      fail "this runai CLI's 'runai ${kind[*]} submit' has no --env-secret, which --secret-env needs to pass a secret by reference: upgrade the CLI"
    [ "$nodes" -le 1 ] ||
      fail "'runai training pytorch submit' documents no master-pod form of --env-secret (as --master-environment-variable is -e's), so the master pod would start without${secret_names% }: use --nodes 1 with --secret-env"
  fi
  for ref in "${secret_env[@]}"; do
    name=${ref%%=*} secret=${ref#*=}
    key=${secret#*:} secret=${secret%%:*}
    if [ "$cli" = new ]; then
      submit+=(--env-secret "$name=$secret,key=$key")  # ENV_VARIABLE=secret-name,key=secret-key
    else
      submit+=(-e "$name=SECRET:$secret,$key")  # <ENV-VARIABLE>=SECRET:<secret-name>,<secret-key>
    fi
  done
fi
pod_command=(bash runai/pod_train.sh "$run_name" "$config")

# The PyTorch master pod gets what the workers get; each of these is needed, so a CLI without one is refused.
if [ "$cli" = new ] && [ "$nodes" -gt 1 ]; then
  if knows "$help" --master-environment-variable; then master_env=--master-environment-variable; else master_env=--master-environment; fi
  for flag in --master-command --master-gpu-devices-request --master-cpu-core-request --master-cpu-memory-request "$master_env"; do
    knows "$help" "$flag" || fail "this runai CLI's 'runai training pytorch submit' has no $flag, so the master pod would not train like the workers: upgrade the CLI (Run:ai 2.22+), or use --nodes 1"
  done
  submit+=(--master-command "${pod_command[*]}" --master-gpu-devices-request "$gpus"
           --master-cpu-core-request "$cpu" --master-cpu-memory-request "$memory")
  for kv in "${pod_env[@]}"; do
    submit+=("$master_env" "$kv")
  done
fi
submit+=(--command -- "${pod_command[@]}")

# The describe, delete and logs commands for a workload of this name of kind $1: with the current CLI 'training',
# 'training pytorch' or 'distributed' (Run:ai 2.18's distributed workloads); the older CLI's commands take any job.
commands_for() {
  local -a of
  read -r -a of <<< "$1"
  if [ "$cli" = new ]; then
    describe=(runai "${of[@]}" describe "$workload" ${project:+-p "$project"} -o json)
    delete=(runai "${of[@]}" delete "$workload" ${project:+-p "$project"})
    logs=(runai "${of[@]}" logs "$workload" ${project:+-p "$project"} -f)
  else
    describe=(runai describe job "$workload" ${project:+-p "$project"} -o json)
    delete=(runai delete job "$workload" ${project:+-p "$project"})
    logs=(runai logs "$workload" ${project:+--project "$project"} -f)
  fi
}
submitted_kind=${kind[*]}
commands_for "$submitted_kind"

show() {
  printf '%q ' "$@" | sed 's/ $//'
  echo
}

if [ "$dry_run" = 1 ]; then
  echo "# workload $workload for run $run_name ($cli Run:ai CLI); an existing workload of that name in a final state is deleted first:"
  show "${delete[@]}"
  show "${submit[@]}"
  exit 0
fi

# look_up runs $describe: it succeeds when a workload of this name and kind exists, setting state to the top-level
# status field of its description ('' when there is none), and fails when the CLI says there is none: a failed
# describe whose output (either stream: the older CLI prints its errors on stdout) has a line naming the workload
# and saying "not found" or "does not exist". The older CLI's is "The job NAME does not exist in project P. ...";
# the current CLI's reference documents none, so its "not found" is assumed to name the workload or say "workload". Any other
# failure (not logged in, the API down, permission denied, output that is no JSON description) stops the script:
# it cannot tell whether the name holds a live workload.
errors=$(mktemp)
trap 'rm -f "$errors"' EXIT
look_up() {
  local out status=0 line reason='no message'
  out=$("${describe[@]}" 2>"$errors") || status=$?
  if [ "$status" != 0 ]; then
    local name="((^|[^a-z0-9-])$workload([^a-z0-9-]|\$)|workload)" missing='(not found|does not exist)'
    if grep -Eiq -- "$name.*$missing|$missing.*$name" "$errors" <(printf '%s\n' "$out"); then
      return 1
    fi
    while IFS= read -r line; do  # one line of the error: the first that says error, else the first
      [[ $line =~ [^[:space:]] ]] || continue
      [ "$reason" != 'no message' ] || reason=$line
      if [[ ${line,,} == *error* ]]; then reason=$line; break; fi
    done < <(cat "$errors"; printf '%s\n' "$out")
    fail "cannot tell whether workload $workload exists, so nothing was submitted: $(show "${describe[@]}") failed (exit $status): ${reason:0:300}"
  fi
  state=$(python3 -c '
import json, sys
record = json.loads(sys.stdin.read() or "{}")
fields = {k.lower(): v for k, v in record.items()} if isinstance(record, dict) else {}
state = fields.get("status", fields.get("phase"))
print(state if isinstance(state, str) else "")' <<< "$out" 2>/dev/null) ||
    fail "cannot tell whether workload $workload exists, so nothing was submitted: $(show "${describe[@]}") printed no JSON description"
}
# Each kind of workload that could hold the name: a run submitted with another --nodes is of the other kind. The
# older CLI's 'runai describe job' finds a job of any kind. A kind counts only if this CLI's help documents it.
documents() {
  local help
  help=$(help_of "$@") && grep -Eq -- "runai $*( |\$)" <<< "$help"
}
if [ "$cli" = new ]; then
  kinds=(training)
  if documents training pytorch describe; then
    kinds+=("training pytorch")
  elif documents distributed describe; then
    kinds+=(distributed)
  fi
else
  kinds=("")
fi

# A workload of this name from an earlier submission. Only one in a final state is replaced (it only
# holds the name); any other state, an unknown one included, means it may still be training: refuse.
# The older CLI's final states also include Fail, ContainerCannotRun and Unknown (its job statuses page).
final='completed|succeeded|failed|stopped|timedout|preempted|deleted'
[ "$cli" = new ] || final="$final|fail|containercannotrun|unknown"
finished=() finished_states=()
for of in "${kinds[@]}"; do
  commands_for "$of"
  look_up || continue
  normal=$(tr '[:upper:]' '[:lower:]' <<< "$state" | tr -d ' _-')
  case "|$final|" in
    *"|$normal|"*) finished+=("$of") finished_states+=("$state"); continue ;;
  esac
  echo "submit_train: workload $workload of run $run_name is ${state:-in an unknown state}, not finished: refusing to replace it" >&2
  [ "$of" = "$submitted_kind" ] ||
    echo "submit_train: it is a 'runai $of' workload (another --nodes); this submission would be a 'runai $submitted_kind' one" >&2
  echo "submit_train: follow it with: $(show "${logs[@]}")" >&2
  echo "submit_train: to restart it anyway (it checkpoints on SIGTERM), delete it first: $(show "${delete[@]}")" >&2
  exit 1
done
for i in "${!finished[@]}"; do
  commands_for "${finished[i]}"
  echo "submit_train: deleting the ${finished_states[i]} workload $workload (the run itself is safe on the PVC)"
  "${delete[@]}"
  # Deleting takes a while: the name is taken until it is gone.
  for (( waited = 0; ; waited += 2 )); do
    look_up || break
    [ "$waited" -lt 300 ] || fail "workload $workload is still there (${state:-deleting}) 300 s after its delete; run the same command again later"
    (( waited % 10 )) || echo "submit_train: waiting for workload $workload to be deleted (${state:-deleting})"
    sleep 2
  done
done
commands_for "$submitted_kind"
echo "submit_train: submitting run $run_name as workload $workload"
show "${submit[@]}"
"${submit[@]}"
echo "submit_train: follow it with: $(show "${logs[@]}"); outputs in /home/apluser/runs/$run_name/ on PVC $pvc"
