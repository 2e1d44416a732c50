"""Hugging Face export from checkpoints: trainer.run → OUTPUT_DIR/checkpoints/STEP → jaxsft.export → transformers.

tests/test_hf.py checks hf.save_pretrained on its own; these tests go through the checkpoint path that users
take: a short trainer.run per architecture (Qwen2, Qwen3, Llama 3, tied-embedding Llama), then
export.export_checkpoint in-process and `python -m jaxsft.export` in a subprocess, read back with transformers
and safetensors' own reader.
"""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
from typing import NamedTuple

import numpy as np
import pytest
from flax import nnx

import jaxsft
from jaxsft import checkpoint
from jaxsft import config as config_lib
from jaxsft import export
from jaxsft import run_dir
from jaxsft import tokenizer as tokenizer_lib
from jaxsft.models import hf
from jaxsft.models import hf_config
from tests.helpers import processes
from tests.helpers import runs as runs_lib

pytestmark = pytest.mark.slow

TINY_TOKENIZER = os.path.join(os.path.dirname(jaxsft.__file__), 'assets', 'tiny')
ATOL = 1e-4

# A training chat template unlike the tiny tokenizer's own (':' after the role, '<|endoftext|>' closing each turn).
TEMPLATE = ("{%- for m in messages %}{{- '<|im_start|>' + m['role'] + ':\n' + m['content'] + '<|endoftext|>\n' }}"
            "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant:\n' }}{%- endif %}")
CHAT = [{'role': 'user', 'content': 'What is 2+2?'}, {'role': 'assistant', 'content': '4'}]
CHAT_RENDERED = '<|im_start|>user:\nWhat is 2+2?<|endoftext|>\n<|im_start|>assistant:\n4<|endoftext|>\n'
EOS_OVERRIDE = '<|endoftext|>'

# Run name → (tests/conftest.py TINY_HF_CONFIGS name, trainer config overrides).
RUNS = {
    'qwen2': ('qwen2', dict(chat_template=TEMPLATE, eos_token=EOS_OVERRIDE)),
    'qwen3': ('qwen3', {}),
    'llama3': ('llama3', {}),
    'llama_tied': ('llama_tied', {}),
    'qwen2_bf16': ('qwen2', dict(bf16=True)),
}
NUM_STEPS = 2  # save_steps=1: checkpoints 1 and 2.


class Run(NamedTuple):
  model_dir: pathlib.Path  # The Hugging Face model the run started from.
  out: pathlib.Path  # OUTPUT_DIR.


# ----------------------------------------------------------------------------------------------------------
# Helpers.


def _tokenizer():
  import transformers  # pylint: disable=import-outside-toplevel
  return transformers.AutoTokenizer.from_pretrained(TINY_TOKENIZER)


def _save_model(tiny_hf, name: str, *, torch_dtype=None) -> pathlib.Path:
  """A tiny random HF model embedding the shipped tiny tokenizer's vocabulary, saved with that tokenizer.

  Its generation_config.json carries the tokenizer's own eos ('<|im_end|>'), which an eos override must replace.
  """
  tokenizer = _tokenizer()
  vocab_size = len(tokenizer) + (-len(tokenizer)) % 64
  model = tiny_hf.model(name, vocab_size=vocab_size, max_position_embeddings=128,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  if torch_dtype is not None:
    model = model.to(torch_dtype)
  path = tiny_hf.save(model)
  tokenizer.save_pretrained(path)
  return path


def _train(model_dir: pathlib.Path, data_file: str, out: pathlib.Path, **overrides) -> None:
  runs_lib.train(**{**dict(model_name_or_path=model_dir, dataset_name=data_file, output_dir=out, bf16=False,
                           gradient_checkpointing=False, disable_tqdm=True, learning_rate=1e-3, max_length=64,
                           per_device_train_batch_size=4, max_steps=NUM_STEPS, save_steps=1, logging_steps=1),
                    **overrides})


def _digests(directory) -> dict[str, str]:
  """File name → sha256 of every file in `directory` (a bitwise comparison that prints readably)."""
  directory = pathlib.Path(directory)
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def _tensors(directory) -> dict:
  """Every tensor of a HF directory (torch, original dtype), read with safetensors' own reader."""
  return runs_lib.weights(directory, as_torch=True)


def _header_dtypes(directory) -> set[str]:
  """The dtypes named in the safetensors headers of `directory` (what a loader sees before any data)."""
  dtypes = set()
  for file in pathlib.Path(directory).glob('*.safetensors'):
    raw = file.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], 'little')])
    dtypes |= {v['dtype'] for k, v in header.items() if k != '__metadata__'}
  return dtypes


def _checkpoint_model(output_dir):
  """jaxsft's float32 model with the parameters of OUTPUT_DIR's newest checkpoint (Manager.restore_params)."""
  root, step = checkpoint.locate(str(output_dir))
  return export.load_checkpoint_model(root, step, run_dir.RunMeta.from_json(checkpoint.read_meta(root, step)))


def _chat_batch(tokenizer, data_file: str, *, length: int = 48, pad: int = 11):
  """(tokens, mask, positions) [2, length]: two training conversations as the tokenizer renders them, the
  second right-padded by `pad` tokens."""
  with open(data_file, encoding='utf-8') as f:
    rows = [json.loads(next(f)) for _ in range(2)]
  tokens = np.zeros((2, length), np.int64)
  mask = np.zeros((2, length), np.int64)
  for i, (row, n) in enumerate(zip(rows, (length, length - pad))):
    ids = list(tokenizer.apply_chat_template(row['messages'], tokenize=True, return_dict=False))
    assert len(ids) >= n, 'the conversation is shorter than the batch'
    tokens[i, :n], mask[i, :n] = ids[:n], 1
  positions = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None)
  return tokens, mask, positions


def _jaxsft_logits(model, tokens, mask, positions) -> np.ndarray:
  as_i32 = lambda x: np.asarray(x, np.int32)
  return np.asarray(model(as_i32(tokens), as_i32(positions), as_i32(mask)))


def _load_hf(directory):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                           attn_implementation='eager').eval()


def _cli(*args) -> subprocess.CompletedProcess:
  """`python -m jaxsft.export ARGS` in a subprocess (the real command line)."""
  return runs_lib.cli('jaxsft.export', *args)


# ----------------------------------------------------------------------------------------------------------
# Fixtures: each run trains once per module, on first use.


@pytest.fixture(scope='module')
def workdir(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp('export')


@pytest.fixture(scope='module')
def data_file(workdir) -> str:
  return processes.write_synthetic_jsonl(workdir / 'train.jsonl', 16, seed=0)


@pytest.fixture(scope='module')
def runs(tiny_hf, workdir, data_file):
  cache = {}

  def get(key: str) -> Run:
    if key not in cache:
      name, overrides = RUNS[key]
      model_dir = _save_model(tiny_hf, name)
      out = workdir / f'run-{key}'
      _train(model_dir, data_file, out, **overrides)
      assert checkpoint.locate(str(out)) == (checkpoint.root_of(str(out)), NUM_STEPS)
      cache[key] = Run(model_dir, out)
    return cache[key]

  return get


@pytest.fixture(scope='module')
def planted(runs, workdir) -> pathlib.Path:
  """A copy of the qwen3 run without hf/ and tokenizer/ (the export rebuilds the tokenizer from the checkpoint's
  meta) whose checkpoints/ also holds checkpoint 1's content under the two names of an incomplete checkpoint:
  3.orbax-checkpoint-tmp-TIMESTAMP (Orbax's name while writing) and 4 without meta/. Exporting either would
  give checkpoint 1's weights, not the newest complete one's."""
  run = runs('qwen3')
  copy = workdir / 'planted'
  shutil.copytree(run.out, copy, ignore=shutil.ignore_patterns('hf', run_dir.TOKENIZER_DIR))
  ckpts = copy / checkpoint.CHECKPOINTS
  shutil.copytree(ckpts / '1', ckpts / '3.orbax-checkpoint-tmp-1700000000')
  shutil.copytree(ckpts / '1', ckpts / '4', ignore=shutil.ignore_patterns('meta'))
  return copy


# ----------------------------------------------------------------------------------------------------------
# 1. Trained runs: the export of the newest checkpoint has jaxsft's logits in transformers.


@pytest.mark.parametrize('key', ['qwen2', 'qwen3', 'llama3', 'llama_tied'])
def test_trained_checkpoint_exports_with_jaxsft_logits_in_transformers(runs, data_file, tiny_hf, tmp_path, key):
  """Proves, per architecture (tied embeddings included), that export_checkpoint(OUTPUT_DIR):
  - writes bit for bit what the trainer wrote to OUTPUT_DIR/hf from its final in-memory parameters, so the
    checkpoint holds exactly the trained weights and the newest one (2, not 1) is exported;
  - holds weights that training moved (every tensor differs from the starting model's);
  - loads in transformers (float32, eager) with jaxsft's logits within 1e-4 on a real, padded batch, jaxsft's
    model built from the checkpoint's parameters through Manager.restore_params;
  - writes a generation_config.json whose eos is the exported tokenizer's.
  """
  import transformers  # pylint: disable=import-outside-toplevel
  run = runs(key)
  out = export.export_checkpoint(str(run.out), str(tmp_path / 'hf'))
  assert out == str(tmp_path / 'hf')
  assert _digests(out) == _digests(run.out / 'hf')
  assert not os.path.exists(out + '.tmp')

  ours = _checkpoint_model(run.out)
  trained = hf.to_hf_tensors(ours)
  initial = {k: v.numpy() for k, v in _tensors(run.model_dir).items()}
  exported = {k: v.numpy() for k, v in _tensors(out).items()}
  assert set(exported) == set(initial) == set(trained)
  assert ('lm_head.weight' in exported) == (key != 'llama_tied')
  unmoved = [name for name in initial if np.array_equal(initial[name], trained[name])]
  assert not unmoved, f'training left these tensors unchanged: {unmoved}'
  for name, value in trained.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)

  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  tokens, mask, positions = _chat_batch(tokenizer, data_file)
  real = mask > 0
  theirs = tiny_hf.logits(_load_hf(out), tokens, mask, positions)
  np.testing.assert_allclose(_jaxsft_logits(ours, tokens, mask, positions)[real], theirs[real], rtol=0, atol=ATOL)
  generation = json.loads((pathlib.Path(out) / 'generation_config.json').read_text())
  assert generation['eos_token_id'] == tokenizer.eos_token_id is not None


def test_checkpoint_argument_forms_select_the_newest_complete_checkpoint(runs, tmp_path):
  """Proves OUTPUT_DIR, OUTPUT_DIR/checkpoints and OUTPUT_DIR/checkpoints/2 all export checkpoint 2, and that
  naming checkpoints/1 exports checkpoint 1 (different weights: the test of the newest would fail on it)."""
  run = runs('qwen3')
  ckpts = run.out / checkpoint.CHECKPOINTS
  want = _digests(run.out / 'hf')
  for i, path in enumerate([ckpts, ckpts / str(NUM_STEPS)]):
    assert _digests(export.export_checkpoint(str(path), str(tmp_path / f'hf{i}'))) == want, path
  first = _tensors(export.export_checkpoint(str(ckpts / '1'), str(tmp_path / 'hf-step1')))
  last = _tensors(run.out / 'hf')
  assert not all(first[name].equal(last[name]) for name in last)


def test_cli_export_equals_the_trainers_and_skips_incomplete_checkpoints(planted, runs, tmp_path):
  """Proves `python -m jaxsft.export --checkpoint OUTPUT_DIR --out DIR` writes bit for bit the trainer's
  OUTPUT_DIR/hf, tokenizer files included although OUTPUT_DIR/tokenizer is gone (rebuilt from the checkpoint's
  meta, which imports jaxsft.trainer inside the CLI), although checkpoints/ also holds a newer Orbax temporary
  directory and a newer step without meta/ (both with checkpoint 1's weights), and that the export deletes
  neither (a reader never cleans up)."""
  proc = _cli('--checkpoint', planted, '--out', tmp_path / 'hf')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _digests(tmp_path / 'hf') == _digests(runs('qwen3').out / 'hf')
  ckpts = planted / checkpoint.CHECKPOINTS
  assert sorted(os.listdir(ckpts)) == ['1', '2', '3.orbax-checkpoint-tmp-1700000000', '4']


# ----------------------------------------------------------------------------------------------------------
# 2. An untouched model through a checkpoint: import, checkpoint, export reproduces every tensor.


def _checkpoint_untouched(model_dir: pathlib.Path, output_dir: pathlib.Path, *, bf16: bool) -> None:
  """Saves model_dir's weights, as the trainer loads them, with a fresh optimizer state and the trainer's meta
  (no OUTPUT_DIR/tokenizer: the export rebuilds the tokenizer from the meta's config)."""
  config = runs_lib.config(model_name_or_path=model_dir, output_dir=output_dir, bf16=bf16)
  hf_cfg = hf_config.read_hf_config(model_dir)
  model = hf.load_pretrained(model_dir, runs_lib.model_config(config, hf_cfg))
  _, params, _ = nnx.split(model, nnx.Param, ...)
  tx, _ = runs_lib.make_optimizer(config, total_steps=10)
  tokenizer = runs_lib.load_tokenizer(config, str(model_dir))
  meta = {'config': json.loads(config.to_json_best_effort()), 'hf_config': hf_cfg, 'model_dir': str(model_dir),
          'generation_config': tokenizer_lib.generation_config(str(model_dir), tokenizer),
          'chat_template': tokenizer.chat_template, 'eos_token': tokenizer.eos_token,
          'export_dtype': config_lib.export_dtype(config), 'rng': {'seed': config.seed}}
  manager = checkpoint.Manager(checkpoint.root_of(str(output_dir)))
  try:
    manager.save(7, {'params': params, 'opt_state': tx.init(params)}, meta)
    manager.wait()
  finally:
    manager.close()


@pytest.mark.parametrize('name, dtype', [('qwen2', 'float32'), ('qwen3', 'float32'), ('llama3', 'float32'),
                                         ('llama_tied', 'float32'), ('qwen3', 'bfloat16')])
def test_untouched_model_round_trips_through_a_checkpoint_exactly(tiny_hf, tmp_path, name, dtype):
  """Proves that importing a Hugging Face model (float32 master weights, as the trainer does), checkpointing
  it and exporting it with --dtype equal to the original's reproduces every original tensor bit for bit, with
  the same tensor names (a tied model stays without lm_head.weight), and config.json keeps every original field
  (only the dtype fields are the export's)."""
  import torch  # pylint: disable=import-outside-toplevel
  model_dir = _save_model(tiny_hf, name, torch_dtype=getattr(torch, dtype))
  _checkpoint_untouched(model_dir, tmp_path / 'run', bf16=dtype == 'bfloat16')
  out = export.export_checkpoint(str(tmp_path / 'run'), str(tmp_path / 'hf'), dtype=dtype)

  original, exported = _tensors(model_dir), _tensors(out)
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    assert exported[key].dtype == value.dtype == getattr(torch, dtype), key
    assert torch.equal(exported[key], value), key
  original_cfg = json.loads((model_dir / 'config.json').read_text())
  exported_cfg = json.loads((pathlib.Path(out) / 'config.json').read_text())
  assert exported_cfg['dtype'] == dtype
  differing = {k for k in original_cfg if exported_cfg.get(k) != original_cfg[k]}
  assert differing <= {'dtype', 'torch_dtype', 'transformers_version'}, differing


# ----------------------------------------------------------------------------------------------------------
# 3. The tokenizer: the training chat template and eos token.


@pytest.mark.parametrize('source', ['saved_tokenizer', 'rebuilt_from_meta'])
def test_exported_tokenizer_applies_the_training_chat_template_and_eos(runs, tmp_path, source):
  """Proves the export of a run trained with chat_template=TEMPLATE (a string) and eos_token='<|endoftext|>'
  gives a tokenizer whose apply_chat_template renders TEMPLATE (not the model's own template), whose eos is the
  override, and a generation_config.json with that eos (the model's own said '<|im_end|>'), both from
  OUTPUT_DIR/tokenizer and, when that is gone, from the checkpoint's meta alone: the two exports are
  bit for bit the trainer's OUTPUT_DIR/hf."""
  import transformers  # pylint: disable=import-outside-toplevel
  run = runs('qwen2')
  output_dir = run.out
  if source == 'rebuilt_from_meta':
    output_dir = tmp_path / 'run'
    shutil.copytree(run.out, output_dir, ignore=shutil.ignore_patterns('hf', run_dir.TOKENIZER_DIR))
  out = export.export_checkpoint(str(output_dir), str(tmp_path / 'hf'))

  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  assert tokenizer.apply_chat_template(CHAT, tokenize=False) == CHAT_RENDERED
  assert tokenizer.eos_token == EOS_OVERRIDE
  eos_id = tokenizer.convert_tokens_to_ids(EOS_OVERRIDE)
  model_generation = json.loads((run.model_dir / 'generation_config.json').read_text())
  assert model_generation['eos_token_id'] == tokenizer.convert_tokens_to_ids('<|im_end|>') != eos_id
  assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == tokenizer.eos_token_id == eos_id
  assert _digests(out) == _digests(run.out / 'hf')


# ----------------------------------------------------------------------------------------------------------
# 4. Dtype defaults and sharding.


def test_bf16_run_exports_bfloat16_by_default_float32_and_sharded_on_request(runs, tmp_path):
  """Proves a bf16=True run exports bfloat16 weights and config.json dtype by default (the trainer's
  OUTPUT_DIR/hf and export_checkpoint alike), and that `--dtype float32 --max_shard_size` writes float32
  shards model-0000i-of-0000n.safetensors with an index covering every tensor, which transformers loads to
  exactly those values; the bfloat16 weights are the float32 ones rounded."""
  import torch  # pylint: disable=import-outside-toplevel
  run = runs('qwen2_bf16')
  default = pathlib.Path(export.export_checkpoint(str(run.out), str(tmp_path / 'hf')))
  assert _digests(default) == _digests(run.out / 'hf')
  assert json.loads((default / 'config.json').read_text())['dtype'] == 'bfloat16'
  assert _header_dtypes(default) == {'BF16'}

  sharded = tmp_path / 'hf-sharded'
  max_shard_size = 200_000
  proc = _cli('--checkpoint', run.out, '--out', sharded, '--dtype', 'float32', '--max_shard_size', max_shard_size)
  assert proc.returncode == 0, proc.stderr[-3000:]
  shards = sorted(p.name for p in sharded.glob('*.safetensors'))
  assert len(shards) > 1
  assert shards == [f'model-{i:05d}-of-{len(shards):05d}.safetensors' for i in range(1, len(shards) + 1)]
  index = json.loads((sharded / hf.INDEX_FILE).read_text())
  float32 = _tensors(sharded)
  assert set(index['weight_map']) == set(float32) and set(index['weight_map'].values()) == set(shards)
  assert index['metadata']['total_size'] == sum(v.numel() * 4 for v in float32.values())
  assert json.loads((sharded / 'config.json').read_text())['dtype'] == 'float32'
  assert _header_dtypes(sharded) == {'F32'}

  loaded = _load_hf(sharded).state_dict()
  bf16 = _tensors(default)
  for name, value in float32.items():
    assert torch.equal(loaded[name], value), name
    assert torch.equal(bf16[name], value.to(torch.bfloat16)), name


# ----------------------------------------------------------------------------------------------------------
# 5. Errors and failures.


def _error_case(case: str, planted: pathlib.Path, tmp_path: pathlib.Path) -> tuple[list, str]:
  """(command-line arguments, text the one-line error must contain) for `case`."""
  out = tmp_path / 'hf'
  ckpts = planted / checkpoint.CHECKPOINTS
  if case == 'no_such_dir':
    return ['--checkpoint', tmp_path / 'nope', '--out', out], f"no such directory '{tmp_path / 'nope'}'"
  if case == 'no_checkpoints':
    (tmp_path / 'empty_run').mkdir()
    return ['--checkpoint', tmp_path / 'empty_run', '--out', out], 'no complete checkpoint'
  if case == 'orbax_tmp':
    path = ckpts / '3.orbax-checkpoint-tmp-1700000000'
    return ['--checkpoint', path, '--out', out], str(path)
  if case == 'no_meta':
    return ['--checkpoint', ckpts / '4', '--out', out], f"'{ckpts / '4'}' is not a complete jaxsft checkpoint"
  assert case == 'no_out'
  return ['--checkpoint', planted], '--checkpoint and --out are required'


@pytest.mark.parametrize('case', ['no_such_dir', 'no_checkpoints', 'orbax_tmp', 'no_meta', 'no_out'])
def test_cli_errors_are_one_line_with_exit_status_2(planted, tmp_path, case):
  """Proves each bad --checkpoint (missing, holding no checkpoint, naming an incomplete one) and a missing --out
  ends with exit status 2 and one 'error: ...' line on stderr naming the problem, and writes nothing."""
  args, expected = _error_case(case, planted, tmp_path)
  proc = _cli(*args)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr[-3000:]
  assert expected in lines[0]
  assert not (tmp_path / 'hf').exists() and not (tmp_path / 'hf.tmp').exists()


class _FailingTokenizer:
  """Stands in for the run's tokenizer; saving it records what is on disk at that moment, then fails."""

  def __init__(self, target: pathlib.Path):
    self.target = target
    self.seen = None  # (files in the directory being written, digests of target, that directory) at the failure.

  def save_pretrained(self, directory):
    self.seen = (sorted(os.listdir(directory)), _digests(self.target) if self.target.exists() else None, directory)
    pathlib.Path(directory, 'tokenizer_config.json').write_text('{"half": ')
    raise OSError('No space left on device')


def test_failed_export_never_leaves_a_half_written_hf_dir(runs, tmp_path, monkeypatch):
  """Proves an export failing midway (the tokenizer's save, after the weights are written) writes into
  HF_DIR.tmp only: an existing HF_DIR (an export of checkpoint 1) keeps every byte, a new HF_DIR does not
  appear, and the next successful export replaces HF_DIR whole, leaving no .tmp or .old behind."""
  run = runs('qwen3')
  target = tmp_path / 'hf'
  export.export_checkpoint(str(run.out / checkpoint.CHECKPOINTS / '1'), str(target))
  before = _digests(target)
  assert before != _digests(run.out / 'hf')

  failing = _FailingTokenizer(target)
  with monkeypatch.context() as m:
    m.setattr(export, 'load_checkpoint_tokenizer', lambda root, meta: failing)
    with pytest.raises(OSError, match='No space left'):
      export.export_checkpoint(str(run.out), str(target))
    written, target_then, directory = failing.seen
    assert str(directory) == f'{target}.tmp'
    assert {hf.SINGLE_FILE, 'config.json'} <= set(written)  # The failure came after the weights.
    assert target_then == before and _digests(target) == before
    with pytest.raises(OSError, match='No space left'):
      export.export_checkpoint(str(run.out), str(tmp_path / 'new'))
    assert not (tmp_path / 'new').exists()

  export.export_checkpoint(str(run.out), str(target))
  assert _digests(target) == _digests(run.out / 'hf')
  assert not {'hf.tmp', 'hf.old', 'new'} & set(os.listdir(tmp_path))
