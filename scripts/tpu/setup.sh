#!/usr/bin/env bash
# Puts jaxsft on every worker of a TPU VM or pod slice (the local working tree, or a git URL at a revision)
# and installs it with its TPU extra into a virtual environment there.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<'USAGE'
Usage: scripts/tpu/setup.sh --name NAME --zone ZONE [--git URL [--rev REV]] [options]

Copies jaxsft to ~/jaxsft on every worker and runs `pip install -e '.[tpu]'` in ~/jaxsft-venv there.
Without --git it ships the local working tree (tracked and untracked files that git does not ignore, so
uncommitted edits go too) as a tarball; with --git each worker clones URL and checks out REV.

Required:
  --name NAME          TPU VM name
  --zone ZONE          its zone
Options:
  --project PROJECT    default: gcloud's configured project
  --git URL            clone this repository on the workers instead of copying the working tree
  --rev REV            with --git: branch, tag or commit to check out (default: main)
  --python PYTHON      interpreter for the venv, Python >= 3.11 (default: the newest python3.X, X >= 11, on
                       each worker's PATH, e.g. python3.12 on Ubuntu 24.04 images, else python3.11 installed
                       with apt; on python3.11 pip stops at jax 0.10.2 / libtpu 0.0.42). Each worker prints
                       the Python it uses; a venv made with another Python is made again.
  --dry-run            print the commands instead of running them
  -h, --help           this help

Examples:
  scripts/tpu/setup.sh --name sft --zone us-east5-a
  scripts/tpu/setup.sh --name sft --zone us-east5-a --git https://github.com/ORG/jaxsft.git --rev v0.1.0
USAGE
}

name="" zone="" git_url="" rev="main" python=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need "$1" "$#" "${2:-}"; name="$2"; shift 2 ;;
    --zone) need "$1" "$#" "${2:-}"; zone="$2"; shift 2 ;;
    --project) need "$1" "$#" "${2:-}"; PROJECT="$2"; shift 2 ;;
    --git) need "$1" "$#" "${2:-}"; git_url="$2"; shift 2 ;;
    --rev) need "$1" "$#" "${2:-}"; rev="$2"; shift 2 ;;
    --python) need "$1" "$#" "${2:-}"; python="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
require --name "$name"
require --zone "$zone"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
qdir="$(quote "$REMOTE_DIR")"
if [[ -z "$git_url" ]]; then
  tarball="${TMPDIR:-/tmp}/jaxsft-$name.tar.gz"
  # The file list comes from git, so ignored files (runs/, caches, build outputs) stay behind.
  pack="git -C $(quote "$repo_root") ls-files -z --cached --others --exclude-standard"
  pack+=" | tar -czf $(quote "$tarball") -C $(quote "$repo_root") --null --ignore-failed-read -T -"
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "$pack"
  else
    bash -o pipefail -c "$pack"
  fi
  mapfile -t project < <(project_flag)
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:jaxsft.tar.gz" "--zone=$zone" "${project[@]}" --worker=all
  fetch="mkdir -p $qdir && tar -xzf jaxsft.tar.gz -C $qdir && rm jaxsft.tar.gz"
else
  fetch="{ [ -d $qdir/.git ] || git clone $(quote "$git_url") $qdir; } && git -C $qdir fetch -q --tags origin"
  fetch+=" && { git -C $qdir checkout -q --force --detach $(quote "origin/$rev") 2>/dev/null"
  fetch+=" || git -C $qdir checkout -q --force --detach $(quote "$rev"); }"
fi
if [[ -n "$python" ]]; then
  pick="py=$(quote "$python")"
else
  # The newest python3.X (X >= 11) on the worker's PATH, else python3.11 (which apt installs below).
  pick="py=\$(compgen -c python3. | grep -xE 'python3\\.(1[1-9]|[2-9][0-9])' | sort -u -t. -k2,2n | tail -n 1"
  pick+=" || true); py=\${py:-python3.11}"
fi
venv="$(quote "$REMOTE_VENV")"
install="{ \"\$py\" -c 'import ensurepip' 2>/dev/null"
install+=" || { sudo apt-get update -q && sudo apt-get install -y -q \"\$py\" \"\$py-venv\"; }; }"
install+=" && version=\$(\"\$py\" -V 2>&1) && echo \"using \$py (\$version) for ~/$REMOTE_VENV\""
# An existing venv is kept when it runs the same Python, and made again (--clear) when not.
install+=" && { [ \"\$($venv/bin/python -V 2>&1)\" = \"\$version\" ] || \"\$py\" -m venv --clear $venv; }"
install+=" && cd $qdir"
install+=" && ../$venv/bin/python -m pip install -q -U pip && ../$venv/bin/python -m pip install -q -e '.[tpu]'"
tpu_ssh "$name" "$zone" all "set -euo pipefail; $pick; $fetch && $install"
