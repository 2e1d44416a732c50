"""A Hugging Face model directory and its config.json: where the model is, and the ModelConfig it describes.

`resolve_model_dir` finds the directory (local, or a hub id downloaded: json, safetensors and tokenizer files
only); `read_hf_config` reads its config.json; `model_config_from_hf` turns that into our `ModelConfig`.

config.json is interpreted as transformers 5.24's configuration classes do (defaults, `rope_parameters` or
the older top-level `rope_theta`/`rope_scaling`, Qwen2/Qwen3 `layer_types`/`use_sliding_window`/
`max_window_layers`, Mistral's `sliding_window` on every layer). `MODEL_TYPES` are the supported
`model_type`s and `CAUSAL_LM_CLASSES` the transformers class of each (an export's `architectures`).
"""

import json
import pathlib
import re
from typing import Any

from jaxsft.errors import InputError
from jaxsft.models.transformer import ModelConfig

MODEL_TYPES = ('llama', 'qwen2', 'qwen3', 'mistral')
# The transformers class an export is (config.json `architectures`: vLLM, lm-eval and the hub dispatch on it).
CAUSAL_LM_CLASSES = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM',
                     'mistral': 'MistralForCausalLM'}
HUB_PATTERNS = ['*.json', '*.safetensors', '*.jinja', '*.txt', '*.model', '*.tiktoken']
_HUB_ID = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?$')

# transformers 5.24 class defaults for the fields a config.json may leave out.
_MAX_POSITION_EMBEDDINGS = {'llama': 2048, 'qwen2': 32768, 'qwen3': 32768, 'mistral': 4096 * 32}
_DEFAULT_SLIDING_WINDOW = 4096
_DEFAULT_MAX_WINDOW_LAYERS = 28
_LAYER_TYPES = ('full_attention', 'sliding_attention')


def resolve_model_dir(name_or_path: str, revision: str | None = None, *, field: str = 'model_name_or_path',
                      require_config: bool = True) -> pathlib.Path:
  """A local model directory, or a hub id downloaded (json, safetensors and tokenizer files only).

  Args:
    name_or_path: a local directory or a Hugging Face hub id (`org/name`).
    revision: hub revision (branch, tag or commit); unused for local directories.
    field: the config field named in errors.
    require_config: whether the directory must hold a config.json.

  Raises:
    InputError: a missing local path, an id that cannot be fetched, or no config.json.
  """
  text = str(name_or_path)
  path = pathlib.Path(text).expanduser()
  if path.is_dir():
    path = path.resolve()
  elif path.exists():
    raise InputError(f'config field {field!r}: {text!r} is a file, not a model directory')
  elif not _HUB_ID.match(text):
    raise InputError(f'config field {field!r}: no such directory {text!r}')
  else:
    import huggingface_hub  # pylint: disable=import-outside-toplevel
    try:
      path = pathlib.Path(huggingface_hub.snapshot_download(text, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # pylint: disable=broad-except
      reason = ' '.join(str(e).split())[:200]
      raise InputError(f'config field {field!r}: {text!r} is not a local directory and could not be fetched '
                       f'from the Hugging Face hub ({type(e).__name__}: {reason})') from None
  if require_config and not (path / 'config.json').is_file():
    raise InputError(f'config field {field!r}: {str(path)!r} has no config.json')
  return path


def read_hf_config(model_dir) -> dict:
  """config.json of `model_dir` as a dict."""
  path = pathlib.Path(model_dir) / 'config.json'
  try:
    with open(path, encoding='utf-8') as f:
      cfg = json.load(f)
  except OSError as e:
    raise InputError(f'{path}: cannot read ({e.strerror or e})') from None
  except json.JSONDecodeError as e:
    raise InputError(f'{path}: malformed JSON ({e})') from None
  if not isinstance(cfg, dict):
    raise InputError(f'{path}: expected a JSON object, got {type(cfg).__name__}')
  return cfg


def _field(hf_cfg: dict, key: str, default: Any = None, *, required: bool = False) -> Any:
  if hf_cfg.get(key) is None:
    if required:
      raise InputError(f'config.json: {key!r} is missing')
    return default
  return hf_cfg[key]


def _positive_int(hf_cfg: dict, key: str, default: int | None = None) -> int:
  value = _field(hf_cfg, key, default, required=default is None)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise InputError(f'config.json: {key!r} must be a positive integer, got {value!r}')
  return value


def _hashable(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_hashable(v) for v in value)
  if isinstance(value, dict):
    return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
  return value


def _rope(hf_cfg: dict, model_type: str, layer_types: list[str]) -> tuple[float, tuple | None]:
  """(rope_theta, rope_scaling) the way transformers standardises `rope_parameters`."""
  params = hf_cfg.get('rope_scaling') or hf_cfg.get('rope_parameters') or {}
  if not isinstance(params, dict):
    raise InputError(f'config.json: rope_parameters must be an object, got {params!r}')
  nested = [k for k in params if k in set(layer_types)]
  if nested:  # Per-layer-type RoPE: fine only if every layer type has the same one.
    variants = {json.dumps(params[k], sort_keys=True) for k in nested}
    if len(variants) > 1:
      raise InputError('config.json: rope_parameters that differ per layer type are not supported')
    params = params[nested[0]]
  params = dict(params)
  theta = params.get('rope_theta')
  if theta is None:
    theta = hf_cfg.get('rope_theta', 10000.0)
  params.pop('rope_theta', None)
  if hf_cfg.get('partial_rotary_factor') is not None:
    params.setdefault('partial_rotary_factor', hf_cfg['partial_rotary_factor'])
  rope_type = params.pop('type', None)
  rope_type = params.get('rope_type', rope_type) or 'default'
  params['rope_type'] = rope_type
  if rope_type in ('llama3', 'yarn', 'longrope'):
    max_positions = hf_cfg.get('max_position_embeddings', _MAX_POSITION_EMBEDDINGS[model_type])
    if hf_cfg.get('original_max_position_embeddings') is not None:
      params['original_max_position_embeddings'] = hf_cfg['original_max_position_embeddings']
    elif params.get('original_max_position_embeddings') is None:
      params['original_max_position_embeddings'] = max_positions
    if rope_type == 'yarn' and params.get('factor') is None:
      params['factor'] = max_positions / params['original_max_position_embeddings']
  if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
    raise InputError(f'config.json: rope_theta must be a positive number, got {theta!r}')
  if rope_type == 'default':
    partial = params.get('partial_rotary_factor', 1.0)
    return float(theta), (None if partial == 1.0 else (('partial_rotary_factor', partial), ('rope_type', 'default')))
  return float(theta), _hashable(params)


def _sliding_windows(hf_cfg: dict, model_type: str, num_layers: int) -> tuple[int | None, ...] | None:
  """Per-layer sliding windows as transformers 5.24 resolves them (None everywhere → None)."""
  if model_type == 'llama':
    return None
  if model_type == 'mistral':
    window = hf_cfg.get('sliding_window', _DEFAULT_SLIDING_WINDOW)
    windows = (window,) * num_layers
  else:  # qwen2, qwen3: the window is active only with use_sliding_window, on the `layer_types` layers.
    window = hf_cfg.get('sliding_window', _DEFAULT_SLIDING_WINDOW) if hf_cfg.get('use_sliding_window') else None
    layer_types = hf_cfg.get('layer_types')
    if layer_types is None:
      first = hf_cfg.get('max_window_layers', _DEFAULT_MAX_WINDOW_LAYERS)
      layer_types = ['sliding_attention' if window is not None and i >= first else 'full_attention'
                     for i in range(num_layers)]
    if (not isinstance(layer_types, list) or len(layer_types) != num_layers
        or any(t not in _LAYER_TYPES for t in layer_types)):
      raise InputError(f'config.json: layer_types must list {num_layers} entries from {_LAYER_TYPES}, '
                       f'got {layer_types!r}')
    if 'sliding_attention' in layer_types and window is None:
      raise InputError("config.json: layer_types has 'sliding_attention' layers but no sliding_window "
                       '(use_sliding_window is false or sliding_window is null)')
    windows = tuple(window if t == 'sliding_attention' else None for t in layer_types)
  if all(w is None for w in windows):
    return None
  if any(w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1) for w in windows):
    raise InputError(f'config.json: sliding_window must be a positive integer, got {window!r}')
  return windows


def model_config_from_hf(hf_cfg: dict, *, dtype: str = 'float32', param_dtype: str = 'float32',
                         attention_impl: str = 'xla', remat: str = 'none', scan_layers: bool = False,
                         mlp_chunk_size: int = 0) -> ModelConfig:
  """The ModelConfig of a Llama, Qwen2/2.5, Qwen3 or Mistral config.json (transformers 5.24 semantics)."""
  model_type = hf_cfg.get('model_type')
  if model_type not in MODEL_TYPES:
    raise InputError(f'config.json: model_type {model_type!r} is not supported; supported: {", ".join(MODEL_TYPES)}')
  act = hf_cfg.get('hidden_act', 'silu')
  if act not in ('silu', 'swish'):
    raise InputError(f'config.json: hidden_act {act!r} is not supported (only silu)')
  hidden = _positive_int(hf_cfg, 'hidden_size')
  heads = _positive_int(hf_cfg, 'num_attention_heads')
  kv_heads = _positive_int(hf_cfg, 'num_key_value_heads', heads)
  if heads % kv_heads:
    raise InputError(f'config.json: num_attention_heads ({heads}) is not a multiple of num_key_value_heads '
                     f'({kv_heads})')
  num_layers = _positive_int(hf_cfg, 'num_hidden_layers')
  head_dim = _positive_int(hf_cfg, 'head_dim', 128 if model_type == 'qwen3' and 'head_dim' not in hf_cfg
                           else hidden // heads)
  if model_type == 'qwen2':
    qkv_bias, o_bias, mlp_bias = True, False, False
  elif model_type == 'mistral':
    qkv_bias, o_bias, mlp_bias = False, False, False
  else:
    qkv_bias = o_bias = bool(hf_cfg.get('attention_bias', False))
    mlp_bias = bool(hf_cfg.get('mlp_bias', False)) if model_type == 'llama' else False
  layer_types = hf_cfg.get('layer_types') or []
  rope_theta, rope_scaling = _rope(hf_cfg, model_type, layer_types if isinstance(layer_types, list) else [])
  return ModelConfig(
      vocab_size=_positive_int(hf_cfg, 'vocab_size'),
      hidden_size=hidden,
      intermediate_size=_positive_int(hf_cfg, 'intermediate_size'),
      num_layers=num_layers,
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=head_dim,
      rms_norm_eps=float(hf_cfg.get('rms_norm_eps', 1e-6)),
      rope_theta=rope_theta,
      rope_scaling=rope_scaling,
      qkv_bias=qkv_bias,
      o_bias=o_bias,
      mlp_bias=mlp_bias,
      qk_norm=model_type == 'qwen3',
      tie_word_embeddings=bool(hf_cfg.get('tie_word_embeddings', False)),
      sliding_windows=_sliding_windows(hf_cfg, model_type, num_layers),
      dtype=dtype,
      param_dtype=param_dtype,
      attention_impl=attention_impl,
      remat=remat,
      scan_layers=scan_layers, mlp_chunk_size=mlp_chunk_size,
  )
