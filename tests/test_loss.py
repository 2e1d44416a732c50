"""Tests for jaxsft.loss: targets/weights, chunked cross-entropy vs the plain version and torch."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft import loss


def _inputs(batch=3, seq_len=11, dim=16, vocab=37, seed=0, dtype=jnp.float32):
  k = jax.random.split(jax.random.key(seed), 4)
  hidden_BxTxD = jax.random.normal(k[0], (batch, seq_len, dim), jnp.float32).astype(dtype)
  unembed_DxV = (jax.random.normal(k[1], (dim, vocab), jnp.float32) * 0.5).astype(dtype)
  targets_BxT = jax.random.randint(k[2], (batch, seq_len), 0, vocab)
  weights_BxT = (jax.random.uniform(k[3], (batch, seq_len)) > 0.3).astype(jnp.float32)
  return hidden_BxTxD, unembed_DxV, targets_BxT, weights_BxT


def _assert_sums_close(got, want, rtol=1e-5):
  assert set(got) == {'loss_sum', 'num_tokens', 'num_correct', 'entropy_sum'}
  for key in want:
    assert got[key].dtype == jnp.float32, key
    np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=rtol, atol=1e-6, err_msg=key)


def test_next_token_targets_packed_row_and_padding():
  # Row 0: two packed documents (ids 1, 2) then padding. Row 1: one document, left-padded.
  tokens = np.array([[10, 11, 12, 20, 21, 22, 0, 0],
                     [0, 0, 30, 31, 32, 33, 34, 35]], np.int32)
  segs = np.array([[1, 1, 1, 2, 2, 2, 0, 0],
                   [0, 0, 1, 1, 1, 1, 1, 1]], np.int32)
  mask = np.array([[0, 1, 1, 1, 1, 1, 0, 0],   # The first token of document 2 is marked as a target too.
                   [0, 0, 0, 0, 1, 1, 0, 1]], np.int32)
  targets, weights = loss.next_token_targets(tokens, mask, segs)
  np.testing.assert_array_equal(targets[:, :-1], tokens[:, 1:])
  assert weights.dtype == jnp.float32 and targets.dtype == jnp.int32
  np.testing.assert_array_equal(weights, [
      # 10→11, 11→12; 12→20 crosses into document 2: no; 20→21, 21→22; 22→pad, pad→pad, last: no.
      [1, 1, 0, 1, 1, 0, 0, 0],
      # pad→pad, pad→30 (the first real token has no predecessor): no; 30→31 not a target; 31→32, 32→33;
      # 33→34 not a target; 34→35.
      [0, 0, 0, 1, 1, 0, 1, 0]])


def test_reference_matches_torch():
  import torch  # pylint: disable=import-outside-toplevel  # Absent on lane 2: tests/conftest.py skips.
  """The plain version itself against torch (float64): CE, argmax accuracy, entropy."""
  _, _, targets, weights = _inputs()
  logits = jax.random.normal(jax.random.key(1), (3, 11, 37)) * 3
  got = loss.cross_entropy_sums_reference(logits, targets, weights)
  lt = torch.tensor(np.asarray(logits), dtype=torch.float64)
  tt = torch.tensor(np.asarray(targets), dtype=torch.long)
  wt = torch.tensor(np.asarray(weights), dtype=torch.float64)
  ce = torch.nn.functional.cross_entropy(lt.reshape(-1, 37), tt.reshape(-1), reduction='none').reshape(3, 11)
  logp = torch.log_softmax(lt, -1)
  entropy = -(logp.exp() * logp).sum(-1)
  correct = (lt.argmax(-1) == tt).double()
  want = {'loss_sum': (ce * wt).sum(), 'num_tokens': wt.sum(), 'num_correct': (correct * wt).sum(),
          'entropy_sum': (entropy * wt).sum()}
  assert 0 < want['num_correct'] < want['num_tokens']  # Accuracy is neither trivially 0 nor 1.
  _assert_sums_close(got, {k: v.item() for k, v in want.items()})


@pytest.mark.parametrize('chunk_size', [1, 3, 4, 6, 7, 33, 10_000])
def test_chunked_matches_reference_values_and_grads(chunk_size):
  # B=3, T=11: chunk_size // B columns = 1, 1, 1, 2, 2, 11, 11 (2 does not divide 11: padded chunks).
  hidden, unembed, targets, weights = _inputs()

  def chunked(h, u):
    sums = loss.cross_entropy_sums(h, u, targets, weights, chunk_size=chunk_size)
    return sums['loss_sum'], sums

  def reference(h, u):
    sums = loss.cross_entropy_sums_reference(jnp.einsum('btd,dv->btv', h, u), targets, weights)
    return sums['loss_sum'], sums

  (gh, gu), got = jax.jit(jax.grad(chunked, argnums=(0, 1), has_aux=True))(hidden, unembed)
  (rh, ru), want = jax.grad(reference, argnums=(0, 1), has_aux=True)(hidden, unembed)
  _assert_sums_close(got, want)
  assert float(jnp.abs(rh).max()) > 0.01 and float(jnp.abs(ru).max()) > 0.01
  np.testing.assert_allclose(gh, rh, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gu, ru, rtol=1e-5, atol=1e-5)
  # Positions with weight 0 get no gradient.
  np.testing.assert_array_equal(np.asarray(gh)[np.asarray(weights) == 0], 0.0)


def test_fractional_weights_and_no_gradient_to_weights():
  hidden, unembed, targets, weights = _inputs(seed=2)
  weights = weights * jax.random.uniform(jax.random.key(5), weights.shape)
  got = loss.cross_entropy_sums(hidden, unembed, targets, weights, chunk_size=5)
  want = loss.cross_entropy_sums_reference(hidden @ unembed, targets, weights)
  _assert_sums_close(got, want)
  g_w = jax.grad(lambda w: loss.cross_entropy_sums(hidden, unembed, targets, w, chunk_size=5)['loss_sum'])(weights)
  np.testing.assert_array_equal(g_w, 0.0)


def test_zero_weights_give_zero():
  hidden, unembed, targets, weights = _inputs()
  zeros = jnp.zeros_like(weights)

  def f(h, u):
    return loss.cross_entropy_sums(h, u, targets, zeros, chunk_size=4)['loss_sum']

  sums = loss.cross_entropy_sums(hidden, unembed, targets, zeros, chunk_size=4)
  for key, value in sums.items():
    assert float(value) == 0.0, key
  for g in jax.grad(f, argnums=(0, 1))(hidden, unembed):
    np.testing.assert_array_equal(g, 0.0)


def test_bfloat16_inputs_accumulate_in_float32():
  hidden, unembed, targets, weights = _inputs(dtype=jnp.bfloat16)
  got = loss.cross_entropy_sums(hidden, unembed, targets, weights, chunk_size=6)
  logits = jnp.einsum('btd,dv->btv', hidden, unembed, preferred_element_type=jnp.float32)
  _assert_sums_close(got, loss.cross_entropy_sums_reference(logits, targets, weights))
  g = jax.grad(lambda h: loss.cross_entropy_sums(h, unembed, targets, weights, chunk_size=6)['loss_sum'])(hidden)
  assert g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g.astype(jnp.float32)).all())


def test_never_materialises_full_logits():
  """Neither the forward nor the backward of the compiled step holds a [B, T, V]-sized float32 array."""
  batch, seq_len, dim, vocab = 2, 64, 8, 1009  # 1009: a prime, so it names only vocabulary axes.
  hidden, unembed, targets, weights = _inputs(batch, seq_len, dim, vocab)

  def f(h, u):
    return loss.cross_entropy_sums(h, u, targets, weights, chunk_size=32)['loss_sum']

  hlo = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(hidden, unembed).compile().as_text()
  sizes = []
  for dims in re.findall(r'f32\[([0-9,]*)\]', hlo):
    shape = [int(d) for d in dims.split(',') if d]
    if vocab in shape:
      sizes.append(int(np.prod(shape)) // vocab)
  assert sizes, 'expected the chunk logits in the HLO'
  # The largest vocab-sized buffer covers one chunk (16 columns × 2 rows), not all 128 tokens.
  assert max(sizes) == 32, sizes


def test_chunked_train_step_temporaries_below_one_full_logits_array():
  """The compiled train step (forward, loss, backward, AdamW update) of a vocabulary-32768 model, by XLA's
  memory analysis: with one chunk the temporaries hold at least the float32 [B, T, V] logits (so the
  measurement sees them); with 128-token chunks they stay below even one such array and below a quarter of the
  unchunked step's. Compiled from abstract shapes: nothing is allocated."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jaxsft import optim, step as step_lib  # pylint: disable=import-outside-toplevel
  from jaxsft.models import hf, transformer  # pylint: disable=import-outside-toplevel

  batch, seq_len, vocab = 2, 1024, 32768
  cfg = transformer.ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=1,
                                num_heads=2, num_kv_heads=1, head_dim=32)
  graphdef, params = nnx.split(hf.abstract_model(cfg), nnx.Param)
  tx, _ = optim.make_optimizer(
      learning_rate=1e-3, lr_scheduler_type='constant', total_steps=10, warmup_steps=0, warmup_ratio=0.0,
      min_lr_rate=None, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0)
  state = {'params': params, 'opt_state': jax.eval_shape(tx.init, params)}
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  abstract_batch = {key: tokens for key in ('input_ids', 'positions', 'segment_ids', 'loss_mask')}
  inv = jax.ShapeDtypeStruct((), jnp.float32)

  def temp_bytes(chunk_size):
    step = step_lib.TrainStep(graphdef, tx, chunk_size)
    return step.lower('step', state, abstract_batch, inv).compile().memory_analysis().temp_size_in_bytes

  full_logits_bytes = batch * seq_len * vocab * 4
  unchunked, chunked = temp_bytes(batch * seq_len), temp_bytes(128)
  assert unchunked >= full_logits_bytes, (unchunked, full_logits_bytes)
  assert chunked < full_logits_bytes, (chunked, full_logits_bytes)
  assert chunked < unchunked / 4, (chunked, unchunked)
