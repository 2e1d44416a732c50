"""SIGTERM / SIGINT during training: a checkpoint at the next step boundary, then a clean stop.

`Preemption` notes the signal (one process) or relays it through jax's preemption sync service (several
processes, which must all save the same step); the loop's checkpoint action asks `reached(step)` after every
step and raises `Preempted` once the checkpoint is written. Rerunning the same command resumes.
"""

import os
import signal
import threading

import jax

from jaxsft import metrics as metrics_lib

log = metrics_lib.log


class Preempted(Exception):
  """Training stopped on SIGTERM/SIGINT after saving a checkpoint; rerunning the command resumes it."""

  def __init__(self, signum: int, step: int, where: str):
    self.signum, self.step = signum, step
    super().__init__(f'stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved in {where!r}; '
                     'run the same command again to resume')


class Preemption:
  """SIGTERM / SIGINT → a checkpoint at the next step boundary, then a clean stop (TPU spot, SLURM, Ctrl-C).

  One process: a Python handler notes the signal. Several processes must all save at the same step, so the
  notice goes through jax's preemption sync service instead: `jax.distributed.initialize` installs its own
  SIGTERM handler, the service propagates the notice to every process and agrees on the first step they can
  all reach (`reached_preemption_sync_point`, called once per step on every process); SIGINT is forwarded to
  it as a SIGTERM. A second SIGINT stops the process at once; so does a second SIGTERM, except with several
  processes before the agreed step (jax's handler absorbs it, as it absorbs a SIGTERM outside the loop: use
  SIGKILL then). The process that got SIGINT exits with 130, the others with 143.
  """

  def __init__(self):
    self.signum = None
    self._multi = jax.process_count() > 1
    self._previous = {}
    if threading.current_thread() is not threading.main_thread():
      log('not on the main thread: SIGTERM/SIGINT will not save a checkpoint')
      return
    for signum in (signal.SIGINT,) if self._multi else (signal.SIGINT, signal.SIGTERM):
      self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.signum is not None:  # The second signal: stop now.
      raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
    self.signum = signum
    log(f'{signal.Signals(signum).name}: saving a checkpoint at the next step boundary (again to stop at once)')
    if self._multi:
      os.kill(os.getpid(), signal.SIGTERM)  # To jax's preemption notifier, which tells the other processes.

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step` (all processes get the same answer at the same step)."""
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      if multihost_utils.reached_preemption_sync_point(step):
        self.signum = self.signum or signal.SIGTERM
        # jax's handler absorbs every later SIGTERM; from here on one should stop the process, as documented.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        return True
      return False
    return self.signum is not None

  def close(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}
