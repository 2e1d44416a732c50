#!/usr/bin/env bash
# Stops jaxsft training on every worker of a TPU VM or pod slice: signals the process group of each
# training process that scripts/tpu/launch.sh recorded (worker-I.pid), for one run or all runs.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<'USAGE'
Usage: scripts/tpu/stop.sh --name NAME --zone ZONE [--run RUN] [--force]

Sends SIGTERM (with --force: SIGKILL) to the training processes and their children on all workers.

Required:
  --name NAME          TPU VM name
  --zone ZONE          its zone
Options:
  --project PROJECT    default: gcloud's configured project
  --run RUN            stop only this run (default: every run launched with scripts/tpu/launch.sh)
  --force              SIGKILL instead of SIGTERM
  --dry-run            print the gcloud command instead of running it
  -h, --help           this help

Examples:
  scripts/tpu/stop.sh --name sft --zone us-east5-a
  scripts/tpu/stop.sh --name sft --zone us-east5-a --run qwen-sft --force
USAGE
}

name="" zone="" run_name="*" signal="TERM"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need "$1" "$#" "${2:-}"; name="$2"; shift 2 ;;
    --zone) need "$1" "$#" "${2:-}"; zone="$2"; shift 2 ;;
    --project) need "$1" "$#" "${2:-}"; PROJECT="$2"; shift 2 ;;
    --run) need "$1" "$#" "${2:-}"; run_name="$2"; plain_name --run "$run_name"; shift 2 ;;
    --force) signal="KILL"; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
require --name "$name"
require --zone "$zone"

# A pid file names a process group leader (launch.sh starts training under setsid); the file is removed
# once the group is signalled or found gone.
remote="for f in $REMOTE_LOGS/$run_name/worker-*.pid; do [ -e \"\$f\" ] || continue; pid=\$(cat \"\$f\")"
remote+="; if kill -$signal -- -\"\$pid\" 2>/dev/null; then echo \"stopped \$pid (\$f)\"; fi; rm -f \"\$f\"; done"
tpu_ssh "$name" "$zone" all "$remote"
