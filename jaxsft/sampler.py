"""The KV-cache sampler: batched generation from token ids (`sample`; `greedy_generate` is its temperature-0 case).

The prompts are right-padded into a `[B, P]` buffer with a length per row. One jitted prefill runs the buffer
through the model (`Transformer.prefill`), writes every layer's keys and values into a cache of
`[L, B, S, K, H]` (compute dtype) and draws each row's first token from the logits at its last prompt token.
One jitted `lax.while_loop` then decodes a token per row per iteration (`Transformer.decode`: the token's key
and value go to the slot of its position, and it attends to the slots at or before it, within the layer's
window), and stops when every row has produced an end-of-sequence id or `max_new_tokens` tokens: no host round
trip per token. A prompt's padding slots are never attended to; decoding overwrites them.

Drawing: temperature 0 is argmax. Otherwise tokens are drawn from softmax(logits / temperature), restricted
when top_p < 1 to the nucleus as transformers' `TopPLogitsWarper` defines it: sorted by probability, the
tokens after which at least top_p of the mass is covered are dropped, and the most likely token is always
kept (tokens tied with the least likely kept token are kept too). Row r's token at step t uses the key
`fold_in(fold_in(key(seed), r), t)`, so a seed fixes the output, and a row's draws do not depend on the
other rows of the call.

Shapes are bucketed so that calls do not recompile needlessly: the batch to a multiple of 8 (and of the
batch-sharding size of the mesh, if any), the prompt buffer to a multiple of 32, the cache to a multiple of
128 slots, the output buffer to a multiple of 32 tokens. Temperature, top_p, seed and max_new_tokens are
traced values; only greedy / sampling / nucleus sampling are separate programs.

On a mesh (called inside `jax.set_mesh(mesh)`, the model's parameters sharded as the trainer shards them),
the batch and the cache are split over the batch axes ('data', 'fsdp') and the cache's kv heads over
'tensor' where they divide; the generated tokens come back replicated.

`greedy_generate_uncached` is the cache-free reference: one full forward pass over a `[B, T_max]` buffer per
token (tests check the cached sampler against it, token for token).

Model-level only: token ids in, token ids out. Which ids end a row and which pad the buffer are the caller's
(`jaxsft.tokenizer.eos_ids` / `pad_id`); prompts from text are `jaxsft.generate`'s and `jaxsft.evals`'.
"""

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft import sharding
from jaxsft.errors import InputError

_BATCH_MULTIPLE = 8
_LENGTH_MULTIPLE = 32  # Prompt buffer, output buffer, and the uncached reference's token buffer.
_CACHE_MULTIPLE = 128
GREEDY, SAMPLE, NUCLEUS = 'greedy', 'sample', 'nucleus'


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
  if max_new_tokens < 0:
    raise InputError(f'max_new_tokens must be >= 0, got {max_new_tokens}')
  for i, prompt in enumerate(prompts):
    if not len(prompt):
      raise InputError(f'prompt {i} is empty: generation needs at least one token')


def _strip(tokens: np.ndarray, counts: np.ndarray, num_rows: int, eos_ids) -> list[list[int]]:
  """Each row's first `counts[r]` tokens, without a final end-of-sequence id."""
  eos_set = {int(e) for e in eos_ids}
  outputs = []
  for r in range(num_rows):
    generated = tokens[r, :counts[r]].tolist()
    if generated and generated[-1] in eos_set:
      generated = generated[:-1]
    outputs.append(generated)
  return outputs


# ----------------------------------------------------------------------------------------------------------
# Drawing tokens from logits.


def sampling_mode(temperature: float, top_p: float) -> str:
  """GREEDY (temperature 0), NUCLEUS (top_p < 1) or SAMPLE; raises InputError for out-of-range values."""
  if not temperature >= 0:  # Also NaN.
    raise InputError(f'temperature must be >= 0, got {temperature}')
  if not 0 < top_p <= 1:
    raise InputError(f'top_p must be in (0, 1], got {top_p}')
  if temperature == 0:
    return GREEDY
  return NUCLEUS if top_p < 1 else SAMPLE


def nucleus_mask(logits_BxV: jax.Array, top_p) -> jax.Array:
  """Boolean [B, V]: the tokens transformers' TopPLogitsWarper keeps (see the module docstring)."""
  sorted_BxV = jnp.sort(logits_BxV, axis=-1)  # Ascending, as the warper sorts.
  cumulative_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
  dropped_B = jnp.sum(cumulative_BxV <= 1 - top_p, axis=-1)
  dropped_B = jnp.minimum(dropped_B, logits_BxV.shape[-1] - 1)  # Keep at least one.
  threshold_Bx1 = jnp.take_along_axis(sorted_BxV, dropped_B[:, None], axis=-1)
  return logits_BxV >= threshold_Bx1


def draw_tokens(logits_BxV: jax.Array, keys_B: jax.Array, temperature, top_p, *, mode: str) -> jax.Array:
  """int32 [B]: argmax (GREEDY), or one draw per row from softmax(logits / temperature) (within the nucleus)."""
  if mode == GREEDY:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  scaled_BxV = logits_BxV.astype(jnp.float32) / temperature
  if mode == NUCLEUS:
    scaled_BxV = jnp.where(nucleus_mask(scaled_BxV, top_p), scaled_BxV, -jnp.inf)
  return jax.vmap(jax.random.categorical)(keys_B, scaled_BxV).astype(jnp.int32)


def step_keys(seed, batch: int, step) -> jax.Array:
  """The keys of rows 0..batch-1 at decoding step `step` (0 = the token after the prompt)."""
  base = jax.random.key(seed)
  return jax.vmap(lambda row: jax.random.fold_in(jax.random.fold_in(base, row), step))(jnp.arange(batch))


# ----------------------------------------------------------------------------------------------------------
# The cached sampler.


@functools.partial(jax.jit, static_argnames=('graphdef', 'cache_len', 'mode'))
def _prefill(graphdef, state, tokens_BxP, lengths_B, seed, temperature, top_p, *, cache_len: int, mode: str):
  """(first generated token [B], cache) of right-padded prompts."""
  model = nnx.merge(graphdef, state)
  logits_BxV, cache = model.prefill(tokens_BxP, lengths_B, cache_len)
  keys_B = step_keys(seed, tokens_BxP.shape[0], 0)
  return sharding.constrain_batch(draw_tokens(logits_BxV, keys_B, temperature, top_p, mode=mode)), cache


@functools.partial(jax.jit, static_argnames=('graphdef', 'out_len', 'mode'), donate_argnames=('cache',))
def _decode_loop(graphdef, state, cache, first_B, lengths_B, done_B, max_new_tokens, eos_E, seed, temperature,
                 top_p, *, out_len: int, mode: str):
  """Decodes until every row is done; returns (tokens [B, out_len], generated count [B]) replicated, and the cache."""
  batch = first_B.shape[0]

  def is_eos(tokens_B):
    return jnp.any(tokens_B[:, None] == eos_E[None, :], axis=-1)

  def cond(carry):
    step, _, _, _, done_B, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    # The parameters travel in the carry: NNX transforms (the layers' scan) refuse variables traced outside.
    step, state, cache, last_B, done_B, counts_B, out_BxM = carry
    logits_BxV, cache = nnx.merge(graphdef, state).decode(last_B, lengths_B + step - 1, cache)
    next_B = draw_tokens(logits_BxV, step_keys(seed, batch, step), temperature, top_p, mode=mode)
    write_B = ~done_B
    out_BxM = out_BxM.at[:, step].set(jnp.where(write_B, next_B, 0))
    counts_B = counts_B + write_B.astype(jnp.int32)
    done_B = done_B | (write_B & is_eos(next_B)) | (step + 1 >= max_new_tokens)
    return step + 1, state, cache, next_B, done_B, counts_B, out_BxM

  out_BxM = jnp.zeros((batch, out_len), jnp.int32).at[:, 0].set(first_B)
  done_B = done_B | is_eos(first_B) | (max_new_tokens <= 1)
  carry = (jnp.int32(1), state, cache, first_B, done_B, jnp.ones((batch,), jnp.int32), out_BxM)
  _, _, cache, _, _, counts_B, out_BxM = jax.lax.while_loop(cond, body, carry)
  # The cache is returned only so that it may live in the donated prefill cache's memory (not a second copy).
  return _replicated(out_BxM), _replicated(counts_B), cache


def _replicated(x: jax.Array) -> jax.Array:
  mesh = jax.sharding.get_abstract_mesh()
  return x if mesh.empty else jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec())


def _batch_mesh():
  """The current mesh (`jax.set_mesh`) if it has the batch axes, else None."""
  mesh = jax.sharding.get_mesh()
  if mesh.empty or not set(sharding.BATCH_AXES) <= set(mesh.axis_names):
    return None
  return mesh


def _put(x: np.ndarray, mesh, *, batch: bool) -> jax.Array:
  """A host array on the devices: split over the batch axes (`batch`) or replicated, on the mesh if any."""
  if mesh is None:
    return jnp.asarray(x)
  spec = jax.sharding.PartitionSpec(sharding.BATCH_AXES) if batch else jax.sharding.PartitionSpec()
  # From a callback, so that it also works when the mesh spans processes (each process passes every row).
  return jax.make_array_from_callback(x.shape, jax.sharding.NamedSharding(mesh, spec), lambda index: x[index])


def sample(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int,
           temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
  """Generates up to `max_new_tokens` tokens after each prompt, stopping a row at one of `eos_ids`.

  Args:
    model: a `jaxsft.models.transformer.Transformer` (its parameters may be sharded on the current mesh).
    prompts: token ids per row, each non-empty.
    max_new_tokens: the most tokens generated per row.
    eos_ids: ids that end a row (not included in its output).
    pad_id: the id filling the prompt buffer after each row's tokens.
    temperature: 0 for greedy decoding; else the softmax temperature.
    top_p: nucleus sampling's probability mass (1: the whole distribution).
    seed: the sampling seed (see the module docstring); unused when greedy.

  Returns:
    The generated ids of each row, without the prompt and without the final end-of-sequence id.
  """
  mode = sampling_mode(temperature, top_p)
  _check_prompts(prompts, max_new_tokens)
  if not prompts or max_new_tokens == 0:
    return [[] for _ in prompts]
  mesh = _batch_mesh()
  multiple = math.lcm(_BATCH_MULTIPLE, sharding.batch_size_multiple(mesh)) if mesh is not None else _BATCH_MULTIPLE
  num_rows = len(prompts)
  batch = _round_up(num_rows, multiple)
  lengths = np.array([len(p) for p in prompts] + [1] * (batch - num_rows), np.int32)
  prompt_len = _round_up(int(lengths.max()), _LENGTH_MULTIPLE)
  cache_len = _round_up(int(lengths.max()) + max_new_tokens, _CACHE_MULTIPLE)
  tokens = np.full((batch, prompt_len), pad_id, np.int32)
  for r, prompt in enumerate(prompts):
    tokens[r, :len(prompt)] = prompt
  done = np.arange(batch) >= num_rows  # Filler rows are done from the start.
  eos = np.array(sorted({int(e) for e in eos_ids}) or [-1], np.int32)
  scalars = dict(seed=np.uint32(seed % 2**32), temperature=np.float32(temperature or 1.0), top_p=np.float32(top_p))
  scalars = {k: _put(np.asarray(v), mesh, batch=False) for k, v in scalars.items()}
  graphdef, state = nnx.split(model)
  lengths_d = _put(lengths, mesh, batch=True)
  first, cache = _prefill(graphdef, state, _put(tokens, mesh, batch=True), lengths_d, scalars['seed'],
                          scalars['temperature'], scalars['top_p'], cache_len=cache_len, mode=mode)
  out, counts, _ = _decode_loop(graphdef, state, cache, first, lengths_d, _put(done, mesh, batch=True),
                             _put(np.asarray(max_new_tokens, np.int32), mesh, batch=False),
                             _put(eos, mesh, batch=False), scalars['seed'], scalars['temperature'],
                             scalars['top_p'], out_len=_round_up(max_new_tokens, _LENGTH_MULTIPLE), mode=mode)
  out, counts = sharding.gather_to_host((out, counts))
  return _strip(out, counts, num_rows, eos_ids)


def greedy_generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_ids: Sequence[int],
                    pad_id: int) -> list[list[int]]:
  """Greedy decoding with the KV cache: `sample` at temperature 0."""
  return sample(model, prompts, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id)


# ----------------------------------------------------------------------------------------------------------
# The cache-free reference.


@functools.partial(jax.jit, static_argnums=0)
def _uncached_step(graphdef, state, tokens_BxT: jax.Array, lengths_B: jax.Array, limits_B: jax.Array,
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


def greedy_generate_uncached(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                             eos_ids: Sequence[int], pad_id: int) -> list[list[int]]:
  """Greedy decoding without a cache (the reference): one forward over the whole `[B, T_max]` buffer per token.

  Each step builds `segment_ids = 1` for `t < length` (0 after), `positions = arange(T_max)`, reads the
  logits at `length - 1`, appends their argmax and stops the rows that produced an end-of-sequence id.
  Attention is causal, so the padding after a row's length never changes the logits read. Same arguments
  and result as `greedy_generate`.
  """
  _check_prompts(prompts, max_new_tokens)
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
    tokens_d, lengths_d, done = _uncached_step(graphdef, state, tokens_d, lengths_d, limits, done, eos)
    if bool(jnp.all(done)):
      break
  tokens, lengths = np.asarray(tokens_d), np.asarray(lengths_d)
  generated = np.zeros((num_rows, max_new_tokens), np.int32)
  for i in range(num_rows):
    generated[i, :lengths[i] - prompt_lengths[i]] = tokens[i, prompt_lengths[i]:lengths[i]]
  return _strip(generated, lengths[:num_rows] - prompt_lengths[:num_rows], num_rows, eos_ids)
