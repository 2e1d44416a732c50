"""Batched generation with a KV cache, eval-time generations, and `python -m jaxsft.generate`.

Sampler (`sample`; `greedy_generate` is its temperature-0 case). The prompts are right-padded into a
`[B, P]` buffer with a length per row. One jitted prefill runs the buffer through the model
(`Transformer.prefill`), writes every layer's keys and values into a cache of `[L, B, S, K, H]` (compute
dtype) and draws each row's first token from the logits at its last prompt token. One jitted
`lax.while_loop` then decodes a token per row per iteration (`Transformer.decode`: the token's key and value
go to the slot of its position, and it attends to the slots at or before it, within the layer's window), and
stops when every row has produced an end-of-sequence id or `max_new_tokens` tokens: no host round trip per
token. A prompt's padding slots are never attended to; decoding overwrites them.

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

CLI: python -m jaxsft.generate --model OUTPUT_DIR/hf --prompt "..." [--prompt ...] [--system TEXT]
[--max_new_tokens 512] [--temperature T] [--top_p P] [--seed 0] [--raw] [--dtype auto] [--json]
loads the Hugging Face directory sharded over all local devices (fsdp), applies the tokenizer's chat
template with the generation prompt (--raw: the prompt is plain text), and prints each answer.
"""

import functools
import json
import math
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft import sharding
from jaxsft.data import formats
from jaxsft.errors import InputError

_BATCH_MULTIPLE = 8
_LENGTH_MULTIPLE = 32  # Prompt buffer, output buffer, and the uncached reference's token buffer.
_CACHE_MULTIPLE = 128
_EVAL_SCAN_LIMIT = 1000  # eval_generations reads at most this many rows (or 20 per prompt) to find prompts.
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


# ----------------------------------------------------------------------------------------------------------
# Eval-time generations.


def _text(content) -> str:
  """A message's content as text: a string, or the text parts of a multimodal part list."""
  if isinstance(content, str):
    return content
  if isinstance(content, list):
    return ''.join(part.get('text', '') for part in content if isinstance(part, dict))
  return ''


def _last_user_text(messages: list[dict]) -> str:
  users = [m for m in messages if m.get('role') == 'user']
  return _text((users or messages)[-1].get('content'))


def prompt_of_row(row: dict, tokenizer, where: str = 'row') -> tuple[list[int], str, str] | None:
  """(prompt ids, prompt text shown, reference text) of a dataset row, or None for a row without a prompt.

  Conversations: the messages before the last assistant message, chat-templated with the generation prompt;
  the text shown is the last user message, the reference the dropped assistant message. Prompt/completion
  rows: message lists likewise; strings tokenized as plain text (as the training data tokenizes them). Text
  rows, and conversations without an assistant message after the first message, have no prompt.
  """
  if row.get('messages') is not None or row.get('conversations') is not None:
    try:
      messages = formats.row_messages(row, where)
    except InputError:
      return None  # Not a usable conversation (training's index pass reports or skips such rows).
    last = max((i for i, m in enumerate(messages) if m.get('role') == 'assistant'), default=0)
    if last == 0:
      return None
    prompt = messages[:last]
    ids = formats.chat_ids(tokenizer, prompt, formats.template_kwargs(row, where), where, 'messages',
                           add_generation_prompt=True)
    return ids, _last_user_text(prompt), _text(messages[last].get('content'))
  prompt, completion = row.get('prompt'), row.get('completion')
  if isinstance(prompt, str) and isinstance(completion, str):
    return list(tokenizer(prompt)['input_ids']), prompt, completion
  if isinstance(prompt, list) and isinstance(completion, list) and prompt:
    ids = formats.chat_ids(tokenizer, prompt, formats.template_kwargs(row, where), where, 'prompt',
                           add_generation_prompt=True)
    reference = ''.join(_text(m.get('content')) for m in completion if isinstance(m, dict))
    return ids, _last_user_text(prompt), reference
  return None


def eval_generations(model, tokenizer, source, *, num_prompts: int, max_new_tokens: int, temperature: float,
                     top_p: float, seed: int, max_prompt_tokens: int,
                     eos_ids: Sequence[int] | None = None) -> list[dict]:
  """Generations for the first `num_prompts` usable rows of `source` (a `jaxsft.data.sources.Source`).

  A row is usable when `prompt_of_row` finds a prompt in it of at most `max_prompt_tokens` tokens; at most
  max(1000, 20 * num_prompts) rows are read. End-of-sequence ids: the tokenizer's, plus `eos_ids` (say,
  generation_config.json's). Call it inside `jax.set_mesh(mesh)` when the model's parameters are sharded.

  Returns:
    One {'prompt', 'reference', 'generated'} dict per prompt, in row order: the last user message (or the
    prompt string), the dropped assistant message (or the completion), and the decoded generation with its
    special tokens (the end-of-sequence id that stopped it excluded).
  """
  if num_prompts <= 0:
    return []
  chosen = []
  for index in range(min(len(source), max(_EVAL_SCAN_LIMIT, 20 * num_prompts))):
    found = prompt_of_row(source[index], tokenizer, source.origin(index))
    if found is not None and len(found[0]) <= max_prompt_tokens:
      chosen.append(found)
      if len(chosen) == num_prompts:
        break
  if not chosen:
    return []
  eos = {int(e) for e in (eos_ids or ())}
  if tokenizer.eos_token_id is not None:
    eos.add(int(tokenizer.eos_token_id))
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
  generated = sample(model, [ids for ids, _, _ in chosen], max_new_tokens=max_new_tokens, eos_ids=sorted(eos),
                     pad_id=pad_id, temperature=temperature, top_p=top_p, seed=seed)
  return [{'prompt': shown, 'reference': reference, 'generated': tokenizer.decode(ids, skip_special_tokens=False)}
          for (_, shown, reference), ids in zip(chosen, generated)]


# ----------------------------------------------------------------------------------------------------------
# Command line.


def _generation_config(model_dir: str) -> dict:
  path = os.path.join(model_dir, 'generation_config.json')
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding='utf-8') as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise InputError(f'{path}: cannot read ({e})') from None
  if not isinstance(config, dict):
    raise InputError(f'{path}: expected a JSON object')
  return config


def eos_ids_of(tokenizer, generation: dict) -> list[int]:
  """generation_config.json's eos_token_id (an id or a list) plus the tokenizer's eos id."""
  value = generation.get('eos_token_id')
  ids = set(value if isinstance(value, list) else [] if value is None else [value])
  if tokenizer.eos_token_id is not None:
    ids.add(tokenizer.eos_token_id)
  return sorted(int(i) for i in ids)


def default_sampling(generation: dict) -> tuple[float, float]:
  """(temperature, top_p) of generation_config.json when it sets do_sample=true, else greedy (0.0, 1.0)."""
  if not generation.get('do_sample'):
    return 0.0, 1.0
  temperature, top_p = generation.get('temperature'), generation.get('top_p')
  return 1.0 if temperature is None else float(temperature), 1.0 if top_p is None else float(top_p)


def load_model(model_dir: str, *, dtype: str = 'auto', mesh=None):
  """(model, tokenizer, generation config dict) of a Hugging Face directory, parameters sharded on `mesh`.

  `dtype` 'auto' computes in config.json's dtype (float32 if it names none); parameters are stored in it too.
  """
  import transformers  # pylint: disable=import-outside-toplevel
  from jaxsft.models import hf  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(model_dir):
    raise InputError(f'--model: no such directory {model_dir!r}')
  if not os.path.isfile(os.path.join(model_dir, 'config.json')):
    raise InputError(f'--model: {model_dir!r} has no config.json')
  hf_cfg = hf.read_hf_config(model_dir)
  if dtype == 'auto':
    dtype = hf_cfg.get('dtype') or hf_cfg.get('torch_dtype') or 'float32'
    if dtype not in ('float32', 'bfloat16', 'float16'):
      raise InputError(f"{model_dir}/config.json: dtype {dtype!r} is not supported; pass --dtype")
  cfg = hf.model_config_from_hf(hf_cfg, dtype=dtype, param_dtype=dtype, attention_impl='auto', scan_layers=True)
  shardings = None
  if mesh is not None:
    shardings = sharding.param_shardings(nnx.state(hf.abstract_model(cfg), nnx.Param), mesh)
  model = hf.load_pretrained(model_dir, cfg, shardings=shardings)
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  except (OSError, ValueError) as e:
    raise InputError(f'--model: cannot load a tokenizer from {model_dir!r} ({" ".join(str(e).split())[:200]})'
                     ) from None
  return model, tokenizer, _generation_config(model_dir)


def encode_prompt(tokenizer, text: str, *, system: str | None, raw: bool) -> list[int]:
  """The prompt's ids: chat-templated with the generation prompt (and `system` first), or plain text (`raw`)."""
  if raw:
    return list(tokenizer(text)['input_ids'])
  if not tokenizer.chat_template:
    raise InputError('--prompt: the tokenizer has no chat template; pass --raw to use the prompt as plain text')
  messages = ([{'role': 'system', 'content': system}] if system else []) + [{'role': 'user', 'content': text}]
  return formats.chat_ids(tokenizer, messages, {}, '--prompt', 'prompt', add_generation_prompt=True)


def run_cli(model_dir: str, prompts: list[str], *, system: str | None, max_new_tokens: int,
            temperature: float | None, top_p: float | None, seed: int, raw: bool, dtype: str,
            as_json: bool) -> None:
  """What `python -m jaxsft.generate` does (flags checked); raises InputError for bad input."""
  if not prompts:
    raise InputError('--prompt is required (repeat it for several prompts)')
  if max_new_tokens < 1:
    raise InputError(f'--max_new_tokens must be >= 1, got {max_new_tokens}')
  if system and raw:
    raise InputError('--system needs the chat template; it cannot be combined with --raw')
  sampling_mode(1.0 if temperature is None else temperature, 1.0 if top_p is None else top_p)  # Before loading.
  t0 = time.perf_counter()
  mesh = sharding.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1})
  model, tokenizer, generation = load_model(model_dir, dtype=dtype, mesh=mesh)
  default_temperature, default_top_p = default_sampling(generation)
  temperature = default_temperature if temperature is None else temperature
  top_p = default_top_p if top_p is None else top_p
  sampling_mode(temperature, top_p)  # Checks the values before any compile.
  ids = [encode_prompt(tokenizer, text, system=system, raw=raw) for text in prompts]
  eos_ids = eos_ids_of(tokenizer, generation)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0] if eos_ids else 0
  print(f'loaded {model_dir} in {time.perf_counter() - t0:.1f}s ({len(jax.devices())} devices); '
        f'{"greedy" if temperature == 0 else f"temperature {temperature}, top_p {top_p}, seed {seed}"}',
        file=sys.stderr)
  with jax.set_mesh(mesh):
    outputs = sample(model, ids, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                     temperature=temperature, top_p=top_p, seed=seed)
  for n, (text, generated) in enumerate(zip(prompts, outputs)):
    answer = tokenizer.decode(generated, skip_special_tokens=True)
    if as_json:
      print(json.dumps({'prompt': text, 'ids': generated, 'text': answer}))
    elif len(prompts) == 1:
      print(answer)
    else:
      print(f'### prompt {n + 1}: {text}\n{answer}\n')


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _MODEL.value:
    _fail('--model is required, e.g. --model runs/tiny/hf')
  logging.set_verbosity(logging.WARNING)  # Not jax's INFO lines about the backends it did not find.
  try:
    run_cli(_MODEL.value, list(_PROMPT.value or []), system=_SYSTEM.value, max_new_tokens=_MAX_NEW_TOKENS.value,
            temperature=_TEMPERATURE.value, top_p=_TOP_P.value, seed=_SEED.value, raw=_RAW.value, dtype=_DTYPE.value,
            as_json=_JSON.value)
  except InputError as e:
    _fail(str(e))


def _parse_flags(argv: list[str]) -> list[str]:
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # A bad flag or value: one line, not absl's usage text.
    _fail(str(e).splitlines()[0])


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


if __name__ == '__main__':
  # The flags exist only when this file is the program (jaxsft.data.synthetic and the trainer import this
  # module, and must neither define them twice nor add them to `python -m jaxsft.train`'s command line).
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  _MODEL = flags.DEFINE_string('model', None, 'A Hugging Face model directory (a run writes OUTPUT_DIR/hf).')
  _PROMPT = flags.DEFINE_multi_string('prompt', None, 'A prompt; repeat the flag for several (decoded as a batch).')
  _SYSTEM = flags.DEFINE_string('system', None, 'A system message put before each prompt.')
  _MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 512, 'The most tokens generated per prompt.')
  _TEMPERATURE = flags.DEFINE_float(
      'temperature', None, '0 = greedy. Default: generation_config.json\'s temperature when it sets '
      'do_sample=true (1.0 if it sets none), else 0 (greedy). Its top_k and repetition_penalty are not applied.')
  _TOP_P = flags.DEFINE_float('top_p', None, "Nucleus sampling mass in (0, 1]. Default: generation_config.json's "
                              'top_p when it sets do_sample=true, else 1.0.')
  _SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed (the same seed gives the same output).')
  _RAW = flags.DEFINE_bool('raw', False, 'Use the prompt as plain text (no chat template).')
  _DTYPE = flags.DEFINE_enum('dtype', 'auto', ['auto', 'float32', 'bfloat16'],
                             "Compute and weight dtype; auto = config.json's dtype (float32 if none).")
  _JSON = flags.DEFINE_bool('json', False, 'Print one JSON object per prompt: prompt, generated ids, text.')
  app.run(main, flags_parser=_parse_flags)
