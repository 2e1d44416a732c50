"""The subprocess side of tests/test_checkpoint_mesh.py.

  python -m tests.helpers.checkpoint_process reshard MODEL_DIR DATA_FILE OUT_DIR
      On 8 simulated CPU devices: trains 6 steps on mesh fsdp=8 (checkpoints at steps 3 and 6), restores
      checkpoint 3 as the trainer does (runs.restore_state) into fsdp=8, fsdp=4 × tensor=2 and a 1-device mesh,
      then resumes the run from checkpoint 3 on fsdp=4 × tensor=2. Writes OUT_DIR/restored_MESH.npz (every array of the
      restored state, gathered to the host), OUT_DIR/hf_step{3,6}.npz (the restored parameters as Hugging Face
      tensors) and OUT_DIR/result.json (per mesh and array: spec, mesh shape, device count).

  python -m tests.helpers.checkpoint_process train SIGTERM_AT_STEP SLOW_SECONDS [jaxsft.train flags...]
      `python -m jaxsft.train` itself, except that when SIGTERM_AT_STEP > 0, process 1 (only) prints SENT + the
      step to stderr and sends itself SIGTERM as the loop fetches that step's batch, and from then on every
      process sleeps SLOW_SECONDS per step (the data loader is slow; the math is unchanged), so that jax's
      preemption sync point, within about a second of the signal, falls well before the end of the run.
"""

import json
import os
import signal
import sys
import time

MESHES = {'fsdp8': {'data': 1, 'fsdp': 8, 'tensor': 1}, 'fsdp4_tensor2': {'data': 1, 'fsdp': 4, 'tensor': 2},
          'one_device': {'data': 1, 'fsdp': 1, 'tensor': 1}}
TOTAL_STEPS = 6
RESUME_STEP = 3
SENT = 'checkpoint_process: SIGTERM to this process at step '


def _config(model_dir: str, data_file: str, output_dir: str, mesh: dict, **overrides):
  from tests.helpers import runs  # pylint: disable=import-outside-toplevel
  return runs.config(model_name_or_path=model_dir, dataset_name=data_file, output_dir=output_dir, bf16=False,
                     gradient_checkpointing=False, disable_tqdm=True, learning_rate=3e-3, max_length=96,
                     per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=TOTAL_STEPS,
                     save_steps=RESUME_STEP, logging_steps=1, assistant_only_loss=True, warmup_steps=1,
                     weight_decay=0.1, seed=0, mesh=mesh, **overrides)


def _flat(tree) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _describe(state) -> dict:
  """Per array: the PartitionSpec, the shape of the mesh it lives on and how many devices hold it."""
  out = {}
  for name, x in _flat(state).items():
    spec = [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
    out[name] = {'spec': spec, 'mesh': dict(x.sharding.mesh.shape), 'num_devices': len(x.sharding.device_set)}
  return out


def reshard(model_dir: str, data_file: str, out_dir: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_num_cpu_devices', 8)
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jaxsft import checkpoint  # pylint: disable=import-outside-toplevel
  from jaxsft import sharding  # pylint: disable=import-outside-toplevel
  from jaxsft.models import hf  # pylint: disable=import-outside-toplevel
  from jaxsft.models import hf_config  # pylint: disable=import-outside-toplevel
  from tests.helpers import runs  # pylint: disable=import-outside-toplevel

  trained = _config(model_dir, data_file, os.path.join(out_dir, 'fsdp8'), MESHES['fsdp8'])
  runs.run(trained)
  root = checkpoint.root_of(trained.output_dir)
  model_cfg = runs.model_config(trained, hf_config.read_hf_config(model_dir))
  tx, _ = runs.make_optimizer(trained, total_steps=TOTAL_STEPS)
  manager = checkpoint.Manager(root, read_only=True)
  result = {'steps': manager.steps(), 'restored': {}}
  manager.close()
  for name, mesh_cfg in MESHES.items():
    devices = jax.devices()[:1] if name == 'one_device' else None
    mesh = sharding.make_mesh(mesh_cfg, devices=devices)
    state, _, graphdef, _ = runs.restore_state((root, RESUME_STEP), model_cfg, tx, mesh)
    result['restored'][name] = _describe(state)
    np.savez(os.path.join(out_dir, f'restored_{name}.npz'), **_flat(sharding.gather_to_host(state)))
    if name == 'one_device':
      for step in (RESUME_STEP, TOTAL_STEPS):
        params = state['params'] if step == RESUME_STEP else runs.restore_state(
            (root, step), model_cfg, tx, mesh)[0]['params']
        model = nnx.merge(graphdef, sharding.gather_to_host(params))
        np.savez(os.path.join(out_dir, f'hf_step{step}.npz'), **hf.to_hf_tensors(model))

  resumed = _config(model_dir, data_file, os.path.join(out_dir, 'resumed'), MESHES['fsdp4_tensor2'],
                    resume_from_checkpoint=os.path.join(root, str(RESUME_STEP)))
  runs.run(resumed)
  with open(os.path.join(out_dir, 'result.json'), 'w', encoding='utf-8') as f:
    json.dump(result, f)


def train(sigterm_at_step: int, slow_seconds: float, flags: list[str]) -> None:
  from absl import app  # pylint: disable=import-outside-toplevel
  from jaxsft import cli  # pylint: disable=import-outside-toplevel
  from jaxsft import train as train_cli  # pylint: disable=import-outside-toplevel
  from tests.helpers import runs  # pylint: disable=import-outside-toplevel

  if sigterm_at_step > 0:

    def signal_and_slow_down(step):  # The step whose batches the loop has just taken (1-based).
      import jax  # pylint: disable=import-outside-toplevel  (initialised by now: the loop runs after it)
      if step == sigterm_at_step and jax.process_index() == 1:
        print(f'{SENT}{step}', file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
      if step > sigterm_at_step:
        time.sleep(slow_seconds)

    runs.on_step(None, signal_and_slow_down)
  app.run(train_cli.main, argv=[sys.argv[0], *flags], flags_parser=cli.parse_flags)


def main(argv: list[str]) -> None:
  command, *args = argv
  if command == 'reshard':
    reshard(*args)
  elif command == 'train':
    train(int(args[0]), float(args[1]), args[2:])
  else:
    raise SystemExit(f'unknown command {command!r}')


if __name__ == '__main__':
  main(sys.argv[1:])
