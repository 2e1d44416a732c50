"""LoRA settings: TRL's `ModelConfig` fields (use_peft, lora_r, ...) checked, and PEFT's adapter_config.json.

`settings(config)` is what a LoRA run trains (None for full fine-tuning); every bad field is an InputError naming
it, raised by `config.validate` before any I/O. The adapter directory's `adapter_config.json` is PEFT's
`LoraConfig` as JSON: `adapter_config` writes it for an export, `check_adapter_dir` reads the one of
`adapter_name_or_path` and refuses an adapter whose shape differs from the run's fields (a silent override would
train another model than the config says).

Nothing here imports jax: the command line checks configs without it.
"""

import dataclasses
import json
import math
import os

from jaxsft.errors import InputError

# The projections a LoRA adapter can wrap, by their Hugging Face module names. 'all-linear' is all of them: PEFT's
# meaning (every linear layer but the output layer, lm_head).
TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
ALL_LINEAR = 'all-linear'
# PEFT's default when target_modules is None (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING) for llama,
# mistral, qwen2 and qwen3 alike.
DEFAULT_TARGETS = ('q_proj', 'v_proj')
ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'
_UNSUPPORTED = {
    'use_dora': 'DoRA (weight-decomposed LoRA) is not implemented; set use_dora=False',
    'load_in_4bit': 'QLoRA (a quantised frozen base) is not implemented; the base is frozen in the compute dtype '
                    '(bf16 with bf16=True); set load_in_4bit=False',
    'load_in_8bit': 'QLoRA (a quantised frozen base) is not implemented; the base is frozen in the compute dtype '
                    '(bf16 with bf16=True); set load_in_8bit=False',
}


@dataclasses.dataclass(frozen=True)
class Settings:
  """A LoRA run: rank `r`, `alpha`, adapter-input `dropout`, the targeted projections, rsLoRA's scaling."""
  r: int
  alpha: float
  dropout: float
  targets: tuple[str, ...]
  rslora: bool = False

  @property
  def scaling(self) -> float:
    """PEFT's: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


def parse_targets(value, field: str = 'lora_target_modules') -> tuple[str, ...]:
  """'all-linear' | 'q_proj,v_proj' | a list of names | None (PEFT's default) → the targeted module names."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return DEFAULT_TARGETS
  if isinstance(value, str):
    names = [n.strip() for n in value.split(',') if n.strip()]
  elif isinstance(value, (list, tuple)) and all(isinstance(n, str) for n in value):
    names = [n.strip() for n in value]
  else:
    raise InputError(f"config field '{field}': expected 'all-linear' or module names (e.g. 'q_proj,v_proj'), "
                     f'got {value!r}')
  if names == [ALL_LINEAR]:
    return TARGETS
  unknown = [n for n in names if n not in TARGETS]
  if unknown:
    hint = " ('all-linear' alone, not in a list)" if ALL_LINEAR in unknown else ''
    raise InputError(f"config field '{field}': unknown module name(s) {', '.join(map(repr, unknown))}{hint}; "
                     f"expected 'all-linear' or some of {', '.join(TARGETS)} (lm_head and embed_tokens are not "
                     'LoRA targets)')
  return tuple(n for n in TARGETS if n in names)  # The model's order, each once.


def settings(config) -> Settings | None:
  """The LoRA settings of `config` (None unless use_peft); an InputError naming the first bad field."""
  peft_only = [name for name in ('adapter_name_or_path', 'lora_modules_to_save') if config[name]]
  if not config.use_peft:
    if peft_only:
      raise InputError(f"config field '{peft_only[0]}' is set but use_peft is False (set use_peft=True for a LoRA "
                       'run)')
    return None
  for name, why in _UNSUPPORTED.items():
    if config[name]:
      raise InputError(f"config field '{name}': {why}")
  if config.lora_modules_to_save:
    raise InputError("config field 'lora_modules_to_save': training whole modules beside the adapters is not "
                     'implemented; unset it')
  r, alpha, dropout = config.lora_r, config.lora_alpha, config.lora_dropout
  if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
    raise InputError(f"config field 'lora_r': the adapters' rank must be a positive integer, got {r!r}")
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
    raise InputError(f"config field 'lora_alpha' must be positive, got {alpha!r}")
  if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
    raise InputError(f"config field 'lora_dropout' must be in [0, 1), got {dropout!r}")
  if config.model_init == 'random':
    raise InputError("config field 'model_init': a LoRA run (use_peft=True) adapts pretrained weights; "
                     "set model_init='pretrained'")
  return Settings(r=int(r), alpha=float(alpha), dropout=float(dropout),
                  targets=parse_targets(config.lora_target_modules), rslora=bool(config.use_rslora))


def adapter_config(lora: Settings, base_model: str | None) -> dict:
  """PEFT's adapter_config.json (a `LoraConfig` for a causal LM) of these settings."""
  return {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'base_model_name_or_path': base_model, 'r': lora.r,
      'lora_alpha': lora.alpha, 'lora_dropout': lora.dropout, 'target_modules': list(lora.targets),
      'use_rslora': lora.rslora, 'use_dora': False, 'bias': 'none', 'fan_in_fan_out': False,
      'modules_to_save': None, 'init_lora_weights': True, 'inference_mode': True, 'layers_to_transform': None,
      'rank_pattern': {}, 'alpha_pattern': {},
  }


def _adapter_targets(value, path: str) -> tuple[str, ...]:
  """The module names of an adapter_config.json's target_modules: PEFT saves 'all-linear' as the full module paths
  ('model.layers.0.self_attn.q_proj', ...), and matches a name by its last components; a regex is refused."""
  if isinstance(value, list):
    value = sorted({str(name).rsplit('.', 1)[-1] for name in value})
  elif isinstance(value, str) and value != ALL_LINEAR and any(c in value for c in '.*+?[]()|^$\\'):
    raise InputError(f'{path}: target_modules {value!r} is a regular expression; jaxsft takes module names')
  return parse_targets(value, f'{path}: target_modules')


def adapter_settings(directory: str, field: str = '--adapter') -> Settings:
  """The settings a PEFT LoRA directory was trained with (for applying it: dropout off)."""
  path = os.path.join(directory, ADAPTER_CONFIG)
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise InputError(f'{field}: cannot read {path} ({e})') from None
  lora = Settings(r=int(saved.get('r', 8)), alpha=float(saved.get('lora_alpha', 8)), dropout=0.0,
                  targets=_adapter_targets(saved.get('target_modules'), path),
                  rslora=bool(saved.get('use_rslora', False)))
  check_adapter_dir(directory, lora, field)
  return lora


def check_adapter_dir(directory: str, lora: Settings, field: str = "config field 'adapter_name_or_path'") -> dict:
  """The adapter_config.json of a PEFT LoRA directory, checked against the run's settings (InputError naming
  `field` and the first field that differs)."""
  path = os.path.join(directory, ADAPTER_CONFIG)
  if not os.path.isdir(directory):
    raise InputError(f'{field}: {directory!r} is not a directory (a PEFT adapter directory with '
                     f'{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})')
  for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
    if not os.path.isfile(os.path.join(directory, name)):
      raise InputError(f'{field}: {directory!r} has no {name} (a PEFT adapter directory has '
                       f'{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})')
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise InputError(f'{path}: cannot read it as JSON ({e})') from None
  if not isinstance(saved, dict) or saved.get('peft_type', 'LORA') != 'LORA':
    kind = saved.get('peft_type') if isinstance(saved, dict) else type(saved).__name__
    raise InputError(f'{path}: not a LoRA adapter (peft_type {kind!r})')
  for key in ('use_dora', 'fan_in_fan_out'):
    if saved.get(key):
      raise InputError(f'{path}: {key}=true is not supported')
  if saved.get('modules_to_save'):
    raise InputError(f'{path}: modules_to_save {saved["modules_to_save"]} is not supported')
  if saved.get('rank_pattern') or saved.get('alpha_pattern') or saved.get('layers_to_transform'):
    raise InputError(f'{path}: per-layer ranks, alphas or layers (rank_pattern, alpha_pattern, '
                     'layers_to_transform) are not supported')
  theirs = {'lora_r': saved.get('r', 8), 'lora_alpha': float(saved.get('lora_alpha', 8)),  # PEFT's defaults.
            'lora_target_modules': _adapter_targets(saved.get('target_modules'), path),
            'use_rslora': bool(saved.get('use_rslora', False))}
  mine = {'lora_r': lora.r, 'lora_alpha': lora.alpha, 'lora_target_modules': lora.targets, 'use_rslora': lora.rslora}
  for name, value in mine.items():
    if value != theirs[name]:
      show = ','.join if name == 'lora_target_modules' else repr
      raise InputError(f"config field '{name}' is {show(value)} but the adapter in {directory!r} has "
                       f'{show(theirs[name])} (set {name} to match it)')
  return saved
