"""Length buckets: unpacked micro-batches as wide as their longest row needs (jaxsft/data/buckets.py).

The layout is checked micro-batch by micro-batch against the padded-to-max_length one (same rows, same tokens,
only trailing padding cut, every process agreeing on the width), and training is checked against the
padded-to-max_length run (same per-step losses and gradient norms, same final weights, to float32
summation-order precision) with gradient accumulation and across a SIGTERM and resume, with the number of
compiled step programs within the bound.
"""

import json
import os
import signal

import numpy as np
import pytest
import transformers

from jaxsft import checkpoint
from jaxsft import step as step_lib
from jaxsft.data import buckets
from jaxsft.data import index as index_lib
from jaxsft.data import pipeline
from jaxsft.data import sources
from jaxsft.data import synthetic
from jaxsft.errors import InputError
from tests.helpers import models
from tests.helpers import runs

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'jaxsft', 'assets', 'tiny')
MAX_LENGTH = 512


def test_widths_and_the_width_for_a_row():
  assert buckets.widths(2048, 'auto') == (128, 256, 384, 512, 768, 1024, 1536, 2048)
  assert buckets.widths(2048, 'pow2') == (128, 256, 512, 1024, 2048)
  assert buckets.widths(2048, 'none') == (2048,)
  assert buckets.widths(1000, 'auto') == (128, 256, 384, 512, 768, 1000)  # max_length is always the last.
  assert buckets.widths(96, 'auto') == (96,)
  assert len(buckets.widths(32768, 'auto')) == 16 and len(buckets.widths(32768, 'pow2')) == 9
  for max_length in (200, 512, 2048, 32768):
    for scheme in buckets.LENGTH_BUCKETS:
      allowed = buckets.widths(max_length, scheme)
      assert list(allowed) == sorted(set(allowed)) and allowed[-1] == max_length
      assert all(w % 128 == 0 for w in allowed[:-1])
      if scheme == 'auto':  # At most 1.5x the longest row's positions for rows over 256 tokens.
        assert all(b <= 1.5 * a for a, b in zip(allowed[1:], allowed[2:]))
  allowed = buckets.widths(2048, 'auto')
  assert [buckets.width_for(n, allowed) for n in (0, 1, 128, 129, 384, 385, 1537, 2048)] == [
      128, 128, 128, 256, 384, 512, 2048, 2048]
  with pytest.raises(ValueError, match='2049 tokens'):
    buckets.width_for(2049, allowed)
  with pytest.raises(InputError, match="config field 'length_buckets' is 'sometimes'"):
    buckets.widths(2048, 'sometimes')


def _conversations(num: int, seed: int) -> list[dict]:
  """Chats of 1 (half of them: 40-118 tokens) to 8 synthetic problems (~900 tokens), so the longest row of a
  2-row micro-batch falls in every width of max_length 512 (and some rows are truncated)."""
  rows = synthetic.load(f'synthetic:arithmetic?train={num * 8}&test=0&seed={seed}').train
  rng = np.random.default_rng(seed)
  out, i = [], 0
  for _ in range(num):
    k = int(rng.choice([1, 1, 1, 1, 1, 2, 3, 4, 6, 8]))
    out.append({'messages': [m for j in range(i, i + k) for m in rows[j]['messages']]})
    i += k
  return out


def _steps(widths, process_index: int = 0, process_count: int = 1):
  tokenizer = transformers.AutoTokenizer.from_pretrained(ASSETS)
  source = sources.RowList(_conversations(120, seed=4), 'chats', 'train')
  options = index_lib.Options(fmt='messages', max_length=MAX_LENGTH, assistant_only_loss=True,
                              completion_only_loss=None, dataset_text_field='text')
  index = index_lib.build_index(source, tokenizer, options, skip_bad_rows=False)
  plan = pipeline.make_plan(index, seq_len=MAX_LENGTH, pack=False)
  geometry = pipeline.Geometry.create(len(plan), 2, 2, 1.0, -1)
  return pipeline.StepSource(source, tokenizer, options, plan, geometry, seed=7, shuffle=True, pad_id=0,
                             process_index=process_index, process_count=process_count, widths=widths)


def _longest_first(micro_batches, sizes):
  """The padded layout's micro-batches with their real rows (the first `sizes[m]` of micro-batch m) dealt
  longest first (ties in order), each micro-batch keeping its number of rows and its empty filler rows."""
  real = {key: np.concatenate([mb[key][:n] for mb, n in zip(micro_batches, sizes)]) for key in micro_batches[0]}
  order = np.argsort(-(real['segment_ids'] > 0).sum(axis=1), kind='stable')
  ends = np.cumsum(sizes)
  return [{key: np.concatenate([real[key][order][end - n:end], mb[key][n:]]) for key in mb}
          for mb, n, end in zip(micro_batches, sizes, ends)]


def test_a_bucketed_step_is_the_padded_step_longest_first_with_its_trailing_padding_cut():
  allowed = buckets.widths(MAX_LENGTH, 'auto')
  padded, bucketed = _steps(None), _steps(allowed)
  halves = [_steps(allowed, p, 2) for p in range(2)]
  seen, positions = set(), [0, 0]
  for step in range(len(padded)):
    a, b, step_positions = padded[step], bucketed[step], [0, 0]
    assert (a['num_targets'], a['num_input_tokens']) == (b['num_targets'], b['num_input_tokens'])
    assert a['num_positions'] == 2 * 2 * MAX_LENGTH
    assert b['num_positions'] == sum(mb['input_ids'].size for mb in b['micro_batches'])
    sizes = [len(rows) for rows in padded.global_rows(step)]
    grouped = _longest_first(a['micro_batches'], sizes)
    for m, (full, cut) in enumerate(zip(grouped, b['micro_batches'])):
      width = cut['input_ids'].shape[1]
      longest = int((full['segment_ids'] > 0).sum(axis=1).max())
      assert width == buckets.width_for(longest, allowed)
      seen.add(width)
      for key in full:
        np.testing.assert_array_equal(full[key][:, :width], cut[key])
      assert not full['segment_ids'][:, width:].any() and not full['loss_mask'][:, width:].any()
      ungrouped = int((a['micro_batches'][m]['segment_ids'] > 0).sum(axis=1).max())
      step_positions[0] += 2 * width
      step_positions[1] += 2 * buckets.width_for(ungrouped, allowed)
      # Each process holds its rows at the width of the whole micro-batch.
      parts = [h[step]['micro_batches'][m] for h in halves]
      assert all(p['input_ids'].shape == (1, width) for p in parts)
      np.testing.assert_array_equal(np.concatenate([p['input_ids'] for p in parts]), cut['input_ids'])
    # Dealt longest first, a step never computes more positions than in its random micro-batches.
    assert step_positions[0] <= step_positions[1]
    positions = [p + q for p, q in zip(positions, step_positions)]
  assert seen == set(allowed)  # Every width occurs: the data spans them.
  assert positions[0] < 0.9 * positions[1], positions


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('buckets')
  model_dir = models.save_tiny_qwen2(root / 'model', hidden_size=64, intermediate_size=128)
  data_file = root / 'train.jsonl'
  data_file.write_text(''.join(json.dumps(row) + '\n' for row in _conversations(40, seed=9)))
  return root, model_dir, data_file


def _config(setup, out, **fields):
  _, model_dir, data_file = setup
  settings = dict(model_name_or_path=model_dir, dataset_name=data_file, output_dir=out, bf16=False,
                  gradient_checkpointing=False, disable_tqdm=True, packing=False, max_length=MAX_LENGTH,
                  per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=2.0,
                  logging_steps=1, learning_rate=1e-3, warmup_steps=2, assistant_only_loss=True, seed=3, save_steps=0)
  return runs.config(**{**settings, **fields})


@pytest.mark.slow
def test_training_follows_the_padded_run_and_resumes_bitwise(setup, monkeypatch):
  root = setup[0]
  made = []
  init = step_lib.TrainStep.__init__

  def recorded_init(self, *args, **kwargs):
    made.append(self)
    init(self, *args, **kwargs)

  monkeypatch.setattr(step_lib.TrainStep, '__init__', recorded_init)
  evaluation = dict(dataset_test_split=str(setup[2]), eval_strategy='steps', eval_steps=10,
                    per_device_eval_batch_size=3)
  runs.run(_config(setup, root / 'padded', length_buckets='none', **evaluation))
  runs.run(_config(setup, root / 'bucketed', **evaluation))
  # Eval batches take the same widths: the token-weighted eval loss is the padded one.
  evals = [[r for r in runs.metrics(root / name) if 'eval_loss' in r] for name in ('padded', 'bucketed')]
  assert [r['step'] for r in evals[1]] == [r['step'] for r in evals[0]] == [10, 20]
  for a, b in zip(*evals):
    assert a['eval_num_tokens'] == b['eval_num_tokens']
    for key in ('eval_loss', 'eval_mean_token_accuracy', 'eval_entropy'):
      assert b[key] == pytest.approx(a[key], rel=1e-5), (a['step'], key)
  padded, bucketed = runs.loss_rows(root / 'padded'), runs.loss_rows(root / 'bucketed')
  assert [r['step'] for r in bucketed] == [r['step'] for r in padded] and len(padded) == 20
  assert bucketed[-1]['loss'] < bucketed[0]['loss'] - 0.3  # A real curve.
  for a, b in zip(padded, bucketed):
    assert (a['num_tokens'], a['learning_rate']) == (b['num_tokens'], b['learning_rate'])
    for key in ('loss', 'grad_norm', 'mean_token_accuracy', 'entropy'):
      assert b[key] == pytest.approx(a[key], rel=1e-5), (a['step'], key)
  # Less padding computed (as much in a step whose every micro-batch needs max_length).
  assert all(b['non_padding'] >= a['non_padding'] for a, b in zip(padded[1:], bucketed[1:]))
  assert np.mean([r['non_padding'] for r in bucketed[1:]]) > 1.1 * np.mean([r['non_padding'] for r in padded[1:]])
  want = runs.hf_weights(root / 'padded')
  for name, value in runs.hf_weights(root / 'bucketed').items():
    np.testing.assert_allclose(value, want[name], rtol=0, atol=1e-5, err_msg=name)
  # One accumulate program per width used (at most 4 at max_length 512) and one apply; the padded run: one each.
  compiled = [sorted(key for key in made_step._compiled) for made_step in made]  # pylint: disable=protected-access
  assert compiled[0] == [('accumulate', (2, MAX_LENGTH)), ('apply', None)]
  widths = {shape[1] for name, shape in compiled[1] if name == 'accumulate'}
  assert len(widths) >= 3 and widths <= set(buckets.widths(MAX_LENGTH, 'auto'))
  assert len(compiled[1]) == len(widths) + 1

  out = root / 'interrupted'
  with monkeypatch.context() as patch:
    runs.interrupt_at(patch, 7, signal.SIGTERM)
    with pytest.raises(runs.Preempted):
      runs.run(_config(setup, out))
  assert checkpoint.latest_step(str(out)) == 7
  runs.run(_config(setup, out))
  assert runs.exact(runs.loss_rows(out)) == runs.exact(bucketed)  # Bitwise.
  got = runs.hf_weights(out)
  for name, value in runs.hf_weights(root / 'bucketed').items():
    assert np.array_equal(got[name], value), name


def test_an_unshuffled_bucketed_source_runs_its_rows_longest_first():
  """Eval's layout: one pass, no shuffle, rows longest first so each micro-batch's rows pad each other little."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(ASSETS)
  source = sources.RowList(_conversations(30, seed=5), 'chats', 'test')
  options = index_lib.Options(fmt='messages', max_length=MAX_LENGTH, assistant_only_loss=True,
                              completion_only_loss=None, dataset_text_field='text')
  plan = pipeline.make_plan(index_lib.build_index(source, tokenizer, options, skip_bad_rows=False),
                            seq_len=MAX_LENGTH, pack=False)
  geometry = pipeline.Geometry.create(len(plan), 4, 1, 1.0, -1)
  lengths = {}
  for widths in (None, buckets.widths(MAX_LENGTH, 'auto')):
    steps = pipeline.StepSource(source, tokenizer, options, plan, geometry, seed=0, shuffle=False, pad_id=0,
                                widths=widths)
    lengths[widths] = [int(n) for s in range(len(steps)) for mb in steps[s]['micro_batches']
                       for n in (mb['segment_ids'] > 0).sum(axis=1) if n]
  assert lengths[None] != sorted(lengths[None], reverse=True)  # Unbucketed: the split's own order.
  assert lengths[buckets.widths(MAX_LENGTH, 'auto')] == sorted(lengths[None], reverse=True)
