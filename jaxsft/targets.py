"""Compile-only devices of a named TPU slice or NVIDIA machine, for sizing a run from any CPU host.

`get('v5p-32')` returns a `Target`: the 16 chips of a v5p-32 as libtpu describes them
(`jax.experimental.topologies.get_topology_desc`), which `jit(...).lower(...).compile()` compiles for with the
real TPU compiler (memory analysis, Pallas kernels and HBM limits are the chip's), though nothing can run on them.
NVIDIA targets (`h100-8`, `2xh100-8`, `h200-8`, ...) come from XLA's GPU target description and the CUDA plugin
wheels (`jax[cuda12]`), without a GPU.

Names are the ones cloud users rent: `v4-8` … `v4-4096` and `v5p-8` … `v5p-…` count TensorCores (two per chip:
a v5p-32 has 16 chips, MaxText's `accelerator_to_spec_map.py`); `v5e-N` and `v6e-N` count chips (1 … 256).
`hbm_bytes` is the HBM a program may use per chip, as libtpu 0.0.42 reports it in its out-of-memory message
("exceeds available HBM (15.75G)"); NVIDIA figures are the cards' memory as the CUDA driver reports it.
"""

import dataclasses
import functools
import math
import os
import re

from jaxsft.errors import InputError
from jaxsft.errors import one_line

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
  """One TPU generation: how libtpu names its topologies and what one chip has."""
  prefix: str  # libtpu's topology prefix ('v5' is v5p).
  chip_config: str  # 'megacore' where two TensorCores act as one device (v4, v5p).
  cores_per_chip: int  # What the slice name counts: TensorCores (v4, v5p) or chips (v5e, v6e).
  hbm_bytes: int
  device_kind: str
  three_d: bool  # 3D torus (v4, v5p) or 2D (v5e, v6e).


GENERATIONS = {
    'v4': Generation('v4', 'megacore', 2, int(30.75 * GIB), 'TPU v4', True),
    'v5p': Generation('v5', 'megacore', 2, int(95.74 * GIB), 'TPU v5', True),
    'v5e': Generation('v5e', 'default', 1, int(15.75 * GIB), 'TPU v5 lite', False),
    'v6e': Generation('v6e', 'default', 1, int(31.25 * GIB), 'TPU v6 lite', False),
}

# 2D slices (v5e, v6e) by chip count, and 3D slices (v4, v5p) by chip count: the shapes Cloud TPU provisions.
_TOPOLOGY_2D = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16', 256: '16x16'}
_TOPOLOGY_3D = {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8', 192: '4x4x12',
                256: '4x8x8', 384: '4x8x12', 512: '8x8x8', 768: '8x8x12', 1024: '8x8x16', 2048: '8x16x16'}

# NVIDIA machines: (XLA target spec, device kind, memory per GPU as the driver reports it).
GPUS = {
    'h100': ('h100_sxm', 'NVIDIA H100 80GB HBM3', 84942979072),  # 79.11 GiB.
    'h200': ('h100_sxm', 'NVIDIA H200', int(139.8 * GIB)),  # Hopper like the H100, with 141 GB of HBM3e.
}


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # As the user wrote it ('v5p-32').
  platform: str  # 'tpu' | 'gpu'
  devices: tuple  # Compile-only jax devices, one per chip.
  hbm_bytes: int  # Per chip.
  device_kind: str
  topology: str  # libtpu's name ('v5:2x2x4') or 'NODESx1xGPUS' for NVIDIA.

  @property
  def num_chips(self) -> int:
    return len(self.devices)


def names() -> list[str]:
  """Every slice name `get` knows, for help texts and errors."""
  out = []
  for gen_name, gen in GENERATIONS.items():
    table = _TOPOLOGY_3D if gen.three_d else _TOPOLOGY_2D
    out += [f'{gen_name}-{chips * gen.cores_per_chip}' for chips in table]
  out += [f'{gpu}-8' for gpu in GPUS] + [f'Nx{gpu}-8' for gpu in GPUS]
  return out


def parse(name: str) -> tuple[str, int, int]:
  """'v5p-32' → ('v5p', 16 chips, 1); 'h100-8' → ('h100', 8, 1); '2xh100-8' → ('h100', 8 per node, 2 nodes)."""
  m = re.fullmatch(r'(?:(\d+)x)?([a-z0-9]+)-(\d+)', name.strip().lower())
  if not m:
    raise InputError(f'--topology {name!r}: expected a slice name such as v5e-8, v5p-32, v6e-16, h100-8 or 2xh100-8')
  nodes, kind, count = int(m.group(1) or 1), m.group(2), int(m.group(3))
  if kind in GENERATIONS:
    gen = GENERATIONS[kind]
    table = _TOPOLOGY_3D if gen.three_d else _TOPOLOGY_2D
    if nodes != 1 or count % gen.cores_per_chip or count // gen.cores_per_chip not in table:
      sizes = ', '.join(f'{kind}-{c * gen.cores_per_chip}' for c in table)
      raise InputError(f'--topology {name!r}: no such {kind} slice (known: {sizes})')
    return kind, count // gen.cores_per_chip, 1
  if kind in GPUS:
    if count < 1 or count > 8 or nodes < 1:
      raise InputError(f'--topology {name!r}: an NVIDIA target is NODESx{kind}-GPUS with 1 to 8 GPUs per node')
    return kind, count, nodes
  raise InputError(f"--topology {name!r}: unknown chip {kind!r} (known: {', '.join(list(GENERATIONS) + list(GPUS))})")


def _quiet_libtpu(accelerator_type: str) -> None:
  """libtpu's start-up lock and warnings: several compiling processes may coexist on one host."""
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', accelerator_type)
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')


def tpu_available() -> bool:
  """Whether libtpu (the `jax[tpu]` extra) is installed, so TPU targets can be compiled for."""
  try:
    import libtpu  # pylint: disable=import-outside-toplevel,unused-import
    return True
  except ImportError:
    return False


@functools.cache
def get(name: str) -> Target:
  """The compile-only devices of slice `name` (InputError for an unknown name or a missing compiler)."""
  kind, chips, nodes = parse(name)
  if kind in GPUS:
    return _gpu_target(name, kind, chips, nodes)
  gen = GENERATIONS[kind]
  if not tpu_available():
    raise InputError(f"--topology {name}: compiling for TPUs needs libtpu (pip install -e '.[tpu]')")
  _quiet_libtpu(f'{"v5litepod" if kind == "v5e" else kind}-{chips * gen.cores_per_chip}')
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  table = _TOPOLOGY_3D if gen.three_d else _TOPOLOGY_2D
  topology = f'{gen.prefix}:{table[chips]}'
  bounds = (1, 1, 1) if chips == 1 else (2, 2, 1)
  desc = topologies.get_topology_desc(topology_name=topology, platform='tpu', chip_config_name=gen.chip_config,
                                      chips_per_host_bounds=bounds, num_slices=1)
  devices = tuple(desc.devices)
  if len(devices) != chips:
    raise InputError(f'--topology {name}: libtpu gave {len(devices)} devices for {topology}, expected {chips}')
  return Target(name, 'tpu', devices, gen.hbm_bytes, devices[0].device_kind, topology)


def _gpu_target(name: str, kind: str, gpus: int, nodes: int) -> Target:
  spec_name, device_kind, hbm = GPUS[kind]
  spec = gpu_target_spec(spec_name)
  # Another card of the same architecture (H200: an H100 with more memory): its name and memory.
  spec = re.sub(r'"NVIDIA H100 80GB HBM3"', f'"{device_kind}"', spec)
  spec = re.sub(r'device_memory_size: \d+', f'device_memory_size: {hbm}', spec)
  try:
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    desc = topologies.get_topology_desc(platform='cuda', topology=f'{nodes}x1x{gpus}', target_config=spec)
  except Exception as e:  # pylint: disable=broad-except  (no CUDA plugin installed, or one that refuses)
    raise InputError(f"--topology {name}: compiling for NVIDIA GPUs needs jax's CUDA plugin "
                     f"(pip install -e '.[cuda]'): {one_line(e, 200)}") from None
  devices = tuple(desc.devices)
  return Target(name, 'gpu', devices, hbm, device_kind, f'{nodes}x1x{gpus}')


def gpu_target_spec(spec_name: str) -> str:
  """XLA's GPU target description (`GpuTargetConfigProto` text) shipped in jaxsft/assets/gpu_targets/."""
  path = os.path.join(os.path.dirname(__file__), 'assets', 'gpu_targets', f'{spec_name}.txtpb')
  with open(path, encoding='utf-8') as f:
    return f.read()


def peak_bytes(memory_analysis) -> int:
  """A compiled step's peak memory per chip: arguments + outputs not aliased to arguments + temporaries."""
  m = memory_analysis
  return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def hbm_overflow(error: BaseException) -> tuple[float, float] | None:
  """(GiB needed, GiB available) from the TPU compiler's out-of-memory error, or None for another error."""
  text = str(error)
  if 'RESOURCE_EXHAUSTED' not in text and 'Ran out of memory' not in text:
    return None
  m = re.search(r'\(([0-9.]+)([GMK])\) exceeds available HBM \(([0-9.]+)([GMK])\)', text)
  if not m:
    return math.nan, math.nan
  scale = {'G': 1, 'M': 2**-10, 'K': 2**-20}
  return float(m.group(1)) * scale[m.group(2)], float(m.group(3)) * scale[m.group(4)]
