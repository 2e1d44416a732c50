"""The base config built from the field registry (jaxsft/fields.py), and its validation.

Field names and meanings follow TRL's `SFTConfig` and open-r1 wherever they name the concept, flat at
the top level, so an open-r1 recipe ports field by field. JAX-only settings are grouped under
`config.mesh` and `config.model`. Defaults are TRL's (learning rate 2e-5, linear schedule, 3 epochs,
per-device batch 8, max_length 1024, bf16, gradient checkpointing). Each field's default, doc, resume rule and
origin are in `fields.FIELDS`.

`validate(config)` is the one place that checks a config: everything that can be checked without touching data
or devices, raising `InputError` naming the field; the trainer calls it before any I/O or compilation.
Nothing here imports jax: the command line loads and checks configs without it.
"""

import math
import os

from ml_collections import config_dict

from jaxsft import fields
from jaxsft import peft_config
from jaxsft import storage
from jaxsft import urls
from jaxsft.errors import InputError
# The names a choice field takes (fields.py is their home; config.SCHEDULES and the rest stay importable from here).
from jaxsft.fields import (ATTENTION_IMPLS, EVAL_STRATEGIES, EXPORT_DTYPES, LENGTH_BUCKETS, MODEL_INITS,
                           NONFINITE_POLICIES, REMAT_POLICIES, REPORT_TO, SCHEDULES)


def base_config() -> config_dict.ConfigDict:
  """Returns the full, unlocked default config (TRL SFTConfig defaults): every field of `fields.FIELDS`."""
  c = config_dict.ConfigDict()
  for field in fields.FIELDS:
    *groups, leaf = field.name.split('.')
    node = c
    for name in groups:
      if name not in node:
        node[name] = config_dict.ConfigDict()
      node = node[name]
    default = field.default
    node[leaf] = config_dict.placeholder(default.type) if isinstance(default, fields.Placeholder) else default
  return c


def _need(config, field: str):
  value = config[field]
  if value is None or value == '':
    raise InputError(f'config field {field!r} is required (set --config.{field}=...)')
  return value


def _positive(config, field: str, *, allow_zero: bool = False):
  value = config[field]
  if value < 0 or (value == 0 and not allow_zero):
    raise InputError(f'config field {field!r} must be {"non-negative" if allow_zero else "positive"}, got {value!r}')


def _choice(value, field: str, choices):
  if value not in choices:
    raise InputError(f'config field {field!r} is {value!r}; expected one of {", ".join(choices)}')


def validate(config: config_dict.ConfigDict) -> None:
  """Checks the config without touching data or devices; raises InputError naming the field."""
  model_path = _need(config, 'model_name_or_path')
  urls.refuse_config(config)  # Before any os.path use: 'hdfs://b/run' would be the local folder './hdfs:/b/run'.
  if config.dataset_mixture is None:
    _need(config, 'dataset_name')
  elif config.dataset_name:
    raise InputError("config fields 'dataset_name' and 'dataset_mixture' are both set; set one of them")
  _need(config, 'output_dir')
  _choice(config.eval_strategy, 'eval_strategy', EVAL_STRATEGIES)
  if config.eval_steps is not None and config.eval_steps <= 0:
    raise InputError(f"config field 'eval_steps' must be positive, got {config.eval_steps!r}")
  if config.dataset_num_proc is not None and config.dataset_num_proc < 1:
    raise InputError(f"config field 'dataset_num_proc' must be positive, got {config.dataset_num_proc!r}")
  _choice(config.model_init, 'model_init', MODEL_INITS)
  if config.export_dtype is not None:
    _choice(config.export_dtype, 'export_dtype', EXPORT_DTYPES)
  if config.save_steps < 0 or (config.save_steps > 1 and config.save_steps != int(config.save_steps)):
    raise InputError(f"config field 'save_steps' must be 0 (only at epoch ends), a fraction below 1 or a whole "
                     f'number of steps, got {config.save_steps}')
  report_to(config)
  if config.global_batch_size is not None and config.global_batch_size < 1:
    raise InputError(f"config field 'global_batch_size' must be positive or None, got {config.global_batch_size}")
  _positive(config, 'eval_generation_prompts', allow_zero=True)
  _positive(config, 'eval_generation_max_new_tokens')
  _positive(config, 'eval_generation_temperature', allow_zero=True)
  if not 0 < config.eval_generation_top_p <= 1:
    raise InputError(f"config field 'eval_generation_top_p' must be in (0, 1], got {config.eval_generation_top_p}")
  if config.save_total_limit is not None and config.save_total_limit < 1:
    raise InputError(f"config field 'save_total_limit' must be positive or None, got {config.save_total_limit}")
  resume = config.resume_from_checkpoint
  if resume and not storage.is_remote(resume) and not os.path.isdir(os.path.expanduser(resume)):  # (gs://: locate)
    raise InputError(f"config field 'resume_from_checkpoint': no such directory {config.resume_from_checkpoint!r}")
  _choice(config.lr_scheduler_type, 'lr_scheduler_type', SCHEDULES)
  _choice(config.nonfinite_policy, 'nonfinite_policy', NONFINITE_POLICIES)
  _choice(config.length_buckets, 'length_buckets', LENGTH_BUCKETS)
  _choice(config.model.attention_impl, 'model.attention_impl', ATTENTION_IMPLS)
  if config.model.remat is not None:
    _choice(config.model.remat, 'model.remat', REMAT_POLICIES)
  if config.model.loss_chunk_size < 1:
    raise InputError(f"config field 'model.loss_chunk_size' must be positive, got {config.model.loss_chunk_size}")
  if config.model.mlp_chunk_size < 0:
    raise InputError(f"config field 'model.mlp_chunk_size' must be 0 (untiled) or positive, got "
                     f"{config.model.mlp_chunk_size}")
  for field in ('learning_rate', 'per_device_train_batch_size', 'per_device_eval_batch_size',
                'gradient_accumulation_steps', 'max_length', 'logging_steps', 'adam_epsilon'):
    _positive(config, field)
  for field in ('weight_decay', 'warmup_ratio', 'warmup_steps', 'num_train_epochs', 'accuracy_eval_problems',
                'dataloader_num_workers'):
    _positive(config, field, allow_zero=True)
  if config.warmup_ratio > 1:
    raise InputError(f"config field 'warmup_ratio' must be in [0, 1], got {config.warmup_ratio!r}")
  for field in ('adam_beta1', 'adam_beta2'):
    if not 0 <= config[field] < 1:
      raise InputError(f'config field {field!r} must be in [0, 1), got {config[field]!r}')
  if config.max_steps <= 0 and config.max_steps != -1:
    raise InputError(f"config field 'max_steps' must be positive or -1 (use num_train_epochs), got {config.max_steps}")
  if config.max_steps == -1 and config.num_train_epochs <= 0:
    raise InputError("config fields 'max_steps' and 'num_train_epochs': one of them must be positive")
  if config.lr_scheduler_type == 'cosine_with_min_lr':
    if config.min_lr_rate is None or not 0 <= config.min_lr_rate <= 1:
      raise InputError("config field 'min_lr_rate' must be set in [0, 1] for lr_scheduler_type 'cosine_with_min_lr'")
  if config.model_init == 'pretrained' and _is_local_path(model_path) and not os.path.isdir(model_path):
    raise InputError(f"config field 'model_name_or_path': no such directory {model_path!r}")
  if config.chat_template and _looks_like_path(config.chat_template) and not os.path.isfile(config.chat_template):
    raise InputError(f"config field 'chat_template': no such file {config.chat_template!r}")
  for axis in fields.MESH_AXES:
    if config.mesh[axis] == 0 or config.mesh[axis] < -1:
      raise InputError(f"config field 'mesh.{axis}' must be positive or -1, got {config.mesh[axis]}")
  lora = peft_config.settings(config)
  if lora is not None:
    if config.adapter_name_or_path:
      peft_config.check_adapter_dir(os.path.expanduser(config.adapter_name_or_path), lora)
    tiled = [t for t in lora.targets if t in ('gate_proj', 'up_proj', 'down_proj')]
    if config.model.mlp_chunk_size and tiled:
      raise InputError(f"config field 'model.mlp_chunk_size': the tiled MLP does not apply LoRA adapters "
                       f"({', '.join(tiled)} in lora_target_modules); set model.mlp_chunk_size=0")


def _is_local_path(name: str) -> bool:
  """A hub id is 'name' or 'org/name'; anything else (./x, /x, a/b/c, ~) is a local path."""
  return (name.startswith(('.', '/', '~')) or name.count('/') > 1 or os.path.exists(name))


def _looks_like_path(template: str) -> bool:
  return '{' not in template and '\n' not in template


def eval_interval(config: config_dict.ConfigDict, total_steps: int) -> int:
  """Steps between evaluations for eval_strategy 'steps' (transformers: a float < 1 is a fraction)."""
  steps = config.eval_steps if config.eval_steps is not None else config.logging_steps
  if steps < 1:
    return max(math.ceil(steps * total_steps), 1)
  if steps != int(steps):
    raise InputError(f"config field 'eval_steps' must be an integer or a fraction below 1, got {steps!r}")
  return int(steps)


def save_interval(config: config_dict.ConfigDict, total_steps: int) -> int:
  """Steps between periodic checkpoints (0: none); transformers: a save_steps below 1 is a fraction of the run."""
  if 0 < config.save_steps < 1:
    return max(math.ceil(config.save_steps * total_steps), 1)
  return int(config.save_steps)


def report_to(config: config_dict.ConfigDict) -> tuple[str, ...]:
  """The integrations named by `report_to` ('none', 'all', or a comma-separated subset of REPORT_TO)."""
  value = config.report_to
  names = [v.strip() for v in (','.join(value) if isinstance(value, (list, tuple)) else str(value or '')).split(',')]
  names = [n for n in names if n and n != 'none']
  if names == ['all']:
    return REPORT_TO
  for name in names:
    if name not in REPORT_TO:
      raise InputError(f"config field 'report_to' names {name!r}; expected 'none', 'all' or a comma-separated "
                       f'subset of {", ".join(REPORT_TO)}')
  return tuple(dict.fromkeys(names))


def batch_split(config: config_dict.ConfigDict, num_devices: int) -> tuple[int, int]:
  """(per-device rows per micro-batch, micro-batches per optimizer step) on `num_devices` devices.

  With `global_batch_size` set, the accumulation is derived so that every step has exactly that many rows
  (open-r1's 2 per device × 8 accumulation × 8 GPUs = 128 stays 128 on 16, 32 or 64 TPU chips).
  """
  per_device = config.per_device_train_batch_size
  if config.global_batch_size is None:
    return per_device, config.gradient_accumulation_steps
  rows = per_device * num_devices
  if config.global_batch_size % rows:
    hint = ''
    if config.global_batch_size % num_devices == 0:
      hint = f' (--config.per_device_train_batch_size={config.global_batch_size // num_devices} would)'
    raise InputError(f"config field 'global_batch_size' {config.global_batch_size} is not a multiple of "
                     f'per_device_train_batch_size {per_device} × {num_devices} devices = {rows}{hint}')
  return per_device, config.global_batch_size // rows


def cache_dir(config: config_dict.ConfigDict) -> str:
  return (config.dataset_cache_dir or os.environ.get('JAXSFT_CACHE_DIR')
          or os.path.join(os.path.expanduser('~'), '.cache', 'jaxsft'))


def export_dtype(config: config_dict.ConfigDict) -> str:
  return config.export_dtype or ('bfloat16' if config.bf16 else 'float32')


def remat_policy(config: config_dict.ConfigDict) -> str:
  if config.model.remat is not None:
    return config.model.remat
  return 'full' if config.gradient_checkpointing else 'none'


def load_chat_template(value: str | None) -> str | None:
  """`chat_template` is a Jinja string or the path of a file holding one."""
  if not value:
    return None
  if _looks_like_path(value):
    try:
      with open(value, encoding='utf-8') as f:
        return f.read()
    except OSError as e:
      raise InputError(f"config field 'chat_template': cannot read {value!r} ({e.strerror})") from None
  return value
