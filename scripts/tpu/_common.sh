# shellcheck shell=bash disable=SC2034  # the REMOTE_* settings are used by the scripts that source this
# Helpers shared by the scripts in scripts/tpu/ (sourced, not run): argument checks, shell quoting, and the
# run/dry-run switch. Every gcloud call goes through `run`, so `--dry-run` prints each command on one line,
# quoted so that it can be pasted back into a shell, and calls nothing.

# Where things live on every TPU worker, relative to the login user's home directory.
REMOTE_DIR="jaxsft"          # the repository
REMOTE_VENV="jaxsft-venv"    # the virtual environment `setup.sh` creates
REMOTE_LOGS="jaxsft-logs"    # one directory per run: RUN/worker-I.log and RUN/worker-I.pid

DRY_RUN=0
PROJECT=""

# die MESSAGE: one-line usage error on stderr, exit status 2.
die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# need FLAG ARG-COUNT VALUE: fails unless FLAG has a value (`need "$1" "$#" "${2:-}"` in a parse loop).
need() {
  [[ "$2" -ge 2 && "${3:-}" != --* ]] || die "$1 needs a value"
}

# require FLAG VALUE: fails when a required flag was not given.
require() {
  [[ -n "$2" ]] || die "missing required argument $1 (see --help)"
}

# quote ARG: ARG as one shell word; plain words stay bare, anything else is single-quoted.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    local squote="'"
    printf "'%s'" "${1//${squote}/${squote}\\${squote}${squote}}"
  fi
}

# quote_all ARGS...: the arguments as one line of shell words.
quote_all() {
  local out="" arg
  for arg in "$@"; do
    out+="${out:+ }$(quote "$arg")"
  done
  printf '%s' "$out"
}

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
