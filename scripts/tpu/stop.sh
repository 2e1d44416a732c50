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
On SIGTERM training saves a checkpoint at the next step boundary, then exits; the pid files stay until the
processes are gone, so a later --force still kills whatever ignored SIGTERM or is taking too long.

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

# A pid file names a process group leader (launch.sh starts training under setsid). It stays while any
# process of that group is alive (a zombie counts as gone), so `--force` after a plain stop still finds a
# process that ignored SIGTERM or is still saving; a stop removes the files of groups that are gone. After
# SIGKILL it waits up to 10 s for the group to go.
alive="ps -e -o pgid=,stat= | grep -Eq \"^ *\$pid +[^Z]\""
remote="for f in $REMOTE_LOGS/$run_name/worker-*.pid; do [ -e \"\$f\" ] || continue; pid=\$(cat \"\$f\")"
remote+="; case \"\$pid\" in \"\" | *[!0-9]*) rm -f \"\$f\"; echo \"removed \$f: no pid in it\"; continue ;; esac"
remote+="; if ! $alive || ! kill -$signal -- -\"\$pid\" 2>/dev/null"
remote+="; then rm -f \"\$f\"; echo \"\$pid had exited: removed \$f\"; continue; fi"
if [[ "$signal" == TERM ]]; then
  remote+="; echo \"sent SIGTERM to \$pid (\$f): it saves a checkpoint at the next step boundary and exits;"
  remote+=" stop.sh --force kills it\"; done"
else
  remote+="; i=0; while $alive && [ \$i -lt 20 ]; do sleep 0.5; i=\$((i + 1)); done"
  remote+="; if $alive; then echo \"sent SIGKILL to \$pid (\$f): still running\""
  remote+="; else rm -f \"\$f\"; echo \"killed \$pid (\$f)\"; fi; done"
fi
tpu_ssh "$name" "$zone" all "$remote"
