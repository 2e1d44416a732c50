"""Two real processes (jax.distributed on 127.0.0.1, CPU, gloo) read disjoint shards that cover the dataset.

Each process builds half of the length index (the all-gathered whole equals a one-process index), reads only
its own rows of each epoch (disjoint; together every row, each epoch), and the global batches assembled from
the two processes' rows equal the batches one process would build alone. A loader restored mid-epoch continues
exactly.
"""

import json
import os
import sys

import pytest

from tests.helpers import data_process
from tests.helpers import processes

pytestmark = pytest.mark.slow
NUM_ROWS = 57


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('two_process')
  data_file = processes.write_synthetic_jsonl(root / 'train.jsonl', NUM_ROWS, seed=3)
  port = processes.free_port()
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  env['PYTHONPATH'] = os.pathsep.join([os.getcwd(), env.get('PYTHONPATH', '')])
  processes.run_all({p: ([sys.executable, '-m', 'tests.helpers.data_process', str(port), str(p), data_file,
                          str(root / f'out{p}.json')], env) for p in range(2)})
  results = []
  for p in range(2):
    with open(root / f'out{p}.json', encoding='utf-8') as f:
      results.append(json.load(f))
  return str(data_file), results


def _single_process(data_file: str):
  import transformers
  from jaxsft import sharding
  from jaxsft.data import index as index_lib
  from jaxsft.data import pipeline
  from jaxsft.data import splits as splits_lib

  tokenizer = transformers.AutoTokenizer.from_pretrained(
      os.path.join(os.path.dirname(sharding.__file__), 'assets', 'tiny'))
  source = splits_lib.load_splits(dataset_name=data_file, dataset_config=None, dataset_train_split='train',
                                  dataset_test_split=None, need_eval=False).train
  options = index_lib.Options(fmt='messages', max_length=96, assistant_only_loss=True, completion_only_loss=None,
                              dataset_text_field='text')
  index = index_lib.build_index(source, tokenizer, options, skip_bad_rows=False)
  plan = pipeline.make_plan(index, seq_len=96, pack=True)
  geometry = pipeline.Geometry.create(len(plan), data_process.PER_DEVICE_BATCH * 4, 2, 2.0, -1)
  steps = pipeline.StepSource(source, tokenizer, options, plan, geometry, seed=5, shuffle=True,
                              pad_id=tokenizer.pad_token_id)
  return index, steps


def test_index_is_split_between_processes_and_gathered(two_process_run):
  data_file, results = two_process_run
  assert [r['devices'] for r in results] == [4, 4]
  assert results[0]['index_reads'] == list(range(0, NUM_ROWS, 2))
  assert results[1]['index_reads'] == list(range(1, NUM_ROWS, 2))
  index, _ = _single_process(data_file)
  for r in results:
    assert r['lengths'] == index.lengths.tolist() and r['flags'] == index.flags.tolist()


def test_epoch_shards_are_disjoint_and_cover_the_dataset(two_process_run):
  _, results = two_process_run
  for epoch in range(2):
    mine, theirs = results[0]['reads'][epoch], results[1]['reads'][epoch]
    assert mine and theirs and not set(mine) & set(theirs)
    assert sorted(mine + theirs) == list(range(NUM_ROWS))
  assert results[0]['reads'][0] != results[0]['reads'][1]  # Reshuffled between epochs.


def test_global_batches_equal_the_one_process_batches(two_process_run):
  data_file, results = two_process_run
  _, steps = _single_process(data_file)
  expected_digests, expected_targets = [], []
  for s in range(len(steps)):
    element = steps[s]
    expected_targets.append(element['num_targets'])
    expected_digests.extend(data_process.digest(b) for b in element['micro_batches'])
  for r in results:
    assert r['steps'] == len(steps)
    assert r['targets'] == expected_targets
    assert r['digests'] == expected_digests


def test_restored_loader_continues_exactly_on_each_process(two_process_run):
  _, results = two_process_run
  assert all(r['resume_ok'] for r in results)


def test_a_cache_on_one_host_only_does_not_split_the_processes(two_process_run):
  _, results = two_process_run
  assert all(r['cache_ok'] for r in results)
