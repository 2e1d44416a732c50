"""Hugging Face in both directions: model directories, config.json → ModelConfig, safetensors ⇄ NNX params.

No torch: safetensors files are read and written here directly (an 8-byte header length, a JSON header,
then the raw little-endian tensors), memory-mapped on read, with bfloat16 through `ml_dtypes`, so every
safetensors version and every dtype behaves the same. Loading builds the module abstractly
(`nnx.eval_shape`) and fills its leaves tensor by tensor, so the model is materialised once. Given
shardings, each parameter is instead assembled from per-device blocks that are read straight from the file
(`read_block`: our block mapped through the transpose/reshape to the HF tensor's block), so a process reads
and holds only its own shards.

Layouts: HF `nn.Linear.weight` is [out, in]; our kernels are [in..., out...] with heads split out
(q_proj [embed, q_heads, head_dim], o_proj [q_heads, head_dim, embed]), so conversion is a transpose and a
reshape. Names map `layers.3.mlp.up_proj.kernel` ⇄ `model.layers.3.mlp.up_proj.weight`; `lm_head.kernel`
⇄ `lm_head.weight`, absent when the embeddings are tied. With `scan_layers`, a stacked parameter
(`layers.mlp.up_proj.kernel`, [L, ...]) holds `model.layers.{i}.mlp.up_proj.weight` at index i: loading fills
it layer by layer (a sharded load reads, for each layer in a device's block, only that block of the layer's
tensor), and export slices it back into the per-layer tensors.

config.json is interpreted as transformers 5.24's configuration classes do (defaults, `rope_parameters` or
the older top-level `rope_theta`/`rope_scaling`, Qwen2/Qwen3 `layer_types`/`use_sliding_window`/
`max_window_layers`, Mistral's `sliding_window` on every layer).
"""

import collections
import json
import math
import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxsft.errors import InputError
from jaxsft.models import safetensors_io
from jaxsft.models.safetensors_io import INDEX_FILE, SINGLE_FILE  # pylint: disable=unused-import
from jaxsft.models.transformer import LAYERS_AXIS
from jaxsft.models.transformer import ModelConfig
from jaxsft.models.transformer import Transformer

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

_SAVE_DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16),
                'float16': np.dtype(np.float16)}


# ----------------------------------------------------------------------------------------------------------
# Model directories and config.json.


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


# ----------------------------------------------------------------------------------------------------------
# Parameter names and layouts.


def _hf_name(path: tuple) -> str:
  """NNX parameter path → HF tensor name."""
  *module, leaf = (str(p) for p in path)
  suffix = 'bias' if leaf == 'bias' else 'weight'
  if module == ['lm_head']:
    return 'lm_head.' + suffix
  return 'model.' + '.'.join(module) + '.' + suffix


def _num_in_axes(path: tuple) -> int:
  """How many leading kernel axes are the HF input features (o_proj's are heads × head_dim)."""
  return 2 if 'o_proj' in path else 1


def _to_hf(path: tuple, value: np.ndarray) -> np.ndarray:
  if path[-1] == 'kernel':
    n_in = _num_in_axes(path)
    return np.ascontiguousarray(value.reshape(math.prod(value.shape[:n_in]), -1).T)
  if path[-1] == 'bias':
    return value.reshape(-1)
  return value


def _hf_shape(path: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
  if path[-1] == 'kernel':
    n_in = _num_in_axes(path)
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
  if path[-1] == 'bias':
    return (math.prod(shape),)
  return tuple(shape)


def _from_hf(path: tuple, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if path[-1] == 'kernel':
    return tensor.T.reshape(shape)
  return tensor.reshape(shape)


def _is_stacked(path: tuple) -> bool:
  """Whether `path` is a parameter of scanned layers ('layers', 'mlp', ...: no layer index after 'layers')."""
  return len(path) > 1 and path[0] == LAYERS_AXIS and not isinstance(path[1], int)


def _tensors(path: tuple, shape: tuple[int, ...]) -> list[tuple[str, tuple, tuple[int, ...]]]:
  """(HF name, one-layer path, one-layer shape) of each HF tensor behind the parameter at `path`.

  One entry for an ordinary parameter; for a stacked one, an entry per layer i, in layer order, whose path
  carries the index ('layers', i, ...) and whose shape drops the leading layer axis.
  """
  if not _is_stacked(path):
    return [(_hf_name(path), path, tuple(shape))]
  layer_paths = [(path[0], i, *path[1:]) for i in range(shape[0])]
  return [(_hf_name(p), p, tuple(shape[1:])) for p in layer_paths]


# ----------------------------------------------------------------------------------------------------------
# Models.


def abstract_model(cfg: ModelConfig) -> Transformer:
  """`cfg`'s model with `jax.ShapeDtypeStruct` leaves (nothing allocated); its params carry logical axis names.

  `jax.eval_shape` of the split state rather than `nnx.eval_shape`: under a global mesh (`jax.set_mesh`) the
  latter turns the logical names into mesh axes, which they are not.
  """
  graphdef = None

  def state():
    nonlocal graphdef
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    return params

  abstract_state = jax.eval_shape(state)
  return nnx.merge(graphdef, abstract_state)


def _key(entry) -> Any:
  for attr in ('key', 'idx', 'name'):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return str(entry)


def _flat_shardings(params: nnx.State, shardings) -> dict[tuple, jax.sharding.Sharding]:
  """`shardings` (a pytree shaped like `params`, Sharding leaves) as {parameter path: sharding}.

  Raises:
    ValueError: a parameter without a sharding, or a sharding for no parameter.
  """
  leaves = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]
  out = {}
  for key_path, leaf in leaves:
    path = tuple(_key(k) for k in key_path)
    if path and path[-1] == 'value':  # nnx.Variable nodes flatten through their `value`.
      path = path[:-1]
    if not isinstance(leaf, jax.sharding.Sharding):
      raise ValueError(f'shardings: {".".join(map(str, path))} is a {type(leaf).__name__}, not a jax Sharding')
    out[path] = leaf
  wanted = {path for path, _ in nnx.to_flat_state(params)}
  missing = sorted('.'.join(map(str, p)) for p in wanted - set(out))
  extra = sorted('.'.join(map(str, p)) for p in set(out) - wanted)
  if missing or extra:
    raise ValueError(f'shardings do not match the model parameters: missing {missing[:5]}, unknown {extra[:5]}')
  return out


def init_random(cfg: ModelConfig, seed: int, *, shardings=None) -> Transformer:
  """A freshly initialised model (transformers' init: normal(0.02) weights, zero biases, unit norms).

  Args:
    cfg: the architecture.
    seed: the init seed; the same seed gives the same values with or without `shardings`.
    shardings: None (arrays on the default device), or a pytree like `nnx.state(abstract_model(cfg),
      nnx.Param)` of Sharding leaves: each device computes only its shards (`jax.jit` with these output
      shardings), so the whole model never exists on one device.

  The init always runs under `jax.jit` (XLA's fused random-normal differs from eager op-by-op in the last
  bit), so sharded and unsharded inits of one seed are bit-identical.
  """
  abstract = abstract_model(cfg)
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  if shardings is None:
    out_shardings = None
  else:
    by_path = _flat_shardings(nnx.state(abstract, nnx.Param), shardings)
    if len(flat) != len(by_path):
      raise ValueError('init_random with shardings needs a model whose state is parameters only')
    out_shardings = [by_path[path] for path, _ in flat]

  def init():
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    return [variable.get_value() for _, variable in nnx.to_flat_state(nnx.state(model))]

  values = jax.jit(init, out_shardings=out_shardings)()
  leaves = [(path, variable.replace(value=value)) for (path, variable), value in zip(flat, values)]
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _hf_groups(path: tuple, ndim: int) -> list[list[int]]:
  """Our axes behind each HF tensor axis, in HF order: a kernel's HF [out, in] flattens our out and in axes."""
  if path[-1] == 'kernel':
    n_in = _num_in_axes(path)
    return [list(range(n_in, ndim)), list(range(n_in))]
  if path[-1] == 'bias':
    return [list(range(ndim))]
  return [[a] for a in range(ndim)]


def read_block(reader: safetensors_io.Reader, name: str, path: tuple, shape: tuple[int, ...], index: tuple,
               dtype) -> np.ndarray:
  """`_from_hf(path, tensor, shape)[index]` cast to `dtype`, reading only that block's slice of the HF tensor.

  Each HF axis flattens a group of our axes (row-major); the read covers the group's first axis's range with
  the group's other axes whole, which are then sliced here (a transient over-read only when an inner axis,
  e.g. head_dim, is itself split).
  """
  ranges = [sl.indices(n)[:2] if isinstance(sl, slice) else (int(sl), int(sl) + 1) for sl, n in
            zip(tuple(index) + (slice(None),) * (len(shape) - len(index)), shape)]
  groups = _hf_groups(path, len(shape))
  hf_ranges, expanded = [], []
  for group in groups:
    stride = math.prod(shape[a] for a in group[1:])
    (a0, a1) = ranges[group[0]]
    hf_ranges.append((a0 * stride, a1 * stride))
    expanded += [a1 - a0] + [shape[a] for a in group[1:]]
  block = reader.read_slice(name, hf_ranges).reshape(expanded)
  order = [a for group in groups for a in group]
  block = block.transpose([order.index(a) for a in range(len(shape))])
  firsts = {group[0] for group in groups}
  block = block[tuple(slice(None) if a in firsts else slice(*ranges[a]) for a in range(len(shape)))]
  return np.ascontiguousarray(block, dtype=dtype)


def _sharded_value(reader: safetensors_io.Reader, path: tuple, variable, sharding) -> jax.Array:
  """The parameter as a global array with `sharding`, each local device's block read from the file alone.

  A stacked parameter's block spans a range of layers: it is filled layer by layer, each layer's block read
  from that layer's tensor.
  """
  shape = tuple(variable.shape)
  dtype = np.dtype(variable.dtype)
  tensors = _tensors(path, shape)

  def key(index):
    return tuple(sl.indices(n) if isinstance(sl, slice) else sl for sl, n in zip(index, shape))

  def read(index):
    if not _is_stacked(path):
      name, _, _ = tensors[0]
      return read_block(reader, name, path, shape, index, dtype)
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    layers = range(*index[0].indices(shape[0]))
    block = None
    for j, layer in enumerate(layers):
      name, layer_path, layer_shape = tensors[layer]
      layer_block = read_block(reader, name, layer_path, layer_shape, index[1:], dtype)
      if block is None:
        block = np.empty((len(layers),) + layer_block.shape, dtype)
      block[j] = layer_block
    return block

  # Devices holding the same block (replicas) share one read; a block is dropped after its last device.
  uses = collections.Counter(key(index) for device, index in sharding.devices_indices_map(shape).items()
                             if device.process_index == jax.process_index())
  blocks = {}

  def callback(index):
    k = key(index)
    if k not in blocks:
      blocks[k] = read(index)
    uses[k] -= 1
    return blocks.pop(k) if uses[k] <= 0 else blocks[k]

  return jax.make_array_from_callback(shape, sharding, callback)


def _host_value(reader: safetensors_io.Reader, path: tuple, shape: tuple[int, ...]) -> np.ndarray:
  """The whole parameter on the host, in the file's dtype (a stacked one filled layer by layer)."""
  tensors = _tensors(path, shape)
  if not _is_stacked(path):
    name, _, _ = tensors[0]
    tensor = reader.get(name)
    host = _from_hf(path, tensor, shape)
    if np.may_share_memory(host, tensor):  # Never hand JAX a view of the memory map (CPU may alias it).
      host = host.copy()
    return host
  host = None
  for layer, (name, layer_path, layer_shape) in enumerate(tensors):
    tensor = reader.get(name)
    if host is None:
      host = np.empty(shape, tensor.dtype)
    host[layer] = _from_hf(layer_path, tensor, layer_shape)
  return host


def load_pretrained(model_dir, cfg: ModelConfig, *, shardings=None) -> Transformer:
  """Loads the safetensors weights of `model_dir` (single file or sharded with an index) into `cfg`'s model.

  Args:
    model_dir: a local Hugging Face model directory.
    cfg: the architecture (from `model_config_from_hf`); parameters are cast to `cfg.param_dtype`.
    shardings: None (each parameter whole on the default device), or a pytree like
      `nnx.state(abstract_model(cfg), nnx.Param)` whose leaves are jax Shardings: every parameter is built
      with `jax.make_array_from_callback`, each of this process's devices reading only its block of the
      file, so neither the host nor any device ever holds a whole parameter it does not own.

  Raises:
    InputError: a tensor missing, wrongly shaped, or not part of the architecture, naming tensor and file.
  """
  model_dir = pathlib.Path(model_dir)
  reader = safetensors_io.open_checkpoint(model_dir)
  abstract = abstract_model(cfg)
  by_path = None if shardings is None else _flat_shardings(nnx.state(abstract, nnx.Param), shardings)
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  expected = set()
  for path, variable in flat:  # Check every name and shape before reading any data.
    for name, one_path, one_shape in _tensors(path, tuple(variable.shape)):
      expected.add(name)
      if name not in reader:
        files = ', '.join(sorted({reader.file_of(n).name for n in reader.names()})) or model_dir.name
        raise InputError(f'{model_dir}: tensor {name!r} is missing from {files}')
      hf_shape = _hf_shape(one_path, one_shape)
      if reader.shape(name) != hf_shape:
        raise InputError(f'{reader.file_of(name)}: tensor {name!r} has shape {list(reader.shape(name))}, '
                         f'expected {list(hf_shape)} from config.json')
  ignorable = {'lm_head.weight'} if cfg.tie_word_embeddings else set()
  for name in reader.names():
    if name not in expected and name not in ignorable and not name.endswith('rotary_emb.inv_freq'):
      raise InputError(f'{reader.file_of(name)}: tensor {name!r} is not part of the model that config.json '
                       'describes')
  leaves = []
  for path, variable in flat:
    if by_path is not None:
      value = _sharded_value(reader, path, variable, by_path[path])
    else:
      value = jnp.asarray(_host_value(reader, path, tuple(variable.shape))).astype(variable.dtype)
    leaves.append((path, variable.replace(value=value)))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def to_hf_tensors(model: Transformer) -> dict[str, np.ndarray]:
  """The model's parameters as HF tensors (names and layouts), in the parameter dtype, on the host.

  A scanned model gives the same tensors, in the same order, as the unscanned model of the same weights.
  """
  entries = []
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = np.asarray(jax.device_get(variable[...]))
    if _is_stacked(path):
      entries += [(layer_path, name, _to_hf(layer_path, value[i]))
                  for i, (name, layer_path, _) in enumerate(_tensors(path, value.shape))]
    else:
      entries.append((path, _hf_name(path), _to_hf(path, value)))
  entries.sort(key=lambda entry: entry[0])  # The unscanned model's order: by path, layers by index.
  return {name: tensor for _, name, tensor in entries}


def _replace_atomically(path: pathlib.Path, write) -> None:
  tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def save_pretrained(model: Transformer, hf_cfg: dict, out_dir, *, dtype: str = 'float32',
                    max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes a Hugging Face model directory: safetensors weights (sharded past `max_shard_bytes`) + config.json.

  Every file is written under a temporary name and renamed, so a crash never leaves a partial file under a
  final name; weight files of an earlier save that this one does not overwrite are removed.
  """
  if dtype not in _SAVE_DTYPES:
    raise InputError(f'export dtype {dtype!r} is not supported; expected one of {", ".join(_SAVE_DTYPES)}')
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  np_dtype = _SAVE_DTYPES[dtype]
  tensors = {k: v.astype(np_dtype) for k, v in to_hf_tensors(model).items()}
  shards = safetensors_io.split_shards(tensors, max_shard_bytes)
  written = set()
  if len(shards) == 1:
    _replace_atomically(out_dir / SINGLE_FILE, lambda p: safetensors_io.write_file(p, shards[0]))
    written.add(SINGLE_FILE)
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      name = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
      _replace_atomically(out_dir / name, lambda p, s=shard: safetensors_io.write_file(p, s))
      weight_map.update({k: name for k in shard})
      written.add(name)
    index = {'metadata': {'total_size': sum(v.nbytes for v in tensors.values())}, 'weight_map': weight_map}
    _replace_atomically(out_dir / INDEX_FILE, lambda p: p.write_text(json.dumps(index, indent=2) + '\n'))
    written.add(INDEX_FILE)
  for stale in out_dir.iterdir():
    if stale.name not in written and re.fullmatch(r'model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?',
                                                  stale.name):
      stale.unlink()
  config = dict(hf_cfg)
  config['architectures'] = [CAUSAL_LM_CLASSES[config['model_type']]]  # Also for a config built by hand.
  config['dtype'] = dtype
  config['torch_dtype'] = dtype
  config['tie_word_embeddings'] = model.cfg.tie_word_embeddings
  _replace_atomically(out_dir / 'config.json',
                      lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + '\n'))
