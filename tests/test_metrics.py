"""Throughput metrics: the model-FLOPs formula, attended-key counts, MFU, step and compile timings, peak memory,
and the device prefetcher that feeds the training loop."""

import dataclasses
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft import config as config_lib
from jaxsft import metrics
from jaxsft import sharding
from jaxsft.models import attention
from jaxsft.models import hf
from jaxsft.models import hf_config
from jaxsft.models import transformer
from tests.helpers import runs

# Qwen2.5-7B's config.json: hidden 3584, intermediate 18944, 28 layers, 28 heads, 4 kv heads, head_dim
# 3584 / 28 = 128, vocabulary 152064, untied lm_head.
QWEN25_7B = transformer.ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                                    num_heads=28, num_kv_heads=4, head_dim=128)


def test_flops_per_token_of_qwen25_7b_by_hand():
  """N and the per-token training FLOPs against a hand computation of Qwen2.5-7B (~7.07e9 matmul weights)."""
  attention_per_layer = 3584 * 3584 + 2 * 3584 * 512 + 3584 * 3584  # q, k, v (4 kv heads × 128), o.
  mlp_per_layer = 3 * 3584 * 18944
  lm_head = 3584 * 152064
  n = 28 * (attention_per_layer + mlp_per_layer) + lm_head
  assert n == 7_070_285_824 == metrics.matmul_params(QWEN25_7B)
  # Attention, causal: a 4096-token document has 4096·4097/2 (query, key) pairs per layer, 4·28·128 FLOPs each
  # forward, ×3 for training; per token that is 6·28·28·128·4097.
  want = 6 * n + 6 * 28 * 28 * 128 * 4097
  assert metrics.train_flops_per_token(QWEN25_7B, 4096) == pytest.approx(want, rel=1e-12)
  assert want == 44_888_567_808  # ≈ 4.49e10 FLOPs per token, 5.5% of it attention at 4k tokens.


def test_flops_count_the_lm_head_once_when_tied_and_not_the_embedding_lookup():
  untied = transformer.ModelConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_layers=2,
                                   num_heads=2, num_kv_heads=1, head_dim=8)
  tied = dataclasses.replace(untied, tie_word_embeddings=True)
  per_layer = 16 * (2 + 2) * 8 + 2 * 8 * 16 + 3 * 16 * 32
  assert metrics.matmul_params(untied) == metrics.matmul_params(tied) == 2 * per_layer + 16 * 1000


def test_causal_pairs_by_enumeration():
  for length in (1, 2, 5, 9):
    for window in (None, 1, 3, 9, 20):
      brute = sum(min(p + 1, window or length) for p in range(length))
      assert metrics.causal_pairs(length, window) == brute, (length, window)


def test_sliding_window_layers_attend_fewer_keys():
  """Per token, layers with window w cost 12·H·Dh·(mean over positions of min(p + 1, w)), by hand."""
  cfg = transformer.ModelConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_layers=3, num_heads=2,
                                num_kv_heads=1, head_dim=8, sliding_windows=(None, 4, 4))
  seq_len = 10
  full = 10 * 11 / 2
  windowed = 1 + 2 + 3 + 4 + 6 * 4
  want = 6 * metrics.matmul_params(cfg) + 12 * 2 * 8 * (full + 2 * windowed) / seq_len
  assert metrics.train_flops_per_token(cfg, seq_len) == pytest.approx(want, rel=1e-12)


def _packed_batch():
  """Two rows: documents of 3, 4 and 2 tokens then 3 pads; one document of 7 tokens then 5 pads."""
  segment_ids = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0, 0],
                          [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]], np.int32)
  positions = np.array([[0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 0, 0],
                        [0, 1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0]], np.int32)
  return positions, segment_ids


def test_attended_keys_equal_the_attention_masks_allowed_pairs():
  """The count behind MFU is what attention computes: the number of allowed (query, key) pairs of
  attention.make_mask over the real (non-padding) queries, summed over layers, with and without windows."""
  positions, segment_ids = _packed_batch()
  windows = (None, 2, None, 5)
  want = 0
  for window in windows:
    mask = np.asarray(attention.make_mask(segment_ids, window))[:, 0]  # [B, Tq, Tk]
    want += int(mask[segment_ids > 0].sum())
  got = jax.jit(metrics.attended_keys, static_argnums=2)(positions, segment_ids, windows)
  assert got.dtype == jnp.float32 and float(got) == want
  # By hand for the full-attention layers: 3·4/2 + 4·5/2 + 2·3/2 + 7·8/2 = 6 + 10 + 3 + 28.
  assert float(metrics.attended_keys(positions, segment_ids, (None,))) == 47


def test_train_step_reports_attended_keys_of_its_batch():
  """TrainStep built with the layers' windows returns the batch's attended keys; without them, no such key."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jaxsft import optim, step as step_lib  # pylint: disable=import-outside-toplevel

  cfg = transformer.ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                                num_kv_heads=1, head_dim=8, sliding_windows=(None, 3))
  graphdef, params = nnx.split(hf.init_random(cfg, 0), nnx.Param)
  tx, _ = optim.make_optimizer(
      learning_rate=1e-3, lr_scheduler_type='constant', total_steps=2, warmup_steps=0, warmup_ratio=0.0,
      min_lr_rate=None, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0)
  positions, segment_ids = _packed_batch()
  batch = {'input_ids': np.where(segment_ids > 0, 5, 0).astype(np.int32), 'positions': positions,
           'segment_ids': segment_ids, 'loss_mask': (segment_ids > 0).astype(np.int32)}

  def state():  # A fresh copy per call: the step donates its state.
    copy = jax.tree.map(jnp.copy, params)
    return {'params': copy, 'opt_state': tx.init(copy)}

  step = step_lib.TrainStep(graphdef, tx, 16, attention_windows=metrics.layer_windows(cfg))
  _, sums = step.step(state(), batch, jnp.float32(0.1))
  want = sum(int(np.asarray(attention.make_mask(segment_ids, w))[:, 0][segment_ids > 0].sum()) for w in (None, 3))
  assert float(sums['attended_keys']) == want
  _, sums = step_lib.TrainStep(graphdef, tx, 16).step(state(), batch, jnp.float32(0.1))
  assert 'attended_keys' not in sums


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_throughput_rates_step_time_and_mfu_with_a_fake_clock(monkeypatch):
  """tokens/s, step_time and MFU from the counted tokens and keys over the clock minus the paused interval."""
  clock = _Clock()
  monkeypatch.setattr(metrics.time, 'perf_counter', clock)
  cfg = QWEN25_7B
  meter = metrics.Throughput(cfg, 4096, num_devices=8, peak_flops=989e12)
  meter.add_step(1000, 4000, [jnp.float32(5e6), jnp.float32(3e6)])  # Two micro-batches' device scalars.
  clock.now = 2.0
  meter.pause()
  clock.now = 30.0  # 28 s of evaluation: not counted.
  meter.resume()
  meter.add_step(3000, 6000, [jnp.float32(2e6)])
  clock.now = 34.0
  row = meter.measure()
  flops = 6 * metrics.matmul_params(cfg) * 10000 + 12 * 28 * 128 * 10e6
  assert row == pytest.approx({'tokens_per_second': 4000 / 6, 'all_tokens_per_second': 10000 / 6, 'step_time': 3.0,
                               'mfu': flops / 6 / (8 * 989e12)}, rel=1e-6)
  # Nothing timed since (the window held only the compilation step): no figures rather than zeros.
  clock.now = 40.0
  assert meter.measure() == {'tokens_per_second': None, 'all_tokens_per_second': None, 'step_time': None,
                             'mfu': None}
  # Without key counts every token is taken to attend as in a full seq_len document.
  meter.add_step(10, 20)
  clock.now = 41.0
  assert meter.measure()['mfu'] == pytest.approx(20 * metrics.train_flops_per_token(cfg, 4096) / (8 * 989e12))


def test_on_cpu_there_is_no_mfu_and_no_peak_memory():
  assert jax.devices()[0].platform == 'cpu'
  assert metrics.peak_flops_per_device() is None and metrics.peak_memory_bytes() is None
  meter = metrics.Throughput(QWEN25_7B, 128, num_devices=1)
  meter.add_step(10, 20, [jnp.float32(100.0)])
  row = meter.measure()
  assert row['mfu'] is None and row['tokens_per_second'] > 0


@pytest.mark.parametrize('kind, peak', [('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H100 PCIe', 756e12),
                                        ('NVIDIA H200', 989e12), ('NVIDIA A100-SXM4-80GB', 312e12),
                                        ('TPU v5 lite', 197e12), ('TPU v5', 459e12), ('TPU v6 lite', 918e12),
                                        ('TPU v4', 275e12), ('cpu', None)])
def test_peak_flops_by_device_kind(kind, peak):
  assert metrics.peak_flops_per_device(types.SimpleNamespace(device_kind=kind)) == peak


def test_peak_memory_is_the_largest_reported_high_water_mark(monkeypatch):
  devices = [types.SimpleNamespace(memory_stats=lambda: {'peak_bytes_in_use': 5, 'bytes_in_use': 1}),
             types.SimpleNamespace(memory_stats=lambda: {'peak_bytes_in_use': 7}),
             types.SimpleNamespace(memory_stats=lambda: None)]
  monkeypatch.setattr(metrics.jax, 'local_devices', lambda: devices)
  assert metrics.peak_memory_bytes() == 7


class _FakeLoader:
  """A Loader stand-in: yields steps with one [2, 4] micro-batch each; records the thread that iterates it."""

  def __init__(self, num_steps, fail_at=None):
    self.num_steps, self.fail_at, self.next, self.threads = num_steps, fail_at, 0, set()

  def __iter__(self):
    return self

  def __next__(self):
    self.threads.add(threading.current_thread().name)
    if self.next == self.fail_at:
      raise ValueError(f'bad row in step {self.next}')
    if self.next >= self.num_steps:
      raise StopIteration
    batch = {'input_ids': np.full((2, 4), self.next, np.int32)}
    self.next += 1
    return {'micro_batches': [batch], 'step': self.next - 1}

  def get_state(self):
    return {'step': self.next}


def _mesh():
  return sharding.make_mesh(config_lib.base_config().mesh, jax.devices()[:1])


def _wait_for(predicate, timeout=10.0):
  deadline = time.monotonic() + timeout
  while not predicate() and time.monotonic() < deadline:
    time.sleep(0.01)
  return predicate()


def test_prefetcher_runs_ahead_on_its_thread_and_reports_the_consumed_state():
  """Batches arrive as global device arrays, in order, built on the background thread `depth` steps ahead of the
  consumer; the state yielded with each step is the loader's after *that* step (what a checkpoint saves)."""
  loader = _FakeLoader(6)
  prefetcher = runs.Prefetcher(loader, _mesh(), depth=2)
  # Nothing consumed yet: the thread has filled the queue (2) and built one more step it waits to enqueue.
  assert _wait_for(lambda: loader.next == 3)
  time.sleep(0.2)
  assert loader.next == 3  # Bounded: it does not run further ahead.
  seen = []
  for element, batches, state in prefetcher:
    (batch,) = batches
    assert isinstance(batch['input_ids'].sharding, jax.sharding.NamedSharding)  # Placed by global_batch.
    np.testing.assert_array_equal(batch['input_ids'], element['step'])
    assert state == {'step': element['step'] + 1}
    seen.append(element['step'])
  assert seen == list(range(6))
  assert loader.threads == {'jaxsft-prefetch'}
  prefetcher.close()


def test_prefetcher_raises_the_loaders_error_in_order_and_close_stops_the_thread():
  prefetcher = runs.Prefetcher(_FakeLoader(10, fail_at=2), _mesh(), depth=4)
  assert [element['step'] for element, _, _ in (next(prefetcher), next(prefetcher))] == [0, 1]
  with pytest.raises(ValueError, match='bad row in step 2'):
    next(prefetcher)
  prefetcher.close()

  prefetcher = runs.Prefetcher(_FakeLoader(100), _mesh(), depth=1)
  next(prefetcher)
  prefetcher.close()
  assert not prefetcher._thread.is_alive()  # pylint: disable=protected-access
  with pytest.raises(StopIteration):
    next(prefetcher)


def test_prefetcher_without_a_thread_loads_each_step_when_asked():
  """depth=0: nothing runs ahead; the loader is iterated on the caller's thread, the results are the same."""
  loader = _FakeLoader(3)
  prefetcher = runs.Prefetcher(loader, _mesh(), depth=0)
  time.sleep(0.1)
  assert loader.next == 0
  element, (batch,), state = next(prefetcher)
  assert loader.next == 1 and state == {'step': 1} and element['step'] == 0
  np.testing.assert_array_equal(batch['input_ids'], 0)
  assert [e['step'] for e, _, _ in prefetcher] == [1, 2]
  assert loader.threads == {threading.current_thread().name}
  prefetcher.close()


@pytest.fixture(scope='module')
def tiny_run_inputs(tmp_path_factory):
  from tests.helpers import processes  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('metrics')
  return (root, *processes.tiny_model_and_splits(root, 48, 6))


EVAL_SLEEP = 3.0


@pytest.mark.slow
def test_training_rows_carry_timings_rates_and_mfu(tiny_run_inputs, monkeypatch):
  """Through trainer.run: the first row carries compile_seconds and first_step_seconds (compilation included);
  every later window's tokens_per_second × step_time × steps is exactly its loss tokens (Δ num_tokens), so the
  rates count the timed steps' tokens and step_time is per optimizer step; evaluation (made to take 3 s) is
  not in step_time; on CPU mfu is None and peak_memory_gib absent, and with a peak FLOP/s given the MFU
  lies between 6·N·tokens and 6·N·tokens + the full-row attention bound."""
  root, model_dir, data_dir = tiny_run_inputs

  def slowed(evaluate):
    def slow_evaluate(*args, **kwargs):
      time.sleep(EVAL_SLEEP)
      return evaluate(*args, **kwargs)
    return slow_evaluate

  slow_evals = runs.patch_eval_loss(monkeypatch, slowed)

  def run(out, **overrides):
    return runs.metrics(runs.train(**{
        **dict(model_name_or_path=model_dir, dataset_name=data_dir, output_dir=out, bf16=False,
               gradient_checkpointing=False, disable_tqdm=True, max_length=128, packing=True,
               per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=6, logging_steps=2,
               eval_strategy='steps', eval_steps=3.0, save_steps=0, dataset_cache_dir=root / 'cache'),
        **overrides}))

  rows = [r for r in run(root / 'cpu') if 'loss' in r]
  assert slow_evals, 'the eval-loss pass trainer.run called was not the slowed one'  # (runs.patch_eval_loss)
  assert [r['step'] for r in rows] == [2, 4, 6]
  first = rows[0]
  assert 0 < first['compile_seconds'] <= first['first_step_seconds']
  assert all('compile_seconds' not in r and 'first_step_seconds' not in r for r in rows[1:])
  assert all(r['mfu'] is None and 'peak_memory_gib' not in r for r in rows)
  for prev, row in zip(rows, rows[1:]):
    steps = row['step'] - prev['step']
    loss_tokens = row['num_tokens'] - prev['num_tokens']
    assert row['tokens_per_second'] * row['step_time'] * steps == pytest.approx(loss_tokens, rel=1e-9)
    assert row['all_tokens_per_second'] > row['tokens_per_second']
    assert row['step_time'] * steps < EVAL_SLEEP  # The window 2..4 holds the evaluation at step 3.
  # The first window (steps 1..2) times step 2 only.
  assert first['tokens_per_second'] * first['step_time'] < first['num_tokens']

  peak = 1e12
  monkeypatch.setattr(metrics, 'peak_flops_per_device', lambda device=None: peak)
  rows = [r for r in run(root / 'with-peak', max_steps=2, eval_strategy='no', logging_steps=2) if 'loss' in r]
  row = rows[0]
  cfg = runs.model_config(config_lib.base_config(), hf_config.read_hf_config(model_dir))
  tokens = row['all_tokens_per_second'] * row['step_time']  # Step 2's non-padding tokens.
  flops = row['mfu'] * peak * jax.device_count() * row['step_time']
  matmul = 6 * metrics.matmul_params(cfg) * tokens
  attention_bound = 12 * cfg.num_heads * cfg.head_dim * cfg.num_layers * tokens * 128
  assert matmul < flops < matmul + attention_bound
