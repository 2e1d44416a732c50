"""Checkpoints across meshes and processes: resharded restore, and a 2-process save / preempt / resume.

Resharding (one subprocess, 8 simulated CPU devices, tests/helpers/checkpoint_process.py `reshard`): a run
trained on fsdp=8 saves checkpoint 3; the trainer's restore puts it on fsdp=8, on fsdp=4 × tensor=2 and on
one device, and every array of the parameters and the optimizer state is bit-identical on the three, laid out
by the target mesh's rules. Resuming the run from that checkpoint on fsdp=4 × tensor=2 continues the fsdp=8
loss curve.

Two processes (2 × 2 CPU devices, jax.distributed on 127.0.0.1, mesh fsdp=4 so every array is split across
the processes): an uninterrupted run; the same run with SIGTERM sent to process 1 only, where jax's
preemption sync service makes both processes save the same step and exit with 143; then the same command
again, which resumes and reproduces the uninterrupted run's metrics and weights bit for bit.
"""

import json
import os
import re
import subprocess

import numpy as np
import pytest

from jaxsft import checkpoint
from tests.helpers import checkpoint_process
from tests.helpers import models
from tests.helpers import processes
from tests.helpers import runs

pytestmark = pytest.mark.slow
HELPER = 'tests.helpers.checkpoint_process'
RESUME_STEP, TOTAL_STEPS = checkpoint_process.RESUME_STEP, checkpoint_process.TOTAL_STEPS  # The reshard run's.
METRICS = ('loss', 'grad_norm', 'learning_rate', 'mean_token_accuracy', 'entropy', 'num_tokens', 'epoch')


def _base_env() -> dict:
  return runs.environment(isolated=True)


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  return models.save_tiny_qwen2(tmp_path_factory.mktemp('ckpt_model') / 'model', hidden_size=64,
                                intermediate_size=128)


_metrics, _hf_weights = runs.metrics, runs.hf_weights


# ----------------------------------------------------------------------------------------------------------
# Resharding on 8 devices of one process.


@pytest.fixture(scope='module')
def reshard(tmp_path_factory, model_dir):
  root = tmp_path_factory.mktemp('reshard')
  # 100 rows of 16 per step: 6 steps per epoch, so checkpoint 3 is mid-epoch.
  data_file = processes.write_synthetic_jsonl(root / 'train.jsonl', 100, seed=2)
  out = root / 'out'
  out.mkdir()
  proc = runs.cli(HELPER, 'reshard', model_dir, data_file, out, env=_base_env(), timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads((out / 'result.json').read_text())
  arrays = {name: dict(np.load(out / f'restored_{name}.npz')) for name in result['restored']}
  return out, result, arrays


def test_restored_state_is_bit_identical_on_every_mesh(reshard):
  """fsdp=8 → fsdp=8, fsdp=4 × tensor=2 and 1 device: the same bits in every parameter and optimizer array.

  Not vacuous: the state is the trained one (Adam's moments non-zero, counters at 3, parameters moved away
  from the initial weights), and the test below ties checkpoint 6's restore to the weights the run exported.
  """
  _, result, arrays = reshard
  assert result['steps'] == [RESUME_STEP, TOTAL_STEPS]
  reference = arrays['fsdp8']
  assert any(k.startswith("['params']") for k in reference) and any('.mu[' in k for k in reference)
  for name, restored in arrays.items():
    assert sorted(restored) == sorted(reference), name
    for key, value in reference.items():
      assert restored[key].dtype == value.dtype and restored[key].shape == value.shape, (name, key)
      np.testing.assert_array_equal(restored[key], value, err_msg=f'{name}: {key}')
  counters = {k: int(v) for k, v in reference.items() if k.endswith('gradient_step') or k.endswith('.count')}
  assert counters and set(counters.values()) == {RESUME_STEP}, counters
  for moment in ('.mu[', '.nu['):
    leaves = [v for k, v in reference.items() if moment in k]
    assert leaves and all(np.any(v != 0) for v in leaves), moment


def test_restored_parameters_are_the_trained_ones(reshard, model_dir):
  """Checkpoint 6 restored on one device equals the weights the fsdp=8 run exported at its end, bit for bit;
  checkpoint 3 differs from the initial weights in every tensor (training moved them)."""
  out, _, _ = reshard
  final, exported = dict(np.load(out / f'hf_step{TOTAL_STEPS}.npz')), _hf_weights(out / 'fsdp8')
  assert sorted(final) == sorted(exported)
  for name, value in exported.items():
    np.testing.assert_array_equal(final[name], value, err_msg=name)
  initial = runs.weights(model_dir)
  step3 = dict(np.load(out / f'hf_step{RESUME_STEP}.npz'))
  assert sorted(step3) == sorted(initial)
  unchanged = [name for name in initial if np.array_equal(step3[name], initial[name])]
  assert not unchanged, unchanged


def test_restored_arrays_carry_the_target_meshes_shardings(reshard):
  """Every restored array lives on the target mesh (all 8 devices, or the single one), partitioned by its rules:
  a q_proj kernel and its optimizer moments are split over 'fsdp' (and 'tensor' on fsdp=4 × tensor=2)."""
  _, result, _ = reshard
  expected = {'fsdp8': ({'data': 1, 'fsdp': 8, 'tensor': 1}, 8, ['fsdp', None, None]),
              'fsdp4_tensor2': ({'data': 1, 'fsdp': 4, 'tensor': 2}, 8, ['fsdp', 'tensor', None]),
              'one_device': ({'data': 1, 'fsdp': 1, 'tensor': 1}, 1, [None, None, None])}
  for name, (mesh, num_devices, q_spec) in expected.items():
    described = result['restored'][name]
    assert all(d['mesh'] == mesh and d['num_devices'] == num_devices for d in described.values()), name
    # q_proj kernels (layers, embed, q_heads, head_dim: stacked by scan_layers, the default) and their Adam
    # moments alike; the stacked layer axis is never sharded.
    q_kernels = {k: d['spec'] for k, d in described.items() if k.endswith("['q_proj']['kernel'].value")}
    assert len(q_kernels) == 3, q_kernels  # (parameter, mu, nu) of the stacked layers.
    assert all(spec == [None] + q_spec for spec in q_kernels.values()), (name, q_kernels)


def test_training_resumed_on_another_mesh_continues_the_curve(reshard):
  """Resumed from checkpoint 3 on fsdp=4 × tensor=2, steps 4-6 log what the uninterrupted fsdp=8 run logged.

  Within 1e-5 (the final weights within 1e-6), not bitwise: tensor parallelism splits the contractions over
  heads / MLP / vocabulary and the batch is split 4 ways instead of 8, so XLA sums partial products and
  gradients in another order, and float32 addition is not associative. Step 4's loss, computed from
  bit-identical restored weights, already differs by 4e-7 (test_mesh.py sees the same between meshes from
  step 1). Counts (tokens, learning rate, epoch) are exact.
  """
  out, _, _ = reshard
  full, resumed = _metrics(out / 'fsdp8'), _metrics(out / 'resumed')
  assert [r['step'] for r in full] == list(range(1, TOTAL_STEPS + 1))
  assert [r['step'] for r in resumed] == list(range(RESUME_STEP + 1, TOTAL_STEPS + 1))
  after = full[RESUME_STEP:]
  for key in ('num_tokens', 'learning_rate', 'epoch'):
    assert [r[key] for r in resumed] == [r[key] for r in after], key
  for key in ('loss', 'grad_norm', 'mean_token_accuracy', 'entropy'):
    np.testing.assert_allclose([r[key] for r in resumed], [r[key] for r in after], rtol=0, atol=1e-5, err_msg=key)
  assert full[-1]['loss'] < full[RESUME_STEP - 1]['loss'] - 0.1  # The curve still moves after the checkpoint.
  exported, reference = _hf_weights(out / 'resumed'), _hf_weights(out / 'fsdp8')
  assert sorted(exported) == sorted(reference)
  for name, value in reference.items():  # Observed: differences up to 6e-8.
    np.testing.assert_allclose(exported[name], value, rtol=0, atol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------------------------------------
# Two processes: save on SIGTERM to one of them, resume.

SIGTERM_AT_STEP, MAX_STEPS = 4, 12
SLOW_SECONDS = 1.0  # Per step after the signal: the sync point comes within about a second, well before the end.


def _cluster(name: str, root, model_dir: str, data_file: str, out, sigterm_at_step: int = 0) -> dict:
  """The two processes of one run as run_all commands (each process with its own data-index cache)."""
  port = processes.free_port()
  flags = ['--config', 'configs/tiny.py', *runs.flags(
      model_name_or_path=model_dir, model_init='pretrained', dataset_name=data_file, output_dir=out,
      max_steps=MAX_STEPS, max_length=96, per_device_train_batch_size=2, gradient_accumulation_steps=2,
      mesh={'data': 1, 'fsdp': -1}, logging_steps=1, seed=7, accuracy_eval_problems=0, disable_tqdm=True)]
  commands = {}
  for p in range(2):
    env = {**_base_env(), 'JAX_NUM_CPU_DEVICES': '2', 'JAXSFT_CACHE_DIR': str(root / f'cache_{name}_p{p}'),
           'JAXSFT_COORDINATOR_ADDRESS': f'127.0.0.1:{port}', 'JAXSFT_NUM_PROCESSES': '2', 'JAXSFT_PROCESS_ID': str(p)}
    commands[f'p{p}'] = (runs.argv(HELPER, 'train', sigterm_at_step, SLOW_SECONDS, *flags), env)
  return commands


def _start(commands: dict) -> dict:
  return processes.start_all(commands, cwd=runs.ROOT)


_finish = processes.finish_all


@pytest.fixture(scope='module')
def two_process(tmp_path_factory, model_dir):
  """{'full': uninterrupted run, 'preempted': SIGTERM to process 1 at step 4, 'resumed': the same command again}.

  Each value: (output dir, {process: (exit status, stderr)}); 'preempted' and 'resumed' share the output dir.
  The uninterrupted and the interrupted runs run at the same time (4 processes, two clusters).
  """
  root = tmp_path_factory.mktemp('two_process')
  data_file = processes.write_synthetic_jsonl(root / 'train.jsonl', 16 * MAX_STEPS, seed=5)  # One epoch.
  full_dir, run_dir = root / 'full', root / 'run'
  preempted = _start(_cluster('preempted', root, model_dir, data_file, run_dir, sigterm_at_step=SIGTERM_AT_STEP))
  try:
    full = processes.run_all(_cluster('full', root, model_dir, data_file, full_dir), cwd=runs.ROOT, timeout=300)
  finally:
    preempted = _finish(preempted)
  # What the interrupted run left, before the resumed run adds to it.
  after_preemption = {'checkpoints': sorted(os.listdir(checkpoint.root_of(str(run_dir)))) if run_dir.exists() else [],
                      'logged_steps': [r['step'] for r in _metrics(run_dir)] if run_dir.exists() else [],
                      'latest_step': checkpoint.latest_step(str(run_dir))}
  resumed = processes.run_all(_cluster('resumed', root, model_dir, data_file, run_dir), cwd=runs.ROOT, timeout=300)
  return {'full': (full_dir, {p: (0, err) for p, err in full.items()}), 'preempted': (run_dir, preempted),
          'resumed': (run_dir, {p: (0, err) for p, err in resumed.items()}), 'after_preemption': after_preemption}


def _preempted_step(stderr: str) -> int | None:
  match = re.search(r'^preempted: stopped by SIGTERM after step (\d+);', stderr, re.MULTILINE)
  return int(match.group(1)) if match else None


def test_sigterm_to_one_process_saves_the_same_step_on_both(two_process):
  """Only process 1 gets SIGTERM; jax's preemption sync service tells process 0, both stop after the same step,
  at or after the signalled one and before the end, and exit with 128 + SIGTERM."""
  _, procs = two_process['preempted']
  assert {p: status for p, (status, _) in procs.items()} == {'p0': 143, 'p1': 143}, \
      '\n'.join(f'--- {p}:\n{err[-3000:]}' for p, (_, err) in procs.items())
  sent = f'{checkpoint_process.SENT}{SIGTERM_AT_STEP}\n'
  assert sent in procs['p1'][1] and checkpoint_process.SENT not in procs['p0'][1]
  steps = {p: _preempted_step(err) for p, (_, err) in procs.items()}
  assert steps['p0'] == steps['p1'] is not None, steps
  step = steps['p0']
  assert SIGTERM_AT_STEP <= step < MAX_STEPS, f'sync point {step}: the run ended before the service agreed on one'
  assert two_process['after_preemption']['logged_steps'] == list(range(1, step + 1))


def test_the_preemption_checkpoint_is_complete(two_process):
  """The checkpoint of the stop step, and only it (save_steps is 500, the epoch is the whole run), is complete:
  no temporary directory, its meta says the step and the data loader's position."""
  run_dir, procs = two_process['preempted']
  step = _preempted_step(procs['p0'][1])
  assert two_process['after_preemption']['checkpoints'] == [str(step)]
  assert two_process['after_preemption']['latest_step'] == step  # What the next run resumes from.
  meta = checkpoint.read_meta(checkpoint.root_of(str(run_dir)), step)
  assert meta['step'] == step  # Also the data loader's position (RunMeta).
  assert meta['config']['resolved']['num_processes'] == 2


def test_resumed_run_reproduces_the_uninterrupted_one_bitwise(two_process):
  """Same mesh, same processes: the same programs on the same bits, so every logged metric of every step
  (those before the stop from the interrupted run, those after from the resumed one) and every exported weight
  equal the uninterrupted run's exactly."""
  full_dir, _ = two_process['full']
  run_dir, resumed = two_process['resumed']
  step = _preempted_step(two_process['preempted'][1]['p0'][1])
  assert f'resumed from {checkpoint.root_of(str(run_dir))}/{step} at step {step}' in resumed['p0'][1]
  full, run = _metrics(full_dir), _metrics(run_dir)
  assert [r['step'] for r in run] == [r['step'] for r in full] == list(range(1, MAX_STEPS + 1))
  for key in METRICS:
    assert [r[key] for r in run] == [r[key] for r in full], key
  assert full[-1]['loss'] < full[step - 1]['loss'] - 0.1  # Training after the stop changes the weights.
  exported, reference = _hf_weights(run_dir), _hf_weights(full_dir)
  assert sorted(exported) == sorted(reference)
  for name, value in reference.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
