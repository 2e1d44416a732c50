"""Packing whole conversations into fixed-length rows: the batch layout, the row builder and the bin plan.

A batch is a dict of int32 `[B, T]` arrays (`BATCH_KEYS`): `input_ids`, `positions` (RoPE positions,
restarting at 0 in each document), `segment_ids` (1, 2, 3, ... per document of the row, 0 = padding) and
`loss_mask` (1 = the token is a training target). Padding is `pad_id` tokens with segment 0, position 0 and
loss mask 0. The model attends only within equal segment ids and the loss never predicts across a segment
boundary, so a packed row trains exactly as its documents would, each alone in its own padded row.

`pack_bfd` decides which documents share a row: best-fit-decreasing, exactly TRL 1.16's `_pack_bfd`
(`trl/data_utils.py`): items sorted by length, longest first (ties in index order, as pyarrow's stable sort);
each goes into the open bin whose free space is the smallest that still fits it (among bins with that same
free space, the one that reached it first), else into a new bin. TRL finds that space with a segment tree
over the free-space values; here a two-level bitmap of the free-space values answers the same query ("the
smallest free space >= length") with a few machine-word operations, so the whole dataset is packed at once
in a tight Python loop (TRL packs each `map` batch of 1000 rows separately).

`pack_row` lays the documents of one bin out as one row; `Bins` is the plan (members of every bin, flat).
"""

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxsft.data import formats

BATCH_KEYS = ('input_ids', 'positions', 'segment_ids', 'loss_mask')


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """A row of padding only: pad ids, segment 0, loss mask 0, positions 0."""
  row = {key: np.zeros(seq_len, np.int32) for key in BATCH_KEYS}
  row['input_ids'][:] = pad_id
  return row


def pack_row(examples: Sequence[formats.Example], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """The examples concatenated into one right-padded `[seq_len]` row of `BATCH_KEYS` int32 arrays.

  The k-th example becomes segment k + 1 with positions 0..L_k - 1 and its own loss mask. No examples give
  `empty_row`; one example gives the plain padded row.

  Raises:
    ValueError: the examples' total length exceeds `seq_len`, or an example's ids and mask differ in length.
  """
  total = sum(len(example.input_ids) for example in examples)
  if total > seq_len:
    raise ValueError(f'{len(examples)} example(s) of {total} tokens in all do not fit one row of seq_len={seq_len}')
  row = empty_row(seq_len, pad_id)
  start = 0
  for k, example in enumerate(examples):
    length = len(example.input_ids)
    if len(example.loss_mask) != length:
      raise ValueError(f'example {k}: {length} input_ids but {len(example.loss_mask)} loss_mask entries')
    end = start + length
    row['input_ids'][start:end] = example.input_ids
    row['positions'][start:end] = np.arange(length, dtype=np.int32)
    row['segment_ids'][start:end] = k + 1
    row['loss_mask'][start:end] = example.loss_mask
    start = end
  return row


@dataclasses.dataclass(frozen=True, eq=False)
class Bins:
  """A packing plan: bin b holds the items `members[offsets[b]:offsets[b + 1]]` (indices into the lengths)."""
  offsets: np.ndarray  # int64 [num_bins + 1], offsets[0] == 0, non-decreasing.
  members: np.ndarray  # int64 [n], bin by bin, each bin's members in the order they were placed.

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def bin(self, b: int) -> np.ndarray:
    """The item indices of bin `b`."""
    if not 0 <= b < len(self):
      raise IndexError(f'bin {b} out of range for {len(self)} bins')
    return self.members[self.offsets[b]:self.offsets[b + 1]]


def one_per_bin(n: int) -> Bins:
  """The unpacked plan: bin i holds item i alone."""
  return Bins(np.arange(n + 1, dtype=np.int64), np.arange(n, dtype=np.int64))


def _check_lengths(lengths: np.ndarray, seq_len: int) -> np.ndarray:
  if int(seq_len) != seq_len or seq_len < 1:
    raise ValueError(f'seq_len must be a positive integer, got {seq_len!r}')
  lengths = np.asarray(lengths)
  if lengths.ndim != 1:
    raise ValueError(f'lengths must be 1-D, got shape {lengths.shape}')
  if lengths.size and not np.issubdtype(lengths.dtype, np.integer):
    raise ValueError(f'lengths must be integers, got dtype {lengths.dtype}')
  lengths = lengths.astype(np.int64)
  bad = np.flatnonzero((lengths < 1) | (lengths > seq_len))
  if bad.size:
    i = int(bad[0])
    raise ValueError(f'item {i} has length {int(lengths[i])}; every length must be in 1..seq_len={seq_len} '
                     f'({bad.size} item(s) out of range)')
  return lengths


def pack_bfd(lengths: np.ndarray, seq_len: int) -> Bins:
  """Best-fit-decreasing bins of capacity `seq_len` for items of these lengths: TRL 1.16's `_pack_bfd`.

  Bins are numbered in the order they are opened; each bin's members are in the order they were placed
  (longest first). On the same lengths this is exactly TRL's grouping and order of packed rows.

  Raises:
    ValueError: a length outside 1..seq_len (TRL drops empty items and truncates long ones; callers here
      truncate and drop before planning).
  """
  lengths = _check_lengths(lengths, seq_len)
  n = len(lengths)
  if n == 0:
    return Bins(np.zeros(1, np.int64), np.zeros(0, np.int64))
  # Descending, ties by ascending index: pyarrow's (stable) `StructArray.sort('descending', by=0)` in TRL.
  order = np.argsort(-lengths, kind='stable')
  sorted_lengths = lengths[order].tolist()

  # Free spaces 1..seq_len-1 that some open bin has: bit (s & 63) of words[s >> 6], and bit w of `top` set
  # iff words[w] != 0. A full bin (space 0) is never looked up; `seq_len` (a new bin) is always available.
  words = [0] * ((seq_len >> 6) + 1)
  top = 0
  queues: dict[int, collections.deque] = {}  # space -> bins with exactly that free space, oldest first.
  bin_of = [0] * n  # Bin of the i-th placed item.
  num_bins = 0
  for i, length in enumerate(sorted_lengths):
    # The smallest free space >= length (TRL's `_SegmentTree.search`).
    w = length >> 6
    x = words[w] >> (length & 63)
    if x:
      space = length + (x & -x).bit_length() - 1
    else:
      y = top >> (w + 1)
      if y:
        w = w + (y & -y).bit_length()
        x = words[w]
        space = (w << 6) + (x & -x).bit_length() - 1
      else:
        space = seq_len
    if space < seq_len:
      queue = queues[space]
      b = queue.popleft()
      if not queue:
        del queues[space]
        words[space >> 6] &= ~(1 << (space & 63))
        if not words[space >> 6]:
          top &= ~(1 << (space >> 6))
    else:
      b = num_bins
      num_bins += 1
    bin_of[i] = b
    space -= length
    if space > 0:
      queue = queues.get(space)
      if queue is None:
        queues[space] = collections.deque((b,))
        if not words[space >> 6]:
          top |= 1 << (space >> 6)
        words[space >> 6] |= 1 << (space & 63)
      else:
        queue.append(b)

  bin_of_placed = np.asarray(bin_of, np.int64)
  # Group by bin, keeping the placement order inside each bin (a stable sort on the bin number).
  members = order[np.argsort(bin_of_placed, kind='stable')].astype(np.int64)
  offsets = np.zeros(num_bins + 1, np.int64)
  np.cumsum(np.bincount(bin_of_placed, minlength=num_bins), out=offsets[1:])
  return Bins(offsets, members)


def efficiency(lengths: np.ndarray, num_bins: int, seq_len: int) -> float:
  """Non-padding fraction of `num_bins` rows of `seq_len` holding these lengths (0.0 for no bins)."""
  if num_bins <= 0:
    return 0.0
  return float(np.sum(np.asarray(lengths, np.int64))) / (num_bins * seq_len)
