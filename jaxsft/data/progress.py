"""Progress lines for long data passes: rows done, rows/s and the time left, a line every few seconds.

A pass that ends within `FIRST_SECONDS` prints nothing; a longer one prints a line after that, then one every
`EVERY_SECONDS`, then a closing line with its total time. The rate (and so the time left) is measured from the
first rows done, so the start-up of worker processes does not skew it. Lines go through the `log` function given
(the trainer's: process 0 only, on stderr): plain lines, which read well in a terminal and in a batch job's log.
"""

import time
from collections.abc import Callable

FIRST_SECONDS = 2.0  # A pass shorter than this logs nothing.
EVERY_SECONDS = 5.0


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return f'{hours}:{rest // 60:02d}:{rest % 60:02d}' if hours else f'{rest // 60}:{rest % 60:02d}'


class Progress:
  """Counts the rows of a pass (`add`) and logs how far it is at a modest rate; `close` ends it."""

  def __init__(self, what: str, total: int, log: Callable[[str], None] | None, *, first: float | None = None,
               every: float | None = None, clock: Callable[[], float] = time.monotonic):
    self.what, self.total, self.done = what, total, 0
    self._log, self._clock = log, clock
    self._every = EVERY_SECONDS if every is None else every
    self._start = clock()
    self._next = self._start + (FIRST_SECONDS if first is None else first)
    self._first = None  # (time, rows) at the first `add`: the rate leaves out start-up (spawning workers).
    self.shown = 0  # Lines logged so far.

  def add(self, rows: int) -> None:
    self.done += rows
    if self._log is None:
      return
    now = self._clock()
    if self._first is None and rows:
      self._first = (now, self.done)
    if now >= self._next and self.done < self.total:
      text = f'{self.what}: {self.done:,} of {self.total:,} rows ({self.done / max(self.total, 1):.0%})'
      seconds, rows_since = (now - self._first[0], self.done - self._first[1]) if self._first else (0, 0)
      if seconds > 0 and rows_since > 0:
        rate = rows_since / seconds
        text += f', {rate:,.0f} rows/s, about {_duration((self.total - self.done) / rate)} left'
      self._log(text)
      self.shown += 1
      self._next = now + self._every

  def close(self) -> None:
    """The closing line (rows and time), if the pass was long enough to log progress."""
    if self._log is not None and self.shown:
      elapsed = self._clock() - self._start
      self._log(f'{self.what}: done, {self.done:,} rows in {_duration(elapsed)} '
                f'({self.done / elapsed if elapsed > 0 else 0:,.0f} rows/s)')
      self.shown = 0
