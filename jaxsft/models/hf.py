"""Hugging Face weights in both directions: safetensors model directories ⇄ NNX models (and random init).

No torch: safetensors files are read and written directly (jaxsft.models.safetensors_io: memory-mapped on
read, bfloat16 through `ml_dtypes`), so every safetensors version and every dtype behaves the same. Loading
builds the module abstractly (`abstract_model`) and fills its leaves tensor by tensor, so the model is
materialised once. Given shardings, each parameter is instead assembled from per-device blocks read straight
from the file (`hf_layout.read_block`), so a process reads and holds only its own shards; a stacked
(`scan_layers`) parameter is filled layer by layer, each layer's block read from that layer's tensor. Export
(`save_pretrained`) writes the per-layer HF tensors, sharded past a size, plus config.json; `lm_head.weight`
is absent when the embeddings are tied.

Names and layouts (ours ⇄ HF) are jaxsft.models.hf_layout's; model directories and config.json →
ModelConfig are jaxsft.models.hf_config's.
"""

import collections
import json
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
from jaxsft.models import hf_layout
from jaxsft.models import safetensors_io
from jaxsft.models.hf_config import CAUSAL_LM_CLASSES
from jaxsft.models.safetensors_io import INDEX_FILE, SINGLE_FILE
from jaxsft.models.transformer import ModelConfig
from jaxsft.models.transformer import Transformer


_SAVE_DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16),
                'float16': np.dtype(np.float16)}


# ----------------------------------------------------------------------------------------------------------
# Models: abstract, randomly initialised, loaded from safetensors.


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


def _sharded_value(reader: safetensors_io.Reader, path: tuple, variable, sharding) -> jax.Array:
  """The parameter as a global array with `sharding`, each local device's block read from the file alone.

  A stacked parameter's block spans a range of layers: it is filled layer by layer, each layer's block read
  from that layer's tensor.
  """
  shape = tuple(variable.shape)
  dtype = np.dtype(variable.dtype)
  tensors = hf_layout.tensors(path, shape)

  def key(index):
    return tuple(sl.indices(n) if isinstance(sl, slice) else sl for sl, n in zip(index, shape))

  def read(index):
    if not hf_layout.is_stacked(path):
      name, _, _ = tensors[0]
      return hf_layout.read_block(reader, name, path, shape, index, dtype)
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    layers = range(*index[0].indices(shape[0]))
    block = None
    for j, layer in enumerate(layers):
      name, layer_path, layer_shape = tensors[layer]
      layer_block = hf_layout.read_block(reader, name, layer_path, layer_shape, index[1:], dtype)
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
  tensors = hf_layout.tensors(path, shape)
  if not hf_layout.is_stacked(path):
    name, _, _ = tensors[0]
    tensor = reader.get(name)
    host = hf_layout.from_hf(path, tensor, shape)
    if np.may_share_memory(host, tensor):  # Never hand JAX a view of the memory map (CPU may alias it).
      host = host.copy()
    return host
  host = None
  for layer, (name, layer_path, layer_shape) in enumerate(tensors):
    tensor = reader.get(name)
    if host is None:
      host = np.empty(shape, tensor.dtype)
    host[layer] = hf_layout.from_hf(layer_path, tensor, layer_shape)
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
    for name, one_path, one_shape in hf_layout.tensors(path, tuple(variable.shape)):
      expected.add(name)
      if name not in reader:
        files = ', '.join(sorted({reader.file_of(n).name for n in reader.names()})) or model_dir.name
        raise InputError(f'{model_dir}: tensor {name!r} is missing from {files}')
      hf_shape = hf_layout.hf_shape(one_path, one_shape)
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


# ----------------------------------------------------------------------------------------------------------
# Export.


def to_hf_tensors(model: Transformer) -> dict[str, np.ndarray]:
  """The model's parameters as HF tensors (names and layouts), in the parameter dtype, on the host.

  A scanned model gives the same tensors, in the same order, as the unscanned model of the same weights.
  """
  entries = []
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = np.asarray(jax.device_get(variable[...]))
    if hf_layout.is_stacked(path):
      entries += [(layer_path, name, hf_layout.to_hf(layer_path, value[i]))
                  for i, (name, layer_path, _) in enumerate(hf_layout.tensors(path, value.shape))]
    else:
      entries.append((path, hf_layout.hf_name(path), hf_layout.to_hf(path, value)))
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
