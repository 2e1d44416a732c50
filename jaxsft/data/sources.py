"""Where the rows come from: lazy, random-access, picklable dataset splits (`Source`s).

* `JsonLinesFile`, `JsonFile`, `ParquetFile` (`open_files` picks one by extension): local data files, or local
  copies of gs:// objects (`Copy`: messages and the fingerprint name the object, jaxsft/data/remote.py).
* `HubSplit`: a `datasets.Dataset`, memory-mapped (a hub dataset's split or a `save_to_disk` directory).
* `RowList`: rows in memory (synthetic data, tests); `Concat`, `Select`, `Columns`: views over other sources.

`jaxsft.data.splits.load_splits` resolves the config's dataset fields to these.

Nothing is read up front but what is needed to find the rows: a JSON Lines file is indexed (byte offset and
line number of every non-blank line) in one pass without parsing, parquet files by their metadata. A row is
parsed when it is read, so a malformed row fails there (or is skipped by the caller), with a message that
starts with its origin: `data/train.jsonl line 17: malformed JSON (...)`.
"""

import abc
import dataclasses
import hashlib
import json
import operator
import os
import threading
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from jaxsft.data import handles
from jaxsft.errors import InputError
from jaxsft.errors import one_line

_COLUMN_SCAN = 1000  # Rows tried for `column_names` when the first rows do not parse.
_CHUNK = 1 << 26  # Bytes per slice of the JSON Lines indexing pass.
_ASCII_SPACE = b' \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f'  # What str.strip() removes among ASCII characters.
_BOM = b'\xef\xbb\xbf'
# First bytes of a line that may be blank: ASCII whitespace, or a non-ASCII byte (Unicode spaces).
_MAYBE_BLANK = np.zeros(256, bool)
_MAYBE_BLANK[list(_ASCII_SPACE)] = True
_MAYBE_BLANK[0x80:] = True


def _digest(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def _json_type(value) -> str:
  return {dict: 'an object', list: 'an array', str: 'a string', bool: 'a boolean', type(None): 'null'}.get(
      type(value), 'a number')


class Source(abc.ABC):
  """A split: random access to parsed rows, each with an origin for messages. Picklable, cheap to pickle."""
  name: str  # For messages: "data/train.jsonl", "org/ds split 'train'", "mixture split 'train'".

  @abc.abstractmethod
  def __len__(self) -> int:
    ...

  @abc.abstractmethod
  def _row(self, index: int) -> dict:
    """Row `index`, already checked to be in range."""

  @abc.abstractmethod
  def _origin(self, index: int) -> str:
    ...

  @abc.abstractmethod
  def fingerprint(self) -> str:
    """A stable hex digest of the content, the same in every process, for cache keys."""

  def __getitem__(self, index: int) -> dict:
    """The parsed row. Raises InputError starting with `origin(index)` for a bad row, IndexError if out of range."""
    return self._row(self._check(index))

  def origin(self, index: int) -> str:
    """Where row `index` comes from: "data/train.jsonl line 17", "dataset 'org/name' split 'train' row 17"."""
    return self._origin(self._check(index))

  def column_names(self) -> list[str]:
    """The columns: the keys of the first row that parses (sources with a schema override this)."""
    first_error = None
    for i in range(min(len(self), _COLUMN_SCAN)):
      try:
        return list(self[i])
      except InputError as e:
        first_error = first_error or e
    if first_error is not None:
      raise first_error
    return []

  def __iter__(self) -> Iterator[dict]:
    for i in range(len(self)):
      yield self[i]

  def __repr__(self) -> str:
    return f'{type(self).__name__}({self.name!r}, {len(self)} rows)'

  def _check(self, index: int) -> int:
    index = operator.index(index)
    n = len(self)
    if index < 0:
      index += n
    if not 0 <= index < n:
      raise IndexError(f'{self.name}: row index {index} out of range ({n} rows)')
    return index


@dataclasses.dataclass(frozen=True)
class Copy:
  """The gs:// object a local file copies (jaxsft/data/remote.py): messages name `url`; the fingerprint is (`url`,
  `version`: size and checksums), not the copy's path and time, so it is the same on every host and every download."""
  url: str
  version: str


def _file_fingerprint(kind: str, path: str, stamp: tuple[int, int], *extra, copy: Copy | None = None) -> str:
  if copy is not None:
    return _digest(kind, 'copy', copy.url, copy.version, *extra)
  return _digest(kind, os.path.abspath(path), *stamp, *extra)


class JsonLinesFile(Source):
  """A JSON Lines file, indexed by byte offset; rows are read with `os.pread` and parsed on access."""

  def __init__(self, path: str, field: str = 'dataset_name', copy: Copy | None = None):
    self.path, self.copy = path, copy
    self.name = copy.url if copy else path
    self._stamp = handles.stamp(path, field)
    try:
      self.offsets, self.lengths, self.lines = _index_lines(path, self._stamp[0])
    except OSError as e:
      raise InputError(f"config field '{field}': cannot read {self.name!r} ({e.strerror})") from None
    self._fd = handles.PerProcessHandle(path, self._stamp)

  def __len__(self) -> int:
    return len(self.offsets)

  def line(self, index: int) -> int:
    return index + 1 if self.lines is None else int(self.lines[index])

  def _origin(self, index: int) -> str:
    return f'{self.name} line {self.line(index)}'

  def _row(self, index: int) -> dict:
    fd = self._fd.get(lambda path: os.open(path, os.O_RDONLY))
    raw = os.pread(fd, int(self.lengths[index]), int(self.offsets[index]))
    line = self.line(index)
    try:
      text = raw.decode('utf-8-sig' if line == 1 else 'utf-8')
    except UnicodeDecodeError as e:
      raise InputError(f'{self.name} line {line}: not UTF-8 text ({e})') from None
    try:
      row = json.loads(text)
    except json.JSONDecodeError as e:
      raise InputError(f'{self.name} line {line}: malformed JSON ({e})') from None
    if not isinstance(row, dict):
      raise InputError(f'{self.name} line {line}: expected a JSON object, got {_json_type(row)}')
    return row

  def fingerprint(self) -> str:
    return _file_fingerprint('jsonl', self.path, self._stamp, copy=self.copy)


def _index_lines(path: str, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """(offsets int64, lengths, line numbers int64 or None when no line is blank) of the non-blank lines."""
  if size == 0:
    return np.zeros(0, np.int64), np.zeros(0, np.int32), None
  data = np.memmap(path, np.uint8, 'r', shape=(size,))
  newlines = np.concatenate([np.flatnonzero(data[a:a + _CHUNK] == 10) + a for a in range(0, size, _CHUNK)])
  starts = np.concatenate([[0], newlines + 1])
  ends = np.concatenate([newlines, [size]])
  if starts[-1] == size:  # The file ends with a newline: no last line after it.
    starts, ends = starts[:-1], ends[:-1]
  keep = np.ones(len(starts), bool)
  maybe_blank = _MAYBE_BLANK[data[starts]]
  maybe_blank[0] = True  # Line 1 may start with a byte order mark.
  for k in np.flatnonzero(maybe_blank):
    raw = data[starts[k]:ends[k]].tobytes()
    if k == 0 and raw.startswith(_BOM):
      raw = raw[len(_BOM):]
    stripped = raw.strip(_ASCII_SPACE)
    if not stripped:
      keep[k] = False
    elif stripped[0] >= 0x80:  # Maybe Unicode spaces only; undecodable lines are kept (and fail when read).
      try:
        keep[k] = bool(stripped.decode('utf-8').strip())
      except UnicodeDecodeError:
        pass
  del data
  lengths = (ends - starts)[keep]
  lengths = lengths.astype(np.int32) if lengths.max(initial=0) < 2**31 else lengths.astype(np.int64)
  lines = None if keep.all() else (np.flatnonzero(keep) + 1).astype(np.int64)
  return starts[keep].astype(np.int64), lengths, lines


class JsonFile(Source):
  """A JSON file read whole: an array of objects (`item I`), `{"data": [...]}`, or one object (`line 1`)."""

  def __init__(self, path: str, rows: list, unit: str, stamp: tuple[int, int], copy: Copy | None = None):
    self.path, self.copy = path, copy
    self.name = copy.url if copy else path
    self.rows, self.unit, self._stamp = rows, unit, stamp

  def __len__(self) -> int:
    return len(self.rows)

  def _origin(self, index: int) -> str:
    return f'{self.name} {self.unit} {index if self.unit == "item" else index + 1}'

  def _row(self, index: int) -> dict:
    row = self.rows[index]
    if not isinstance(row, dict):
      raise InputError(f'{self._origin(index)}: expected a JSON object, got {_json_type(row)}')
    return row

  def fingerprint(self) -> str:
    return _file_fingerprint('json', self.path, self._stamp, copy=self.copy)


def _open_json(path: str, field: str, copy: Copy | None = None) -> Source:
  """A .json file: JSON Lines under a .json name are indexed lazily, anything else is read whole."""
  stamp = handles.stamp(path, field)
  shown = copy.url if copy else path
  if _is_json_lines(path):
    return JsonLinesFile(path, field, copy)
  try:
    with open(path, encoding='utf-8-sig') as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise InputError(f'{shown}: not UTF-8 text ({e})') from None
  except OSError as e:
    raise InputError(f"config field '{field}': cannot read {shown!r} ({e.strerror})") from None
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    if e.msg == 'Extra data':  # One value per line.
      return JsonLinesFile(path, field, copy)
    raise InputError(f'{shown} line {e.lineno}: malformed JSON ({e})') from None
  if isinstance(value, dict):
    lists = [v for v in value.values() if isinstance(v, list)]
    if len(lists) == 1 and all(isinstance(v, list) for v in value.values()):
      value = lists[0]
    else:
      return JsonFile(path, [value], 'line', stamp, copy)  # A single object: one row (JSON Lines with one line).
  if not isinstance(value, list):
    raise InputError(f'{shown}: expected a JSON array of objects, got {_json_type(value)}')
  return JsonFile(path, value, 'item', stamp, copy)


def _is_json_lines(path: str) -> bool:
  """Whether the first non-blank line is a whole JSON object followed by more lines (cheap: two lines read)."""
  try:
    with open(path, 'rb') as f:
      for raw in f:
        text = raw.decode('utf-8-sig').strip()
        if text:
          break
      else:
        return False
      if not text.startswith('{'):
        return False
      json.loads(text)
      return any(line.strip() for line in f)
  except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors.
    return False


class ParquetFile(Source):
  """A parquet file, memory-mapped and opened per process; one row group decoded (and cached) at a time."""

  def __init__(self, path: str, field: str = 'dataset_name', columns: Sequence[str] | None = None,
               copy: Copy | None = None):
    self.path, self.copy = path, copy
    self.name = copy.url if copy else path
    self._stamp = handles.stamp(path, field)
    file = _open_parquet(path, self.name)
    meta = file.metadata
    self._ends = np.cumsum([meta.row_group(g).num_rows for g in range(meta.num_row_groups)], dtype=np.int64)
    self._all_columns = list(file.schema_arrow.names)
    self.columns = None if columns is None else list(columns)
    self._file = handles.PerProcessHandle(path, self._stamp)
    self._cache = None  # (row group, pyarrow.Table)
    self._lock, self._lock_pid = threading.Lock(), os.getpid()

  def __getstate__(self):
    return {**self.__dict__, '_cache': None, '_lock': None, '_lock_pid': None}

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def _origin(self, index: int) -> str:
    return f'{self.name} row {index}'

  def _row(self, index: int) -> dict:
    group = int(np.searchsorted(self._ends, index, side='right'))
    start = int(self._ends[group - 1]) if group else 0
    cache = self._cache
    if cache is None or cache[0] != group:
      if self._lock_pid != os.getpid():  # A new process (a fork may have copied a held lock).
        self._lock, self._lock_pid = threading.Lock(), os.getpid()
      with self._lock:
        cache = self._cache  # Another thread may have decoded this row group meanwhile.
        if cache is None or cache[0] != group:
          try:
            table = self._file.get(lambda p: _open_parquet(p, self.name)).read_row_group(group, columns=self.columns)
          except (OSError, ValueError) as e:
            raise InputError(f"{self._origin(index)}: cannot read parquet ({one_line(e, 200)})"
                             ) from None
          cache = self._cache = (group, table)
    return cache[1].slice(index - start, 1).to_pylist()[0]

  def column_names(self) -> list[str]:
    return list(self.columns) if self.columns is not None else list(self._all_columns)

  def fingerprint(self) -> str:
    return _file_fingerprint('parquet', self.path, self._stamp, self.columns, copy=self.copy)


def _open_parquet(path: str, shown: str):
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  try:
    return pq.ParquetFile(path, memory_map=True)
  except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError.
    raise InputError(f"{shown}: cannot read parquet ({one_line(e, 200)})") from None


class HubSplit(Source):
  """A `datasets.Dataset` (memory-mapped Arrow, random access) of a hub dataset's split, or of a `save_to_disk`
  directory (`stamp`: its Arrow files' path, size and modification time, part of the fingerprint)."""

  def __init__(self, dataset, dataset_name: str, config: str | None, split: str, stamp: list | None = None):
    self.dataset, self.dataset_name, self.config, self.split = dataset, dataset_name, config, split
    self.stamp = stamp
    self.name = f'{dataset_name} split {split!r}'

  def __len__(self) -> int:
    return len(self.dataset)

  def _row(self, index: int) -> dict:
    return self.dataset[index]

  def _origin(self, index: int) -> str:
    return f'dataset {self.dataset_name!r} split {self.split!r} row {index}'

  def column_names(self) -> list[str]:
    return list(self.dataset.column_names)

  def fingerprint(self) -> str:
    fingerprint = self.dataset._fingerprint  # pylint: disable=protected-access  (datasets' content id)
    if self.stamp is not None:
      return _digest('saved', self.split, fingerprint, self.stamp)
    return _digest('hub', self.dataset_name, self.config, self.split, fingerprint)


class RowList(Source):
  """Rows held in memory (synthetic data, tests): origin "dataset 'NAME' split 'SPLIT' row I"."""

  def __init__(self, rows: Sequence[dict], dataset: str, split: str):
    self.rows, self.dataset, self.split = list(rows), dataset, split
    self.name = f'{dataset} split {split!r}'
    self._fingerprint = None

  def __len__(self) -> int:
    return len(self.rows)

  def _row(self, index: int) -> dict:
    row = self.rows[index]
    if not isinstance(row, dict):
      raise InputError(f'{self._origin(index)}: expected an object (dict), got {_json_type(row)}')
    return row

  def _origin(self, index: int) -> str:
    return f'dataset {self.dataset!r} split {self.split!r} row {index}'

  def fingerprint(self) -> str:
    if self._fingerprint is None:
      blob = json.dumps(self.rows, sort_keys=True, default=str).encode()
      self._fingerprint = hashlib.sha256(blob).hexdigest()
    return self._fingerprint


class Concat(Source):
  """Several sources one after the other (a directory's files, a mixture's datasets)."""

  def __init__(self, parts: Sequence[Source], name: str):
    self.parts, self.name = list(parts), name
    self._ends = np.cumsum([len(p) for p in self.parts], dtype=np.int64)

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def _locate(self, index: int) -> tuple[Source, int]:
    part = int(np.searchsorted(self._ends, index, side='right'))
    return self.parts[part], index - (int(self._ends[part - 1]) if part else 0)

  def _row(self, index: int) -> dict:
    part, local = self._locate(index)
    return part[local]

  def _origin(self, index: int) -> str:
    part, local = self._locate(index)
    return part.origin(local)

  def column_names(self) -> list[str]:
    return self.parts[0].column_names() if self.parts else []

  def fingerprint(self) -> str:
    return _digest('concat', [p.fingerprint() for p in self.parts])


class Select(Source):
  """An index view: `self[i] = base[indices[i]]` (subsampling, shuffling, a test split)."""

  def __init__(self, base: Source, indices, name: str):
    self.base, self.name = base, name
    self.indices = np.asarray(indices, np.int64)
    if self.indices.ndim != 1 or len(self.indices) and not (
        0 <= self.indices.min() and self.indices.max() < len(base)):
      raise ValueError(f'{name}: indices must be a vector in [0, {len(base)})')

  def __len__(self) -> int:
    return len(self.indices)

  def _row(self, index: int) -> dict:
    return self.base[int(self.indices[index])]

  def _origin(self, index: int) -> str:
    return self.base.origin(int(self.indices[index]))

  def column_names(self) -> list[str]:
    return self.base.column_names()

  def fingerprint(self) -> str:
    indices = hashlib.sha256(np.ascontiguousarray(self.indices, '<i8').tobytes()).hexdigest()
    return _digest('select', self.base.fingerprint(), indices)


class Columns(Source):
  """A column selection: rows hold exactly `columns` (a column a row lacks is None, as in `datasets`)."""

  def __init__(self, base: Source, columns: Sequence[str]):
    self.base, self.columns, self.name = base, list(columns), base.name

  def __len__(self) -> int:
    return len(self.base)

  def _row(self, index: int) -> dict:
    row = self.base[index]
    return {c: row.get(c) for c in self.columns}

  def _origin(self, index: int) -> str:
    return self.base.origin(index)

  def column_names(self) -> list[str]:
    return list(self.columns)

  def fingerprint(self) -> str:
    return _digest('columns', self.base.fingerprint(), self.columns)


def select_columns(source: Source, columns: Sequence[str]) -> Source:
  """`source` with only `columns` (read natively where the format allows: parquet, hub datasets)."""
  if isinstance(source, ParquetFile):
    return ParquetFile(source.path, columns=columns, copy=source.copy)
  if isinstance(source, HubSplit):
    return HubSplit(source.dataset.select_columns(list(columns)), source.dataset_name, source.config, source.split,
                    source.stamp)
  if isinstance(source, Concat):
    return Concat([select_columns(p, columns) for p in source.parts], source.name)
  return Columns(source, columns)


def open_files(paths: Sequence[str], *, name: str | None = None, field: str = 'dataset_name',
               copies: Mapping[str, Copy] | None = None) -> Source:
  """Local JSON Lines / JSON / parquet files (`copies`: those that copy a gs:// object), concatenated. Raises
  InputError if unreadable or all empty."""
  copies = copies or {}
  parts = []
  for path in paths:
    lower, copy = path.lower(), copies.get(path)
    if lower.endswith('.jsonl'):
      parts.append(JsonLinesFile(path, field, copy))
    elif lower.endswith('.json'):
      parts.append(_open_json(path, field, copy))
    else:
      parts.append(ParquetFile(path, field, copy=copy))
  parts = [p for p in parts if len(p)]
  if not parts:
    shown = [copies[p].url if p in copies else p for p in paths]
    raise InputError(f"config field '{field}': {', '.join(shown)}: the dataset is empty (0 rows)")
  return parts[0] if len(parts) == 1 else Concat(parts, name or ', '.join(paths))


@dataclasses.dataclass
class Splits:
  """A dataset's train split and optional eval split, with names for messages."""
  train: Source
  eval: Source | None
  train_name: str
  eval_name: str | None

