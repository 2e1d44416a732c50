"""The GCS emulator fixture (tests/helpers/gcs.py) speaks the protocol our libraries use: etils.epath (gcsfs)
reads, writes and lists; Orbax saves and restores a sharded array through tensorstore; nothing lands locally."""

import os

import numpy as np
import pytest

from tests.helpers.gcs import BUCKET
from tests.helpers.gcs import gcs_emulator  # pylint: disable=unused-import  (a fixture)


def test_epath_writes_reads_and_lists(gcs_emulator, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  from etils import epath  # pylint: disable=import-outside-toplevel
  run = epath.Path(gcs_emulator.uri('run'))
  (run / 'metrics.jsonl').write_text('{"step": 1}\n')
  (run / 'hf' / 'config.json').write_text('{}')
  assert (run / 'metrics.jsonl').read_text() == '{"step": 1}\n'
  assert sorted(p.name for p in run.iterdir()) == ['hf', 'metrics.jsonl']
  assert (run / 'hf').is_dir() and not (run / 'nothing').exists()
  # The object is in the server's backend, under the bucket; the working directory holds no 'gs:' folder.
  assert os.path.isfile(os.path.join(gcs_emulator.root, BUCKET, 'run', 'metrics.jsonl'))
  assert not os.path.exists('gs:') and not os.path.exists(BUCKET)


def test_orbax_saves_and_restores_a_sharded_array(gcs_emulator, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  jax = pytest.importorskip('jax')
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from etils import epath  # pylint: disable=import-outside-toplevel
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('fsdp',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('fsdp'))
  array = jax.device_put(np.arange(16, dtype=np.float32).reshape(4, 4), sharding)
  directory = epath.Path(gcs_emulator.uri('run', 'checkpoints'))
  with ocp.CheckpointManager(directory) as manager:
    manager.save(3, args=ocp.args.StandardSave({'w': array}))
    manager.wait_until_finished()
  with ocp.CheckpointManager(directory) as manager:
    assert manager.all_steps() == [3]
    abstract = {'w': jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=sharding)}
    restored = manager.restore(3, args=ocp.args.StandardRestore(abstract))
  np.testing.assert_array_equal(np.asarray(restored['w']), np.asarray(array))
  assert not os.path.exists('gs:') and not os.path.exists(BUCKET)
