"""report_to: TensorBoard and W&B next to metrics.jsonl, their startup checks, resume, and the progress bar.

What TensorBoard and W&B received is read back with independent readers: TensorBoard's own EventAccumulator, and
for W&B the offline run's `.wandb` transaction log parsed into wandb's own protobuf `Record`s. wandb 0.31 ships no
Python reader for that file any more (its `sdk/internal/datastore.py` went with the Python internal process; the Go
`wandb-core` writes it now), so `_wandb_records` reads its documented framing — LevelDB's log format with W&B's
header — checking every chunk's CRC, and leaves the content to `wandb_internal_pb2.Record`.
"""

# pylint: disable=redefined-outer-name,unused-argument  (pytest fixtures)

import glob
import io
import json
import os
import struct
import sys
import zlib

import numpy as np
import pytest

from jaxsft import reporting
from jaxsft.errors import InputError
from tests.helpers import processes
from tests.helpers import runs as runs_lib

MAX_STEPS = 4


# ------------------------------------------------------------------------------------------------------------
# Readers.

def _wandb_records(path: str) -> list:
  """The protobuf Records of a `.wandb` file: a 7-byte header (':W&B', magic 0xBEE1, version 0), then 32 KiB blocks
  of chunks (crc32 seeded with the chunk type, uint16 length, uint8 type FULL=1 | FIRST=2 | MIDDLE=3 | LAST=4); a
  block's tail shorter than a chunk header is zero padding."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=import-outside-toplevel
  with open(path, 'rb') as f:
    data = f.read()
  assert struct.unpack('<4sHB', data[:7]) == (b':W&B', 0xBEE1, 0)
  records, pending, i = [], b'', 7
  while i + 7 <= len(data):
    left = 32768 - i % 32768
    if left < 7:
      assert data[i:i + left] == b'\0' * left
      i += left
      continue
    crc, length, kind = struct.unpack('<IHB', data[i:i + 7])
    chunk = data[i + 7:i + 7 + length]
    assert len(chunk) == length and crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))), f'bad chunk at {i}'
    i += 7 + length
    pending += chunk
    if kind in (1, 4):  # FULL or LAST: a whole record.
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      records.append(record)
      pending = b''
  return records


def _wandb_files(out) -> list[str]:
  """The `.wandb` files of OUTPUT_DIR's W&B runs, oldest first, complete.

  `run.finish()` returns before wandb-core has written the file (it can still be its 7-byte header);
  `wandb.teardown()` waits for wandb-core to finish, as the interpreter's exit does.
  """
  import wandb  # pylint: disable=import-outside-toplevel
  wandb.teardown()
  return sorted(glob.glob(os.path.join(str(out), 'wandb', 'offline-run-*', 'run-*.wandb')))


def _wandb_run(path: str) -> dict:
  """One offline run: its run record, its history {step: {key: value}} and its exit code."""
  run, history, exit_code = None, {}, None
  for record in _wandb_records(path):
    kind = record.WhichOneof('record_type')
    if kind == 'run':
      run = record.run
    elif kind == 'history':
      items = {item.key or '/'.join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
      history[items.pop('_step')] = {k: v for k, v in items.items() if not k.startswith('_')}
    elif kind == 'exit':
      exit_code = record.exit.exit_code
  return {'run': run, 'history': history, 'exit_code': exit_code}


def _events(path: str):
  """TensorBoard's EventAccumulator over a log directory or one event file, everything kept."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  acc = event_accumulator.EventAccumulator(str(path), size_guidance={'scalars': 0, 'tensors': 0})
  acc.Reload()
  return acc


def _series(acc, tag: str) -> list[tuple[int, float]]:
  return [(e.step, e.value) for e in acc.Scalars(tag)]


_metrics = runs_lib.metrics


def _expected(rows: list[dict], key: str) -> list[tuple[int, float]]:
  """metrics.jsonl's `key` series as TensorBoard stores it (float32 simple values)."""
  return [(r['step'], float(np.float32(r[key]))) for r in rows if key in r]


# ------------------------------------------------------------------------------------------------------------
# Fixtures.

@pytest.fixture(scope='module')
def wandb_offline(tmp_path_factory):
  """W&B offline, silent, its settings/cache under a temporary directory; no network, no credentials."""
  import wandb  # pylint: disable=import-outside-toplevel
  home = tmp_path_factory.mktemp('wandb-home')
  with pytest.MonkeyPatch.context() as patch:
    for name in ('WANDB_API_KEY', 'WANDB_PROJECT', 'WANDB_ENTITY', 'WANDB_DIR', 'WANDB_RUN_ID', 'WANDB_RESUME'):
      patch.delenv(name, raising=False)
    patch.setenv('WANDB_MODE', 'offline')
    patch.setenv('WANDB_SILENT', 'true')
    for name in ('WANDB_CONFIG_DIR', 'WANDB_CACHE_DIR', 'WANDB_DATA_DIR', 'WANDB_ARTIFACT_DIR'):
      patch.setenv(name, str(home / name.lower()))
    wandb.teardown()  # wandb reads its environment once per session: start one with these settings.
    yield
    wandb.teardown()


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp('reporting')
  return (root, *processes.tiny_model_and_splits(root, 24, 4))


def _config(inputs, out, **overrides):
  root, model_dir, data_dir = inputs
  return runs_lib.config(**{**dict(model_name_or_path=model_dir, dataset_name=data_dir, output_dir=out, bf16=False,
                               gradient_checkpointing=False, disable_tqdm=True, max_length=128, packing=True,
                               per_device_train_batch_size=2, per_device_eval_batch_size=4, max_steps=MAX_STEPS,
                               logging_steps=1, save_steps=0, eval_generation_prompts=0, learning_rate=1e-3,
                               dataset_cache_dir=root / 'cache'),
                        **overrides})


@pytest.fixture(scope='module')
def reported_run(inputs, wandb_offline):
  """One run to TensorBoard and W&B, with the progress bar on, evaluating at steps 2 and 4."""
  out = inputs[0] / 'reported'
  runs_lib.run(_config(inputs, out, report_to='tensorboard,wandb', eval_strategy='steps', eval_steps=2.0,
                   disable_tqdm=False))
  return out


# ------------------------------------------------------------------------------------------------------------
# A run with both integrations.

@pytest.mark.slow
def test_tensorboard_scalars_are_the_metrics_rows(reported_run):
  """Every numeric field of every metrics.jsonl row is a TensorBoard scalar at the row's step, under transformers'
  names (train/loss, eval/loss), with the row's value: the loss and eval-loss curves are exactly metrics.jsonl's."""
  rows = _metrics(reported_run)
  train_rows = [r for r in rows if 'loss' in r]
  assert [r['step'] for r in train_rows] == list(range(1, MAX_STEPS + 1))
  assert [r['step'] for r in rows if 'eval_loss' in r] == [2, 4]
  assert 'train/loss' not in json.dumps(rows)  # metrics.jsonl keeps its own field names.
  acc = _events(reported_run / 'tensorboard')
  assert _series(acc, 'train/loss') == _expected(rows, 'loss')
  assert _series(acc, 'train/learning_rate') == _expected(rows, 'learning_rate')
  assert _series(acc, 'eval/loss') == _expected(rows, 'eval_loss')
  assert _series(acc, 'eval/mean_token_accuracy') == _expected(rows, 'eval_mean_token_accuracy')
  want_tags = {reporting.scalar_name(k) for r in rows for k, v in r.items()
               if k != 'step' and isinstance(v, (int, float)) and not (k == 'epoch' and 'eval_loss' in r)}
  assert set(acc.Tags()['scalars']) == want_tags
  assert _series(acc, 'train/compile_seconds')[0][0] == 1  # Only in the first row.
  assert [s for s, _ in _series(acc, 'train/epoch')] == list(range(1, MAX_STEPS + 1))  # Not again from eval rows.


@pytest.mark.slow
def test_wandb_offline_run_holds_the_same_history_and_config(reported_run):
  """The offline W&B run (under OUTPUT_DIR/wandb, id in OUTPUT_DIR/wandb_id) records the resolved config, the
  default project and run name, the loss and eval-loss series exactly as metrics.jsonl, and a clean exit."""
  rows = _metrics(reported_run)
  (path,) = _wandb_files(reported_run)
  got = _wandb_run(path)
  run = got['run']
  assert run.run_id == (reported_run / reporting.WANDB_ID_FILE).read_text().strip()
  assert run.project == 'jaxsft' and run.display_name == 'reported'
  config = {item.key: json.loads(item.value_json) for item in run.config.update}
  resolved = runs_lib.config_json(reported_run)
  assert config['max_steps'] == MAX_STEPS and config['resolved'] == resolved['resolved']
  history = got['history']
  assert [(s, h['train/loss']) for s, h in sorted(history.items()) if 'train/loss' in h] == \
      [(r['step'], r['loss']) for r in rows if 'loss' in r]
  assert [(s, h['eval/loss']) for s, h in sorted(history.items()) if 'eval/loss' in h] == \
      [(r['step'], r['eval_loss']) for r in rows if 'eval_loss' in r]
  assert got['exit_code'] == 0


# ------------------------------------------------------------------------------------------------------------
# Resume.

@pytest.mark.slow
def test_resumed_run_purges_tensorboard_and_continues_the_wandb_run(inputs, wandb_offline, monkeypatch):
  """A run checkpointed at step 2 dies after logging step 3 (W&B records the failure, exit code 1); the same command
  resumes at 2. TensorBoard then shows steps 1..4 once each, with the final metrics.jsonl values (the dead run's
  step 3 is purged: without purge_step it would be there twice), and W&B continues the same run id."""
  out = inputs[0] / 'resumed'
  config = _config(inputs, out, report_to='tensorboard,wandb', save_steps=2)

  def die_before_step_4(step):
    if step == 4:  # The loop is about to run step 4.
      raise RuntimeError('killed')

  with monkeypatch.context() as patch:
    runs_lib.on_step(patch, die_before_step_4)
    with pytest.raises(RuntimeError, match='killed'):
      runs_lib.run(config)
  assert [r['step'] for r in _metrics(out)] == [1, 2, 3]
  (first_file,) = glob.glob(str(out / 'tensorboard' / '*tfevents*'))
  assert [s for s, _ in _series(_events(first_file), 'train/loss')] == [1, 2, 3]  # Step 3 is there to purge.
  (first_wandb,) = _wandb_files(out)
  assert _wandb_run(first_wandb)['exit_code'] == 1

  runs_lib.run(config)
  rows = _metrics(out)
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  assert len(glob.glob(str(out / 'tensorboard' / '*tfevents*'))) == 2
  assert _series(_events(out / 'tensorboard'), 'train/loss') == _expected(rows, 'loss')
  runs = [_wandb_run(p) for p in _wandb_files(out)]
  assert len(runs) == 2
  run_id = (out / reporting.WANDB_ID_FILE).read_text().strip()
  assert [r['run'].run_id for r in runs] == [run_id, run_id]
  assert sorted(runs[1]['history']) == [3, 4] and runs[1]['exit_code'] == 0
  assert [runs[1]['history'][s]['train/loss'] for s in (3, 4)] == [r['loss'] for r in rows[2:]]


# ------------------------------------------------------------------------------------------------------------
# report_to 'none', bad names, missing packages, no credentials.

@pytest.mark.slow
def test_report_to_none_writes_neither_tensorboard_nor_wandb(inputs):
  """The default: metrics.jsonl only; no tensorboard directory, no wandb directory, no W&B run id."""
  out = inputs[0] / 'none'
  runs_lib.run(_config(inputs, out, max_steps=1))
  assert [r['step'] for r in _metrics(out)] == [1]
  assert not (out / 'tensorboard').exists() and not (out / 'wandb').exists()
  assert not (out / reporting.WANDB_ID_FILE).exists()


def _cheap_config(tmp_path, **overrides):
  """A config that passes validation; nothing behind it is ever loaded (the checks under test fail first)."""
  return runs_lib.config(**{**dict(model_name_or_path=tmp_path, dataset_name='unused', output_dir=tmp_path / 'out'),
                        **overrides})


def test_unknown_integration_is_a_config_error(tmp_path):
  """A name outside tensorboard / wandb is config_lib.validate's one-line error naming it."""
  with pytest.raises(InputError, match=r"config field 'report_to' names 'comet'; expected 'none', 'all'"):
    runs_lib.run(_cheap_config(tmp_path, report_to='tensorboard,comet'))


@pytest.mark.parametrize('name, module', [('wandb', 'wandb'), ('tensorboard', 'tensorboardX')])
def test_missing_package_is_one_line_before_anything_runs(tmp_path, monkeypatch, name, module):
  """With the integration's package not importable, trainer.run stops at once (no output_dir created) with the
  one-line error naming the field, the package and the extra to install."""
  monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError.
  with pytest.raises(InputError) as e:
    runs_lib.run(_cheap_config(tmp_path, report_to=f'tensorboard,{name}' if name == 'wandb' else name))
  assert str(e.value) == (f"config field 'report_to' names {name!r} but the {module} package is not installed "
                          f"(pip install 'jaxsft[{name}]')")
  assert not (tmp_path / 'out').exists()


def test_wandb_without_credentials_fails_at_once_instead_of_prompting(tmp_path, monkeypatch):
  """Online mode with no key anywhere (env, .netrc, settings): a one-line error pointing at `wandb login` and
  WANDB_MODE=offline, before anything runs; offline or disabled needs no key; a key in the environment suffices
  (not verified: no network)."""
  import wandb  # pylint: disable=import-outside-toplevel
  for name in ('WANDB_API_KEY', 'WANDB_MODE', 'WANDB_IDENTITY_TOKEN_FILE'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('NETRC', str(tmp_path / 'netrc'))
  monkeypatch.setenv('WANDB_CONFIG_DIR', str(tmp_path / 'config'))
  monkeypatch.setenv('HOME', str(tmp_path))
  wandb.teardown()
  try:
    with pytest.raises(InputError) as e:
      runs_lib.run(_cheap_config(tmp_path, report_to='wandb'))
    message = str(e.value)
    assert message.startswith("config field 'report_to' names 'wandb' but no W&B credentials found")
    assert '`wandb login`' in message and 'WANDB_MODE=offline' in message and '\n' not in message
    assert not (tmp_path / 'out').exists()
    for mode in ('offline', 'disabled'):
      monkeypatch.setenv('WANDB_MODE', mode)
      assert reporting.report_to_problem(('wandb',)) is None
    monkeypatch.delenv('WANDB_MODE')
    monkeypatch.setenv('WANDB_API_KEY', 'a' * 40)
    monkeypatch.setenv('WANDB__DISABLE_VIEWER', 'true')  # No 5 s attempt to fetch the account name.
    wandb.teardown()
    assert reporting.report_to_problem(('wandb',)) is None
  finally:
    wandb.teardown()


def test_wandb_init_failure_is_one_line_and_leaves_no_run_id(tmp_path, monkeypatch, wandb_offline):
  """wandb.init raising (server unreachable, multi-line message) becomes one InputError line that points at
  WANDB_MODE=offline; no wandb_id is written, so a later run does not try to continue a run that never started."""
  import wandb  # pylint: disable=import-outside-toplevel

  def failing_init(**kwargs):
    raise wandb.errors.CommError('could not reach api.wandb.ai\nretrying gave up')

  monkeypatch.setattr(wandb, 'init', failing_init)
  with pytest.raises(InputError) as e:
    reporting.Reporter(str(tmp_path), report_to=('tensorboard', 'wandb'))
  assert '\n' not in str(e.value) and 'could not reach api.wandb.ai' in str(e.value)
  assert 'WANDB_MODE=offline' in str(e.value)
  assert not (tmp_path / reporting.WANDB_ID_FILE).exists()


# ------------------------------------------------------------------------------------------------------------
# Text.

def test_text_goes_to_metrics_jsonl_tensorboard_and_wandb(tmp_path, wandb_offline):
  """`text` writes one metrics.jsonl row {step, tag: rows}, a TensorBoard text event (the rows as a Markdown table,
  pipes and newlines escaped) and a W&B table with the same cells, all at the given step."""
  rows = [{'prompt': 'What is 2|3?', 'reference': '5', 'generated': 'line 1\nline 2'},
          {'prompt': 'Why?', 'reference': 'because', 'generated': ''}]
  with reporting.Reporter(str(tmp_path), report_to=('tensorboard', 'wandb')) as reporter:
    reporter.write({'step': 7, 'loss': 1.5})
    reporter.text('eval_generations', 7, rows)
  assert _metrics(tmp_path) == [{'step': 7, 'loss': 1.5}, {'step': 7, 'eval_generations': rows}]

  acc = _events(tmp_path / 'tensorboard')
  (event,) = acc.Tensors('eval/generations/text_summary')
  table = event.tensor_proto.string_val[0].decode()
  assert event.step == 7 and table == reporting.markdown_table(rows)
  assert table.splitlines() == ['| prompt | reference | generated |', '|---|---|---|',
                                '| What is 2\\|3? | 5 | line 1<br>line 2 |', '| Why? | because |  |']

  (path,) = _wandb_files(tmp_path)
  step_items = _wandb_run(path)['history'][7]
  assert step_items['train/loss'] == 1.5
  assert step_items['eval/generations/_type'] == 'table-file' and step_items['eval/generations/nrows'] == 2
  media = os.path.join(os.path.dirname(path), 'files', step_items['eval/generations/path'])
  with open(media, encoding='utf-8') as f:
    saved = json.load(f)
  assert saved['columns'] == ['prompt', 'reference', 'generated']
  assert saved['data'] == [[r['prompt'], r['reference'], r['generated']] for r in rows]


def test_a_preempted_run_ends_its_wandb_run_as_preempted(tmp_path, wandb_offline):
  """close(143, preempted=True), as the loop calls it on SIGTERM: W&B gets a `preempting` record and exit code 143
  (a run to be resumed, not a plain failure)."""
  reporter = reporting.Reporter(str(tmp_path), report_to=('wandb',))
  reporter.write({'step': 1, 'loss': 2.0})
  reporter.close(143, preempted=True)
  (path,) = _wandb_files(tmp_path)
  kinds = [record.WhichOneof('record_type') for record in _wandb_records(path)]
  assert 'preempting' in kinds and _wandb_run(path)['exit_code'] == 143


# ------------------------------------------------------------------------------------------------------------
# Progress bar.

class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_progress_bar_eta_excludes_the_first_steps_compilation():
  """The first step takes 100 s (compilation), the next ones 2 s each: with 6 of 10 steps left after step 4 the ETA
  is 12 s (tqdm's overall rate would say 6 × 106/4 = 159 s); resumed at step 5, the clock again starts after the
  run's first step. The drawn bar shows step/total, loss, tokens/s and that ETA."""
  clock = _Clock()
  bar = reporting.ProgressBar(10, 0, clock=clock, file=io.StringIO())
  assert bar.eta_seconds() is None
  clock.now = 100.0
  bar.step()
  assert bar.eta_seconds() is None  # Only the compilation step so far: no pace known.
  for _ in range(3):
    clock.now += 2.0
    bar.step()
  assert bar.eta_seconds() == pytest.approx(12.0)
  bar.show({'step': 4, 'loss': 1.23456, 'tokens_per_second': 987.6})
  text = bar.text()
  assert '4/10' in text and 'loss=1.2346' in text and 'tok/s=988' in text and 'eta=00:12' in text
  bar.close()

  resumed = reporting.ProgressBar(10, 5, clock=clock, file=io.StringIO())
  clock.now += 300.0  # Restore and compilation.
  resumed.step()
  clock.now += 3.0
  resumed.step()
  assert resumed.eta_seconds() == pytest.approx(3 * 3.0)
  assert '7/10' in resumed.text()
  resumed.close()
