"""The run directory through the real command line: one run per output_dir (the lock), and an output_dir that
cannot be written refused in one line before any data is read.

Every run is `python -m jaxsft.train --config configs/sft.py` on a tiny Qwen2 and a few synthetic conversations.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from tests.helpers import models
from tests.helpers import processes
from tests.helpers import runs

ROOT = runs.ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp('run_dir')
  model_dir = models.save_tiny_qwen2(root / 'model', hidden_size=32, intermediate_size=64)
  return model_dir, processes.write_synthetic_jsonl(root / 'train.jsonl', 32, seed=4)


def _fields(inputs, out) -> dict:
  model_dir, data = inputs
  return dict(model_name_or_path=model_dir, dataset_name=data, output_dir=out, bf16=False,
              gradient_checkpointing=False, max_length=128, per_device_train_batch_size=2, logging_steps=1,
              disable_tqdm=True)


def _argv(inputs, out, *overrides) -> list[str]:
  return runs.train_argv('configs/sft.py', *overrides, **_fields(inputs, out))


_env = runs.environment


def _run(inputs, out, *overrides, timeout=300) -> subprocess.CompletedProcess:
  return runs.train_cli('configs/sft.py', *overrides, timeout=timeout, **_fields(inputs, out))


def _one_error(proc, *needles) -> str:
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  (line,) = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  for needle in needles:
    assert needle in line, line
  return line


def test_a_second_run_on_a_live_directory_is_refused_in_seconds(inputs, tmp_path):
  """Run A trains (up to 400 steps); run B on the same output_dir exits 2 with one line naming A's pid, long before
  A has finished, and writes nothing; A, stopped by SIGTERM, has each of its steps once in metrics.jsonl."""
  out = tmp_path / 'out'
  first = subprocess.Popen(_argv(inputs, out, '--config.max_steps=400', '--config.save_steps=0'), cwd=ROOT,
                           env=_env(), text=True, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
  try:
    deadline = time.time() + 240
    while not (out / 'metrics.jsonl').exists():  # A is training: its first row is written.
      assert first.poll() is None and time.time() < deadline, first.stderr.read()[-3000:]
      time.sleep(0.2)
    before = sorted(os.listdir(out))
    t0 = time.time()
    second = _run(inputs, out, '--config.max_steps=400')
    seconds = time.time() - t0
    line = _one_error(second, str(out), 'in use by another run', f'pid {first.pid} on this host')
    assert first.poll() is None, 'the first run ended before the second was refused: the test proves nothing'
    assert seconds < 60, (seconds, line)  # Python and jax start-up; no data pass, no model load, no compile.
    assert 'tokeniz' not in second.stderr.lower() and 'training' not in second.stderr, second.stderr[-2000:]
    assert sorted(os.listdir(out)) == before
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 128 + signal.SIGTERM, first.stderr.read()[-3000:]
  finally:
    if first.poll() is None:
      first.kill()
  steps = [r['step'] for r in runs.metrics(out)]
  assert steps and len(steps) == len(set(steps)), steps
  assert not (out / '.lock').exists()  # Released when the run ended.


def test_a_lock_left_by_a_dead_run_on_this_host_is_taken_over(inputs, tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  dead = subprocess.Popen(['true'])
  dead.wait()
  (out / '.lock').write_text(json.dumps({'host': socket.gethostname(), 'pid': dead.pid, 'started': 0}))
  proc = _run(inputs, out, '--config.max_steps=2')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'warning: taking over the lock of run pid {dead.pid} on this host' in proc.stderr, proc.stderr[-3000:]
  assert (out / 'hf' / 'config.json').exists() and not (out / '.lock').exists()


def test_a_lock_held_on_another_host_is_refused_with_the_way_out(inputs, tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  lock = json.dumps({'host': 'worker-7', 'pid': 4242, 'started': time.time()})
  (out / '.lock').write_text(lock)
  _one_error(_run(inputs, out, '--config.max_steps=2'), "pid 4242 on host 'worker-7'", f'remove {out}/.lock')
  assert os.listdir(out) == ['.lock'] and (out / '.lock').read_text() == lock


def test_a_failed_start_leaves_no_directory_behind(inputs, tmp_path):
  """A malformed row, met in the data pass (after the lock is taken): the output_dir the run created is gone."""
  out = tmp_path / 'new'
  bad = tmp_path / 'bad.jsonl'
  bad.write_text(open(inputs[1], encoding='utf-8').read() + '{"messages": [\n')
  _one_error(_run(inputs, out, '--config.max_steps=2', f'--config.dataset_name={bad}'), 'bad.jsonl', 'line 33')
  assert not out.exists()


def test_a_read_only_output_dir_is_one_line_before_the_data_pass(inputs, tmp_path):
  """A real read-only filesystem: a tmpfs remounted read-only in a private mount namespace (`unshare`)."""
  if shutil.which('unshare') is None or subprocess.run(['unshare', '-rm', 'true'], check=False).returncode != 0:
    pytest.skip('unshare -rm (user and mount namespaces) is not available here')
  mount = tmp_path / 'ro'
  mount.mkdir()
  argv = ' '.join(_argv(inputs, mount / 'run', '--config.max_steps=2'))
  script = f'mount -t tmpfs -o size=1m tmpfs {mount} && mount -o remount,ro {mount} && {argv}'
  proc = subprocess.run(['unshare', '-rm', 'bash', '-c', script], cwd=ROOT, env=_env(), text=True,
                        capture_output=True, timeout=300, check=False)
  _one_error(proc, "config field 'output_dir'", str(mount / 'run'), 'Read-only file system')
  assert 'tokeniz' not in proc.stderr.lower() and 'training' not in proc.stderr, proc.stderr[-2000:]
