"""Index → plan → per-process, step-aligned batches, tokenized lazily by grain, resumable.

1. `index.build_index` (once per dataset, cached) knows every row's length after truncation and whether a
   loss token survives it; rows without one are dropped (counted), as TRL drops them.
2. `make_plan` decides the rows of an epoch: with packing, best-fit-decreasing bins of whole conversations
   (TRL's `bfd`, over the whole dataset); without, one conversation per row. Conversations are never split.
3. `Geometry` turns the number of plan rows into optimizer steps with transformers' Trainer arithmetic.
4. `StepSource` is a random-access grain source of optimizer steps: step s → its epoch e and place in the
   epoch; the epoch's rows are a seeded permutation of the plan rows (a new one per epoch); each
   micro-batch takes the next `G` rows (the global micro-batch) and process p keeps its own slice of them,
   so every process reads only its shard and the shards of an epoch are disjoint and cover the dataset. The
   rows are tokenized only then (a step's rows in one `formats.tokenize_rows` call), packed with segment ids
   and per-segment positions (`packing.pack_row`), and every step carries the number of loss tokens of the
   whole global step, known from the index on every process without communication.
5. `Loader` iterates a StepSource through grain (`to_iter_dataset` with prefetch threads, or worker
   processes with `dataloader_num_workers`); its state is the number of steps consumed, so a restored
   iterator yields exactly the batches an uninterrupted one would, mid-epoch and with packing.

Padding-free steps (`padding_free`, TRL's name, unpacked plans only): a step holds exactly the conversations it
would hold unpacked, but laid out best-fit-decreasing into the fewest `seq_len` rows, so the step needs
ceil(rows / G) micro-batches instead of `accumulation` (a per-step count, known up front for the whole run). The
loss of a step is its token sum over its token count whatever the layout, so this is the unpacked run's
arithmetic with (for long-tailed lengths) several times fewer padded tokens to compute.

Why not grain's own `BestFitPackIterDataset`: it packs a stream, so the number of packed rows — and with it
the schedule length and the point where hosts' epochs end — is known only after the stream has been read.
Packing a plan from the index gives exact step counts up front, identical batches on every launch and
every host count, and whole-dataset best-fit packing (as TRL's `bfd`).
"""

import dataclasses
import functools
import math

import grain
import numpy as np

from jaxsft.data import buckets
from jaxsft.data import formats
from jaxsft.data import index as index_lib
from jaxsft.data import packing
from jaxsft.errors import InputError


@dataclasses.dataclass(frozen=True)
class Geometry:
  """How the plan rows map onto optimizer steps (transformers' Trainer arithmetic)."""
  micro_batch_size: int  # Rows per micro-batch, all processes.
  accumulation: int
  micro_batches_per_epoch: int
  steps_per_epoch: int
  total_steps: int

  @classmethod
  def create(cls, num_rows: int, micro_batch_size: int, accumulation: int, num_train_epochs: float,
             max_steps: int) -> 'Geometry':
    micro_batches = math.ceil(num_rows / micro_batch_size)
    steps_per_epoch = max(math.ceil(micro_batches / accumulation), 1)
    total = max_steps if max_steps > 0 else math.ceil(num_train_epochs * steps_per_epoch)
    return cls(micro_batch_size, accumulation, micro_batches, steps_per_epoch, total)


@dataclasses.dataclass(frozen=True)
class Plan:
  """The rows of an epoch (before its shuffle): which source rows fill each `[seq_len]` row."""
  bins: packing.Bins  # Members are source row indices.
  num_targets: np.ndarray  # int64 [rows]: next-token targets of each row.
  num_input_tokens: np.ndarray  # int64 [rows]: non-padding (input) tokens of each row; loss tokens are num_targets.
  seq_len: int
  packed: bool

  def __len__(self) -> int:
    return len(self.bins)

  @property
  def efficiency(self) -> float:
    """Non-padding fraction of the epoch's tokens (the last partial batch's empty rows not counted)."""
    return float(self.num_input_tokens.sum()) / max(len(self) * self.seq_len, 1)


def make_plan(index: index_lib.Index, *, seq_len: int, pack: bool) -> Plan:
  kept = index.kept
  lengths = index.lengths[kept].astype(np.int64)
  bins = packing.pack_bfd(lengths, seq_len) if pack else packing.one_per_bin(len(kept))
  members = kept[bins.members]
  starts = bins.offsets[:-1]

  def per_row(values):
    return np.add.reduceat(values[members].astype(np.int64), starts) if len(members) else np.zeros(0, np.int64)

  return Plan(packing.Bins(bins.offsets, members), per_row(index.num_targets), per_row(index.lengths), seq_len,
              pack)


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


class StepSource:
  """Random access to this process's part of every optimizer step (a grain data source).

  `source[s]` = {'micro_batches': [micro_batches_per_step[s] × {key: int32 [local_rows, width]}], 'num_targets': loss
  tokens of the whole global step, 'num_input_tokens': its non-padding tokens, 'num_positions': the positions its
  micro-batches compute (padding included, every process), 'epoch': e}. Steps past the end of the plan within an
  epoch are filled with empty rows (no loss tokens), so every step has the same number of rows.

  `widths` (jaxsft/data/buckets.py): each micro-batch's width is the smallest of them that holds the longest row
  of the micro-batch over every process (so all processes agree); by default every row is `seq_len` wide. With
  more than one width, rows of similar length share micro-batches (`buckets.longest_first`): each step's rows are
  dealt into its micro-batches longest first, and an unshuffled source (eval: one pass, token-weighted sums) runs
  its rows longest first. A step trains on the same rows with the same summed loss and gradient either way.
  """

  def __init__(self, source, tokenizer, options: index_lib.Options, plan: Plan, geometry: Geometry, *,
               seed: int, shuffle: bool, pad_id: int, process_index: int = 0, process_count: int = 1,
               padding_free: bool = False, widths: tuple[int, ...] | None = None):
    if geometry.micro_batch_size % process_count:
      raise ValueError(f'a micro-batch of {geometry.micro_batch_size} rows does not split over '
                       f'{process_count} processes')
    if padding_free and plan.packed:
      raise ValueError('padding_free steps need an unpacked plan (one conversation per plan row)')
    self.source, self.tokenizer, self.options, self.plan, self.geometry = source, tokenizer, options, plan, geometry
    self.seed, self.shuffle, self.pad_id = seed, shuffle, pad_id
    self.process_index, self.process_count = process_index, process_count
    self.local_rows = geometry.micro_batch_size // process_count
    self.padding_free = padding_free
    self.widths = tuple(widths) if widths else (plan.seq_len,)
    self.grouped = len(self.widths) > 1 and not padding_free and not plan.packed
    # An unshuffled source's order is the same every epoch: grouped, its rows longest first, sorted once.
    self._fixed_order = None if shuffle else np.arange(len(plan))
    if self.grouped and not shuffle:
      self._fixed_order = buckets.longest_first(plan.num_input_tokens)
    if self.widths[-1] != plan.seq_len:
      raise ValueError(f'the widest row width {self.widths[-1]} is not the plan\'s {plan.seq_len}')
    # Per step: micro-batches, and the most conversations in one row (sizes cuDNN's packed layout).
    self.micro_batches_per_step = np.full(len(self), geometry.accumulation, np.int32)
    self.max_documents_per_row = int(np.diff(plan.bins.offsets).max(initial=1))
    if padding_free:
      for step in range(len(self)):
        rows = self._padding_free_rows(step)
        self.micro_batches_per_step[step] = max(math.ceil(len(rows) / geometry.micro_batch_size), 1)
        self.max_documents_per_row = max(self.max_documents_per_row, max((len(r) for r in rows), default=1))

  def __len__(self) -> int:
    return self.geometry.total_steps

  def epoch_of(self, step: int) -> int:
    return step // self.geometry.steps_per_epoch

  def global_rows(self, step: int) -> list[np.ndarray]:
    """Plan row indices of each micro-batch of `step`, all processes (fewer than G at an epoch's end)."""
    g = self.geometry
    epoch, within = divmod(step, g.steps_per_epoch)
    order = self._fixed_order
    if order is None:
      order = _permutation(self.seed, epoch, len(self.plan))
    rows = []
    for a in range(g.accumulation):
      m = within * g.accumulation + a
      rows.append(order[m * g.micro_batch_size:(m + 1) * g.micro_batch_size])
    return rows

  def _padding_free_rows(self, step: int) -> list[np.ndarray]:
    """The plan rows (conversations) of the whole unpacked `step`, best-fit-decreasing into `seq_len` rows."""
    rows = np.concatenate(self.global_rows(step))
    bins = packing.pack_bfd(self.plan.num_input_tokens[rows], self.plan.seq_len)
    return [rows[bins.bin(b)] for b in range(len(bins))]

  def micro_batch_rows(self, step: int) -> list[list[np.ndarray]]:
    """Each micro-batch of `step`, all processes: its rows, each row the plan rows laid out in it."""
    if not self.padding_free:
      micro_batches = self.global_rows(step)
      if self.grouped:
        rows = np.concatenate(micro_batches)
        rows = rows[buckets.longest_first(self.plan.num_input_tokens[rows])]
        ends = np.cumsum([len(m) for m in micro_batches])
        micro_batches = np.split(rows, ends[:-1])
      return [[rows[i:i + 1] for i in range(len(rows))] for rows in micro_batches]
    rows, g = self._padding_free_rows(step), self.geometry.micro_batch_size
    return [rows[m * g:(m + 1) * g] for m in range(int(self.micro_batches_per_step[step]))]

  def __getitem__(self, step: int) -> dict:
    if not 0 <= step < len(self):
      raise IndexError(step)
    micro_batches, num_targets, num_input_tokens, num_positions = [], 0, 0, 0
    lo, hi = self.process_index * self.local_rows, (self.process_index + 1) * self.local_rows
    global_rows = self.micro_batch_rows(step)
    mine = [rows[lo:hi] for rows in global_rows]
    packed = iter(self._rows([row for rows in mine for row in rows]))  # The whole step's rows in one call.
    for rows, my_rows in zip(global_rows, mine):
      lengths = [int(self.plan.num_input_tokens[row].sum()) for row in rows]  # Each row's tokens, all processes.
      num_targets += sum(int(self.plan.num_targets[row].sum()) for row in rows)
      num_input_tokens += sum(lengths)
      width = buckets.width_for(max(lengths, default=0), self.widths)
      num_positions += width * self.geometry.micro_batch_size
      batch = [next(packed) for _ in my_rows]
      batch += [packing.empty_row(self.plan.seq_len, self.pad_id)] * (self.local_rows - len(my_rows))
      micro_batches.append({key: np.stack([row[key][:width] for row in batch]) for key in packing.BATCH_KEYS})
    return {'micro_batches': micro_batches, 'num_targets': num_targets, 'num_input_tokens': num_input_tokens,
            'num_positions': num_positions, 'epoch': self.epoch_of(step)}

  def _rows(self, layout: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """One packed row per entry of `layout` (each the plan rows laid out in it, in order); all their
    conversations are tokenized in one batched call.

    Raises the InputError that tokenizing the conversations one by one, in order, would raise first (a row
    that no longer reads or tokenizes: the data changed since the index was built).
    """
    members = [[int(i) for r in row for i in self.plan.bins.bin(int(r))] for row in layout]
    indices = [i for bin_members in members for i in bin_members]
    rows, read_error = [], None
    for i in indices:
      try:
        rows.append(self.source[i])
      except InputError as e:
        read_error = e
        break
    options = self.options
    examples = formats.tokenize_rows(rows, self.tokenizer, fmt=options.fmt, max_length=options.max_length,
                                     assistant_only_loss=options.assistant_only_loss,
                                     completion_only_loss=options.completion_only_loss,
                                     dataset_text_field=options.dataset_text_field,
                                     wheres=[self.source.origin(i) for i in indices[:len(rows)]])
    for example in examples:
      if isinstance(example, InputError):
        raise example
    if read_error is not None:
      raise read_error
    packed, start = [], 0
    for plan_rows, bin_members in zip(layout, members):
      row = packing.pack_row(examples[start:start + len(bin_members)], self.plan.seq_len, self.pad_id)
      start += len(bin_members)
      tokens, expected = int((row['segment_ids'] > 0).sum()), int(self.plan.num_input_tokens[plan_rows].sum())
      if tokens != expected:
        raise RuntimeError(f'{self.source.name}: rows {bin_members} tokenize to {tokens} tokens, the index says '
                           f'{expected}: the data or tokenizer changed since the index was built (delete the cache)')
      packed.append(row)
    return packed


class Loader:
  """Iterates a StepSource with grain, from step `start` on.

  The state is the number of steps consumed, `{'step': n}`: restoring it reopens the source at step n, so a
  restored loader yields exactly the steps an uninterrupted one would, whatever the thread or worker count.
  """

  def __init__(self, step_source: StepSource, *, start: int = 0, num_threads: int = 2, prefetch: int = 4,
               num_workers: int = 0):
    self.step_source = step_source
    self._settings = dict(num_threads=num_threads, prefetch=prefetch, num_workers=num_workers)
    self._open(start)

  def _open(self, start: int) -> None:
    if not 0 <= start <= len(self.step_source):
      raise ValueError(f'cannot start at step {start} of {len(self.step_source)}')
    dataset = grain.MapDataset.source(self.step_source)[start:].to_iter_dataset(
        grain.ReadOptions(num_threads=self._settings['num_threads'],
                          prefetch_buffer_size=self._settings['prefetch']))
    if self._settings['num_workers'] > 0:
      from absl import flags  # pylint: disable=import-outside-toplevel
      if not flags.FLAGS.is_parsed():  # grain's workers read absl flags: outside absl.app.run, use defaults.
        flags.FLAGS.mark_as_parsed()
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._settings['num_workers']))
    self._iterator = iter(dataset)
    self._next = start

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    element = next(self._iterator)
    self._next += 1
    return element

  def get_state(self) -> dict:
    return {'step': self._next}

  def set_state(self, state: dict) -> None:
    self._open(int(state['step']))
