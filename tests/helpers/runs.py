"""Training runs for the trainer-level tests: build a config, run it (in-process or through the command line), read
what it left in OUTPUT_DIR.

  config(**fields)            config_lib.base_config() updated by `fields` (groups as dicts: mesh={'fsdp': 8};
                              paths may be pathlib.Path), locked
  run(config) / train(...)    trainer.run in this process (train: config(**fields), run, return OUTPUT_DIR)
  cli(module, *args)          `python -m MODULE ARGS` in a subprocess from the repository root, on CPU
                              (environment(): the variables it runs with)
  train_cli(...)              `python -m jaxsft.train --config FILE --config.FIELD=VALUE ...` the same way
  metrics / loss_rows / losses / exact / weights / hf_weights / config_json / resolved
                              OUTPUT_DIR's metrics.jsonl rows, its training rows, their losses, the rows' exact
                              (clock-free) metrics, safetensors tensors, config.json, its 'resolved' part

The internals some tests reach (the model config, the optimizer, the train state made or restored, the
prefetcher, the eval-loss pass, the tokenizer, Preempted) are named here too, so that a test reaches them in one
place.
"""

import json
import os
import pathlib
import subprocess
import sys

from jaxsft import config as config_lib
from jaxsft import evals
from jaxsft import preemption
from jaxsft import prefetch
from jaxsft import state as state_lib
from jaxsft import tokenizer as tokenizer_lib
from jaxsft import trainer

ROOT = str(pathlib.Path(__file__).resolve().parents[2])  # The repository root: subprocesses run there.
# The metrics of a training row that depend on the computation only (tokens_per_second, mfu, step_time and the
# timings depend on the clock): equal in two runs that compute the same bits.
EXACT_KEYS = ('step', 'loss', 'learning_rate', 'grad_norm', 'mean_token_accuracy', 'entropy', 'num_tokens', 'epoch')


# ----------------------------------------------------------------------------------------------------------
# Configs and runs.


def _value(value):
  return str(value) if isinstance(value, os.PathLike) else value


def config(**fields):
  """config_lib.base_config() updated by `fields`, locked (an unknown field is an error naming it).

  Path values become strings; a group (mesh, model) is given as a dict of the fields it changes.
  """
  cfg = config_lib.base_config()
  cfg.update({k: ({kk: _value(vv) for kk, vv in v.items()} if isinstance(v, dict) else _value(v))
              for k, v in fields.items()})
  cfg.lock()
  return cfg


def run(cfg) -> dict:
  """trainer.run(cfg) in this process: the last logged row."""
  return trainer.run(cfg)


def train(**fields) -> pathlib.Path:
  """run(config(**fields)); returns OUTPUT_DIR."""
  cfg = config(**fields)
  run(cfg)
  return pathlib.Path(cfg.output_dir)


def environment(*, isolated: bool = False, **variables) -> dict:
  """The environment of a subprocess: this one's (the test session's cache directories included), on CPU, with
  the repository on PYTHONPATH, plus `variables`. isolated: without this session's JAXSFT_* variables (except
  JAXSFT_CACHE_DIR) and with XLA_FLAGS='', for runs that set their own processes and devices."""
  out = dict(os.environ)
  if isolated:
    out = {k: v for k, v in out.items() if not k.startswith('JAXSFT_') or k == 'JAXSFT_CACHE_DIR'}
    out['XLA_FLAGS'] = ''
  out['JAX_PLATFORMS'] = 'cpu'
  out['PYTHONPATH'] = os.pathsep.join([ROOT, *filter(None, [os.environ.get('PYTHONPATH')])])
  out.update({k: str(v) for k, v in variables.items()})
  return out


def argv(module: str, *args) -> list[str]:
  """`python -m MODULE ARGS` as an argument list."""
  return [sys.executable, '-m', module, *map(str, args)]


def flags(**fields) -> list[str]:
  """`--config.FIELD=VALUE` for each field (booleans as true/false; a group as a dict: mesh={'fsdp': 8})."""
  out = []
  for name, value in fields.items():
    if isinstance(value, dict):
      out += flags(**{f'{name}.{k}': v for k, v in value.items()})
    else:
      out.append(f'--config.{name}={str(value).lower() if isinstance(value, bool) else _value(value)}')
  return out


def train_argv(config_file: str = 'configs/sft.py', *extra, **fields) -> list[str]:
  """`python -m jaxsft.train --config CONFIG_FILE --config.FIELD=VALUE... EXTRA...` as an argument list."""
  return argv('jaxsft.train', '--config', config_file, *flags(**fields), *extra)


def _subprocess(args: list[str], env, timeout: int) -> subprocess.CompletedProcess:
  return subprocess.run(args, cwd=ROOT, env=environment() if env is None else env, text=True, capture_output=True,
                        timeout=timeout, check=False)


def cli(module: str, *args, env=None, timeout: int = 300) -> subprocess.CompletedProcess:
  """`python -m MODULE ARGS` in a subprocess from the repository root, in `env` (default: environment()), its
  output captured; the test checks the exit status."""
  return _subprocess(argv(module, *args), env, timeout)


def train_cli(config_file: str = 'configs/sft.py', *extra, env=None, timeout: int = 300,
              **fields) -> subprocess.CompletedProcess:
  """`python -m jaxsft.train` with train_argv's arguments, as `cli` runs it."""
  return _subprocess(train_argv(config_file, *extra, **fields), env, timeout)


# ----------------------------------------------------------------------------------------------------------
# What a run left.


def metrics(out) -> list[dict]:
  """Every row of OUTPUT_DIR/metrics.jsonl, in order."""
  with open(os.path.join(out, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def loss_rows(out) -> list[dict]:
  """The training rows (those with a loss) of OUTPUT_DIR/metrics.jsonl."""
  return [r for r in metrics(out) if 'loss' in r]


def losses(out) -> list[float]:
  """The logged training losses, step by step."""
  return [r['loss'] for r in loss_rows(out)]


def exact(rows: list[dict], keys=EXACT_KEYS) -> list[dict]:
  """Of each training row, only `keys` (by default every metric that does not depend on the clock)."""
  return [{k: r[k] for k in keys} for r in rows if 'loss' in r]


def weights(directory, *, as_torch: bool = False) -> dict:
  """Every tensor of every `*.safetensors` file in `directory` (one file or HF shards), by name, read with
  safetensors' own reader: numpy arrays, or torch tensors in their stored dtype (bfloat16 included)."""
  if as_torch:
    from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  else:
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  files = sorted(pathlib.Path(directory).glob('*.safetensors'))
  assert files, f'no *.safetensors in {directory}'
  tensors = {}
  for file in files:
    part = load_file(str(file))
    assert not set(part) & set(tensors), f'{file} repeats tensors {sorted(set(part) & set(tensors))}'
    tensors.update(part)
  return tensors


def hf_weights(out) -> dict:
  """The tensors of the run's export, OUTPUT_DIR/hf (numpy)."""
  return weights(pathlib.Path(out) / 'hf')


def config_json(out) -> dict:
  """OUTPUT_DIR/config.json: the run's config with its 'resolved' figures."""
  return json.loads((pathlib.Path(out) / 'config.json').read_text())


def resolved(out) -> dict:
  """What the run resolved (total_steps, steps_per_epoch, num_devices, ...), from OUTPUT_DIR/config.json."""
  return config_json(out)['resolved']


# ----------------------------------------------------------------------------------------------------------
# Trainer internals some tests reach, from here only.

model_config = state_lib.model_config  # The transformer.ModelConfig that a config trains, for an HF config.
make_optimizer = state_lib.make_optimizer  # (the optax transformation, the schedule) for N optimizer steps.
load_tokenizer = tokenizer_lib.load_tokenizer  # The tokenizer a run trains with (template and eos applied).
init_state = state_lib.init  # (TrainState, its shardings, graphdef, frozen parameters) made on a mesh.
restore_state = state_lib.restore  # (TrainState of checkpoint (root, step) on a mesh, shardings, graphdef, frozen).
Prefetcher = prefetch.Prefetcher  # Feeds the training loop its steps.
Preempted = preemption.Preempted  # What trainer.run raises after saving on SIGTERM / SIGINT.


def on_step(patch, callback) -> None:
  """Calls callback(step) each time the training loop takes the batches of step `step` (1-based), before it runs
  that step (the loader itself runs ahead). `patch`: a pytest MonkeyPatch, or None to patch for good (in a
  subprocess of its own)."""
  original = Prefetcher.__next__

  def next_and_call(self):
    item = original(self)
    _, _, loader_state = item  # The loader's state after this step: its 'step' is this step's number.
    callback(loader_state['step'])
    return item

  if patch is None:
    Prefetcher.__next__ = next_and_call
  else:
    patch.setattr(Prefetcher, '__next__', next_and_call)


def interrupt_at(patch, step: int, signum: int) -> None:
  """Sends `signum` to this process as the loop takes step `step` to run it."""
  def signal_at(current: int) -> None:
    if current == step:
      os.kill(os.getpid(), signum)
  on_step(patch, signal_at)


def patch_eval_loss(patch, wrap) -> list:
  """Replaces the eval-loss pass that trainer.run calls (evals.eval_loss) with wrap(the original); returns a list
  that gets one entry per call, so that a test can check its replacement was really used."""
  calls, wrapped = [], wrap(evals.eval_loss)

  def counted(*args, **kwargs):
    calls.append(1)
    return wrapped(*args, **kwargs)

  patch.setattr(evals, 'eval_loss', counted)
  return calls
