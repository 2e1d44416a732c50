"""Local dataset paths: what a directory holds, which of its files make a split, and splits given as paths.

* A directory written by `datasets`' `save_to_disk` is recognised by its marker file: `state.json` for a
  `Dataset` (one split, the train split), `dataset_dict.json` for a `DatasetDict` (its splits by name). It is
  loaded with `datasets.load_from_disk` (memory-mapped Arrow), never read as JSON data files.
* Any other directory holds data files (`.jsonl` / `.json` / `.parquet`); a split's files are named for it
  (`train.jsonl`, `test-00000-of-00002.parquet`, `data/test.jsonl`, a `train/` folder), and files named for no
  split at all are the train split together, as `datasets` treats them.
* `dataset_test_split` may be a split name or the path of an eval file (`/data/test.jsonl`): a value with a
  path separator or a data-file extension is a path (Hugging Face split names have neither).

gs:// prefixes follow the same rules (`is_data_file`, `split_paths`, `file_split` on their object names), through
`jaxsft.data.remote`.

Nothing here builds a `Source`: `jaxsft.data.named` and `jaxsft.data.splits` do, from the paths and datasets
returned here.
"""

import json
import os

from jaxsft.errors import InputError
from jaxsft.errors import one_line

EXTENSIONS = ('.jsonl', '.json', '.parquet')
KNOWN_SPLITS = ('train', 'training', 'test', 'testing', 'eval', 'evaluation', 'validation', 'valid', 'val', 'dev')
DATASET, DATASET_DICT = 'Dataset', 'DatasetDict'  # The kinds of `save_to_disk` directories.
MARKERS = (('dataset_dict.json', DATASET_DICT), ('state.json', DATASET))  # (file name, kind), checked in order.


def looks_like_path(name: str) -> bool:
  """Whether a dataset name is meant as a local path (a hub id is 'name' or 'org/name')."""
  return (name.startswith(('/', './', '../', '~')) or name.lower().endswith(EXTENSIONS)
          or name.count('/') > 1 or os.sep != '/' and os.sep in name)


def is_split_path(split: str | None) -> bool:
  """Whether a `dataset_*_split` value is a file path ('/data/test.jsonl', 'eval.parquet'), not a split name."""
  return bool(split) and ('/' in split or os.sep in split or split.startswith('~')
                          or split.lower().endswith(EXTENSIONS))


def split_file(value: str, field: str) -> str:
  """The existing local file (or `save_to_disk` Dataset directory) that the split path `value` names."""
  path = os.path.expanduser(value)
  if os.path.isdir(path) and saved_kind(path) != DATASET:
    raise InputError(f"config field '{field}': {value!r} is a directory; expected a .jsonl, .json or .parquet "
                     'file (or a directory written by Dataset.save_to_disk)')
  if not os.path.exists(path):
    raise InputError(f"config field '{field}': no such file: {value!r}")
  return path


def saved_kind(directory: str) -> str | None:
  """'DatasetDict' or 'Dataset' for a `save_to_disk` directory (by its marker file), else None."""
  for marker, kind in MARKERS:
    if os.path.isfile(os.path.join(directory, marker)):
      return kind
  return None


def load_saved(directory: str, split: str, *, name_field: str, split_field: str, hint: str = ''):
  """Split `split` of a `save_to_disk` directory, as a memory-mapped `datasets.Dataset`.

  A saved `Dataset` is one split, 'train'; a saved `DatasetDict` has its splits by name. Raises InputError
  naming the field and the splits present for a missing split (`hint` is appended), or a load failure.
  """
  kind = saved_kind(directory)
  if kind == DATASET_DICT:
    names = _saved_split_names(directory)
    if names is not None and split not in names:
      raise InputError(f"config field '{split_field}': no split {split!r} in {directory!r} (a saved DatasetDict "
                       f'with splits {names}){hint}')
  elif split != 'train':
    raise InputError(f"config field '{split_field}': {split!r} is not available: {directory!r} is a saved "
                     f"Dataset (its only split is 'train'){hint}")
  import datasets  # pylint: disable=import-outside-toplevel  (slow import, only for datasets' own formats)
  try:
    loaded = datasets.load_from_disk(directory)
  except Exception as e:  # pylint: disable=broad-except  (a damaged or foreign directory: one line, whatever it is)
    raise InputError(f"config field '{name_field}': cannot load the saved {kind} {directory!r} "
                     f"({one_line(e, 300, typed=True)})") from None
  if isinstance(loaded, datasets.DatasetDict):
    if split not in loaded:
      raise InputError(f"config field '{split_field}': no split {split!r} in {directory!r} (a saved DatasetDict "
                       f'with splits {list(loaded)}){hint}')
    loaded = loaded[split]
  if len(loaded) == 0:
    raise InputError(f"config field '{name_field}': {directory!r} split {split!r} is empty (0 rows)")
  return loaded


def saved_stamp(dataset) -> list:
  """(file, size, modification time) of each Arrow file behind a loaded dataset: its content changes them."""
  stamps = []
  for entry in dataset.cache_files:
    st = os.stat(entry['filename'])
    stamps.append((os.path.abspath(entry['filename']), st.st_size, st.st_mtime_ns))
  return stamps


def _saved_split_names(directory: str) -> list[str] | None:
  try:
    with open(os.path.join(directory, 'dataset_dict.json'), encoding='utf-8') as f:
      names = json.load(f).get('splits')
  except (OSError, ValueError, AttributeError):
    return None  # Unreadable: load_from_disk reports it.
  return list(names) if isinstance(names, list) else None


def is_data_file(name: str) -> bool:
  """Whether a file of a dataset directory (by its base name) is a data file: .jsonl / .json / .parquet, not hidden."""
  return name.lower().endswith(EXTENSIONS) and not name.startswith('.')


def data_files(directory: str, field: str) -> list[str]:
  """The data files under `directory`, relative to it, sorted (hidden files left out)."""
  files = sorted(os.path.relpath(os.path.join(root, name), directory)
                 for root, _, names in os.walk(directory) for name in names if is_data_file(name))
  if not files:
    raise InputError(f"config field '{field}': the directory {directory!r} holds no .jsonl, .json or "
                     '.parquet files')
  return files


def split_paths(directory: str, files: list[str], split: str, split_field: str, all_if_unnamed: bool) -> list[str]:
  """The paths of the files of `split` (with `all_if_unnamed`: every file when no file is named for a split)."""
  paths = [os.path.join(directory, f) for f in files if file_split(f, split)]
  if not paths and all_if_unnamed and not any(file_split(f, s) for f in files for s in KNOWN_SPLITS):
    paths = [os.path.join(directory, f) for f in files]
  if not paths:
    raise InputError(f"config field '{split_field}': no file for split {split!r} in {directory!r} "
                     f'(files: {files[:10]})')
  return paths


def file_split(relpath: str, split: str) -> bool:
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
