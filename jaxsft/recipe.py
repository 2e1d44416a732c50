"""open-r1 / TRL recipe YAML import: `from_recipe_yaml` turns a recipe (TRL SFTConfig and open-r1
ScriptArguments / ModelConfig / SFTConfig fields, flat) into a jaxsft config.

The tables below are the whole mapping (README lists them): RECIPE_FIELDS (the config fields to which
jaxsft/fields.py gives a TRL / open-r1 origin) are copied as they are, RECIPE_MAPPED have another name or shape
here, RECIPE_IGNORED are GPU/torch- or Hub-only (one warning line each), anything else is an error naming every
unknown field.
"""

from collections.abc import Callable
import difflib
import sys

from ml_collections import config_dict

from jaxsft import config as config_lib
from jaxsft import fields
from jaxsft.errors import InputError
from jaxsft.errors import one_line


# From the field registry (jaxsft/fields.py, each field's origin): RECIPE_FIELDS are the top-level fields with
# TRL's / open-r1's name and meaning, copied as they are; JAXSFT_ONLY_FIELDS (and the mesh / model groups) are
# jaxsft's own: set them with --config.FIELD=..., not in a recipe.
JAXSFT_ONLY_FIELDS = fields.JAXSFT_ONLY_FIELDS
RECIPE_FIELDS = fields.RECIPE_FIELDS

ADAMW_OPTIMIZERS = ('adamw_torch', 'adamw_torch_fused', 'adamw_hf', 'adamw_apex_fused')
RECIPE_DTYPES = ('bfloat16', 'float32', 'auto')

# Recipe fields with another name or shape in jaxsft: what the import makes of them.
RECIPE_MAPPED = {
    'lr_scheduler_kwargs': '{min_lr_rate: x} sets min_lr_rate; any other kwarg is an error',
    'max_seq_length': "TRL's old name of max_length: sets max_length, with a warning",
    'save_strategy': "'steps': every save_steps; 'epoch': save_steps 0 (jaxsft saves at every epoch end anyway); "
                     "'no': a warning (jaxsft still saves at epoch ends and at the end: checkpoints are how it "
                     'resumes); anything else is an error',
    'logging_strategy': "'steps' (every logging_steps); anything else is an error",
    'do_train': 'true is accepted; false is an error (jaxsft always trains)',
    'do_eval': 'accepted; eval_strategy decides (as in transformers), with a warning when the two disagree',
    'torch_dtype': f'{", ".join(RECIPE_DTYPES)} accepted: jaxsft keeps float32 master weights and computes in '
                   'bfloat16 when bf16 is true (a warning if bfloat16 weights meet bf16 false); others are an error',
    'dtype': "TRL's newer name of torch_dtype: the same",
    'fp16': 'false is accepted; true is an error (use bf16)',
    'optim': f'{", ".join(ADAMW_OPTIMIZERS)}: ignored with a warning (jaxsft uses optax AdamW with the adam_* '
             'fields); any other optimizer is an error',
    'overwrite_output_dir': 'a warning when true: jaxsft never overwrites; a run whose output_dir holds '
                            'checkpoints resumes from them',
    'warmup_steps': 'as in TRL 1.x, a float below 1 is a fraction of the run: it sets warmup_ratio',
}

_NO_HUB_PUSH = 'jaxsft does not push to the Hub: upload OUTPUT_DIR/hf yourself (`hf upload`)'
_SHARDING = 'jaxsft shards over config.mesh (mesh.fsdp=-1 partitions everything, as ZeRO-3)'
_LIGER = "Liger's Triton kernels are torch-only; jaxsft's loss is chunked and never holds full logits"
# Recipe fields for GPU/torch or the Hub that jaxsft has no use for: each is ignored with one warning line
# (none when it is false or null: it asks for nothing).
RECIPE_IGNORED = {
    'attn_implementation': 'jaxsft picks cuDNN/splash/xla attention itself (model.attention_impl)',
    'use_liger_kernel': _LIGER,
    'use_liger': _LIGER,
    'deepspeed': _SHARDING,
    'fsdp': _SHARDING,
    'fsdp_config': _SHARDING,
    'gradient_checkpointing_kwargs': 'rematerialisation is gradient_checkpointing / model.remat',
    'ddp_timeout': 'torch.distributed only',
    'ddp_find_unused_parameters': 'torch DDP only',
    'torch_compile': 'XLA compiles every jaxsft step',
    'tf32': 'a torch matmul setting',
    'dataloader_pin_memory': 'torch DataLoader only',
    'log_level': 'jaxsft logs to metrics.jsonl and the console',
    'hub_model_id': _NO_HUB_PUSH,
    'hub_strategy': _NO_HUB_PUSH,
    'hub_model_revision': _NO_HUB_PUSH,
    'hub_private_repo': _NO_HUB_PUSH,
    'push_to_hub': _NO_HUB_PUSH,
    'push_to_hub_revision': _NO_HUB_PUSH,
    'overwrite_hub_revision': _NO_HUB_PUSH,
    'callbacks': "open-r1's Hub-push callbacks",
    'benchmarks': "open-r1's benchmarks run after a Hub push",
    'trust_remote_code': 'jaxsft runs its own model code (Llama, Qwen2/2.5/3, Mistral)',
}
_STRATEGY_FIELDS = ('eval_strategy', 'save_strategy', 'logging_strategy')


def _warn_stderr(message: str) -> None:
  print(f'warning: {message}', file=sys.stderr)


def from_recipe_yaml(path: str, *, warn: Callable[[str], None] = _warn_stderr) -> config_dict.ConfigDict:
  """The config of an open-r1 / TRL SFT recipe YAML file (see `recipe_to_config`)."""
  import yaml  # pylint: disable=import-outside-toplevel
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(f'recipe YAML {path!r}: cannot read it ({getattr(e, "strerror", None) or e})') from None
  try:
    mapping = yaml.safe_load(text)
  except yaml.YAMLError as e:
    mark = getattr(e, 'problem_mark', None)
    where = f' line {mark.line + 1}' if mark is not None else ''
    problem = getattr(e, 'problem', None) or one_line(e)
    raise InputError(f'{path}{where}: YAML syntax error: {problem}') from None
  return recipe_to_config(mapping, source=path, warn=warn)


def recipe_to_config(mapping: dict, *, source: str,
                     warn: Callable[[str], None] = _warn_stderr) -> config_dict.ConfigDict:
  """base_config() with every field of an open-r1 / TRL SFT recipe set (RECIPE_FIELDS, RECIPE_MAPPED).

  RECIPE_IGNORED fields give one warning line each through `warn`; unknown fields are one InputError naming all
  of them; a value of the wrong type is an InputError naming the field, `source` and the value.
  """
  if not isinstance(mapping, dict):
    raise InputError(f'{source}: expected a mapping of recipe fields (field: value), got '
                     f'{"nothing" if mapping is None else type(mapping).__name__}')
  _check_known(mapping, source)
  config = config_lib.base_config()
  for field in RECIPE_FIELDS:
    if field in mapping:
      config[field] = _recipe_value(config, field, mapping[field], source)
  _apply_mapped(config, mapping, source, warn)
  for field, value in mapping.items():
    if field in RECIPE_IGNORED and value not in (None, False):
      warn(f'{source}: {field} ignored: {RECIPE_IGNORED[field]}')
  try:
    config_lib.report_to(config)
  except InputError as e:
    raise InputError(f'{source}: {e}') from None
  return config


def _check_known(mapping: dict, source: str) -> None:
  known = set(RECIPE_FIELDS) | set(RECIPE_MAPPED) | set(RECIPE_IGNORED)
  unknown = [str(f) for f in mapping if f not in known]
  if not unknown:
    return
  names = []
  for field in unknown:
    close = difflib.get_close_matches(field, sorted(known), n=1)
    names.append(f'{field} (did you mean {close[0]}?)' if close else field)
  jaxsft_only = [f for f in unknown if f in JAXSFT_ONLY_FIELDS]
  hint = f'; set {", ".join(jaxsft_only)} with --config.FIELD=VALUE' if jaxsft_only else ''
  raise InputError(f'{source}: unknown field{"s" if len(unknown) > 1 else ""} {", ".join(names)} '
                   f'(not TRL SFT / open-r1 settings jaxsft knows{hint})')


def _type_error(source: str, field: str, expected: str, value) -> InputError:
  return InputError(f'{source}: field {field!r} must be {expected}, got {value!r}')


def _recipe_value(config: config_dict.ConfigDict, field: str, value, source: str):
  """`value` as the type of `config[field]`; YAML's lists, bare `no` and `1e-5` (a string in YAML 1.1) allowed."""
  if field == 'report_to' and isinstance(value, list) and all(isinstance(v, str) for v in value):
    return ','.join(value) or 'none'
  if field in ('lora_target_modules', 'lora_modules_to_save') and isinstance(value, list) and all(
      isinstance(v, str) for v in value):
    return ','.join(value) or None
  if field in _STRATEGY_FIELDS:
    return _strategy(field, value, source)
  if field == 'warmup_steps' and _is_fraction(value):
    return 0  # TRL 1.x: a fraction of the run, which _apply_mapped sets as warmup_ratio.
  if field == 'dataset_mixture':
    if not isinstance(value, (dict, str)):
      raise _type_error(source, field, 'a mapping (datasets, seed, test_split_size) or a file path', value)
    return value
  kind = config.get_type(field)
  if value is None:
    if config[field] is not None:
      raise _type_error(source, field, f'a {kind.__name__}', value)
    return None
  if kind is bool:
    if not isinstance(value, bool):
      raise _type_error(source, field, 'true or false', value)
  elif kind is int:
    if isinstance(value, float) and value.is_integer():
      value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
      raise _type_error(source, field, 'a whole number', value)
  elif kind is float:
    if isinstance(value, str):
      try:
        value = float(value)
      except ValueError:
        raise _type_error(source, field, 'a number', value) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise _type_error(source, field, 'a number', value)
    value = float(value)
  elif kind is str and not isinstance(value, str):
    raise _type_error(source, field, 'a string', value)
  return value


def _strategy(field: str, value, source: str) -> str:
  if value is False:  # YAML 1.1 reads a bare `no` as false.
    return 'no'
  if not isinstance(value, str):
    raise _type_error(source, field, 'a string', value)
  return value


def _apply_mapped(config: config_dict.ConfigDict, mapping: dict, source: str, warn: Callable[[str], None]) -> None:
  """Applies the RECIPE_MAPPED fields of `mapping` to `config` (RECIPE_FIELDS already set)."""
  _map_lr_scheduler_kwargs(config, mapping, source)
  _map_max_seq_length(config, mapping, source, warn)
  _map_strategies(config, mapping, source, warn)
  _map_dtypes(config, mapping, source, warn)
  if mapping.get('do_train', True) is not True:
    raise InputError(f"{source}: field 'do_train' is {mapping['do_train']!r}; jaxsft always trains (remove it)")
  if mapping.get('fp16', False) is not False:
    raise InputError(f"{source}: field 'fp16' is {mapping['fp16']!r}; jaxsft computes in bfloat16 (bf16: true) "
                     'or float32, never float16')
  optim = mapping.get('optim')
  if optim is not None:
    if optim not in ADAMW_OPTIMIZERS:
      raise InputError(f"{source}: field 'optim' is {optim!r}; jaxsft trains with AdamW only "
                       f'({", ".join(ADAMW_OPTIMIZERS)})')
    warn(f'{source}: optim ignored: jaxsft uses optax AdamW (adam_beta1, adam_beta2, adam_epsilon, weight_decay)')
  if mapping.get('overwrite_output_dir'):
    warn(f'{source}: overwrite_output_dir ignored: jaxsft never overwrites; a run whose output_dir holds '
         'checkpoints resumes from them')
  warmup_steps = mapping.get('warmup_steps')
  if _is_fraction(warmup_steps):  # TRL 1.x: a fraction of the run.
    if 'warmup_ratio' in mapping:
      raise InputError(f"{source}: fields 'warmup_steps' ({warmup_steps}, a fraction) and 'warmup_ratio' are "
                       'both set; keep one')
    config.warmup_ratio = warmup_steps


def _is_fraction(value) -> bool:
  return isinstance(value, float) and 0 < value < 1


def _map_lr_scheduler_kwargs(config: config_dict.ConfigDict, mapping: dict, source: str) -> None:
  kwargs = mapping.get('lr_scheduler_kwargs')
  if kwargs is None:
    return
  if not isinstance(kwargs, dict):
    raise _type_error(source, 'lr_scheduler_kwargs', 'a mapping such as {min_lr_rate: 0.1}', kwargs)
  for name, value in kwargs.items():
    if name != 'min_lr_rate':
      raise InputError(f'{source}: field lr_scheduler_kwargs.{name} is not supported (jaxsft takes min_lr_rate '
                       'only, for cosine_with_min_lr)')
    config.min_lr_rate = _recipe_value(config, 'min_lr_rate', value, source)


def _map_max_seq_length(config: config_dict.ConfigDict, mapping: dict, source: str,
                        warn: Callable[[str], None]) -> None:
  if 'max_seq_length' not in mapping:
    return
  if 'max_length' in mapping:
    raise InputError(f"{source}: fields 'max_seq_length' and 'max_length' are both set; TRL renamed "
                     'max_seq_length to max_length: keep max_length')
  config.max_length = _recipe_value(config, 'max_length', mapping['max_seq_length'], source)
  warn(f'{source}: max_seq_length read as max_length (TRL renamed it)')


def _map_strategies(config: config_dict.ConfigDict, mapping: dict, source: str, warn: Callable[[str], None]) -> None:
  """save_strategy, logging_strategy, do_eval."""
  save = _strategy('save_strategy', mapping.get('save_strategy', 'steps'), source)
  if save == 'epoch':
    config.save_steps = 0.0
  elif save == 'no':
    config.save_steps = 0.0
    warn(f"{source}: save_strategy 'no' ignored: jaxsft still saves at epoch ends and at the end (checkpoints "
         'are how it resumes)')
  elif save != 'steps':
    raise InputError(f"{source}: field 'save_strategy' is {save!r}; expected steps, epoch or no")
  if 'logging_strategy' in mapping:
    logging_strategy = _strategy('logging_strategy', mapping['logging_strategy'], source)
    if logging_strategy != 'steps':
      raise InputError(f"{source}: field 'logging_strategy' is {logging_strategy!r}; jaxsft logs every "
                       'logging_steps steps (steps)')
  do_eval = mapping.get('do_eval')
  if do_eval is not None and not isinstance(do_eval, bool):
    raise _type_error(source, 'do_eval', 'true or false', do_eval)
  if do_eval is True and config.eval_strategy == 'no':
    warn(f"{source}: do_eval true ignored: eval_strategy is 'no', so no evaluation runs")
  elif do_eval is False and config.eval_strategy != 'no':
    warn(f'{source}: do_eval false ignored: eval_strategy {config.eval_strategy!r} evaluates (as in transformers)')


def _map_dtypes(config: config_dict.ConfigDict, mapping: dict, source: str, warn: Callable[[str], None]) -> None:
  """torch_dtype / dtype: jaxsft's weights stay float32, its compute dtype follows bf16."""
  for field in ('torch_dtype', 'dtype'):
    if field not in mapping:
      continue
    dtype = mapping[field]
    if dtype not in RECIPE_DTYPES:
      raise InputError(f'{source}: field {field!r} is {dtype!r}; expected {", ".join(RECIPE_DTYPES)} (jaxsft '
                       'computes in bfloat16 with bf16: true)')
    if dtype == 'bfloat16' and not config.bf16:
      warn(f'{source}: {field} bfloat16 with bf16 false: jaxsft trains in float32 (float32 weights and compute)')
