"""Evaluation of a model during and after training: eval loss, eval-time generations, the synthetic accuracy check.

`eval_loss` is the token-weighted loss (and accuracy, entropy) over a whole eval split, through the train step's
eval program on the training mesh. `eval_generations` answers the first usable prompts of an eval split with the
KV-cache sampler (`jaxsft.sampler`); `prompt_of_row` is how a dataset row becomes a prompt and a reference.
`evaluate_accuracy` greedy-decodes held-out synthetic problems (`jaxsft.data.synthetic.held_out_problems`) and
scores the exact match of their answers.
"""

import json
import time
from collections.abc import Sequence
from typing import Any

import jax

from jaxsft import loss as loss_lib
from jaxsft import metrics as metrics_lib
from jaxsft import sampler
from jaxsft import tokenizer as tokenizer_lib
from jaxsft.data import formats
from jaxsft.data import rows as rows_lib
from jaxsft.data import pipeline
from jaxsft.data import synthetic
from jaxsft.errors import InputError
from jaxsft.prefetch import Prefetcher

_EVAL_SCAN_LIMIT = 1000  # eval_generations reads at most this many rows (or 20 per prompt) to find prompts.


def eval_loss(mesh, step_fn, params, split) -> dict:
  """eval_loss (token-weighted over the whole split) and eval_mean_token_accuracy, eval_entropy, eval_num_tokens.

  transformers' Trainer averages per-batch mean losses; here every loss token of the split weighs the same,
  so the figure does not depend on the eval batch size or on packing. `step_fn` is the run's `step.TrainStep`,
  `split` a `data.prepare.Split`.
  """
  totals = dict.fromkeys(loss_lib.SUM_KEYS, 0.0)
  pending = None  # One batch in flight while the next is prepared.
  with Prefetcher(pipeline.Loader(split.steps), mesh) as batches:
    for _, (global_batch,), _ in batches:
      sums = step_fn.eval_step(params, global_batch)
      if pending is not None:
        _accumulate(totals, pending)
      pending = sums
  if pending is not None:
    _accumulate(totals, pending)
  num = max(float(totals['num_tokens']), 1.0)
  return {'eval_loss': float(totals['loss_sum']) / num, 'eval_mean_token_accuracy': float(totals['num_correct']) / num,
          'eval_entropy': float(totals['entropy_sum']) / num, 'eval_num_tokens': int(totals['num_tokens'])}


def _accumulate(totals: dict, sums) -> None:
  for key, value in jax.device_get(sums).items():  # float64 on the host: exact enough for any split size.
    totals[key] += float(value)


def accuracy_check(config, model, tokenizer, step: int) -> dict:
  """The tiny default's proof that SFT worked: greedy answers to `accuracy_eval_problems` held-out problems of the
  'synthetic:' dataset, the exact-match accuracy logged and returned as a metrics row."""
  problems = synthetic.held_out_problems(config.accuracy_eval_problems, config.seed)
  t0 = time.perf_counter()
  accuracy, samples = evaluate_accuracy(model, tokenizer, problems, max_new_tokens=config.accuracy_eval_max_new_tokens)
  for sample in samples[:3]:
    metrics_lib.log(f'sample: {json.dumps(sample)}')
  metrics_lib.log(f'held-out exact-match accuracy: {accuracy:.1%} on {len(problems)} problems '
                  f'({time.perf_counter() - t0:.1f}s of greedy decoding)')
  return {'step': step, 'eval_accuracy': accuracy, 'eval_problems': len(problems)}


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
      messages = rows_lib.row_messages(row, where)
    except InputError:
      return None  # Not a usable conversation (training's index pass reports or skips such rows).
    last = max((i for i, m in enumerate(messages) if m.get('role') == 'assistant'), default=0)
    if last == 0:
      return None
    prompt = messages[:last]
    ids = formats.chat_ids(tokenizer, prompt, rows_lib.template_kwargs(row, where), where, 'messages',
                           add_generation_prompt=True)
    return ids, _last_user_text(prompt), _text(messages[last].get('content'))
  prompt, completion = row.get('prompt'), row.get('completion')
  if isinstance(prompt, str) and isinstance(completion, str):
    return list(tokenizer(prompt)['input_ids']), prompt, completion
  if isinstance(prompt, list) and isinstance(completion, list) and prompt:
    ids = formats.chat_ids(tokenizer, prompt, rows_lib.template_kwargs(row, where), where, 'prompt',
                           add_generation_prompt=True)
    reference = ''.join(_text(m.get('content')) for m in completion if isinstance(m, dict))
    return ids, _last_user_text(prompt), reference
  return None


def eval_generations(model, tokenizer, source, *, num_prompts: int, max_new_tokens: int, temperature: float,
                     top_p: float, seed: int, max_prompt_tokens: int, eos_ids: Sequence[int] | None = None,
                     generation_config: dict | None = None) -> list[dict]:
  """Generations for the first `num_prompts` usable rows of `source` (a `jaxsft.data.sources.Source`).

  A row is usable when `prompt_of_row` finds a prompt in it of at most `max_prompt_tokens` tokens; at most
  max(1000, 20 * num_prompts) rows are read. End-of-sequence ids: the tokenizer's, plus `generation_config`'s
  eos_token_id (a generation_config.json dict), plus `eos_ids`. Call it inside `jax.set_mesh(mesh)` when the
  model's parameters are sharded.

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
  eos = tokenizer_lib.eos_ids(tokenizer, generation_config, extra=eos_ids or ())
  generated = sampler.sample(model, [ids for ids, _, _ in chosen], max_new_tokens=max_new_tokens, eos_ids=eos,
                             pad_id=tokenizer_lib.pad_id(tokenizer, eos), temperature=temperature, top_p=top_p,
                             seed=seed)
  return [{'prompt': shown, 'reference': reference, 'generated': tokenizer.decode(ids, skip_special_tokens=False)}
          for (_, shown, reference), ids in zip(chosen, generated)]


def evaluate_accuracy(model, tokenizer, problems: Sequence[tuple[list[synthetic.Message], str]], *,
                      max_new_tokens: int, batch_size: int = 64,
                      num_samples: int = 5) -> tuple[float, list[dict[str, Any]]]:
  """Greedy-decodes every problem with `model` (the KV-cache sampler) and scores exact match of the answer.

  Returns (accuracy, the first `num_samples` problems as dicts with prompt, expected, generated, correct).
  Prompts are grouped by length into batches of `batch_size` to keep the decoding buffers small.
  """
  if not problems:
    return 0.0, []
  prompts = [_encode_prompt(tokenizer, messages) for messages, _ in problems]
  eos_ids = sorted({i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids('<|endoftext|>'))
                    if i is not None and i != tokenizer.unk_token_id})
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or [0])[0]
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  outputs: list[list[int]] = [[] for _ in prompts]
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    generated = sampler.greedy_generate(model, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens,
                                        eos_ids=eos_ids, pad_id=pad_id)
    for i, ids in zip(chunk, generated):
      outputs[i] = ids
  correct, samples = 0, []
  for (messages, expected), ids in zip(problems, outputs):
    text = tokenizer.decode(ids, skip_special_tokens=False)
    ok = synthetic.extract_answer(text) == expected
    correct += ok
    if len(samples) < num_samples:
      samples.append({'prompt': messages[-1]['content'], 'expected': expected, 'generated': text,
                      'correct': ok})
  return correct / len(problems), samples


def _encode_prompt(tokenizer, messages: list[synthetic.Message]) -> list[int]:
  encoded = formats.apply_chat_template(tokenizer, messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True)
  return list(encoded['input_ids'])
