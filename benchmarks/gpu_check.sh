#!/usr/bin/env bash
# The GPU check: everything jaxsft can only prove on an NVIDIA machine, in one script, within ~10 minutes.
#
#   bash benchmarks/gpu_check.sh [OUT.json]        # on a machine with an NVIDIA GPU, from the repository root
#
# 1. A virtual environment (.gpu-venv, reused) with jax[cuda12] at the jax version this checkout pins, the
#    project and its test extra.
# 2. The GPU-only tests: cuDNN attention (packed and masked layouts) against XLA, on the GPU itself.
# 3. bf16 against float32: the tiny default trained 120 steps each way on the GPU; the loss curves must agree
#    within 5% at every logged step (bf16 rounding, not a different model).
# 4. benchmarks/vs_trl.py --preset qwen2.5-0.5b: jaxsft against TRL SFTTrainer on the same GPU (tokens/s, MFU,
#    peak memory), if torch with CUDA is present; otherwise that part is skipped and the JSON says so.
# Writes one JSON of figures (default runs/gpu_check.json) and prints it. Exits non-zero if a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_check.json}
mkdir -p "$(dirname "$out")" runs/gpu_check
work=runs/gpu_check

command -v nvidia-smi >/dev/null || { echo "error: no nvidia-smi: this check needs an NVIDIA GPU" >&2; exit 2; }
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1)
echo "GPU: $gpu"

py=${PYTHON:-python3}
if [[ ! -x .gpu-venv/bin/python ]]; then
  "$py" -m venv .gpu-venv
fi
venv=.gpu-venv/bin/python
jax_version=$("$py" -c 'import jax; print(jax.__version__)' 2>/dev/null || echo "")
"$venv" -m pip install -q --upgrade pip
"$venv" -m pip install -q -e '.[test]' "jax[cuda12]${jax_version:+==$jax_version}"
"$venv" -c 'import jax; assert jax.default_backend() == "gpu", jax.devices(); print("jax", jax.__version__, jax.devices())'

t0=$(date +%s)
tests_rc=0
"$venv" -m pytest -q tests/test_attention.py -k 'gpu' -p no:cacheprovider | tee "$work/tests.log" || tests_rc=$?
tests_summary=$(tail -n 1 "$work/tests.log")

for dtype in bf16 f32; do
  bf16=$([[ $dtype == bf16 ]] && echo true || echo false)
  rm -rf "$work/tiny-$dtype"
  "$venv" -m jaxsft.train --config configs/tiny.py --config.bf16="$bf16" --config.max_steps=120 \
      --config.logging_steps=10 --config.accuracy_eval_problems=0 --config.disable_tqdm=true \
      --config.output_dir="$work/tiny-$dtype" 2>&1 | tail -n 3
done
parity=$("$venv" - "$work" <<'PY' || true
import json, sys
work = sys.argv[1]
def losses(dtype):
  with open(f'{work}/tiny-{dtype}/metrics.jsonl') as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}
bf16, f32 = losses('bf16'), losses('f32')
worst = max(abs(bf16[s] - f32[s]) / f32[s] for s in f32)
print(json.dumps({'steps': sorted(f32), 'worst_relative_loss_difference': worst, 'final_loss_bf16': bf16[max(bf16)],
                  'final_loss_f32': f32[max(f32)], 'ok': worst < 0.05}))
PY
)

bench='{"skipped": "torch with CUDA is not installed in .gpu-venv"}'
if "$venv" -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  "$venv" benchmarks/vs_trl.py --preset qwen2.5-0.5b --json "$work/vs_trl.json" | tail -n 12
  bench=$(cat "$work/vs_trl.json")
fi

"$venv" - "$out" "$gpu" "$tests_rc" "$tests_summary" "$parity" "$bench" "$(( $(date +%s) - t0 ))" <<'PY'
import json, sys
out, gpu, tests_rc, tests_summary, parity, bench, seconds = sys.argv[1:]
figures = {'gpu': gpu, 'gpu_tests': {'exit_code': int(tests_rc), 'summary': tests_summary},
           'bf16_vs_f32': json.loads(parity) if parity else None, 'vs_trl_qwen2.5_0.5b': json.loads(bench),
           'seconds': int(seconds)}
with open(out, 'w') as f:
  json.dump(figures, f, indent=2)
print(json.dumps(figures, indent=2))
ok = int(tests_rc) == 0 and bool(figures['bf16_vs_f32'] and figures['bf16_vs_f32']['ok'])
print('gpu check: ' + ('passed' if ok else 'FAILED') + f' (figures in {out})')
sys.exit(0 if ok else 1)
PY
