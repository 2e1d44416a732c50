"""The train split and the eval split of a run: `load_splits` resolves the config's dataset fields to `Source`s.

`dataset_name` (one split of it opened by `jaxsft.data.named`) is

* `synthetic:...`: generated in memory by `jaxsft.data.synthetic`.
* a local `.jsonl` / `.json` / `.parquet` file: the train split (it has no eval split).
* a local directory: the files of each split, named `train.jsonl`, `test.parquet`, ...; or HF-style data
  files (`train-00000-of-00002.parquet`, `data/test.jsonl`, a `train/` folder); files named for no split
  at all are the train split together, as `datasets` treats them; or a `save_to_disk` directory of a
  `Dataset` (the train split) or a `DatasetDict` (its splits by name), memory-mapped (`jaxsft.data.paths`).
* anything else: a hub id, `datasets.load_dataset(dataset_name, dataset_config, split=...)` (memory-mapped).

`dataset_mixture` instead: open-r1's mixture (`jaxsft.data.mixture`).

`dataset_test_split` may also be the path of an eval file (`/data/test.jsonl`), whatever `dataset_name` is.

Files, directories and eval files may be gs:// objects and prefixes (`jaxsft.data.remote` copies them locally).
"""

import os
from typing import Any

from jaxsft import storage
from jaxsft.data import mixture as mixture_lib
from jaxsft.data import named
from jaxsft.data import paths as paths_lib
from jaxsft.data import remote
from jaxsft.data import synthetic
from jaxsft.data.sources import HubSplit, Source, Splits, open_files
from jaxsft.errors import InputError


_EVAL_FILE_HINT = ("; the eval split can also be a file: set dataset_test_split to its path (e.g. /data/test.jsonl), "
                   "or disable evaluation (eval_strategy='no')")


def load_splits(*, dataset_name: str | None, dataset_config: str | None, dataset_train_split: str,
                dataset_test_split: str | None, dataset_mixture: Any = None, need_eval: bool,
                remote_cache: remote.Cache | None = None) -> Splits:
  """The train split (and the eval split if `need_eval`) of `dataset_name` or of `dataset_mixture`.

  `dataset_test_split` is a split name or the path of an eval file (.jsonl / .json / .parquet, or a
  `Dataset.save_to_disk` directory), which is then the eval split whatever the train data is.
  Rows are read lazily: a malformed row raises when read (`splits.train[i]`), naming its origin.
  `remote_cache`: where gs:// objects are copied (None: the default data cache).

  Raises:
    InputError: naming the config field, file or split at fault: unset or conflicting fields, a missing file
      or split, an empty split, a hub dataset that cannot be loaded, an invalid mixture.
  """
  if paths_lib.is_split_path(dataset_train_split):
    raise InputError(f"config field 'dataset_train_split': expected a split name, got the path "
                     f"{dataset_train_split!r} (to train on a file, set 'dataset_name' to it)")
  test_is_path = paths_lib.is_split_path(dataset_test_split)
  eval_path = _split_file(dataset_test_split, 'dataset_test_split') if need_eval and test_is_path else None
  if dataset_mixture is not None and not (isinstance(dataset_mixture, str) and not dataset_mixture.strip()):
    if dataset_name:
      raise InputError("config fields 'dataset_name' and 'dataset_mixture' are both set; set one of them")
    if dataset_config:
      raise InputError("config field 'dataset_config' has no effect with 'dataset_mixture'; set 'config' on "
                       'the datasets of the mixture')
    if dataset_train_split not in (None, '', 'train'):
      raise InputError(f"config field 'dataset_train_split': a dataset_mixture's splits are 'train' and 'test', "
                       f'got {dataset_train_split!r}')
    if dataset_test_split not in (None, '', 'test') and not test_is_path:
      raise InputError(f"config field 'dataset_test_split': a dataset_mixture's splits are 'train' and 'test' "
                       f'(or give an eval file\'s path), got {dataset_test_split!r}')
    mixture = mixture_lib.load_mixture(dataset_mixture, remote_cache=remote_cache)
    if eval_path and 'test' in mixture:
      raise InputError(f"config fields 'dataset_test_split' (the file {dataset_test_split!r}) and "
                       "'dataset_mixture.test_split_size' both make an eval split; set one of them")
    if need_eval and not eval_path and 'test' not in mixture:
      raise InputError("config field 'dataset_mixture.test_split_size' is not set, but an eval split is needed "
                       "(set it, set dataset_test_split to an eval file's path, or disable evaluation)")
    evaluation = (_path_split(eval_path, remote_cache) if eval_path else mixture['test']) if need_eval else None
    return Splits(train=mixture['train'], eval=evaluation, train_name=mixture['train'].name,
                  eval_name=evaluation.name if evaluation is not None else None)
  if not dataset_name:
    raise InputError("config field 'dataset_name' is not set")
  if need_eval and not dataset_test_split:
    raise InputError("config field 'dataset_test_split' is not set, but an eval split is needed")
  if dataset_name.startswith('synthetic:'):
    splits = synthetic.load(dataset_name)
    if not need_eval:
      splits.eval, splits.eval_name = None, None
    elif eval_path:
      splits.eval = _path_split(eval_path, remote_cache)
      splits.eval_name = splits.eval.name
    elif splits.eval is None:
      raise InputError(f"config field 'dataset_name': {dataset_name!r} has no eval split")
    return splits
  train = named.open_named(dataset_name, dataset_config, dataset_train_split, name_field='dataset_name',
                           split_field='dataset_train_split', all_if_unnamed=True, remote_cache=remote_cache)
  splits = Splits(train=train, eval=None, train_name=_split_name(dataset_name, dataset_train_split), eval_name=None)
  if eval_path:
    splits.eval = _path_split(eval_path, remote_cache)
    splits.eval_name = splits.eval.name
  elif need_eval:
    splits.eval = named.open_named(dataset_name, dataset_config, dataset_test_split, name_field='dataset_name',
                                   split_field='dataset_test_split', all_if_unnamed=False, hint=_EVAL_FILE_HINT,
                                   remote_cache=remote_cache)
    splits.eval_name = _split_name(dataset_name, dataset_test_split)
  return splits


def _split_name(dataset_name: str, split: str) -> str:
  return dataset_name if storage.isfile(dataset_name) else f'{dataset_name} split {split!r}'


def _split_file(value: str, field: str) -> str:
  """The eval file (or saved Dataset) that `value` names, checked: a local path, or the gs:// URL itself."""
  if storage.is_remote(value):
    remote.check_split_file(value, field)
    return value
  return paths_lib.split_file(value, field)


def _path_split(path: str, remote_cache: remote.Cache | None, field: str = 'dataset_test_split') -> Source:
  """The split that a split field gives as a path (checked by `_split_file`): a data file or saved Dataset."""
  if storage.is_remote(path):
    return remote.open_split_file(path, field, remote_cache)
  if os.path.isdir(path):
    dataset = paths_lib.load_saved(path, 'train', name_field=field, split_field=field)
    return HubSplit(dataset, path, None, 'train', stamp=paths_lib.saved_stamp(dataset))
  if not path.lower().endswith(paths_lib.EXTENSIONS):
    raise InputError(f"config field '{field}': {path!r} is not a .jsonl, .json or .parquet file")
  return open_files([path], field=field)
