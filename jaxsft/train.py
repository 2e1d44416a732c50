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
from absl import logging

from jaxsft import cli
from jaxsft.errors import InputError

cli.define_config_flag()  # --config configs/NAME.py[:ARG] [--config.FIELD=VALUE ...]


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


def main(argv):
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _sigint)
  cli.no_arguments(argv)
  config = cli.load_config()
  from jaxsft import distributed  # pylint: disable=import-outside-toplevel
  try:
    distributed.initialize()  # Before anything touches jax devices.
  except InputError as e:
    cli.fail(str(e))
  from jaxsft import checkpoint, guard, preemption, trainer  # Here: `--help` and config errors stay fast.
  logging.set_verbosity(logging.ERROR)  # Orbax logs every save step (INFO) and read-only opens (WARNING).
  try:
    trainer.run(config)
  except InputError as e:
    cli.fail(str(e))
  except (checkpoint.CheckpointError, guard.NonFiniteError) as e:
    cli.fail(str(e), status=1)
  except preemption.Preempted as e:  # A checkpoint was saved: exit as the signal would have (128 + its number).
    print(f'preempted: {e}', file=sys.stderr)
    sys.exit(128 + e.signum)
  except KeyboardInterrupt:  # Ctrl-C before the loop took SIGINT over (data pass, model load), or a second one.
    cli.fail('interrupted (Ctrl-C); checkpoints already written are kept', status=128 + signal.SIGINT)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
