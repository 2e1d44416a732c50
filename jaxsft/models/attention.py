"""Segment-aware causal self-attention, dispatched on `model.attention_impl`.

Layout is BTNH (batch, time, heads, head_dim); grouped-query attention when the number of query heads N is
a multiple of the number of key/value heads K (query head n reads key/value head n // (N / K), as HF's
`repeat_kv`). Token t attends to s iff s <= t (array index), seg[s] == seg[t], and, with a sliding window
w, t - s < w: transformers' `sliding_window_overlay` keeps `kv_idx > q_idx - w`, i.e. the window counts
the query token itself. The diagonal is always allowed, so no row is fully masked and padding (segment 0)
gives finite values.

Implementations: 'xla' builds the boolean mask and calls `jax.nn.dot_product_attention(...,
implementation='xla')` (logits and softmax in float32, as HF's eager attention). 'cudnn' and 'splash' (TPU
Pallas) are not implemented yet and raise InputError naming `model.attention_impl`.
"""

import jax
import jax.numpy as jnp

from jaxsft.errors import InputError

IMPLS = ('xla',)


def check_impl(impl: str) -> None:
  """Raises InputError unless `impl` is an implemented attention implementation."""
  if impl not in IMPLS:
    raise InputError(f"config field 'model.attention_impl' is {impl!r}; implemented: {', '.join(IMPLS)}")


def make_mask(segment_ids_BxT: jax.Array, sliding_window: int | None) -> jax.Array:
  """Boolean mask [B, 1, T, T] (query, key): same segment, causal, and within the window if any."""
  segment_ids_BxT = jnp.asarray(segment_ids_BxT)
  t = segment_ids_BxT.shape[1]
  q_idx_Tx1 = jnp.arange(t, dtype=jnp.int32)[:, None]
  k_idx_1xT = jnp.arange(t, dtype=jnp.int32)[None, :]
  allowed_TxT = k_idx_1xT <= q_idx_Tx1
  if sliding_window is not None:
    allowed_TxT &= (q_idx_Tx1 - k_idx_1xT) < sliding_window
  same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  return (same_BxTxT & allowed_TxT[None])[:, None]


def attention(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array, segment_ids_BxT: jax.Array, *,
              sliding_window: int | None, impl: str) -> jax.Array:
  """Softmax(q kᵀ / sqrt(H) + mask) v, per segment; returns [B, T, N, H] in the dtype of q."""
  check_impl(impl)
  mask_Bx1xTxT = make_mask(segment_ids_BxT, sliding_window)
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=mask_Bx1xTxT, implementation='xla')
