"""The SwiGLU MLP, optionally tiled along the sequence so its [B, T, F] intermediates exist one tile at a time.

At long context the MLP's intermediates dominate a layer's memory: gate, up and their product are each
[B, T, F] (F ≈ 5 × D), and the real TPU compile of the 7B step at 32768 tokens peaks in the forward MLP of the
last layer with about six such buffers live (2.3 GiB each per chip) on top of the saved layer inputs.
The MLP is position-wise, so it can run over `chunk_size`-position tiles of the sequence (a `lax.map`) with
its tile body rematerialised: the forward keeps no intermediate but the current tile's, the backward
recomputes each tile's gate and up right before its gradient (under the layer's own full remat, the
recomputed layer forward needs no MLP output, so the MLP's forward still runs twice per step in all,
as it does untiled). The weights are gathered once, before the tiles (`Dense.gathered`), and their
gradients summed over the tiles by the loop, then reduce-scattered once: the same traffic as untiled.
Arctic's long-sequence training (TiledMLP) and Liger do the same on GPUs.

Tiled, the values are the untiled ones (the same products per position); gradients differ only in the order
of the sum over positions (tile by tile), in float32 at rounding level, and in bf16 compute by one rounding
per tile of the weight gradients, which are summed in the compute dtype. Remat policies that save the MLP's
projections (`minimal`, `save_dot_except_mlpwi`) have nothing to save in a tiled MLP: it recomputes them.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxsft.models.projection import Dense


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)); over `chunk_size`-position tiles when the sequence is longer."""

  def __init__(self, hidden_size: int, intermediate_size: int, *, bias: bool, chunk_size: int, dtype: str,
               param_dtype: str, rngs: nnx.Rngs):
    d, f = hidden_size, intermediate_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.chunk_size = chunk_size
    self.gate_proj = Dense('btd,df->btf', (d, f), ('embed', 'mlp'), (f,) if bias else None, ('mlp',), **kw)
    self.up_proj = Dense('btd,df->btf', (d, f), ('embed', 'mlp'), (f,) if bias else None, ('mlp',), **kw)
    self.down_proj = Dense('btf,fd->btd', (f, d), ('mlp', 'embed'), (d,) if bias else None, ('embed',), **kw)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    if 0 < self.chunk_size < x_BxTxD.shape[1]:
      return self._tiled(x_BxTxD)
    gate_BxTxF = checkpoint_name(self.gate_proj(x_BxTxD), 'mlpwi_0')
    up_BxTxF = checkpoint_name(self.up_proj(x_BxTxD), 'mlpwi_1')
    return checkpoint_name(self.down_proj(jax.nn.silu(gate_BxTxF) * up_BxTxF), 'mlpwo')

  def _tiled(self, x_BxTxD: jax.Array) -> jax.Array:
    batch, seq_len, dim = x_BxTxD.shape
    cols = self.chunk_size
    num_tiles = -(-seq_len // cols)
    pad = num_tiles * cols - seq_len
    (gate_DxF, gate_F), (up_DxF, up_F) = self.gate_proj.gathered(), self.up_proj.gathered()
    down_DxF, down_D = self.down_proj.gathered(embed_first=True)

    @jax.checkpoint
    def tile(x_BxCxD):
      gate_BxCxF = jnp.einsum('bcd,df->bcf', x_BxCxD, gate_DxF)
      up_BxCxF = jnp.einsum('bcd,df->bcf', x_BxCxD, up_DxF)
      if gate_F is not None:
        gate_BxCxF, up_BxCxF = gate_BxCxF + gate_F, up_BxCxF + up_F
      out_BxCxD = jnp.einsum('bcf,df->bcd', jax.nn.silu(gate_BxCxF) * up_BxCxF, down_DxF)
      return out_BxCxD if down_D is None else out_BxCxD + down_D

    if pad:
      x_BxTxD = jnp.pad(x_BxTxD, ((0, 0), (0, pad), (0, 0)))
    # [B, T] -> [K, B, C]: the mapped axis K is new, the (possibly sharded) batch axis stays put.
    x_KxBxCxD = jnp.moveaxis(x_BxTxD.reshape(batch, num_tiles, cols, dim), 1, 0)
    out_KxBxCxD = jax.lax.map(tile, x_KxBxCxD)
    return jnp.moveaxis(out_KxBxCxD, 0, 1).reshape(batch, num_tiles * cols, dim)[:, :seq_len]
