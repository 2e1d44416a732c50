"""What libraries print while a run works goes to a file under the output directory, not to the console.

A failing checkpoint write (a full disk, a lost filesystem) makes Orbax, tensorstore and asyncio print about 190
lines of log records and background-thread tracebacks above jaxsft's one-line error. While a run trains,
`LibraryLog` sends the records of Python's `logging` (absl's included, at the verbosity the CLI set), the
tracebacks of exceptions that end a background thread, and unraisable exceptions to
`OUTPUT_DIR/logs/libraries.log` (`libraries.process_N.log` for process N > 0; on a gs:// output_dir, a local
temporary file uploaded there when the run ends); jaxsft's own lines still go to the console. If that file cannot be written (the disk that failed), the records go to a file in the system's
temporary directory instead. `path` is where they went, for the error line that points to them.
"""

import gc
import logging
import os
import sys
import tempfile
import threading
import traceback

import jax

from jaxsft import storage


class _Sink:
  """The file the records go to, opened on first use, moved to the temporary directory if it cannot be written."""

  def __init__(self, path: str):
    self.path = path
    self.count = 0
    self._file = None
    self._lock = threading.Lock()

  def write(self, text: str) -> None:
    with self._lock:
      self.count += 1
      for attempt in range(2):
        try:
          if self._file is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._file = open(self.path, 'a', encoding='utf-8')  # pylint: disable=consider-using-with
          self._file.write(text if text.endswith('\n') else text + '\n')
          self._file.flush()
          return
        except OSError:
          self.close()
          if attempt == 0:
            fd, self.path = tempfile.mkstemp(prefix='jaxsft-libraries-', suffix='.log')
            os.close(fd)

  def close(self) -> None:
    if self._file is not None:
      try:
        self._file.close()
      except OSError:
        pass
      self._file = None


class _Handler(logging.Handler):

  def __init__(self, sink: _Sink):
    super().__init__()
    self._sink = sink
    self.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))

  def emit(self, record: logging.LogRecord) -> None:
    try:
      self._sink.write(self.format(record))
    except Exception:  # pylint: disable=broad-except  (a log record must never end the run)
      pass


class LibraryLog:
  """Context manager: library output → OUTPUT_DIR/logs/libraries.log while it is active (module docstring)."""

  def __init__(self, output_dir: str):
    index = jax.process_index()
    name = 'libraries.log' if index == 0 else f'libraries.process_{index}.log'
    self._remote = storage.join(output_dir, 'logs', name) if storage.is_remote(output_dir) else None
    if self._remote:  # Appends to a local file; uploaded when the run ends (a bucket has no appends).
      fd, local = tempfile.mkstemp(prefix='jaxsft-libraries-', suffix='.log')
      os.close(fd)
      self._sink = _Sink(local)
    else:
      self._sink = _Sink(os.path.join(output_dir, 'logs', name))
    self._saved = None

  @property
  def path(self) -> str:
    return self._sink.path

  @property
  def count(self) -> int:
    """Records written so far."""
    return self._sink.count

  def __enter__(self) -> 'LibraryLog':
    root = logging.getLogger()
    self._saved = (list(root.handlers), threading.excepthook, sys.unraisablehook)
    for handler in list(root.handlers):
      root.removeHandler(handler)
    root.addHandler(_Handler(self._sink))
    threading.excepthook = self._thread_exception
    sys.unraisablehook = self._unraisable
    return self

  def _thread_exception(self, args) -> None:
    if args.exc_type is SystemExit:
      return
    name = args.thread.name if args.thread is not None else '?'
    self._sink.write(f'exception in thread {name}:\n' +
                     ''.join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))

  def _unraisable(self, unraisable) -> None:
    self._sink.write(f'{unraisable.err_msg or "exception ignored"}: {unraisable.object!r}\n' + ''.join(
        traceback.format_exception(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)))

  def __exit__(self, exc_type, exc, tb) -> None:
    # Futures whose exception nobody retrieved log it when collected: here, into the file. A failing run's
    # exception chain holds the finished frames that reference them: their locals are dropped first.
    seen = set()
    while exc is not None and id(exc) not in seen:
      seen.add(id(exc))
      traceback.clear_frames(exc.__traceback__)
      exc = exc.__cause__ or exc.__context__
    gc.collect()
    handlers, threading.excepthook, sys.unraisablehook = self._saved
    root = logging.getLogger()
    for handler in list(root.handlers):
      root.removeHandler(handler)
    for handler in handlers:
      root.addHandler(handler)
    self._sink.close()
    if self._remote:
      self._upload()

  def _upload(self) -> None:
    """OUTPUT_DIR/logs/NAME on the bucket, if anything was written; else (or if that fails) the local file stays."""
    if self._sink.count:
      try:
        with open(self._sink.path, 'rb') as f:
          storage.write_atomically(self._remote, f.read())
      except Exception:  # pylint: disable=broad-except  (the records stay in the local file `path` names)
        return
    os.remove(self._sink.path)
    self._sink.path = self._remote
