"""One Flax NNX decoder for Llama, Qwen2/2.5, Qwen3 and Mistral, selected by flags rather than copies.

The block is the Llama one: RMSNorm → grouped-query attention with RoPE → residual → RMSNorm → SwiGLU MLP →
residual, then a final RMSNorm and the unembedding. The families differ only in flags of `ModelConfig`:
q/k/v bias (Qwen2), o and MLP bias (Llama `attention_bias` / `mlp_bias`), per-head q/k RMSNorm (Qwen3),
tied embeddings, per-layer sliding windows (Mistral, Qwen2/3), and the RoPE variant ('default', 'linear',
'llama3', 'yarn'; jaxsft.models.rope computes them exactly as transformers' `modeling_rope_utils` does).

Numerics follow transformers: RMSNorm normalises in float32 and casts back before the scale; RoPE angles are
float32 and cast to the compute dtype; attention softmax is float32. Parameters are stored in
`cfg.param_dtype` and cast to `cfg.dtype` where used; `__call__` returns float32 logits.

Parameter names mirror Hugging Face (`layers.3.self_attn.q_proj.kernel`), so conversion is a rename plus a
transpose (see `jaxsft.models.hf_layout`). Every parameter carries logical axis names as `out_sharding`
metadata (created with `eager_sharding=False`: the model builds without a mesh or axis rules;
`jaxsft.sharding` turns the names into shardings).

`scan_layers=True` stores the decoder layers as one `DecoderLayer` whose parameters are stacked on a leading
axis named 'layers' (`layers.self_attn.q_proj.kernel` is [L, embed, q_heads, head_dim]) and applies them with
`nnx.scan`, so the traced program, the HLO and the compile time do not grow with depth. The stacked values are
the per-layer values of the unscanned model of the same seed, stacked: the layout changes, not the model.
Layers whose sliding windows differ (Qwen2 `max_window_layers` / `layer_types`) get a scanned int32 index into
the model's distinct windows, and `lax.switch` picks the attention of that window, so every attention
implementation still sees a static window.

`remat` names a rematerialisation policy (jaxsft.models.remat: which of the projection outputs tagged here
with `checkpoint_name` a layer keeps for the backward pass); each layer runs under that policy's `nnx.remat`
(none for 'none').

Decoding (`prefill`, `decode`; used by `jaxsft.generate`, never by training) keeps a KV cache {'key',
'value'} of [L, B, S, K, H] in the compute dtype, slot s holding position s of the row. `prefill` runs
right-padded prompts through the same attention as training (padding is segment 0) and writes each layer's
rotated keys and values; `decode` takes one token per row at per-row positions, writes its key and value to
that slot and attends to the slots at or before it (within the layer's window). Under scan the cache travels
through the layer scan as per-layer xs/ys; on a mesh it is split over the batch axes and its kv heads over
'tensor' where they divide.
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxsft import sharding
from jaxsft.errors import InputError
from jaxsft.models import attention as attention_lib
from jaxsft.models import lora as lora_lib
from jaxsft.models import mlp as mlp_lib
from jaxsft.models import projection
from jaxsft.models import remat as remat_lib
from jaxsft.models import rope
# Names that used to live here, still imported from here (jaxsft/config.py, tests); new code imports their homes.

LAYERS_AXIS = 'layers'  # Logical name of the stacked-layer axis under scan_layers.
INIT_STD = projection.INIT_STD
_param = projection.param
Dense = projection.Dense
_NO_WINDOW = 2**30  # The window of a full-attention layer in the decoding mask (longer than any cache).


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The architecture; hashable, so it can be a static argument of `jax.jit`."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  # Sorted items of HF `rope_parameters` minus `rope_theta` (rope_type included); None = default RoPE.
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  tie_word_embeddings: bool = False
  sliding_windows: tuple[int | None, ...] | None = None  # Per layer; None = full attention everywhere.
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  attention_impl: str = 'xla'
  remat: str = 'none'
  scan_layers: bool = False
  mlp_chunk_size: int = 0  # Sequence positions per MLP tile (models/mlp.py); 0 = untiled.
  # Most documents (runs of equal segment ids, padding included) in one row: cuDNN's packed attention layout
  # is sized by it (None: attention.DEFAULT_MAX_SEGMENTS). The trainer sets it from the packing plan.
  max_segments: int | None = None

  def __post_init__(self):
    for name in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_layers', 'num_heads', 'num_kv_heads',
                 'head_dim'):
      if int(getattr(self, name)) < 1:
        raise InputError(f'model config: {name} must be positive, got {getattr(self, name)}')
    if self.num_heads % self.num_kv_heads:
      raise InputError(f'model config: num_heads ({self.num_heads}) is not a multiple of num_kv_heads '
                       f'({self.num_kv_heads})')
    remat_lib.check_policy(self.remat)
    attention_lib.check_impl(self.attention_impl)
    for name in ('dtype', 'param_dtype'):
      value = getattr(self, name)
      if value not in ('float32', 'bfloat16', 'float16'):
        raise InputError(f"model config: {name} is {value!r}; expected 'float32', 'bfloat16' or 'float16'")
    if self.sliding_windows is not None:
      if len(self.sliding_windows) != self.num_layers:
        raise InputError(f'model config: sliding_windows has {len(self.sliding_windows)} entries for '
                         f'{self.num_layers} layers')
      if any(w is not None and w < 1 for w in self.sliding_windows):
        raise InputError(f'model config: sliding windows must be positive, got {self.sliding_windows}')
    rope.rope_frequencies(self)  # Raises InputError for a RoPE variant that is not implemented.

  def window(self, layer: int) -> int | None:
    """The sliding window of `layer` (None: full causal attention)."""
    return None if self.sliding_windows is None else self.sliding_windows[layer]

  def distinct_windows(self) -> tuple[int | None, ...]:
    """The model's distinct sliding windows, in order of first use (a scanned layer chooses among them)."""
    return tuple(dict.fromkeys(self.window(i) for i in range(self.num_layers)))


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis: normalised in float32, cast to the compute dtype, then scaled (as HF)."""

  def __init__(self, dim: int, eps: float, *, dtype: str, param_dtype: str):
    self.eps = eps
    self.dtype = dtype
    self.scale = _param(jnp.ones((dim,), param_dtype), ('norm',))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(self.dtype)
    return self.scale[...].astype(self.dtype) * normed


class Embed(nnx.Module):
  """Token embedding table [vocab, embed]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.dtype = cfg.dtype
    init = jax.nn.initializers.normal(INIT_STD)
    self.embedding = _param(init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), jnp.dtype(cfg.param_dtype)),
                            ('vocab', 'embed'))

  def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
    # mode='clip': an out-of-range id gives a finite row, never NaN (jnp.take's default fills with NaN).
    return jnp.take(self.embedding[...], tokens_BxT, axis=0, mode='clip').astype(self.dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE, optional q/k/v/o bias and per-head q/k RMSNorm.

  `windows` are the sliding windows this module may apply (None: full attention): one for an unscanned layer;
  under scan, the model's distinct windows, chosen per layer by `window_index`.
  """

  def __init__(self, cfg: ModelConfig, windows: tuple[int | None, ...], *, rngs: nnx.Rngs):
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    qkv_bias = cfg.qkv_bias
    self.q_proj = Dense('btd,dnh->btnh', (d, n, h), ('embed', 'q_heads', 'head_dim'),
                        (n, h) if qkv_bias else None, ('q_heads', 'head_dim'), **kw)
    self.k_proj = Dense('btd,dkh->btkh', (d, k, h), ('embed', 'kv_heads', 'head_dim'),
                        (k, h) if qkv_bias else None, ('kv_heads', 'head_dim'), **kw)
    self.v_proj = Dense('btd,dkh->btkh', (d, k, h), ('embed', 'kv_heads', 'head_dim'),
                        (k, h) if qkv_bias else None, ('kv_heads', 'head_dim'), **kw)
    self.o_proj = Dense('btnh,nhd->btd', (n, h, d), ('q_heads', 'head_dim', 'embed'),
                        (d,) if cfg.o_bias else None, ('embed',), **kw)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(h, cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
      self.k_norm = RMSNorm(h, cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    else:
      self.q_norm = self.k_norm = None
    self.windows = tuple(windows)
    self.impl = cfg.attention_impl
    self.max_segments = cfg.max_segments

  def __call__(self, x_BxTxD, cos_BxTx1xH, sin_BxTx1xH, segment_ids_BxT, window_index=None):
    q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = self._project(x_BxTxD, cos_BxTx1xH, sin_BxTx1xH)
    out_BxTxNxH = checkpoint_name(self._attend(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, window_index),
                                  'context')
    return checkpoint_name(self.o_proj(out_BxTxNxH), 'out_proj')

  def _project(self, x_BxTxD, cos_BxTx1xH, sin_BxTx1xH):
    """(q, k, v) of `x`: projected, q/k-normed where the model has it, q and k rotated."""
    q_BxTxNxH = checkpoint_name(self.q_proj(x_BxTxD), 'query_proj')
    k_BxTxKxH = checkpoint_name(self.k_proj(x_BxTxD), 'key_proj')
    v_BxTxKxH = checkpoint_name(self.v_proj(x_BxTxD), 'value_proj')
    if self.q_norm is not None:
      q_BxTxNxH = self.q_norm(q_BxTxNxH)
      k_BxTxKxH = self.k_norm(k_BxTxKxH)
    q_BxTxNxH = rope.rotate(q_BxTxNxH, cos_BxTx1xH, sin_BxTx1xH)
    k_BxTxKxH = rope.rotate(k_BxTxKxH, cos_BxTx1xH, sin_BxTx1xH)
    return q_BxTxNxH, k_BxTxKxH, v_BxTxKxH

  def prefill(self, x_BxPxD, cos_BxPx1xH, sin_BxPx1xH, segment_ids_BxP, cache_len: int, window_index=None):
    """`__call__` that also returns the rotated keys and the values, zero-padded to `cache_len` slots."""
    q_BxPxNxH, k_BxPxKxH, v_BxPxKxH = self._project(x_BxPxD, cos_BxPx1xH, sin_BxPx1xH)
    out_BxPxNxH = self._attend(q_BxPxNxH, k_BxPxKxH, v_BxPxKxH, segment_ids_BxP, window_index)
    pad = ((0, 0), (0, cache_len - x_BxPxD.shape[1]), (0, 0), (0, 0))
    k_BxSxKxH = _constrain_cache(jnp.pad(k_BxPxKxH, pad))
    v_BxSxKxH = _constrain_cache(jnp.pad(v_BxPxKxH, pad))
    return self.o_proj(out_BxPxNxH), k_BxSxKxH, v_BxSxKxH

  def decode(self, x_Bx1xD, cos_Bx1x1xH, sin_Bx1x1xH, positions_B, k_BxSxKxH, v_BxSxKxH, window_index=None):
    """One token per row at `positions_B`: writes its key and value into the cache slot of that position,
    then attends to the slots at or before it (within the layer's window). Returns (out, k cache, v cache)."""
    q_Bx1xNxH, k_Bx1xKxH, v_Bx1xKxH = self._project(x_Bx1xD, cos_Bx1x1xH, sin_Bx1x1xH)
    rows_B = jnp.arange(x_Bx1xD.shape[0])
    k_BxSxKxH = _constrain_cache(k_BxSxKxH.at[rows_B, positions_B].set(k_Bx1xKxH[:, 0]))
    v_BxSxKxH = _constrain_cache(v_BxSxKxH.at[rows_B, positions_B].set(v_Bx1xKxH[:, 0]))
    windows_W = jnp.asarray([_NO_WINDOW if w is None else w for w in self.windows], jnp.int32)
    window = windows_W[0 if window_index is None else window_index]
    out_Bx1xNxH = attention_lib.cached_attention(q_Bx1xNxH, k_BxSxKxH, v_BxSxKxH, positions_B[:, None],
                                                 sliding_window=window)
    return self.o_proj(out_Bx1xNxH), k_BxSxKxH, v_BxSxKxH

  def _attend(self, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, window_index):
    branches = [functools.partial(attention_lib.attention, sliding_window=w, impl=self.impl,
                                  max_segments=self.max_segments) for w in self.windows]
    if len(branches) == 1:
      return branches[0](q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
    return jax.lax.switch(window_index, branches, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.))."""

  def __init__(self, cfg: ModelConfig, windows: tuple[int | None, ...], *, rngs: nnx.Rngs):
    norm = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
    self.self_attn = Attention(cfg, windows, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
    self.mlp = mlp_lib.MLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias, chunk_size=cfg.mlp_chunk_size,
                           dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

  def __call__(self, x_BxTxD, cos_BxTx1xH, sin_BxTx1xH, segment_ids_BxT, window_index=None):
    attn_BxTxD = self.self_attn(self.input_layernorm(x_BxTxD), cos_BxTx1xH, sin_BxTx1xH, segment_ids_BxT,
                                window_index)
    h_BxTxD = x_BxTxD + attn_BxTxD
    return h_BxTxD + self.mlp(self.post_attention_layernorm(h_BxTxD))

  def prefill(self, x_BxPxD, cos_BxPx1xH, sin_BxPx1xH, segment_ids_BxP, cache_len: int, window_index=None):
    """`__call__` that also returns the layer's keys and values padded to `cache_len` (see Attention.prefill)."""
    attn_BxPxD, k_BxSxKxH, v_BxSxKxH = self.self_attn.prefill(
        self.input_layernorm(x_BxPxD), cos_BxPx1xH, sin_BxPx1xH, segment_ids_BxP, cache_len, window_index)
    h_BxPxD = x_BxPxD + attn_BxPxD
    return sharding.constrain_batch(h_BxPxD + self.mlp(self.post_attention_layernorm(h_BxPxD))), k_BxSxKxH, v_BxSxKxH

  def decode(self, x_Bx1xD, cos_Bx1x1xH, sin_Bx1x1xH, positions_B, k_BxSxKxH, v_BxSxKxH, window_index=None):
    """One decoding step of the layer against its cache (see Attention.decode)."""
    attn_Bx1xD, k_BxSxKxH, v_BxSxKxH = self.self_attn.decode(
        self.input_layernorm(x_Bx1xD), cos_Bx1x1xH, sin_Bx1x1xH, positions_B, k_BxSxKxH, v_BxSxKxH, window_index)
    h_Bx1xD = x_Bx1xD + attn_Bx1xD
    return sharding.constrain_batch(h_Bx1xD + self.mlp(self.post_attention_layernorm(h_Bx1xD))), k_BxSxKxH, v_BxSxKxH


def _constrain_cache(x_BxSxKxH: jax.Array) -> jax.Array:
  """Pins a layer's cache to the batch mesh axes (rows) and 'tensor' (kv heads) where they divide; no mesh: x."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(sharding.BATCH_AXES) <= set(mesh.axis_names):
    return x_BxSxKxH
  rows = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  batch_axes = sharding.BATCH_AXES if x_BxSxKxH.shape[0] % rows == 0 else None
  tensor = mesh.shape.get('tensor', 1)
  head_axis = 'tensor' if tensor > 1 and x_BxSxKxH.shape[2] % tensor == 0 else None
  return jax.lax.with_sharding_constraint(x_BxSxKxH, jax.sharding.PartitionSpec(batch_axes, None, head_axis, None))


def _apply_layer(layer: DecoderLayer, x_BxTxD, cos_BxTx1xH, sin_BxTx1xH, segment_ids_BxT, window_index=None):
  return sharding.constrain_batch(layer(x_BxTxD, cos_BxTx1xH, sin_BxTx1xH, segment_ids_BxT, window_index))


@functools.lru_cache(maxsize=None)
def _layer_fn(remat: str, scanned: bool):
  """`_apply_layer` under `remat`'s `jax.checkpoint` policy (unchanged for 'none').

  Inside a scan, common-subexpression elimination across the checkpoint cannot happen (each iteration is its
  own loop body), so `prevent_cse` is off there, as MaxText and JAX's remat notes advise.
  """
  if remat == 'none':
    return _apply_layer
  return nnx.remat(_apply_layer, policy=remat_lib.remat_policy(remat), prevent_cse=not scanned)


def _stack_layers(layers: list[DecoderLayer]) -> DecoderLayer:
  """One DecoderLayer whose parameters are `layers`' stacked on a leading axis, logically named 'layers'."""
  graphdef = nnx.graphdef(layers[0])
  states = [nnx.state(layer) for layer in layers]

  def stack(*variables):
    value = jnp.stack([v.get_value() for v in variables])
    names = variables[0].get_metadata().get('out_sharding')
    stacked = variables[0].replace(value=value)
    if names:
      stacked.set_metadata(out_sharding=(LAYERS_AXIS,) + tuple(names))
    return stacked

  stacked = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, stacked)


class Transformer(nnx.Module):
  """The decoder-only language model.

  Inputs are int32 [B, T]: token ids, RoPE positions (restarting at 0 per document) and segment ids
  (0 = padding, 1..n = document). Token t attends to s iff s <= t, seg[s] == seg[t] and, in a layer with a
  sliding window w, t - s < w.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_tokens = Embed(cfg, rngs=rngs)
    if cfg.scan_layers:
      # Built one by one from the same key stream as the unscanned model, then stacked: the same seed gives
      # the same weights in either layout.
      windows = cfg.distinct_windows()
      self.layers = _stack_layers([DecoderLayer(cfg, windows, rngs=rngs) for _ in range(cfg.num_layers)])
    else:
      self.layers = nnx.List([DecoderLayer(cfg, (cfg.window(i),), rngs=rngs) for i in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    if cfg.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = Dense('btd,dv->btv', (cfg.hidden_size, cfg.vocab_size), ('embed', 'vocab'), None, None,
                           dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

  def hidden_states(self, tokens_BxT: jax.Array, positions_BxT: jax.Array,
                    segment_ids_BxT: jax.Array) -> jax.Array:
    """Final-norm hidden states [B, T, D] in the compute dtype."""
    segment_ids_BxT = jnp.asarray(segment_ids_BxT)
    x_BxTxD = sharding.constrain_batch(self.embed_tokens(jnp.asarray(tokens_BxT)))
    cos_BxTx1xH, sin_BxTx1xH = rope.cos_sin(self.cfg, positions_BxT)
    apply = _layer_fn(self.cfg.remat, self.cfg.scan_layers)
    if self.cfg.scan_layers:
      x_BxTxD = self._scan_layers(apply, x_BxTxD, cos_BxTx1xH, sin_BxTx1xH, segment_ids_BxT)
    else:
      for layer in self.layers:
        x_BxTxD = apply(layer, x_BxTxD, cos_BxTx1xH, sin_BxTx1xH, segment_ids_BxT)
    return self.norm(x_BxTxD)

  def _scan_layers(self, apply, x_BxTxD, cos_BxTx1xH, sin_BxTx1xH, segment_ids_BxT):
    """The stacked layers applied in a `nnx.scan` (one traced body whatever the depth)."""

    @nnx.scan(in_axes=(0, nnx.Carry, None, None, None, 0, 0), out_axes=nnx.Carry,
              transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
    def body(layer, x_BxTxD, cos_BxTx1xH, sin_BxTx1xH, segment_ids_BxT, window_index, layer_index):
      with lora_lib.layer_scope(layer_index):  # Each layer's LoRA dropout masks its own (one traced body).
        return apply(layer, x_BxTxD, cos_BxTx1xH, sin_BxTx1xH, segment_ids_BxT, window_index)

    return body(self.layers, x_BxTxD, cos_BxTx1xH, sin_BxTx1xH, segment_ids_BxT, self._window_index_L(),
                jnp.arange(self.cfg.num_layers, dtype=jnp.int32))

  def unembedding(self) -> jax.Array:
    """The output projection [D, V] in the compute dtype (the embedding table transposed when tied)."""
    if self.lm_head is None:
      return self.embed_tokens.embedding[...].astype(self.cfg.dtype).T
    return self.lm_head.kernel[...].astype(self.cfg.dtype)

  def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array, segment_ids_BxT: jax.Array) -> jax.Array:
    """Logits [B, T, V] in float32."""
    hidden_BxTxD = self.hidden_states(tokens_BxT, positions_BxT, segment_ids_BxT)
    return jnp.einsum('btd,dv->btv', hidden_BxTxD, self.unembedding(), preferred_element_type=jnp.float32)

  # --------------------------------------------------------------------------------------------------------
  # Decoding with a KV cache (jaxsft.generate). The training path above does not use these.

  def prefill(self, tokens_BxP: jax.Array, lengths_B: jax.Array, cache_len: int) -> tuple[jax.Array, dict]:
    """Runs right-padded prompts (row b's tokens are tokens_BxP[b, :lengths_B[b]]) and starts their cache.

    Returns the float32 logits [B, V] at each row's last prompt token and the cache {'key', 'value'}, each
    [L, B, cache_len, K, H] in the compute dtype, slot s holding position s (prompt padding slots hold
    padding's keys: decoding overwrites them before it can attend to them).
    """
    batch, prompt_len = tokens_BxP.shape
    if cache_len < prompt_len:
      raise ValueError(f'cache_len {cache_len} is shorter than the prompt buffer {prompt_len}')
    positions_BxP = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
    segment_ids_BxP = (positions_BxP < lengths_B[:, None]).astype(jnp.int32)  # Padding: segment 0, apart.
    x_BxPxD = sharding.constrain_batch(self.embed_tokens(tokens_BxP))
    cos_BxPx1xH, sin_BxPx1xH = rope.cos_sin(self.cfg, positions_BxP)
    if self.cfg.scan_layers:
      @nnx.scan(in_axes=(0, nnx.Carry, None, None, None, 0), out_axes=(nnx.Carry, 0, 0),
                transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
      def body(layer, x_BxPxD, cos_BxPx1xH, sin_BxPx1xH, segment_ids_BxP, window_index):
        return layer.prefill(x_BxPxD, cos_BxPx1xH, sin_BxPx1xH, segment_ids_BxP, cache_len, window_index)

      x_BxPxD, k_LxBxSxKxH, v_LxBxSxKxH = body(self.layers, x_BxPxD, cos_BxPx1xH, sin_BxPx1xH, segment_ids_BxP,
                                               self._window_index_L())
    else:
      keys, values = [], []
      for layer in self.layers:
        x_BxPxD, k_BxSxKxH, v_BxSxKxH = layer.prefill(x_BxPxD, cos_BxPx1xH, sin_BxPx1xH, segment_ids_BxP,
                                                      cache_len)
        keys.append(k_BxSxKxH)
        values.append(v_BxSxKxH)
      k_LxBxSxKxH, v_LxBxSxKxH = jnp.stack(keys), jnp.stack(values)
    last_BxD = jnp.take_along_axis(x_BxPxD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return self._last_logits(last_BxD), {'key': k_LxBxSxKxH, 'value': v_LxBxSxKxH}

  def decode(self, tokens_B: jax.Array, positions_B: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """One token per row at `positions_B`: float32 logits [B, V] of the next token, and the updated cache.

    Row b's key and value are written to slot positions_B[b] of every layer's cache, and the token attends to
    slots s <= positions_B[b] (and positions_B[b] - s < w in a layer with sliding window w).
    """
    x_Bx1xD = sharding.constrain_batch(self.embed_tokens(tokens_B[:, None]))
    cos_Bx1x1xH, sin_Bx1x1xH = rope.cos_sin(self.cfg, positions_B[:, None])
    k_LxBxSxKxH, v_LxBxSxKxH = cache['key'], cache['value']
    if self.cfg.scan_layers:
      @nnx.scan(in_axes=(0, nnx.Carry, None, None, None, 0, 0, 0), out_axes=(nnx.Carry, 0, 0),
                transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
      def body(layer, x_Bx1xD, cos_Bx1x1xH, sin_Bx1x1xH, positions_B, k_BxSxKxH, v_BxSxKxH, window_index):
        return layer.decode(x_Bx1xD, cos_Bx1x1xH, sin_Bx1x1xH, positions_B, k_BxSxKxH, v_BxSxKxH, window_index)

      x_Bx1xD, k_LxBxSxKxH, v_LxBxSxKxH = body(self.layers, x_Bx1xD, cos_Bx1x1xH, sin_Bx1x1xH, positions_B,
                                               k_LxBxSxKxH, v_LxBxSxKxH, self._window_index_L())
    else:
      keys, values = [], []
      for i, layer in enumerate(self.layers):
        x_Bx1xD, k_BxSxKxH, v_BxSxKxH = layer.decode(x_Bx1xD, cos_Bx1x1xH, sin_Bx1x1xH, positions_B,
                                                     k_LxBxSxKxH[i], v_LxBxSxKxH[i])
        keys.append(k_BxSxKxH)
        values.append(v_BxSxKxH)
      k_LxBxSxKxH, v_LxBxSxKxH = jnp.stack(keys), jnp.stack(values)
    return self._last_logits(x_Bx1xD[:, 0]), {'key': k_LxBxSxKxH, 'value': v_LxBxSxKxH}

  def _window_index_L(self) -> jax.Array:
    """Per layer, the index of its sliding window among `cfg.distinct_windows()` (the scanned layers' switch)."""
    windows = self.cfg.distinct_windows()
    return jnp.asarray([windows.index(self.cfg.window(i)) for i in range(self.cfg.num_layers)], jnp.int32)

  def _last_logits(self, x_BxD: jax.Array) -> jax.Array:
    """Float32 logits [B, V] of last-layer hidden states (before the final norm)."""
    return jnp.einsum('bd,dv->bv', self.norm(x_BxD), self.unembedding(), preferred_element_type=jnp.float32)
