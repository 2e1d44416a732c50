"""Checkpoint integrity through the real command line: a corrupted checkpoint is never trained on or exported.

Every checkpoint carries checksums of its files (jaxsft/integrity.py). A relaunch whose newest checkpoint has a
changed file names it, falls back to the newest one that verifies and reproduces the uninterrupted run exactly;
with none left it stops with one line and changes nothing; the export refuses a corrupted checkpoint.
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

STEPS = 8

pytestmark = pytest.mark.slow


def _train(inputs, out) -> subprocess.CompletedProcess:
  model_dir, data = inputs
  return runs.train_cli(model_name_or_path=model_dir, dataset_name=data, output_dir=out, bf16=False,
                        gradient_checkpointing=False, max_length=128, per_device_train_batch_size=2,
                        gradient_accumulation_steps=2, logging_steps=1, disable_tqdm=True, max_steps=STEPS,
                        save_steps=2, learning_rate=1e-3, seed=5)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The uninterrupted run: checkpoints 2, 4, 6 and 8, each with its checksums."""
  root = tmp_path_factory.mktemp('integrity')
  inputs = (models.save_tiny_qwen2(root / 'model', hidden_size=32, intermediate_size=64),
            processes.write_synthetic_jsonl(root / 'train.jsonl', 40, seed=6))
  out = root / 'reference'
  proc = _train(inputs, out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for step in (2, 4, 6, 8):
    assert integrity.verify(str(out / 'checkpoints' / str(step))) is None, step
  return inputs, out


def _interrupted_copy(reference, tmp_path, *, after: int):
  """The reference run's directory as a run stopped right after checkpoint `after` leaves it."""
  out = tmp_path / 'run'
  shutil.copytree(reference, out)
  shutil.rmtree(out / 'hf')
  for name in os.listdir(out / 'checkpoints'):
    if int(name) > after:
      shutil.rmtree(out / 'checkpoints' / name)
  return out


def _flip(path, count: int = 64) -> None:
  """Flips `count` bytes in the middle of the file (as a bad disk or a broken copy would)."""
  data = bytearray(path.read_bytes())
  start = max(0, len(data) // 2 - count // 2)
  for i in range(start, min(len(data), start + count)):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def _largest_state_file(step_dir):
  files = [p for p in step_dir.joinpath('state').rglob('*') if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def _rows(out) -> list[dict]:
  return runs.exact(runs.metrics(out), keys=('step', 'loss', 'grad_norm', 'learning_rate', 'num_tokens'))


_weights = runs.hf_weights


def test_a_corrupted_newest_checkpoint_falls_back_and_reproduces_the_run(reference, tmp_path):
  inputs, ref = reference
  out = _interrupted_copy(ref, tmp_path, after=6)
  bad = _largest_state_file(out / 'checkpoints' / '6')
  _flip(bad)
  proc = _train(inputs, out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  name = os.path.relpath(bad, out / 'checkpoints' / '6')
  assert f"checkpoint '{out / 'checkpoints' / '6'}' is corrupted: file {name} " in proc.stderr, proc.stderr[-3000:]
  assert 'falling back to checkpoint 4, the newest that verifies' in proc.stderr
  assert 'resumed from' in proc.stderr and 'at step 4' in proc.stderr
  assert _rows(out) == _rows(ref)  # Every logged step, bit for bit: the fallback trained exactly steps 5-8 again.
  got, want = _weights(out), _weights(ref)
  assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
  assert integrity.verify(str(out / 'checkpoints' / '6')) is None  # Written again by the resumed run...
  assert (out / 'checkpoints' / '6.corrupted' / os.path.relpath(bad, out / 'checkpoints' / '6')).exists()  # ...the bad one kept.


def test_with_no_checkpoint_that_verifies_the_run_stops_and_changes_nothing(reference, tmp_path):
  inputs, ref = reference
  out = _interrupted_copy(ref, tmp_path, after=4)
  _flip(_largest_state_file(out / 'checkpoints' / '4'))
  (out / 'checkpoints' / '2' / 'meta' / 'metadata').write_text('{"format": 1, "step": 2, "tampered": true}')
  before = (out / 'metrics.jsonl').read_text()
  proc = _train(inputs, out)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  (line,) = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert 'is corrupted: file state/' in line and 'no earlier checkpoint verifies (2 checked)' in line, line
  assert 'file meta/metadata has' in proc.stderr or 'file meta/metadata does not match' in proc.stderr
  assert (out / 'metrics.jsonl').read_text() == before and not (out / 'hf').exists()


def test_export_refuses_a_corrupted_checkpoint(reference, tmp_path):
  _, ref = reference
  out = _interrupted_copy(ref, tmp_path, after=8)
  _flip(_largest_state_file(out / 'checkpoints' / '8'), count=1)
  proc = runs.cli('jaxsft.export', '--checkpoint', out, '--out', tmp_path / 'hf')
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  (line,) = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert '--checkpoint' in line and 'is corrupted: file state/' in line, line
  assert not (tmp_path / 'hf').exists()
