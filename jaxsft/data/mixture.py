"""open-r1's `dataset_mixture`: per-dataset column selection and weighted subsampling, one shuffle, a test split.

open-r1's `get_dataset` loads each dataset, keeps `columns`, shuffles it with the mixture's `seed` and keeps the
first `int(len × weight)` rows, concatenates the parts, shuffles again and, with `test_split_size`, splits off
a test set with `train_test_split`. The index arithmetic of those `datasets` calls is reproduced here on lazy
index views (`sources.Select` over `sources.Concat`), so building a mixture reads no rows. A dataset's `id` (and the
mixture file) may be a gs:// URL (`jaxsft.data.remote`).
"""

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxsft import storage
from jaxsft import urls
from jaxsft.data import remote
from jaxsft.data.named import open_split
from jaxsft.data.sources import Concat, Select, Source, select_columns
from jaxsft.errors import InputError
from jaxsft.errors import one_line


_MIXTURE_KEYS = ('datasets', 'seed', 'test_split_size')
_ENTRY_KEYS = ('id', 'config', 'split', 'columns', 'weight')
_FIELD = 'dataset_mixture'


@dataclasses.dataclass(frozen=True)
class MixtureEntry:
  """One dataset of a mixture (open-r1's DatasetConfig)."""
  id: str
  config: str | None = None
  split: str = 'train'
  columns: tuple[str, ...] | None = None
  weight: float | None = None


@dataclasses.dataclass(frozen=True)
class Mixture:
  """open-r1's DatasetMixtureConfig."""
  datasets: tuple[MixtureEntry, ...]
  seed: int = 0
  test_split_size: float | int | None = None


def load_mixture(spec: Any, remote_cache: remote.Cache | None = None) -> dict[str, Source]:
  """open-r1's `get_dataset` for a `dataset_mixture`: {'train': ..., 'test': ...} ('test' with test_split_size).

  Per dataset: load the split, keep `columns`, with a `weight` keep the first int(n × weight) rows of a
  permutation by `np.random.default_rng(seed)` (as `ds.shuffle(seed).select(range(...))`); then concatenate,
  permute the whole with the same seed (`shuffle(seed)`) and, with `test_split_size`, split as
  `train_test_split(test_size, seed)` does: test = the first n_test of a third permutation, train the rest.
  Only indices are computed: no row is read (JSON Lines files read their first row for the column names).

  `spec` is the mixture dict, or the path of a YAML/JSON file holding it (or holding an open-r1 recipe with a
  `dataset_mixture` key), or such a YAML/JSON text. `remote_cache`: where gs:// datasets are copied (None: the default).
  """
  mixture = parse_mixture(spec)
  bases, columns = [], []
  for k, entry in enumerate(mixture.datasets):
    field = f'{_FIELD}.datasets[{k}]'
    source = open_split(entry.id, entry.config, entry.split, name_field=f'{field}.id', split_field=f'{field}.split',
                        remote_cache=remote_cache)
    available = source.column_names()
    if entry.columns is not None:
      missing = [c for c in entry.columns if c not in available]
      if missing:
        raise InputError(f"config field '{field}.columns': {entry.id!r} has no column {missing[0]!r} "
                         f'(its columns: {available})')
      source, available = select_columns(source, entry.columns), list(entry.columns)
    bases.append(source)
    columns.append(available)
  for k in range(1, len(bases)):
    if set(columns[k]) != set(columns[0]):
      raise InputError(f"config field '{_FIELD}': datasets have different columns: {mixture.datasets[0].id!r} "
                       f"{columns[0]} vs {mixture.datasets[k].id!r} {columns[k]}; set 'columns' on each")
  chosen, offset = [], 0
  for k, (entry, source) in enumerate(zip(mixture.datasets, bases)):
    n = len(source)
    if entry.weight is None:
      local = np.arange(n)
    else:
      keep = int(n * entry.weight)
      if keep == 0:
        raise InputError(f"config field '{_FIELD}.datasets[{k}].weight': {entry.weight!r} of the {n} rows of "
                         f'{entry.id!r} is 0 rows')
      local = np.random.default_rng(mixture.seed).permutation(n)[:keep]
    chosen.append(local + offset)
    offset += n
  combined = np.concatenate(chosen)
  combined = combined[np.random.default_rng(mixture.seed).permutation(len(combined))]
  everything = Concat(bases, 'mixture')
  if mixture.test_split_size is None:
    return {'train': Select(everything, combined, "mixture split 'train'")}
  n_test, n_train = _test_split_sizes(mixture.test_split_size, len(combined))
  permutation = np.random.default_rng(mixture.seed).permutation(len(combined))
  return {'train': Select(everything, combined[permutation[n_test:n_test + n_train]], "mixture split 'train'"),
          'test': Select(everything, combined[permutation[:n_test]], "mixture split 'test'")}


def _test_split_sizes(test_size: float | int, n: int) -> tuple[int, int]:
  """(n_test, n_train) as `datasets.Dataset.train_test_split(test_size=...)` computes them."""
  field = f"config field '{_FIELD}.test_split_size'"
  if isinstance(test_size, int) and not 1 <= test_size < n or isinstance(test_size, float) and not 0 < test_size < 1:
    raise InputError(f'{field}: must be a float in (0, 1) or an integer in [1, {n}) (the mixture has {n} rows), '
                     f'got {test_size!r}')
  n_test = math.ceil(test_size * n) if isinstance(test_size, float) else test_size
  if n - n_test < 1:
    raise InputError(f'{field}: {test_size!r} of the {n} rows of the mixture leaves no training rows')
  return n_test, n - n_test


def parse_mixture(spec: Any) -> Mixture:
  """A validated `Mixture` from the dict (or YAML/JSON file or text) of `dataset_mixture`."""
  if isinstance(spec, str):
    spec = _read_mixture(spec)
  spec = _plain(spec)
  if not isinstance(spec, dict):
    raise InputError(f"config field '{_FIELD}': expected a dict with a 'datasets' list, got {type(spec).__name__}")
  _unknown_keys(spec, _MIXTURE_KEYS, _FIELD)
  datasets = spec.get('datasets')
  if not isinstance(datasets, list) or not datasets:
    raise InputError(f"config field '{_FIELD}.datasets': expected a non-empty list of datasets, got {datasets!r}")
  entries = [_parse_entry(entry, f'{_FIELD}.datasets[{k}]') for k, entry in enumerate(datasets)]
  seed = spec.get('seed', 0)
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise InputError(f"config field '{_FIELD}.seed': must be a non-negative integer, got {seed!r}")
  test_size = spec.get('test_split_size')
  if test_size is not None and (isinstance(test_size, bool) or not isinstance(test_size, (int, float))):
    raise InputError(f"config field '{_FIELD}.test_split_size': must be a float in (0, 1) or a positive integer, "
                     f'got {test_size!r}')
  return Mixture(tuple(entries), seed, test_size)


def _parse_entry(entry: Any, field: str) -> MixtureEntry:
  if not isinstance(entry, dict):
    raise InputError(f"config field '{field}': expected a dict with an 'id', got {entry!r}")
  _unknown_keys(entry, _ENTRY_KEYS, field)
  name = entry.get('id')
  if not isinstance(name, str) or not name:
    raise InputError(f"config field '{field}.id': expected a dataset name or path, got {name!r}")
  urls.refuse(name, f"config field '{field}.id'", gs=True)
  config = entry.get('config')
  if config is not None and not isinstance(config, str):
    raise InputError(f"config field '{field}.config': expected a string or null, got {config!r}")
  split = entry.get('split', 'train')
  if not isinstance(split, str) or not split:
    raise InputError(f"config field '{field}.split': expected a split name, got {split!r}")
  columns = entry.get('columns')
  if columns is not None:
    if (not isinstance(columns, list) or not columns or not all(isinstance(c, str) for c in columns)
        or len(set(columns)) != len(columns)):
      raise InputError(f"config field '{field}.columns': expected a non-empty list of distinct column names, "
                       f'got {columns!r}')
    columns = tuple(columns)
  # A missing weight is 1.0 (open-r1's ScriptArguments.__post_init__): the dataset is shuffled, all rows kept.
  # An explicit null keeps the dataset in its order.
  weight = entry.get('weight', 1.0)
  if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                             or not 0 < weight <= 1):
    raise InputError(f"config field '{field}.weight': must be in (0, 1], got {weight!r}")
  return MixtureEntry(name, config, split, columns, weight)


def _unknown_keys(spec: dict, known: Sequence[str], field: str) -> None:
  unknown = [k for k in spec if k not in known]
  if unknown:
    raise InputError(f"config field '{field}': unknown key {unknown[0]!r} (known: {', '.join(known)})")


def _plain(value: Any) -> Any:
  """Dicts and lists all the way down (a ConfigDict and its FieldReferences, tuples)."""
  if hasattr(value, 'to_dict'):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def _read_mixture(spec: str) -> Any:
  """The mixture dict of a YAML/JSON file (or of an inline `{...}` text); an open-r1 recipe's dataset_mixture."""
  if spec.lstrip().startswith('{'):
    where, text = 'the inline mixture', spec
  elif storage.is_remote(spec):
    where, text = repr(spec), remote.read_text(spec, _FIELD, 'mixture file')
  else:
    where = repr(spec)
    try:
      with open(spec, encoding='utf-8') as f:
        text = f.read()
    except (OSError, UnicodeDecodeError) as e:
      raise InputError(f"config field '{_FIELD}': cannot read the mixture file {spec!r} "
                       f'({getattr(e, "strerror", None) or e})') from None
  if spec.lower().endswith('.json'):
    try:
      value = json.loads(text)
    except ValueError as e:
      raise InputError(f"config field '{_FIELD}': {where}: malformed JSON ({e})") from None
  else:
    import yaml  # pylint: disable=import-outside-toplevel
    try:
      value = yaml.safe_load(text)
    except yaml.YAMLError as e:
      raise InputError(f"config field '{_FIELD}': {where}: malformed YAML ({one_line(e)})") from None
  if isinstance(value, dict) and 'datasets' not in value and _FIELD in value:
    value = value[_FIELD]  # An open-r1 recipe.
  return value
