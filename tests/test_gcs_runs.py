"""Runs that live in a bucket, through the real command line, against fake-gcs-server on 127.0.0.1 (issue 17).

Two processes (2 × 2 CPU devices, jax.distributed on 127.0.0.1, mesh fsdp=4: each process writes its own
checkpoint shards) train with `--config.output_dir=gs://BUCKET/run` from an empty working directory; process 1
gets SIGTERM at step 4 and both save the same step to the bucket and exit 143; the same command again resumes
from the bucket and finishes. Against an uninterrupted run of the same two-process cluster into a local directory:
every metric of every step and every exported weight are equal bit for bit. Nothing is written to the working
directory. `jaxsft.export` reads the bucket run and writes to the bucket and to local disk.
"""

import json
import os
import re
import signal
import subprocess

import numpy as np
import pytest

from jaxsft import checkpoint
from jaxsft import integrity
from jaxsft import storage
from tests.helpers import checkpoint_process
from tests.helpers import gcs
from tests.helpers import models
from tests.helpers import processes
from tests.helpers import runs
from tests.helpers.gcs import gcs_emulator  # pylint: disable=unused-import  (a fixture)

pytestmark = pytest.mark.slow
HELPER = 'tests.helpers.checkpoint_process'
SIGTERM_AT_STEP, MAX_STEPS = 4, 10
SLOW_SECONDS = 1.0  # Per step after the signal: jax's preemption sync point comes well before the end.
METRICS = ('loss', 'grad_norm', 'learning_rate', 'mean_token_accuracy', 'entropy', 'num_tokens', 'epoch')


def _cluster(name, root, model_dir, data_file, out, env, sigterm_at_step=0) -> dict:
  """The two processes of one run (`checkpoint_process train`: jaxsft.train itself, plus the SIGTERM)."""
  port = processes.free_port()
  flags = ['--config', os.path.join(runs.ROOT, 'configs', 'tiny.py'), *runs.flags(
      model_name_or_path=model_dir, model_init='pretrained', dataset_name=data_file, output_dir=out,
      max_steps=MAX_STEPS, max_length=96, per_device_train_batch_size=2, gradient_accumulation_steps=2,
      mesh={'data': 1, 'fsdp': -1}, logging_steps=1, seed=7, accuracy_eval_problems=0, disable_tqdm=True,
      save_steps=3, save_total_limit=2)]
  commands = {}
  for p in range(2):
    commands[f'p{p}'] = (runs.argv(HELPER, 'train', sigterm_at_step, SLOW_SECONDS, *flags), {
        **env, 'JAX_NUM_CPU_DEVICES': '2', 'JAXSFT_CACHE_DIR': str(root / f'cache_{name}_p{p}'),
        'JAXSFT_COORDINATOR_ADDRESS': f'127.0.0.1:{port}', 'JAXSFT_NUM_PROCESSES': '2', 'JAXSFT_PROCESS_ID': str(p)})
  return commands


def _run_all(commands: dict, cwd) -> dict[str, tuple[int, str]]:
  return processes.finish_all(processes.start_all(commands, cwd=cwd))


def _report(procs: dict) -> str:
  return '\n'.join(f'--- {p} (exit {status}):\n{err[-3000:]}' for p, (status, err) in procs.items())


def _metrics(path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope='module')
def bucket_run(tmp_path_factory):
  """{'emulator', 'work' (the runs' working directory), 'full' (local dir), 'preempted' / 'resumed' (procs),
  'after_preemption' (what the bucket held then)}."""
  root = tmp_path_factory.mktemp('gcs_runs')
  model_dir = models.save_tiny_qwen2(root / 'model', hidden_size=64, intermediate_size=128)
  data_file = processes.write_synthetic_jsonl(root / 'train.jsonl', 16 * MAX_STEPS, seed=5)
  work = root / 'work'
  work.mkdir()
  (root / 'gcs').mkdir()
  with gcs.running(root / 'gcs') as emulator:
    env = runs.environment(isolated=True, **emulator.env)
    out = emulator.uri('run')
    full_dir = root / 'full'
    full = _run_all(_cluster('full', root, model_dir, data_file, full_dir, env), work)
    assert all(status == 0 for status, _ in full.values()), _report(full)
    preempted = _run_all(_cluster('preempted', root, model_dir, data_file, out, env, SIGTERM_AT_STEP), work)
    run = emulator.local('run')
    after = {'files': sorted(str(p.relative_to(run)) for p in run.rglob('*') if p.is_file()),
             'logged_steps': [r['step'] for r in _metrics(run / 'metrics.jsonl')] if run.exists() else []}
    resumed = _run_all(_cluster('resumed', root, model_dir, data_file, out, env), work)
    assert all(status == 0 for status, _ in resumed.values()), _report(resumed)
    yield {'emulator': emulator, 'env': env, 'work': work, 'root': root, 'full': full_dir, 'preempted': preempted,
           'resumed': resumed, 'after_preemption': after}


def _preempted_step(stderr: str) -> int | None:
  match = re.search(r'^preempted: stopped by SIGTERM after step (\d+);', stderr, re.MULTILINE)
  return int(match.group(1)) if match else None


def test_sigterm_saves_one_committed_checkpoint_to_the_bucket(bucket_run):
  procs = bucket_run['preempted']
  assert {p: status for p, (status, _) in procs.items()} == {'p0': 128 + signal.SIGTERM, 'p1': 128 + signal.SIGTERM}, \
      _report(procs)
  step = _preempted_step(procs['p0'][1])
  assert step == _preempted_step(procs['p1'][1]) and SIGTERM_AT_STEP <= step < MAX_STEPS, _report(procs)
  after = bucket_run['after_preemption']
  assert after['logged_steps'] == list(range(1, step + 1))
  steps = sorted({int(f.split('/')[1]) for f in after['files'] if f.startswith('checkpoints/')})
  assert steps[-1] == step and len(steps) <= 2, after['files']  # save_steps=3, save_total_limit=2.
  for s in steps:  # On a bucket a checkpoint is complete when committed and checksummed (checkpoint.py).
    for name in ('commit_success.txt', integrity.FILE, 'meta/metadata'):
      assert f'checkpoints/{s}/{name}' in after['files'], (s, name)
    # Both processes wrote their shards into the one checkpoint.
    assert any(f.startswith(f'checkpoints/{s}/state/ocdbt.process_1/') for f in after['files']), after['files']
  assert '.lock' not in after['files'] and not any('.shared-check-' in f for f in after['files'])
  assert not any(f.startswith('hf/') for f in after['files'])  # The export is written only at the end.


def test_the_resumed_run_reproduces_the_uninterrupted_one_bitwise(bucket_run):
  emulator = bucket_run['emulator']
  step = _preempted_step(bucket_run['preempted']['p0'][1])
  assert f'resumed from {emulator.uri("run", "checkpoints")}/{step} at step {step}' in bucket_run['resumed']['p0'][1]
  full, run = runs.metrics(bucket_run['full']), _metrics(emulator.local('run', 'metrics.jsonl'))
  assert [r['step'] for r in run] == [r['step'] for r in full] == list(range(1, MAX_STEPS + 1))
  for key in METRICS:
    assert [r[key] for r in run] == [r[key] for r in full], key
  exported, reference = runs.weights(emulator.local('run', 'hf')), runs.hf_weights(bucket_run['full'])
  assert sorted(exported) == sorted(reference)
  for name, value in reference.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  written = sorted(p.name for p in emulator.local('run').iterdir())
  assert written == ['checkpoints', 'config.json', 'hf', 'metrics.jsonl', 'tokenizer'], written
  assert json.loads(emulator.local('run', 'config.json').read_text())['output_dir'] == emulator.uri('run')


def test_nothing_is_written_to_the_working_directory(bucket_run):
  assert os.listdir(bucket_run['work']) == []
  assert not os.path.exists(os.path.join(runs.ROOT, 'gs:'))


def test_export_reads_the_bucket_and_writes_to_it_or_to_local_disk(bucket_run):
  emulator, work = bucket_run['emulator'], bucket_run['work']
  reference = runs.hf_weights(bucket_run['full'])
  local = bucket_run['root'] / 'exported'
  for out, where in ((emulator.uri('exports', 'last'), emulator.local('exports', 'last')), (str(local), local)):
    proc = subprocess.run(runs.argv('jaxsft.export', '--checkpoint', emulator.uri('run'), '--out', out), cwd=work,
                          env=bucket_run['env'], text=True, capture_output=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'exported {emulator.uri("run")} to {out}' in proc.stderr
    exported = runs.weights(where)
    assert sorted(exported) == sorted(reference)
    for name, value in reference.items():
      np.testing.assert_array_equal(exported[name], value, err_msg=name)
    assert json.loads((where / 'generation_config.json').read_text()) == json.loads(
        emulator.local('run', 'hf', 'generation_config.json').read_text())
  assert os.listdir(work) == []


def test_a_run_on_a_bucket_directory_held_by_another_host_is_refused(gcs_emulator, tmp_path):
  """The lock is an object created only if absent (ifGenerationMatch=0); one held by another host is refused in
  one line that names the object to remove, and nothing is written."""
  lock = json.dumps({'host': 'worker-7', 'pid': 4242, 'started': 0})
  storage.write_atomically(gcs_emulator.uri('run', '.lock'), lock)
  (tmp_path / 'work').mkdir()
  proc = subprocess.run(runs.train_argv(os.path.join(runs.ROOT, 'configs', 'tiny.py'),
                                        output_dir=gcs_emulator.uri('run')),
                        cwd=tmp_path / 'work', env=runs.environment(**gcs_emulator.env), text=True,
                        capture_output=True, timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  (line,) = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert "pid 4242 on host 'worker-7'" in line and f'remove {gcs_emulator.uri("run", ".lock")})' in line, line
  assert storage.files_under(gcs_emulator.uri('run')) == ['.lock']
  assert storage.read_text(gcs_emulator.uri('run', '.lock')) == lock
  assert os.listdir(tmp_path / 'work') == []


def test_a_save_cut_short_on_a_bucket_is_never_resumed_from(gcs_emulator):
  """On a bucket Orbax writes STEP/ in place: a save killed before its commit leaves STEP/ without
  commit_success.txt (and without checksums.json, written just before it). Such a step is not complete: the run
  resumes from the one before, and the next manager removes it and saves that step anew."""
  root = gcs_emulator.uri('run', checkpoint.CHECKPOINTS)
  state = {'params': {'w': np.arange(8, dtype=np.float32)}}
  manager = checkpoint.Manager(root, max_to_keep=3)
  for step in (2, 4):
    manager.save(step, state, {'step': step})
    manager.wait()
  manager.close()
  fs = storage._fs()  # pylint: disable=protected-access
  fs.copy(f'{gcs.BUCKET}/run/checkpoints/4', f'{gcs.BUCKET}/run/checkpoints/6', recursive=True)
  for name in ('commit_success.txt', integrity.FILE):
    storage.remove(f'{root}/6/{name}')
  assert sorted(storage.listdir(root)) == ['2', '4', '6']
  assert checkpoint._complete_steps(root) == [2, 4]  # pylint: disable=protected-access
  assert checkpoint.newest_verified(root) == 4
  manager = checkpoint.Manager(root, max_to_keep=3)
  assert manager.steps() == [2, 4] and sorted(storage.listdir(root)) == ['2', '4']  # Removed on open.
  manager.save(6, state, {'step': 6})
  manager.close()
  assert checkpoint._complete_steps(root) == [2, 4, 6]  # pylint: disable=protected-access
  assert checkpoint.verify(root, 6) is None
