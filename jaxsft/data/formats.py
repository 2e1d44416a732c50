"""Dataset rows → token ids + loss mask, exactly as TRL 1.16's `SFTTrainer` prepares them.

Three row formats (TRL's names and semantics):

* `messages` (conversational language modeling): `apply_chat_template(messages)`; no eos is appended
  (the template ends turns). Every token is a loss token unless `assistant_only_loss`. ShareGPT-style
  `conversations` rows (`from`/`value`) are converted to `messages` first, as TRL does (`jaxsft.data.rows`).
* `prompt_completion`: plain strings (the completion gets the eos token appended unless it already
  ends with it; prompt and prompt+completion are tokenized with the tokenizer's special tokens) or
  message lists (the prompt rendered with `add_generation_prompt=True`). The completion starts where
  the tokenized prompt and prompt+completion diverge. With `completion_only_loss` (default: on for this
  format) only completion tokens are loss tokens.
* `text` (language modeling on `dataset_text_field`): the text plus eos (unless already there),
  tokenized with special tokens; every token is a loss token.

`assistant_only_loss` (conversational formats only) keeps the loss on assistant tokens. When the chat
template has `{% generation %}` markers the mask is transformers' own
(`return_assistant_tokens_mask=True`). Otherwise the mask is derived without reading the template: the
conversation is rendered prefix by prefix, each assistant turn's span runs from the end of the
generation prompt (`messages[:i]` with `add_generation_prompt=True`) to the end of `messages[:i+1]`
minus trailing whitespace, so it covers the assistant content and its end-of-turn token; tokens overlap
these character spans exactly as transformers maps `{% generation %}` spans to tokens. A template that
renders an earlier turn differently once later turns follow (it strips past reasoning, say) cannot be
diffed and is refused with an `InputError`. (TRL itself swaps a stock template it knows for its own
marked copy; for the Llama 3 template that copy marks exactly the derived tokens, for Qwen2.5 it also
marks the newlines after `<|im_start|>assistant` and after `<|im_end|>`. Set that copy as
`chat_template` to reproduce it.)

Truncation keeps the start (TRL's only mode). Loss masks align with `input_ids`: `loss_mask[t] = 1`
means token t is a training target (TRL's `labels[t] != -100`).
"""

import dataclasses
import functools
import inspect
import re
import threading
from collections.abc import Sequence

import jinja2
import numpy as np

from jaxsft.data import rows as rows_lib
from jaxsft.errors import InputError
from jaxsft.errors import one_line

MESSAGES = 'messages'
PROMPT_COMPLETION = 'prompt_completion'
TEXT = 'text'
FORMATS = (MESSAGES, PROMPT_COMPLETION, TEXT)

# How the assistant mask is computed (see `assistant_mask_method`).
MASK_FROM_MARKERS = 'generation_markers'
MASK_DERIVED = 'derived'

_GENERATION_MARKER = re.compile(r'\{%-?\s*generation\s*-?%\}')


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenized row: int32 [L] token ids and loss mask (1 = training target)."""
  input_ids: np.ndarray
  loss_mask: np.ndarray

  def __len__(self) -> int:
    return len(self.input_ids)

  @property
  def num_loss_tokens(self) -> int:
    return int(np.sum(self.loss_mask))


# transformers 5.0.x keeps the `{% generation %}` tracker of a compiled chat template in one object that every
# thread shares (later releases keep it in a ContextVar): while one thread renders with
# return_assistant_tokens_mask, another thread's render fails ("AssistantTracker should not be reused before
# closed") or, rendering without the mask, adds its assistant spans to the first one's mask. grain tokenizes steps
# on two threads, so every render in jaxsft goes through `apply_chat_template`, one at a time (rendering is Python
# under the GIL: this costs next to nothing).
_TEMPLATE_LOCK = threading.Lock()


def apply_chat_template(tokenizer, messages: list[dict], **kwargs):
  """`tokenizer.apply_chat_template(messages, **kwargs)`, one render at a time in this process."""
  with _TEMPLATE_LOCK:
    return tokenizer.apply_chat_template(messages, **kwargs)


def detect_format(columns: Sequence[str], dataset_text_field: str = 'text') -> str:
  """The row format of a dataset with these columns (TRL's precedence: prompt/completion first)."""
  cols = set(columns)
  if 'prompt' in cols and 'completion' in cols:
    return PROMPT_COMPLETION
  if 'messages' in cols or 'conversations' in cols:
    return MESSAGES
  if dataset_text_field in cols:
    return TEXT
  raise InputError(
      f'dataset columns {sorted(cols)}: expected a {MESSAGES!r} (or {"conversations"!r}) column, '
      f"'prompt' and 'completion' columns, or the text column {dataset_text_field!r} "
      "(config field 'dataset_text_field')")


def has_generation_markers(template: str | None) -> bool:
  """Whether a chat template string has `{% generation %}` markers (whitespace-trim variants too)."""
  return bool(template) and _GENERATION_MARKER.search(template) is not None


def assistant_mask_method(tokenizer, **template_kwargs) -> str:
  """'generation_markers' (transformers' mask) or 'derived' (prefix diffing), for logging once."""
  template = _resolve_template(tokenizer, template_kwargs)
  return MASK_FROM_MARKERS if has_generation_markers(template) else MASK_DERIVED


def assistant_mask(tokenizer, messages: list[dict], **template_kwargs) -> tuple[list[int], list[int]]:
  """Token ids of `apply_chat_template(messages)` and the mask of the assistant tokens.

  Args:
    tokenizer: a fast Hugging Face tokenizer with a chat template.
    messages: the conversation, a list of {role, content, ...} dicts.
    **template_kwargs: passed to `apply_chat_template` (`chat_template`, `tools`, template variables).

  Returns:
    (input_ids, mask), equal-length lists; mask[t] = 1 for tokens of assistant turns.

  Raises:
    InputError: the template cannot be diffed (prefix property violated), or the tokenizer is slow.
  """
  template = _resolve_template(tokenizer, template_kwargs)
  if has_generation_markers(template):
    out = apply_chat_template(tokenizer, messages, tokenize=True, return_dict=True,
                              return_assistant_tokens_mask=True, **template_kwargs)
    return list(out['input_ids']), list(out['assistant_masks'])
  return _derived_assistant_mask(tokenizer, messages, template_kwargs)


def _resolve_template(tokenizer, template_kwargs: dict) -> str | None:
  try:
    return tokenizer.get_chat_template(template_kwargs.get('chat_template'), template_kwargs.get('tools'))
  except ValueError as e:  # No chat template set.
    raise InputError(f"config field 'chat_template': {one_line(e, 300)}") from None


def _render(tokenizer, messages: list[dict], template_kwargs: dict, *, add_generation_prompt: bool) -> str:
  return apply_chat_template(tokenizer, messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                             **template_kwargs)


def _derived_assistant_mask(tokenizer, messages: list[dict],
                            template_kwargs: dict) -> tuple[list[int], list[int]]:
  """The assistant mask of a marker-less template, by rendering the conversation prefix by prefix."""
  if not getattr(tokenizer, 'is_fast', False):
    raise InputError("config field 'assistant_only_loss': needs a fast tokenizer (token offsets) when the "
                     'chat template has no {% generation %} markers')
  full = _render(tokenizer, messages, template_kwargs, add_generation_prompt=False)
  spans = []
  for i, message in enumerate(messages):
    if message.get('role') != 'assistant':
      continue
    if i == 0:
      raise InputError("config field 'assistant_only_loss': the conversation starts with an assistant message, "
                       'so its generation prompt cannot be rendered (the chat template has no '
                       '{% generation %} markers to mark it instead)')
    header = _render(tokenizer, messages[:i], template_kwargs, add_generation_prompt=True)
    turn = _render(tokenizer, messages[:i + 1], template_kwargs, add_generation_prompt=False)
    if not turn.startswith(header) or not full.startswith(turn):
      what = ('the generation prompt is not a prefix of the rendered assistant turn' if not turn.startswith(header)
              else 'later messages change how this turn is rendered (e.g. past reasoning is stripped)')
      raise InputError(
          f"config field 'assistant_only_loss': the chat template renders assistant message {i} in a way that "
          f'cannot be diffed ({what}) and it has no {{% generation %}} markers; add '
          '{% generation %}...{% endgeneration %} around the assistant output in the template '
          "(config field 'chat_template') or train on all tokens")
    end = len(turn.rstrip())  # The trailing newline after the end-of-turn token belongs to the template.
    if end > len(header):
      spans.append((len(header), end))
  encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
  input_ids = list(encoding['input_ids'])
  mask = [0] * len(input_ids)
  # Same rule as transformers' `return_assistant_tokens_mask`: every token overlapping a span is marked.
  span_idx = 0
  for t, (start, stop) in enumerate(encoding['offset_mapping']):
    while span_idx < len(spans) and start >= spans[span_idx][1]:
      span_idx += 1
    if span_idx == len(spans):
      break
    if stop > spans[span_idx][0]:
      mask[t] = 1
  return input_ids, mask


def truncate(example: Example, max_length: int | None) -> tuple[Example, bool]:
  """Keeps the first `max_length` tokens (TRL's 'keep_start'); returns (example, whether it was cut)."""
  if max_length is None or len(example.input_ids) <= max_length:
    return example, False
  return Example(example.input_ids[:max_length], example.loss_mask[:max_length]), True


def tokenize_row(row: dict, tokenizer, *, fmt: str, max_length: int | None, assistant_only_loss: bool,
                 completion_only_loss: bool | None, dataset_text_field: str, where: str) -> Example:
  """One dataset row → `Example` (truncated to `max_length`), as TRL's SFTTrainer tokenizes it.

  Args:
    row: the dataset row.
    tokenizer: the Hugging Face tokenizer (chat template and eos already set as configured).
    fmt: 'messages' | 'prompt_completion' | 'text' (see `detect_format`).
    max_length: keep at most this many tokens (None: no truncation).
    assistant_only_loss: loss on assistant tokens only (conversational rows only).
    completion_only_loss: loss on completion tokens only; None = on for prompt/completion rows.
    dataset_text_field: the text column of 'text' rows.
    where: the row's origin for error messages, e.g. "data/train.jsonl line 17".

  Returns:
    The Example; its loss mask may be all zero after truncation (the caller drops such rows).
  """
  if fmt not in FORMATS:
    raise ValueError(f'unknown format {fmt!r}; expected one of {FORMATS}')
  if not isinstance(row, dict):
    raise InputError(f'{where}: expected an object with named columns, got {type(row).__name__}')
  if completion_only_loss is None:
    completion_only_loss = fmt == PROMPT_COMPLETION
  try:
    input_ids, masks = _tokenize(row, tokenizer, fmt=fmt, assistant_only_loss=assistant_only_loss,
                                 completion_only_loss=completion_only_loss,
                                 dataset_text_field=dataset_text_field, where=where)
  except InputError as e:
    message = str(e)
    raise InputError(message if message.startswith(where) else f'{where}: {message}') from None
  loss_mask = np.ones(len(input_ids), np.int32)
  for mask in masks:
    loss_mask &= np.asarray(mask, np.int32)[:len(input_ids)]
  example = Example(np.asarray(input_ids, np.int32), loss_mask)
  return truncate(example, max_length)[0]


def tokenize_rows(rows: Sequence[dict], tokenizer, *, fmt: str, max_length: int | None, assistant_only_loss: bool,
                  completion_only_loss: bool | None, dataset_text_field: str,
                  wheres: Sequence[str]) -> list[Example | InputError]:
  """`tokenize_row` of many rows at once: for each row its Example, or the InputError it raises, as a value.

  Every result equals what `tokenize_row(rows[k], ..., where=wheres[k])` returns or raises. Rows whose tokens
  are "render, then encode one string" are encoded together in one call of the Rust tokenizer (all cores, no
  Python per token): `messages` rows without `assistant_only_loss`, rendered with
  `apply_chat_template(tokenize=False)` and encoded without special tokens, which is what transformers'
  `apply_chat_template(tokenize=True)` does (render, then `tokenizer(text, add_special_tokens=False)`); and
  `text` rows (text + eos, encoded with special tokens, as `tokenize_row`). Those encodings call the backend's
  `encode_batch_fast` when the tokenizer is a plain `TokenizersBackend` whose state is what `tokenizer(...)`
  would set (no truncation, no padding), which gives the ids of `tokenizer(text)` without computing character
  offsets; otherwise `tokenizer(texts)`. Everything else (assistant masks, prompt/completion rows, a row whose
  `chat_template_kwargs` set an argument of `apply_chat_template` itself, tokenizers that override how they
  encode) goes through `tokenize_row` row by row.

  Args:
    rows: the dataset rows.
    tokenizer, fmt, max_length, assistant_only_loss, completion_only_loss, dataset_text_field: as for
      `tokenize_row`.
    wheres: each row's origin for error messages (as many as rows).

  Returns:
    One entry per row, in order: its Example (truncated to `max_length`) or its InputError.

  Raises:
    ValueError: an unknown `fmt`, or `wheres` not as long as `rows` (caller errors, not data errors).
  """
  if fmt not in FORMATS:
    raise ValueError(f'unknown format {fmt!r}; expected one of {FORMATS}')
  if len(wheres) != len(rows):
    raise ValueError(f'{len(rows)} rows but {len(wheres)} origins')
  settings = dict(fmt=fmt, max_length=max_length, assistant_only_loss=assistant_only_loss,
                  completion_only_loss=completion_only_loss, dataset_text_field=dataset_text_field)
  batched = fmt in (MESSAGES, TEXT) and not assistant_only_loss and _encodes_by_call(tokenizer)
  results: list[Example | InputError | None] = [None] * len(rows)
  pending, texts = [], []
  for k, (row, where) in enumerate(zip(rows, wheres)):
    text = None
    if batched and isinstance(row, dict):
      try:
        text = _rendered(row, tokenizer, fmt, dataset_text_field, where)
      except InputError as e:
        results[k] = _located(e, where)
        continue
    if text is None:
      try:
        results[k] = tokenize_row(row, tokenizer, where=where, **settings)
      except InputError as e:
        results[k] = e
      continue
    pending.append(k)
    texts.append(text)
  if texts:
    for k, ids in zip(pending, _encode_batch(tokenizer, texts, add_special_tokens=fmt == TEXT)):
      input_ids = np.asarray(ids, np.int32)
      results[k] = truncate(Example(input_ids, np.ones(len(input_ids), np.int32)), max_length)[0]
  return results


def _located(e: InputError, where: str) -> InputError:
  """The error as `tokenize_row` raises it: prefixed with the row's origin unless it already starts with it."""
  message = str(e)
  return InputError(message if message.startswith(where) else f'{where}: {message}')


def _rendered(row: dict, tokenizer, fmt: str, dataset_text_field: str, where: str) -> str | None:
  """The string `tokenize_row` encodes in one call for this row (None: it needs `tokenize_row` itself).

  Checks the row in `_tokenize`'s order, so a bad row raises the same InputError (before `_located`).
  """
  if fmt == TEXT:
    return _with_eos(tokenizer, rows_lib.column(row, dataset_text_field, where, str, 'a string'))
  messages = rows_lib.row_messages(row, where)
  kwargs = rows_lib.template_kwargs(row, where)
  if any(key != 'tools' and key in _chat_template_parameters() for key in kwargs):
    return None  # The row sets `tokenize`, `return_dict`, ... itself: only the real call is surely the same.
  try:
    return apply_chat_template(tokenizer, messages, tokenize=False, add_generation_prompt=False, **kwargs)
  except (jinja2.TemplateError, TypeError, ValueError) as e:
    raise InputError(f"{where}: column 'messages': the chat template failed ({one_line(e, 300)})") from None


@functools.cache
def _chat_template_parameters() -> frozenset[str]:
  from transformers import tokenization_utils_base  # pylint: disable=import-outside-toplevel
  return frozenset(inspect.signature(tokenization_utils_base.PreTrainedTokenizerBase.apply_chat_template).parameters)


def _encodes_by_call(tokenizer) -> bool:
  """Whether `apply_chat_template(tokenize=True)` and `tokenizer(text)` are transformers' own code, unchanged.

  Then `apply_chat_template(m, tokenize=True)['input_ids']` is `tokenizer(render(m), add_special_tokens=False)`
  (render, then encode the string), and `tokenizer(text)` encodes `[text]` with the backend's `encode_batch`
  exactly as `tokenizer(texts)` encodes a list (transformers 5's `TokenizersBackend._encode_plus` turns one
  text into a batch of one).
  """
  try:
    from transformers import tokenization_utils_base  # pylint: disable=import-outside-toplevel
    from transformers import tokenization_utils_tokenizers  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  base = tokenization_utils_base.PreTrainedTokenizerBase
  backend_cls = tokenization_utils_tokenizers.TokenizersBackend
  cls = type(tokenizer)
  own_encode_plus = cls._encode_plus is backend_cls._encode_plus  # pylint: disable=protected-access
  return (isinstance(tokenizer, backend_cls) and cls.apply_chat_template is base.apply_chat_template
          and cls.__call__ is base.__call__ and own_encode_plus)


def _encode_batch(tokenizer, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
  """`[tokenizer(t, add_special_tokens=...)['input_ids'] for t in texts]` in one call (needs `_encodes_by_call`).

  `TokenizersBackend._encode_plus` sets the backend's truncation and padding (none, for a plain call) and
  `encode_special_tokens` (= `split_special_tokens`), then calls `encode_batch`. When the backend is already so
  set (it stays so after any plain call) and the tokenizer has no input/target modes, the backend is called
  directly, with `encode_batch_fast`: the same ids without computing character offsets (about twice as fast
  for byte-level BPE). Otherwise `tokenizer(texts)` sets them.
  """
  backend = tokenizer.backend_tokenizer
  direct = (backend.truncation is None and backend.padding is None
            and getattr(backend, 'encode_special_tokens', False) == bool(tokenizer.split_special_tokens)
            and not hasattr(tokenizer, '_switch_to_input_mode'))
  if direct:
    encode = getattr(backend, 'encode_batch_fast', backend.encode_batch)
    return [encoding.ids for encoding in encode(texts, add_special_tokens=add_special_tokens)]
  return list(tokenizer(texts, add_special_tokens=add_special_tokens)['input_ids'])


def _tokenize(row: dict, tokenizer, *, fmt: str, assistant_only_loss: bool, completion_only_loss: bool,
              dataset_text_field: str, where: str) -> tuple[list[int], list[list[int]]]:
  """(input_ids, masks to AND together) of one row, before truncation."""
  if fmt == TEXT:
    if assistant_only_loss:
      raise _not_conversational(fmt)
    text = rows_lib.column(row, dataset_text_field, where, str, 'a string')
    return _encode(tokenizer, _with_eos(tokenizer, text)), []

  if fmt == MESSAGES:
    messages = rows_lib.row_messages(row, where)
    kwargs = rows_lib.template_kwargs(row, where)
    if assistant_only_loss:
      input_ids, mask = _masked_chat_ids(tokenizer, messages, kwargs, where, 'messages')
      return input_ids, [mask]
    return chat_ids(tokenizer, messages, kwargs, where, 'messages'), []

  prompt = rows_lib.column(row, 'prompt', where, (str, list), 'a string or a list of messages')
  completion = rows_lib.column(row, 'completion', where, (str, list), 'a string or a list of messages')
  if isinstance(prompt, str) != isinstance(completion, str):
    raise InputError(f"{where}: columns 'prompt' and 'completion' must both be strings or both be message "
                     f'lists, got {type(prompt).__name__} and {type(completion).__name__}')
  masks = []
  if isinstance(prompt, str):
    if assistant_only_loss:
      raise _not_conversational(fmt)
    prompt_ids = _encode(tokenizer, prompt)
    input_ids = _encode(tokenizer, prompt + _with_eos(tokenizer, completion))
  else:
    prompt = rows_lib.message_list(prompt, where, 'prompt')
    completion = rows_lib.message_list(completion, where, 'completion')
    kwargs = rows_lib.template_kwargs(row, where)
    prompt_ids = chat_ids(tokenizer, prompt, kwargs, where, 'prompt', add_generation_prompt=True)
    if assistant_only_loss:
      input_ids, mask = _masked_chat_ids(tokenizer, prompt + completion, kwargs, where, 'prompt + completion')
      masks.append(mask)
    else:
      input_ids = chat_ids(tokenizer, prompt + completion, kwargs, where, 'prompt + completion')
  if completion_only_loss:
    prompt_len = _common_prefix_length(prompt_ids, input_ids)
    masks.append([0] * prompt_len + [1] * (len(input_ids) - prompt_len))
  return input_ids, masks


def _not_conversational(fmt: str) -> InputError:
  return InputError(f"config field 'assistant_only_loss': needs conversational rows (message lists), but the "
                    f'rows are plain {fmt!r} strings')


def _masked_chat_ids(tokenizer, messages: list[dict], kwargs: dict, where: str,
                     column: str) -> tuple[list[int], list[int]]:
  """`assistant_mask` with template failures reported on the row; a row without assistant token fails."""
  try:
    input_ids, mask = assistant_mask(tokenizer, messages, **kwargs)
  except InputError:
    raise
  except (jinja2.TemplateError, TypeError, ValueError) as e:
    raise InputError(f'{where}: column {column!r}: the chat template failed ({one_line(e, 300)})') from None
  if 1 not in mask:
    raise InputError(f"{where}: config field 'assistant_only_loss': the row has no assistant token (no "
                     'assistant message, or {% generation %} markers in the chat template that mark nothing)')
  return input_ids, mask


def _with_eos(tokenizer, text: str) -> str:
  eos = tokenizer.eos_token
  if eos is None:
    raise InputError("config field 'eos_token': the tokenizer has no eos token to end non-conversational rows")
  return text if text.endswith(eos) else text + eos


def _encode(tokenizer, text: str) -> list[int]:
  return list(tokenizer(text)['input_ids'])


def chat_ids(tokenizer, messages: list[dict], kwargs: dict, where: str, column: str, *,
             add_generation_prompt: bool = False) -> list[int]:
  """The chat-templated token ids of `messages`; a template failure is an InputError naming the row."""
  try:
    out = apply_chat_template(tokenizer, messages, tokenize=True, return_dict=True,
                              add_generation_prompt=add_generation_prompt, **kwargs)
  except (jinja2.TemplateError, TypeError, ValueError) as e:
    raise InputError(f'{where}: column {column!r}: the chat template failed ({one_line(e, 300)})') from None
  return list(out['input_ids'])


def _common_prefix_length(ids: Sequence[int], other_ids: Sequence[int]) -> int:
  length = 0
  for a, b in zip(ids, other_ids):
    if a != b:
      break
    length += 1
  return length
