"""Checksums of every file of a checkpoint, written with it and verified before anything is restored from it.

`write(directory)` hashes every file under `directory` (xxh3-64, several files at once) into
`directory/checksums.json`; jaxsft's checkpoint manager calls it in Orbax's background save thread, after the
last byte of the checkpoint is written and before Orbax renames the temporary directory to its final name, so a
complete checkpoint always carries its checksums and the training thread never waits for them.
`verify(directory)` hashes the files again and returns the first mismatch (a changed, truncated or missing
file) as one line, or None. Files Orbax itself rewrites after that point (`_CHECKPOINT_METADATA`, its commit
timestamp) or adds (`commit_success.txt`) carry no training state and are not listed.
"""

import concurrent.futures
import json
import posixpath

import xxhash

from jaxsft import storage

FILE = 'checksums.json'
ALGORITHM = 'xxh3_64'
_UNLISTED = frozenset({FILE, '_CHECKPOINT_METADATA', 'commit_success.txt'})
_BLOCK = 8 << 20
_THREADS = 8  # Reads overlap (network filesystems); xxh3 itself runs at memory speed and releases the GIL.


def _files(directory: str) -> list[str]:
  return [n for n in storage.files_under(directory) if posixpath.basename(n) not in _UNLISTED]


def _digest(path: str) -> tuple[int, str]:
  h = xxhash.xxh3_64()
  size = 0
  with storage.open_file(path, 'rb') as f:
    while block := f.read(_BLOCK):
      h.update(block)
      size += len(block)
  return size, h.hexdigest()


def write(directory: str) -> dict:
  """Writes `directory/checksums.json` for every file under `directory`; returns {'files', 'bytes'}."""
  names = _files(directory)
  with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
    digests = list(pool.map(lambda n: _digest(storage.join(directory, n)), names))
  record = {'algorithm': ALGORITHM, 'files': {n: {'size': s, 'hash': h} for n, (s, h) in zip(names, digests)}}
  storage.write_atomically(storage.join(directory, FILE), json.dumps(record, indent=1, sort_keys=True))
  return {'files': len(names), 'bytes': sum(s for s, _ in digests)}


def has_checksums(directory: str) -> bool:
  return storage.isfile(storage.join(directory, FILE))


def verify(directory: str, *, share: tuple[int, int] = (0, 1)) -> str | None:
  """The first problem of `directory` against its checksums.json (one line), or None if every file matches.

  `share=(i, n)`: only every n-th listed file from the i-th (the processes of a run split the reading).
  """
  try:
    listed = json.loads(storage.read_text(storage.join(directory, FILE)))['files']
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f'its {FILE} cannot be read ({type(e).__name__})'
  names = sorted(listed)[share[0]::share[1]]

  def check(name: str) -> str | None:
    path = storage.join(directory, name)
    if not storage.isfile(path):
      return f'file {name} is missing'
    size, digest = _digest(path)
    want = listed[name]
    if size != want.get('size'):
      return f'file {name} has {size} bytes, {want.get("size")} were written'
    if digest != want.get('hash'):
      return f'file {name} does not match its checksum (the bytes changed after they were written)'
    return None

  with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
    for problem in pool.map(check, names):
      if problem:
        return problem
  return None
