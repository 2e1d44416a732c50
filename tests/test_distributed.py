"""jaxsft.distributed: finding the cluster from the environment, and a real 2-process training run.

The slow test trains configs/tiny.py through the command line as 2 processes × 4 CPU devices (joined by
JAXSFT_* variables, gloo collectives) and as 1 process × 8 devices: the per-step metrics and the exported
weights agree, and only process 0 writes the output directory and prints the run's log lines.
"""

import subprocess
import sys

import numpy as np
import pytest

from jaxsft import distributed
from jaxsft.errors import InputError
from tests.helpers import processes
from tests.helpers import runs as runs_lib

EXPLICIT = {'JAXSFT_COORDINATOR_ADDRESS': '10.0.0.1:1234', 'JAXSFT_NUM_PROCESSES': '4', 'JAXSFT_PROCESS_ID': '3'}
SLURM = {'SLURM_JOB_ID': '123', 'SLURM_NTASKS': '16', 'SLURM_PROCID': '5', 'SLURM_LOCALID': '5',
         'SLURM_STEP_NUM_NODES': '2'}


def test_single_process_environments_need_no_cluster():
  assert distributed.detect({}) is None
  assert distributed.detect({'TPU_WORKER_HOSTNAMES': 'host0'}) is None  # A one-host TPU VM.
  assert distributed.detect({**SLURM, 'SLURM_STEP_NODELIST': 'n1', 'SLURM_NTASKS': '1',
                             'SLURM_STEP_NUM_NODES': '1'}) is None
  assert distributed.detect({**EXPLICIT, 'JAXSFT_NUM_PROCESSES': '1', 'JAXSFT_PROCESS_ID': '0'}) is None


def test_explicit_variables():
  cluster = distributed.detect({**EXPLICIT, 'JAXSFT_LOCAL_DEVICE_IDS': '2,3'})
  assert cluster == distributed.Cluster('env', '10.0.0.1:1234', 4, 3, (2, 3))
  # They take precedence over a SLURM allocation the job happens to run in.
  assert distributed.detect({**SLURM, 'SLURM_STEP_NODELIST': 'n1', **EXPLICIT}).source == 'env'


@pytest.mark.parametrize('env, variable', [
    ({'JAXSFT_NUM_PROCESSES': '2', 'JAXSFT_PROCESS_ID': '0'}, 'JAXSFT_COORDINATOR_ADDRESS'),
    ({'JAXSFT_COORDINATOR_ADDRESS': 'h:1', 'JAXSFT_PROCESS_ID': '0'}, 'JAXSFT_NUM_PROCESSES'),
    ({**EXPLICIT, 'JAXSFT_COORDINATOR_ADDRESS': 'host'}, 'JAXSFT_COORDINATOR_ADDRESS'),
    ({**EXPLICIT, 'JAXSFT_NUM_PROCESSES': 'two'}, 'JAXSFT_NUM_PROCESSES'),
    ({**EXPLICIT, 'JAXSFT_PROCESS_ID': '4'}, 'JAXSFT_PROCESS_ID'),
    ({**EXPLICIT, 'JAXSFT_PROCESS_ID': '-1'}, 'JAXSFT_PROCESS_ID'),
    ({**EXPLICIT, 'JAXSFT_LOCAL_DEVICE_IDS': '0;1'}, 'JAXSFT_LOCAL_DEVICE_IDS'),
])
def test_bad_variables_name_the_variable(env, variable):
  with pytest.raises(InputError, match=f'^environment variable {variable}[: ]') as info:
    distributed.detect(env)
  assert '\n' not in str(info.value)


@pytest.mark.parametrize('nodelist', ['gpu007', 'gpu007,other3', 'gpu[007-015],other3', 'gpu[007,009-015]'])
def test_slurm_coordinator_is_the_one_jax_picks(nodelist, monkeypatch):
  from jax._src.clusters import slurm_cluster
  env = {**SLURM, 'SLURM_STEP_NODELIST': nodelist}
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  monkeypatch.delenv('JAX_COORDINATOR_PORT', raising=False)
  cluster = distributed.detect(env)
  assert cluster.coordinator_address == slurm_cluster.SlurmCluster.get_coordinator_address(None, None)
  assert cluster.coordinator_address.startswith('gpu007:')
  assert (cluster.num_processes, cluster.process_id) == (16, 5)


def test_slurm_gpus_per_task():
  several = distributed.detect({**SLURM, 'SLURM_STEP_NODELIST': 'n[1-2]'})  # 8 tasks per node: one GPU each.
  assert several.local_device_ids == (5,)
  one = distributed.detect({**SLURM, 'SLURM_STEP_NODELIST': 'n[1-2]', 'SLURM_NTASKS': '2', 'SLURM_PROCID': '1',
                            'SLURM_LOCALID': '0'})
  assert one.local_device_ids is None and one.num_processes == 2  # One task per node: all of its GPUs.


def test_multi_host_tpu_is_left_to_jax():
  assert distributed.detect({'TPU_WORKER_HOSTNAMES': 'h0,h1,h2,h3'}) == distributed.Cluster('tpu')
  assert distributed.detect({'TPU_WORKER_HOSTNAMES': 'h0', 'MEGASCALE_NUM_SLICES': '2'}).source == 'tpu'


def test_tpu_vm_detection_without_jaxs_private_module(monkeypatch, tmp_path):
  """Where a jax release no longer has `jax._src.cloud_tpu_init` (or its GceTpuCluster), a TPU VM is still
  recognised from its PCI bus (Google's vendor id, what jax's check reads) and the cluster left to jax; a
  machine without TPU chips stays a single process."""
  import jax._src  # pylint: disable=import-outside-toplevel
  for name in ('cloud_tpu_init', 'clusters'):
    monkeypatch.delattr(jax._src, name, raising=False)
    monkeypatch.setitem(sys.modules, f'jax._src.{name}', None)
  monkeypatch.setitem(sys.modules, 'jax._src.clusters.cloud_tpu_cluster', None)
  for i, vendor in enumerate(('0x8086', '0x10de')):
    (tmp_path / f'0000:00:0{i}.0').mkdir()
    (tmp_path / f'0000:00:0{i}.0' / 'vendor').write_text(vendor + '\n')
  monkeypatch.setattr(distributed, 'PCI_DEVICES', str(tmp_path))
  assert distributed.detect({}) is None
  (tmp_path / '0000:00:05.0').mkdir()
  (tmp_path / '0000:00:05.0' / 'vendor').write_text('0x1ae0\n')
  assert distributed.detect({}) == distributed.Cluster('tpu')
  assert distributed.detect({'TPU_SKIP_MDS_QUERY': '1'}) is None


def test_initialize_without_a_cluster_does_nothing_and_is_idempotent(monkeypatch):
  import jax
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *a, **k: calls.append((a, k)))
  monkeypatch.setattr(distributed, '_initialized', False)
  distributed.initialize({})
  distributed.initialize(EXPLICIT)  # Already initialised: the environment is not even read again.
  assert calls == [] and not jax.distributed.is_initialized()


def test_initialize_passes_the_cluster_to_jax(monkeypatch):
  import jax
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *a, **k: calls.append((a, k)))
  monkeypatch.setattr(distributed, '_initialized', False)
  distributed.initialize({**EXPLICIT, 'JAXSFT_LOCAL_DEVICE_IDS': '1'})
  assert calls == [(('10.0.0.1:1234', 4, 3), {'local_device_ids': [1], 'cluster_detection_method': 'deactivate'})]
  monkeypatch.setattr(distributed, '_initialized', False)
  distributed.initialize({'TPU_WORKER_HOSTNAMES': 'h0,h1'})
  assert calls[1] == ((), {})  # TPU pods: jax finds everything itself.


def test_cli_reports_a_bad_variable_in_one_line():
  env = runs_lib.environment(isolated=True, JAXSFT_NUM_PROCESSES='2', JAXSFT_PROCESS_ID='0')
  proc = runs_lib.train_cli('configs/tiny.py', env=env, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith('error: environment variable JAXSFT_COORDINATOR_ADDRESS ')


# ----------------------------------------------------------------------------------------------------------
# Two real processes.

NUM_ROWS = 64
RUN_FLAGS = ['--config', 'configs/tiny.py', '--config.max_steps=4', '--config.logging_steps=1',
             '--config.per_device_train_batch_size=2', '--config.bf16=false', '--config.gradient_checkpointing=false',
             '--config.accuracy_eval_problems=0', '--config.disable_tqdm=true', '--config.seed=7']


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """{'ref': 1 process × 8 devices, 'p0', 'p1': the two processes of a 2 × 4 run} → (output dir, stderr)."""
  root = tmp_path_factory.mktemp('distributed')
  data_file = processes.write_synthetic_jsonl(root / 'train.jsonl', NUM_ROWS, seed=11)
  base = runs_lib.environment(isolated=True)
  port = processes.free_port()
  # Each process has its own data-index cache, as hosts do: the runs start at the same time and a process
  # must not find an index that another run has just written (its peer would still be building one).
  envs = {'ref': {**base, 'JAX_NUM_CPU_DEVICES': '8', 'JAXSFT_CACHE_DIR': str(root / 'cache_ref')}}
  for p in range(2):
    envs[f'p{p}'] = {**base, 'JAX_NUM_CPU_DEVICES': '4', 'JAXSFT_CACHE_DIR': str(root / f'cache_p{p}'),
                     'JAXSFT_COORDINATOR_ADDRESS': f'127.0.0.1:{port}', 'JAXSFT_NUM_PROCESSES': '2',
                     'JAXSFT_PROCESS_ID': str(p)}
  # Both processes write to one output_dir (each writes its checkpoint shards there), as on a shared filesystem.
  outs = {'ref': root / 'ref', 'p0': root / 'two', 'p1': root / 'two'}
  errs = processes.run_all({name: (runs_lib.argv('jaxsft.train', *RUN_FLAGS, f'--config.dataset_name={data_file}',
                                                 f'--config.output_dir={outs[name]}'), env)
                            for name, env in envs.items()}, cwd=runs_lib.ROOT)
  return {name: (outs[name], err) for name, err in errs.items()}


_metrics = runs_lib.metrics


@pytest.mark.slow
def test_two_processes_train_the_same_curve_as_one(runs):
  ref, two = _metrics(runs['ref'][0]), _metrics(runs['p0'][0])
  assert [r['step'] for r in two] == [r['step'] for r in ref] == [1, 2, 3, 4]
  assert [r['num_tokens'] for r in two] == [r['num_tokens'] for r in ref]
  for key in ('loss', 'grad_norm', 'mean_token_accuracy', 'learning_rate'):
    np.testing.assert_allclose([r[key] for r in two], [r[key] for r in ref], rtol=0, atol=1e-5, err_msg=key)
  assert ref[-1]['loss'] < ref[0]['loss'] - 0.1  # The curve moves: equal curves are not equal constants.
  resolved = runs_lib.resolved(runs['p0'][0])
  assert (resolved['num_processes'], resolved['num_devices']) == (2, 8)


@pytest.mark.slow
def test_two_processes_export_the_same_weights_as_one(runs):
  ref = runs_lib.hf_weights(runs['ref'][0])
  two = runs_lib.hf_weights(runs['p0'][0])
  assert sorted(two) == sorted(ref)
  for name in ref:
    np.testing.assert_allclose(two[name], ref[name], rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_only_process_zero_logs_and_both_write_one_checkpoint(runs):
  (out0, err0), (out1, err1) = runs['p0'], runs['p1']
  assert out0 == out1
  for name in ('config.json', 'metrics.jsonl', 'hf', 'tokenizer', 'checkpoints/4'):
    assert (out0 / name).exists(), name
  # The final checkpoint holds both processes' shards (OCDBT: one sub-database per process).
  assert sorted(p.name for p in (out0 / 'checkpoints' / '4' / 'state').glob('ocdbt.process_*')) == [
      'ocdbt.process_0', 'ocdbt.process_1']
  assert not [p for p in out0.iterdir() if p.name.startswith('.shared-check')]
  assert 'jax.distributed (env): 2 processes, 8 cpu devices (4 per process)' in err0
  for marker in ('jax.distributed', 'data: ', 'training ', 'step=1 ', 'exported'):
    assert marker in err0, marker
    assert marker not in err1, marker


@pytest.mark.slow
def test_processes_that_do_not_share_the_output_dir_fail_with_one_line(tmp_path):
  """Each process writes its checkpoint shards to output_dir: a per-process path (or a host-local disk) is refused
  before any work, naming the field, instead of hanging in the first checkpoint."""
  data_file = processes.write_synthetic_jsonl(tmp_path / 'train.jsonl', 8, seed=1)
  base = runs_lib.environment(isolated=True, JAX_NUM_CPU_DEVICES='1')
  port = processes.free_port()
  procs = [subprocess.Popen(
      runs_lib.argv('jaxsft.train', *RUN_FLAGS, f'--config.dataset_name={data_file}',
                    f'--config.output_dir={tmp_path / f"p{p}"}'), cwd=runs_lib.ROOT, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True, env={**base, 'JAXSFT_COORDINATOR_ADDRESS': f'127.0.0.1:{port}',
                                              'JAXSFT_NUM_PROCESSES': '2', 'JAXSFT_PROCESS_ID': str(p)})
           for p in range(2)]
  try:
    errs = [proc.communicate(timeout=120)[1] for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  assert [proc.returncode for proc in procs] == [2, 2], errs
  last = errs[0].strip().splitlines()[-1]
  assert last.startswith("error: config field 'output_dir': process(es) 1 do not see "), last
  assert not (tmp_path / 'p0' / 'checkpoints').exists() and not (tmp_path / 'p1').exists()
