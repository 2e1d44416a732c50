"""Rotary position embeddings (RoPE): the frequencies, the cos/sin tables of given positions, the rotation.

The variants ('default', 'linear', 'llama3', 'yarn'; `ROPE_TYPES`) are computed exactly as transformers'
`modeling_rope_utils` computes them: float32 arithmetic with Python-float scalars, in transformers' order of
operations (tests/test_model.py compares the frequencies). The angles are float32 and the tables are cast to the
compute dtype; the rotation is HF's half-split `rotate_half` layout.

The functions take the model's `ModelConfig` (jaxsft.models.transformer), reading `head_dim`, `rope_theta`,
`rope_scaling` (the sorted items of HF `rope_parameters` minus `rope_theta`; None = default RoPE) and `dtype`.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.errors import InputError

ROPE_TYPES = ('default', 'linear', 'llama3', 'yarn')


@functools.lru_cache(maxsize=64)
def rope_frequencies(cfg) -> tuple[np.ndarray, float]:
  """(inv_freq float32 [head_dim / 2], attention_scaling), as transformers' RoPE init functions compute them.

  The arithmetic is float32 with Python-float scalars, in transformers' order of operations, so the
  frequencies equal transformers' (tests/test_model.py compares them).

  Raises:
    InputError: a RoPE variant that is not implemented, or one missing a parameter it needs.
  """
  params = dict(cfg.rope_scaling or ())
  rope_type = params.get('rope_type', 'default')
  if rope_type not in ROPE_TYPES:
    raise InputError(f'rope_parameters.rope_type {rope_type!r} is not supported; '
                     f'supported: {", ".join(ROPE_TYPES)}')
  if params.get('partial_rotary_factor', 1.0) != 1.0:
    raise InputError(f'rope_parameters.partial_rotary_factor {params["partial_rotary_factor"]} is not supported')
  dim = cfg.head_dim
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  # base ** exponent, correctly rounded to float32 (torch's vectorised float32 pow is within 1 ulp of it).
  pos_freqs = (np.float64(cfg.rope_theta) ** exponents.astype(np.float64)).astype(np.float32)
  inv_freq = np.float32(1.0) / pos_freqs

  def need(key):
    if params.get(key) is None:
      raise InputError(f'rope_parameters.{key} is required for rope_type {rope_type!r}')
    return params[key]

  scaling = 1.0
  if rope_type == 'linear':
    inv_freq = inv_freq / np.float32(need('factor'))
  elif rope_type == 'llama3':
    factor = float(need('factor'))
    low_freq_factor = float(need('low_freq_factor'))
    high_freq_factor = float(need('high_freq_factor'))
    old_context_len = float(need('original_max_position_embeddings'))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    inv_freq_llama = np.where(wavelen > np.float32(low_freq_wavelen), inv_freq / np.float32(factor), inv_freq)
    smooth = (np.float32(old_context_len) / wavelen - np.float32(low_freq_factor)) / np.float32(
        high_freq_factor - low_freq_factor)
    smoothed = (np.float32(1) - smooth) * inv_freq_llama / np.float32(factor) + smooth * inv_freq_llama
    is_medium = ~(wavelen < np.float32(high_freq_wavelen)) & ~(wavelen > np.float32(low_freq_wavelen))
    inv_freq = np.where(is_medium, smoothed, inv_freq_llama)
  elif rope_type == 'yarn':
    inv_freq, scaling = _yarn(params, dim, float(cfg.rope_theta), pos_freqs)
  return np.asarray(inv_freq, np.float32), float(scaling)


def _yarn(params: dict, dim: int, base: float, pos_freqs: np.ndarray) -> tuple[np.ndarray, float]:
  """YaRN frequencies and attention factor (transformers' `_compute_yarn_parameters`)."""
  factor = params.get('factor')
  original = params.get('original_max_position_embeddings')
  if factor is None or original is None:
    raise InputError("rope_parameters.factor and rope_parameters.original_max_position_embeddings are "
                     "required for rope_type 'yarn'")
  factor = float(factor)
  mscale, mscale_all_dim = params.get('mscale'), params.get('mscale_all_dim')

  def get_mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attention_factor = params.get('attention_factor')
  if attention_factor is None:
    if mscale and mscale_all_dim:
      attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
    else:
      attention_factor = get_mscale(factor)
  beta_fast = params.get('beta_fast') or 32
  beta_slow = params.get('beta_slow') or 1

  def correction_dim(num_rotations):
    return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if params.get('truncate', True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # transformers' guard against a zero-width ramp.
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
  extrapolation_factor = np.float32(1) - ramp
  inv_extrapolation = np.float32(1.0) / pos_freqs
  inv_interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
  inv_freq = (inv_interpolation * (np.float32(1) - extrapolation_factor)
              + inv_extrapolation * extrapolation_factor)
  return inv_freq, float(attention_factor)


def cos_sin(cfg, positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(cos, sin) [B, T, 1, head_dim] of `positions_BxT` in the compute dtype, times the attention scaling."""
  inv_freq, scaling = rope_frequencies(cfg)
  freqs_BxTxH2 = jnp.asarray(positions_BxT).astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb_BxTxH = jnp.concatenate([freqs_BxTxH2, freqs_BxTxH2], axis=-1)
  cos_BxTxH = jnp.cos(emb_BxTxH)
  sin_BxTxH = jnp.sin(emb_BxTxH)
  if scaling != 1.0:
    cos_BxTxH = cos_BxTxH * scaling
    sin_BxTxH = sin_BxTxH * scaling
  dtype = cfg.dtype
  return cos_BxTxH[:, :, None, :].astype(dtype), sin_BxTxH[:, :, None, :].astype(dtype)


def rotate(x_BxTxNxH: jax.Array, cos_BxTx1xH: jax.Array, sin_BxTx1xH: jax.Array) -> jax.Array:
  """RoPE in HF's half-split layout: x * cos + rotate_half(x) * sin."""
  half = x_BxTxNxH.shape[-1] // 2
  rotated = jnp.concatenate([-x_BxTxNxH[..., half:], x_BxTxNxH[..., :half]], axis=-1)
  return x_BxTxNxH * cos_BxTx1xH + rotated * sin_BxTx1xH
