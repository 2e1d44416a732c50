"""Multi-process start-up: joins the jax.distributed cluster of a TPU pod, a GPU cluster or a CPU test run.

`initialize()` is called once at the start of a run, before anything touches jax devices. Where the run
is decides how the cluster is found (`detect`):

- explicit environment variables, anywhere (GPU clusters without SLURM, several CPU processes on one
  machine in the tests): `JAXSFT_COORDINATOR_ADDRESS` (host:port of process 0), `JAXSFT_NUM_PROCESSES`,
  `JAXSFT_PROCESS_ID` and optionally `JAXSFT_LOCAL_DEVICE_IDS` (comma-separated, e.g. `0,1`);
- SLURM jobs of more than one task: jax's own SlurmCluster (coordinator on the first node of the step);
  one GPU per task when a node runs several tasks, all of the node's GPUs when it runs one;
- Cloud TPU VMs of more than one host (pods, multislice): `jax.distributed.initialize()` with no
  arguments, jax's own TPU detection (GKE's `TPU_WORKER_HOSTNAMES`, `MEGASCALE_*`, or the GCE metadata
  server);
- anything else is a single process: nothing to do.

CPU processes exchange collectives through gloo (jax's default `jax_cpu_collectives_implementation`).
Calling `initialize()` again does nothing. A malformed variable raises `InputError` naming it.
"""

import dataclasses
import glob
import logging
import os
import re
from collections.abc import Mapping

import jax

from jaxsft.errors import InputError

ADDRESS = 'JAXSFT_COORDINATOR_ADDRESS'
NUM_PROCESSES = 'JAXSFT_NUM_PROCESSES'
PROCESS_ID = 'JAXSFT_PROCESS_ID'
LOCAL_DEVICE_IDS = 'JAXSFT_LOCAL_DEVICE_IDS'
_EXPLICIT = (ADDRESS, NUM_PROCESSES, PROCESS_ID, LOCAL_DEVICE_IDS)
_SLURM = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')
# Set on multi-host TPU jobs launched by GKE / queued resources (jax's GkeTpuCluster and BaseTpuCluster).
_TPU_HOSTS = ('TPU_PROCESS_ADDRESSES', 'TPU_WORKER_HOSTNAMES')

PCI_DEVICES = '/sys/bus/pci/devices'
_GOOGLE_PCI_VENDOR = '0x1ae0'
_logger = logging.getLogger(__name__)
_initialized = False


@dataclasses.dataclass(frozen=True)
class Cluster:
  """How to join: `source` says who found it; None fields are left to jax's auto-detection."""
  source: str  # 'env' | 'slurm' | 'tpu'
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None


def detect(environ: Mapping[str, str] | None = None) -> Cluster | None:
  """The cluster this process belongs to, or None for a single-process run. Touches no jax device."""
  environ = os.environ if environ is None else environ
  if any(environ.get(k) for k in _EXPLICIT):
    return _from_explicit(environ)
  if all(k in environ for k in _SLURM) and _int(environ, 'SLURM_NTASKS', minimum=1) > 1:
    return _from_slurm(environ)
  if _tpu_process_count(environ) > 1:
    return Cluster('tpu')
  return None


def initialize(environ: Mapping[str, str] | None = None) -> None:
  """Joins the cluster `detect` finds (once per process); logs one line from process 0 when it did."""
  global _initialized
  if _initialized or jax.distributed.is_initialized():
    _initialized = True
    return
  cluster = detect(environ)
  if cluster is None:
    _initialized = True
    return
  if cluster.source == 'tpu':
    jax.distributed.initialize()
  else:
    ids = list(cluster.local_device_ids) if cluster.local_device_ids is not None else None
    jax.distributed.initialize(cluster.coordinator_address, cluster.num_processes, cluster.process_id,
                               local_device_ids=ids, cluster_detection_method='deactivate')
  _initialized = True
  from jaxsft import metrics  # pylint: disable=import-outside-toplevel  (imports flax; only when needed)
  metrics.log(f'jax.distributed ({cluster.source}): {jax.process_count()} processes, {jax.device_count()} '
              f'{jax.devices()[0].platform} devices ({jax.local_device_count()} per process), '
              f'coordinator {cluster.coordinator_address or "found by jax"}')


def _from_explicit(environ: Mapping[str, str]) -> Cluster | None:
  for name in (ADDRESS, NUM_PROCESSES, PROCESS_ID):
    if not environ.get(name):
      present = ', '.join(k for k in _EXPLICIT if environ.get(k))
      raise InputError(f'environment variable {name} is not set (needed with {present}): set '
                       f'{ADDRESS}=host:port, {NUM_PROCESSES} and {PROCESS_ID} together')
  address = environ[ADDRESS].strip()
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise InputError(f'environment variable {ADDRESS}: expected host:port, got {address!r}')
  num = _int(environ, NUM_PROCESSES, minimum=1)
  pid = _int(environ, PROCESS_ID, minimum=0)
  if pid >= num:
    raise InputError(f'environment variable {PROCESS_ID}: {pid} is not below {NUM_PROCESSES}={num}')
  ids = None
  if environ.get(LOCAL_DEVICE_IDS):
    try:
      ids = tuple(int(x) for x in environ[LOCAL_DEVICE_IDS].split(','))
    except ValueError:
      raise InputError(f'environment variable {LOCAL_DEVICE_IDS}: expected comma-separated device ids such as '
                       f'0,1, got {environ[LOCAL_DEVICE_IDS]!r}') from None
  if num == 1 and ids is None:
    return None  # One process: there is no cluster to join.
  return Cluster('env', address, num, pid, ids)


def _from_slurm(environ: Mapping[str, str]) -> Cluster:
  """jax's SlurmCluster, read from `environ`: the coordinator is the step's first node."""
  job = _int(environ, 'SLURM_JOB_ID', minimum=0)
  port = environ.get('JAX_COORDINATOR_PORT') or str(job % 2**12 + (65535 - 2**12 + 1))
  nodes = environ['SLURM_STEP_NODELIST']  # 'node001', 'node001,host2', 'node[001-015],host2', 'node[001,007]'.
  head = nodes.split(',')[0]
  if '[' in head:
    prefix, _, ranges = nodes.partition('[')
    head = prefix + re.split('[],-]', ranges)[0]
  num = _int(environ, 'SLURM_NTASKS', minimum=1)
  num_nodes = _int(environ, 'SLURM_STEP_NUM_NODES', minimum=1) if environ.get('SLURM_STEP_NUM_NODES') else num
  # Several tasks on a node: one GPU each (jax's SLURM convention). One task per node: all its GPUs.
  ids = (_int(environ, 'SLURM_LOCALID', minimum=0),) if num > num_nodes else None
  return Cluster('slurm', f'{head}:{port}', num, _int(environ, 'SLURM_PROCID', minimum=0), ids)


def _tpu_process_count(environ: Mapping[str, str]) -> int:
  """Hosts × slices of a Cloud TPU job from its environment or the GCE metadata server; 1 elsewhere."""
  slices = _int(environ, 'MEGASCALE_NUM_SLICES', minimum=1) if environ.get('MEGASCALE_NUM_SLICES') else 1
  hosts = next((environ[k] for k in _TPU_HOSTS if environ.get(k)), None)
  if hosts is not None:
    return len(hosts.split(',')) * slices
  if not _in_cloud_tpu_vm() or environ.get('TPU_SKIP_MDS_QUERY'):
    return slices
  try:  # A GCE TPU VM: the workers are listed in its metadata, as jax's GceTpuCluster reads them.
    from jax._src.clusters import cloud_tpu_cluster  # pylint: disable=import-outside-toplevel
    return cloud_tpu_cluster.GceTpuCluster.get_process_count()
  except Exception as e:  # pylint: disable=broad-except
    # A TPU VM whose metadata cannot be read (or a jax that moved its private GceTpuCluster): let jax decide (it
    # works for one host as well as many).
    _logger.warning('could not read the TPU worker list from the metadata server (%s); calling '
                    'jax.distributed.initialize() anyway', e)
    return 2


def _in_cloud_tpu_vm() -> bool:
  """Whether this machine has Cloud TPU chips: jax's own check (private: `jax._src.cloud_tpu_init`), else, where a
  jax release has moved it, a Google TPU (PCI vendor 0x1ae0) on the PCI bus, which is what that check reads."""
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=import-outside-toplevel
    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
  except (ImportError, AttributeError):
    pass
  for vendor in glob.glob(os.path.join(PCI_DEVICES, '*', 'vendor')):
    try:
      with open(vendor, encoding='ascii') as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def _int(environ: Mapping[str, str], name: str, *, minimum: int) -> int:
  value = environ.get(name, '').strip()
  try:
    number = int(value)
  except ValueError:
    number = None
  if number is None or number < minimum:
    raise InputError(f'environment variable {name}: expected an integer >= {minimum}, got {value!r}')
  return number


def gather_text(text: str, *, limit: int = 2000) -> list[str]:
  """Every process's `text` (cut to `limit` UTF-8 bytes), in process order; with one process, `[text]`.

  Every process must call it (it is a collective): a verdict reached on one process (a lock refused, a
  corrupted file) reaches all of them, so none goes on alone into the next collective.
  """
  if jax.process_count() == 1:
    return [text]
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  data = np.frombuffer(text.encode()[:limit].ljust(limit, b'\0'), np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(data)).reshape(jax.process_count(), limit)
  return [bytes(row).rstrip(b'\0').decode(errors='replace') for row in rows]
