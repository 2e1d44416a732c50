#!/usr/bin/env bash
# Shows the training log of one worker (default worker 0) or of all workers of a TPU VM or pod slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<'USAGE'
Usage: scripts/tpu/logs.sh --name NAME --zone ZONE [--worker I|all] [--run RUN] [-n LINES] [-f]

Prints the end of ~/jaxsft-logs/RUN/worker-I.log from the chosen worker(s).

Required:
  --name NAME          TPU VM name
  --zone ZONE          its zone
Options:
  --project PROJECT    default: gcloud's configured project
  --worker I|all       which worker (default: 0, the one that writes metrics and checkpoints)
  --run RUN            which run (default: the newest one on that worker)
  -n, --lines N        lines to show (default: 100)
  -f, --follow         keep following the log (Ctrl-C to stop; training goes on)
  --dry-run            print the gcloud command instead of running it
  -h, --help           this help

Examples:
  scripts/tpu/logs.sh --name sft --zone us-east5-a -f
  scripts/tpu/logs.sh --name sft --zone us-east5-a --worker all --run qwen-sft -n 20
USAGE
}

name="" zone="" worker="0" run_name="" lines="100" follow=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need "$1" "$#" "${2:-}"; name="$2"; shift 2 ;;
    --zone) need "$1" "$#" "${2:-}"; zone="$2"; shift 2 ;;
    --project) need "$1" "$#" "${2:-}"; PROJECT="$2"; shift 2 ;;
    --worker) need "$1" "$#" "${2:-}"; worker="$2"; shift 2 ;;
    --run) need "$1" "$#" "${2:-}"; run_name="$2"; shift 2 ;;
    -n | --lines) need "$1" "$#" "${2:-}"; lines="$2"; shift 2 ;;
    -f | --follow) follow=" -f"; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
require --name "$name"
require --zone "$zone"
[[ "$worker" =~ ^([0-9]+|all)$ ]] || die "--worker must be a worker number or all, got $worker"
[[ "$lines" =~ ^[0-9]+$ ]] || die "--lines must be a number, got $lines"
[[ -z "$run_name" ]] || plain_name --run "$run_name"

if [[ -n "$run_name" ]]; then
  dir="$REMOTE_LOGS/$run_name"
else
  dir="$REMOTE_LOGS/\$(ls -t $REMOTE_LOGS | head -n 1)"
fi
# Each worker holds only its own log, so the glob matches one file per worker.
tpu_ssh "$name" "$zone" "$worker" "tail -n $lines$follow $dir/worker-*.log"
