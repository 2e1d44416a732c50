"""Hugging Face export: python -m jaxsft.export --checkpoint DIR --out HF_DIR [--dtype bfloat16|float32].

DIR is a run's OUTPUT_DIR (its newest complete checkpoint), OUTPUT_DIR/checkpoints or
OUTPUT_DIR/checkpoints/STEP; DIR and HF_DIR may be local or gs:// (jaxsft/storage.py). HF_DIR receives what `transformers.AutoModelForCausalLM.from_pretrained` and vLLM
load: safetensors weights (one file, or shards of at most `--max_shard_size` with an index), `config.json`,
the tokenizer files with the training chat template and eos token, and `generation_config.json` whose
`eos_token_id` is the tokenizer's (open-r1 PR #663: a mismatch makes generation never stop). The dtype
defaults to the run's (`export_dtype`, else bfloat16 for a bf16 run, float32 otherwise).

The export reads only the parameters of the checkpoint, as host numpy arrays (no accelerator needed, and a
third of the checkpoint's bytes), and writes to `HF_DIR.tmp` renamed to HF_DIR when complete, so a failed
export never leaves a half-written directory and never damages an earlier one until the new one is whole.
Training runs this same code at the end, into OUTPUT_DIR/hf.

A LoRA run's checkpoint (use_peft) holds its adapters only: the export reads the base from the run's model directory,
writes the adapters in PEFT's format to `--adapter_out` (default OUT-adapter) and the merged model to OUT.
"""

import json
import os
import shutil
import sys

from absl import app
from absl import flags
from absl import logging
from flax import nnx
from ml_collections import config_dict

from jaxsft import checkpoint
from jaxsft import cli
from jaxsft import peft_config
from jaxsft import run_dir
from jaxsft import storage
from jaxsft import tokenizer as tokenizer_lib
from jaxsft import urls
from jaxsft.errors import InputError
from jaxsft.models import hf
from jaxsft.models import hf_config
from jaxsft.models import lora as lora_lib
from jaxsft.models import peft_io



def _write_files(model, hf_cfg: dict, tokenizer, generation: dict, directory: str, *, dtype: str,
                 max_shard_bytes: int) -> None:
  hf.save_pretrained(model, hf_cfg, directory, dtype=dtype, max_shard_bytes=max_shard_bytes)
  tokenizer.save_pretrained(directory)
  with open(os.path.join(directory, 'generation_config.json'), 'w', encoding='utf-8') as f:
    json.dump(generation, f, indent=2, sort_keys=True)


def write_hf_dir(model, hf_cfg: dict, tokenizer, generation: dict, out_dir: str, *, dtype: str,
                 max_shard_bytes: int = 5 * 2**30) -> str:
  """Writes weights, config, tokenizer and generation config to `out_dir` via `out_dir.tmp` and a rename (on a
  bucket: written locally, then uploaded with config.json last, see `storage.put_dir`)."""
  return _write_dir(out_dir, 'config.json', lambda directory: _write_files(
      model, hf_cfg, tokenizer, generation, directory, dtype=dtype, max_shard_bytes=max_shard_bytes))


def write_adapter_dir(model, lora: peft_config.Settings, out_dir: str, *, base_model: str | None,
                      dtype: str = 'float32') -> str:
  """Writes a LoRA model's adapters as a PEFT directory (adapter_config.json + adapter_model.safetensors) to
  `out_dir`, as `write_hf_dir` writes (adapter_config.json last on a bucket)."""
  return _write_dir(out_dir, peft_config.ADAPTER_CONFIG, lambda directory: peft_io.save_adapter(
      model, lora, directory, base_model=base_model, dtype=dtype))


def _write_dir(out_dir: str, commit: str, write) -> str:
  """`write(directory)` into `out_dir.tmp`, renamed onto `out_dir` (a bucket: staged, `commit` uploaded last)."""
  out_dir = storage.absolute(out_dir)
  if storage.isfile(out_dir):
    raise InputError(f'export: {out_dir!r} exists and is not a directory')
  if storage.is_remote(out_dir):
    with storage.staged_dir(out_dir, commit=commit) as local:
      write(local)
    return out_dir
  tmp, old = out_dir + '.tmp', out_dir + '.old'
  if not os.path.exists(out_dir) and os.path.isdir(old):  # A crash between the two renames below: undo it.
    os.replace(old, out_dir)
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    write(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(out_dir):
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old)
  else:
    os.replace(tmp, out_dir)
  return out_dir


def load_checkpoint_tokenizer(root: str, meta: run_dir.RunMeta):
  """The tokenizer the run trained with: OUTPUT_DIR/tokenizer, else rebuilt from the run's config."""
  saved = storage.join(storage.dirname(storage.absolute(root)), run_dir.TOKENIZER_DIR)
  if storage.isfile(storage.join(saved, 'tokenizer_config.json')):
    with storage.local_copy(saved) as local:
      return tokenizer_lib.from_pretrained(local, '--checkpoint')
  config = config_dict.ConfigDict({k: v for k, v in meta.config.items() if k != 'resolved'})
  config.chat_template = meta.chat_template or config.get('chat_template')
  return tokenizer_lib.load_tokenizer(config, meta.model_dir)


def checkpoint_lora(meta: run_dir.RunMeta) -> peft_config.Settings | None:
  """The LoRA settings a checkpoint's run trained with (None: full fine-tuning)."""
  fields = config_dict.ConfigDict({k: v for k, v in meta.config.items() if k != 'resolved'})
  return peft_config.settings(fields) if fields.get('use_peft') else None


def load_checkpoint_model(root: str, step: int, meta: run_dir.RunMeta):
  """The model with checkpoint `step`'s parameters, on the host (no optimizer state is read): float32; a LoRA run's
  model is its base, read from the run's model directory in the dtype it was frozen in, with the checkpoint's
  adapters (`lora.merge` folds them in).

  The parameters are laid out as the run trained them (stacked on a 'layers' axis with `scan_layers`).
  """
  scan_layers = bool(meta.config.get('model', {}).get('scan_layers', False))  # Absent: before scan existed.
  lora = checkpoint_lora(meta)
  base_dtype = 'bfloat16' if lora is not None and meta.config.get('bf16') else 'float32'
  cfg = hf_config.model_config_from_hf(meta.hf_config, dtype='float32', param_dtype=base_dtype, scan_layers=scan_layers)
  model = hf.abstract_model(cfg)
  if lora is not None:
    lora_lib.attach(model, lora, lora_lib.abstract_values)
  graphdef, abstract_params, _ = nnx.split(model, nnx.Param if lora is None else lora_lib.LoRAParam, nnx.Param)
  manager = checkpoint.Manager(root, read_only=True)
  try:  # ShapeDtypeStructs without a sharding restore as host numpy arrays.
    params = manager.restore_params(step, checkpoint.abstract_host(abstract_params))
  finally:
    manager.close()
  if lora is None:
    return nnx.merge(graphdef, params)
  if not os.path.isdir(meta.model_dir):
    raise InputError(f"--checkpoint: the run's base model {meta.model_dir!r} is not there any more (a LoRA "
                     'checkpoint holds the adapters only; the export reads the base from it)')
  frozen = nnx.state(hf.load_pretrained(meta.model_dir, cfg), nnx.Param)
  return nnx.merge(graphdef, params, frozen)


def export_checkpoint(checkpoint_path: str, out_dir: str, *, dtype: str | None = None,
                      max_shard_bytes: int = 5 * 2**30, adapter_out: str | None = None) -> str:
  """Exports checkpoint `checkpoint_path` (see the module docstring) to `out_dir`; returns `out_dir`. A LoRA run's
  checkpoint also gives its adapter in PEFT's format, in `adapter_out` (default: OUT-adapter)."""
  urls.refuse(checkpoint_path, '--checkpoint', gs=True)
  urls.refuse(out_dir, '--out', gs=True)
  urls.refuse(adapter_out, '--adapter_out', gs=True)
  root, step = checkpoint.locate(checkpoint_path, field='--checkpoint')
  meta = run_dir.RunMeta.from_json(checkpoint.read_meta(root, step))
  model = load_checkpoint_model(root, step, meta)
  tokenizer = load_checkpoint_tokenizer(root, meta)
  lora = checkpoint_lora(meta)
  if lora is not None:
    adapter_out = adapter_out or storage.absolute(out_dir).rstrip('/') + '-adapter'
    write_adapter_dir(model, lora, adapter_out, base_model=meta.config.get('model_name_or_path'))
    print(f'exported the LoRA adapter (PEFT format) to {adapter_out}', file=sys.stderr)
    model = lora_lib.merge(model)
  return write_hf_dir(model, meta.hf_config, tokenizer, meta.generation_config, out_dir,
                      dtype=dtype or meta.export_dtype, max_shard_bytes=max_shard_bytes)


def main(argv):
  cli.no_arguments(argv)
  if not _CHECKPOINT.value or not _OUT.value:
    cli.fail('--checkpoint and --out are required, e.g. --checkpoint runs/tiny --out runs/tiny-hf')
  logging.set_verbosity(logging.ERROR)  # Orbax logs every restore step (INFO) and read-only opens (WARNING).
  try:
    out = export_checkpoint(_CHECKPOINT.value, _OUT.value, dtype=_DTYPE.value, max_shard_bytes=_MAX_SHARD_SIZE.value,
                            adapter_out=_ADAPTER_OUT.value)
  except InputError as e:
    cli.fail(str(e))
  print(f'exported {_CHECKPOINT.value} to {out}', file=sys.stderr)


if __name__ == '__main__':
  # The flags exist only when this file is the program: jaxsft.trainer imports jaxsft.export, and must neither
  # define them a second time (DuplicateFlagError) nor add them to `python -m jaxsft.train`'s command line.
  _CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                    'OUTPUT_DIR, OUTPUT_DIR/checkpoints or OUTPUT_DIR/checkpoints/STEP.')
  _OUT = flags.DEFINE_string('out', None, 'The Hugging Face directory to write.')
  _DTYPE = flags.DEFINE_enum('dtype', None, ['bfloat16', 'float32'],
                             "Weights' dtype (default: the run's export dtype).")
  _MAX_SHARD_SIZE = flags.DEFINE_integer('max_shard_size', 5 * 2**30, 'Bytes per safetensors shard.')
  _ADAPTER_OUT = flags.DEFINE_string('adapter_out', None, "A LoRA run's adapter (PEFT format); default: OUT-adapter.")
  app.run(main, flags_parser=cli.parse_flags)
