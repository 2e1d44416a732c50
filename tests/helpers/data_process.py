"""One process of the two-process data test (tests/test_multiprocess_data.py); run as a script.

argv: PORT PROCESS_ID DATA_FILE OUT_JSON. Joins a 2-process jax.distributed CPU cluster (2 devices each),
builds the index (each process tokenizes half, all-gather), iterates two epochs of packed steps while
recording every row it reads, assembles global batches with make_array_from_process_local_data, and checks a
mid-epoch loader restore. Writes what it saw as JSON for the parent to compare.
"""

import hashlib
import json
import os
import sys

import jax
import numpy as np

PER_DEVICE_BATCH = 2


def main(port: str, process_id: str, data_file: str, out: str) -> None:
  jax.config.update('jax_num_cpu_devices', 2)
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=int(process_id))
  import transformers  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from jaxsft import sharding  # pylint: disable=import-outside-toplevel
  from jaxsft.data import index as index_lib  # pylint: disable=import-outside-toplevel
  from jaxsft.data import pipeline  # pylint: disable=import-outside-toplevel
  from jaxsft.data import splits as splits_lib  # pylint: disable=import-outside-toplevel

  assets = os.path.join(os.path.dirname(sharding.__file__), 'assets', 'tiny')
  tokenizer = transformers.AutoTokenizer.from_pretrained(assets)
  source = Recording(splits_lib.load_splits(dataset_name=data_file, dataset_config=None, dataset_train_split='train',
                                            dataset_test_split=None, need_eval=False).train)
  options = index_lib.Options(fmt='messages', max_length=96, assistant_only_loss=True, completion_only_loss=None,
                              dataset_text_field='text')
  index = index_lib.build_index(source, tokenizer, options, skip_bad_rows=False, process_index=jax.process_index(),
                                process_count=jax.process_count())
  index_reads = sorted(source.reads)

  # Only process 0 has a cached index (built alone, no collective): both must still agree and rebuild.
  cache = f'{out}.cache'
  if jax.process_index() == 0:
    index_lib.build_index(source, tokenizer, options, skip_bad_rows=False, cache_dir=cache)
  cached = index_lib.build_index(source, tokenizer, options, skip_bad_rows=False, cache_dir=cache,
                                 process_index=jax.process_index(), process_count=jax.process_count())
  cache_ok = cached.lengths.tolist() == index.lengths.tolist()
  plan = pipeline.make_plan(index, seq_len=96, pack=True)
  micro = PER_DEVICE_BATCH * jax.device_count()
  geometry = pipeline.Geometry.create(len(plan), micro, 2, 2.0, -1)
  steps = pipeline.StepSource(source, tokenizer, options, plan, geometry, seed=5, shuffle=True,
                              pad_id=tokenizer.pad_token_id, process_index=jax.process_index(),
                              process_count=jax.process_count())
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  reads, digests, targets = [], [], []
  for epoch in range(2):
    source.reads.clear()
    for s in range(epoch * geometry.steps_per_epoch, (epoch + 1) * geometry.steps_per_epoch):
      element = steps[s]
      targets.append(element['num_targets'])
      for batch in element['micro_batches']:
        global_batch = sharding.global_batch(mesh, batch)
        whole = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in global_batch.items()}
        digests.append(digest(whole))
    reads.append(sorted(source.reads))

  loader = pipeline.Loader(steps)
  reference = [digest_step(e) for e in loader]
  loader = pipeline.Loader(steps)
  first = [digest_step(next(loader)) for _ in range(3)]
  state = loader.get_state()
  restored = pipeline.Loader(steps)
  restored.set_state(state)
  resumed = first + [digest_step(e) for e in restored]

  with open(out, 'w', encoding='utf-8') as f:
    json.dump({'index_reads': index_reads, 'lengths': index.lengths.tolist(), 'flags': index.flags.tolist(),
               'reads': reads, 'digests': digests, 'targets': targets, 'resume_ok': resumed == reference,
               'steps': len(steps), 'devices': jax.device_count(), 'cache_ok': cache_ok}, f)
  jax.distributed.shutdown()


class Recording:
  """Wraps a Source and records the row indices read."""

  def __init__(self, source):
    self.source, self.reads, self.name = source, [], source.name

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    self.reads.append(int(i))
    return self.source[i]

  def origin(self, i):
    return self.source.origin(i)

  def column_names(self):
    return self.source.column_names()

  def fingerprint(self):
    return self.source.fingerprint()


def digest(batch: dict) -> str:
  h = hashlib.sha256()
  for key in sorted(batch):
    h.update(key.encode())
    h.update(np.ascontiguousarray(batch[key], np.int32).tobytes())
  return h.hexdigest()


def digest_step(element: dict) -> str:
  return '/'.join([digest(b) for b in element['micro_batches']] + [str(element['num_targets'])])


if __name__ == '__main__':
  main(*sys.argv[1:])
