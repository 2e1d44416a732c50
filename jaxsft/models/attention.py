"""Segment-aware causal self-attention, dispatched on `model.attention_impl` by backend.

Layout is BTNH (batch, time, heads, head_dim); grouped-query attention when the number of query heads N is
a multiple of the number of key/value heads K (query head n reads key/value head n // (N / K), as HF's
`repeat_kv`). Token t attends to s iff s <= t (array index), seg[s] == seg[t], and, with a sliding window
w, t - s < w: transformers' `sliding_window_overlay` keeps `kv_idx > q_idx - w`, i.e. the window counts
the query token itself. The diagonal is always allowed, so no row is fully masked and padding (segment 0)
gives finite values. Logits are scaled by 1/sqrt(H) in every implementation.

Implementations (`IMPLS`):

* 'xla' (any backend): `jax.nn.dot_product_attention(..., implementation='xla')` with a boolean mask, one block
  of queries at a time against only the keys the block may see (causal: about half the pairs): logits and
  softmax in float32, probabilities cast to the input dtype for the PV product (as HF's eager attention).
  Memory O(B·N·T·Q) per block of Q queries.
* 'cudnn' (NVIDIA, bf16/fp16 compute): cuDNN flash attention. The public `jax.nn.dot_product_attention` has
  no segment ids, so on Hopper or newer with cuDNN >= 9.6 packed rows go through cuDNN's packed layout
  (`jax._src.cudnn.fused_attention_stablehlo.dot_product_attention` with per-row `q_seqlen`/`q_offsets`,
  mask PADDING_CAUSAL): every maximal run of equal segment ids (padding included) is one sequence, so
  nothing quadratic in T is materialised. Its static shape needs a bound M on the runs of a row
  (`max_segments`, default `DEFAULT_MAX_SEGMENTS`; its softmax statistics take B·M·N·T float32). A row
  with more than M runs, or whose equal ids are not contiguous (then runs and equality segments differ),
  gets NaN outputs, so the loss turns NaN instead of being silently wrong; `max_segment_runs` counts a
  batch's runs on the host to check ahead. Key/value heads are repeated to N before the packed call: jax
  <= 0.10 scales the kv offsets by the query stride N·H (fixed upstream in jax PR #39521), which is wrong
  for K < N. Older GPUs or cuDNN use the public API with the segment mask as a cuDNN bias (flash compute,
  but an O(B·T²) bias in memory).
* 'splash' (TPU): Pallas splash attention (`make_splash_mha`, which handles GQA by head grouping) with a
  static CausalMask or LocalMask (sliding window) and dynamic `SegmentIds`, vmapped over the batch; q is
  pre-scaled. T is padded to a multiple of 128 with a fresh segment id (sliced off after), block sizes
  are the largest of 512/256/128 dividing the padded T. Under a mesh (`jax.set_mesh`) it runs in
  `jax.shard_map`, batch over the batch axes and heads over 'tensor' where they divide (Mosaic kernels are
  not partitioned automatically). Off TPU the kernel runs in Pallas interpret mode (tests only).
* 'auto': 'cudnn' on NVIDIA GPUs, 'splash' on TPU, 'xla' elsewhere, resolved at trace time from the devices
  of the mesh being compiled for (`target_platform`; compile-only TPU devices on a CPU host get splash). Where
  the backend's kernel cannot run these inputs (float32 compute or an unsupported
  head_dim on GPU) 'auto' uses 'xla' with a one-time warning; an explicit 'cudnn'/'splash' that cannot run
  raises InputError naming `model.attention_impl` instead, at trace time (before any compile).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import PartitionSpec as P

from jaxsft import fields
from jaxsft.errors import InputError

IMPLS = fields.ATTENTION_IMPLS  # ('auto', 'xla', 'cudnn', 'splash'); config.validate checks the name.
DEFAULT_MAX_SEGMENTS = 64  # cuDNN packed layout: runs of equal segment ids per row (see the module docstring).
SPLASH_BLOCKS = (512, 256, 128)  # Candidate splash block sizes, largest first; T is padded to a multiple of 128.
_LANES = 128
XLA_QUERY_BLOCK = 128  # Queries per block of `xla_attention` (fastest measured on CPU at 1024 and 2048 positions).
XLA_MAX_QUERY_BLOCKS = 16  # Past 16 * 128 positions the blocks grow instead (bounds the unrolled program).
_PAD_SEGMENT = np.iinfo(np.int32).min  # Segment id of splash's alignment padding: equal to no real id.
_FIELD = "config field 'model.attention_impl'"
_warned: set[str] = set()


def check_impl(impl: str) -> None:
  """Raises InputError unless `impl` names an attention implementation (the backend is checked at trace time)."""
  if impl not in IMPLS:
    raise InputError(f"{_FIELD} is {impl!r}; expected one of {', '.join(IMPLS)}")


def target_platform() -> str:
  """'cpu' | 'gpu' | 'tpu': the platform of the devices being compiled for.

  Under a mesh (`jax.set_mesh`, also inside jit) that is the mesh's devices, which may be compile-only TPU or
  GPU devices on a CPU host (jaxsft.targets: there `jax.default_backend()` is still 'cpu'); else the default
  backend.
  """
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, 'abstract_device', None)
  platform = getattr(device, 'platform', None) or jax.default_backend()
  return 'gpu' if platform in ('cuda', 'rocm') else platform


def _platform() -> str:
  """`target_platform()`; a function of its own so tests can pretend to be on another backend."""
  return target_platform()


def _cuda_info() -> tuple[tuple[int, int], int] | None:
  """((major, minor) compute capability, cuDNN version) of the first GPU, or None without CUDA and cuDNN."""
  try:
    device = jax.local_devices()[0]
    capability = tuple(int(x) for x in device.compute_capability.split('.'))
    from jax._src.cudnn import fused_attention_stablehlo  # pylint: disable=import-outside-toplevel
    return capability, int(fused_attention_stablehlo.check_cudnn_version())
  except Exception:  # pylint: disable=broad-except  # ROCm, no cuDNN, no compute_capability attribute.
    return None


def _warn_once(message: str) -> None:
  if message not in _warned:
    _warned.add(message)
    logging.warning('%s', message)


def _cudnn_problem(dtype, head_dim: int) -> str | None:
  """Why cuDNN flash attention cannot run here (None: it can)."""
  if _platform() != 'gpu':
    return f'it needs an NVIDIA GPU, and the target platform is {_platform()!r}'
  info = _cuda_info()
  if info is None:
    return 'no CUDA device with cuDNN was found'
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return (f'it computes in bfloat16 or float16, and the attention inputs are {jnp.dtype(dtype).name} '
            '(train with bf16=True, or set model.attention_impl=xla)')
  max_head_dim = 256 if info[0] >= (9, 0) else 128
  if head_dim % 8 or head_dim > max_head_dim:
    return f'it needs head_dim a multiple of 8 and at most {max_head_dim} on this GPU, got {head_dim}'
  return None


def resolve_impl(impl: str, *, dtype, head_dim: int) -> str:
  """The implementation that runs here: 'xla' | 'cudnn' | 'splash'.

  'auto' picks the backend's kernel, or 'xla' (warning once) where that kernel cannot take these inputs; an
  explicit kernel that cannot run raises InputError naming `model.attention_impl`. Callers may use it to fail
  fast before loading weights; `attention` calls it while tracing.
  """
  check_impl(impl)
  if impl == 'xla':
    return 'xla'
  if impl == 'splash' or (impl == 'auto' and _platform() == 'tpu'):
    if _platform() != 'tpu':
      raise InputError(f"{_FIELD} is 'splash': Pallas splash attention needs a TPU, and the target platform is "
                       f'{_platform()!r} (use auto or xla)')
    return 'splash'
  if impl == 'cudnn' or (impl == 'auto' and _platform() == 'gpu'):
    problem = _cudnn_problem(dtype, head_dim)
    if problem is None:
      return 'cudnn'
    if impl == 'cudnn':
      raise InputError(f"{_FIELD} is 'cudnn', but cuDNN flash attention cannot run: {problem}")
    _warn_once(f'attention: auto uses xla, not cuDNN flash attention: {problem}')
  return 'xla'


def attention(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array, segment_ids_BxT: jax.Array, *,
              sliding_window: int | None, impl: str, max_segments: int | None = None) -> jax.Array:
  """Softmax(q kᵀ / sqrt(H) + mask) v, per segment; returns [B, T, N, H] in the dtype of q.

  `max_segments` bounds the runs of equal segment ids per row for cuDNN's packed layout (other
  implementations ignore it).
  """
  chosen = resolve_impl(impl, dtype=q_BxTxNxH.dtype, head_dim=q_BxTxNxH.shape[-1])
  segment_ids_BxT = jnp.asarray(segment_ids_BxT, jnp.int32)
  if chosen == 'cudnn':
    return cudnn_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, sliding_window=sliding_window,
                           max_segments=max_segments)
  if chosen == 'splash':
    return splash_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, sliding_window=sliding_window)
  return xla_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, sliding_window=sliding_window)


# ----------------------------------------------------------------------------------------------------------
# XLA: the reference semantics.


def make_mask(segment_ids_BxT: jax.Array, sliding_window: int | None, *, queries: tuple[int, int] | None = None,
              first_key: int = 0) -> jax.Array:
  """Boolean mask [B, 1, Q, S] (query, key): same segment, causal, and within the window if any.

  For the queries at positions [start, end) (`queries`, default all T) against the keys at [first_key, end).
  """
  segment_ids_BxT = jnp.asarray(segment_ids_BxT)
  start, end = queries if queries is not None else (0, segment_ids_BxT.shape[1])
  q_idx_Qx1 = jnp.arange(start, end, dtype=jnp.int32)[:, None]
  k_idx_1xS = jnp.arange(first_key, end, dtype=jnp.int32)[None, :]
  allowed_QxS = k_idx_1xS <= q_idx_Qx1
  if sliding_window is not None:
    allowed_QxS &= (q_idx_Qx1 - k_idx_1xS) < sliding_window
  same_BxQxS = segment_ids_BxT[:, start:end, None] == segment_ids_BxT[:, None, first_key:end]
  return (same_BxQxS & allowed_QxS[None])[:, None]


def query_blocks(seq_len: int, sliding_window: int | None) -> list[tuple[int, int, int]]:
  """(query start, query end, first key) of each query block of `xla_attention`: keys past a block's last query,
  or before its first query's window, are masked for every query of it, so they are never computed."""
  size = max(XLA_QUERY_BLOCK, -(-seq_len // XLA_MAX_QUERY_BLOCKS))
  blocks = []
  for start in range(0, seq_len, size):
    first_key = 0 if sliding_window is None else max(0, start - sliding_window + 1)
    blocks.append((start, min(start + size, seq_len), first_key))
  return blocks


def xla_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, *, sliding_window: int | None) -> jax.Array:
  """`jax.nn.dot_product_attention` (XLA) one block of queries at a time, each against only the keys it may see.

  Causal attention over T positions in one call computes every (query, key) pair and masks half of them; in
  blocks of Q queries it computes about T * (T + Q) / 2 (T * (w + Q) with a window w), and each block's logits
  stay in cache: on 2 CPU cores a 1024-position micro-batch's attention forward and backward takes 0.12 s in
  blocks of 128 against 0.29 s whole (2048 positions: 0.45 s against 1.22 s). The blocks are unrolled (static
  shapes), at most XLA_MAX_QUERY_BLOCKS of them. Each query's softmax runs over the same unmasked keys as
  whole, so only float summation order differs.
  """
  t = q_BxTxNxH.shape[1]
  segment_ids_BxT = jnp.asarray(segment_ids_BxT, jnp.int32)
  outs = []
  for start, end, first_key in query_blocks(t, sliding_window):
    mask_Bx1xQxS = make_mask(segment_ids_BxT, sliding_window, queries=(start, end), first_key=first_key)
    outs.append(jax.nn.dot_product_attention(q_BxTxNxH[:, start:end], k_BxTxKxH[:, first_key:end],
                                             v_BxTxKxH[:, first_key:end], mask=mask_Bx1xQxS, implementation='xla'))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def cached_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, positions_BxT, *, sliding_window) -> jax.Array:
  """Decoding against a KV cache: the query at position p attends to cache slots s <= p (and p - s < window).

  Slot s of the cache holds position s of the row. `sliding_window` may be traced (a scanned layer's); use a
  window longer than the cache for full attention. XLA's softmax(q kᵀ / sqrt(H)) v, float32 softmax, as
  `xla_attention`; returns [B, T, N, H] in the dtype of q.
  """
  slots_1x1xS = jnp.arange(k_BxSxKxH.shape[1], dtype=jnp.int32)[None, None, :]
  positions_BxTx1 = jnp.asarray(positions_BxT, jnp.int32)[:, :, None]
  allowed_BxTxS = (slots_1x1xS <= positions_BxTx1) & (positions_BxTx1 - slots_1x1xS < sliding_window)
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=allowed_BxTxS[:, None],
                                      implementation='xla')


# ----------------------------------------------------------------------------------------------------------
# cuDNN.


def max_segment_runs(segment_ids_BxT) -> int:
  """The most runs of equal segment ids in any row (host numpy): cuDNN's packed layout needs max_segments >= it."""
  segment_ids_BxT = np.asarray(segment_ids_BxT)
  if segment_ids_BxT.shape[1] == 0:
    return 0
  return int((1 + (segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]).sum(axis=1)).max(initial=0))


def packed_layout(segment_ids_BxT: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """cuDNN's packed-layout description of each row, one sequence per maximal run of equal segment ids.

  Returns (offsets_BxM1, seqlens_BxM, ok_B) with M = max_segments: the start of each run (-1 after the
  last), its length (-1 after the last), and whether the row is described exactly: at most M runs, and
  as many runs as distinct ids (equal ids contiguous, so run-wise attention equals id-wise attention).
  """
  b, t = segment_ids_BxT.shape
  m = max_segments
  start_BxT = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
  runs_B = start_BxT.sum(axis=1, dtype=jnp.int32)
  sorted_BxT = jnp.sort(segment_ids_BxT, axis=1)
  distinct_B = 1 + (sorted_BxT[:, 1:] != sorted_BxT[:, :-1]).sum(axis=1, dtype=jnp.int32)
  ok_B = (runs_B <= m) & (runs_B == distinct_B)
  first_starts = functools.partial(jnp.nonzero, size=m + 1, fill_value=-1)
  offsets_BxM1 = jax.vmap(lambda s_T: first_starts(s_T)[0])(start_BxT).astype(jnp.int32)
  starts_BxM = offsets_BxM1[:, :m]
  next_BxM = offsets_BxM1[:, 1:]
  ends_BxM = jnp.where(next_BxM >= 0, next_BxM, t)
  seqlens_BxM = jnp.where(starts_BxM >= 0, ends_BxM - starts_BxM, -1).astype(jnp.int32)
  offsets_BxM1 = offsets_BxM1.at[:, m].set(-1)  # A row with more than M runs is flagged (ok_B) and cut here.
  return offsets_BxM1, seqlens_BxM, ok_B


def _packed_supported() -> bool:
  """cuDNN's packed layout needs a Hopper or newer GPU and cuDNN >= 9.6 (jax's own test gates)."""
  info = _cuda_info()
  return info is not None and info[0] >= (9, 0) and info[1] >= 90600


def _cudnn_packed_kernel(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, seqlens_BxM, offsets_BxM1, *, sliding_window):
  """cuDNN flash attention over the packed sequences (kept apart so CPU tests can substitute an emulation)."""
  from jax._src.cudnn import fused_attention_stablehlo as sdpa  # pylint: disable=import-outside-toplevel
  return sdpa.dot_product_attention(
      q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, q_seqlen=seqlens_BxM, kv_seqlen=seqlens_BxM, q_offsets=offsets_BxM1,
      kv_offsets=offsets_BxM1, scale=1.0 / math.sqrt(q_BxTxNxH.shape[-1]), mask_type=sdpa.MaskType.PADDING_CAUSAL,
      qkv_layout='BTNH', sliding_window_length=sliding_window)


def cudnn_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, *, sliding_window: int | None,
                    max_segments: int | None = None) -> jax.Array:
  """cuDNN flash attention with segments: the packed layout where supported, else the mask as a cuDNN bias."""
  if not _packed_supported():
    _warn_once('attention: cuDNN packed sequences need Hopper and cuDNN >= 9.6; using cuDNN with the segment '
               'mask as a bias (O(B*T^2) memory)')
    mask_Bx1xTxT = make_mask(segment_ids_BxT, sliding_window)
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=mask_Bx1xTxT, is_causal=True,
                                        implementation='cudnn')
  _, t, n, _ = q_BxTxNxH.shape
  m = max(2, min(max_segments or DEFAULT_MAX_SEGMENTS, t))  # M = 1 would not be the packed layout.
  offsets_BxM1, seqlens_BxM, ok_B = packed_layout(segment_ids_BxT, m)
  groups = n // k_BxTxKxH.shape[2]
  k_BxTxNxH = jnp.repeat(k_BxTxKxH, groups, axis=2) if groups > 1 else k_BxTxKxH
  v_BxTxNxH = jnp.repeat(v_BxTxKxH, groups, axis=2) if groups > 1 else v_BxTxKxH
  out_BxTxNxH = _cudnn_packed_kernel(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, seqlens_BxM, offsets_BxM1,
                                     sliding_window=sliding_window)
  return jnp.where(ok_B[:, None, None, None], out_BxTxNxH, jnp.nan).astype(q_BxTxNxH.dtype)


# ----------------------------------------------------------------------------------------------------------
# TPU splash attention.


def splash_block_size(seq_len: int) -> int:
  """The splash block size for a (128-padded) sequence length: the largest of SPLASH_BLOCKS dividing it."""
  padded = -(-seq_len // _LANES) * _LANES
  return next(b for b in SPLASH_BLOCKS if padded % b == 0)


def splash_mask(seq_len: int, num_heads: int, sliding_window: int | None):
  """The static splash mask: causal, or local (t - s < w, i.e. window (w - 1, 0)), for every head."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=import-outside-toplevel
  if sliding_window is None:
    head_mask = sa.CausalMask((seq_len, seq_len))
  else:
    head_mask = sa.LocalMask((seq_len, seq_len), window_size=(sliding_window - 1, 0), offset=0)
  return sa.MultiHeadMask([head_mask] * num_heads)


def _splash_kernel(seq_len: int, num_heads: int, sliding_window: int | None, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=import-outside-toplevel
  block = splash_block_size(seq_len)
  sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  return sa.make_splash_mha(splash_mask(seq_len, num_heads, sliding_window), block_sizes=sizes, head_shards=1,
                            q_seq_shards=1, interpret=interpret)


def _splash_local(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids_BxT, *, sliding_window, interpret):
  """Splash on one device's shard (T already a multiple of 128, q already scaled)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=import-outside-toplevel
  kernel = _splash_kernel(q_BxNxTxH.shape[2], q_BxNxTxH.shape[1], sliding_window, interpret)

  def one_row(q_NxTxH, k_KxTxH, v_KxTxH, seg_T):
    return kernel(q_NxTxH, k_KxTxH, v_KxTxH, segment_ids=sa.SegmentIds(q=seg_T, kv=seg_T))

  return jax.vmap(one_row)(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids_BxT)


def _splash_specs(batch: int, num_heads: int, num_kv_heads: int):
  """(batch axes or None, head axis or None) of the current mesh for splash's shard_map; None: no mesh."""
  from jaxsft import sharding  # pylint: disable=import-outside-toplevel
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  batch_axes = tuple(a for a in sharding.BATCH_AXES if a in mesh.axis_names)
  if batch % math.prod(mesh.shape[a] for a in batch_axes):
    batch_axes = ()
  tensor = mesh.shape.get('tensor', 1)
  head_axis = 'tensor' if tensor > 1 and not num_heads % tensor and not num_kv_heads % tensor else None
  return (batch_axes or None), head_axis


def splash_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, *, sliding_window: int | None) -> jax.Array:
  """Pallas splash attention (TPU; interpret mode elsewhere), same semantics as `xla_attention`."""
  b, t, n, h = q_BxTxNxH.shape
  pad = -t % _LANES
  scale = 1.0 / math.sqrt(h)
  q_BxNxTxH = jnp.transpose((q_BxTxNxH.astype(jnp.float32) * scale).astype(q_BxTxNxH.dtype), (0, 2, 1, 3))
  k_BxKxTxH = jnp.transpose(k_BxTxKxH, (0, 2, 1, 3))
  v_BxKxTxH = jnp.transpose(v_BxTxKxH, (0, 2, 1, 3))
  if pad:
    widths = ((0, 0), (0, 0), (0, pad), (0, 0))
    q_BxNxTxH, k_BxKxTxH, v_BxKxTxH = (jnp.pad(x, widths) for x in (q_BxNxTxH, k_BxKxTxH, v_BxKxTxH))
    segment_ids_BxT = jnp.pad(segment_ids_BxT, ((0, 0), (0, pad)), constant_values=_PAD_SEGMENT)
  # Interpret mode off TPU (tests; `_platform` may be patched there, the real target decides this).
  local = functools.partial(_splash_local, sliding_window=sliding_window, interpret=target_platform() != 'tpu')
  specs = _splash_specs(b, n, k_BxTxKxH.shape[2])
  if specs is not None:
    batch_axes, head_axis = specs
    heads = P(batch_axes, head_axis, None, None)
    local = jax.shard_map(local, in_specs=(heads, heads, heads, P(batch_axes, None)), out_specs=heads,
                          check_vma=False)
  out_BxNxTxH = local(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids_BxT)
  return jnp.transpose(out_BxNxTxH[:, :, :t], (0, 2, 1, 3)).astype(q_BxTxNxH.dtype)
