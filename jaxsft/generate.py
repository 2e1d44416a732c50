"""Batched greedy generation with a `jaxsft.models.transformer.Transformer`.

There is no KV cache yet (a cached sampler comes in a later issue): every step runs one jitted forward
pass over the whole token buffer. The buffer is a fixed `[B, T_max]` array of right-padded prompts with a
current length per row; each step builds `segment_ids = 1` for `t < length` (0 after), `positions =
arange(T_max)`, reads the logits at `length - 1`, appends their argmax and stops the rows that produced an
end-of-sequence id. Because attention is causal, the padding after a row's length never changes the
logits read, so the result equals unbatched greedy decoding.

The batch is padded to a multiple of 8 rows and `T_max` to a multiple of 32 tokens, so the step compiles
once per shape bucket, not once per call.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft.errors import InputError

_BATCH_MULTIPLE = 8
_LENGTH_MULTIPLE = 32


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, state, tokens_BxT: jax.Array, lengths_B: jax.Array, limits_B: jax.Array,
          done_B: jax.Array, eos_ids_E: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One greedy step: appends the argmax token to every row that is not done (limits_B <= T)."""
  model = nnx.merge(graphdef, state)
  batch, seq_len = tokens_BxT.shape
  t_BxT = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
  segment_ids_BxT = (t_BxT < lengths_B[:, None]).astype(jnp.int32)
  hidden_BxTxD = model.hidden_states(tokens_BxT, t_BxT, segment_ids_BxT)
  last_BxD = jnp.take_along_axis(hidden_BxTxD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  logits_BxV = jnp.einsum('bd,dv->bv', last_BxD, model.unembedding(), preferred_element_type=jnp.float32)
  next_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  write_B = ~done_B & (lengths_B < limits_B)
  rows_B = jnp.arange(batch)
  at_B = jnp.minimum(lengths_B, seq_len - 1)
  tokens_BxT = tokens_BxT.at[rows_B, at_B].set(jnp.where(write_B, next_B, tokens_BxT[rows_B, at_B]))
  lengths_B = lengths_B + write_B.astype(jnp.int32)
  is_eos_B = jnp.any(next_B[:, None] == eos_ids_E[None, :], axis=-1)
  done_B = done_B | (write_B & is_eos_B) | (lengths_B >= limits_B)
  return tokens_BxT, lengths_B, done_B


def greedy_generate(model, prompts: list[list[int]], *, max_new_tokens: int, eos_ids: Sequence[int],
                    pad_id: int) -> list[list[int]]:
  """Greedy-decodes each prompt for up to `max_new_tokens` tokens or until one of `eos_ids`.

  Args:
    model: a `Transformer` (any NNX module with `hidden_states(tokens, positions, segment_ids)` and
      `unembedding()`).
    prompts: token ids per row, each non-empty.
    max_new_tokens: the most tokens generated per row.
    eos_ids: ids that end a row (not included in its output).
    pad_id: the id filling the buffer after each row's tokens.

  Returns:
    The generated ids of each row, without the prompt and without the final end-of-sequence id.
  """
  if max_new_tokens < 0:
    raise InputError(f'max_new_tokens must be >= 0, got {max_new_tokens}')
  for i, prompt in enumerate(prompts):
    if not len(prompt):
      raise InputError(f'prompt {i} is empty: greedy generation needs at least one token')
  if not prompts or max_new_tokens == 0:
    return [[] for _ in prompts]
  num_rows = len(prompts)
  batch = _round_up(num_rows, _BATCH_MULTIPLE)
  prompt_lengths = np.array([len(p) for p in prompts] + [1] * (batch - num_rows), np.int32)
  seq_len = _round_up(int(prompt_lengths.max()) + max_new_tokens, _LENGTH_MULTIPLE)
  tokens = np.full((batch, seq_len), pad_id, np.int32)
  for i, prompt in enumerate(prompts):
    tokens[i, :len(prompt)] = prompt
  limits = jnp.asarray(prompt_lengths + max_new_tokens)  # Each row's own budget (<= seq_len).
  done = jnp.asarray(np.arange(batch) >= num_rows)  # Filler rows are done from the start.
  graphdef, state = nnx.split(model)
  eos = jnp.asarray(np.array(sorted(set(eos_ids)) or [-1], np.int32))
  tokens_d, lengths_d = jnp.asarray(tokens), jnp.asarray(prompt_lengths)
  for _ in range(max_new_tokens):
    tokens_d, lengths_d, done = _step(graphdef, state, tokens_d, lengths_d, limits, done, eos)
    if bool(jnp.all(done)):
      break
  tokens, lengths = np.asarray(tokens_d), np.asarray(lengths_d)
  eos_set = set(int(e) for e in eos_ids)
  outputs = []
  for i in range(num_rows):
    generated = tokens[i, prompt_lengths[i]:lengths[i]].tolist()
    if generated and generated[-1] in eos_set:
      generated = generated[:-1]
    outputs.append(generated)
  return outputs
