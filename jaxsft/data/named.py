"""One split of a dataset named the way `dataset_name` (or a mixture's `id`) names it, as a `Source`.

* `synthetic:...`: generated in memory by `jaxsft.data.synthetic` (splits 'train' and 'test').
* a local `.jsonl` / `.json` / `.parquet` file: its only split is 'train'.
* a local directory: a `save_to_disk` directory, or the data files of the split (`jaxsft.data.paths`).
* a gs:// file or prefix: the same, read through local copies (`jaxsft.data.remote`).
* anything else: a hub id, `datasets.load_dataset(name, config, split=...)` (memory-mapped).
"""

import os

from jaxsft import storage
from jaxsft.data import paths as paths_lib
from jaxsft.data import remote
from jaxsft.data import synthetic
from jaxsft.data.sources import HubSplit, Source, open_files
from jaxsft.errors import InputError
from jaxsft.errors import one_line


def open_split(name: str, config: str | None, split: str, *, name_field: str, split_field: str,
               remote_cache: remote.Cache | None = None) -> Source:
  """One split of a dataset named as `dataset_name` is (a mixture's `id`): synthetic, file, directory or hub
  (`remote_cache`: where gs:// objects are copied; None: the default data cache)."""
  if name.startswith('synthetic:'):
    splits = synthetic.load(name)
    source = {'train': splits.train, 'test': splits.eval}.get(split)
    if source is None:
      raise InputError(f"config field '{split_field}': {name!r} has no split {split!r}")
    return source
  return open_named(name, config, split, name_field=name_field, split_field=split_field,
                    all_if_unnamed=split == 'train', remote_cache=remote_cache)


def open_named(name: str, config: str | None, split: str, *, name_field: str, split_field: str,
               all_if_unnamed: bool, hint: str = '', remote_cache: remote.Cache | None = None) -> Source:
  """Split `split` of a file (its only split is 'train'), a directory (local or gs://) or a hub dataset.

  `all_if_unnamed`: a directory's files named for no split make this split (the train split's rule);
  `hint` ends the message of a split that is not there; `remote_cache`: as for `open_split`.
  """
  if storage.is_remote(name):
    return remote.open_named(name, split, name_field=name_field, split_field=split_field,
                             all_if_unnamed=all_if_unnamed, hint=hint, cache=remote_cache)
  if os.path.isfile(name):
    if split != 'train':
      raise InputError(f"config field '{split_field}': {split!r} is not available: {name!r} is a single file "
                       f"(its only split is 'train'){hint}")
    if not name.lower().endswith(paths_lib.EXTENSIONS):
      raise InputError(f"config field '{name_field}': {name!r} is not a .jsonl, .json or .parquet file")
    return open_files([name], field=name_field)
  if os.path.isdir(name):
    if paths_lib.saved_kind(name):
      dataset = paths_lib.load_saved(name, split, name_field=name_field, split_field=split_field, hint=hint)
      return HubSplit(dataset, name, None, split, stamp=paths_lib.saved_stamp(dataset))
    files = paths_lib.data_files(name, name_field)
    return open_files(paths_lib.split_paths(name, files, split, split_field, all_if_unnamed),
                      name=f'{name} split {split!r}', field=name_field)
  if paths_lib.looks_like_path(name):
    raise InputError(f"config field '{name_field}': no such file or directory: {name!r}")
  return _load_hub_split(name, config, split, name_field, split_field)


def _load_hub_split(name: str, config: str | None, split: str, name_field: str, split_field: str) -> HubSplit:
  import datasets  # pylint: disable=import-outside-toplevel  (slow import, only for hub datasets)
  try:
    dataset = datasets.load_dataset(name, config, split=split)
  except Exception as e:  # pylint: disable=broad-except  (any failure is the dataset's: name, config, split, network)
    message = one_line(e, 300)
    raise InputError(f"config field '{name_field}': cannot load {name!r} (config {config!r}, split {split!r}; "
                     f"{split_field}): {type(e).__name__}: {message}") from None
  if len(dataset) == 0:
    raise InputError(f"config field '{name_field}': {name!r} split {split!r} is empty (0 rows)")
  return HubSplit(dataset, name, config, split)
