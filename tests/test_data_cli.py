"""The data side through the real command line: saved datasets, eval files, a tokenizer without a chat template,
and Ctrl-C during the length pass of a big dataset."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers import models
from tests.helpers import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ('--config.bf16=false', '--config.gradient_checkpointing=false', '--config.max_length=128',
         '--config.per_device_train_batch_size=2', '--config.disable_tqdm=true', '--config.eval_generation_prompts=0')

datasets = pytest.importorskip('datasets')


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  """A tiny Qwen2, JSON Lines train/test files, and the same rows saved as a Dataset and as a DatasetDict."""
  root = tmp_path_factory.mktemp('data_cli')
  model_dir, data_dir = processes.tiny_model_and_splits(root, num_train=16, num_test=4)
  train, test = os.path.join(data_dir, 'train.jsonl'), os.path.join(data_dir, 'test.jsonl')
  rows = {name: [json.loads(line) for line in open(path, encoding='utf-8')] for name, path in
          (('train', train), ('test', test))}
  datasets.Dataset.from_list(rows['train']).save_to_disk(str(root / 'saved'))
  datasets.DatasetDict({'train': datasets.Dataset.from_list(rows['train']),
                        'validation': datasets.Dataset.from_list(rows['test'])}).save_to_disk(str(root / 'saved_dict'))
  return {'model': model_dir, 'train': train, 'test': test, 'saved': str(root / 'saved'),
          'saved_dict': str(root / 'saved_dict'), 'root': root}


def _argv(model: str, data: str, out, *overrides: str) -> list[str]:
  return [sys.executable, '-m', 'jaxsft.train', '--config', 'configs/sft.py', f'--config.model_name_or_path={model}',
          f'--config.dataset_name={data}', f'--config.output_dir={out}', *SMALL, *overrides]


def _train(*argv_args, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run(_argv(*argv_args, **kwargs), cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'), text=True,
                        capture_output=True, timeout=timeout, check=False)


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, proc.stderr[-3000:]
  for needle in needles:
    assert needle in errors[0], errors[0]
  return errors[0]


@pytest.mark.slow
def test_trains_on_a_saved_dataset_dict_with_named_splits(inputs, tmp_path):
  proc = _train(inputs['model'], inputs['saved_dict'], tmp_path / 'out', '--config.max_steps=1',
                '--config.eval_strategy=steps', '--config.eval_steps=1', '--config.dataset_test_split=validation')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"data: 16 rows from {inputs['saved_dict']} split 'train'" in proc.stderr
  assert f"eval data: 4 rows from {inputs['saved_dict']} split 'validation'" in proc.stderr
  rows = [json.loads(line) for line in (tmp_path / 'out' / 'metrics.jsonl').read_text().splitlines()]
  assert any('eval_loss' in row for row in rows)


@pytest.mark.slow
def test_trains_on_a_saved_dataset_with_an_eval_file(inputs, tmp_path):
  proc = _train(inputs['model'], inputs['saved'], tmp_path / 'out', '--config.max_steps=1',
                '--config.eval_strategy=steps', f"--config.dataset_test_split={inputs['test']}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"data: 16 rows from {inputs['saved']} split 'train'" in proc.stderr
  assert f"eval data: 4 rows from {inputs['test']};" in proc.stderr


def test_a_split_missing_from_a_saved_dataset_dict_is_one_line(inputs, tmp_path):
  proc = _train(inputs['model'], inputs['saved_dict'], tmp_path / 'out', '--config.eval_strategy=steps')
  _one_error_line(proc, "'dataset_test_split'", "no split 'test'", "['train', 'validation']")


def test_a_missing_eval_file_is_one_line(inputs, tmp_path):
  missing = str(inputs['root'] / 'no_such_test.jsonl')
  proc = _train(inputs['model'], inputs['train'], tmp_path / 'out', '--config.eval_strategy=steps',
                f'--config.dataset_test_split={missing}')
  line = _one_error_line(proc, "'dataset_test_split'", missing)
  assert '.jsonl.jsonl' not in line


def test_a_tokenizer_without_chat_template_is_one_line_before_the_data_pass(inputs, tmp_path):
  import transformers  # pylint: disable=import-outside-toplevel
  tokenizer_dir = str(tmp_path / 'tokenizer')
  tokenizer = transformers.AutoTokenizer.from_pretrained(inputs['model'])
  tokenizer.chat_template = None
  tokenizer.save_pretrained(tokenizer_dir)
  proc = _train(inputs['model'], inputs['train'], tmp_path / 'out', f'--config.tokenizer_name_or_path={tokenizer_dir}')
  line = _one_error_line(proc, tokenizer_dir, "'tokenizer_name_or_path'", 'no chat template', "'chat_template'",
                         'use a tokenizer that has one')
  assert 'line 1' not in line and 'http' not in line
  assert line.endswith('use a tokenizer that has one')  # Whole, not cut off.
  assert 'data: tokenizing' not in proc.stderr


def _write_big_jsonl(path, num_rows: int) -> str:
  with open(path, 'w', encoding='utf-8') as f:
    for i in range(num_rows):
      f.write(json.dumps({'messages': [
          {'role': 'user', 'content': f'What is {i} plus {i % 97}? Think it through step by step.'},
          {'role': 'assistant', 'content': f'{i} plus {i % 97} is {i + i % 97}. The answer is {i + i % 97}.'}]}) + '\n')
  return str(path)


def _live_processes_of_group(pgid: int) -> list[int]:
  """The processes of process group `pgid` that are not zombies (Linux /proc)."""
  live = []
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/stat', encoding='utf-8') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    except OSError:
      continue
    if int(fields[2]) == pgid and fields[0] != 'Z':  # state, ppid, pgrp.
      live.append(int(entry))
  return live


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='process groups through /proc')
def test_ctrl_c_during_the_length_pass_stops_at_once(inputs, tmp_path):
  """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while worker processes tokenize a big
  dataset: the run ends within seconds, its workers too, and no index cache file is left to trust."""
  data = _write_big_jsonl(tmp_path / 'big.jsonl', 150_000)  # Tens of seconds of tokenizing on 2 workers.
  cache = tmp_path / 'cache'
  argv = _argv(inputs['model'], data, tmp_path / 'out', '--config.dataset_num_proc=2',
               f'--config.dataset_cache_dir={cache}')
  proc = subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'), text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
  lines, progress = [], threading.Event()

  def read():
    for line in proc.stderr:
      lines.append(line.rstrip('\n'))
      if re.match(r'data: tokenizing .*big\.jsonl: [\d,]+ of 150,000 rows', line):
        progress.set()

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  try:
    assert progress.wait(timeout=240), '\n'.join(lines[-30:])  # A progress line within seconds of the pass start.
    time.sleep(1.0)  # The workers are up and tokenizing by now.
    assert proc.poll() is None and not any(line.startswith('data: 150000 rows') for line in lines), (
        'the pass ended before the interrupt: make the dataset bigger', lines[-30:])
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.monotonic()
    proc.wait(timeout=30)
    seconds = time.monotonic() - t0
    reader.join(timeout=10)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  assert seconds < 5, (seconds, lines[-30:])
  deadline = time.monotonic() + 5
  while _live_processes_of_group(proc.pid) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not _live_processes_of_group(proc.pid)  # The workers are gone too.
  assert not any(line.startswith('data: 150000 rows') for line in lines)  # Stopped in the pass.
  leftovers = [p.name for p in cache.rglob('*') if p.is_file()] if cache.exists() else []
  assert not leftovers, leftovers  # No index cache written (whole or partial) by the interrupted pass.
  # One line says it (jaxsft/train.py turns KeyboardInterrupt into it), after the pass's progress lines only.
  assert 'Traceback' not in '\n'.join(lines), lines[-40:]
  start = next(i for i, line in enumerate(lines) if line.startswith('data: tokenizing'))
  after = [line for line in lines[start:] if not line.startswith('data: tokenizing')]
  assert len(after) == 1 and after[0].startswith('error: interrupted'), lines[-40:]
  assert proc.returncode == 130, (proc.returncode, lines[-30:])
