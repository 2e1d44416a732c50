"""`formats.tokenize_rows` (batched render-then-encode) gives exactly what `tokenize_row` gives, row by row.

Over many varied rows (multi-turn, system prompts, tools, template variables, ShareGPT rows, unicode,
special tokens inside content, long rows truncated, bad rows) for the tiny tokenizer shipped in
jaxsft/assets/tiny, a ChatML tokenizer with a tools-aware template built on the fly, and a Llama-style
tokenizer whose post-processor adds a bos token (the `text` rows' special tokens). Also checks that the
batched path is really taken for the rows it covers, so the equality is not a comparison of the slow path
with itself.
"""

import os

import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from jaxsft.data import formats
from jaxsft.errors import InputError

TINY = os.path.join(os.path.dirname(formats.__file__), '..', 'assets', 'tiny')

# Qwen2.5-like ChatML: a tools block in the system turn, tool calls, a template variable.
CHATML_TOOLS = (
    "{%- if tools %}{{- '<|im_start|>system\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\n\n# Tools\n<tools>' }}{%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\n</tools><|im_end|>\n' }}{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}{%- if message['content'] %}{{- message['content'] }}{%- endif %}"
    "{%- if message.tool_calls %}{%- for call in message.tool_calls %}"
    "{{- '\n<tool_call>\n' + (call.function | tojson) + '\n</tool_call>' }}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and reasoning_effort is defined %}"
    "{{- ' [effort ' + reasoning_effort + ']' }}{%- endif %}"
    "{{- '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
# Fails on rows whose first message is from the assistant (a template error, reported on the row).
CHATML_STRICT = ("{%- if messages[0]['role'] == 'assistant' %}{{ raise_exception('Conversation must start with "
                 "a user message') }}{%- endif %}" + CHATML_TOOLS)

SPECIAL = ['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|begin_of_text|>', '<|eot_id|>']
CORPUS = ['system user assistant You are a helpful assistant.', 'What is 2 + 3? It is 5. Let me think.',
          '<think>\nadd them up\n</think>\n\nThe answer is 5.', 'def f(x):\n    return x * 2  # double\n',
          'Écrire un café à Zürich — naïve façade; 東京で寿司を食べる。 Ελληνικά 😀👍🏽',
          'tools tool_call name arguments weather city get_weather {"type": "object"}']

TOOLS = [{'type': 'function', 'function': {'name': 'get_weather', 'description': 'Weather of a city.',
                                            'parameters': {'type': 'object',
                                                           'properties': {'city': {'type': 'string'}}}}}]
WORDS = ('the answer is so we add x y 2 + 3 = 5 therefore wait let me check again café 東京 😀 naïve '
         'def return\n \n\n\t  { } [ ] " \\ <think> </think> ... — 10% 3.14 e^{i pi}').split(' ')


def _train(special, corpus, vocab_size=600):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(corpus * 4, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  return tok


@pytest.fixture(scope='module')
def tiny():
  return transformers.AutoTokenizer.from_pretrained(TINY)


@pytest.fixture(scope='module')
def chatml():
  tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=_train(SPECIAL, CORPUS), eos_token='<|im_end|>',
                                                   pad_token='<|endoftext|>')
  tokenizer.chat_template = CHATML_STRICT
  return tokenizer


@pytest.fixture(scope='module')
def llama():
  tok = _train(SPECIAL, CORPUS)
  bos = '<|begin_of_text|>'
  tok.post_processor = processors.TemplateProcessing(single=f'{bos} $A', pair=f'{bos} $A $B',
                                                     special_tokens=[(bos, tok.token_to_id(bos))])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token='<|eot_id|>',
                                              pad_token='<|endoftext|>')


def _text(rng, num_words: int) -> str:
  return ' '.join(rng.choice(WORDS, num_words)).replace(' \n ', '\n')


def _message_rows(seed: int = 0) -> list:
  """Varied messages rows: good ones of every shape, then bad ones (each bad in one way)."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(60):
    messages = []
    if i % 3 == 0:
      messages.append({'role': 'system', 'content': _text(rng, int(rng.integers(1, 12)))})
    for _ in range(int(rng.integers(1, 4))):  # 1-3 user/assistant exchanges.
      messages.append({'role': 'user', 'content': _text(rng, int(rng.integers(1, 30)))})
      length = int(rng.choice([3, 40, 400]))  # Some rows far past max_length.
      messages.append({'role': 'assistant', 'content': f'<think>\n{_text(rng, length)}\n</think>\n\n'
                                                      f'{_text(rng, 5)}'})
    row = {'messages': messages}
    if i % 7 == 0:
      row['tools'] = TOOLS
      messages.insert(len(messages) - 1, {'role': 'assistant', 'content': None, 'tool_calls': [
          {'type': 'function', 'function': {'name': 'get_weather', 'arguments': {'city': 'Zürich'}}}]})
      messages.insert(len(messages) - 1, {'role': 'tool', 'content': '{"temp": 21}'})
    if i % 11 == 0:
      row['tools'] = '[{"type": "function", "function": {"name": "noop"}}]'  # Tools as a JSON string.
    if i % 5 == 0:
      row['chat_template_kwargs'] = {'reasoning_effort': 'high'}  # A template variable.
    if i % 13 == 0:
      row = {'conversations': [{'from': m['role'], 'value': m['content']} for m in messages
                               if m.get('content') is not None]}
    rows.append(row)
  rows += [
      {'messages': [{'role': 'user', 'content': ''}, {'role': 'assistant', 'content': '   '}]},  # Empty-ish.
      {'messages': [{'role': 'user', 'content': 'say <|im_end|> or <|im_start|>'},  # Special tokens in content.
                    {'role': 'assistant', 'content': '<|endoftext|> done'}]},
      {'messages': [{'role': 'user', 'content': '😀' * 50 + '\u0301\u200b\ufeff'},
                    {'role': 'assistant', 'content': '東京' * 40}]},
      # chat_template_kwargs naming an argument of apply_chat_template itself: only `tokenize_row` is sure.
      {'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}],
       'chat_template_kwargs': {'continue_final_message': True}},
      {'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}],
       'chat_template_kwargs': {'return_dict': False}},
      # Bad rows.
      {'text': 'no messages column'},
      {'messages': 'not a list'},
      {'messages': []},
      {'messages': [{'content': 'no role'}]},
      {'messages': [{'role': 'user', 'content': 3}]},
      {'messages': [{'role': 'user', 'content': 'x'}], 'tools': '{bad json'},
      {'messages': [{'role': 'user', 'content': 'x'}], 'tools': {'not': 'a list'}},
      {'messages': [{'role': 'user', 'content': 'x'}], 'chat_template_kwargs': 'not an object'},
      {'messages': [{'role': 'assistant', 'content': 'I start'}, {'role': 'user', 'content': 'x'}]},
      'not a row',
  ]
  return rows


def _text_rows(tokenizer, seed: int = 1) -> list:
  rng = np.random.default_rng(seed)
  rows = [{'body': _text(rng, int(rng.choice([1, 10, 200])))} for _ in range(40)]
  rows += [{'body': 'ends with eos already' + tokenizer.eos_token}, {'body': ''}, {'body': '😀 東京 café'},
           {'body': 7}, {'body': None}, {'text': 'wrong column'}, ['not', 'a', 'row']]
  return rows


def _assert_same(rows, tokenizer, **settings):
  assert formats._encodes_by_call(tokenizer)  # pylint: disable=protected-access  (else nothing is batched)
  wheres = [f'data.jsonl line {i + 1}' for i in range(len(rows))]
  batched = formats.tokenize_rows(rows, tokenizer, wheres=wheres, **settings)
  assert len(batched) == len(rows)
  num_examples = num_errors = 0
  for row, where, got in zip(rows, wheres, batched):
    try:
      want = formats.tokenize_row(row, tokenizer, where=where, **settings)
    except InputError as e:
      assert isinstance(got, InputError), f'{where}: expected the error {e}, got an example'
      assert str(got) == str(e), where
      num_errors += 1
      continue
    assert isinstance(got, formats.Example), f'{where}: {got}'
    assert got.input_ids.dtype == want.input_ids.dtype and got.loss_mask.dtype == want.loss_mask.dtype
    np.testing.assert_array_equal(got.input_ids, want.input_ids, err_msg=where)
    np.testing.assert_array_equal(got.loss_mask, want.loss_mask, err_msg=where)
    num_examples += 1
  return num_examples, num_errors


@pytest.mark.parametrize('max_length', [None, 64])
@pytest.mark.parametrize('assistant_only_loss', [False, True])
@pytest.mark.parametrize('name', ['tiny', 'chatml'])
def test_messages_rows_equal_tokenize_row(request, name, assistant_only_loss, max_length):
  tokenizer = request.getfixturevalue(name)
  rows = _message_rows()
  num_examples, num_errors = _assert_same(rows, tokenizer, fmt='messages', max_length=max_length,
                                          assistant_only_loss=assistant_only_loss, completion_only_loss=None,
                                          dataset_text_field='text')
  assert num_examples >= 56 and num_errors >= 11  # The tiny template also fails on the tool-call rows.


@pytest.mark.parametrize('max_length', [None, 32])
@pytest.mark.parametrize('name', ['tiny', 'chatml', 'llama'])
def test_text_rows_equal_tokenize_row(request, name, max_length):
  tokenizer = request.getfixturevalue(name)
  num_examples, num_errors = _assert_same(_text_rows(tokenizer), tokenizer, fmt='text', max_length=max_length,
                                          assistant_only_loss=False, completion_only_loss=None,
                                          dataset_text_field='body')
  assert num_examples == 43 and num_errors == 4


def test_prompt_completion_rows_equal_tokenize_row(chatml):
  conversations = [row['messages'] for row in _message_rows()[:20] if 'messages' in row]
  rows = [{'prompt': c[:-1], 'completion': c[-1:]} for c in conversations]
  rows += [{'prompt': 'What is 2 + 3?', 'completion': 'It is 5.'}, {'prompt': 'a'}]
  for completion_only_loss in (None, False):
    num_examples, num_errors = _assert_same(rows, chatml, fmt='prompt_completion', max_length=48,
                                            assistant_only_loss=False, completion_only_loss=completion_only_loss,
                                            dataset_text_field='text')
    assert num_examples == len(rows) - 1 and num_errors == 1


def test_batched_path_is_taken_and_falls_back_only_where_needed(chatml, monkeypatch):
  """Only the rows the batched path cannot cover reach `tokenize_row`; the rest are encoded in one call."""
  rows = _message_rows()
  settings = dict(fmt='messages', max_length=None, assistant_only_loss=False, completion_only_loss=None,
                  dataset_text_field='text', where='')
  fallback = [row for row in rows if not isinstance(row, dict) or 'continue_final_message' in str(row)
              or 'return_dict' in str(row)]
  good = []
  for row in rows:
    try:
      formats.tokenize_row(row, chatml, **settings)
      good.append(row)
    except InputError:
      pass
  calls, encodes = [], []
  real_row, real_backend = formats.tokenize_row, chatml.backend_tokenizer
  monkeypatch.setattr(formats, 'tokenize_row', lambda row, *a, **k: calls.append(row) or real_row(row, *a, **k))

  class Spy:  # The Rust tokenizer's attributes are read-only: wrap it instead.
    def __getattr__(self, name):
      return getattr(real_backend, name)

    def encode_batch_fast(self, texts, **kwargs):
      encodes.append(len(texts))
      return real_backend.encode_batch_fast(texts, **kwargs)

  monkeypatch.setattr(type(chatml), 'backend_tokenizer', property(lambda self: Spy()))
  formats.tokenize_rows(rows, chatml, wheres=[''] * len(rows), **{k: v for k, v in settings.items() if k != 'where'})
  assert calls == fallback and len(calls) == 3
  assert encodes == [len([row for row in good if row not in fallback])] and encodes[0] >= 60


def test_backend_with_truncation_set_is_not_called_directly(chatml):
  """A backend left with truncation on (by a caller) is encoded through `tokenizer(texts)`, which resets it."""
  rows = [row for row in _message_rows() if isinstance(row, dict) and 'messages' in row][:20]
  settings = dict(fmt='messages', max_length=None, assistant_only_loss=False, completion_only_loss=None,
                  dataset_text_field='text')
  chatml.backend_tokenizer.enable_truncation(max_length=8)
  try:
    batched = formats.tokenize_rows(rows, chatml, wheres=[''] * len(rows), **settings)
  finally:
    chatml.backend_tokenizer.no_truncation()
  assert max(len(example) for example in batched) > 8
  for row, example in zip(rows, batched):
    np.testing.assert_array_equal(example.input_ids, formats.tokenize_row(row, chatml, where='', **settings).input_ids)


def test_tokenizer_that_overrides_encoding_goes_row_by_row(chatml, monkeypatch):
  class Custom(type(chatml)):
    def _encode_plus(self, *args, **kwargs):  # pylint: disable=useless-parent-delegation
      return super()._encode_plus(*args, **kwargs)

  custom = Custom(tokenizer_object=chatml.backend_tokenizer, eos_token='<|im_end|>', pad_token='<|endoftext|>')
  custom.chat_template = chatml.chat_template
  calls = []
  real_row = formats.tokenize_row
  monkeypatch.setattr(formats, 'tokenize_row', lambda row, *a, **k: calls.append(row) or real_row(row, *a, **k))
  rows = [{'text': 'one'}, {'text': 'two'}]
  formats.tokenize_rows(rows, custom, fmt='text', max_length=None, assistant_only_loss=False,
                        completion_only_loss=None, dataset_text_field='text', wheres=['', ''])
  assert calls == rows


def test_caller_errors_raise(tiny):
  with pytest.raises(ValueError, match='unknown format'):
    formats.tokenize_rows([{}], tiny, fmt='chat', max_length=None, assistant_only_loss=False,
                          completion_only_loss=None, dataset_text_field='text', wheres=[''])
  with pytest.raises(ValueError, match='1 rows but 2 origins'):
    formats.tokenize_rows([{}], tiny, fmt='text', max_length=None, assistant_only_loss=False,
                          completion_only_loss=None, dataset_text_field='text', wheres=['', ''])


# ---------------------------------------------------------------- the callers: the index pass, the step source


class Rows:
  """An in-memory Source; a str row reads as a malformed JSON line."""

  def __init__(self, rows):
    self.rows, self.name = list(rows), 'train.jsonl'

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, i):
    if isinstance(self.rows[i], str):
      raise InputError(f'{self.origin(i)}: malformed JSON ({self.rows[i]})')
    return self.rows[i]

  def origin(self, i):
    return f'{self.name} line {i + 1}'

  def column_names(self):
    return list(self.rows[0])

  def fingerprint(self):
    return str(len(self.rows))


def _chat_rows(n: int, seed: int = 0) -> list:
  rng = np.random.default_rng(seed)
  return [{'messages': [{'role': 'user', 'content': _text(rng, int(rng.integers(1, 10)))},
                        {'role': 'assistant', 'content': _text(rng, int(rng.integers(1, 60)))}]} for _ in range(n)]


@pytest.mark.parametrize('stop_at_bad', [False, True])
@pytest.mark.parametrize('assistant_only_loss', [False, True])
def test_index_facts_equal_the_row_by_row_facts(tiny, monkeypatch, stop_at_bad, assistant_only_loss):
  from jaxsft.data import index as index_lib  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(index_lib, '_CHUNK', 7)  # Several chunks, bad rows inside and at their edges.
  rows = _chat_rows(40)
  rows[9] = 'Expecting value'  # Unreadable.
  rows[20] = {'messages': 'not a list'}  # Reads, does not tokenize.
  rows[21] = 'Expecting value'
  source = Rows(rows)
  options = index_lib.Options(fmt='messages', max_length=48, assistant_only_loss=assistant_only_loss,
                              completion_only_loss=None, dataset_text_field='text')
  indices = np.arange(3, 40)
  facts = index_lib._facts  # pylint: disable=protected-access
  lengths, targets, flags = facts(source, indices, tiny, options, stop_at_bad)
  for k, i in enumerate(indices):
    if stop_at_bad and i > 9:
      assert flags[k] == index_lib.NOT_DONE and lengths[k] == targets[k] == 0
      continue
    want = index_lib._row_facts(source, int(i), tiny, options)[:3]  # pylint: disable=protected-access
    assert (lengths[k], targets[k], flags[k]) == want, i
  assert np.count_nonzero(flags & index_lib.TRUNCATED) > 0 and np.count_nonzero(flags & index_lib.BAD) == (
      1 if stop_at_bad else 3)


def test_step_source_tokenizes_a_step_in_one_call_with_the_same_batches(tiny, monkeypatch):
  from jaxsft.data import index as index_lib  # pylint: disable=import-outside-toplevel
  from jaxsft.data import packing  # pylint: disable=import-outside-toplevel
  from jaxsft.data import pipeline  # pylint: disable=import-outside-toplevel
  source = Rows(_chat_rows(50, seed=3))
  options = index_lib.Options(fmt='messages', max_length=64, assistant_only_loss=False, completion_only_loss=None,
                              dataset_text_field='text')
  index = index_lib.build_index(source, tiny, options, skip_bad_rows=False)
  plan = pipeline.make_plan(index, seq_len=64, pack=True)
  geometry = pipeline.Geometry.create(len(plan), 4, 2, 1.0, -1)
  calls = []
  real = formats.tokenize_rows
  monkeypatch.setattr(formats, 'tokenize_rows', lambda rows, *a, **k: calls.append(len(rows)) or real(rows, *a, **k))
  for process_index in range(2):
    steps = pipeline.StepSource(source, tiny, options, plan, geometry, seed=0, shuffle=True, pad_id=0,
                                process_index=process_index, process_count=2)
    for step in range(len(steps)):
      calls.clear()
      element = steps[step]
      assert len(calls) == 1  # The whole step (every micro-batch of this process) in one call.
      lo, hi = process_index * steps.local_rows, (process_index + 1) * steps.local_rows
      for rows, batch in zip(steps.global_rows(step), element['micro_batches']):
        want = [packing.pack_row([index_lib.tokenize(source, int(i), tiny, options) for i in plan.bins.bin(int(r))],
                                 64, 0) for r in rows[lo:hi]]
        want += [packing.empty_row(64, 0)] * (steps.local_rows - len(want))
        for key in packing.BATCH_KEYS:
          np.testing.assert_array_equal(batch[key], np.stack([row[key] for row in want]), err_msg=f'{step} {key}')


def test_step_source_raises_the_first_error_in_row_order(tiny):
  from jaxsft.data import index as index_lib  # pylint: disable=import-outside-toplevel
  from jaxsft.data import pipeline  # pylint: disable=import-outside-toplevel
  rows = _chat_rows(6)
  source = Rows(rows)
  options = index_lib.Options(fmt='messages', max_length=512, assistant_only_loss=False, completion_only_loss=None,
                              dataset_text_field='text')
  index = index_lib.build_index(source, tiny, options, skip_bad_rows=False)
  plan = pipeline.make_plan(index, seq_len=512, pack=False)
  steps = pipeline.StepSource(source, tiny, options, plan, pipeline.Geometry.create(len(plan), 6, 1, 1.0, -1),
                              seed=0, shuffle=False, pad_id=0)
  source.rows[2] = {'messages': 'not a list'}  # The data changed after the index was built.
  source.rows[4] = 'Expecting value'
  with pytest.raises(InputError, match=r"^train.jsonl line 3: column 'messages' must be a list"):
    steps[0]
  source.rows[2] = rows[2]
  with pytest.raises(InputError, match=r'^train.jsonl line 5: malformed JSON'):
    steps[0]
