"""Bad input through the real command line: one `error:` line naming the culprit, exit 2, no traceback."""

import json
import os
import subprocess
import sys

import pytest

from jaxsft.errors import one_line

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


@pytest.mark.parametrize('entry', ['jaxsft.train', 'jaxsft.dryrun'])
@pytest.mark.parametrize('override,message', [
    ('--config.learnig_rate=1e-3', 'unknown config field learnig_rate (did you mean learning_rate?)'),
    ('--config.mesh.fsdpp=2', 'unknown config field mesh.fsdpp (did you mean mesh.fsdp?)'),
    ('--config.meshh.fsdp=2', 'unknown config field meshh (did you mean mesh?)'),
    ('--config.zzzz=1', 'unknown config field zzzz'),
    ('--config.max_steps=1.5', "flag --config.max_steps=1.5: invalid literal for int() with base 10: '1.5'"),
])
def test_config_flag_errors_are_one_exact_line(entry, override, message):
  """Both config-taking entry points (jaxsft/cli.py) word a bad override the same way, nested fields by their
  dotted name."""
  proc = subprocess.run([sys.executable, '-m', entry, '--config', 'configs/tiny.py', override], cwd=ROOT,
                        text=True, capture_output=True, timeout=120, check=False)
  assert proc.returncode == 2 and proc.stderr.splitlines() == [f'error: {message}'], proc.stderr[-2000:]


@pytest.mark.parametrize('body,message', [
    ('def get_config():\n  raise RuntimeError("boom\\n  on two lines")\n', ': RuntimeError: boom on two lines'),
    ('def get_config():\n  return {"a": 1}\n', ": AttributeError: 'dict' object has no attribute 'lock'"),
    ('def get_config(:\n  pass\n', ' line 1: invalid syntax'),
])
def test_a_failing_config_file_is_one_line(tmp_path, body, message):
  """A config file that raises, returns no ConfigDict or does not parse: one line naming it, exit 2."""
  config = tmp_path / 'bad_config.py'
  config.write_text(body)
  proc = _train('--config', str(config))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.splitlines() == [f'error: --config {config}{message}'], proc.stderr[-2000:]


def test_config_file_argument_error_names_the_cause():
  """configs/NAME.py:ARG for a get_config() without a parameter: the TypeError, not config_flags' traceback."""
  proc = _train('--config', 'configs/tiny.py:extra')
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.splitlines() == ['error: --config configs/tiny.py:extra: TypeError: get_config() takes 0 '
                                      'positional arguments but 1 was given'], proc.stderr[-2000:]


def test_parse_flags_serves_entry_points_without_a_config(tmp_path):
  """An entry point with its own flags and no --config (jaxsft.export, jaxsft.generate) gets the same one-line
  failures from cli.parse_flags, and no --config requirement."""
  program = tmp_path / 'entry.py'
  program.write_text('\n'.join([
      'from absl import app, flags', 'from jaxsft import cli',
      "_N = flags.DEFINE_integer('n', 1, 'a number')",
      'def main(argv):', '  cli.no_arguments(argv)', "  print('n', _N.value)",
      "app.run(main, flags_parser=cli.parse_flags)", '']))
  env = dict(os.environ, PYTHONPATH=ROOT)

  def run(*args):
    return subprocess.run([sys.executable, str(program), *args], cwd=ROOT, env=env, text=True, capture_output=True,
                          timeout=60, check=False)

  proc = run('--n=3')
  assert (proc.returncode, proc.stdout.strip()) == (0, 'n 3'), proc.stderr[-2000:]
  for args, line in [(['--n=x'], "error: flag --n=x: invalid literal for int() with base 10: 'x'"),
                     (['--m=1'], "error: Unknown command line flag 'm'"),
                     (['--n=1', 'extra'], 'error: unexpected arguments: extra')]:
    proc = run(*args)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [line], (args, proc.stderr[-2000:])


def test_one_line():
  error = OSError('first line\n  second\tline  ')
  assert one_line(error) == 'first line second line'
  assert one_line(error, 5) == 'first'
  assert one_line(error, typed=True) == 'OSError: first line second line'
  assert one_line(ValueError(), typed=True) == 'ValueError'
  long = RuntimeError('a' * 300 + ' No space left on device')
  text = one_line(long, 100, keep_end=True)
  assert len(text) == 100 and text.startswith('a' * 47 + ' ... ') and text.endswith('No space left on device')
  assert one_line('already one line', 100, keep_end=True) == 'already one line'


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


def test_without_torch_an_error_is_still_one_line(tmp_path):
  """Where torch is not installed (a TPU VM), transformers' "PyTorch was not found" notice does not reach the
  user: a missing dataset file (found after transformers is imported) is still exactly one stderr line. Outside
  jaxsft's commands, importing transformers there prints the notice."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('TRANSFORMERS_NO_ADVISORY_WARNINGS', None)
  hidden = [sys.executable, '-c', 'from tests.helpers import no_torch; no_torch.hide_torch(); import transformers; '
            'print(transformers.utils.is_torch_available())']
  proc = subprocess.run(hidden, cwd=ROOT, env=env, text=True, capture_output=True, timeout=120, check=True)
  assert proc.stdout.strip() == 'False' and 'PyTorch was not found' in proc.stderr, proc.stderr[-2000:]
  args = ['--config', 'configs/tiny.py', '--config.dataset_name=/nonexistent/train.jsonl',
          f'--config.output_dir={tmp_path / "out"}']
  proc = subprocess.run([sys.executable, '-m', 'tests.helpers.no_torch', 'jaxsft.train', *args], cwd=ROOT,
                        env=env, text=True, capture_output=True, timeout=180, check=False)
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
  _assert_one_line_error(proc, "'dataset_name': no such file")
