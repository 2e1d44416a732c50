"""The length index of a dataset: one pass that tokenizes every row once, in parallel, and is cached.

Packing and the schedule need to know, before the first step, how long every conversation is and whether it
keeps a loss token after truncation (TRL drops those rows and counts them). `build_index` computes per row:
its token count after truncation to `max_length`, its number of next-token targets, and flags (kept,
truncated, bad). Training then tokenizes rows again lazily, in the data loader's threads, only when a batch
needs them; the index itself holds no tokens.

The pass is split three ways, so it scales with the machine and the pod:
* across processes (hosts): process p tokenizes rows p, p + P, p + 2P, ...; the parts are exchanged with one
  all-gather (`multihost_utils.process_allgather`);
* across CPU cores: `dataset_num_proc` spawned worker processes, each with its own copy of the tokenizer
  (they ignore SIGINT: on Ctrl-C the parent raises KeyboardInterrupt and terminates them at once);
* across launches: the finished index is saved under `cache_dir`, keyed by the data's fingerprint, the
  tokenizer (vocabulary, chat template, special tokens) and the tokenization settings, so a relaunch or a
  resumed run reads it instead of tokenizing the dataset again.

A pass longer than a couple of seconds logs its progress (rows, rows/s, time left: `jaxsft.data.progress`).
Ctrl-C stops it within a chunk's time (`jaxsft.data.interrupt`: noted by a handler, raised between chunks as
KeyboardInterrupt), workers included; only a whole index is ever cached (temp file + rename).

A bad row (malformed JSON, a missing column, a template failure) is an error naming the row's origin
(`data.jsonl line 17: ...`) unless `skip_bad_rows`, which flags it, leaves it out and counts it.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pickle
import signal
import tempfile

import numpy as np

from jaxsft.data import formats
from jaxsft.data import interrupt as interrupt_lib
from jaxsft.data import progress as progress_lib
from jaxsft.errors import InputError

INDEX_VERSION = 1
KEPT, TRUNCATED, BAD, NOT_DONE = 1, 2, 4, 8  # Flag bits.
_CHUNK = 256  # Rows per worker task.
_MIN_ROWS_FOR_WORKERS = 2048  # Below this, spawning workers costs more than it saves.
_POLL_SECONDS = 0.2  # How often the parent looks up (for Ctrl-C, progress) while its workers work.


@dataclasses.dataclass(frozen=True)
class Options:
  """How a row becomes an `Example` (TRL's SFTConfig fields)."""
  fmt: str  # formats.MESSAGES | PROMPT_COMPLETION | TEXT.
  max_length: int
  assistant_only_loss: bool
  completion_only_loss: bool | None
  dataset_text_field: str


def tokenize(source, index: int, tokenizer, options: Options) -> formats.Example:
  """Row `index` of `source` → its truncated Example. Raises InputError naming the row."""
  return formats.tokenize_row(source[index], tokenizer, fmt=options.fmt, max_length=options.max_length,
                              assistant_only_loss=options.assistant_only_loss,
                              completion_only_loss=options.completion_only_loss,
                              dataset_text_field=options.dataset_text_field, where=source.origin(index))


@dataclasses.dataclass(frozen=True)
class Index:
  """Per-row facts of one split (all int arrays of the split's length)."""
  lengths: np.ndarray  # int32: tokens after truncation (0 for bad rows).
  num_targets: np.ndarray  # int32: next-token targets (loss_mask[1:].sum()).
  flags: np.ndarray  # uint8: KEPT | TRUNCATED | BAD bits.

  def __len__(self) -> int:
    return len(self.lengths)

  @property
  def kept(self) -> np.ndarray:
    """Source indices of the rows that are trained on (a loss token survives truncation), ascending."""
    return np.flatnonzero(self.flags & KEPT)

  @property
  def num_bad(self) -> int:
    return int(np.count_nonzero(self.flags & BAD))

  @property
  def num_truncated(self) -> int:
    return int(np.count_nonzero(self.flags & TRUNCATED))

  @property
  def num_dropped(self) -> int:
    """Good rows left without a loss token after truncation."""
    return int(np.count_nonzero((self.flags & (KEPT | BAD)) == 0))


def _row_facts(source, index: int, tokenizer, options: Options,
               tokenized: formats.Example | InputError | None = None) -> tuple[int, int, int, str | None]:
  """(length, targets, flags, error message) of row `index`; `tokenized`: its untruncated Example or its
  InputError when already known (from `formats.tokenize_rows`), else the row is read and tokenized here."""
  if tokenized is None:
    try:
      row = source[index]
      tokenized = formats.tokenize_row(row, tokenizer, fmt=options.fmt, max_length=None,
                                       assistant_only_loss=options.assistant_only_loss,
                                       completion_only_loss=options.completion_only_loss,
                                       dataset_text_field=options.dataset_text_field, where=source.origin(index))
    except InputError as e:
      tokenized = e
  if isinstance(tokenized, InputError):
    return 0, 0, BAD, str(tokenized)
  example, cut = formats.truncate(tokenized, options.max_length)
  flags = (KEPT if example.loss_mask.any() else 0) | (TRUNCATED if cut else 0)
  return len(example.input_ids), int(example.loss_mask[1:].sum()), flags, None


def _facts(source, indices: np.ndarray, tokenizer, options: Options, stop_at_bad: bool, *, progress=None):
  """(lengths, targets, flags) of `indices`; with stop_at_bad, rows after the first bad one are NOT_DONE.

  The rows are tokenized `_CHUNK` at a time by `formats.tokenize_rows` (one batched encode per chunk, on all
  cores); each row's facts are then `_row_facts` of its result. `progress(rows)` is called after each chunk.
  """
  lengths = np.zeros(len(indices), np.int32)
  targets = np.zeros(len(indices), np.int32)
  flags = np.full(len(indices), NOT_DONE, np.uint8)
  for start in range(0, len(indices), _CHUNK):
    chunk = [int(i) for i in indices[start:start + _CHUNK]]
    tokenized: list = []  # Per row of the chunk: its result, or the InputError of reading it.
    rows, wheres, positions = [], [], []
    for i in chunk:
      try:
        row = source[i]
      except InputError as e:
        tokenized.append(e)
        if stop_at_bad:
          break
        continue
      positions.append(len(tokenized))
      tokenized.append(None)
      rows.append(row)
      wheres.append(source.origin(i))
    results = formats.tokenize_rows(rows, tokenizer, fmt=options.fmt, max_length=None,
                                    assistant_only_loss=options.assistant_only_loss,
                                    completion_only_loss=options.completion_only_loss,
                                    dataset_text_field=options.dataset_text_field, wheres=wheres)
    for position, result in zip(positions, results):
      tokenized[position] = result
    for j, result in enumerate(tokenized):
      k = start + j
      lengths[k], targets[k], flags[k], _ = _row_facts(source, chunk[j], tokenizer, options, result)
      if stop_at_bad and flags[k] & BAD:
        return lengths, targets, flags
    if progress is not None:
      progress(len(chunk))
  return lengths, targets, flags


_WORKER = {}


def _init_worker(state: bytes):
  """Ctrl-C reaches the whole process group: the parent alone handles it (it terminates the workers).

  The source, tokenizer and options come pickled as bytes, unpickled only here: spawning a worker then costs the
  parent one quick pipe write (not a wait while the worker imports transformers to unpickle a tokenizer), so the
  workers start in parallel, and none can be interrupted before it ignores SIGINT.
  """
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  _WORKER.update(zip(('source', 'tokenizer', 'options'), pickle.loads(state)))


def _worker_facts(indices, stop_at_bad):
  return _facts(_WORKER['source'], indices, _WORKER['tokenizer'], _WORKER['options'], stop_at_bad)


def _local_facts(source, indices: np.ndarray, tokenizer, options: Options, *, num_workers: int,
                 stop_at_bad: bool, progress=None):
  """The facts of this process's rows, computed by `num_workers` spawned processes when worth it.

  `progress(rows)` is called as chunks complete, and with 0 rows every `_POLL_SECONDS` while the workers start
  or work; it may raise (KeyboardInterrupt) to stop the pass. The workers are terminated, not waited for, when
  the pass ends early (a bad row with `stop_at_bad`, Ctrl-C, any exception): no worker is left behind.
  """
  if num_workers <= 1 or len(indices) < _MIN_ROWS_FOR_WORKERS:
    return _facts(source, indices, tokenizer, options, stop_at_bad, progress=progress)
  chunks = [indices[i:i + _CHUNK] for i in range(0, len(indices), _CHUNK)]
  results = [None] * len(chunks)
  # 'spawn', not fork: the parent runs JAX threads, which do not survive a fork.
  context = multiprocessing.get_context('spawn')
  state = pickle.dumps((source, tokenizer, options))
  pool = concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context, initializer=_init_worker,
                                                initargs=(state,))
  finished = False
  try:
    with interrupt_lib.blocked_while_spawning():  # The first submits spawn the workers.
      futures = {pool.submit(_worker_facts, chunk, stop_at_bad): k for k, chunk in enumerate(chunks)}
    for future in _as_completed(futures, progress):
      k = futures[future]
      results[k] = future.result()
      if progress is not None:
        progress(len(chunks[k]))
      if stop_at_bad and np.any(results[k][2] & BAD):
        break
    else:
      finished = True
  finally:
    if finished:
      pool.shutdown(wait=True)  # Idle workers: they exit at once.
    else:
      _terminate(pool)
  lengths = np.zeros(len(indices), np.int32)
  targets = np.zeros(len(indices), np.int32)
  flags = np.full(len(indices), NOT_DONE, np.uint8)
  for k, result in enumerate(results):
    if result is not None:
      start = k * _CHUNK
      lengths[start:start + len(result[0])], targets[start:start + len(result[0])] = result[0], result[1]
      flags[start:start + len(result[0])] = result[2]
  return lengths, targets, flags


def _as_completed(futures, progress):
  """The futures as they complete, with `progress(0)` between polls (a way out while none completes)."""
  pending = set(futures)
  while pending:
    done, pending = concurrent.futures.wait(pending, timeout=_POLL_SECONDS,
                                            return_when=concurrent.futures.FIRST_COMPLETED)
    if progress is not None and not done:
      progress(0)
    yield from done


def _terminate(pool: concurrent.futures.ProcessPoolExecutor, timeout: float = 5.0) -> None:
  """Stops `pool` now: queued tasks cancelled, worker processes terminated mid-task (SIGTERM) and reaped."""
  terminate_workers = getattr(pool, 'terminate_workers', None)  # Python >= 3.14.
  if terminate_workers is not None:
    terminate_workers()
    return
  processes = list((getattr(pool, '_processes', None) or {}).values())  # pylint: disable=protected-access
  for process in processes:
    if process.is_alive():
      process.terminate()
  # The pool's manager thread sees its workers die and reaps them itself: waiting for it (not racing it with our
  # own waitpid, which then finds no child and leaves a reaped worker looking alive) is what leaves none behind.
  pool.shutdown(wait=True, cancel_futures=True)
  for process in processes:
    process.join(timeout)


def _allgather_strided(local: np.ndarray, n: int, process_index: int, process_count: int) -> np.ndarray:
  """Process p holds rows p::P of an [n] array; returns the whole array on every process."""
  if process_count == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  per = -(-n // process_count)
  padded = np.zeros(per, local.dtype)
  padded[:len(local)] = local
  gathered = np.asarray(multihost_utils.process_allgather(padded))  # [P, per]
  whole = np.zeros(n, local.dtype)
  for p in range(process_count):
    part = gathered[p][:len(range(p, n, process_count))]
    whole[p::process_count] = part
  return whole


def _everywhere(flag: bool) -> bool:
  """Whether `flag` holds on every process (one tiny all-gather)."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(np.all(np.asarray(multihost_utils.process_allgather(np.int32(flag)))))


def tokenizer_fingerprint(tokenizer) -> str:
  """What of the tokenizer decides the token ids and loss masks: vocabulary, template, special tokens."""
  h = hashlib.sha256()
  backend = getattr(tokenizer, 'backend_tokenizer', None)
  h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
  h.update(repr((type(tokenizer).__name__, tokenizer.chat_template, tokenizer.eos_token, tokenizer.bos_token,
                 tokenizer.pad_token, getattr(tokenizer, 'add_bos_token', None))).encode())
  return h.hexdigest()


def data_fingerprint(source, tokenizer) -> str:
  """The rows and the tokenizer, without the tokenization options (a resumed run compares it to refuse changed data)."""
  payload = json.dumps({'data': source.fingerprint(), 'tokenizer': tokenizer_fingerprint(tokenizer)}, sort_keys=True)
  return hashlib.sha256(payload.encode()).hexdigest()[:32]


def cache_key(source, tokenizer, options: Options) -> str:
  payload = json.dumps({'version': INDEX_VERSION, 'data': source.fingerprint(),
                        'tokenizer': tokenizer_fingerprint(tokenizer), 'options': dataclasses.asdict(options)},
                       sort_keys=True)
  return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _load_cached(path: str, n: int) -> Index | None:
  try:
    with np.load(path) as f:
      index = Index(f['lengths'], f['num_targets'], f['flags'])
  except (OSError, KeyError, ValueError):
    return None
  return index if len(index) == n else None


def _save_cached(path: str, index: Index) -> None:
  """Atomically (temp file + rename): concurrent writers on one machine leave one whole file."""
  directory = os.path.dirname(path)
  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix='.tmp.npz')
  except OSError:
    return  # A cache that cannot be written only costs the next launch a pass.
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, lengths=index.lengths, num_targets=index.num_targets, flags=index.flags)
    os.replace(tmp, path)
  except OSError:
    _remove(tmp)
  except BaseException:  # Interrupted (Ctrl-C): no partial file left behind (none is ever read: it is not `path`).
    _remove(tmp)
    raise


def _remove(path: str) -> None:
  try:
    os.unlink(path)
  except OSError:
    pass


def build_index(source, tokenizer, options: Options, *, skip_bad_rows: bool, num_workers: int = 1,
                cache_dir: str | None = None, process_index: int = 0, process_count: int = 1,
                log=None) -> Index:
  """The index of `source` (cached under `cache_dir` when given).

  Every process must call this with the same source and settings (it all-gathers when process_count > 1).

  Raises:
    InputError: a bad row, naming its origin (the first one in source order) unless `skip_bad_rows`; or no
      row left to train on.
  """
  n = len(source)
  path = os.path.join(cache_dir, f'index-{cache_key(source, tokenizer, options)}.npz') if cache_dir else None
  index = _load_cached(path, n) if path and os.path.exists(path) else None
  if process_count > 1 and not _everywhere(index is not None):
    index = None  # Some host has no cached copy: all build it together (the pass is collective).
  if index is not None:
    if log:
      log(f'data: index of {source.name} read from the cache {path}')
  else:
    local = np.arange(process_index, n, process_count)
    what = f'data: tokenizing {source.name}' + (f' (process {process_index} of {process_count}: its share of '
                                                 f'{n:,} rows)' if process_count > 1 else '')
    progress = progress_lib.Progress(what, len(local), log)
    with interrupt_lib.Interruptible() as interrupt:  # Ctrl-C acts between chunks (see jaxsft/data/interrupt.py).

      def tick(rows: int) -> None:
        interrupt.check()
        progress.add(rows)

      parts = _local_facts(source, local, tokenizer, options, num_workers=num_workers,
                           stop_at_bad=not skip_bad_rows, progress=tick)
    if not np.any(parts[2] & NOT_DONE):  # Not stopped at a bad row.
      progress.close()
    index = Index(*(_allgather_strided(part, n, process_index, process_count) for part in parts))
    if path and not np.any(index.flags & NOT_DONE):
      _save_cached(path, index)
  if index.num_bad and not skip_bad_rows:
    first = int(np.flatnonzero(index.flags & BAD)[0])
    _, _, _, message = _row_facts(source, first, tokenizer, options)
    raise InputError(f"{message} (config field 'skip_bad_rows': set it to skip bad rows)"
                     if message else f'{source.origin(first)}: bad row')
  if not len(index.kept):
    raise InputError(f'{source.name}: all {n} rows were dropped: none has a loss token left after truncation to '
                     f"max_length={options.max_length} (config fields 'max_length', 'assistant_only_loss', "
                     "'completion_only_loss')" + (f'; {index.num_bad} bad rows skipped' if index.num_bad else ''))
  return index
