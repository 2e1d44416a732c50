#!/usr/bin/env bash
# Creates a Cloud TPU VM or pod slice for jaxsft: on-demand, spot, or through a queued resource.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<'USAGE'
Usage: scripts/tpu/create.sh --name NAME --zone ZONE --accelerator-type TYPE [options] [-- GCLOUD_FLAGS...]

Creates a TPU VM or pod slice (every host of a slice is one "worker").

Required:
  --name NAME                 TPU VM name (with --queued: also the queued resource's id)
  --zone ZONE                 e.g. us-east5-a
  --accelerator-type TYPE     e.g. v4-8, v5litepod-16, v5p-32, v6e-64
Options:
  --version RUNTIME           TPU software version; default by generation: v2/v3/v4 tpu-ubuntu2204-base,
                              v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --project PROJECT           default: gcloud's configured project
  --spot                      spot capacity (preemptible, cheaper)
  --queued                    request through a queued resource (waits for capacity)
  --reserved                  with --queued: use the project's reservation
  --valid-until-duration D    with --queued: drop the request if not filled within D (e.g. 6h)
  --valid-after-duration D    with --queued: do not start before D from now (e.g. 30m)
  --dry-run                   print the gcloud command instead of running it
  -h, --help                  this help
Arguments after -- go to gcloud unchanged (e.g. -- --network=my-net --internal-ips).

Examples:
  scripts/tpu/create.sh --name sft --zone us-east5-a --accelerator-type v5p-32
  scripts/tpu/create.sh --name sft --zone europe-west4-a --accelerator-type v6e-64 --spot
  scripts/tpu/create.sh --name sft --zone us-central2-b --accelerator-type v4-32 --queued \
      --valid-until-duration 6h
USAGE
}

# default_version TYPE: the TPU software version for an accelerator type's generation.
default_version() {
  case "$1" in
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "no default --version for --accelerator-type $1: pass --version" ;;
  esac
}

name="" zone="" accel="" version="" spot=0 queued=0 reserved=0 valid_until="" valid_after=""
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need "$1" "$#" "${2:-}"; name="$2"; shift 2 ;;
    --zone) need "$1" "$#" "${2:-}"; zone="$2"; shift 2 ;;
    --accelerator-type) need "$1" "$#" "${2:-}"; accel="$2"; shift 2 ;;
    --version) need "$1" "$#" "${2:-}"; version="$2"; shift 2 ;;
    --project) need "$1" "$#" "${2:-}"; PROJECT="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --queued) queued=1; shift ;;
    --reserved) reserved=1; shift ;;
    --valid-until-duration) need "$1" "$#" "${2:-}"; valid_until="$2"; shift 2 ;;
    --valid-after-duration) need "$1" "$#" "${2:-}"; valid_after="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
require --name "$name"
require --zone "$zone"
require --accelerator-type "$accel"
[[ -n "$version" ]] || version="$(default_version "$accel")"
if [[ "$queued" == 0 && ( "$reserved" == 1 || -n "$valid_until" || -n "$valid_after" ) ]]; then
  die "--reserved, --valid-until-duration and --valid-after-duration need --queued"
fi
[[ "$spot" == 0 || "$reserved" == 0 ]] || die "--spot and --reserved exclude each other"

mapfile -t project < <(project_flag)
if [[ "$queued" == 1 ]]; then
  cmd=(gcloud compute tpus queued-resources create "$name" "--node-id=$name" "--zone=$zone" "${project[@]}"
       "--accelerator-type=$accel" "--runtime-version=$version")
  [[ "$reserved" == 0 ]] || cmd+=(--reserved)
  [[ -z "$valid_until" ]] || cmd+=("--valid-until-duration=$valid_until")
  [[ -z "$valid_after" ]] || cmd+=("--valid-after-duration=$valid_after")
else
  cmd=(gcloud compute tpus tpu-vm create "$name" "--zone=$zone" "${project[@]}"
       "--accelerator-type=$accel" "--version=$version")
fi
[[ "$spot" == 0 ]] || cmd+=(--spot)
run "${cmd[@]}" "${extra[@]}"
if [[ "$queued" == 1 && "$DRY_RUN" == 0 ]]; then
  echo "Queued. Watch it with: gcloud compute tpus queued-resources describe $name --zone=$zone" >&2
fi
