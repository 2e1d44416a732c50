"""`python -m jaxsft.dryrun`: compile a config's step at its real shape on simulated devices, print memory."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dryrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  return subprocess.run([sys.executable, '-m', 'jaxsft.dryrun', *args], cwd=ROOT, env=env, text=True,
                        capture_output=True, timeout=timeout, check=False)


def _table(stdout: str) -> dict[str, float]:
  """The memory table in MiB (its last column)."""
  return {m.group(1).strip(): float(m.group(3))
          for m in re.finditer(r'^([a-z ]+?)\s+([0-9.]+)\s+([0-9.]+)$', stdout, re.M)}


def test_tiny_dry_run_partitions_parameters_over_fsdp():
  one = _dryrun('--config', 'configs/tiny.py', '--devices', '1', '--config.per_device_train_batch_size=8')
  eight = _dryrun('--config', 'configs/tiny.py', '--devices', '8', '--config.mesh.data=1', '--config.mesh.fsdp=8',
                  '--config.per_device_train_batch_size=1')
  for proc in (one, eight):
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'step temporaries' in proc.stdout and '\npeak ' in proc.stdout
  assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in eight.stdout and '8 rows × 256 tokens' in eight.stdout
  a, b = _table(one.stdout), _table(eight.stdout)
  assert a['parameters'] > 0 and a['parameters'] / 8 * 0.98 <= b['parameters'] < a['parameters'] / 8 * 1.1


def test_unknown_model_shape_is_one_line_error():
  proc = _dryrun('--config', 'configs/sft.py', '--config.model_name_or_path=nobody/nothing', '--devices', '2')
  assert proc.returncode == 2 and proc.stderr.strip().startswith('error: ') and 'nobody/nothing' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_unknown_length_buckets_is_one_line_error():
  proc = _dryrun('--config', 'configs/r1_distill.py', '--config.padding_free=false', '--config.length_buckets=nope',
                 '--devices', '2')
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
      "error: config field 'length_buckets' is 'nope'; expected one of auto, pow2, none"], proc.stderr[-3000:]


@pytest.mark.slow
def test_r1_distill_compiles_at_the_qwen25_7b_shape():
  # The real shape (7.6B parameters, ZeRO-3 over 8 devices) at a shorter sequence, to keep CI lean.
  proc = _dryrun('--config', 'configs/r1_distill.py', '--devices', '8', '--config.max_length=2048',
                 '--config.padding_free=false')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'qwen2 with 7.6' in proc.stdout, proc.stdout
  # Unpacked rows (padding_free off): the step is sized at the widest of its length buckets.
  assert 'row widths (length_buckets=auto): 8, 128 to 2048 tokens' in proc.stdout, proc.stdout
  table = _table(proc.stdout)
  # float32 parameters: 7.6e9 × 4 B / 8 devices ≈ 3.5 GiB; Adam's two moments ≈ 2× (the gradient accumulator
  # of the 8 micro-batches is a temporary of the step, not optimizer state).
  assert 3.3 * 1024 < table['parameters'] < 3.7 * 1024, proc.stdout
  assert 6.6 * 1024 < table['optimizer state'] < 7.4 * 1024, proc.stdout


def test_fsdp_keeps_activations_batch_sharded():
  # FSDP shards weights along embed; unless activations are pinned to the batch axes, XLA may replicate the
  # batch and shard embed instead, multiplying activation memory (here 1.55× without the constraint).
  common = ['--config', 'configs/tiny.py', '--devices', '8', '--config.max_length=1024',
            '--config.per_device_train_batch_size=2']
  data = _dryrun(*common, '--config.mesh.data=8', '--config.mesh.fsdp=1')
  fsdp = _dryrun(*common, '--config.mesh.data=1', '--config.mesh.fsdp=8')
  for proc in (data, fsdp):
    assert proc.returncode == 0, proc.stderr[-3000:]
  assert _table(fsdp.stdout)['step temporaries'] < 1.1 * _table(data.stdout)['step temporaries']


def test_find_batch_without_a_target_is_one_line_error():
  proc = _dryrun('--config', 'configs/tiny.py', '--find_batch')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip() == 'error: --find_batch needs --topology: simulated CPU devices have no memory limit to find'


def test_lora_dry_run_shows_the_frozen_base_and_the_adapters():
  """A LoRA run's sizing: the frozen base (compute dtype) in its own row; parameters and AdamW state are the
  adapters' only."""
  common = ['--config', 'configs/tiny.py', '--devices', '8', '--config.mesh.data=1', '--config.mesh.fsdp=8',
            '--config.per_device_train_batch_size=1']
  full = _dryrun(*common)
  lora = _dryrun(*common, '--config.use_peft=true', '--config.model_init=pretrained',
                 '--config.lora_target_modules=all-linear', '--config.lora_r=8')
  for proc in (full, lora):
    assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.search(r'LoRA r=8 on q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj: [0-9.]+M trained',
                   lora.stdout), lora.stdout
  a, b = _table(full.stdout), _table(lora.stdout)
  assert 'frozen base' not in a
  assert b['frozen base'] == pytest.approx(a['parameters'], rel=0.05)  # The same float32 base, sharded alike.
  assert b['parameters'] < a['parameters']  # The adapters (replicated rank axis: not 8× smaller per device).
  assert b['optimizer state'] == pytest.approx(2 * b['parameters'], rel=0.05)  # AdamW of the adapters only.
  bad = _dryrun(*common, '--config.use_peft=true', '--config.lora_r=0')
  assert bad.returncode != 0 and "'lora_r'" in bad.stderr.strip().splitlines()[-1]
