"""The device mesh and the shardings of batches and parameters.

The mesh has three named axes, `data`, `fsdp` and `tensor` (config.mesh; -1 fills the remaining
devices). Batches are split over `data` × `fsdp`. Parameters and optimizer state are replicated for now:
pure data parallelism. The logical-axis rules that shard them over `fsdp` (ZeRO-3) and `tensor` come with
the sharding issue; every parameter already carries logical axis names for them.
"""

import math

import jax
import numpy as np
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
    raise InputError(f'config.mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, but there are {num_devices}')
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
