"""LoRA adapters on the decoder's projections, computed, initialised, merged and saved as PEFT does.

A targeted projection (a `Dense` whose Hugging Face module name is in the run's targets: q_proj ... down_proj)
holds an `Adapter` in its `lora` attribute and computes

    y = x·W (+ bias) + scaling · (dropout(x)·A)·B

with W (and every other base weight) frozen, and only A [in..., r] and B [r, out...] trained (`LoRAParam`, a
subclass of `nnx.Param`: `nnx.split(model, LoRAParam, nnx.Param)` separates the trainable adapters from the frozen
base). `scaling` is alpha / r (alpha / sqrt(r) with rsLoRA). PEFT's A [r, in] and B [out, r] are ours transposed
and flattened the way the kernel is (jaxsft/models/hf_layout.py), so PEFT's tensor names map one to one:
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`.

Initialisation is PEFT's: A Kaiming-uniform (bound 1 / sqrt(in features), torch's `kaiming_uniform_(a=sqrt(5))`),
B zero, so a fresh adapter leaves the model's output unchanged. Each adapter's draw is keyed by the seed, its layer
and its module name, so scanned and unscanned layouts start from the same values.

Dropout (PEFT's `lora_dropout`, on the adapter input only) draws from the key that `dropout_key` puts in context
while the train step traces (the step derives it from the seed and the micro-batch number: a resumed run draws the
masks the uninterrupted one would have); each adapter folds in its own index and, under a layer scan, the layer's
(`layer_scope`). Without a key (eval, generation) dropout is off.

Why not qwix, which Tunix and MaxText use for LoRA: qwix adds adapters by intercepting the einsum / dot_general
calls a module makes. Here those calls sit inside `projection.einsum`'s custom VJP (the FSDP reduce-scatter on a
leading axis) and inside the tiled MLP's rematerialised loop, where an interception would put the adapter inside
the custom gradient; and PEFT's format needs, per Hugging Face module, an A and a B of known layout, which an
intercepted op does not name. This module is the adapter as a small NNX module called by `Dense`.
"""

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft.peft_config import TARGETS, Settings

RANK_AXIS = 'lora_rank'  # The logical name of the rank axis (no sharding rule: replicated).
LAYERS_AXIS = 'layers'  # transformer.LAYERS_AXIS (this module is imported by the model's modules, not the reverse).
PEFT_PREFIX = 'base_model.model.'

_DROPOUT_KEY = contextvars.ContextVar('lora_dropout_key', default=None)


class LoRAParam(nnx.Param):
  """An adapter weight: in a LoRA run, the only trained parameters."""


@contextlib.contextmanager
def dropout_key(key: jax.Array | None) -> Iterator[None]:
  """The key adapters draw their dropout masks from while a train step is traced (None: no dropout)."""
  token = _DROPOUT_KEY.set(key)
  try:
    yield
  finally:
    _DROPOUT_KEY.reset(token)


@contextlib.contextmanager
def layer_scope(layer_index: jax.Array) -> Iterator[None]:
  """Inside a layer scan's body: the layer's own dropout stream (its adapters share one traced body)."""
  key = _DROPOUT_KEY.get()
  with dropout_key(None if key is None else jax.random.fold_in(key, layer_index)):
    yield


@dataclasses.dataclass(frozen=True)
class Shape:
  """Where and how big one adapter is: its `Dense`'s path, layer (None: stacked or outside the layers), HF module
  name, A's and B's shapes and logical names (a leading 'layers' axis when the layers are stacked)."""
  path: tuple
  layer: int | None
  module: str
  stacked: int  # Layers stacked on a leading axis (0: none).
  a: tuple[int, ...]
  b: tuple[int, ...]
  a_names: tuple[str, ...]
  b_names: tuple[str, ...]
  fan_in: int
  fan_out: int


def split_spec(spec: str) -> tuple[str, str, int]:
  """A `Dense` einsum 'x,k->y' → (A's einsum, B's einsum, number of kernel input axes).

  The kernel's axes are its input axes (contracted with x) followed by its output axes; A replaces the output axes
  with the rank, B the input axes: 'btd,dnh->btnh' gives 'btd,dr->btr' and 'btr,rnh->btnh'.
  """
  inputs, out = spec.split('->')
  x_axes, k_axes = inputs.split(',')
  in_axes = ''.join(c for c in k_axes if c in x_axes)
  out_axes = ''.join(c for c in k_axes if c in out)
  if k_axes != in_axes + out_axes:
    raise ValueError(f'LoRA needs a kernel with its input axes first, got {spec!r}')
  rest = ''.join(c for c in x_axes if c not in in_axes)
  rank = next(c for c in 'rzyxwvuqpo' if c not in spec)
  return f'{x_axes},{in_axes}{rank}->{rest}{rank}', f'{rest}{rank},{rank}{out_axes}->{out}', len(in_axes)


class Adapter(nnx.Module):
  """scaling · (dropout(x)·A)·B for one projection (see the module docstring)."""

  def __init__(self, a: jax.Array, b: jax.Array, shape: Shape, spec: str, *, scaling: float, dropout: float,
               index: int, dtype: str):
    self.a = LoRAParam(a, out_sharding=shape.a_names, eager_sharding=False)
    self.b = LoRAParam(b, out_sharding=shape.b_names, eager_sharding=False)
    self.spec_a, self.spec_b, self.num_in = split_spec(spec)
    self.scaling = scaling
    self.dropout = dropout
    self.index = index
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    key = _DROPOUT_KEY.get()
    if self.dropout > 0 and key is not None:
      keep = jax.random.bernoulli(jax.random.fold_in(key, self.index), 1 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1 - self.dropout), 0).astype(x.dtype)
    h = jnp.einsum(self.spec_a, x, self.a[...].astype(self.dtype))
    return jnp.einsum(self.spec_b, h, self.b[...].astype(self.dtype)) * jnp.asarray(self.scaling, self.dtype)

  def delta(self) -> jax.Array:
    """scaling · A·B in the kernel's layout (stacked layers included), float32: what merging adds to W."""
    a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
    lead = a.ndim - self.num_in - 1  # 1 for stacked layers.
    a2 = a.reshape(a.shape[:lead] + (-1, a.shape[-1]))
    b2 = b.reshape(b.shape[:lead + 1] + (-1,))
    w = jnp.einsum('...ir,...ro->...io', a2, b2) * self.scaling
    return w.reshape(a.shape[:-1] + b.shape[lead + 1:])


def targets(model: nnx.Module, lora: Settings) -> list[tuple[tuple, nnx.Module]]:
  """The projections (`Dense` modules: path, module) that `lora`'s targets name, in the model's path order."""
  found = []
  for path, module in nnx.iter_modules(model):
    if path and path[-1] in lora.targets and hasattr(module, 'spec') and hasattr(module, 'kernel'):
      found.append((tuple(path), module))
  return sorted(found, key=lambda item: tuple(str(p) for p in item[0]))


def shape_of(path: tuple, dense: nnx.Module, lora: Settings) -> Shape:
  """The adapter shape of the projection `dense` at `path`."""
  _, _, n_in = split_spec(dense.spec)
  kernel_shape = tuple(dense.kernel.shape)
  stacked = len(kernel_shape) - len(dense.kernel_names)
  lead, names = kernel_shape[:stacked], tuple(dense.kernel_names)
  dims = kernel_shape[stacked:]
  in_dims, out_dims = dims[:n_in], dims[n_in:]
  layer_names = (LAYERS_AXIS,) * stacked
  layer = next((int(p) for p in path if isinstance(p, int) or str(p).isdigit()), None)
  return Shape(path=path, layer=layer, module=str(path[-1]), stacked=lead[0] if stacked else 0,
               a=lead + in_dims + (lora.r,), b=lead + (lora.r,) + out_dims,
               a_names=layer_names + names[:n_in] + (RANK_AXIS,), b_names=layer_names + (RANK_AXIS,) + names[n_in:],
               fan_in=math.prod(in_dims), fan_out=math.prod(out_dims))


def attach(model: nnx.Module, lora: Settings, values: Callable[[Shape], tuple], *, mlp_tiled: bool = False
           ) -> nnx.Module:
  """Puts an `Adapter` on every targeted projection of `model` (in place; returned), A and B from `values(shape)`
  (arrays, or ShapeDtypeStructs for an abstract model)."""
  found = targets(model, lora)
  if not found:
    raise ValueError(f'no projection of the model is named {", ".join(lora.targets)}')
  if mlp_tiled and any(path[-1] in ('gate_proj', 'up_proj', 'down_proj') for path, _ in found):
    raise ValueError('the tiled MLP (model.mlp_chunk_size) does not apply LoRA adapters')
  for index, (path, dense) in enumerate(found):
    shape = shape_of(path, dense, lora)
    a, b = values(shape)
    dense.lora = Adapter(a, b, shape, dense.spec, scaling=lora.scaling, dropout=lora.dropout, index=index,
                         dtype=dense.dtype)
  return model


def abstract_values(shape: Shape) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
  """`attach`'s values for an abstract model (float32 adapters, nothing allocated)."""
  return jax.ShapeDtypeStruct(shape.a, jnp.float32), jax.ShapeDtypeStruct(shape.b, jnp.float32)


def init_values(shape: Shape, seed: int) -> tuple[jax.Array, jax.Array]:
  """PEFT's init: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) per layer, keyed by (seed, layer, module); B zero."""
  bound = 1.0 / math.sqrt(shape.fan_in)
  per_layer = shape.a[1:] if shape.stacked else shape.a

  def draw(layer: int) -> jax.Array:
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), layer), TARGETS.index(shape.module))
    return jax.random.uniform(key, per_layer, jnp.float32, -bound, bound)

  a = jnp.stack([draw(i) for i in range(shape.stacked)]) if shape.stacked else draw(
      -1 if shape.layer is None else shape.layer)
  return a, jnp.zeros(shape.b, jnp.float32)


def merge(model: nnx.Module) -> nnx.Module:
  """`model` with every adapter folded into its kernel (W + scaling·A·B, in the kernel's dtype) and removed, in
  place: the plain model that the Hugging Face export writes."""
  for _, module in list(nnx.iter_modules(model)):
    adapter = getattr(module, 'lora', None)
    if isinstance(adapter, Adapter):
      kernel = module.kernel[...]
      module.kernel.set_value((kernel.astype(jnp.float32) + adapter.delta()).astype(kernel.dtype))
      module.lora = None
  return model


# ----------------------------------------------------------------------------------------------------------
# PEFT's tensors: names and layouts.


def peft_names(shape: Shape) -> list[tuple[int | None, str]]:
  """(layer index within a stack or None, PEFT tensor name stem) of the adapter(s) behind `shape`; the stem
  takes '.lora_A.weight' / '.lora_B.weight'."""
  def stem(layer_path) -> str:
    return PEFT_PREFIX + 'model.' + '.'.join(str(p) for p in layer_path)
  if shape.stacked:
    i = shape.path.index(LAYERS_AXIS)
    return [(k, stem(shape.path[:i + 1] + (k,) + shape.path[i + 1:])) for k in range(shape.stacked)]
  return [(None, stem(shape.path))]


def to_peft(shape: Shape, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
  """Our A and B (host arrays) → PEFT's tensors: lora_A.weight [r, in], lora_B.weight [out, r]."""
  out = {}
  for k, stem in peft_names(shape):
    a1, b1 = (a, b) if k is None else (a[k], b[k])
    out[stem + '.lora_A.weight'] = np.ascontiguousarray(a1.reshape(shape.fan_in, -1).T)
    out[stem + '.lora_B.weight'] = np.ascontiguousarray(b1.reshape(b1.shape[0], shape.fan_out).T)
  return out


def from_peft(shape: Shape, tensors: dict[str, np.ndarray], where: str) -> tuple[np.ndarray, np.ndarray]:
  """PEFT's tensors → our A and B of `shape` (float32); a ValueError naming the tensor that is missing or
  misshapen."""
  per_layer_a, per_layer_b = [], []
  lead = 1 if shape.stacked else 0
  in_dims, out_dims, r = shape.a[lead:-1], shape.b[lead + 1:], shape.a[-1]
  for _, stem in peft_names(shape):
    pair = []
    for part, expected in (('lora_A', (r, shape.fan_in)), ('lora_B', (shape.fan_out, r))):
      name = f'{stem}.{part}.weight'
      if name not in tensors:
        raise ValueError(f'{where}: tensor {name!r} is missing')
      if tuple(tensors[name].shape) != expected:
        raise ValueError(f'{where}: tensor {name!r} has shape {list(tensors[name].shape)}, expected {list(expected)}')
      pair.append(np.asarray(tensors[name], np.float32))
    per_layer_a.append(pair[0].T.reshape(tuple(in_dims) + (r,)))
    per_layer_b.append(pair[1].T.reshape((r,) + tuple(out_dims)))
  if shape.stacked:
    return np.stack(per_layer_a), np.stack(per_layer_b)
  return per_layer_a[0], per_layer_b[0]
