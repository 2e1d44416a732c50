"""tokenize_dataset (counting, dropping, errors) and padded_batches (shapes, contents, determinism)."""

import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxsft.data import formats
from jaxsft.data import pipeline
from jaxsft.errors import InputError

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


def _chat(question: str, answer: str) -> dict:
  return {'messages': [{'role': 'user', 'content': question}, {'role': 'assistant', 'content': answer}]}


def _tokenize(rows, tokenizer, **kwargs) -> pipeline.TokenizedData:
  settings = dict(max_length=24, assistant_only_loss=True, completion_only_loss=None, dataset_text_field='text',
                  origin=lambda i: f'train.jsonl line {i + 1}')
  settings.update(kwargs)
  return pipeline.tokenize_dataset(rows, tokenizer, **settings)


def test_tokenize_dataset_counts_truncated_and_dropped(tokenizer):
  rows = [_chat('What is 2 + 3?', 'It is 5.'),
          _chat('What is 2 + 3?', 'It is 5. ' * 8),  # Truncated, keeps assistant tokens.
          _chat('Tell me a long story. ' * 6, 'It is 5.')]  # Truncated, no assistant token left: dropped.
  data = _tokenize(rows, tokenizer)
  assert (data.num_rows, data.num_dropped, data.num_truncated, len(data.examples)) == (3, 1, 2, 2)
  assert data.fmt == 'messages' and data.assistant_mask_method == 'generation_markers'
  expected = [formats.tokenize_row(row, tokenizer, fmt='messages', max_length=24, assistant_only_loss=True,
                                   completion_only_loss=None, dataset_text_field='text', where='')
              for row in rows[:2]]
  for got, want in zip(data.examples, expected):
    np.testing.assert_array_equal(got.input_ids, want.input_ids)
    np.testing.assert_array_equal(got.loss_mask, want.loss_mask)
  assert len(data.examples[1]) == 24 and len(data.examples[0]) < 24
  assert data.num_loss_tokens == sum(int(e.loss_mask[1:].sum()) for e in data.examples) > 0
  # All tokens are loss tokens without assistant_only_loss: nothing is dropped.
  everything = _tokenize(rows, tokenizer, assistant_only_loss=False)
  assert (everything.num_dropped, everything.num_truncated, everything.assistant_mask_method) == (0, 2, None)


def test_tokenize_dataset_errors(tokenizer):
  rows = [_chat('What is 2 + 3?', 'It is 5.'), {'messages': [{'role': 'user'}]}]
  with pytest.raises(InputError, match=r"^train.jsonl line 2: column 'messages' message 0 needs a string 'content'"):
    _tokenize(rows, tokenizer)
  with pytest.raises(InputError, match=r"^all 1 rows were dropped: none has a loss token left .*max_length=8"):
    _tokenize([_chat('Tell me a long story.', 'It is 5.')], tokenizer, max_length=8)
  with pytest.raises(InputError, match=r"'assistant_only_loss': needs conversational rows.*plain text"):
    _tokenize([{'text': 'It is 5.'}], tokenizer)
  with pytest.raises(InputError, match=r"dataset columns \['question'\]"):
    _tokenize([{'question': 'It is 5.'}], tokenizer)
  with pytest.raises(InputError, match='no rows'):
    _tokenize([], tokenizer)


def test_tokenize_dataset_reads_datasets_columns(tokenizer):
  datasets = pytest.importorskip('datasets')
  rows = [{'prompt': 'What is 2 + 3?', 'completion': ' It is 5.'}, {'prompt': 'What is', 'completion': ' 5'}]
  data = _tokenize(datasets.Dataset.from_list(rows), tokenizer, assistant_only_loss=False, origin=None)
  assert data.fmt == 'prompt_completion' and len(data.examples) == 2
  first = data.examples[0]
  assert tokenizer.decode(first.input_ids[first.loss_mask == 1]) == ' It is 5.<|im_end|>'


def test_num_batches():
  assert [pipeline.num_batches(n, 4) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]


def _examples(lengths: list[int]) -> list[formats.Example]:
  """Example i has tokens 100*i+1.. and loss tokens on its second half."""
  out = []
  for i, n in enumerate(lengths):
    mask = np.zeros(n, np.int32)
    mask[n // 2:] = 1
    out.append(formats.Example(np.arange(100 * i + 1, 100 * i + 1 + n, dtype=np.int32), mask))
  return out


def _epoch(examples, **kwargs) -> list[dict[str, np.ndarray]]:
  settings = dict(batch_size=3, seq_len=8, pad_id=PAD, seed=7, epoch=0)
  settings.update(kwargs)
  return list(pipeline.padded_batches(examples, **settings))


def test_padded_batches_shapes_and_contents():
  examples = _examples([3, 8, 5, 1, 6, 2, 7])
  batches = _epoch(examples, shuffle=False)
  assert len(batches) == pipeline.num_batches(len(examples), 3) == 3
  for batch in batches:
    assert sorted(batch) == ['input_ids', 'loss_mask', 'positions', 'segment_ids']
    for value in batch.values():
      assert value.shape == (3, 8) and value.dtype == np.int32
  rows = [{k: v[r] for k, v in b.items()} for b in batches for r in range(3)]
  for example, row in zip(examples, rows):  # Unshuffled: in order.
    n = len(example)
    np.testing.assert_array_equal(row['input_ids'], np.r_[example.input_ids, [PAD] * (8 - n)])
    np.testing.assert_array_equal(row['positions'], np.r_[np.arange(n), [0] * (8 - n)])
    np.testing.assert_array_equal(row['segment_ids'], np.r_[[1] * n, [0] * (8 - n)])
    np.testing.assert_array_equal(row['loss_mask'], np.r_[example.loss_mask, [0] * (8 - n)])
  for row in rows[len(examples):]:  # The last partial batch is completed with empty rows.
    np.testing.assert_array_equal(row['input_ids'], [PAD] * 8)
    for key in ('positions', 'segment_ids', 'loss_mask'):
      assert not row[key].any()


def test_padded_batches_shuffle_is_deterministic_per_seed_and_epoch():
  examples = _examples([2] * 10)

  def order(**kwargs):
    batches = _epoch(examples, **kwargs)
    firsts = np.concatenate([b['input_ids'][:, 0] for b in batches])
    return [int(t) // 100 for t in firsts[firsts != PAD]]

  first = order(epoch=0)
  assert sorted(first) == list(range(10))  # Every example exactly once per epoch.
  assert order(epoch=0) == first
  assert order(epoch=1) != first
  assert order(seed=8) != first
  assert order(shuffle=False) == list(range(10))


def test_padded_batches_rejects_examples_longer_than_seq_len():
  with pytest.raises(ValueError, match='does not fit seq_len=8'):
    _epoch(_examples([9]))
