#!/usr/bin/env bash
# Starts the same `python -m jaxsft.train` command on every worker of a TPU VM or pod slice, in the
# background, each worker logging to ~/jaxsft-logs/RUN/worker-I.log.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<'USAGE'
Usage: scripts/tpu/launch.sh --name NAME --zone ZONE [options] -- TRAIN_ARGS...

Runs `python -m jaxsft.train TRAIN_ARGS...` in ~/jaxsft on every worker (after scripts/tpu/setup.sh), detached
from the ssh session (nohup, own process group). Worker I writes ~/jaxsft-logs/RUN/worker-I.log and
worker-I.pid. jax.distributed is initialised automatically on TPU pods: there is nothing to configure.
TRAIN_ARGS are passed through exactly (spaces and quotes survive); `--config ...` arguments may also come
before the `--`.

Required:
  --name NAME          TPU VM name
  --zone ZONE          its zone
Options:
  --project PROJECT    default: gcloud's configured project
  --run RUN            run name for the log directory (default: run-YYYYMMDD-HHMMSS)
  --env KEY=VALUE      environment variable for the training processes (repeatable)
  --dry-run            print the gcloud command instead of running it
  -h, --help           this help

Examples:
  scripts/tpu/launch.sh --name sft --zone us-east5-a --run qwen-sft -- --config configs/sft.py \
      --config.model_name_or_path=Qwen/Qwen2.5-0.5B-Instruct --config.output_dir=gs://BUCKET/runs/qwen-sft
  scripts/tpu/launch.sh --name sft --zone us-east5-a --env HF_TOKEN="$HF_TOKEN" --config configs/tiny.py
USAGE
}

name="" zone="" run_name="" envs=() train_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need "$1" "$#" "${2:-}"; name="$2"; shift 2 ;;
    --zone) need "$1" "$#" "${2:-}"; zone="$2"; shift 2 ;;
    --project) need "$1" "$#" "${2:-}"; PROJECT="$2"; shift 2 ;;
    --run) need "$1" "$#" "${2:-}"; run_name="$2"; shift 2 ;;
    --env) need "$1" "$#" "${2:-}"; [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env needs KEY=VALUE, got $2"
      envs+=("$2"); shift 2 ;;
    --config) need "$1" "$#" "${2:-}"; train_args+=("$1" "$2"); shift 2 ;;
    --config.* | --config=*) train_args+=("$1"); shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; train_args+=("$@"); break ;;
    *) die "unknown argument $1 (training arguments go after --; see --help)" ;;
  esac
done
require --name "$name"
require --zone "$zone"
[[ ${#train_args[@]} -gt 0 ]] || die "missing training arguments (e.g. -- --config configs/sft.py)"
[[ -n "$run_name" ]] || run_name="run-$(date +%Y%m%d-%H%M%S)"
plain_name --run "$run_name"

logdir="$REMOTE_LOGS/$run_name"
# The worker index comes from the TPU VM metadata server (hostnames end in -w-I as a fallback).
metadata="http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"
remote="set -euo pipefail; mkdir -p $logdir"
remote+="; w=\$(curl -sf -H Metadata-Flavor:Google $metadata || hostname | sed 's/.*-w-//')"
remote+="; cd $REMOTE_DIR"
remote+="; env ${envs[*]+$(quote_all "${envs[@]}") }setsid nohup ../$REMOTE_VENV/bin/python -m jaxsft.train"
remote+=" $(quote_all "${train_args[@]}") > ../$logdir/worker-\$w.log 2>&1 < /dev/null &"
remote+=" echo \$! > ../$logdir/worker-\$w.pid"
remote+="; echo \"worker \$w: started pid \$! (log ~/$logdir/worker-\$w.log)\""
tpu_ssh "$name" "$zone" all "$remote"
if [[ "$DRY_RUN" == 0 ]]; then
  echo "Started run $run_name. Follow it with: scripts/tpu/logs.sh --name $name --zone $zone --run $run_name -f" >&2
fi
