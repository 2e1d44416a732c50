"""The device mesh, the logical-axis rules, and the shardings of batches, parameters and optimizer state.

The mesh has three named axes, `data`, `fsdp` and `tensor` (config.mesh; -1 fills the remaining devices).
Batches are split over `data` × `fsdp`. Every parameter carries logical axis names (models/projection.py `param`);
`RULES` maps them to mesh axes:

* `embed` → `fsdp`: ZeRO-3 / FSDP. Every weight has an embed dimension, so parameters, their gradients and
  the optimizer state (created with the parameters' shardings) are all partitioned over `fsdp`; XLA
  all-gathers a layer's weights where it is used and reduce-scatters its gradient.
* `q_heads`, `kv_heads`, `mlp`, `vocab` → `tensor`: Megatron-style tensor parallelism of attention heads, the
  MLP's hidden dimension and the vocabulary.
* `head_dim`, `norm` → replicated.
* `layers` (the stacked-layer axis of `scan_layers`) → replicated: the scan walks it, so each device holds
  every layer's FSDP/tensor shard, exactly what it holds of the unstacked layers.

A dimension that does not divide its mesh axis (say 4 key/value heads over tensor=8) is replicated instead,
with one logged warning per parameter name, so a mesh never fails for a shape.
"""

import math
import re

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxsft.errors import InputError

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Resolves -1 entries of config.mesh to the remaining devices; checks the product."""
  sizes = [int(mesh_cfg[a]) for a in AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise InputError(f'config.mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}')
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise InputError(f'config.mesh {dict(zip(AXES, sizes))}: {num_devices} devices are not divisible by {fixed}')
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise InputError(f'config.mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, '
                     f'but there are {num_devices}')
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_size_multiple(mesh: Mesh) -> int:
  """The global batch must be a multiple of this (devices along the batch axes)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def global_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """This process's rows → global arrays split over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


RULES = (
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('q_heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('head_dim', None),
    ('norm', None),
    ('layers', None),
)


def logical_to_spec(names: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, rules=RULES, *,
                    warn=None, where: str = '') -> P:
  """The PartitionSpec of an array with these logical axis names under `rules` on `mesh`.

  Unknown names and axes of size 1 are replicated; a dimension that the mesh axis does not divide is
  replicated with a warning (via `warn`); a mesh axis is used at most once per array.
  """
  table = dict(rules)
  used, spec = set(), []
  for name, dim in zip(names, shape):
    axis = table.get(name)
    size = mesh.shape[axis] if axis in mesh.shape else 1
    if axis is None or size == 1 or axis in used:
      spec.append(None)
      continue
    if dim % size:
      if warn:
        warn(f'sharding: {where or "a parameter"} axis {name!r} of size {dim} does not divide mesh axis '
             f'{axis!r} of size {size}; it is replicated')
      spec.append(None)
      continue
    used.add(axis)
    spec.append(axis)
  return P(*spec)


def _path_name(path) -> str:
  """'layers.3.self_attn.k_proj.kernel' → 'layers.*.self_attn.k_proj.kernel' (one warning for all layers)."""
  name = '.'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
  return re.sub(r'\.\d+\.', '.*.', name)


def param_shardings(params, mesh: Mesh, rules=RULES, *, warn=None):
  """The NamedSharding of every parameter (a tree of the same structure as `params`, an nnx State)."""
  warned = set()

  def once(message):
    if warn and message not in warned:
      warned.add(message)
      warn(message)

  def one(path, variable):
    shape = variable.get_value().shape
    names = variable.get_metadata().get('out_sharding') or (None,) * len(shape)
    spec = logical_to_spec(tuple(names), shape, mesh, rules, warn=once, where=_path_name(path))
    return variable.replace(NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def bytes_per_device(tree) -> int:
  """Bytes of `tree`'s arrays held by one device (the largest shard of each array, summed)."""
  total = 0
  for x in jax.tree.leaves(tree):
    sharding = getattr(x, 'sharding', None)
    shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


def gather_to_host(tree):
  """Every array of `tree` whole, as numpy on every process, one array at a time (bounded device memory)."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(one, tree)


def constrain_batch(x: jax.Array) -> jax.Array:
  """Pins an activation's leading (batch) axis to the batch mesh axes, the other axes unsharded.

  Without it, XLA may keep FSDP's embed-sharded layout for activations and replicate the batch instead,
  multiplying every device's activation memory by the fsdp size. Outside a mesh (tests, decoding) a no-op.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, P(BATCH_AXES, *([None] * (x.ndim - 1))))


def current_spec(names: tuple[str | None, ...], shape: tuple[int, ...]) -> P | None:
  """The PartitionSpec `RULES` give an array of these logical names on the current mesh; None without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(AXES) <= set(mesh.axis_names):
    return None
  return logical_to_spec(names, shape, mesh)
