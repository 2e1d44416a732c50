"""Files that several processes read: per-process handles, checked against the file's stat when it was indexed.

A source indexes a file once (`stamp`: its size and modification time) and is then pickled to other processes
(grain workers, the index pass's workers); each process opens its own handle on first use
(`PerProcessHandle`), and a file that changed since it was indexed is an error rather than wrong rows.
"""

import os

from jaxsft.errors import InputError


class PerProcessHandle:
  """A file handle opened lazily in each process (never pickled), checked against the indexed file's stat."""

  def __init__(self, path: str, stamp: tuple[int, int]):
    self.path, self.stamp = path, stamp
    self._handle, self._pid = None, None

  def __getstate__(self):
    return {'path': self.path, 'stamp': self.stamp}

  def __setstate__(self, state):
    self.__init__(state['path'], state['stamp'])

  def get(self, opener):
    """The handle of this process, from `opener(path)` on first use.

    No lock (a lock held by another thread at a fork would deadlock the child): threads racing on the first
    use each open the file, and all but one handle are left to the garbage collector.
    """
    if self._pid != os.getpid():
      try:
        st = os.stat(self.path)
      except OSError as e:
        raise InputError(f'{self.path}: cannot read the file any more ({e.strerror})') from None
      if (st.st_size, st.st_mtime_ns) != self.stamp:
        raise InputError(f'{self.path}: the file changed after it was indexed (size or modification time '
                         'differs); restart the run')
      self._handle = opener(self.path)
      self._pid = os.getpid()  # Set last: a thread that sees this pid sees the handle.
    return self._handle

  def __del__(self):
    if isinstance(getattr(self, '_handle', None), int) and self._pid == os.getpid():
      os.close(self._handle)  # A file descriptor (JSON Lines); parquet readers close themselves.


def stamp(path: str, field: str) -> tuple[int, int]:
  """(size, modification time in ns) of `path`; an InputError naming config field `field` if it cannot be read."""
  try:
    st = os.stat(path)
  except OSError as e:
    raise InputError(f"config field '{field}': cannot read {path!r} ({e.strerror})") from None
  return st.st_size, st.st_mtime_ns
