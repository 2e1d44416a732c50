# shellcheck shell=bash disable=SC2034  # the REMOTE_* settings are used by the scripts that source this
# Helpers shared by the scripts in scripts/tpu/ (sourced, not run): ../_lib.sh's argument checks and shell
# quoting, plus the run/dry-run switch. Every gcloud call goes through `run`, so `--dry-run` prints each
# command on one line, quoted so that it can be pasted back into a shell, and calls nothing.

# Where things live on every TPU worker, relative to the login user's home directory.
REMOTE_DIR="jaxsft"          # the repository
REMOTE_VENV="jaxsft-venv"    # the virtual environment `setup.sh` creates
REMOTE_LOGS="jaxsft-logs"    # one directory per run: RUN/worker-I.log and RUN/worker-I.pid

DRY_RUN=0
PROJECT=""

# shellcheck source-path=SCRIPTDIR source=../_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../_lib.sh"

# run CMD ARGS...: runs the command, or with --dry-run prints it (one line, quoted).
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    quote_all "$@"
    echo
  else
    "$@"
  fi
}

# project_flag: `--project=P` when --project was given (else gcloud's configured default project applies).
project_flag() {
  [[ -z "$PROJECT" ]] || printf -- '--project=%s\n' "$PROJECT"
}

# tpu_ssh NAME ZONE WORKER COMMAND: runs COMMAND (a bash command line) on the worker(s) of TPU VM NAME.
tpu_ssh() {
  local -a project=()
  mapfile -t project < <(project_flag)
  run gcloud compute tpus tpu-vm ssh "$1" "--zone=$2" "${project[@]}" "--worker=$3" "--command=$4"
}
