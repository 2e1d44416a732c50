"""Padding-free steps: the unpacked run's conversations per step, laid out in the fewest rows.

The step composition is checked conversation by conversation against the unpacked layout, and training is
checked against the unpacked run (same loss curve, same weights, to float32 summation-order precision) and
against itself across a SIGTERM and resume (bitwise), which exercises the per-step micro-batch counts that
the optimizer restores from its checkpointed step counter.
"""

import collections
import math
import os
import signal

import numpy as np
import pytest
import transformers

from jaxsft import checkpoint
from jaxsft.data import index as index_lib
from jaxsft.data import pipeline
from jaxsft.data import sources
from jaxsft.data import synthetic
from tests import test_checkpoint as ckpt
from tests.helpers import models
from tests.helpers import processes
from tests.helpers import runs

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'jaxsft', 'assets', 'tiny')


def _steps(padding_free: bool, process_index: int = 0, process_count: int = 1, *, seq_len=256):
  tokenizer = transformers.AutoTokenizer.from_pretrained(ASSETS)
  rows = synthetic.load('synthetic:arithmetic?train=150&test=0&seed=2').train
  source = sources.RowList([rows[i] for i in range(len(rows))], 'synthetic', 'train')
  options = index_lib.Options(fmt='messages', max_length=seq_len, assistant_only_loss=True,
                              completion_only_loss=None, dataset_text_field='text')
  index = index_lib.build_index(source, tokenizer, options, skip_bad_rows=False)
  plan = pipeline.make_plan(index, seq_len=seq_len, pack=False)
  geometry = pipeline.Geometry.create(len(plan), 4, 4, 2.0, -1)  # 16 conversations per step.
  return pipeline.StepSource(source, tokenizer, options, plan, geometry, seed=7, shuffle=True, pad_id=0,
                             process_index=process_index, process_count=process_count, padding_free=padding_free)


def _conversations(element) -> tuple[collections.Counter, int]:
  """The (input ids of every document) in a step's batches, as a multiset, and the rows that hold any."""
  docs, rows = collections.Counter(), 0
  for batch in element['micro_batches']:
    for ids, segments in zip(batch['input_ids'], batch['segment_ids']):
      rows += bool(segments.any())
      for segment in set(segments.tolist()) - {0}:
        docs[tuple(ids[segments == segment].tolist())] += 1
  return docs, rows


def test_a_padding_free_step_holds_the_unpacked_steps_conversations_in_fewer_rows():
  unpacked, free = _steps(False), _steps(True)
  assert len(free) == len(unpacked) == 2 * math.ceil(150 / 16)
  fewer = 0
  for step in range(len(free)):
    a, b = unpacked[step], free[step]
    assert (a['num_targets'], a['num_input_tokens']) == (b['num_targets'], b['num_input_tokens'])
    docs_a, rows_a = _conversations(a)
    docs_b, rows_b = _conversations(b)
    assert docs_a == docs_b  # The very same conversations, token for token.
    assert len(b['micro_batches']) == free.micro_batches_per_step[step] == math.ceil(rows_b / 4)
    assert len(a['micro_batches']) == 4 and rows_b <= rows_a
    fewer += len(b['micro_batches']) < len(a['micro_batches'])
  assert fewer >= len(free) - 2  # 16 conversations of 40-118 tokens fit 256-token rows 2-5 at a time.
  assert free.max_documents_per_row > 1


def test_processes_split_every_padding_free_micro_batch():
  whole = _steps(True)
  parts = [_steps(True, p, 2) for p in range(2)]
  for step in (0, 5, len(whole) - 1):
    merged = collections.Counter()
    for part in parts:
      assert len(part[step]['micro_batches']) == len(whole[step]['micro_batches'])
      merged += _conversations(part[step])[0]
    assert merged == _conversations(whole[step])[0]


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('padding_free')
  model_dir = models.save_tiny_qwen2(root / 'model', hidden_size=64, intermediate_size=128)
  data_file = processes.write_synthetic_jsonl(root / 'train.jsonl', ckpt.NUM_ROWS, seed=5)
  return root, model_dir, data_file


UNPACKED = dict(packing=False, max_length=256, per_device_train_batch_size=4, gradient_accumulation_steps=3)


@pytest.mark.slow
def test_training_follows_the_unpacked_run_and_resumes_bitwise(setup, monkeypatch):
  root = setup[0]
  runs.run(ckpt.make_config(setup, root / 'unpacked', **UNPACKED))
  runs.run(ckpt.make_config(setup, root / 'free', padding_free=True, **UNPACKED))
  unpacked, free = ckpt.exact(ckpt.metrics(root / 'unpacked')), ckpt.exact(ckpt.metrics(root / 'free'))
  assert [r['step'] for r in free] == [r['step'] for r in unpacked]
  assert free[-1]['loss'] < free[0]['loss'] - 0.3  # A real curve.
  for a, b in zip(unpacked, free):
    assert (a['num_tokens'], a['learning_rate']) == (b['num_tokens'], b['learning_rate'])
    for key in ('loss', 'grad_norm', 'mean_token_accuracy'):
      assert b[key] == pytest.approx(a[key], rel=1e-5), (a['step'], key)
  for name, value in ckpt.weights(root / 'unpacked').items():
    np.testing.assert_allclose(ckpt.weights(root / 'free')[name], value, rtol=0, atol=1e-5, err_msg=name)

  out = root / 'free_interrupted'
  with monkeypatch.context() as patch:
    runs.interrupt_at(patch, ckpt.INTERRUPT_AT, signal.SIGTERM)
    with pytest.raises(runs.Preempted):
      runs.run(ckpt.make_config(setup, out, padding_free=True, **UNPACKED))
  assert checkpoint.latest_step(str(out)) == ckpt.INTERRUPT_AT
  runs.run(ckpt.make_config(setup, out, padding_free=True, **UNPACKED))
  assert ckpt.exact(ckpt.metrics(out)) == free  # Bitwise.
  ckpt.assert_same_weights(ckpt.weights(out), ckpt.weights(root / 'free'))
