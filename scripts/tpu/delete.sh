#!/usr/bin/env bash
# Deletes a TPU VM or pod slice, or the queued resource that created it (together with its VM).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<'USAGE'
Usage: scripts/tpu/delete.sh --name NAME --zone ZONE [--queued]

Deletes the TPU VM (no confirmation prompt). Anything not copied off its disks is lost.

Required:
  --name NAME          TPU VM name (with --queued: the queued resource's id, as created by create.sh --queued)
  --zone ZONE          its zone
Options:
  --project PROJECT    default: gcloud's configured project
  --queued             delete the queued resource and its TPU VM
  --dry-run            print the gcloud command instead of running it
  -h, --help           this help

Examples:
  scripts/tpu/delete.sh --name sft --zone us-east5-a
  scripts/tpu/delete.sh --name sft --zone us-central2-b --queued
USAGE
}

name="" zone="" queued=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need "$1" "$#" "${2:-}"; name="$2"; shift 2 ;;
    --zone) need "$1" "$#" "${2:-}"; zone="$2"; shift 2 ;;
    --project) need "$1" "$#" "${2:-}"; PROJECT="$2"; shift 2 ;;
    --queued) queued=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
require --name "$name"
require --zone "$zone"

mapfile -t project < <(project_flag)
if [[ "$queued" == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$name" "--zone=$zone" "${project[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$name" "--zone=$zone" "${project[@]}" --quiet
fi
