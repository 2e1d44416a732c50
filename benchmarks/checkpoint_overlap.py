"""Checkpoint save time, and how much of it training hides (Orbax asynchronous saves).

Usage (from the repository root):

  python benchmarks/checkpoint_overlap.py                     # the tiny default model (configs/tiny.py)
  python benchmarks/checkpoint_overlap.py --hidden-size 512 --layers 8 --intermediate-size 1536
  python benchmarks/checkpoint_overlap.py --gcs-emulator      # + the same saves to a bucket (fake-gcs-server)

The model is configs/tiny.py's Qwen2 architecture (optionally widened), random weights, float32, the
trainer's own state (parameters + MultiSteps/AdamW state), train step and checkpoint manager; batches are
random tokens (what a step computes does not depend on what they say). Measured, after compilation:

* train: N optimizer steps without saving.
* sync save: one checkpoint written start to finish while nothing else runs (save + wait), the mean of a
  few: what a synchronous checkpoint would cost the loop.
* blocking: the time `save` holds the loop (device→host copy and starting the write), per save, once the
  step that produced the state has finished.
* async: the same N steps saving every K steps (the trainer's path), plus the wait for the last write.
* overhead per save = (async - train) / saves; hidden = 1 - overhead / sync save.
* checksums: the part of a sync save spent hashing its files (jaxsft/integrity.py, in the background thread),
  and the time to verify a checkpoint before a restore.
"""

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=60, help='optimizer steps per timed loop')
  parser.add_argument('--save-every', type=int, default=10, help='steps between checkpoints in the async loop')
  parser.add_argument('--batch', type=int, default=32, help='rows per step')
  parser.add_argument('--length', type=int, default=128, help='tokens per row')
  parser.add_argument('--hidden-size', type=int, default=None, help='widen the tiny model (default: as shipped)')
  parser.add_argument('--intermediate-size', type=int, default=None)
  parser.add_argument('--layers', type=int, default=None)
  parser.add_argument('--workdir', default=None,
                      help='where checkpoints are written, a local directory or gs:// URL (default: a temp dir)')
  parser.add_argument('--gcs-emulator', action='store_true',
                      help='also write them to a bucket on fake-gcs-server (127.0.0.1) and compare with local disk')
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.gcs_emulator:  # Read on import by gcsfs and google-auth: set before anything imports them.
    from tests.helpers import gcs  # pylint: disable=import-outside-toplevel
    os.environ.update(gcs.IMPORT_TIME_ENV)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from absl import logging  # pylint: disable=import-outside-toplevel
  from jaxsft import checkpoint, sharding  # pylint: disable=import-outside-toplevel
  from jaxsft import state as state_lib  # pylint: disable=import-outside-toplevel
  from jaxsft import step as step_lib  # pylint: disable=import-outside-toplevel
  from jaxsft import storage  # pylint: disable=import-outside-toplevel
  from jaxsft.models import hf_config  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs'))
  import tiny  # pylint: disable=import-outside-toplevel

  logging.set_verbosity(logging.ERROR)
  config = tiny.get_config()
  hf_cfg = dict(hf_config.read_hf_config(config.model_name_or_path))
  for key, value in (('hidden_size', args.hidden_size), ('intermediate_size', args.intermediate_size),
                     ('num_hidden_layers', args.layers)):
    if value:
      hf_cfg[key] = value
  if args.layers:
    hf_cfg.pop('layer_types', None)  # Per-layer attention types: the shipped list is for the shipped depth.
  model_cfg = state_lib.model_config(config, hf_cfg)
  mesh = sharding.make_mesh(config.mesh)
  tx, _ = state_lib.make_optimizer(config, total_steps=10 * args.steps)
  state, shardings, graphdef, _ = state_lib.init(config, config.model_name_or_path, model_cfg, tx, mesh)
  num_params = sum(x.size for x in jax.tree.leaves(state['params']))
  rng = np.random.default_rng(0)
  local = {'input_ids': rng.integers(0, model_cfg.vocab_size, (args.batch, args.length), dtype=np.int32),
           'positions': np.tile(np.arange(args.length, dtype=np.int32), (args.batch, 1)),
           'segment_ids': np.ones((args.batch, args.length), np.int32),
           'loss_mask': np.ones((args.batch, args.length), np.int32)}
  work = args.workdir or tempfile.mkdtemp(prefix='jaxsft-ckpt-bench-')
  with jax.set_mesh(mesh):
    batch = sharding.global_batch(mesh, local)
    inv = jnp.float32(1.0 / (args.batch * (args.length - 1)))
    step_fn = step_lib.TrainStep(graphdef, tx, config.model.loss_chunk_size, state_shardings=shardings)

    def train(n, state, manager=None, every=0, at=0):
      blocking = []
      for i in range(n):
        state, _ = step_fn.step(state, batch, inv)
        if manager is not None and (i + 1) % every == 0:
          jax.block_until_ready(state)  # A save waits for the step that produces it: not the save's time.
          t0 = time.perf_counter()
          manager.save(at + i + 1, state, {'bench': True})
          blocking.append(time.perf_counter() - t0)
      jax.block_until_ready(state)
      return state, blocking

    state, _ = train(5, state)  # Warm up.
    t0 = time.perf_counter()
    state, _ = train(args.steps, state)
    t_train = time.perf_counter() - t0

    def saves(work, state):
      """The save figures of checkpoints written under `work` (a local directory or a gs:// URL)."""
      manager = checkpoint.Manager(storage.join(work, 'sync'))
      sync, checksums = [], []
      for k in range(3):
        t0 = time.perf_counter()
        manager.save(k + 1, state, {'bench': True})
        manager.wait()
        sync.append(time.perf_counter() - t0)
        checksums.append(manager.last_save['checksum_seconds'])
      manager.close()
      t0 = time.perf_counter()
      assert checkpoint.verify(storage.join(work, 'sync'), 3) is None
      t_verify = time.perf_counter() - t0
      size = storage.total_bytes(storage.join(work, 'sync', '3'))
      manager = checkpoint.Manager(storage.join(work, 'async'))
      t0 = time.perf_counter()
      state, blocking = train(args.steps, state, manager, args.save_every, at=100)
      manager.wait()
      t_async = time.perf_counter() - t0
      manager.close()
      return state, {'sync': statistics.median(sync), 'n_sync': len(sync), 'blocking': blocking, 'async': t_async,
                     'checksums': statistics.median(checksums), 'verify': t_verify, 'size': size}

    state, figures = saves(work, state)
    if args.gcs_emulator:
      with _emulator() as uri:
        state, remote = saves(uri, state)
  if not args.workdir:
    shutil.rmtree(work, ignore_errors=True)

  print(f'model: {num_params / 1e6:.2f}M parameters (hidden {model_cfg.hidden_size}, {model_cfg.num_layers} layers), '
        f'checkpoint {figures["size"] / 2**20:.1f} MiB; {args.steps} steps of {args.batch} × {args.length} tokens on '
        f'{jax.device_count()} {jax.devices()[0].platform} device(s)')
  print(f'train, no saves           {t_train:8.3f} s  ({t_train / args.steps * 1e3:.1f} ms/step)')
  _report(figures, t_train, args.save_every, 'local disk' if not storage.is_remote(work) else work)
  if args.gcs_emulator:
    _report(remote, t_train, args.save_every, 'gs:// (fake-gcs-server on 127.0.0.1)')
    print(f'gs:// / local disk        sync save {remote["sync"] / figures["sync"]:.1f}×, blocking '
          f'{statistics.median(remote["blocking"]) / statistics.median(figures["blocking"]):.1f}×, '
          f'checksums {remote["checksums"] / figures["checksums"]:.1f}×, verify '
          f'{remote["verify"] / figures["verify"]:.1f}×')


def _report(figures: dict, t_train: float, every: int, where: str) -> None:
  saves = len(figures['blocking'])
  sync_save = figures['sync']
  overhead = (figures['async'] - t_train) / saves
  print(f'--- checkpoints on {where}')
  print(f'sync save (save + wait)   {sync_save:8.3f} s  per checkpoint (median of {figures["n_sync"]})')
  print(f'blocking part of a save   {statistics.median(figures["blocking"]):8.3f} s  per checkpoint (median of {saves})')
  print(f'train, async save every {every:<3d}{figures["async"]:7.3f} s  ({saves} saves, last one waited for)')
  print(f'overhead per async save   {overhead:8.3f} s  = {overhead / sync_save:.0%} of a sync save; '
        f'hidden by training: {1 - overhead / sync_save:.0%}')
  print(f'checksums, per save       {figures["checksums"]:8.3f} s  = '
        f'{figures["checksums"] / sync_save:.0%} of a sync save (in the background thread); '
        f'verifying one before a restore: {figures["verify"]:.3f} s')


@contextlib.contextmanager
def _emulator():
  """gs://BUCKET/bench on fake-gcs-server (the [test] extra's GCS protocol server, tests/helpers/gcs.py) on 127.0.0.1.

  Its client variables are set in this process, before gcsfs and google-auth are imported (they read some on import).
  """
  from tests.helpers import gcs  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory(prefix='jaxsft-gcs-bench-') as directory:
    with gcs.running(directory) as emulator:
      os.environ.update(emulator.env)
      yield emulator.uri('bench')


if __name__ == '__main__':
  main()
