"""Command line: python -m jaxsft.train --config configs/NAME.py[:ARG] [--config.FIELD=VALUE ...].

Bad input (an unknown or mistyped config field, a missing config file, a missing path, a malformed
dataset row) ends the run with one `error: ...` line on stderr and exit status 2, before any
compilation.

A multi-process run (TPU pod, SLURM job, or the JAXSFT_COORDINATOR_ADDRESS / JAXSFT_NUM_PROCESSES /
JAXSFT_PROCESS_ID variables) joins its jax.distributed cluster first (jaxsft/distributed.py).

A run whose output_dir holds checkpoints resumes from the newest complete one. SIGTERM or SIGINT saves a
checkpoint at the next step boundary and exits with status 128 + the signal's number (143, 130); a failed
checkpoint write exits with status 1, earlier checkpoints intact.
"""

import gc
import os
import signal
import sys
import threading

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_dict
from ml_collections import config_flags

from jaxsft.errors import InputError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/NAME.py[:ARG]).',
                                          lock_config=True)


def _sigint(signum, frame):  # pylint: disable=unused-argument
  """Ctrl-C → KeyboardInterrupt, except inside a garbage-collector callback (jax registers one) or a `__del__`,
  where Python would drop the exception as unraisable and the run would go on (measured: half the Ctrl-Cs of a
  busy start-up were lost): there, the signal is sent again 50 ms later."""
  codes = {getattr(callback, '__code__', None) for callback in gc.callbacks}
  while frame is not None:
    if frame.f_code in codes or frame.f_code.co_name == '__del__':
      threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
      return
    frame = frame.f_back
  raise KeyboardInterrupt


def fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with config errors (unknown field, bad value, missing file) as one line each."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    cause = _input_error(e)
    fail(str(cause) if cause else _flag_error_message(e))
  except SyntaxError as e:
    fail(f'--config {e.filename} line {e.lineno}: {e.msg}')
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    cause = _input_error(e)
    fail(str(cause) if cause else f'--config: {_flag_error_message(e)}')
  if flags.FLAGS['config'].present == 0 and flags.FLAGS.config is None:
    fail('--config is required, e.g. --config configs/tiny.py')
  return rest


def _input_error(e: BaseException) -> InputError | None:
  """The innermost InputError in `e`'s chain (config_flags re-raises get_config()'s with a traceback as message)."""
  found, seen = None, set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, InputError):
      found = e
    e = e.__cause__ or e.__context__
  return found


def _flag_error_message(e: Exception) -> str:
  if isinstance(e, (AttributeError, KeyError)):
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(msg)).
      e = e.args[0]
    text = ' '.join(str(e.args[0] if e.args else e).split())
    return 'unknown config field ' + text.replace("'", '')
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def load_config():
  """Loads the config file (lazily, as config_flags does) turning its failures into one line."""
  filename = flags.FLAGS['config'].config_filename.split(':', 1)[0]  # configs/NAME.py[:ARG]: ARG is get_config's.
  if not os.path.isfile(filename):
    fail(f'--config: no such file {filename!r}')
  config = _CONFIG.value
  if not isinstance(config, config_dict.ConfigDict):  # config_flags defers load errors to first use.
    try:
      config.lock()
    except Exception as e:  # pylint: disable=broad-except
      cause = e.__cause__ or e
      fail(f'--config {filename}: {type(cause).__name__}: {" ".join(str(cause).split())}')
    fail(f'--config {filename}: get_config() must return a ConfigDict')
  return config


def main(argv):
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _sigint)
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  config = load_config()
  from jaxsft import distributed  # pylint: disable=import-outside-toplevel
  try:
    distributed.initialize()  # Before anything touches jax devices.
  except InputError as e:
    fail(str(e))
  from jaxsft import checkpoint, guard, trainer  # Imported here so `--help` and config errors stay fast.
  logging.set_verbosity(logging.ERROR)  # Orbax logs every save step (INFO) and read-only opens (WARNING).
  try:
    trainer.run(config)
  except InputError as e:
    fail(str(e))
  except (checkpoint.CheckpointError, guard.NonFiniteError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except trainer.Preempted as e:  # A checkpoint was saved: exit as the signal would have (128 + its number).
    print(f'preempted: {e}', file=sys.stderr)
    sys.exit(128 + e.signum)
  except KeyboardInterrupt:  # Ctrl-C before the loop took SIGINT over (data pass, model load), or a second one.
    print('error: interrupted (Ctrl-C); checkpoints already written are kept', file=sys.stderr)
    sys.exit(128 + signal.SIGINT)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
