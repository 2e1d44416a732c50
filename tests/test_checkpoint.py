"""Checkpoints and fault tolerance on one process: exact resume after SIGTERM / SIGINT / SIGKILL mid-save, config
changes on resume, incompatible checkpoints, a full disk.

Every run trains the same tiny float32 Qwen2 on the same 48 conversations with packing, shuffling, gradient
accumulation and a logging window that does not divide the interruption step, over two epochs; interrupted
runs stop inside the first epoch, so the resumed part crosses the epoch boundary. "Exact" means bitwise: the
same compiled step on the same device, fed the same batches from the same state, gives the same bits.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from jaxsft import checkpoint
from jaxsft.errors import InputError
from tests.helpers import models
from tests.helpers import processes
from tests.helpers import runs

NUM_ROWS = 48
INTERRUPT_AT = 5  # Not a multiple of LOGGING_STEPS: the resumed run must finish a half-done logging window.
LOGGING_STEPS = 3

pytestmark = pytest.mark.slow
# The beginnings of the console lines jaxsft itself prints during a run.
_OWN_LINES = ('data: ', 'training ', 'memory per device', 'model: ', 'compiled the train step', 'first step',
              'step=', 'checkpoint ', 'error: ')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('checkpoint')
  model_dir = models.save_tiny_qwen2(root / 'model', hidden_size=64, intermediate_size=128)
  data_file = processes.write_synthetic_jsonl(root / 'train.jsonl', NUM_ROWS, seed=5)
  return root, model_dir, data_file


def settings(model_dir: str, data_file: str) -> dict:
  return dict(model_name_or_path=model_dir, dataset_name=data_file, bf16=False, gradient_checkpointing=False,
              disable_tqdm=True, packing=True, max_length=128, per_device_train_batch_size=2,
              gradient_accumulation_steps=2, num_train_epochs=2.0, logging_steps=LOGGING_STEPS, learning_rate=1e-3,
              warmup_steps=2, weight_decay=0.1, assistant_only_loss=True, seed=3, save_steps=0)


def make_config(setup, out, **overrides):
  _, model_dir, data_file = setup
  return runs.config(**{**settings(model_dir, data_file), 'output_dir': out, **overrides})


metrics, exact, weights = runs.metrics, runs.exact, runs.hf_weights


def assert_same_weights(a: dict, b: dict) -> None:
  assert sorted(a) == sorted(b)
  for name in a:
    assert np.array_equal(a[name], b[name]), name


@pytest.fixture(scope='module')
def reference(setup):
  """The uninterrupted run (keeping only the newest 2 checkpoints, saved every 2 steps)."""
  out = setup[0] / 'reference'
  runs.run(make_config(setup, out, save_steps=2, save_total_limit=2))
  resolved = runs.resolved(out)
  # The interruption falls inside the first epoch, so the resumed part crosses the epoch boundary.
  assert INTERRUPT_AT < resolved['steps_per_epoch'] < resolved['total_steps']
  return out, resolved


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_at_the_step_boundary_and_the_resumed_run_is_bitwise_exact(setup, reference, monkeypatch,
                                                                              signum):
  ref_out, resolved = reference
  out = setup[0] / f'interrupted_{signal.Signals(signum).name}'
  handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  with monkeypatch.context() as patch:
    runs.interrupt_at(patch, INTERRUPT_AT, signum)
    with pytest.raises(runs.Preempted) as stopped:
      runs.run(make_config(setup, out))
  assert (stopped.value.signum, stopped.value.step) == (signum, INTERRUPT_AT)
  assert {s: signal.getsignal(s) for s in handlers} == handlers  # The trainer's handlers are gone again.
  assert checkpoint.latest_step(str(out)) == INTERRUPT_AT
  meta = checkpoint.read_meta(checkpoint.root_of(str(out)), INTERRUPT_AT)
  assert meta['step'] == INTERRUPT_AT  # Also the data loader's position (RunMeta).
  assert len(meta['log_window']) == INTERRUPT_AT % LOGGING_STEPS  # Steps 4 and 5, not yet logged.
  assert not (out / 'hf').exists()
  assert [r['step'] for r in metrics(out)] == [3]

  runs.run(make_config(setup, out))  # The same command again: resumes.
  ours, ref = exact(metrics(out)), exact(metrics(ref_out))
  assert [r['step'] for r in ours] == [r['step'] for r in ref]
  assert ours == ref  # Bitwise: every float of every row.
  assert ref[-1]['epoch'] == 2.0 and ref[-1]['loss'] < ref[0]['loss'] - 0.3  # A real two-epoch curve.
  assert_same_weights(weights(out), weights(ref_out))
  assert not list(out.glob('metrics.before-resume-*'))  # Nothing was written past the checkpoint.
  # Checkpoints: the interruption's, each epoch end's, none from save_steps (0).
  assert checkpoint._complete_steps(checkpoint.root_of(str(out))) == [  # pylint: disable=protected-access
      INTERRUPT_AT, resolved['steps_per_epoch'], resolved['total_steps']]


def test_reference_run_keeps_the_newest_checkpoints_and_records_the_loop_state(reference):
  out, resolved = reference
  total = resolved['total_steps']
  root = checkpoint.root_of(str(out))
  steps = checkpoint._complete_steps(root)  # pylint: disable=protected-access
  assert len(steps) == 2 and steps[-1] == total  # save_total_limit=2.
  assert not [p for p in os.listdir(root) if not p.isdigit()]  # No temporary directory left behind.
  meta = checkpoint.read_meta(root, total)
  assert meta['step'] == total  # Also the data loader's position (RunMeta).
  assert meta['num_tokens'] == metrics(out)[-1]['num_tokens']
  assert meta['config']['seed'] == 3  # The run's randomness: data order and initialisation derive from it.
  assert meta['config']['resolved']['total_steps'] == total
  assert meta['hf_config']['model_type'] == 'qwen2' and meta['export_dtype'] == 'float32'
  assert (out / 'tokenizer' / 'tokenizer.json').exists()


def test_sigkill_during_an_async_save_resumes_from_the_previous_complete_checkpoint(setup, reference):
  """The process is really killed (SIGKILL) right after a save started writing in the background."""
  ref_out, _ = reference
  out = setup[0] / 'killed'
  _, model_dir, data_file = setup
  overrides = dict(settings(model_dir, data_file), output_dir=str(out), save_steps=2)
  proc = runs.cli('tests.helpers.kill_in_save', json.dumps(overrides), '6')
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  root = checkpoint.root_of(str(out))
  assert checkpoint._complete_steps(root) == [2, 4]  # pylint: disable=protected-access
  partial = [p for p in os.listdir(root) if p.startswith('6.')]
  assert partial, os.listdir(root)  # The kill hit a save in progress: its temporary directory is there.
  assert [r['step'] for r in metrics(out)] == [3, 6]

  runs.run(make_config(setup, out, save_steps=2))
  assert not [p for p in os.listdir(root) if not p.isdigit()]  # The partial checkpoint was cleaned up.
  assert exact(metrics(out)) == exact(metrics(ref_out))
  assert_same_weights(weights(out), weights(ref_out))
  backup = out / 'metrics.before-resume-at-4.jsonl'  # The row past the checkpoint is kept, not lost.
  assert [json.loads(line)['step'] for line in backup.read_text().splitlines()] == [3, 6]


@pytest.fixture()
def finished_copy(reference, tmp_path):
  """A copy of the finished reference run, to resume with other configs without touching the original."""
  out = tmp_path / 'copy'
  shutil.copytree(reference[0], out)
  return out


def _snapshot(out) -> dict:
  return {p: (out / p).read_bytes() for p in ('config.json', 'metrics.jsonl', 'hf/model.safetensors')}


@pytest.mark.parametrize('change, named', [
    (dict(learning_rate=2e-3), 'learning_rate (0.001 -> 0.002)'),
    (dict(per_device_train_batch_size=4), 'global_batch_size (4 -> 8)'),
    (dict(max_length=120), 'max_length (128 -> 120)'),
    (dict(seed=4), 'seed (3 -> 4)'),
])
def test_resume_refuses_math_changing_fields_naming_them_and_writes_nothing(setup, finished_copy, change, named):
  before = _snapshot(finished_copy)
  with pytest.raises(InputError, match=r'config fields that change the training differ from the checkpoint: ') as e:
    runs.run(make_config(setup, finished_copy, **change))
  assert named in str(e.value) and '\n' not in str(e.value)
  assert f'--config.resume_allow_changes={named.split(" ")[0]}' in str(e.value)
  assert _snapshot(finished_copy) == before


def test_resume_refuses_changed_data(setup, finished_copy, tmp_path):
  changed = tmp_path / 'train.jsonl'
  lines = open(setup[2], encoding='utf-8').read().splitlines()
  changed.write_text('\n'.join(lines[:-1]) + '\n')
  with pytest.raises(InputError, match='data_fingerprint'):
    runs.run(make_config(setup, finished_copy, dataset_name=changed))


@pytest.mark.parametrize('change', [
    dict(logging_steps=1, eval_strategy='no', dataloader_num_workers=0, save_total_limit=5),  # Harmless.
    dict(per_device_train_batch_size=4, gradient_accumulation_steps=1),  # Same global batch of 4 rows.
    dict(learning_rate=2e-3, resume_allow_changes='learning_rate'),  # Explicitly allowed.
])
def test_resume_allows_harmless_or_allowed_changes(setup, finished_copy, change, reference):
  runs.run(make_config(setup, finished_copy, **change))  # A finished run: resumes at the end, re-exports.
  assert_same_weights(weights(finished_copy), weights(reference[0]))


def test_resume_from_a_named_checkpoint_into_a_new_output_dir(setup, reference, tmp_path):
  ref_out, resolved = reference
  steps = checkpoint._complete_steps(checkpoint.root_of(str(ref_out)))  # pylint: disable=protected-access
  start = os.path.join(checkpoint.root_of(str(ref_out)), str(steps[0]))
  out = tmp_path / 'forked'
  runs.run(make_config(setup, out, resume_from_checkpoint=start))
  assert [r['step'] for r in exact(metrics(out))][0] > steps[0]
  assert exact(metrics(out)) == [r for r in exact(metrics(ref_out)) if r['step'] > steps[0]]
  assert_same_weights(weights(out), weights(ref_out))
  assert resolved['total_steps'] in checkpoint._complete_steps(checkpoint.root_of(str(out)))  # pylint: disable=protected-access


def test_incompatible_checkpoint_names_the_first_mismatching_array(setup, reference, tmp_path):
  other = models.save_tiny_qwen2(tmp_path / 'wider', hidden_size=96, intermediate_size=128)
  config = make_config(setup, tmp_path / 'other', model_name_or_path=other, resume_allow_changes='all',
                       resume_from_checkpoint=str(reference[0]))
  with pytest.raises(InputError, match=r"does not fit this model: 'params\.embed_tokens\.embedding\.value' is "
                                       r'float32\[\d+, 64\] there, float32\[\d+, 96\] here'):
    runs.run(config)
  assert not (tmp_path / 'other' / 'checkpoints').exists()


@pytest.mark.parametrize('path, message', [
    ('missing', "config field 'resume_from_checkpoint': no such directory"),
    ('empty', 'no complete checkpoint in'),
    ('partial', 'is not a complete jaxsft checkpoint'),
])
def test_bad_resume_paths_are_one_line_errors(setup, tmp_path, path, message):
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'partial' / 'checkpoints' / '7').mkdir(parents=True)
  target = tmp_path / path
  if path == 'partial':
    target = target / 'checkpoints' / '7'
  with pytest.raises(InputError, match=message):
    runs.run(make_config(setup, tmp_path / 'out', resume_from_checkpoint=target))


def test_a_run_without_checkpoints_is_never_overwritten(setup, tmp_path):
  out = tmp_path / 'run'
  out.mkdir()
  (out / 'metrics.jsonl').write_text('{"step": 1, "loss": 1.0}\n')
  with pytest.raises(InputError, match='already holds a run'):
    runs.run(make_config(setup, out))
  assert (out / 'metrics.jsonl').read_text() == '{"step": 1, "loss": 1.0}\n'


def test_full_disk_fails_the_save_loudly_and_keeps_earlier_checkpoints(setup, tmp_path):
  """A real full filesystem: a small tmpfs in a private mount namespace (`unshare`, no root needed)."""
  if shutil.which('unshare') is None or subprocess.run(['unshare', '-rm', 'true'], check=False).returncode != 0:
    pytest.skip('unshare -rm (user and mount namespaces) is not available here')
  _, model_dir, data_file = setup
  mount = tmp_path / 'disk'
  mount.mkdir()
  out = mount / 'run'
  flags = runs.flags(**settings(model_dir, data_file))
  script = f'''
set -u
mount -t tmpfs -o size=5m tmpfs {mount}
{sys.executable} -m jaxsft.train --config configs/sft.py {" ".join(flags)} --config.output_dir={out} \\
    --config.save_steps=1 2> {tmp_path}/train.err
echo "exit=$?"
{sys.executable} -m tests.helpers.kill_in_save --check {out}
'''
  proc = subprocess.run(['unshare', '-rm', 'bash', '-c', script], cwd=runs.ROOT, capture_output=True, text=True,
                        env=runs.environment(), timeout=300, check=False)
  err = (tmp_path / 'train.err').read_text()
  assert 'exit=1' in proc.stdout, proc.stdout + proc.stderr + err[-3000:]
  (line,) = [line for line in err.splitlines() if line.startswith('error: ')]
  assert line.startswith('error: writing checkpoint ') and 'No space left on device' in line, line
  # The libraries' log records and thread tracebacks (~190 lines) went to a file, which the line names.
  assert "(the libraries' messages are in " in line and 'Traceback' not in err, err[-3000:]
  assert not [x for x in err.splitlines() if not x.startswith(_OWN_LINES)], err[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert len(result['complete']) >= 2, result  # Earlier checkpoints are whole and restore.
  assert result['restored'] == result['complete'][-1]
