"""Bad input through the real command line: one `error:` line naming the culprit, exit 2, no traceback."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'jaxsft.train', *args], cwd=ROOT, env=env, text=True,
                        capture_output=True, timeout=timeout, check=False)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, proc.stderr[-2000:]
  for needle in needles:
    assert needle in errors[0], errors[0]


def _tiny(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
  return _train('--config', 'configs/tiny.py', f'--config.output_dir={tmp_path / "out"}', *overrides)


def _write(path, lines) -> str:
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')
  return str(path)


def _messages_row(answer: str = 'The answer is 4.') -> str:
  return json.dumps({'messages': [{'role': 'user', 'content': 'What is 2 + 2?'},
                                  {'role': 'assistant', 'content': answer}]})


def test_unknown_config_field(tmp_path):
  _assert_one_line_error(_tiny(tmp_path, '--config.learnig_rate=1e-3'), 'learnig_rate', 'learning_rate')


def test_missing_config_field_value(tmp_path):
  proc = _train('--config', 'configs/sft.py', f'--config.output_dir={tmp_path}',
                '--config.dataset_name=x.jsonl')
  _assert_one_line_error(proc, 'model_name_or_path')


def test_missing_model_path(tmp_path):
  _assert_one_line_error(_tiny(tmp_path, '--config.model_name_or_path=/no/such/model'),
                         'model_name_or_path', '/no/such/model')


def test_missing_dataset_file(tmp_path):
  _assert_one_line_error(_tiny(tmp_path, f'--config.dataset_name={tmp_path / "nope.jsonl"}'),
                         'nope.jsonl')


def test_malformed_jsonl_line_is_named(tmp_path):
  data = _write(tmp_path / 'bad.jsonl', [_messages_row(), _messages_row(), '{"messages": [', _messages_row()])
  _assert_one_line_error(_tiny(tmp_path, f'--config.dataset_name={data}'), 'bad.jsonl', 'line 3')


def test_row_without_expected_column(tmp_path):
  data = _write(tmp_path / 'cols.jsonl', [_messages_row(), json.dumps({'question': 'hi', 'answer': 'yo'})])
  _assert_one_line_error(_tiny(tmp_path, f'--config.dataset_name={data}'), 'cols.jsonl')


def test_empty_dataset(tmp_path):
  data = _write(tmp_path / 'empty.jsonl', [''])
  _assert_one_line_error(_tiny(tmp_path, f'--config.dataset_name={data}'), 'empty.jsonl')


def test_existing_run_is_never_overwritten(tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'metrics.jsonl').write_text('{"step": 1, "loss": 1.0}\n')
  _assert_one_line_error(_tiny(tmp_path), 'output_dir')
  assert (out / 'metrics.jsonl').read_text() == '{"step": 1, "loss": 1.0}\n'


@pytest.mark.parametrize('override,field', [
    ('--config.lr_scheduler_type=cosine_restarts', 'lr_scheduler_type'),
    ('--config.mesh.tensor=3', 'mesh'),
    ('--config.warmup_ratio=1.5', 'warmup_ratio'),
])
def test_invalid_values_name_the_field(tmp_path, override, field):
  _assert_one_line_error(_tiny(tmp_path, override), field)


@pytest.mark.parametrize('override,field', [
    ('--config.eval_strategy=sometimes', 'eval_strategy'),
    ('--config.eval_steps=0', 'eval_steps'),
    ('--config.dataset_mixture=mix.yaml', 'dataset_mixture'),  # And dataset_name is set too.
])
def test_invalid_data_settings_name_the_field(tmp_path, override, field):
  _assert_one_line_error(_tiny(tmp_path, override), field)


def test_mixture_with_mismatched_columns_names_the_datasets(tmp_path):
  a = _write(tmp_path / 'a.jsonl', [_messages_row()])
  b = _write(tmp_path / 'b.jsonl', [json.dumps({'messages': json.loads(_messages_row())['messages'], 'source': 'x'})])
  mix = _write(tmp_path / 'mix.yaml', ['datasets:', f'  - id: {a}', f'  - id: {b}', 'seed: 0'])
  _assert_one_line_error(_tiny(tmp_path, '--config.dataset_name=', f'--config.dataset_mixture={mix}'),
                         'dataset_mixture', 'a.jsonl', 'b.jsonl', 'source')


def test_bad_row_in_the_eval_split_is_named(tmp_path):
  data = tmp_path / 'data'
  data.mkdir()
  _write(data / 'train.jsonl', [_messages_row()] * 4)
  _write(data / 'test.jsonl', [_messages_row(), '{"messages": 3}'])
  _assert_one_line_error(_tiny(tmp_path, f'--config.dataset_name={data}', '--config.eval_strategy=steps'),
                         'test.jsonl', 'line 2')


@pytest.mark.slow
def test_skip_bad_rows_trains_on_the_rest_and_counts_them(tmp_path):
  data = _write(tmp_path / 'bad.jsonl', [_messages_row()] * 5 + ['{"messages": [', json.dumps({'messages': 'x'})])
  proc = _tiny(tmp_path, f'--config.dataset_name={data}', '--config.skip_bad_rows=true', '--config.max_steps=1',
               '--config.accuracy_eval_problems=0', '--config.disable_tqdm=true')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '2 bad rows skipped' in proc.stderr
  resolved = json.loads((tmp_path / 'out' / 'config.json').read_text())['resolved']
  assert resolved['num_bad_rows_skipped'] == 2 and resolved['num_examples'] == 5
