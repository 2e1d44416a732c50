"""The data path: length index (counts, drops, bad rows, cache, workers), plan, step-aligned shards, resume."""

import hashlib
import json

import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxsft.data import formats
from jaxsft.data import index as index_lib
from jaxsft.data import packing
from jaxsft.data import pipeline
from jaxsft.errors import InputError
from tests.helpers import batches

CHATML_MARKED = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\n' }}"
                 "{%- if message['role'] == 'assistant' %}{%- generation %}{{- message['content'] + '<|im_end|>' }}"
                 "{%- endgeneration %}{{- '\n' }}{%- else %}{{- message['content'] + '<|im_end|>' + '\n' }}"
                 "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
                 '{%- endif %}')
PAD = 0


@pytest.fixture(scope='module')
def tokenizer():
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(['user assistant What is 2 + 3? It is 5. Tell me a long story.'] * 4, trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='<|im_end|>',
                                                   pad_token='<|endoftext|>')
  tokenizer.chat_template = CHATML_MARKED
  return tokenizer


class Rows:
  """A minimal in-memory Source (the protocol of jaxsft.data.sources) that records the rows it serves."""

  def __init__(self, rows, name='train.jsonl'):
    self.rows, self.name, self.reads = list(rows), name, []

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, i):
    self.reads.append(i)
    row = self.rows[i]
    if isinstance(row, str):  # A malformed line, as a JSON Lines source reports it.
      raise InputError(f'{self.origin(i)}: malformed JSON ({row})')
    return row

  def origin(self, i):
    return f'{self.name} line {i + 1}'

  def column_names(self):
    return list(self.rows[0])

  def fingerprint(self):
    return hashlib.sha256(json.dumps(self.rows).encode()).hexdigest()


def _chat(question: str, answer: str) -> dict:
  return {'messages': [{'role': 'user', 'content': question}, {'role': 'assistant', 'content': answer}]}


def _options(**kwargs) -> index_lib.Options:
  settings = dict(fmt='messages', max_length=96, assistant_only_loss=True, completion_only_loss=None,
                  dataset_text_field='text')
  settings.update(kwargs)
  return index_lib.Options(**settings)


def _index(rows, tokenizer, *, skip=False, **kwargs) -> index_lib.Index:
  return index_lib.build_index(rows if isinstance(rows, Rows) else Rows(rows), tokenizer, _options(**kwargs),
                               skip_bad_rows=skip)


def _many(n: int, seed: int = 0) -> list[dict]:
  """n conversations of varied length (5..~60 tokens with the test tokenizer)."""
  rng = np.random.default_rng(seed)
  return [_chat(f'What is {i}? ' + 'Tell me a story. ' * int(rng.integers(0, 2)),
                f'It is {i}. ' * int(rng.integers(1, 4))) for i in range(n)]


# ------------------------------------------------------------------------------------------ the length index


def test_index_counts_truncated_and_dropped_rows(tokenizer):
  rows = [_chat('What is 2 + 3?', 'It is 5.'),
          _chat('What is 2 + 3?', 'It is 5. ' * 8),  # Truncated, keeps assistant tokens.
          _chat('Tell me a long story. ' * 6, 'It is 5.')]  # Truncated, no assistant token left: dropped.
  index = _index(rows, tokenizer, max_length=24)
  assert list(index.kept) == [0, 1]
  assert (index.num_dropped, index.num_truncated, index.num_bad) == (1, 2, 0)
  for i, row in enumerate(rows):
    example = formats.tokenize_row(row, tokenizer, fmt='messages', max_length=24, assistant_only_loss=True,
                                   completion_only_loss=None, dataset_text_field='text', where='')
    assert index.lengths[i] == len(example) and index.num_targets[i] == example.loss_mask[1:].sum()
  assert index.lengths[1] == index.lengths[2] == 24 and index.lengths[0] < 24
  # Every token is a loss token without assistant_only_loss: nothing is dropped.
  everything = _index(rows, tokenizer, assistant_only_loss=False, max_length=24)
  assert (everything.num_dropped, everything.num_truncated) == (0, 2)


def test_index_bad_rows_fail_naming_the_row_or_are_skipped_and_counted(tokenizer):
  rows = [_chat('What is 2 + 3?', 'It is 5.'), {'messages': [{'role': 'user'}]}, 'Expecting value',
          _chat('What is 2 + 3?', 'It is 5.')]
  with pytest.raises(InputError, match=r"^train.jsonl line 2: column 'messages' message 0 needs a string "
                                       r".*config field 'skip_bad_rows'"):
    _index(rows, tokenizer)
  with pytest.raises(InputError, match=r'^train.jsonl line 3: malformed JSON \(Expecting value\)'):
    _index([rows[0], rows[3], rows[2]], tokenizer)
  index = _index(rows, tokenizer, skip=True)
  assert list(index.kept) == [0, 3] and index.num_bad == 2 and index.num_dropped == 0


def test_index_errors_when_nothing_is_left(tokenizer):
  with pytest.raises(InputError, match=r"^train.jsonl: all 1 rows were dropped: none has a loss token left .*"
                                       r'max_length=8'):
    _index([_chat('Tell me a long story.', 'It is 5.')], tokenizer, max_length=8)
  with pytest.raises(InputError, match=r'all 1 rows were dropped.*1 bad rows skipped'):
    _index(['Expecting value'], tokenizer, skip=True)


def test_index_is_cached_per_data_tokenizer_and_settings(tokenizer, tmp_path, monkeypatch):
  source = Rows(_many(20))
  first = index_lib.build_index(source, tokenizer, _options(), skip_bad_rows=False, cache_dir=str(tmp_path))
  assert len(list(tmp_path.glob('index-*.npz'))) == 1
  calls = []
  real = index_lib._row_facts
  monkeypatch.setattr(index_lib, '_row_facts', lambda *a: calls.append(1) or real(*a))
  again = index_lib.build_index(source, tokenizer, _options(), skip_bad_rows=False, cache_dir=str(tmp_path))
  assert not calls  # Read from the cache, nothing tokenized.
  for a, b in zip((first.lengths, first.num_targets, first.flags), (again.lengths, again.num_targets, again.flags)):
    np.testing.assert_array_equal(a, b)
  index_lib.build_index(source, tokenizer, _options(max_length=20), skip_bad_rows=False, cache_dir=str(tmp_path))
  assert calls and len(list(tmp_path.glob('index-*.npz'))) == 2  # Other settings: another entry.
  other = Rows(_many(20, seed=1))
  assert index_lib.cache_key(other, tokenizer, _options()) != index_lib.cache_key(source, tokenizer, _options())
  tokenizer2 = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer,
                                                    eos_token='<|im_end|>', pad_token='<|endoftext|>')
  tokenizer2.chat_template = CHATML_MARKED.replace('<|im_start|>', '<|im_start|> ')
  assert tokenizer2.chat_template != tokenizer.chat_template
  assert index_lib.cache_key(source, tokenizer2, _options()) != index_lib.cache_key(source, tokenizer, _options())


def test_index_with_worker_processes_equals_the_serial_pass(tokenizer, monkeypatch):
  monkeypatch.setattr(index_lib, '_MIN_ROWS_FOR_WORKERS', 1)
  monkeypatch.setattr(index_lib, '_CHUNK', 7)
  rows = _many(40)
  rows[23] = {'messages': 'not a list'}
  serial = _index(rows, tokenizer, skip=True)
  parallel = index_lib.build_index(Rows(rows), tokenizer, _options(), skip_bad_rows=True, num_workers=2)
  for a, b in zip((serial.lengths, serial.num_targets, serial.flags),
                  (parallel.lengths, parallel.num_targets, parallel.flags)):
    np.testing.assert_array_equal(a, b)
  assert parallel.num_bad == 1
  with pytest.raises(InputError, match=r'^train.jsonl line 24: '):
    index_lib.build_index(Rows(rows), tokenizer, _options(), skip_bad_rows=False, num_workers=2)


# ------------------------------------------------------------------------------------------------- the plan


@pytest.mark.parametrize('pack', [False, True])
def test_plan_rows_hold_every_kept_row_once(tokenizer, pack):
  rows = _many(30) + [_chat('Tell me a long story. ' * 24, 'It is 5.')]  # The last is dropped.
  index = _index(rows, tokenizer)
  assert index.num_dropped == 1
  plan = pipeline.make_plan(index, seq_len=96, pack=pack)
  assert sorted(plan.bins.members.tolist()) == list(range(30))
  for r in range(len(plan)):
    members = plan.bins.bin(r)
    assert plan.num_input_tokens[r] == index.lengths[members].sum() <= 96
    assert plan.num_targets[r] == index.num_targets[members].sum()
  if pack:
    assert len(plan) < 30 and plan.efficiency > 0.8
  else:
    assert len(plan) == 30 and all(len(plan.bins.bin(r)) == 1 for r in range(30))


# ------------------------------------------------------------------------------------------- step sources


def _steps(rows, tokenizer, *, pack, batch=4, accumulation=2, epochs=2.0, process_index=0, process_count=1,
           seed=3, shuffle=True, source=None):
  source = source or Rows(rows)
  index = index_lib.build_index(source, tokenizer, _options(), skip_bad_rows=False)
  plan = pipeline.make_plan(index, seq_len=96, pack=pack)
  geometry = pipeline.Geometry.create(len(plan), batch, accumulation, epochs, -1)
  source.reads.clear()
  return pipeline.StepSource(source, tokenizer, _options(), plan, geometry, seed=seed, shuffle=shuffle, pad_id=PAD,
                             process_index=process_index, process_count=process_count)


def _segments(batch) -> list[tuple[int, ...]]:
  """The token ids of every non-empty segment of a micro-batch, row by row."""
  out = []
  for ids, seg in zip(batch['input_ids'], batch['segment_ids']):
    for s in range(1, seg.max() + 1):
      out.append(tuple(ids[seg == s].tolist()))
  return out


@pytest.mark.parametrize('pack', [False, True])
def test_each_epoch_covers_every_row_once_and_counts_the_step_tokens(tokenizer, pack):
  rows = _many(29)
  steps = _steps(rows, tokenizer, pack=pack)
  g = steps.geometry
  expected = sorted(tuple(index_lib.tokenize(steps.source, i, tokenizer, _options()).input_ids.tolist())
                    for i in range(29))
  per_epoch = {}
  for s in range(len(steps)):
    element = steps[s]
    assert len(element['micro_batches']) == 2 and element['epoch'] == s // g.steps_per_epoch
    for batch in element['micro_batches']:
      assert set(batch) == set(packing.BATCH_KEYS)
      assert all(v.shape == (4, 96) and v.dtype == np.int32 for v in batch.values())
      per_epoch.setdefault(element['epoch'], []).extend(_segments(batch))
    assert element['num_targets'] == sum(batches.count_loss_tokens(b) for b in element['micro_batches']) > 0
    assert element['num_input_tokens'] == sum(int((b['segment_ids'] > 0).sum()) for b in element['micro_batches'])
  assert sorted(per_epoch) == [0, 1]
  for epoch_segments in per_epoch.values():
    assert sorted(epoch_segments) == expected
  assert per_epoch[0] != per_epoch[1]  # Reshuffled per epoch.


def test_last_step_of_an_epoch_is_filled_with_empty_rows(tokenizer):
  steps = _steps(_many(10), tokenizer, pack=False, batch=4, accumulation=2, epochs=1.0)  # 3 micro-batches.
  assert len(steps) == steps.geometry.total_steps == 2
  last = steps[1]['micro_batches']
  assert (last[0]['segment_ids'][:2, 0] == 1).all() and not last[0]['segment_ids'][2:].any()
  assert not last[1]['segment_ids'].any() and not last[1]['loss_mask'].any()
  assert (last[1]['input_ids'] == PAD).all()


def test_steps_are_deterministic_per_seed(tokenizer):
  def first_tokens(**kwargs):
    steps = _steps(_many(16), tokenizer, pack=False, **kwargs)
    return [steps[s]['micro_batches'][0]['input_ids'].tobytes() for s in range(len(steps))]

  assert first_tokens() == first_tokens()
  assert first_tokens(seed=4) != first_tokens()


@pytest.mark.parametrize('pack', [False, True])
def test_process_shards_are_disjoint_and_assemble_the_global_batch(tokenizer, pack):
  rows = _many(37)
  whole = _steps(rows, tokenizer, pack=pack, batch=6)
  parts = [_steps(rows, tokenizer, pack=pack, batch=6, process_index=p, process_count=3) for p in range(3)]
  assert len(whole) == len(parts[0])
  for s in range(len(whole)):
    expected = whole[s]
    got = [part[s] for part in parts]
    for p in range(3):
      assert got[p]['num_targets'] == expected['num_targets']  # The global count, on every process.
    for m, batch in enumerate(expected['micro_batches']):
      for key in packing.BATCH_KEYS:
        np.testing.assert_array_equal(np.concatenate([g['micro_batches'][m][key] for g in got]), batch[key])
  # Each process reads only its own rows: per epoch, the shards are disjoint and cover every row.
  g = whole.geometry
  for epoch in range(2):
    reads = []
    for part in parts:
      part.source.reads.clear()
      for s in range(epoch * g.steps_per_epoch, (epoch + 1) * g.steps_per_epoch):
        part[s]
      reads.append(part.source.reads[:])
    assert all(len(r) == len(set(r)) for r in reads)
    assert sorted(sum(reads, [])) == list(range(37))


@pytest.mark.parametrize('pack', [False, True])
def test_restored_loader_continues_exactly(tokenizer, pack):
  rows = _many(33)
  reference = list(pipeline.Loader(_steps(rows, tokenizer, pack=pack, epochs=3.0)))
  loader = pipeline.Loader(_steps(rows, tokenizer, pack=pack, epochs=3.0))
  consumed = [next(loader) for _ in range(len(reference) // 2 + 1)]  # Mid-epoch.
  state = json.loads(json.dumps(loader.get_state()))  # The state survives serialisation.
  restored = pipeline.Loader(_steps(rows, tokenizer, pack=pack, epochs=3.0))
  restored.set_state(state)
  rest = list(restored)
  assert len(consumed) + len(rest) == len(reference)
  for got, want in zip(consumed + rest, reference):
    assert got['num_targets'] == want['num_targets'] and got['epoch'] == want['epoch']
    for a, b in zip(got['micro_batches'], want['micro_batches']):
      for key in packing.BATCH_KEYS:
        np.testing.assert_array_equal(a[key], b[key])
