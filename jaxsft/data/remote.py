"""Data in a bucket: the gs:// files and prefixes that `dataset_name`, `dataset_test_split`, a mixture's `id` (and
`dataset_mixture` itself) name, read through local copies by the local-file code.

Each object is downloaded once per host into the data cache, `CACHE/gcs/` (CACHE: `dataset_cache_dir`, else
$JAXSFT_CACHE_DIR or ~/.cache/jaxsft, as for the length index), and opened as a local file (jaxsft/data/sources.py)
that names the object in its messages and its fingerprint (`sources.Copy`). Rows, batches and losses are then those
of the same files on local disk.

Why copies rather than reads through fsspec (gcsfs): the sources index a JSON Lines file by byte offset and read each
row with `os.pread`, from many threads and grain worker processes, and memory-map parquet; through gcsfs each row
would be an HTTP request, and every row is read at least once per run anyway (the length pass). datasets' own fsspec
support (`load_dataset('json', data_files='gs://...')`) converts the files into Arrow in its own cache: a second
copy, and another reader than local files have (its own types, errors and fingerprints). gcsfs does the transfers.

* A copy is keyed by the object's URL and generation (`CACHE/gcs/HASH(URL)/GENERATION/NAME`): a changed object is
  downloaded again, an unchanged one is reused by every later run on the host. The download asks for the listed
  generation (an object replaced since is then a 404, and the listing is read again), goes to a temporary name and is
  hard-linked into place only where no other process put a copy first: the processes of one host never read a
  partial copy, nor have theirs replaced under them (which jaxsft/data/handles.py would refuse).
* The fingerprint of a copy is the object's URL, size and checksums, not the copy's path and time: the same on every
  host and after a download into a fresh cache, so a relaunch resumes; a changed object changes it, and a resume is
  refused as for a changed local file. (Checksums rather than the generation: an identical re-upload changes nothing.)
* Every process stages for itself (each host has its own disk); nothing is shared between hosts.
* A prefix is a directory: its objects are split by name as a local directory's files are (jaxsft/data/paths.py)
  and only the split's files are copied; a prefix holding a `save_to_disk` dataset is copied whole and loaded as a
  local one. As for local paths, globs are not expanded.
"""

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import posixpath
import tempfile
import time
from typing import Callable

from jaxsft import storage
from jaxsft.data import paths as paths_lib
from jaxsft.data import sources
from jaxsft.errors import InputError
from jaxsft.errors import one_line

_WORKERS = 8  # Objects downloaded at once.
_TRIES = 3  # Listings read when objects are replaced while they are copied.
_GLOB = '*?['


@dataclasses.dataclass(frozen=True)
class Cache:
  """Where copies go (a local directory), and where their downloads are logged."""
  root: str
  log: Callable[[str], None] | None = None


def cache_under(directory: str, log: Callable[[str], None] | None = None) -> Cache:
  """The copies' place in a data cache directory (`jaxsft.config.cache_dir`)."""
  return Cache(os.path.join(directory, 'gcs'), log)


def default_cache() -> Cache:
  """`jaxsft.config.cache_dir` without a config (dataset_cache_dir unset): $JAXSFT_CACHE_DIR or ~/.cache/jaxsft."""
  return cache_under(os.environ.get('JAXSFT_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'jaxsft'))


@dataclasses.dataclass(frozen=True)
class _Object:
  url: str
  generation: str | None
  size: int
  version: str  # Size and checksums: what the fingerprint holds.


class _Replaced(Exception):
  """An object was replaced or deleted between its listing and its download."""


def _object(info: dict) -> _Object:
  generation = str(info['generation']) if info.get('generation') else None
  checksums = [f'{k}={info[k]}' for k in ('md5Hash', 'crc32c') if info.get(k)] or [f'generation={generation}']
  return _Object(f'gs://{info["name"]}', generation, int(info['size']), ','.join([f'size={info["size"]}', *checksums]))


def _listing(url: str, field: str) -> tuple[bool, dict[str, _Object]]:
  """(whether `url` is one object, {name relative to `url` (the base name for one object): object})."""
  try:
    single, found = storage.objects(url)
  except InputError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (gcsfs's HttpError, auth, network: one line, whatever it is)
    raise InputError(f"config field '{field}': cannot read {url!r} ({one_line(e, 300, typed=True)})") from None
  objects = {name: _object(info) for name, info in found.items()}
  if not objects:
    hint = ' (globs are not expanded: name a file, or the prefix that holds the files)' if any(
        c in url for c in _GLOB) else ''
    raise InputError(f"config field '{field}': no such object or prefix: {url!r}{hint}")
  return single, objects


def _saved_kind(objects: dict[str, _Object]) -> str | None:
  """'DatasetDict' or 'Dataset' for a prefix written by `save_to_disk` (by its marker object), else None."""
  return next((kind for marker, kind in paths_lib.MARKERS if marker in objects), None)


def _hash(text: str) -> str:
  return hashlib.sha256(text.encode('utf-8')).hexdigest()[:32]


def _whole(path: str, size: int) -> bool:
  try:
    return os.path.getsize(path) == size
  except OSError:
    return False


def _fetch(obj: _Object, target: str, field: str) -> None:
  """`obj` copied to `target`, unless a whole copy is there (one process's copy, never replaced by another's)."""
  try:
    _fetch_once(obj, target)
  except (_Replaced, InputError):
    raise
  except Exception as e:  # pylint: disable=broad-except  (HTTP after gcsfs's retries, a full disk: one line)
    raise InputError(f"config field '{field}': cannot copy {obj.url!r} to {os.path.dirname(target)!r} "
                     f'({one_line(e, 300, typed=True)})') from None


def _fetch_once(obj: _Object, target: str) -> None:
  if _whole(target, obj.size):
    return
  directory = os.path.dirname(target)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(target)}.', suffix='.part')
  os.close(fd)
  try:
    try:
      # One streamed GET of the listed generation: a newer object is a 404, never a mix of two.
      storage.download(obj.url, tmp, generation=obj.generation)
    except FileNotFoundError:
      raise _Replaced(obj.url) from None
    if not _whole(tmp, obj.size):
      raise _Replaced(obj.url)
    try:
      os.link(tmp, target)  # Fails where a copy is: another process's, of the same generation, is kept.
    except FileExistsError:
      if not _whole(target, obj.size):
        os.replace(tmp, target)
    except OSError:  # A filesystem without hard links.
      os.replace(tmp, target)
  finally:
    with contextlib.suppress(OSError):
      os.unlink(tmp)


def _fetch_all(url: str, copies: list[tuple[_Object, str]], cache: Cache, field: str) -> None:
  """Each (object, local path) copied, several at once; one log line before and one after, if any is downloaded."""
  todo = [(obj, target) for obj, target in copies if not _whole(target, obj.size)]
  if not todo:
    return
  size = sum(obj.size for obj, _ in todo)
  if cache.log:
    cache.log(f'data: copying {len(todo)} object(s) ({size / 2**20:.1f} MiB) of {url} to {cache.root}')
  start = time.monotonic()
  with concurrent.futures.ThreadPoolExecutor(min(_WORKERS, len(todo))) as pool:
    for future in [pool.submit(_fetch, obj, target, field) for obj, target in todo]:
      future.result()
  if cache.log:
    cache.log(f'data: copied {url} in {time.monotonic() - start:.1f} s')


def _target(obj: _Object, cache: Cache) -> str:
  return os.path.join(cache.root, _hash(obj.url), obj.generation or 'none', posixpath.basename(obj.url))


def _open_objects(url: str, objects: list[_Object], cache: Cache, *, name: str | None, field: str) -> sources.Source:
  targets = [_target(obj, cache) for obj in objects]
  _fetch_all(url, list(zip(objects, targets)), cache, field)
  copies = {target: sources.Copy(obj.url, obj.version) for obj, target in zip(objects, targets)}
  return sources.open_files(targets, name=name, field=field, copies=copies)


def _open_saved(url: str, objects: dict[str, _Object], split: str, cache: Cache, *, name_field: str,
                split_field: str, hint: str) -> sources.HubSplit:
  """A `save_to_disk` prefix, copied whole (a directory keyed by its objects' generations), loaded from the copy."""
  listing = json.dumps(sorted((rel, obj.generation) for rel, obj in objects.items()))
  directory = os.path.join(cache.root, _hash(url.rstrip('/')), f'saved-{_hash(listing)}')
  _fetch_all(url, [(obj, os.path.join(directory, *rel.split('/'))) for rel, obj in objects.items()], cache,
             name_field)
  try:
    dataset = paths_lib.load_saved(directory, split, name_field=name_field, split_field=split_field, hint=hint)
  except InputError as e:
    raise InputError(str(e).replace(directory, url.rstrip('/'))) from None  # Messages name the prefix.
  stamp = sorted((obj.url, obj.version) for obj in objects.values())
  return sources.HubSplit(dataset, url, None, split, stamp=stamp)


def _retrying(field: str, url: str, attempt: Callable[[], sources.Source]) -> sources.Source:
  for _ in range(_TRIES):
    try:
      return attempt()
    except _Replaced:
      continue
  raise InputError(f"config field '{field}': the objects of {url!r} were replaced while they were copied "
                   f'({_TRIES} times); run again when they are not being written')


def open_named(url: str, split: str, *, name_field: str, split_field: str, all_if_unnamed: bool, hint: str = '',
               cache: Cache | None = None) -> sources.Source:
  """Split `split` of a gs:// file (its only split is 'train') or prefix, as `jaxsft.data.named.open_named` opens a
  local file or directory (`all_if_unnamed`, `hint`: as there)."""
  cache = cache or default_cache()

  def attempt() -> sources.Source:
    single, objects = _listing(url, name_field)
    if single:
      if split != 'train':
        raise InputError(f"config field '{split_field}': {split!r} is not available: {url!r} is a single file "
                         f"(its only split is 'train'){hint}")
      if not url.lower().endswith(paths_lib.EXTENSIONS):
        raise InputError(f"config field '{name_field}': {url!r} is not a .jsonl, .json or .parquet file")
      return _open_objects(url, list(objects.values()), cache, name=None, field=name_field)
    if _saved_kind(objects):
      return _open_saved(url, objects, split, cache, name_field=name_field, split_field=split_field, hint=hint)
    files = sorted(rel for rel in objects if paths_lib.is_data_file(posixpath.basename(rel)))
    if not files:
      raise InputError(f"config field '{name_field}': the prefix {url!r} holds no .jsonl, .json or .parquet files")
    base = url.rstrip('/')
    by_path = {os.path.join(base, rel): objects[rel] for rel in files}  # As paths.split_paths joins them.
    chosen = paths_lib.split_paths(base, files, split, split_field, all_if_unnamed)
    return _open_objects(url, [by_path[p] for p in chosen], cache, name=f'{url} split {split!r}', field=name_field)

  return _retrying(name_field, url, attempt)


def check_split_file(url: str, field: str) -> tuple[bool, dict[str, _Object]]:
  """`paths.split_file` for a gs:// URL: an InputError naming `field` unless it is an object or a saved Dataset."""
  single, objects = _listing(url, field)
  if not single and _saved_kind(objects) != paths_lib.DATASET:
    raise InputError(f"config field '{field}': {url!r} is a prefix (a directory); expected a .jsonl, .json or "
                     '.parquet file (or a prefix written by Dataset.save_to_disk)')
  return single, objects


def open_split_file(url: str, field: str, cache: Cache | None = None) -> sources.Source:
  """The split that a split field gives as a gs:// URL: a data file, or a saved Dataset's prefix (its 'train')."""
  cache = cache or default_cache()

  def attempt() -> sources.Source:
    single, objects = check_split_file(url, field)
    if not single:
      return _open_saved(url, objects, 'train', cache, name_field=field, split_field=field, hint='')
    if not url.lower().endswith(paths_lib.EXTENSIONS):
      raise InputError(f"config field '{field}': {url!r} is not a .jsonl, .json or .parquet file")
    return _open_objects(url, list(objects.values()), cache, name=None, field=field)

  return _retrying(field, url, attempt)


def read_text(url: str, field: str, what: str) -> str:
  """The text of a small gs:// object (a mixture file), read directly; InputError naming `field` and `what`."""
  try:
    return storage.read_text(url)
  except FileNotFoundError:
    raise InputError(f"config field '{field}': cannot read the {what} {url!r} (no such object)") from None
  except InputError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (HTTP, auth, decoding: one line, whatever it is)
    raise InputError(f"config field '{field}': cannot read the {what} {url!r} ({one_line(e, 300, typed=True)})"
                     ) from None
