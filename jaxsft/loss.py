"""Masked next-token cross-entropy, chunked so the float32 logits are never materialised.

`next_token_targets` turns a batch (tokens, loss mask, segment ids) into per-position targets and weights:
position t predicts token t + 1, and only where that token is a training target of the same document.
`cross_entropy_sums` projects the final hidden states onto the vocabulary a few sequence columns at a time
inside a `lax.scan`, so neither the forward nor the backward pass ever holds more than one chunk of
`[chunk, V]` float32 logits. Under autodiff it is a fused linear cross-entropy (as Liger's): each chunk's
gradients with respect to the hidden states and the unembedding are computed in the forward scan, right after
its logits, so the logits are never recomputed (3 vocabulary-sized matmuls per chunk instead of 4).
It returns sums (not means): the caller divides by the number of loss
tokens of the whole optimizer step, which is what makes the loss independent of how the step is split into
micro-batches and devices.

The chunks are column blocks of the sequence axis (`[B, c]` tokens each); the batch axis is never scanned
over, so a batch sharded over devices stays sharded and each device reduces its own rows.
"""

import functools

import jax
import jax.numpy as jnp

SUM_KEYS = ('loss_sum', 'num_tokens', 'num_correct', 'entropy_sum')


def next_token_targets(tokens_BxT: jax.Array, loss_mask_BxT: jax.Array,
                       segment_ids_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Targets and float32 weights for next-token prediction.

  `targets[:, t] = tokens[:, t + 1]`; `weights[:, t]` is 1 where token t + 1 is a loss token of the same
  (non-padding) segment as token t, else 0. The last column has weight 0. So a packed row never predicts the
  first token of a document from the end of the previous one, and padding never contributes.

  Args:
    tokens_BxT: int token ids.
    loss_mask_BxT: 1 where the token is a training target.
    segment_ids_BxT: document ids, 0 for padding.

  Returns:
    (targets_BxT int32, weights_BxT float32).
  """
  tokens_BxT = jnp.asarray(tokens_BxT)
  segment_ids_BxT = jnp.asarray(segment_ids_BxT)
  loss_mask_BxT = jnp.asarray(loss_mask_BxT)
  batch = tokens_BxT.shape[0]
  zeros_Bx1 = jnp.zeros((batch, 1), jnp.int32)
  targets_BxT = jnp.concatenate([tokens_BxT[:, 1:].astype(jnp.int32), zeros_Bx1], axis=1)
  seg_cur_BxTm1 = segment_ids_BxT[:, :-1]
  seg_next_BxTm1 = segment_ids_BxT[:, 1:]
  valid_BxTm1 = (loss_mask_BxT[:, 1:] > 0) & (seg_next_BxTm1 == seg_cur_BxTm1) & (seg_cur_BxTm1 != 0)
  weights_BxT = jnp.concatenate([valid_BxTm1.astype(jnp.float32), zeros_Bx1.astype(jnp.float32)], axis=1)
  return targets_BxT, weights_BxT


def _token_stats(logits_NxV: jax.Array, targets_N: jax.Array) -> tuple[jax.Array, ...]:
  """Per-token CE, top-1 correctness and predictive entropy from float32 logits (any leading shape)."""
  lse_N = jax.nn.logsumexp(logits_NxV, axis=-1)
  vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits_NxV.shape, logits_NxV.ndim - 1)
  # A one-hot select rather than a gather: it fuses into the reduction and is well defined for any target.
  target_logit_N = jnp.sum(jnp.where(vocab_ids == targets_N[..., None], logits_NxV, 0.0), axis=-1)
  ce_N = lse_N - target_logit_N
  # Metrics only: no gradient (and nothing for the backward pass to recompute).
  stats_logits_NxV = jax.lax.stop_gradient(logits_NxV)
  stats_lse_N = jax.lax.stop_gradient(lse_N)
  # jnp.argmax returns the first maximum, as TRL's `is_top1` (target >= max and > every earlier logit).
  correct_N = (jnp.argmax(stats_logits_NxV, axis=-1) == targets_N).astype(jnp.float32)
  probs_NxV = jnp.exp(stats_logits_NxV - stats_lse_N[..., None])
  # H = -sum p log p = logsumexp(z) - sum p z (TRL's entropy_from_logits, in nats).
  entropy_N = stats_lse_N - jnp.sum(probs_NxV * stats_logits_NxV, axis=-1)
  return ce_N, correct_N, entropy_N


def _weighted_sums(ce, correct, entropy, weights, axis=None) -> dict[str, jax.Array]:
  return {
      'loss_sum': jnp.sum(ce * weights, axis=axis),
      'num_tokens': jnp.sum(weights, axis=axis),
      'num_correct': jnp.sum(correct * weights, axis=axis),
      'entropy_sum': jnp.sum(entropy * weights, axis=axis),
  }


def cross_entropy_sums(hidden_BxTxD: jax.Array, unembed_DxV: jax.Array, targets_BxT: jax.Array,
                       weights_BxT: jax.Array, *, chunk_size: int = 1024,
                       unembed_grad: bool = True) -> dict[str, jax.Array]:
  """Weighted sums of the next-token cross-entropy and its metrics, without [B, T, V] logits.

  Each chunk holds `B × c` tokens with `c = clip(chunk_size // B, 1, T)` sequence columns (the sequence is
  zero-padded, with weight 0, up to a multiple of `c`), so a chunk's float32 logits hold about
  `chunk_size × V` numbers for the whole batch, and fewer per device when the batch is sharded. Logits are
  computed from `hidden` and `unembed` in their (compute) dtype with float32 accumulation. Under autodiff each
  chunk's gradients are computed in the forward scan (see `_fused_sums_fwd`); the residuals are the gradients
  themselves: one the size of `hidden`, one the size of `unembed` (accumulated in float32). Gradients flow to
  `hidden_BxTxD` and `unembed_DxV`, never to targets or weights. With `unembed_grad=False` (a frozen
  unembedding: LoRA) the unembedding's gradient is neither computed nor kept: its cotangent is zero. (Computed in the
  forward scan's carry, XLA does not remove it when unused: a LoRA step on the CPU benchmark ran 20% slower than
  a full fine-tuning step with it.)

  Args:
    hidden_BxTxD: final hidden states (after the final norm).
    unembed_DxV: the output projection.
    targets_BxT: int target token ids (from `next_token_targets`).
    weights_BxT: float per-token weights (0 = not a loss token).
    chunk_size: about how many tokens (over the whole batch) one chunk of logits covers.

  Returns:
    float32 scalars: 'loss_sum' (sum of weighted token CE), 'num_tokens' (sum of weights), 'num_correct'
    (weighted count of argmax == target) and 'entropy_sum' (weighted sum of the predictive entropy).
  """
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
  batch, seq_len, dim = hidden_BxTxD.shape
  cols = max(1, min(seq_len, chunk_size // batch))
  num_chunks = -(-seq_len // cols)
  pad = num_chunks * cols - seq_len
  targets_BxT = targets_BxT.astype(jnp.int32)
  weights_BxT = jax.lax.stop_gradient(weights_BxT.astype(jnp.float32))
  if pad:
    hidden_BxTxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0)))
    targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
    weights_BxT = jnp.pad(weights_BxT, ((0, 0), (0, pad)))
  # [B, T] -> [K, B, c]: the scanned axis K is new, the (possibly sharded) batch axis stays put.
  hidden_KxBxCxD = jnp.moveaxis(hidden_BxTxD.reshape(batch, num_chunks, cols, dim), 1, 0)
  targets_KxBxC = jnp.moveaxis(targets_BxT.reshape(batch, num_chunks, cols), 1, 0)
  weights_KxBxC = jnp.moveaxis(weights_BxT.reshape(batch, num_chunks, cols), 1, 0)

  sums_B = _fused_sums(unembed_grad, hidden_KxBxCxD, unembed_DxV, targets_KxBxC, weights_KxBxC)
  return {k: jnp.sum(v) for k, v in sums_B.items()}


def _chunk_stats(hidden_BxCxD, unembed_DxV, targets_BxC, weights_BxC):
  """One chunk: float32 logits, their per-row sums, and what the gradient needs (logits, lse)."""
  logits_BxCxV = jnp.einsum('bcd,dv->bcv', hidden_BxCxD, unembed_DxV, preferred_element_type=jnp.float32)
  ce, correct, entropy = _token_stats(logits_BxCxV, targets_BxC)
  # Per-row sums: the carry keeps the batch axis, so a sharded batch needs no collective per chunk.
  return _weighted_sums(ce, correct, entropy, weights_BxC, axis=-1), logits_BxCxV


def _zero_sums(batch: int) -> dict[str, jax.Array]:
  return {k: jnp.zeros((batch,), jnp.float32) for k in SUM_KEYS}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_sums(unembed_grad, hidden_KxBxCxD, unembed_DxV, targets_KxBxC, weights_KxBxC):
  """Per-row sums over all chunks (no gradient work: evaluation, or the primal of the VJP below)."""
  del unembed_grad  # The primal computes no gradient.
  def body(carry, chunk):
    sums, _ = _chunk_stats(chunk[0], unembed_DxV, chunk[1], chunk[2])
    return {k: carry[k] + sums[k] for k in SUM_KEYS}, None

  sums_B, _ = jax.lax.scan(body, _zero_sums(hidden_KxBxCxD.shape[1]),
                           (hidden_KxBxCxD, targets_KxBxC, weights_KxBxC))
  return sums_B


def _fused_sums_fwd(unembed_grad, hidden_KxBxCxD, unembed_DxV, targets_KxBxC, weights_KxBxC):
  """The forward that also computes the loss's gradients, chunk by chunk (a fused linear cross-entropy).

  d loss_sum / d logits = weights × (softmax(logits) - onehot(target)) is known as soon as a chunk's logits
  are; multiplying it by the unembedding (for the hidden states) and by the hidden states (for the
  unembedding, accumulated over chunks in float32) right away means the backward pass only scales the
  results: 3 [c, D] × [D, V]-sized matmuls per chunk instead of the 4 of autodiff through a rematerialised
  chunk (forward, recomputed forward, two transposes), and the logits never leave the chunk. The gradient
  matmuls run in the compute dtype (float32 accumulation), as a bf16 framework's backward does. Without
  `unembed_grad`, only the hidden states' gradient is computed (2 matmuls per chunk).
  """
  dtype = hidden_KxBxCxD.dtype

  def body(carry, chunk):
    sums_B, d_unembed_DxV = carry
    hidden_BxCxD, targets_BxC, weights_BxC = chunk
    sums, logits_BxCxV = _chunk_stats(hidden_BxCxD, unembed_DxV, targets_BxC, weights_BxC)
    probs_BxCxV = jax.nn.softmax(logits_BxCxV, axis=-1)
    onehot_BxCxV = jax.nn.one_hot(targets_BxC, logits_BxCxV.shape[-1], dtype=jnp.float32)
    d_logits_BxCxV = ((probs_BxCxV - onehot_BxCxV) * weights_BxC[..., None]).astype(dtype)
    d_hidden_BxCxD = jnp.einsum('bcv,dv->bcd', d_logits_BxCxV, unembed_DxV,
                                preferred_element_type=jnp.float32).astype(dtype)
    if unembed_grad:
      d_unembed_DxV = d_unembed_DxV + jnp.einsum('bcd,bcv->dv', hidden_BxCxD, d_logits_BxCxV,
                                                 preferred_element_type=jnp.float32)
    return ({k: sums_B[k] + sums[k] for k in SUM_KEYS}, d_unembed_DxV), d_hidden_BxCxD

  d_unembed_init = jnp.zeros(unembed_DxV.shape if unembed_grad else (), jnp.float32)
  init = (_zero_sums(hidden_KxBxCxD.shape[1]), d_unembed_init)
  (sums_B, d_unembed_DxV), d_hidden_KxBxCxD = jax.lax.scan(body, init,
                                                           (hidden_KxBxCxD, targets_KxBxC, weights_KxBxC))
  return sums_B, (d_hidden_KxBxCxD, d_unembed_DxV.astype(unembed_DxV.dtype) if unembed_grad else None)


def _fused_sums_bwd(unembed_grad, residuals, cotangents):
  d_hidden_KxBxCxD, d_unembed_DxV = residuals
  # Only loss_sum has a gradient (the token count, accuracy and entropy are metrics); its cotangent is per row.
  ct_B = cotangents['loss_sum']
  d_hidden = d_hidden_KxBxCxD * ct_B[None, :, None, None].astype(d_hidden_KxBxCxD.dtype)
  # A per-row cotangent cannot scale the summed unembedding gradient row by row; the sums are reduced with
  # jnp.sum right after this function, so every row's cotangent is the same scalar.
  d_unembed = d_unembed_DxV * ct_B[0].astype(d_unembed_DxV.dtype) if unembed_grad else None
  return d_hidden, d_unembed, None, None


_fused_sums.defvjp(_fused_sums_fwd, _fused_sums_bwd)


def cross_entropy_sums_reference(logits_BxTxV: jax.Array, targets_BxT: jax.Array,
                                 weights_BxT: jax.Array) -> dict[str, jax.Array]:
  """The same sums from full logits: the plain, memory-hungry version, written independently (for tests)."""
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  targets_BxT = targets_BxT.astype(jnp.int32)
  weights_BxT = jax.lax.stop_gradient(weights_BxT.astype(jnp.float32))
  log_probs_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  ce_BxT = -jnp.take_along_axis(log_probs_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  probs_BxTxV = jax.lax.stop_gradient(jnp.exp(log_probs_BxTxV))
  entropy_BxT = -jnp.sum(probs_BxTxV * jax.lax.stop_gradient(log_probs_BxTxV), axis=-1)
  correct_BxT = (jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT).astype(jnp.float32)
  return _weighted_sums(ce_BxT, correct_BxT, entropy_BxT, weights_BxT)
