"""Where the rows come from: local files and directories, Hugging Face hub datasets, synthetic data.

`load_splits` resolves `dataset_name` to a train split (and, when asked, an eval split):

* `synthetic:...`: generated in memory by `jaxsft.data.synthetic`.
* a local `.jsonl` / `.json` / `.parquet` file: the train split (it has no eval split).
* a local directory: the files of each split, named `train.jsonl`, `test.parquet`, ...; or HF-style data
  files (`train-00000-of-00002.parquet`, `data/test.jsonl`, a `train/` folder); files named for no split
  at all are the train split together, as `datasets` treats them.
* anything else: a hub id, `datasets.load_dataset(dataset_name, dataset_config, split=...)`.

JSON Lines are read here, line by line, so that a bad line is reported as `FILE line N: ...`. Every
split carries an origin function mapping a row index to where the row came from (`data.jsonl line 17`,
`dataset 'org/name' split 'train' row 17`) for the error messages of later stages.
"""

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

from jaxsft.errors import InputError

EXTENSIONS = ('.jsonl', '.json', '.parquet')


@dataclasses.dataclass
class Splits:
  """A dataset's train split and optional eval split, with names and row origins for messages."""
  train: Sequence[dict]
  eval: Sequence[dict] | None
  train_name: str
  eval_name: str | None
  origin: Callable[[int], str] | None = None  # Train row index → "data.jsonl line 17".
  eval_origin: Callable[[int], str] | None = None


@dataclasses.dataclass(frozen=True)
class LineOrigin:
  """Row index → "FILE line N" (picklable, for multi-process data loading)."""
  paths: tuple[str, ...]  # One entry per file.
  files: tuple[int, ...]  # Per row: index into `paths`.
  lines: tuple[int, ...]  # Per row: 1-based line number (JSON Lines) or item index (JSON arrays, parquet).
  unit: tuple[str, ...]  # Per file: 'line' | 'row'.

  def __call__(self, index: int) -> str:
    f = self.files[index]
    return f'{self.paths[f]} {self.unit[f]} {self.lines[index]}'


@dataclasses.dataclass(frozen=True)
class IndexOrigin:
  """Row index → "dataset 'NAME' split 'SPLIT' row I"."""
  name: str
  split: str

  def __call__(self, index: int) -> str:
    return f'dataset {self.name!r} split {self.split!r} row {index}'


def load_splits(*, dataset_name: str, dataset_config: str | None, dataset_train_split: str,
                dataset_test_split: str | None, need_eval: bool) -> Splits:
  """The train split (and the eval split if `need_eval`) of `dataset_name`.

  Raises:
    InputError: naming `dataset_name`, the file, the line or the split at fault: missing file or split,
      malformed JSON, a row that is not an object, an empty split, a hub dataset that cannot be loaded.
  """
  if not dataset_name:
    raise InputError("config field 'dataset_name' is not set")
  if need_eval and not dataset_test_split:
    raise InputError("config field 'dataset_test_split' is not set, but an eval split is needed")
  if dataset_name.startswith('synthetic:'):
    from jaxsft.data import synthetic  # pylint: disable=import-outside-toplevel  (optional, lazy)
    splits = synthetic.load(dataset_name)
    if splits.origin is None:
      splits.origin = IndexOrigin(dataset_name, 'train')
    if splits.eval is not None and splits.eval_origin is None:
      splits.eval_origin = IndexOrigin(dataset_name, 'test')
    if not need_eval:
      splits.eval, splits.eval_name, splits.eval_origin = None, None, None
    elif splits.eval is None:
      raise InputError(f"config field 'dataset_name': {dataset_name!r} has no eval split")
    return splits
  if os.path.isfile(dataset_name):
    return _from_file(dataset_name, need_eval, dataset_test_split)
  if os.path.isdir(dataset_name):
    return _from_directory(dataset_name, dataset_train_split, dataset_test_split if need_eval else None)
  if _looks_like_path(dataset_name):
    raise InputError(f"config field 'dataset_name': no such file or directory: {dataset_name!r}")
  return _from_hub(dataset_name, dataset_config, dataset_train_split, dataset_test_split if need_eval else None)


def _looks_like_path(name: str) -> bool:
  return (name.startswith(('/', './', '../', '~')) or name.lower().endswith(EXTENSIONS)
          or name.count('/') > 1 or os.sep != '/' and os.sep in name)


def _from_file(path: str, need_eval: bool, test_split: str | None) -> Splits:
  if not path.lower().endswith(EXTENSIONS):
    raise InputError(f"config field 'dataset_name': {path!r} is not a .jsonl, .json or .parquet file")
  if need_eval:
    raise InputError(f"config field 'dataset_test_split': {test_split!r} is not available: the dataset "
                     f'{path!r} is a single file (the train split); use a directory with a '
                     f'{test_split}.jsonl file, or disable evaluation')
  rows, origin = read_files([path])
  return Splits(train=rows, eval=None, train_name=path, eval_name=None, origin=origin)


def _from_directory(directory: str, train_split: str, test_split: str | None) -> Splits:
  files = sorted(os.path.relpath(os.path.join(root, name), directory)
                 for root, _, names in os.walk(directory) for name in names
                 if name.lower().endswith(EXTENSIONS) and not name.startswith('.'))
  if not files:
    raise InputError(f"config field 'dataset_name': the directory {directory!r} holds no .jsonl, .json or "
                     '.parquet files')

  def split_files(split: str) -> list[str]:
    return [os.path.join(directory, f) for f in files if _file_split(f, split)]

  train = split_files(train_split)
  if not train and not any(_file_split(f, s) for f in files for s in _KNOWN_SPLITS):
    train = [os.path.join(directory, f) for f in files]  # No file is named for a split: all are 'train'.
  if not train:
    raise InputError(f"config field 'dataset_train_split': no file for split {train_split!r} in {directory!r} "
                     f'(files: {files[:10]})')
  rows, origin = read_files(train)
  splits = Splits(train=rows, eval=None, train_name=f'{directory} split {train_split!r}', eval_name=None,
                  origin=origin)
  if test_split:
    test = split_files(test_split)
    if not test:
      raise InputError(f"config field 'dataset_test_split': no file for split {test_split!r} in "
                       f'{directory!r} (files: {files[:10]})')
    splits.eval, splits.eval_origin = read_files(test)
    splits.eval_name = f'{directory} split {test_split!r}'
  return splits


_KNOWN_SPLITS = ('train', 'training', 'test', 'testing', 'eval', 'evaluation', 'validation', 'valid', 'val',
                 'dev')


def _file_split(relpath: str, split: str) -> bool:
  """Whether a data file belongs to `split`: `split.jsonl`, `split-0000-of-0002.parquet`, `split/x.json`."""
  parts = relpath.replace(os.sep, '/').split('/')
  if split in parts[:-1]:
    return True
  stem = parts[-1]
  for ext in EXTENSIONS:
    if stem.lower().endswith(ext):
      stem = stem[:-len(ext)]
      break
  return stem == split or (stem.startswith(split) and stem[len(split)] in '-_.')


def read_files(paths: Sequence[str]) -> tuple[list[dict], LineOrigin]:
  """Rows of local JSON Lines / JSON / parquet files (concatenated) and their origins."""
  rows, files, lines, units = [], [], [], []
  for f, path in enumerate(paths):
    lower = path.lower()
    if lower.endswith('.jsonl'):
      numbered, unit = _read_jsonl(path), 'line'
    elif lower.endswith('.json'):
      numbered, unit = _read_json(path)
    else:
      numbered, unit = _read_parquet(path), 'row'
    units.append(unit)
    for number, row in numbered:
      rows.append(row)
      files.append(f)
      lines.append(number)
  if not rows:
    raise InputError(f"config field 'dataset_name': {', '.join(paths)}: the dataset is empty (0 rows)")
  return rows, LineOrigin(tuple(paths), tuple(files), tuple(lines), tuple(units))


def _open(path: str):
  try:
    return open(path, encoding='utf-8-sig')
  except OSError as e:
    raise InputError(f"config field 'dataset_name': cannot read {path!r} ({e.strerror})") from None


def _read_jsonl(path: str) -> list[tuple[int, dict]]:
  rows = []
  try:
    f = open(path, 'rb')  # Bytes, decoded line by line, so a bad byte is reported on its own line.
  except OSError as e:
    raise InputError(f"config field 'dataset_name': cannot read {path!r} ({e.strerror})") from None
  with f:
    for line_number, raw in enumerate(f, start=1):
      try:
        line = raw.decode('utf-8-sig' if line_number == 1 else 'utf-8')
      except UnicodeDecodeError as e:
        raise InputError(f'{path} line {line_number}: not UTF-8 text ({e})') from None
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise InputError(f'{path} line {line_number}: malformed JSON ({e})') from None
      if not isinstance(row, dict):
        raise InputError(f'{path} line {line_number}: expected a JSON object, got {_json_type(row)}')
      rows.append((line_number, row))
  return rows


def _read_json(path: str) -> tuple[list[tuple[int, dict]], str]:
  """A JSON array of objects (or `{"data": [...]}`); JSON Lines under a .json name are read as such."""
  with _open(path) as f:
    try:
      text = f.read()
    except UnicodeDecodeError as e:
      raise InputError(f'{path}: not UTF-8 text ({e})') from None
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    if e.msg == 'Extra data':  # One object per line.
      return _read_jsonl(path), 'line'
    raise InputError(f'{path} line {e.lineno}: malformed JSON ({e})') from None
  if isinstance(value, dict):
    lists = [v for v in value.values() if isinstance(v, list)]
    if len(lists) == 1 and all(isinstance(v, list) for v in value.values()):
      value = lists[0]
    else:
      return [(1, value)], 'line'  # A single object: one row (JSON Lines with one line).
  if not isinstance(value, list):
    raise InputError(f'{path}: expected a JSON array of objects, got {_json_type(value)}')
  for i, row in enumerate(value):
    if not isinstance(row, dict):
      raise InputError(f'{path} item {i}: expected a JSON object, got {_json_type(row)}')
  return list(enumerate(value)), 'item'


def _read_parquet(path: str) -> list[tuple[int, dict]]:
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  try:
    table = pq.read_table(path)
  except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError.
    raise InputError(f"{path}: cannot read parquet ({' '.join(str(e).split())[:200]})") from None
  return list(enumerate(table.to_pylist()))


def _json_type(value) -> str:
  return {dict: 'an object', list: 'an array', str: 'a string', bool: 'a boolean', type(None): 'null'}.get(
      type(value), 'a number')


def _from_hub(name: str, config: str | None, train_split: str, test_split: str | None) -> Splits:
  train = _load_hub_split(name, config, train_split, 'dataset_train_split')
  splits = Splits(train=train, eval=None, train_name=f'{name} split {train_split!r}', eval_name=None,
                  origin=IndexOrigin(name, train_split))
  if test_split:
    splits.eval = _load_hub_split(name, config, test_split, 'dataset_test_split')
    splits.eval_name = f'{name} split {test_split!r}'
    splits.eval_origin = IndexOrigin(name, test_split)
  return splits


def _load_hub_split(name: str, config: str | None, split: str, field: str):
  import datasets  # pylint: disable=import-outside-toplevel  (slow import, only for hub datasets)
  try:
    dataset = datasets.load_dataset(name, config, split=split)
  except Exception as e:  # pylint: disable=broad-except  (any failure is the dataset's: name, config, split, network)
    message = ' '.join(str(e).split())[:300]
    raise InputError(f"config field 'dataset_name': cannot load {name!r} (config {config!r}, split {split!r}; "
                     f"{field}): {type(e).__name__}: {message}") from None
  if len(dataset) == 0:
    raise InputError(f"config field 'dataset_name': {name!r} split {split!r} is empty (0 rows)")
  return dataset
