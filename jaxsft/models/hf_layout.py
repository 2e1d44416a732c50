"""Our parameter paths and layouts ⇄ Hugging Face tensor names and layouts, stacked layers included.

Layouts: HF `nn.Linear.weight` is [out, in]; our kernels are [in..., out...] with heads split out
(q_proj [embed, q_heads, head_dim], o_proj [q_heads, head_dim, embed]), so conversion is a transpose and a
reshape. Names map `layers.3.mlp.up_proj.kernel` ⇄ `model.layers.3.mlp.up_proj.weight`; `lm_head.kernel`
⇄ `lm_head.weight`. With `scan_layers`, a stacked parameter (`layers.mlp.up_proj.kernel`, [L, ...]) holds
`model.layers.{i}.mlp.up_proj.weight` at index i: `tensors` lists the per-layer tensors behind it.

`read_block` reads one block of a parameter (a device's shard) from a safetensors file: our block mapped
through the transpose/reshape to the HF tensor's block, so a sharded load reads only its own shards.
"""

import math

import numpy as np

from jaxsft.models import safetensors_io
from jaxsft.models.transformer import LAYERS_AXIS


def hf_name(path: tuple) -> str:
  """NNX parameter path → HF tensor name."""
  *module, leaf = (str(p) for p in path)
  suffix = 'bias' if leaf == 'bias' else 'weight'
  if module == ['lm_head']:
    return 'lm_head.' + suffix
  return 'model.' + '.'.join(module) + '.' + suffix


def _num_in_axes(path: tuple) -> int:
  """How many leading kernel axes are the HF input features (o_proj's are heads × head_dim)."""
  return 2 if 'o_proj' in path else 1


def to_hf(path: tuple, value: np.ndarray) -> np.ndarray:
  """Our value of the parameter at `path` → its HF tensor (a kernel flattened and transposed to [out, in])."""
  if path[-1] == 'kernel':
    n_in = _num_in_axes(path)
    return np.ascontiguousarray(value.reshape(math.prod(value.shape[:n_in]), -1).T)
  if path[-1] == 'bias':
    return value.reshape(-1)
  return value


def hf_shape(path: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor shape of the parameter at `path` whose shape (ours) is `shape`."""
  if path[-1] == 'kernel':
    n_in = _num_in_axes(path)
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
  if path[-1] == 'bias':
    return (math.prod(shape),)
  return tuple(shape)


def from_hf(path: tuple, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """An HF tensor → our value of the parameter at `path`, of `shape` (a view of `tensor` where numpy can)."""
  if path[-1] == 'kernel':
    return tensor.T.reshape(shape)
  return tensor.reshape(shape)


def is_stacked(path: tuple) -> bool:
  """Whether `path` is a parameter of scanned layers ('layers', 'mlp', ...: no layer index after 'layers')."""
  return len(path) > 1 and path[0] == LAYERS_AXIS and not isinstance(path[1], int)


def tensors(path: tuple, shape: tuple[int, ...]) -> list[tuple[str, tuple, tuple[int, ...]]]:
  """(HF name, one-layer path, one-layer shape) of each HF tensor behind the parameter at `path`.

  One entry for an ordinary parameter; for a stacked one, an entry per layer i, in layer order, whose path
  carries the index ('layers', i, ...) and whose shape drops the leading layer axis.
  """
  if not is_stacked(path):
    return [(hf_name(path), path, tuple(shape))]
  layer_paths = [(path[0], i, *path[1:]) for i in range(shape[0])]
  return [(hf_name(p), p, tuple(shape[1:])) for p in layer_paths]


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
  """`from_hf(path, tensor, shape)[index]` cast to `dtype`, reading only that block's slice of the HF tensor.

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
