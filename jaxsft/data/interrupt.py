"""Ctrl-C during a long data pass, acted on between chunks of work instead of wherever it lands.

Python raises KeyboardInterrupt wherever the main thread happens to be when SIGINT arrives. In a pass that
allocates heavily that is often inside a garbage-collector callback (jax registers one, `_xla_gc_callback`), where
an exception is "unraisable": it is reported (or logged) and dropped, and the pass goes on as if nothing happened.
`Interruptible` notes the signal instead, and `check()`, which the pass calls between chunks (and while it waits
on its workers), raises KeyboardInterrupt from there. A second Ctrl-C raises at once, wherever it lands.

Only the main thread can own SIGINT, and only a Python-level handler is replaced for the pass (Python's default, or
jaxsft.train's, which raises KeyboardInterrupt too), then restored: an ignored SIGINT (a background job) is left
alone.

Worker processes must not react to a Ctrl-C (a terminal sends it to the whole process group): they are spawned
with SIGINT blocked (`blocked_while_spawning`) and ignore it from then on; the parent terminates them.
"""

import contextlib
import signal
import threading


class Interruptible:
  """A context manager: SIGINT is noted while inside it, and raised as KeyboardInterrupt by `check()` (or on exit)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> 'Interruptible':
    if threading.current_thread() is threading.main_thread() and callable(signal.getsignal(signal.SIGINT)):
      self._previous = signal.signal(signal.SIGINT, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.requested:  # The second Ctrl-C: now.
      raise KeyboardInterrupt
    self.requested = True

  def check(self) -> None:
    """Raises KeyboardInterrupt if Ctrl-C was pressed."""
    if self.requested:
      raise KeyboardInterrupt

  def __exit__(self, exc_type, exc, tb) -> bool:
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
      self._previous = None
    if exc_type is None and self.requested:
      raise KeyboardInterrupt  # Pressed after the last check: not lost.
    return False


@contextlib.contextmanager
def blocked_while_spawning():
  """SIGINT blocked in this thread: processes spawned meanwhile start with it blocked (the mask is inherited), so
  a Ctrl-C that reaches the whole process group cannot raise KeyboardInterrupt in them while they start up (a
  traceback each). In this process the signal goes to another thread, or waits for the end of the block, and is
  handled as usual (noted by `Interruptible`). No-op where threads have no signal masks (Windows)."""
  if not hasattr(signal, 'pthread_sigmask'):
    yield
    return
  # The first spawned process of a session starts CPython's resource tracker, whose start-up blocks SIGINT and
  # then *unblocks* it: inside this block, that would undo ours for the workers spawned after it. Started first.
  from multiprocessing import resource_tracker  # pylint: disable=import-outside-toplevel
  resource_tracker.ensure_running()
  previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
  try:
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)
