"""Batches on the devices ahead of the step that needs them: a background thread per process.

`Prefetcher` iterates a data Loader's optimizer steps with their micro-batches already turned into global
arrays on the mesh (jaxsft/sharding.py `global_batch`: host → device copies, no collective), while the loop runs
the steps before them. Used by the training loop and by the eval-loss pass.
"""

import dataclasses
import queue
import threading

from jaxsft import sharding
from jaxsft.data import pipeline

PREFETCH_STEPS = 2  # Optimizer steps whose batches wait on the devices ahead of the running one.


class Prefetcher:
  """Iterates a Loader's steps with their micro-batches already on the devices, `depth` steps ahead.

  A background thread pulls each step from the loader and turns its micro-batches into global arrays
  (`sharding.global_batch`: host → device transfers, no collective), while the main thread dispatches and
  runs the steps before it; a bounded queue keeps at most `depth` steps waiting (and the thread builds one
  more). Every process runs one such thread over its own loader, in step order, so all processes build the
  same steps' arrays in the same order. Yields `(element, global micro-batches, loader state)`, where the
  state is the loader's after that step: the state of the steps *consumed*, which is what a checkpoint must
  save (the loader itself is ahead by the prefetched steps). An error in the thread (bad data) is raised by
  the `__next__` that reaches its step. `depth=0`: no thread; each step is loaded and transferred when asked.
  """

  _END = object()

  def __init__(self, loader: pipeline.Loader, mesh, depth: int = PREFETCH_STEPS):
    self._loader, self._mesh = loader, mesh
    self._done = False
    self._thread = None
    if depth > 0:
      self._queue = queue.Queue(maxsize=depth)
      self._stop = threading.Event()
      self._thread = threading.Thread(target=self._fill, name='jaxsft-prefetch', daemon=True)
      self._thread.start()

  def _load(self):
    """The loader's next step, placed on the devices (StopIteration at the end)."""
    element = next(self._loader)
    state = self._loader.get_state()
    return element, [sharding.global_batch(self._mesh, batch) for batch in element['micro_batches']], state

  def _fill(self) -> None:
    try:
      while self._put(self._load()):
        pass
    except StopIteration:
      self._put(self._END)
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the consuming thread)
      self._put(_Failure(e))

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def __iter__(self):
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    if self._thread is None:
      try:
        return self._load()
      except StopIteration:
        self._done = True
        raise
    item = self._queue.get()
    if item is self._END:
      self._done = True
      raise StopIteration
    if isinstance(item, _Failure):
      self._done = True
      raise item.error
    return item

  def close(self) -> None:
    """Stops the thread (it finishes the step it is building) and drops the prefetched steps."""
    self._done = True
    if self._thread is None:
      return
    self._stop.set()
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=60)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


@dataclasses.dataclass
class _Failure:
  error: BaseException
