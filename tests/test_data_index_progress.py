"""The length pass over a big dataset: progress lines, and Ctrl-C that stops it at once (workers included) without
leaving a cache file behind. (Through the real command line: tests/test_data_cli.py.)"""

import multiprocessing
import os
import signal
import time

import numpy as np
import pytest
import transformers

from jaxsft.data import index as index_lib
from jaxsft.data import interrupt as interrupt_lib
from jaxsft.data import progress as progress_lib
from jaxsft.data import sources

TINY = os.path.join(os.path.dirname(index_lib.__file__), '..', 'assets', 'tiny')


@pytest.fixture(scope='module')
def tiny():
  return transformers.AutoTokenizer.from_pretrained(TINY)


def _rows(n: int) -> sources.RowList:
  return sources.RowList([{'messages': [{'role': 'user', 'content': f'What is {i} + 1?'},
                                        {'role': 'assistant', 'content': f'It is {i + 1}.'}]} for i in range(n)],
                         'rows', 'train')


def _options() -> index_lib.Options:
  return index_lib.Options(fmt='messages', max_length=64, assistant_only_loss=False, completion_only_loss=None,
                           dataset_text_field='text')


class Clock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_progress_lines_rate_and_time_left():
  clock, lines = Clock(), []
  progress = progress_lib.Progress('data: tokenizing x', 1000, lines.append, first=2.0, every=5.0, clock=clock)
  clock.now += 1.0
  progress.add(100)  # Within the first 2 s: silent; the rate is measured from here.
  clock.now += 1.0
  progress.add(100)
  assert lines == ['data: tokenizing x: 200 of 1,000 rows (20%), 100 rows/s, about 0:08 left']
  clock.now += 1.0
  progress.add(100)  # Within 5 s of the last line: silent.
  assert len(lines) == 1
  clock.now += 4.0
  progress.add(100)
  assert lines[-1] == 'data: tokenizing x: 400 of 1,000 rows (40%), 50 rows/s, about 0:12 left'
  clock.now += 5.0
  progress.add(600)  # The last rows: no progress line, the closing line says it all.
  progress.close()
  assert lines[-1] == 'data: tokenizing x: done, 1,000 rows in 0:12 (83 rows/s)' and len(lines) == 3


def test_a_short_pass_is_silent_and_the_first_rows_give_no_rate():
  clock, lines = Clock(), []
  progress = progress_lib.Progress('p', 10, lines.append, clock=clock)
  progress.add(5)
  progress.close()
  assert not lines
  progress = progress_lib.Progress('p', 10**6, lines.append, clock=clock)
  clock.now += 3600 * 3
  progress.add(5)  # Workers that took long to start: no rate yet.
  assert lines == ['p: 5 of 1,000,000 rows (0%)']
  clock.now += 5
  progress.add(5)
  assert lines[-1] == 'p: 10 of 1,000,000 rows (0%), 1 rows/s, about 277:46:30 left'


def test_build_index_logs_progress_of_a_long_pass(tiny, monkeypatch):
  monkeypatch.setattr(progress_lib, 'FIRST_SECONDS', 0.0)
  monkeypatch.setattr(progress_lib, 'EVERY_SECONDS', 0.0)
  monkeypatch.setattr(index_lib, '_CHUNK', 10)
  lines = []
  index = index_lib.build_index(_rows(35), tiny, _options(), skip_bad_rows=False, log=lines.append)
  assert len(index.kept) == 35
  what = "data: tokenizing rows split 'train'"
  assert lines[0] == f'{what}: 10 of 35 rows (29%)'  # The first chunk: no rate yet.
  assert lines[1].startswith(f'{what}: 20 of 35 rows (57%), ') and 'rows/s, about' in lines[1]
  assert lines[2].startswith(f'{what}: 30 of 35 rows (86%), ')
  assert len(lines) == 4 and lines[3].startswith(f'{what}: done, 35 rows in ')


def _interrupt_on_first_progress(line: str) -> None:
  raise KeyboardInterrupt(line)


@pytest.mark.slow
def test_ctrl_c_stops_the_worker_pool_at_once_and_caches_nothing(tiny, monkeypatch, tmp_path):
  monkeypatch.setattr(progress_lib, 'FIRST_SECONDS', 0.0)
  monkeypatch.setattr(index_lib, '_MIN_ROWS_FOR_WORKERS', 1)
  monkeypatch.setattr(index_lib, '_CHUNK', 4)  # 750 tasks: far from done at the first progress line.
  t0 = time.monotonic()
  with pytest.raises(KeyboardInterrupt):
    index_lib.build_index(_rows(3000), tiny, _options(), skip_bad_rows=False, num_workers=2,
                          cache_dir=str(tmp_path), log=_interrupt_on_first_progress)
  assert time.monotonic() - t0 < 60  # Worker start-up included; the rest of the pass would take far longer.
  assert not multiprocessing.active_children()  # Terminated and reaped, not left running their queue.
  assert not list(tmp_path.iterdir())
  # The pool still works after an interrupted one, and the pass then caches its index.
  index = index_lib.build_index(_rows(40), tiny, _options(), skip_bad_rows=False, num_workers=2,
                                cache_dir=str(tmp_path))
  assert len(index.kept) == 40 and len(list(tmp_path.glob('index-*.npz'))) == 1


def test_an_interrupted_cache_write_leaves_no_file(tmp_path, monkeypatch):
  index = index_lib.Index(np.ones(3, np.int32), np.ones(3, np.int32), np.ones(3, np.uint8))

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(np, 'savez', interrupted)
  with pytest.raises(KeyboardInterrupt):
    index_lib._save_cached(str(tmp_path / 'index-x.npz'), index)  # pylint: disable=protected-access
  assert not list(tmp_path.iterdir())
  monkeypatch.undo()
  index_lib._save_cached(str(tmp_path / 'index-x.npz'), index)  # pylint: disable=protected-access
  assert [p.name for p in tmp_path.iterdir()] == ['index-x.npz']


def test_ctrl_c_is_noted_and_raised_between_chunks(tiny, monkeypatch):
  """A real SIGINT during a serial pass: noted by the pass's handler, raised at the next chunk boundary (never
  inside whatever Python code it lands in, such as jax's garbage-collector callback, which would drop it)."""
  monkeypatch.setattr(progress_lib, 'FIRST_SECONDS', 0.0)
  monkeypatch.setattr(index_lib, '_CHUNK', 10)
  chunks = []

  def log(line):
    chunks.append(line)
    if len(chunks) == 1:
      os.kill(os.getpid(), signal.SIGINT)

  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  with pytest.raises(KeyboardInterrupt):
    index_lib.build_index(_rows(200), tiny, _options(), skip_bad_rows=False, log=log)
  assert len(chunks) == 1  # Raised before the next chunk's line.
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Restored.


def test_interruptible_notes_then_raises_and_leaves_other_handlers_alone():
  with pytest.raises(KeyboardInterrupt):
    with interrupt_lib.Interruptible() as interrupt:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.01)  # The handler has run: noted, not raised.
      assert interrupt.requested
      interrupt.check()
  with pytest.raises(KeyboardInterrupt):  # Noted after the last check: raised on the way out, not lost.
    with interrupt_lib.Interruptible():
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.01)
  with pytest.raises(KeyboardInterrupt):  # A second Ctrl-C raises at once.
    with interrupt_lib.Interruptible():
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.01)
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
      pytest.fail('not raised')
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    with interrupt_lib.Interruptible() as interrupt:  # An ignored SIGINT (a background job) stays ignored.
      assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.01)
      interrupt.check()
  finally:
    signal.signal(signal.SIGINT, previous)


def _sigint_blocked() -> bool:
  return signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])


@pytest.mark.skipif(not hasattr(signal, 'pthread_sigmask'), reason='no signal masks')
def test_processes_spawned_while_blocked_start_with_sigint_blocked():
  context = multiprocessing.get_context('spawn')
  with interrupt_lib.blocked_while_spawning():
    with context.Pool(1) as pool:
      assert pool.apply(_sigint_blocked)
  assert not _sigint_blocked()
