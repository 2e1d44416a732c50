"""One path layer for local paths and gs:// URLs: the run directory, checkpoints, metrics, exports, data files.

A local path goes to `os` exactly as before this layer existed; a `gs://bucket/object` URL goes to fsspec's
gcsfs (the `[gcs]` extra, in `[tpu]`), the same library through which Orbax (etils.epath) and datasets reach
Cloud Storage. Callers never branch on the scheme: they call these functions.

What Cloud Storage is not, and how each use copes (the callers' docstrings say more):
* No directories: an object name holds slashes. `makedirs` is a no-op there, `isdir` means "some object lies
  under this prefix", an empty directory cannot exist.
* No rename, no append: an object is written whole. But writing one object is atomic (readers see the old object
  or the new one, never a torn one), so `write_atomically` is one upload there and a temporary file plus
  `os.replace` locally. An append-only file (metrics.jsonl) is rewritten whole (jaxsft/metrics.py).
* Exclusive creation exists (`ifGenerationMatch=0`): `create_exclusive` is O_EXCL locally and that there, so
  of two runs that take one output_dir's lock together exactly one gets it, on a bucket too.
* Listings are not cached here (`use_listings_cache=False`): several processes write one directory.
Directories that libraries write only locally (transformers' `save_pretrained`, TensorBoard) are written to a
local temporary directory and uploaded with `put_dir`.
"""

import contextlib
import os
import posixpath
import shutil
import tempfile
from typing import IO, Iterator

from jaxsft import urls
from jaxsft.errors import InputError

REMOTE_SCHEMES = ('gs',)


def is_remote(path) -> bool:
  """Whether `path` is a URL this layer opens (gs://...); a local path, hub id or non-str is not."""
  return urls.scheme(path) in REMOTE_SCHEMES


def _fs():
  try:
    import gcsfs  # pylint: disable=import-outside-toplevel  (only runs on buckets need it)
  except ImportError:
    raise InputError("gs:// paths need gcsfs: pip install 'jaxsft[gcs]' (the [tpu] extra includes it)") from None
  # One instance per process (gcsfs caches it by its arguments), without listing caches: other processes write
  # the same run directory, and a cached listing would hide their checkpoints and markers.
  return gcsfs.GCSFileSystem(use_listings_cache=False, skip_instance_cache=False)


def _key(path: str) -> str:
  """'gs://bucket/a/b/' -> 'bucket/a/b' (gcsfs's object names)."""
  return path.split('://', 1)[1].rstrip('/')


def join(base: str, *parts: str) -> str:
  if is_remote(base):
    return posixpath.join(base.rstrip('/'), *parts)
  return os.path.join(base, *parts)


def dirname(path: str) -> str:
  if is_remote(path):
    head = posixpath.dirname(path.rstrip('/'))
    return head if head.count('/') >= 2 else path  # 'gs://bucket' stays itself.
  return os.path.dirname(path)


def basename(path: str) -> str:
  return posixpath.basename(path.rstrip('/')) if is_remote(path) else os.path.basename(path)


def absolute(path: str) -> str:
  """A local path made absolute (with ~ expanded); a URL unchanged."""
  return path.rstrip('/') if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def exists(path: str) -> bool:
  return _fs().exists(_key(path)) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _fs().isdir(_key(path)) if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return _fs().isfile(_key(path)) if is_remote(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
  """The names directly under `path` ([] where there is nothing, or no such directory, on a bucket)."""
  if not is_remote(path):
    return os.listdir(path)
  fs = _fs()
  key = _key(path)
  try:
    entries = fs.ls(key, detail=False)
  except FileNotFoundError:
    return []
  return sorted({posixpath.basename(e.rstrip('/')) for e in entries if e.rstrip('/') != key})


def makedirs(path: str) -> None:
  """Creates a local directory and its parents (no error if it exists); nothing to do on a bucket."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
  """Removes a file (FileNotFoundError if there is none)."""
  if is_remote(path):
    _fs().rm_file(_key(path))
  else:
    os.remove(path)


def rmtree(path: str) -> None:
  """Removes a directory and everything under it; nothing if it does not exist."""
  if is_remote(path):
    with contextlib.suppress(FileNotFoundError):
      _fs().rm(_key(path), recursive=True)
  else:
    shutil.rmtree(path, ignore_errors=True)


def rename(src: str, dst: str) -> None:
  """Moves a file or directory (on a bucket: copies every object, then deletes the originals; not atomic)."""
  if is_remote(src) != is_remote(dst):
    raise ValueError(f'cannot rename across filesystems: {src!r} -> {dst!r}')
  if is_remote(src):
    _fs().mv(_key(src), _key(dst), recursive=True)
  else:
    os.rename(src, dst)


def open_file(path: str, mode: str = 'r') -> IO:
  """A file object; text modes are UTF-8. On a bucket, 'w' and 'a' are not offered: see `write_atomically`."""
  if not is_remote(path):
    return open(path, mode, encoding=None if 'b' in mode else 'utf-8')  # pylint: disable=consider-using-with
  if mode not in ('r', 'rb'):
    raise ValueError(f'open_file({path!r}, {mode!r}): objects are written whole (write_atomically)')
  return _fs().open(_key(path), mode, encoding=None if 'b' in mode else 'utf-8')


def read_text(path: str) -> str:
  with open_file(path) as f:
    return f.read()


def write_atomically(path: str, data: str | bytes) -> None:
  """Writes a whole file that readers see complete or not at all (a killed writer leaves the old one)."""
  raw = data.encode('utf-8') if isinstance(data, str) else data
  if is_remote(path):
    _fs().pipe_file(_key(path), raw)  # One object upload: atomic.
    return
  tmp = f'{path}.tmp'
  with open(tmp, 'wb') as f:
    f.write(raw)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def create_exclusive(path: str, data: str) -> bool:
  """Creates `path` holding `data` if no such file exists (True), else leaves it (False); atomic on both."""
  if is_remote(path):
    try:
      # ifGenerationMatch=0. (gcsfs's open(mode='xb') writes over an existing object: its 'x' is lost on the way.)
      _fs().pipe_file(_key(path), data.encode('utf-8'), mode='create')
    except FileExistsError:
      return False
    return True
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.write(data)
  except OSError:
    with contextlib.suppress(OSError):
      os.remove(path)
    raise
  return True


def files_under(directory: str) -> list[str]:
  """Every file under `directory`, as sorted '/'-joined paths relative to it."""
  if not is_remote(directory):
    out = []
    for parent, _, names in os.walk(directory):
      out.extend(os.path.relpath(os.path.join(parent, n), directory) for n in names)
    return sorted(out)
  key = _key(directory)
  return sorted(posixpath.relpath(p, key) for p in _fs().find(key))


def objects(url: str) -> tuple[bool, dict[str, dict]]:
  """A gs:// URL's objects with their metadata (gcsfs's info: size, generation, md5Hash, crc32c): (True, {base
  name: info}) for one object, else (False, {name relative to the prefix: info}) for every object under it ({}
  where there is none; console 'folder/' placeholders left out). Raises FileNotFoundError for neither."""
  fs, key = _fs(), _key(url)
  try:
    info = fs.info(key)
    if info.get('type') == 'file':
      return True, {posixpath.basename(key): info}
    found = fs.find(key, detail=True)
  except FileNotFoundError:
    found = {}
  return False, {posixpath.relpath(name, key): info for name, info in found.items()
                 if info.get('type') == 'file' and not name.endswith('/')}


def download(url: str, local_path: str, *, generation: str | None = None) -> None:
  """One streamed GET of the gs:// object `url` into `local_path`; with `generation`, of that generation only
  (FileNotFoundError if the object was replaced or deleted since: never a mix of two)."""
  _fs().get_file(_key(url), local_path, generation=generation)


def total_bytes(directory: str) -> int:
  """The size of every file under `directory`."""
  if is_remote(directory):
    return int(_fs().du(_key(directory), total=True))
  return sum(os.path.getsize(os.path.join(directory, n)) for n in files_under(directory))


def put_dir(local_dir: str, path: str, *, commit: str | None = None) -> None:
  """Copies the local directory `local_dir` to `path` (a bucket prefix or a local directory), replacing it.

  On a bucket the copy is object by object. `commit` names the file that readers open first (a Hugging Face
  directory's config.json): it is removed before anything else and uploaded last, so a copy cut short leaves a
  directory that readers refuse (no such file), never a mix of old and new files that they would load.
  """
  if is_remote(path):
    fs = _fs()
    if commit is not None:
      with contextlib.suppress(FileNotFoundError):
        remove(join(path, commit))
    rmtree(path)
    names = files_under(local_dir)
    for name in sorted(names, key=lambda n: n == commit):
      fs.put_file(os.path.join(local_dir, name), f'{_key(path)}/{name}')
    return
  if os.path.exists(path):
    shutil.rmtree(path)
  shutil.copytree(local_dir, path)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
  """A local directory holding `path`'s files: `path` itself when local, else a temporary download."""
  if not is_remote(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix='jaxsft-') as tmp:
    fs = _fs()
    for name in files_under(path):
      target = os.path.join(tmp, name)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      fs.get_file(f'{_key(path)}/{name}', target)
    yield tmp


@contextlib.contextmanager
def staged_dir(path: str, *, commit: str | None = None) -> Iterator[str]:
  """A local directory to write `path`'s files into (for writers that only write locally: save_pretrained).

  Local: `path + '.tmp'`, renamed onto `path` when the block ends (a killed writer never leaves a torn `path`).
  Remote: a temporary directory, uploaded to `path` when the block ends (`put_dir`, with `commit`). Nothing is
  written if the block raises.
  """
  if is_remote(path):
    with tempfile.TemporaryDirectory(prefix='jaxsft-') as tmp:
      yield tmp
      put_dir(tmp, path, commit=commit)
    return
  tmp = path + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(path):
    shutil.rmtree(path)
  os.replace(tmp, path)
