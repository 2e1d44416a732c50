"""Run by tests/test_checkpoint.py as a separate process.

`python -m tests.helpers.kill_in_save CONFIG_JSON STEP`: trains with the base config updated by CONFIG_JSON and
kills itself with SIGKILL right after checkpoint STEP's save has started (the arrays are being written in the
background, the checkpoint is not complete).

`python -m tests.helpers.kill_in_save --check OUTPUT_DIR`: prints {"complete": [steps], "restored": step} after
exporting the newest complete checkpoint (which reads every parameter back).
"""

import json
import os
import signal
import sys
import tempfile


def train_and_kill(overrides: str, step: str) -> None:
  from jaxsft import checkpoint  # pylint: disable=import-outside-toplevel
  from tests.helpers import runs  # pylint: disable=import-outside-toplevel

  original = checkpoint.Manager.save

  def save_then_die(self, at_step, state, meta):
    original(self, at_step, state, meta)
    if at_step == int(step):
      os.kill(os.getpid(), signal.SIGKILL)

  checkpoint.Manager.save = save_then_die
  runs.run(runs.config(**json.loads(overrides)))
  raise SystemExit('the run finished without reaching the kill')


def check(output_dir: str) -> None:
  from jaxsft import checkpoint  # pylint: disable=import-outside-toplevel
  from jaxsft import export  # pylint: disable=import-outside-toplevel
  root = checkpoint.root_of(output_dir)
  complete = checkpoint._complete_steps(root)  # pylint: disable=protected-access
  with tempfile.TemporaryDirectory() as tmp:
    export.export_checkpoint(output_dir, os.path.join(tmp, 'hf'), dtype='float32')
  print(json.dumps({'complete': complete, 'restored': checkpoint.locate(output_dir)[1]}))


if __name__ == '__main__':
  if sys.argv[1] == '--check':
    check(sys.argv[2])
  else:
    train_and_kill(*sys.argv[1:])
