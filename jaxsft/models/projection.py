"""Projections: `Dense` (an einsum with a multi-axis kernel, HF's `nn.Linear` reshaped) and its einsum, whose
kernel gradient is reduce-scattered under FSDP whichever kernel axis is sharded.

Under FSDP the batch is split over the devices and each weight over its `embed` axis, so a weight's gradient
is a sum over devices that lands split: a reduce-scatter. The TPU compiler fuses a reduce-scatter only along a
leading (2nd-minor) axis; for a kernel whose embed axis is last (o_proj [q_heads, head_dim, embed], down_proj
[mlp, embed]) it all-reduces the whole gradient and slices it after: twice the traffic and a whole
per-layer gradient held (the compiled v5p program showed it: `bf16[18944,3584] all-reduce` per layer for
down_proj at 7B width). `einsum` computes such a kernel's gradient with that axis first, constrains it to the
kernel's sharding there, and transposes the local shard back, so the sum is a reduce-scatter on a leading axis.
Forward values and gradients are those of `jnp.einsum` (the same products, summed over the same axes);
without a mesh, or where no mesh axis shards a trailing kernel axis, it is `jnp.einsum`.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsft import sharding
from jaxsft.models import lora as lora_lib

INIT_STD = 0.02  # transformers' default `initializer_range` for all four families.


def param(value: jax.Array, names: tuple[str, ...]) -> nnx.Param:
  """A parameter with its logical axis names (sharding.RULES map them to mesh axes)."""
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


class Dense(nnx.Module):
  """A projection `einsum(spec, x, kernel) [+ bias]` with a multi-axis kernel (HF `nn.Linear`, reshaped)."""

  def __init__(self, spec: str, kernel_shape: tuple[int, ...], kernel_names: tuple[str, ...],
               bias_shape: tuple[int, ...] | None, bias_names: tuple[str, ...] | None, *, dtype: str,
               param_dtype: str, rngs: nnx.Rngs):
    self.spec = spec
    self.dtype = dtype
    self.kernel_names = kernel_names
    init = jax.nn.initializers.normal(INIT_STD)
    self.kernel = param(init(rngs.params(), kernel_shape, jnp.dtype(param_dtype)), kernel_names)
    self.bias = None if bias_shape is None else param(jnp.zeros(bias_shape, param_dtype), bias_names)
    self.lora: lora_lib.Adapter | None = nnx.data(None)  # A LoRA run's adapter (jaxsft/models/lora.py attaches it).

  def __call__(self, x: jax.Array) -> jax.Array:
    y = einsum(self.spec, x, self.kernel[...].astype(self.dtype), self.kernel_names)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora is not None:
      y = y + self.lora(x)
    return y

  def gathered(self, *, embed_first: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """(kernel, bias) in the compute dtype, the kernel gathered over the batch (FSDP) axes where this is called.

    For a loop that applies the projection several times (the tiled MLP): gathered once before the loop, the
    weight crosses the network once and its gradient is reduce-scattered once, after the loop. With
    `embed_first`, a 2-D kernel whose embed axis is last comes transposed ([embed, other]): its gradient is then
    reduce-scattered along a leading axis (see `einsum`), and the caller contracts over its last axis.
    """
    if self.lora is not None:
      raise ValueError('a projection with a LoRA adapter cannot be applied through its gathered kernel')
    kernel, names = self.kernel[...], self.kernel_names
    if embed_first and kernel.ndim == 2 and names[-1] == 'embed':
      kernel, names = kernel.T, names[::-1]
    kernel = kernel.astype(self.dtype)
    spec = sharding.current_spec(names, kernel.shape)
    if spec is not None:
      spec = tuple(spec) + (None,) * kernel.ndim
      kernel = jax.lax.with_sharding_constraint(
          kernel, P(*(None if axis in sharding.BATCH_AXES else axis for axis in spec[:kernel.ndim])))
    return kernel, None if self.bias is None else self.bias[...].astype(self.dtype)


def einsum(spec: str, x: jax.Array, kernel: jax.Array, names: tuple[str, ...]) -> jax.Array:
  """`jnp.einsum(spec, x, kernel)`, `spec` as 'btf,fd->btd'; `names` are the kernel's logical axis names."""
  kernel_spec = sharding.current_spec(names, kernel.shape)
  if kernel_spec is None:
    return jnp.einsum(spec, x, kernel)
  kernel_spec = tuple(kernel_spec) + (None,) * kernel.ndim
  first = next((i for i, axis in enumerate(kernel_spec[:kernel.ndim]) if axis in sharding.BATCH_AXES), 0)
  if first == 0:  # Already leading (q/k/v, gate/up, lm_head), or not sharded over the batch axes.
    return jnp.einsum(spec, x, kernel)
  return _leading_axis_grad(spec, first, P(*kernel_spec[:kernel.ndim]))(x, kernel)


def _leading_axis_grad(spec: str, first: int, kernel_spec: P):
  inputs, out = spec.split('->')
  x_axes, k_axes = inputs.split(',')
  perm = (first,) + tuple(i for i in range(len(k_axes)) if i != first)
  k_axes_t = ''.join(k_axes[i] for i in perm)
  inverse = tuple(perm.index(i) for i in range(len(perm)))

  @jax.custom_vjp
  def project(x, kernel):
    return jnp.einsum(spec, x, kernel)

  def forward(x, kernel):
    return project(x, kernel), (x, kernel)

  def backward(residuals, dy):
    x, kernel = residuals
    dx = jnp.einsum(f'{out},{k_axes}->{x_axes}', dy, kernel)
    dkernel_t = jnp.einsum(f'{out},{x_axes}->{k_axes_t}', dy, x)
    dkernel_t = jax.lax.with_sharding_constraint(dkernel_t, P(*(kernel_spec[i] for i in perm)))
    return dx.astype(x.dtype), jnp.transpose(dkernel_t, inverse).astype(kernel.dtype)

  project.defvjp(forward, backward)
  return project
