"""Row widths of unpacked micro-batches: each as short as its longest conversation allows, from a bounded set.

TRL's collator pads each batch to its longest row. A jitted step has static shapes, so padding every unpacked row
to `max_length` would compute 4x the positions of a batch of 500-token conversations at max_length 2048 (and
attention 16x). Instead a micro-batch is laid out at the smallest *width* of a short list that holds its longest
row (over every process: all of them agree), and the train step compiles one program per width on first use.

`length_buckets` (a config field) chooses the list, from `MIN_WIDTH` up to `max_length` (which is always in it):
- 'auto': 128, 256, 384, 512, 768, 1024, 1536, 2048, ... (each power of two and 1.5x it): at most 1.5x the longest
  row's positions past 256 tokens, about 2 * log2(max_length / 128) compiled widths (8 at 2048, 16 at 32768);
- 'pow2': 128, 256, 512, ...: at most 2x the positions, about half the widths (5 at 2048, 9 at 32768);
- 'none': max_length only (one program; the layout of packed and padding-free rows, which fill max_length).
Every width is a multiple of 128 (the TPU's lane width and splash attention's smallest block) except a
`max_length` that is not. Measured on 2 CPU cores (benchmarks/vs_trl.py, cpu_long): see README "Performance".

Rows of similar length share micro-batches: a step's rows are dealt into its micro-batches longest first
(`longest_first`), so its long rows pad each other and its short rows fit a narrow width (an unshuffled eval
split runs longest first over the whole split). Training the 16 rows of a step as 4 random micro-batches of 4
at max_length 2048 ('auto', conversations of median 340 tokens) computes 2.2x their tokens; dealt longest first,
1.6x (TRL's collator, padding each random micro-batch to its longest row: 1.9x). The step's loss and gradient
are sums over its rows divided by its loss tokens, whatever micro-batch a row is in (transformers' and TRL's
`num_items_in_batch` normalisation), so only float summation order changes.

Padding never changes the loss: its positions have weight 0 and segment 0 (no token attends them), so a
bucketed step computes the padded-to-max_length step's sums up to float summation order.
"""

import numpy as np

from jaxsft.errors import InputError
from jaxsft.fields import LENGTH_BUCKETS

MIN_WIDTH = 128


def widths(max_length: int, scheme: str) -> tuple[int, ...]:
  """The allowed row widths for rows of at most `max_length` tokens, ascending; the last is `max_length`."""
  if scheme not in LENGTH_BUCKETS:
    raise InputError(f"config field 'length_buckets' is {scheme!r}; expected one of {', '.join(LENGTH_BUCKETS)}")
  if scheme == 'none' or max_length <= MIN_WIDTH:
    return (max_length,)
  found, power = {MIN_WIDTH}, MIN_WIDTH
  while power < max_length:
    power *= 2
    found.add(power)
    if scheme == 'auto' and power >= 4 * MIN_WIDTH:  # 1.5x the previous power of two, from 384 (192 is no
      found.add(power * 3 // 4)                       # multiple of 128).
  return tuple(sorted(w for w in found if w < max_length)) + (max_length,)


def row_widths(config, *, packed: bool) -> tuple[int, ...] | None:
  """The widths a run's micro-batches take: its length buckets for unpacked rows; None (max_length) for packed
  and padding-free rows, which fill it."""
  return None if packed else widths(config.max_length, config.length_buckets)


def width_for(longest: int, allowed: tuple[int, ...]) -> int:
  """The smallest allowed width holding a row of `longest` tokens (the smallest for an empty micro-batch)."""
  for width in allowed:
    if longest <= width:
      return width
  raise ValueError(f'a row of {longest} tokens is longer than the widest allowed, {allowed[-1]}')


def longest_first(lengths) -> np.ndarray:
  """The order that sorts rows of these lengths longest first, ties in their given order (deterministic)."""
  return np.argsort(-np.asarray(lengths, np.int64), kind='stable')
