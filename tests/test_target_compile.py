"""The real TPU and GPU compilers on this CPU host (compile-only devices): kernels, memory, refusals, sharding.

Nothing runs on a TPU or GPU here: each test compiles jaxsft's train step for a named target (jaxsft/targets.py)
in a subprocess (libtpu or the CUDA plugin is loaded only there) and reads the compiler's memory analysis or the
optimised program. TPU tests need libtpu (the `[test]` / `[tpu]` extra); NVIDIA tests need jax's CUDA plugin
wheels in the directory `JAXSFT_CUDA_PLUGIN_DIR` names (.ci/run installs them there: installed into the
environment itself, the plugin makes every jax start on a machine without a GPU print a CUDA traceback).
"""

import collections
import json
import math
import os
import re
import subprocess
import sys

import pytest

from jaxsft import targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(ROOT, 'jaxsft', 'assets', 'shapes')
GIB = 2**30
needs_tpu = pytest.mark.skipif(not targets.tpu_available(), reason="libtpu is not installed (pip install -e '.[tpu]')")
CUDA_PLUGIN_DIR = os.environ.get('JAXSFT_CUDA_PLUGIN_DIR', '')
needs_cuda_plugin = pytest.mark.skipif(not os.path.isdir(os.path.join(CUDA_PLUGIN_DIR, 'jax_plugins')),
                                       reason='no CUDA plugin directory (JAXSFT_CUDA_PLUGIN_DIR; see .ci/run)')


def _env(cuda: bool = False) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  if cuda:
    env['PYTHONPATH'] = os.pathsep.join(p for p in (CUDA_PLUGIN_DIR, env.get('PYTHONPATH', '')) if p)
  return env


def _dryrun(*args: str, cuda: bool = False) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'jaxsft.dryrun', *args], cwd=ROOT, env=_env(cuda), text=True,
                        capture_output=True, timeout=900, check=False)


def _table(stdout: str) -> dict[str, float]:
  """The memory table in MiB (its last column)."""
  return {m.group(1).strip(): float(m.group(3))
          for m in re.finditer(r'^([a-z ]+?)\s+([0-9.]+)\s+([0-9.]+)$', stdout, re.M)}


@needs_tpu
def test_tiny_default_compiles_for_v5e_8_with_splash():
  proc = _dryrun('--config', 'configs/tiny.py', '--topology', 'v5e-8')
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  m = re.fullmatch(r'peak ([0-9.]+) GiB of 15\.75 GiB per chip: fits \((\d+)% headroom\)', lines[-1])
  assert m, lines[-1]
  assert 'v5e-8 (8 × TPU v5 lite, topology v5e:2x4)' in proc.stdout
  assert 'attention splash (Pallas kernels in the program)' in proc.stdout, proc.stdout
  table = _table(proc.stdout)
  # 0.86M float32 parameters, replicated (mesh data=8): 3.3 MiB; Adam's two moments twice that.
  assert 3.0 < table['parameters'] < 3.6 and 6.0 < table['optimizer state'] < 7.2, table
  # 32 rows × 128 tokens per chip: the activations are tens to hundreds of MiB, not GiB.
  assert table['parameters'] + table['optimizer state'] < table['peak'] < 1024, table
  assert abs(float(m.group(1)) * 1024 - table['peak']) < 10


@needs_tpu
def test_step_too_big_for_the_chip_is_one_line_refusal():
  proc = _dryrun('--config', 'configs/tiny.py', '--topology', 'v5e-8', '--config.per_device_train_batch_size=4096')
  assert proc.returncode == 1, (proc.stdout[-2000:], proc.stderr[-2000:])
  assert 'Traceback' not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1, proc.stderr[-3000:]
  m = re.fullmatch(r'error: the step needs ([0-9.]+) GiB per chip, the v5e-8 has 15\.75 GiB \(.*\): try a smaller '
                   r'per_device_train_batch_size .*', errors[0])
  assert m and float(m.group(1)) > 15.75, errors[0]


@needs_tpu
def test_find_batch_bisects_the_largest_batch_that_fits():
  proc = _dryrun('--config', 'configs/tiny.py', '--topology', 'v5e-1', '--find_batch', '--config.max_length=4096',
                 '--config.global_batch_size=64')
  assert proc.returncode == 0, proc.stderr[-3000:]
  tries = dict(re.findall(r'^per_device_train_batch_size=(\d+): peak [0-9.]+ GiB per chip: (fits|does not fit)',
                          proc.stdout, re.M))
  best = int(re.search(r'^largest per_device_train_batch_size that fits: (\d+)$', proc.stdout, re.M).group(1))
  # Only batches that keep the 64-row step are tried (divisors of 64 on one chip); the answer fits, twice it not.
  assert set(map(int, tries)) <= {1, 2, 4, 8, 16, 32, 64} and len(tries) <= 4, tries
  assert tries[str(best)] == 'fits' and tries.get(str(2 * best)) == 'does not fit', (best, tries)
  assert 4 <= best <= 32, best  # ~0.3 GiB of activations per 4096-token row of the tiny model.


@needs_tpu
def test_unknown_slice_is_one_line_error():
  proc = _dryrun('--config', 'configs/tiny.py', '--topology', 'v5e-12')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --topology 'v5e-12': no such v5e slice (known: ")


def test_slice_names_map_to_libtpu_topologies():
  assert targets.parse('v5p-32') == ('v5p', 16, 1) and targets.parse('v4-8') == ('v4', 4, 1)
  assert targets.parse('v5e-256') == ('v5e', 256, 1) and targets.parse('v6e-1') == ('v6e', 1, 1)
  assert targets.parse('2xh100-8') == ('h100', 8, 2)
  for name in ('v5p-33', 'v5e-3', 'tpu-8', 'h100-16'):
    with pytest.raises(targets.InputError):
      targets.parse(name)
  assert {'v5e-1', 'v5e-8', 'v5e-256', 'v5p-8', 'v5p-1024', 'v6e-256', 'v4-8', 'h100-8'} <= set(targets.names())


@pytest.fixture(scope='module', params=[0, 256], ids=['untiled', 'mlp_tiles'])
def seven_b_program(tmp_path_factory, request):
  """Facts of the compiled train step of a 2-layer model at Qwen2.5-7B's width, FSDP over a v5p-8 (4 chips),
  bf16 compute, full remat, splash, 1 row of 1024 packed tokens per chip (segment ids are inputs); the MLP
  untiled, or in 4 tiles of 256 positions (model.mlp_chunk_size)."""
  tmp = tmp_path_factory.mktemp('tpu7b')
  with open(os.path.join(SHAPES, 'open-r1--Qwen2.5-Math-7B-RoPE-300k.json'), encoding='utf-8') as f:
    hf_cfg = json.load(f)
  hf_cfg.update(num_hidden_layers=2, max_window_layers=2)
  model_config = tmp / 'config.json'
  model_config.write_text(json.dumps(hf_cfg))
  out = tmp / 'facts.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'tests.helpers.tpu_program', str(out), 'v5p-8', str(model_config),
       '--config.model_name_or_path=shape-only', '--config.max_length=1024', '--config.per_device_train_batch_size=1',
       '--config.bf16=true', '--config.gradient_checkpointing=true', '--config.mesh.data=1', '--config.mesh.fsdp=-1',
       f'--config.model.mlp_chunk_size={request.param}'],
      cwd=ROOT, env=_env(), text=True, capture_output=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  facts = json.loads(out.read_text())
  facts.update(hlo=(tmp / 'facts.json.step.hlo').read_text(), mlp_chunk_size=request.param)
  return facts, hf_cfg


@needs_tpu
def test_fsdp_program_gathers_every_weight_and_keeps_state_sharded(seven_b_program):
  facts, hf_cfg = seven_b_program
  d, f, v = hf_cfg['hidden_size'], hf_cfg['intermediate_size'], hf_cfg['vocab_size']
  n, k, h = hf_cfg['num_attention_heads'], hf_cfg['num_key_value_heads'], d // hf_cfg['num_attention_heads']
  report = facts['report']
  assert report['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 1} and report['attention'] == 'splash'
  program = facts['programs']['step']
  assert program['splash'] and 'tpu_custom_call' in program['custom_calls']
  # ZeRO-3: every weight is held as a quarter and all-gathered whole (bf16, one layer of the scan at a time)
  # where it is used: q, k, v, o, gate/up, down and the lm_head.
  gathered = {tuple(c['shape']) for c in program['collectives'] if c['op'] == 'all-gather' and c['dtype'] == 'bf16'}
  for shape in [(1, d, n, h), (1, d, k, h), (1, n, h, d), (1, d, f), (1, f, d), (d, v)]:
    assert shape in gathered, (shape, sorted(gathered))
  # Parameters and Adam's moments stay partitioned: a quarter of 1.56B float32 parameters per chip, twice that.
  num_params = float(report['model'].split(' with ')[1].split('B')[0]) * 1e9
  assert abs(report['parameters'] - num_params * 4 / 4) / report['parameters'] < 0.01, report  # 4 B, 4 chips.
  assert abs(report['optimizer_state'] - 2 * report['parameters']) / report['parameters'] < 0.01, report
  # Every weight's gradient is reduce-scattered to its quarter where it is computed: on TPU a reduce-scatter is
  # an all-reduce and a dynamic-slice fused in an `all-reduce-scatter` computation, along a leading axis, so
  # o_proj (n, h, d) and down_proj (f, d), embed last, have theirs computed embed-first (models/projection.py):
  # per layer q and o as (d, n, h), k and v as (d, k, h), gate, up and down as (d, f); the lm_head once.
  reduced = [c for c in program['collectives'] if c['op'] == 'all-reduce']
  scattered = collections.Counter(tuple(c['shape']) for c in reduced
                                  if c['computation'].startswith('all-reduce-scatter'))
  assert scattered == {(d, n, h): 2, (d, k, h): 2, (d, f): 3, (d, v): 1}, scattered
  whole = [(c['dtype'], c['shape']) for c in reduced if math.prod(c['shape']) >= d * k * h
           and not c['computation'].startswith('all-reduce-scatter')]
  assert not whole, whole  # No weight gradient reduced whole (down_proj's was bf16[18944, 3584] per layer).
  # No [batch, length, vocab] float32 logits anywhere (per chip: 1 × 1024 × V): the loss is chunked.
  for shape in program['vocab_f32_shapes']:
    assert shape[:-1] != [1, 1024] and shape[:-1] != [1024] and 1024 not in shape, shape
  # The MLP's matmuls with an F-sized result, once each in the program (the layer scan's body): gate and up in the
  # forward, again in the backward's recomputation, d(silu(gate) * up); the three weight gradients. Tiled, the
  # same, over a tile's positions: the recomputed layer forward computes no MLP (its output is not needed).
  tokens = facts['mlp_chunk_size'] or 1024
  dots = collections.Counter(m.group(1) for m in re.finditer(rf'= bf16\[([0-9,]*{f}[0-9,]*)\]\S* (?:convolution|dot)\(',
                                                              facts['hlo']))
  assert dots == {f'{tokens},{f}': 5, f'{d},{f}': 3}, dots


@needs_cuda_plugin
def test_tiny_default_compiles_for_h100_8_and_refuses_an_oversized_step():
  # cuDNN flash attention needs the cuDNN library to compile (nvidia-cudnn-cu12, ~700 MB, not installed here):
  # 'auto' then compiles XLA attention for the H100 and says why.
  proc = _dryrun('--config', 'configs/tiny.py', '--topology', 'h100-8', '--config.bf16=true', cuda=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'h100-8 (8 × NVIDIA H100 80GB HBM3, topology 1x1x8), the GPU compiler' in proc.stdout, proc.stdout
  assert 'attention xla' in proc.stdout and 'auto uses xla, not cuDNN flash attention' in proc.stderr
  assert re.fullmatch(r'peak [0-9.]+ GiB of 79\.11 GiB per chip: fits \(\d+% headroom\)',
                      proc.stdout.strip().splitlines()[-1]), proc.stdout[-500:]
  big = _dryrun('--config', 'configs/tiny.py', '--topology', 'h100-8', '--config.bf16=true',
                '--config.per_device_train_batch_size=16384', cuda=True)
  assert big.returncode == 1 and 'Traceback' not in big.stderr, big.stderr[-3000:]
  assert re.search(r'^error: the step needs [0-9.]+ GiB per chip, the h100-8 has 79\.11 GiB ', big.stderr, re.M)
