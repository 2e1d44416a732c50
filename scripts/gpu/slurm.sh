#!/usr/bin/env bash
# Writes and submits a SLURM batch script that runs jaxsft training on N GPU nodes: one process per node
# (each process drives all GPUs of its node); jax.distributed finds the coordinator in SLURM's environment.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../_lib.sh"

usage() {
  cat <<'USAGE'
Usage: scripts/gpu/slurm.sh --nodes N [options] -- TRAIN_ARGS...

Writes runs/slurm/JOB.sbatch and submits it with sbatch. The job runs
`srun python -m jaxsft.train TRAIN_ARGS...` with one task per node from the repository directory (which
must be on a filesystem every node sees). TRAIN_ARGS are passed through exactly (spaces and quotes
survive); `--config ...` arguments may also come before the `--`.

Required:
  --nodes N              number of nodes
Options:
  --gpus-per-node G      GPUs per node (default: 8)
  --partition P          SLURM partition
  --time T               time limit, e.g. 24:00:00
  --account A            account to charge
  --job-name NAME        job name (default: jaxsft); also names the script and the log
  --setup CMD            shell command run before srun, e.g. 'source .venv/bin/activate' or
                         'module load cuda/12.4' (srun hands the resulting environment to every node)
  --venv DIR             shorthand for --setup 'source DIR/bin/activate' (give --setup or --venv, once)
  --container IMAGE      run inside IMAGE with pyxis (srun --container-image), repository mounted
  --signal-lead S        SLURM sends SIGTERM to the training processes S seconds before the time limit
                         (#SBATCH --signal=TERM@S), so they save a checkpoint at the next step boundary and
                         exit; S must cover a step plus a checkpoint save, and SLURM may signal up to 60 s
                         early (default: 120; 0: no early signal, and the time limit's own SIGTERM leaves
                         only the cluster's KillWait, often 30 s, before SIGKILL)
  --dry-run              print the batch script and the sbatch command instead of writing/submitting
  -h, --help             this help
Each option takes one value and is given at most once. Logs: runs/slurm/NAME-JOBID.out.

Examples:
  scripts/gpu/slurm.sh --nodes 2 --partition gpu --time 12:00:00 --venv .venv -- \
      --config configs/sft.py --config.model_name_or_path=Qwen/Qwen2.5-7B-Instruct \
      --config.output_dir=runs/qwen7b-sft
  scripts/gpu/slurm.sh --nodes 4 --container nvcr.io/nvidia/jax:25.04-py3 --config configs/sft.py
USAGE
}

nodes="" gpus="8" partition="" time_limit="" account="" job="jaxsft" setup="" container="" lead="120" dry_run=0
train_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) need "$1" "$#" "${2:-}"; once "$1"; nodes="$2"; shift 2 ;;
    --gpus-per-node) need "$1" "$#" "${2:-}"; once "$1"; gpus="$2"; shift 2 ;;
    --partition) need "$1" "$#" "${2:-}"; once "$1"; partition="$2"; shift 2 ;;
    --time) need "$1" "$#" "${2:-}"; once "$1"; time_limit="$2"; shift 2 ;;
    --account) need "$1" "$#" "${2:-}"; once "$1"; account="$2"; shift 2 ;;
    --job-name) need "$1" "$#" "${2:-}"; once "$1"; job="$2"; shift 2 ;;
    --setup) need "$1" "$#" "${2:-}"; once "$1" "the setup command"; setup="$2"; shift 2 ;;
    --venv) need "$1" "$#" "${2:-}"; once "$1" "the setup command"
      setup="source $(quote "$2")/bin/activate"; shift 2 ;;
    --container) need "$1" "$#" "${2:-}"; once "$1"; container="$2"; shift 2 ;;
    --signal-lead) need "$1" "$#" "${2:-}"; once "$1"; lead="$2"; shift 2 ;;
    --config) need "$1" "$#" "${2:-}"; train_args+=("$1" "$2"); shift 2 ;;
    --config.* | --config=*) train_args+=("$1"); shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; train_args+=("$@"); break ;;
    *) die "unknown argument $1 (training arguments go after --; see --help)" ;;
  esac
done
[[ -n "$nodes" ]] || die "missing required argument --nodes (see --help)"
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive number, got $nodes"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive number, got $gpus"
if ! [[ "$lead" =~ ^[0-9]{1,5}$ ]] || ((10#$lead > 65535)); then
  die "--signal-lead must be 0 to 65535 seconds, got $lead"
fi
lead=$((10#$lead))
plain_name --job-name "$job"
[[ ${#train_args[@]} -gt 0 ]] || die "missing training arguments (e.g. -- --config configs/sft.py)"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out_dir="$repo_root/runs/slurm"
script="$out_dir/$job.sbatch"

srun_cmd="srun --ntasks-per-node=1 --kill-on-bad-exit=1"
if [[ -n "$container" ]]; then
  srun_cmd+=" --container-image=$(quote "$container") --container-mounts=$(quote "$repo_root:$repo_root")"
  srun_cmd+=" --container-workdir=$(quote "$repo_root")"
fi
srun_cmd+=" python -m jaxsft.train"
for arg in "${train_args[@]}"; do
  srun_cmd+=" $(quote "$arg")"
done

batch() {
  echo "#!/usr/bin/env bash"
  echo "#SBATCH --job-name=$job"
  echo "#SBATCH --nodes=$nodes"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gpus-per-node=$gpus"
  echo "#SBATCH --exclusive"
  echo "#SBATCH --output=$out_dir/%x-%j.out"
  [[ -z "$partition" ]] || echo "#SBATCH --partition=$partition"
  [[ -z "$time_limit" ]] || echo "#SBATCH --time=$time_limit"
  [[ -z "$account" ]] || echo "#SBATCH --account=$account"
  # Without B:, SLURM signals the tasks of every job step (each node's python), not the batch shell.
  [[ "$lead" == 0 ]] || echo "#SBATCH --signal=TERM@$lead"
  echo "# One task per node; each sees all its node's GPUs. jax.distributed.initialize() reads the"
  echo "# coordinator address, process count and process id from SLURM's environment."
  if [[ "$lead" != 0 ]]; then
    echo "# --signal: $lead s before the time limit SLURM sends SIGTERM to the python processes (not to this"
    echo "# shell): each saves a checkpoint at the next step boundary and exits; run the job again to resume."
  fi
  echo "set -eo pipefail"
  echo "cd $(quote "$repo_root")"
  [[ -z "$setup" ]] || echo "$setup"
  echo "$srun_cmd"
}

if [[ "$dry_run" == 1 ]]; then
  batch
  echo "sbatch $(quote "$script")"
else
  mkdir -p "$out_dir"
  batch > "$script"
  echo "Wrote $script" >&2
  sbatch "$script"
fi
