"""Packing: TRL-exact best-fit-decreasing bins, the packed row layout, and that packing changes nothing.

A packed row must train exactly as its conversations would, each alone in its own padded row: the same
per-token losses on the same loss tokens, no attention across segments (on the mask and on the logits, with
and without sliding windows), and the same loss curve and final parameters through the real train step.
"""

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pytest
from flax import nnx

from jaxsft import loss as loss_lib
from jaxsft import optim
from jaxsft import step as step_lib
from jaxsft.data import formats
from jaxsft.data import packing
from jaxsft.models import attention
from jaxsft.models import hf
from jaxsft.models import hf_config
from tests.helpers import batches

PAD = 7
TOL = 1e-5

# ----------------------------------------------------------------------------------------------------------
# pack_bfd against TRL.


def _groups_from_packed(input_ids: list[list[int]], seq_lengths: list[list[int]]) -> list[list[int]]:
  """Item ids per packed row, where item i's tokens are all equal to i."""
  groups = []
  for row, lengths in zip(input_ids, seq_lengths):
    starts = np.cumsum([0] + list(lengths))[:-1]
    assert all(len(set(row[s:s + n])) == 1 for s, n in zip(starts, lengths))  # Each segment is one item.
    groups.append([row[s] for s in starts])
  return groups


def _trl_pack_dataset(lengths: np.ndarray, seq_len: int) -> list[list[int]]:
  """TRL's own grouping through its public `pack_dataset` (one `map` batch when len(lengths) <= 1000)."""
  dataset = datasets.Dataset.from_dict({'input_ids': [[i] * int(n) for i, n in enumerate(lengths)]})
  from trl import data_utils as trl_data_utils  # pylint: disable=import-outside-toplevel
  packed = trl_data_utils.pack_dataset(dataset, seq_len, strategy='bfd')
  return _groups_from_packed(packed['input_ids'], packed['seq_lengths'])


def _trl_pack_bfd_whole(lengths: np.ndarray, seq_len: int) -> list[list[int]]:
  """TRL's `_pack_bfd` called once on the whole array (what pack_bfd does; pack_dataset batches by 1000)."""
  column = pa.array([[i] * int(n) for i, n in enumerate(lengths)], type=pa.list_(pa.int64()))
  from trl import data_utils as trl_data_utils  # pylint: disable=import-outside-toplevel
  packed = trl_data_utils._pack_bfd(pa.table({'input_ids': column}), seq_len)  # pylint: disable=protected-access
  return _groups_from_packed(packed['input_ids'].to_pylist(), packed['seq_lengths'].to_pylist())


def _ours(lengths: np.ndarray, seq_len: int) -> list[list[int]]:
  bins = packing.pack_bfd(lengths, seq_len)
  return [bins.bin(b).tolist() for b in range(len(bins))]


def _check_bins(bins: packing.Bins, lengths: np.ndarray, seq_len: int) -> None:
  assert bins.offsets.dtype == np.int64 and bins.members.dtype == np.int64
  assert bins.offsets[0] == 0 and bins.offsets[-1] == len(lengths) and np.all(np.diff(bins.offsets) >= 1)
  np.testing.assert_array_equal(np.sort(bins.members), np.arange(len(lengths)))  # Every index exactly once.
  totals = np.add.reduceat(lengths[bins.members], bins.offsets[:-1])
  assert totals.max() <= seq_len


def _length_sets():
  rng = np.random.default_rng(0)
  yield 'uniform', rng.integers(1, 65, 1000), 64
  yield 'ties', rng.integers(1, 4, 700), 10  # Few distinct lengths: the tie order decides everything.
  yield 'ties_full', rng.choice([1, 2, 50, 99, 100, 100], 600), 100  # Many items of exactly seq_len.
  yield 'lognormal', np.clip(rng.lognormal(np.log(30), 1.0, 1000).astype(np.int64), 1, 300), 300
  yield 'small_cap', rng.integers(1, 3, 200), 2
  yield 'single', np.array([5]), 5


@pytest.mark.parametrize('lengths,seq_len', [case[1:] for case in _length_sets()],
                         ids=[case[0] for case in _length_sets()])
def test_pack_bfd_equals_trl_pack_dataset(lengths, seq_len):
  bins = packing.pack_bfd(lengths, seq_len)
  _check_bins(bins, lengths, seq_len)
  assert _ours(lengths, seq_len) == _trl_pack_dataset(lengths, seq_len)  # Same rows, same order within rows.


@pytest.mark.parametrize('seq_len', [4096, 10007])  # > 64 words of free-space bitmap; not a power of two.
def test_pack_bfd_equals_trl_bfd_on_the_whole_array(seq_len):
  rng = np.random.default_rng(seq_len)
  lengths = np.clip(rng.lognormal(np.log(seq_len / 8), 1.0, 2500).astype(np.int64), 1, seq_len)
  lengths[rng.integers(0, len(lengths), 20)] = seq_len
  lengths[rng.integers(0, len(lengths), 300)] = rng.integers(1, 40, 300)  # Small items fill many holes.
  bins = packing.pack_bfd(lengths, seq_len)
  _check_bins(bins, lengths, seq_len)
  assert _ours(lengths, seq_len) == _trl_pack_bfd_whole(lengths, seq_len)


@pytest.mark.parametrize('bad', [0, -3, 65])
def test_pack_bfd_rejects_out_of_range_lengths(bad):
  lengths = np.array([3, 64, bad, 5])
  with pytest.raises(ValueError, match='item 2 has length'):
    packing.pack_bfd(lengths, 64)


def test_pack_bfd_empty_and_tiny_cases():
  empty = packing.pack_bfd(np.zeros(0, np.int64), 16)
  assert len(empty) == 0 and empty.members.size == 0
  np.testing.assert_array_equal(packing.pack_bfd(np.array([4, 4, 4, 4]), 8).members, [0, 1, 2, 3])
  assert _ours(np.array([3, 5, 2, 6]), 8) == [[3, 2], [1, 0]]  # 6+2, then 5+3.
  with pytest.raises(ValueError, match='seq_len'):
    packing.pack_bfd(np.array([1]), 0)


def test_pack_bfd_efficiency_on_long_tailed_lengths():
  rng = np.random.default_rng(1)
  median, seq_len = 200, 1600
  lengths = np.clip(rng.lognormal(np.log(median), 1.0, 10_000).astype(np.int64), 1, seq_len)
  assert (lengths == seq_len).sum() > 10  # The tail really reaches the capacity.
  bins = packing.pack_bfd(lengths, seq_len)
  _check_bins(bins, lengths, seq_len)
  eff = packing.efficiency(lengths, len(bins), seq_len)
  assert eff >= 0.95
  assert eff == lengths.sum() / (len(bins) * seq_len)
  assert packing.efficiency(lengths, len(lengths), seq_len) < 0.2  # Unpacked: mostly padding.


def test_one_per_bin_and_bins_accessors():
  bins = packing.one_per_bin(3)
  assert len(bins) == 3 and [bins.bin(b).tolist() for b in range(3)] == [[0], [1], [2]]
  with pytest.raises(IndexError):
    bins.bin(3)
  assert len(packing.one_per_bin(0)) == 0
  assert packing.efficiency(np.array([1, 2]), 0, 8) == 0.0


# ----------------------------------------------------------------------------------------------------------
# pack_row layout.


def _example(ids, mask) -> formats.Example:
  return formats.Example(np.asarray(ids, np.int32), np.asarray(mask, np.int32))


def test_pack_row_layout():
  a = _example([11, 12, 13], [0, 1, 1])
  b = _example([21, 22], [1, 0])
  c = _example([31, 32, 33, 34], [0, 0, 1, 1])
  row = packing.pack_row([a, b, c], 12, PAD)
  assert set(row) == set(packing.BATCH_KEYS) and all(v.dtype == np.int32 and v.shape == (12,) for v in row.values())
  np.testing.assert_array_equal(row['input_ids'], [11, 12, 13, 21, 22, 31, 32, 33, 34, PAD, PAD, PAD])
  np.testing.assert_array_equal(row['positions'], [0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 0, 0])
  np.testing.assert_array_equal(row['segment_ids'], [1, 1, 1, 2, 2, 3, 3, 3, 3, 0, 0, 0])
  np.testing.assert_array_equal(row['loss_mask'], [0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0])
  full = packing.pack_row([a, c, b], 9, PAD)  # Exactly full: no padding.
  np.testing.assert_array_equal(full['segment_ids'], [1, 1, 1, 2, 2, 2, 2, 3, 3])
  single = packing.pack_row([b], 4, PAD)
  np.testing.assert_array_equal(single['input_ids'], [21, 22, PAD, PAD])
  np.testing.assert_array_equal(single['segment_ids'], [1, 1, 0, 0])
  empty = packing.pack_row([], 3, PAD)
  for key, value in packing.empty_row(3, PAD).items():
    np.testing.assert_array_equal(empty[key], value)
  np.testing.assert_array_equal(empty['input_ids'], [PAD] * 3)
  assert not empty['segment_ids'].any() and not empty['loss_mask'].any() and not empty['positions'].any()


def test_pack_row_overflow():
  a = _example([1, 2, 3], [1, 1, 1])
  with pytest.raises(ValueError, match='do not fit'):
    packing.pack_row([a, a], 5, PAD)
  with pytest.raises(ValueError, match='do not fit'):
    packing.pack_row([a], 2, PAD)
  with pytest.raises(ValueError, match='loss_mask'):
    packing.pack_row([formats.Example(np.arange(3, dtype=np.int32), np.ones(2, np.int32))], 5, PAD)


# ----------------------------------------------------------------------------------------------------------
# The model: packed rows = conversations alone.

SEQ = 24
LENGTHS = (7, 13, 4, 9, 11, 5)  # BFD into 24: [13, 11], [9, 7, 5], [4].


def _random_examples(rng, lengths, vocab) -> list[formats.Example]:
  out = []
  for n in lengths:
    ids = rng.integers(0, vocab, n)
    mask = (np.arange(n) >= n // 3) & (rng.random(n) < 0.8)  # A prompt without loss, then mostly targets.
    mask[-1] = True
    out.append(_example(ids, mask.astype(np.int32)))
  return out


def _stack(rows: list[dict], num_rows: int) -> dict[str, np.ndarray]:
  rows = rows + [packing.empty_row(len(rows[0]['input_ids']), PAD)] * (num_rows - len(rows))
  return {key: np.stack([row[key] for row in rows]) for key in packing.BATCH_KEYS}


def _packed_and_unpacked(examples, seq_len):
  """(packed batch, unpacked batch, bins); both batches have len(examples) rows (packed: empty rows after)."""
  bins = packing.pack_bfd(np.array([len(e) for e in examples]), seq_len)
  packed = [packing.pack_row([examples[i] for i in bins.bin(b)], seq_len, PAD) for b in range(len(bins))]
  unpacked = [packing.pack_row([e], seq_len, PAD) for e in examples]
  return _stack(packed, len(examples)), _stack(unpacked, len(examples)), bins


class _Runner:
  """A loaded tiny model and one jitted forward: logits, per-token CE, targets/weights, chunked CE sums."""

  def __init__(self, tiny_hf, name):
    path = tiny_hf.save(tiny_hf.model(name))
    self.cfg = hf_config.model_config_from_hf(hf_config.read_hf_config(path), dtype='float32')
    self.model = hf.load_pretrained(path, self.cfg)
    self.vocab = self.cfg.vocab_size
    graphdef, state = nnx.split(self.model)

    @jax.jit
    def forward(state, batch):
      model = nnx.merge(graphdef, state)
      hidden_BxTxD = model.hidden_states(batch['input_ids'], batch['positions'], batch['segment_ids'])
      unembed_DxV = model.unembedding()
      logits_BxTxV = jnp.einsum('btd,dv->btv', hidden_BxTxD, unembed_DxV, preferred_element_type=jnp.float32)
      targets_BxT, weights_BxT = loss_lib.next_token_targets(batch['input_ids'], batch['loss_mask'],
                                                             batch['segment_ids'])
      log_probs_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
      ce_BxT = -jnp.take_along_axis(log_probs_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
      sums = loss_lib.cross_entropy_sums(hidden_BxTxD, unembed_DxV, targets_BxT, weights_BxT, chunk_size=8)
      return {'logits': logits_BxTxV, 'ce': ce_BxT, 'weights': weights_BxT, 'sums': sums}

    self._state = state
    self._forward = forward

  def __call__(self, batch):
    return jax.device_get(self._forward(self._state, {k: jnp.asarray(v) for k, v in batch.items()}))


@pytest.fixture(scope='module')
def runners(tiny_hf):
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = _Runner(tiny_hf, name)
    return cache[name]

  return get


def _spans(bins, examples, b):
  """(example index, start, end) of each segment of packed row b."""
  out, start = [], 0
  for i in bins.bin(b):
    out.append((int(i), start, start + len(examples[i])))
    start += len(examples[i])
  return out


@pytest.mark.parametrize('name', ['qwen2', 'mistral'])
def test_packed_per_token_losses_equal_unpacked(runners, name):
  run = runners(name)
  examples = _random_examples(np.random.default_rng(0), LENGTHS, run.vocab)
  packed, unpacked, bins = _packed_and_unpacked(examples, SEQ)
  assert len(bins) == 3 and max(np.diff(bins.offsets)) == 3  # Really packed: 6 conversations in 3 rows.
  got, want = run(packed), run(unpacked)
  for b in range(len(bins)):
    for i, start, end in _spans(bins, examples, b):
      w_packed, w_alone = got['weights'][b, start:end], want['weights'][i, :end - start]
      # The same loss targets: a token's next token, inside the conversation, where the mask says so.
      np.testing.assert_array_equal(w_packed, w_alone)
      np.testing.assert_array_equal(w_alone[:-1], examples[i].loss_mask[1:])
      on = w_alone > 0
      assert on.sum() >= 1
      np.testing.assert_allclose(got['ce'][b, start:end][on], want['ce'][i, :end - start][on], rtol=0, atol=TOL)
      np.testing.assert_allclose(got['logits'][b, start:end], want['logits'][i, :end - start], rtol=0, atol=TOL)
  assert got['weights'].sum() == want['weights'].sum() == sum(int(e.loss_mask[1:].sum()) for e in examples)
  # No weight on padding or across segment boundaries.
  assert got['weights'][packed['segment_ids'] == 0].sum() == 0
  assert np.abs(want['logits']).max() > 1.0 and want['ce'][want['weights'] > 0].mean() > 1.0  # Not vacuous.
  # The chunked loss the trainer uses: the same sums, and they match the per-token CE.
  for key in ('loss_sum', 'num_tokens', 'num_correct', 'entropy_sum'):
    np.testing.assert_allclose(got['sums'][key], want['sums'][key], rtol=TOL, atol=0, err_msg=key)
  np.testing.assert_allclose(got['sums']['loss_sum'], (got['ce'] * got['weights']).sum(), rtol=TOL)
  assert got['sums']['num_tokens'] == want['sums']['num_tokens'] == got['weights'].sum()


def _block_causal(spans: list[tuple[int, int]], seq_len: int, window: int | None) -> np.ndarray:
  """The block-diagonal causal mask [query, key] of these [start, end) spans, built element by element."""
  mask = np.zeros((seq_len, seq_len), bool)
  for start, end in spans:
    for q in range(start, end):
      for k in range(start, q + 1):
        mask[q, k] = window is None or q - k < window
  return mask


@pytest.mark.parametrize('window', [None, 3])
def test_mask_of_packed_rows_is_block_diagonal_causal(window):
  examples = _random_examples(np.random.default_rng(1), LENGTHS, 50)
  packed, _, bins = _packed_and_unpacked(examples, SEQ)
  mask = np.asarray(attention.make_mask(packed['segment_ids'], window))
  assert mask.shape == (len(examples), 1, SEQ, SEQ)
  for r in range(len(examples)):
    spans = [(s, e) for _, s, e in _spans(bins, examples, r)] if r < len(bins) else []
    used = spans[-1][1] if spans else 0
    spans.append((used, SEQ))  # Padding (segment 0) is its own block: finite, and seen by no document.
    np.testing.assert_array_equal(mask[r, 0], _block_causal(spans, SEQ, window), err_msg=f'row {r}')
  assert mask[1, 0, 10, 9] and not mask[1, 0, 9, 8]  # Row 1 is [9, 7, 5]: inside segment 2 / across 1 → 2.


@pytest.mark.parametrize('name', ['qwen2', 'qwen2_sliding', 'mistral'])
def test_no_attention_across_segments_on_the_logits(runners, name):
  run = runners(name)
  examples = _random_examples(np.random.default_rng(2), LENGTHS, run.vocab)
  packed, _, bins = _packed_and_unpacked(examples, SEQ)
  r = int(np.argmax(np.diff(bins.offsets)))  # The row with the most segments (3).
  spans = _spans(bins, examples, r)
  assert len(spans) == 3
  base = run(packed)['logits']

  # Every token of segment 1 changed: nothing outside segment 1 moves, not by one bit.
  changed = {k: v.copy() for k, v in packed.items()}
  _, s1, e1 = spans[0]
  changed['input_ids'][r, s1:e1] = (changed['input_ids'][r, s1:e1] + 1 + np.arange(e1 - s1)) % run.vocab
  logits = run(changed)['logits']
  outside = np.ones(SEQ, bool)
  outside[s1:e1] = False
  np.testing.assert_array_equal(logits[r, outside], base[r, outside])
  np.testing.assert_array_equal(np.delete(logits, r, axis=0), np.delete(base, r, axis=0))
  assert np.abs(logits[r, s1:e1] - base[r, s1:e1]).max() > 1e-2  # The change itself is visible.

  # The first token of segment 2 changed: segment 2's later logits move (through attention), the rest not.
  changed = {k: v.copy() for k, v in packed.items()}
  _, s2, e2 = spans[1]
  changed['input_ids'][r, s2] = (changed['input_ids'][r, s2] + 1) % run.vocab
  logits = run(changed)['logits']
  window = min((w for w in (run.cfg.sliding_windows or ()) if w is not None), default=None)
  reach = e2 if window is None else min(e2, s2 + window)  # Queries that still see the changed key (first layer).
  assert np.abs(logits[r, s2 + 1:reach] - base[r, s2 + 1:reach]).max() > 1e-3
  outside = np.ones(SEQ, bool)
  outside[s2:e2] = False
  np.testing.assert_array_equal(logits[r, outside], base[r, outside])


# ----------------------------------------------------------------------------------------------------------
# The train step: packing changes neither the loss curve nor the parameters.

TRAIN_STEPS = 6
TRAIN_LENGTHS = (5, 12, 3, 9, 14, 7, 4, 10)  # BFD into 24: [14, 10], [12, 9, 3], [7, 5, 4].
CONVERSATIONS_PER_STEP = len(TRAIN_LENGTHS)
MICRO_ROWS = 4  # Rows per micro-batch; 2 micro-batches per step.


def _train(step_fn, tx, params, steps, pack: bool):
  """Runs the steps; returns per-step losses, loss-token counts, rows and grad norms, and the final params."""
  params = jax.tree.map(jnp.copy, params)  # The step donates its state.
  state = {'params': params, 'opt_state': tx.init(params)}
  out = {'loss': [], 'tokens': [], 'rows': [], 'grad_norm': []}
  for examples in steps:
    if pack:
      bins = packing.pack_bfd(np.array([len(e) for e in examples]), SEQ)
      rows = [packing.pack_row([examples[i] for i in bins.bin(b)], SEQ, PAD) for b in range(len(bins))]
    else:
      rows = [packing.pack_row([e], SEQ, PAD) for e in examples]
    half = -(-len(rows) // 2)
    micro_batches = [_stack(part, MICRO_ROWS) for part in (rows[:half], rows[half:])]
    step_tokens = sum(batches.count_loss_tokens(batch) for batch in micro_batches)
    inv = jnp.float32(1.0 / step_tokens)
    state, all_sums = step_fn(state, micro_batches, inv)  # One optimizer step: both micro-batches, one update.
    loss_sum = sum(float(sums['loss_sum']) for sums in all_sums)
    num_tokens = sum(float(sums['num_tokens']) for sums in all_sums)
    assert num_tokens == step_tokens  # The host count is the device's.
    out['loss'].append(loss_sum / num_tokens)
    out['tokens'].append(step_tokens)
    out['rows'].append(len(rows))
    out['grad_norm'].append(float(all_sums[-1]['grad_norm']))  # The whole step's accumulated gradient.
  return out, jax.device_get(state['params'])


def test_training_with_packing_equals_unpacked(tiny_hf):
  path = tiny_hf.save(tiny_hf.model('qwen2', seed=3))
  model = hf.load_pretrained(path, hf_config.model_config_from_hf(hf_config.read_hf_config(path), dtype='float32'))
  graphdef, params = nnx.split(model, nnx.Param)
  tx, _ = optim.make_optimizer(
      learning_rate=3e-3, lr_scheduler_type='linear', total_steps=TRAIN_STEPS, warmup_steps=1, warmup_ratio=0.0,
      min_lr_rate=None, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
      max_grad_norm=1.0)
  step_fn = step_lib.TrainStep(graphdef, tx, loss_chunk_size=16)
  rng = np.random.default_rng(4)
  # The same conversations every step (so the curve shows learning), in a new order each step.
  base = _random_examples(rng, TRAIN_LENGTHS, 300)
  steps = [[base[i] for i in rng.permutation(CONVERSATIONS_PER_STEP)] for _ in range(TRAIN_STEPS)]

  packed, packed_params = _train(step_fn, tx, params, steps, pack=True)
  unpacked, final_params = _train(step_fn, tx, params, steps, pack=False)
  assert packed['tokens'] == unpacked['tokens']
  assert packed['rows'] == [3] * TRAIN_STEPS and unpacked['rows'] == [CONVERSATIONS_PER_STEP] * TRAIN_STEPS
  np.testing.assert_allclose(packed['loss'], unpacked['loss'], rtol=0, atol=TOL)
  np.testing.assert_allclose(packed['grad_norm'], unpacked['grad_norm'], rtol=TOL)
  assert unpacked['loss'][-1] < unpacked['loss'][0] - 0.5  # The curve moves: not a comparison of constants.
  initial = jax.device_get(params)
  # Final parameters: per tensor, |packed - unpacked| / |unpacked| (L2). Not element by element: Adam
  # divides each gradient element by its own RMS, so an element whose gradient is ~1e-5 of the tensor's
  # largest (a k_proj bias entry here) turns float32 rounding of the summation order (~1e-7 of the gradient,
  # the same for packed and unpacked rows) into a ~1e-3 relative difference of its own update.
  for (key, got), want, start in zip(jax.tree_util.tree_leaves_with_path(packed_params),
                                     jax.tree.leaves(final_params), jax.tree.leaves(initial)):
    got, want, start = np.asarray(got), np.asarray(want), np.asarray(start)
    assert np.abs(want - start).max() > 1e-3, jax.tree_util.keystr(key)  # Every tensor was trained.
    assert np.linalg.norm(got - want) <= TOL * np.linalg.norm(want), jax.tree_util.keystr(key)
