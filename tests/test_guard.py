"""Non-finite numbers through the real command line (jaxsft/guard.py): a run never trains on, saves or exports them.

A learning rate of 1e30 without clipping makes step 1's update blow the weights up, so step 2's loss and gradient
are NaN: deterministic on any machine. 1e6 instead saturates the softmax: the gradient is exactly 0 and the loss
stays at ln(vocab), training that goes nowhere without a NaN.
"""

import os
import shutil
import subprocess

import numpy as np
import pytest

from jaxsft import integrity
from tests.helpers import models
from tests.helpers import processes
from tests.helpers import runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp('guard')
  model_dir = models.save_tiny_qwen2(root / 'model', hidden_size=32, intermediate_size=64)
  return model_dir, processes.write_synthetic_jsonl(root / 'train.jsonl', 32, seed=4)


_cli = runs.cli


def _train(model_dir, data, out, *overrides) -> subprocess.CompletedProcess:
  return runs.train_cli('configs/sft.py', *overrides, model_name_or_path=model_dir, dataset_name=data,
                        output_dir=out, bf16=False, gradient_checkpointing=False, max_length=128,
                        per_device_train_batch_size=2, logging_steps=1, disable_tqdm=True,
                        lr_scheduler_type='constant')


def _errors(proc) -> list[str]:
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  return [line for line in proc.stderr.splitlines() if line.startswith('error: ')]


_weights = runs.weights


def test_a_nan_loss_stops_the_run_keeps_the_checkpoints_before_it_and_exports_nothing(inputs, tmp_path):
  out = tmp_path / 'out'
  proc = _train(*inputs, out, '--config.learning_rate=1e30', '--config.max_grad_norm=0', '--config.max_steps=6',
                '--config.save_steps=1')
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert _errors(proc) == ['error: step 2: the loss is nan and the gradient norm is nan; the run stops there '
                           '(nonfinite_policy=stop): checkpoints up to step 1 are kept and nothing is exported']
  assert sorted(os.listdir(out / 'checkpoints')) == ['1']  # Step 2's state was never saved...
  assert integrity.verify(str(out / 'checkpoints' / '1')) is None
  rows = runs.metrics(out)
  assert [r['step'] for r in rows] == [1] and np.isfinite(rows[0]['loss'])  # ...nor logged.
  assert not (out / 'hf').exists() and not (out / '.lock').exists()


def test_skip_policy_leaves_the_state_unchanged_at_each_non_finite_step(inputs, tmp_path):
  out = tmp_path / 'out'
  proc = _train(*inputs, out, '--config.learning_rate=1e30', '--config.max_grad_norm=0', '--config.max_steps=4',
                '--config.save_steps=1', '--config.nonfinite_policy=skip')
  assert proc.returncode == 0 and not _errors(proc), proc.stderr[-3000:]
  assert proc.stderr.count('the step was skipped (nonfinite_policy=skip') == 3, proc.stderr[-3000:]
  rows = runs.loss_rows(out)
  assert [r['skipped_steps'] for r in rows] == [0, 1, 2, 3], rows
  assert np.isfinite(rows[0]['grad_norm']) and not any(np.isfinite(r['grad_norm']) for r in rows[1:])
  after_step_1 = tmp_path / 'after_step_1'
  export = _cli('jaxsft.export', '--checkpoint', str(out / 'checkpoints' / '1'), '--out', str(after_step_1))
  assert export.returncode == 0, export.stderr[-3000:]
  final, first = _weights(out / 'hf'), _weights(after_step_1)
  assert sorted(final) == sorted(first)
  for name, value in first.items():  # Steps 2-4 changed nothing; step 1's update did change the weights.
    assert np.array_equal(final[name], value) and np.isfinite(value).all(), name
  assert not np.array_equal(first['model.embed_tokens.weight'],
                            _weights(inputs[0])['model.embed_tokens.weight'])


def test_nan_in_the_loaded_weights_is_one_line_before_training(inputs, tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  model_dir, data = inputs
  bad = tmp_path / 'bad_model'
  shutil.copytree(model_dir, bad)
  tensors = _weights(model_dir)
  tensors['model.layers.1.mlp.up_proj.weight'][3, 5] = np.nan
  save_file(tensors, str(bad / 'model.safetensors'), metadata={'format': 'pt'})
  out = tmp_path / 'out'
  proc = _train(str(bad), data, out, '--config.max_steps=2')
  assert proc.returncode == 2, proc.stderr[-3000:]
  (line,) = _errors(proc)
  assert f"the weights loaded from '{bad}' hold non-finite values (first: layers." in line, line
  assert 'up_proj' in line and 'nothing was trained' in line, line
  assert not out.exists()


def test_a_run_that_does_not_learn_is_warned_about(inputs, tmp_path):
  proc = _train(*inputs, tmp_path / 'out', '--config.learning_rate=1e6', '--config.max_steps=14',
                '--config.save_steps=0')
  assert proc.returncode == 0, proc.stderr[-3000:]
  warnings = [line for line in proc.stderr.splitlines() if 'the model is not learning' in line]
  assert len(warnings) == 1 and 'is learning_rate=1e+06 too large?' in warnings[0], proc.stderr[-3000:]
  assert warnings[0].startswith('warning: steps 2-11: the gradient norm is 0 and the loss has not moved'), warnings
