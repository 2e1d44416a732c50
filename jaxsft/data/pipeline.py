"""Rows → tokenized examples → padded, shuffled, fixed-shape batches.

`tokenize_dataset` tokenizes every row as TRL's SFTTrainer does (`formats.tokenize_row`), truncates to
`max_length` and drops the rows left without a loss token (counted, never trained on).
`padded_batches` yields one epoch of `[batch_size, seq_len]` int32 batches in the shared batch layout
(`input_ids`, `positions`, `segment_ids`, `loss_mask`), one example per row, right padding, the last
partial batch filled with empty rows so shapes stay static. The order is a grain `MapDataset` shuffle,
deterministic in (seed, epoch); packing will replace the per-row padding step later.
"""

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence

import grain
import numpy as np

from jaxsft.data import formats
from jaxsft.errors import InputError

BATCH_KEYS = ('input_ids', 'positions', 'segment_ids', 'loss_mask')


@dataclasses.dataclass
class TokenizedData:
  """The tokenized training examples and what happened to the rows on the way."""
  examples: list[formats.Example]
  num_rows: int  # Rows read.
  num_dropped: int  # Rows without any loss token after truncation (not in `examples`).
  num_truncated: int  # Rows cut to max_length (kept or dropped).
  num_loss_tokens: int  # Next-token targets in `examples` (loss tokens after each example's first).
  fmt: str | None = None  # 'messages' | 'prompt_completion' | 'text'.
  assistant_mask_method: str | None = None  # 'generation_markers' | 'derived' with assistant_only_loss.


def _columns(rows: Sequence[dict]) -> list[str]:
  names = getattr(rows, 'column_names', None)  # A datasets.Dataset.
  if names is not None:
    return list(names)
  first = rows[0]
  return list(first) if isinstance(first, dict) else []


def tokenize_dataset(rows: Sequence[dict], tokenizer, *, fmt: str | None = None, max_length: int | None,
                     assistant_only_loss: bool, completion_only_loss: bool | None, dataset_text_field: str,
                     origin: Callable[[int], str] | None = None) -> TokenizedData:
  """Tokenizes every row; rows with no loss token after truncation are dropped and counted.

  Args:
    rows: the dataset rows (a list of dicts or a `datasets.Dataset`).
    tokenizer: the Hugging Face tokenizer (chat template and eos as configured).
    fmt: the row format; None detects it from the columns (`formats.detect_format`).
    max_length: truncate to this many tokens (keep the start); None: no truncation.
    assistant_only_loss, completion_only_loss, dataset_text_field: as in TRL's SFTConfig.
    origin: maps a row index to where it came from ("data/train.jsonl line 17") for error messages.

  Raises:
    InputError: a bad row (naming it), or no row left with a loss token.
  """
  num_rows = len(rows)
  if num_rows == 0:
    raise InputError('the training dataset has no rows')
  where = origin or (lambda i: f'row {i}')
  if fmt is None:
    fmt = formats.detect_format(_columns(rows), dataset_text_field)
  method = None
  if assistant_only_loss:
    if fmt == formats.TEXT:
      raise InputError("config field 'assistant_only_loss': needs conversational rows ('messages' or "
                       f"'prompt'/'completion' message lists), but the dataset is plain text ({dataset_text_field!r})")
    method = formats.assistant_mask_method(tokenizer)
  examples, num_dropped, num_truncated, num_loss_tokens = [], 0, 0, 0
  for i in range(num_rows):
    example = formats.tokenize_row(rows[i], tokenizer, fmt=fmt, max_length=None,
                                   assistant_only_loss=assistant_only_loss,
                                   completion_only_loss=completion_only_loss,
                                   dataset_text_field=dataset_text_field, where=where(i))
    example, cut = formats.truncate(example, max_length)
    num_truncated += cut
    if not example.loss_mask.any():
      num_dropped += 1
      continue
    examples.append(example)
    num_loss_tokens += int(example.loss_mask[1:].sum())
  if not examples:
    raise InputError(f'all {num_rows} rows were dropped: none has a loss token left after truncation to '
                     f"max_length={max_length} (config fields 'max_length', 'assistant_only_loss', "
                     "'completion_only_loss')")
  return TokenizedData(examples, num_rows, num_dropped, num_truncated, num_loss_tokens, fmt, method)


def num_batches(num_examples: int, batch_size: int) -> int:
  """Batches per epoch: the last partial batch counts (it is filled with empty rows)."""
  return math.ceil(num_examples / batch_size)


def _epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _padded_row(example: formats.Example, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  length = len(example.input_ids)
  if length > seq_len:
    raise ValueError(f'an example of {length} tokens does not fit seq_len={seq_len}; truncate first')
  row = empty_row(seq_len, pad_id)
  row['input_ids'][:length] = example.input_ids
  row['positions'][:length] = np.arange(length, dtype=np.int32)
  row['segment_ids'][:length] = 1
  row['loss_mask'][:length] = example.loss_mask
  return row


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """A row of padding only: pad ids, segment 0, loss mask 0, positions 0."""
  row = {key: np.zeros(seq_len, np.int32) for key in BATCH_KEYS}
  row['input_ids'][:] = pad_id
  return row


def empty_batch(batch_size: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """`batch_size` empty rows: fills a partial batch, or a partial accumulation step (no loss tokens)."""
  return {key: np.tile(value, (batch_size, 1)) for key, value in empty_row(seq_len, pad_id).items()}


def padded_batches(examples: Sequence[formats.Example], *, batch_size: int, seq_len: int, pad_id: int,
                   seed: int, epoch: int, shuffle: bool = True) -> Iterator[dict[str, np.ndarray]]:
  """One epoch of right-padded `[batch_size, seq_len]` int32 batches, deterministic given (seed, epoch).

  Every example is one row (segment 1, positions 0..L-1). The last partial batch is completed with
  empty rows, so there are `num_batches(len(examples), batch_size)` batches of identical shape.
  """
  if batch_size < 1 or seq_len < 1:
    raise ValueError(f'batch_size and seq_len must be positive, got {batch_size} and {seq_len}')
  if not examples:
    return
  dataset = grain.MapDataset.source(examples)
  if shuffle:
    dataset = dataset.shuffle(seed=_epoch_seed(seed, epoch))
  dataset = dataset.map(lambda example: _padded_row(example, seq_len, pad_id))
  dataset = dataset.batch(batch_size, drop_remainder=False)
  for i in range(len(dataset)):
    batch = dataset[i]
    missing = batch_size - len(batch['input_ids'])
    if missing:
      filler = empty_batch(missing, seq_len, pad_id)
      batch = {key: np.concatenate([value, filler[key]]) for key, value in batch.items()}
    yield {key: np.ascontiguousarray(batch[key], dtype=np.int32) for key in BATCH_KEYS}
