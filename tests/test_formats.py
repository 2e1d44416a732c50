"""Rows → token ids + loss masks: equal to TRL 1.16's SFTTrainer dataset preparation; assistant masks."""

import types

import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from jaxsft.data import formats
from jaxsft.errors import InputError

SPECIAL = ['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|begin_of_text|>', '<|start_header_id|>',
           '<|end_header_id|>', '<|eot_id|>']
CORPUS = ['system user assistant You are a helpful assistant.', 'What is 2 + 3? It is 5.',
          '<think>\nadd them up\n</think>\n\nThe answer is 5.', 'Hello there! How are you today?\n\n',
          'Tell me a story about a cat. Once upon a time, a cat sat.', 'assistant::) user::)']

# Stock ChatML (Qwen2.5 style, no markers) and a marked version: the assistant content and its
# end-of-turn token inside {% generation %}.
CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
          '{%- endif %}')
CHATML_MARKED = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\n' }}"
                 "{%- if message['role'] == 'assistant' %}{%- generation %}{{- message['content'] + '<|im_end|>' }}"
                 "{%- endgeneration %}{{- '\n' }}{%- else %}{{- message['content'] + '<|im_end|>' + '\n' }}"
                 "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
                 '{%- endif %}')
# Stock Llama 3 (Meta's template, as in TRL's llama3.jinja) and a marked version.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_MARKED = ("{%- for message in messages %}{%- if loop.index0 == 0 %}{{- bos_token }}{%- endif %}"
                 "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
                 "{%- if message['role'] == 'assistant' %}{%- generation %}"
                 "{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}"
                 "{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}{%- endfor %}"
                 "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
                 '{%- endif %}')
# ChatML that strips the reasoning of every assistant turn but the last (as Qwen3's template does).
CHATML_STRIPS_THINKING = (
    "{%- for message in messages %}{%- set content = message['content'] %}"
    "{%- if message['role'] == 'assistant' and not loop.last %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")

SYSTEM = {'role': 'system', 'content': 'You are a helpful assistant.'}
CONVERSATIONS = [
    [{'role': 'user', 'content': 'What is 2 + 3?'}, {'role': 'assistant', 'content': 'It is 5.'}],
    [SYSTEM, {'role': 'user', 'content': 'What is 2 + 3?'},
     {'role': 'assistant', 'content': '<think>\nadd them up\n</think>\n\nThe answer is 5.'},
     {'role': 'user', 'content': 'Hello there!'}, {'role': 'assistant', 'content': 'How are you today?'}],
    # Content starting with a newline (it merges with the header's newline) and ending with whitespace.
    [SYSTEM, {'role': 'user', 'content': 'Tell me a story.'},
     {'role': 'assistant', 'content': '\nOnce upon a time, a cat sat.\n\n'},
     {'role': 'user', 'content': 'And then?'}, {'role': 'assistant', 'content': 'The end.'},
     {'role': 'user', 'content': 'Thanks!'}],
]


def make_tokenizer(chat_template: str | None, *, llama: bool = False) -> transformers.PreTrainedTokenizerFast:
  """A tiny byte-level BPE tokenizer; `llama=True`: Llama-3 special tokens and a bos post-processor."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
      vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  if llama:
    bos = '<|begin_of_text|>'
    tok.post_processor = processors.TemplateProcessing(single=f'{bos} $A', pair=f'{bos} $A $B',
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token='<|eot_id|>',
                                                     pad_token='<|endoftext|>')
  else:
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='<|im_end|>',
                                                     pad_token='<|endoftext|>')
  tokenizer.chat_template = chat_template
  return tokenizer


@pytest.fixture(scope='module')
def chatml_marked():
  return make_tokenizer(CHATML_MARKED)


def _row(row: dict, tokenizer, *, max_length=None, assistant_only_loss=False, completion_only_loss=None,
         fmt=None, text_field='text') -> formats.Example:
  fmt = fmt or formats.detect_format(list(row), text_field)
  return formats.tokenize_row(row, tokenizer, fmt=fmt, max_length=max_length,
                              assistant_only_loss=assistant_only_loss, completion_only_loss=completion_only_loss,
                              dataset_text_field=text_field, where='data.jsonl line 3')


# --- detect_format -------------------------------------------------------------------------------------

def test_detect_format():
  assert formats.detect_format(['messages']) == 'messages'
  assert formats.detect_format(['conversations', 'id']) == 'messages'
  assert formats.detect_format(['prompt', 'completion', 'messages']) == 'prompt_completion'
  assert formats.detect_format(['text']) == 'text'
  assert formats.detect_format(['body', 'id'], dataset_text_field='body') == 'text'
  with pytest.raises(InputError, match=r"columns \['id', 'prompt'\].*'messages'.*'completion'.*'text'"):
    formats.detect_format(['prompt', 'id'])


# --- assistant masks -----------------------------------------------------------------------------------

@pytest.mark.parametrize('plain,marked,llama', [(CHATML, CHATML_MARKED, False), (LLAMA3, LLAMA3_MARKED, True)],
                         ids=['chatml', 'llama3'])
@pytest.mark.parametrize('conversation', range(len(CONVERSATIONS)))
def test_derived_mask_equals_transformers_mask_of_marked_template(plain, marked, llama, conversation):
  messages = CONVERSATIONS[conversation]
  tokenizer = make_tokenizer(plain, llama=llama)
  assert formats.assistant_mask_method(tokenizer) == 'derived'
  ids, mask = formats.assistant_mask(tokenizer, messages)

  reference = tokenizer.apply_chat_template(messages, chat_template=marked, return_dict=True,
                                            return_assistant_tokens_mask=True)
  assert ids == list(tokenizer.apply_chat_template(messages, return_dict=True)['input_ids'])
  assert ids == list(reference['input_ids'])
  assert mask == list(reference['assistant_masks'])
  assert 0 < sum(mask) < len(mask)
  # The marked template through assistant_mask takes transformers' path and gives the same.
  assert formats.assistant_mask_method(tokenizer, chat_template=marked) == 'generation_markers'
  assert formats.assistant_mask(tokenizer, messages, chat_template=marked) == (ids, mask)
  # Each assistant turn's masked run ends on the end-of-turn token.
  end = tokenizer.convert_tokens_to_ids('<|eot_id|>' if llama else '<|im_end|>')
  runs_end = [t for t in range(len(mask)) if mask[t] and (t + 1 == len(mask) or not mask[t + 1])]
  assert [ids[t] for t in runs_end] == [end] * sum(m['role'] == 'assistant' for m in messages)


def test_derived_mask_marks_tokens_straddling_the_turn_start():
  """A token spanning the generation prompt's end and the content's start is marked, as transformers does."""
  plain = ("{%- for m in messages %}{{- m['role'] + ':' + m['content'] + '<|im_end|>' }}{%- endfor %}"
           "{%- if add_generation_prompt %}{{- 'assistant:' }}{%- endif %}")
  marked = ("{%- for m in messages %}{{- m['role'] + ':' }}{%- if m['role'] == 'assistant' %}{%- generation %}"
            "{{- m['content'] + '<|im_end|>' }}{%- endgeneration %}{%- else %}{{- m['content'] + '<|im_end|>' }}"
            "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- 'assistant:' }}{%- endif %}")
  tokenizer = make_tokenizer(plain)
  messages = [{'role': 'user', 'content': ':)'}, {'role': 'assistant', 'content': ':) ok'}]
  ids, mask = formats.assistant_mask(tokenizer, messages)
  assert '::)' in tokenizer.convert_ids_to_tokens(ids)  # The straddling token exists.
  reference = tokenizer.apply_chat_template(messages, chat_template=marked, return_dict=True,
                                            return_assistant_tokens_mask=True)
  assert (ids, mask) == (list(reference['input_ids']), list(reference['assistant_masks']))


def test_derived_mask_with_think_trace_covers_reasoning():
  tokenizer = make_tokenizer(CHATML)
  ids, mask = formats.assistant_mask(tokenizer, CONVERSATIONS[1])
  masked_text = tokenizer.decode([i for i, m in zip(ids, mask) if m])
  assert masked_text == ('<think>\nadd them up\n</think>\n\nThe answer is 5.<|im_end|>'
                         'How are you today?<|im_end|>')


def test_derived_mask_refuses_template_that_rewrites_past_turns():
  tokenizer = make_tokenizer(CHATML_STRIPS_THINKING)
  with pytest.raises(InputError, match="assistant_only_loss.*assistant message 2.*cannot be diffed"):
    formats.assistant_mask(tokenizer, CONVERSATIONS[1])
  # A single assistant turn is the last one: nothing is rewritten, the diff is valid.
  ids, mask = formats.assistant_mask(tokenizer, CONVERSATIONS[0])
  assert sum(mask) > 0


def test_real_stock_templates_against_trl_training_templates():
  """On TRL's stock Llama 3 / Qwen2.5 templates the derived mask equals TRL's marked training templates
  (which TRL 1.16 swaps in for assistant_only_loss), except that TRL's Qwen2.5 variant also marks the
  newline after `<|im_start|>assistant` and the one after `<|im_end|>`."""
  trl = pytest.importorskip('trl')
  import pathlib
  templates = pathlib.Path(trl.__file__).parent / 'chat_templates'
  for name, llama in (('llama3', True), ('qwen2_5', False)):
    stock = (templates / f'{name}.jinja').read_text(encoding='utf-8')
    training = (templates / f'{name}_training.jinja').read_text(encoding='utf-8')
    tokenizer = make_tokenizer(stock, llama=llama)
    newline = tokenizer.convert_tokens_to_ids(tokenizer.tokenize('\n'))[0]
    for messages in CONVERSATIONS[:2]:
      ids, mask = formats.assistant_mask(tokenizer, messages)
      ref = tokenizer.apply_chat_template(messages, chat_template=training, return_dict=True,
                                          return_assistant_tokens_mask=True)
      assert ids == list(ref['input_ids'])
      diff = [t for t, (a, b) in enumerate(zip(mask, ref['assistant_masks'])) if a != b]
      if llama:
        assert not diff
      else:
        assert all(ref['assistant_masks'][t] == 1 and mask[t] == 0 and ids[t] == newline for t in diff)
        assert len(diff) == 2 * sum(m['role'] == 'assistant' for m in messages)


def test_assistant_only_loss_row_errors(chatml_marked):
  with pytest.raises(InputError, match=r"^data.jsonl line 3: config field 'assistant_only_loss'.*no assistant"):
    _row({'messages': [{'role': 'user', 'content': 'Hi'}]}, chatml_marked, assistant_only_loss=True)
  with pytest.raises(InputError, match=r"^data.jsonl line 3: config field 'assistant_only_loss'.*'prompt_completion'"):
    _row({'prompt': 'a', 'completion': 'b'}, chatml_marked, assistant_only_loss=True)
  with pytest.raises(InputError, match=r"^data.jsonl line 3: config field 'assistant_only_loss'.*starts with"):
    _row({'messages': [{'role': 'assistant', 'content': 'Hi'}]}, make_tokenizer(CHATML), assistant_only_loss=True)


# --- row validation ------------------------------------------------------------------------------------

@pytest.mark.parametrize('row,fmt,pattern', [
    ({'text': 'x'}, 'messages', r"line 3: missing column 'messages' \(columns: \['text'\]\)"),
    ({'messages': 'hi'}, 'messages', r"line 3: column 'messages' must be a list"),
    ({'messages': []}, 'messages', r"line 3: column 'messages' must be a non-empty list"),
    ({'messages': [{'content': 'x'}]}, 'messages', r"line 3: column 'messages' message 0 needs a string 'role'"),
    ({'messages': [{'role': 'user', 'content': 3}]}, 'messages', r"message 0 needs a string 'content'"),
    ({'messages': ['hi']}, 'messages', r"message 0 must be an object"),
    ({'prompt': 'a', 'completion': [{'role': 'assistant', 'content': 'b'}]}, 'prompt_completion',
     r"line 3: columns 'prompt' and 'completion' must both be strings or both"),
    ({'prompt': 'a'}, 'prompt_completion', r"line 3: missing column 'completion'"),
    ({'text': 7}, 'text', r"line 3: column 'text' must be a string"),
    ({'text': None}, 'text', r"line 3: missing column 'text'"),
    ({'messages': [{'role': 'user', 'content': 'x'}], 'tools': '{bad'}, 'messages',
     r"line 3: column 'tools': malformed JSON"),
])
def test_bad_rows_name_row_and_column(chatml_marked, row, fmt, pattern):
  with pytest.raises(InputError, match=pattern):
    _row(row, chatml_marked, fmt=fmt)


def test_template_exception_names_row():
  template = "{{ raise_exception('Conversation roles must alternate') }}"
  with pytest.raises(InputError, match=r"^data.jsonl line 3: column 'messages': the chat template failed "
                                       r'\(Conversation roles must alternate\)'):
    _row({'messages': [{'role': 'user', 'content': 'x'}]}, make_tokenizer(template))


def test_no_chat_template_names_config_field():
  with pytest.raises(InputError, match="chat_template"):
    _row({'messages': [{'role': 'user', 'content': 'x'}, {'role': 'assistant', 'content': 'y'}]},
         make_tokenizer(None), assistant_only_loss=True)


# --- formats, masks and truncation (hand-checked) -------------------------------------------------------

def test_text_appends_eos_once_and_truncates_keeping_start():
  tokenizer = make_tokenizer(None, llama=True)
  example = _row({'text': 'Hello there!'}, tokenizer)
  assert example.input_ids.dtype == np.int32 and example.loss_mask.dtype == np.int32
  assert tokenizer.decode(example.input_ids) == '<|begin_of_text|>Hello there!<|eot_id|>'
  assert example.loss_mask.tolist() == [1] * len(example.input_ids)
  again = _row({'text': 'Hello there!<|eot_id|>'}, tokenizer)
  np.testing.assert_array_equal(again.input_ids, example.input_ids)
  cut = _row({'text': 'Hello there!'}, tokenizer, max_length=3)
  np.testing.assert_array_equal(cut.input_ids, example.input_ids[:3])
  example, was_cut = formats.truncate(example, 3)
  assert was_cut and len(example) == 3
  same, was_cut = formats.truncate(example, 3)
  assert same is example and not was_cut


def test_prompt_completion_masks(chatml_marked):
  row = {'prompt': [SYSTEM, {'role': 'user', 'content': 'What is 2 + 3?'}],
         'completion': [{'role': 'assistant', 'content': 'It is 5.'}]}
  example = _row(row, chatml_marked)
  tokens = example.input_ids[example.loss_mask == 1]
  assert chatml_marked.decode(tokens) == 'It is 5.<|im_end|>\n'  # Completion-only by default.
  everything = _row(row, chatml_marked, completion_only_loss=False)
  assert everything.loss_mask.all()
  assistant = _row(row, chatml_marked, assistant_only_loss=True)
  assert chatml_marked.decode(assistant.input_ids[assistant.loss_mask == 1]) == 'It is 5.<|im_end|>'


# --- equality with TRL's own dataset preparation --------------------------------------------------------

def _trl_prepare(rows: list[dict], tokenizer, **settings) -> dict[int, tuple[list[int], list[int]]]:
  """TRL's `SFTTrainer._prepare_dataset` on `rows` (no model needed): row_id → (input_ids, loss mask)."""
  datasets = pytest.importorskip('datasets')
  trl = pytest.importorskip('trl')
  from trl.trainer.sft_trainer import SFTTrainer  # pylint: disable=import-outside-toplevel
  args = trl.SFTConfig(output_dir='/tmp/jaxsft-test-trl-formats', use_cpu=True, bf16=False, report_to='none',
                       **settings)
  first = rows[0]
  completion_only = args.completion_only_loss
  if completion_only is None:
    completion_only = 'prompt' in first and 'completion' in first
  fake_trainer = types.SimpleNamespace(_tokenizer=tokenizer, chat_template=None,
                                       completion_only_loss=completion_only)
  dataset = datasets.Dataset.from_list([dict(row, row_id=i) for i, row in enumerate(rows)])
  prepared = SFTTrainer._prepare_dataset(fake_trainer, dataset, tokenizer, args, False, None, 'train')
  return {r['row_id']: (r['input_ids'], [int(label != -100) for label in r['labels']]) for r in prepared}


def _assert_matches_trl(rows, tokenizer, *, max_length, assistant_only_loss=False, completion_only_loss=None,
                        text_field='text'):
  trl_rows = _trl_prepare(rows, tokenizer, max_length=max_length, assistant_only_loss=assistant_only_loss,
                          completion_only_loss=completion_only_loss, dataset_text_field=text_field)
  fmt = formats.detect_format(list(rows[0]), text_field)
  kept = 0
  for i, row in enumerate(rows):
    example = _row(row, tokenizer, max_length=max_length, assistant_only_loss=assistant_only_loss,
                   completion_only_loss=completion_only_loss, fmt=fmt, text_field=text_field)
    if i in trl_rows:
      ids, mask = trl_rows[i]
      assert example.input_ids.tolist() == ids, f'row {i}'
      assert example.loss_mask.tolist() == mask, f'row {i}'
      kept += 1
    else:  # TRL dropped it: no loss token left.
      assert not example.loss_mask.any(), f'row {i}'
  assert kept == len(trl_rows) and 0 < kept


MESSAGE_ROWS = [{'messages': c} for c in CONVERSATIONS] + [
    # The prompt alone fills max_length=32: no assistant token left.
    {'messages': [{'role': 'user', 'content': 'Tell me a story about a cat. ' * 3},
                  {'role': 'assistant', 'content': 'No.'}]}]


@pytest.mark.parametrize('max_length', [24, 32, None])
@pytest.mark.parametrize('assistant_only_loss', [False, True])
def test_messages_match_trl(chatml_marked, assistant_only_loss, max_length):
  _assert_matches_trl(MESSAGE_ROWS, chatml_marked, max_length=max_length, assistant_only_loss=assistant_only_loss)


def test_sharegpt_conversations_match_trl(chatml_marked):
  rows = [{'conversations': [{'from': m['role'], 'value': m['content']} for m in c]} for c in CONVERSATIONS]
  _assert_matches_trl(rows, chatml_marked, max_length=32, assistant_only_loss=True)


@pytest.mark.parametrize('completion_only_loss', [None, False, True])
@pytest.mark.parametrize('assistant_only_loss', [False, True])
def test_conversational_prompt_completion_matches_trl(chatml_marked, completion_only_loss, assistant_only_loss):
  rows = [{'prompt': c[:-1], 'completion': c[-1:]} for c in CONVERSATIONS[:2]]
  rows.append({'prompt': [{'role': 'user', 'content': 'Tell me a story about a cat. ' * 3}],
               'completion': [{'role': 'assistant', 'content': 'No.'}]})
  _assert_matches_trl(rows, chatml_marked, max_length=20, completion_only_loss=completion_only_loss,
                      assistant_only_loss=assistant_only_loss)


@pytest.mark.parametrize('completion_only_loss', [None, False])
def test_string_prompt_completion_matches_trl(completion_only_loss):
  tokenizer = make_tokenizer(None, llama=True)
  rows = [{'prompt': 'What is 2 + 3?', 'completion': ' It is 5.'},
          {'prompt': 'Hello', 'completion': ' there!<|eot_id|>'},  # Already ends with eos: not doubled.
          {'prompt': 'Tell me a story', 'completion': 'about a cat.'},  # Tokens merge across the boundary.
          {'prompt': 'Tell me a story about a cat. ' * 3, 'completion': 'No.'}]  # Prompt fills max_length.
  _assert_matches_trl(rows, tokenizer, max_length=16, completion_only_loss=completion_only_loss)


def test_text_matches_trl():
  tokenizer = make_tokenizer(None, llama=True)
  rows = [{'body': 'Hello there! How are you today?'}, {'body': 'It is 5.<|eot_id|>'},
          {'body': 'Tell me a story about a cat. Once upon a time, a cat sat.'}]
  _assert_matches_trl(rows, tokenizer, max_length=12, text_field='body')


def test_sft_trainer_train_dataset_matches(tmp_path):
  """The real SFTTrainer (tiny Qwen2 model) prepares the same tokens and labels as `tokenize_row`."""
  torch = pytest.importorskip('torch')
  trl = pytest.importorskip('trl')
  datasets = pytest.importorskip('datasets')
  tokenizer = make_tokenizer(CHATML_MARKED)
  config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(config)
  args = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to='none', max_length=32,
                       assistant_only_loss=True)
  rows = [dict(row, row_id=i) for i, row in enumerate(MESSAGE_ROWS)]
  trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                           processing_class=tokenizer)
  prepared = {r['row_id']: r for r in trainer.train_dataset}
  assert sorted(prepared) == [0, 1, 2]  # Row 3 dropped: no assistant token within max_length.
  for i, row in enumerate(MESSAGE_ROWS):
    example = _row(row, tokenizer, max_length=32, assistant_only_loss=True)
    if i in prepared:
      assert example.input_ids.tolist() == prepared[i]['input_ids']
      assert example.loss_mask.tolist() == [int(x != -100) for x in prepared[i]['labels']]
    else:
      assert not example.loss_mask.any()


class _SlowText(str):
  """A message content whose rendering waits for `gate`: holds a template render open in one thread."""
  entered = None
  gate = None

  def __add__(self, other):
    type(self).entered.set()
    assert type(self).gate.wait(10)
    return str(self) + other


def test_renders_in_threads_do_not_share_the_generation_tracker(chatml_marked):
  """grain tokenizes on two threads. transformers 5.0.x (CI lane 1) keeps the `{% generation %}` tracker in one
  object per compiled template: a second thread's render while the first is inside one fails, or adds its spans
  to the first's mask. Here thread A is held inside its render (in the assistant turn) while thread B renders."""
  import threading  # pylint: disable=import-outside-toplevel
  _SlowText.entered, _SlowText.gate = threading.Event(), threading.Event()
  held = [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': _SlowText('slow answer')}]
  other = [{'role': 'user', 'content': 'yo'}, {'role': 'assistant', 'content': 'fast answer'}]
  want_held = formats.assistant_mask(chatml_marked, [dict(m, content=str(m['content'])) for m in held])
  want_other = formats.assistant_mask(chatml_marked, other)
  results, errors = {}, []

  def run(name, messages):
    try:
      results[name] = formats.assistant_mask(chatml_marked, messages)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(f'{name}: {e}')

  a = threading.Thread(target=run, args=('held', held))
  a.start()
  while a.is_alive() and not _SlowText.entered.wait(0.05):
    pass
  if not _SlowText.entered.is_set():  # Newer transformers (lane 2) render a plain-str copy of the content.
    a.join()
    pytest.skip('this transformers renders a copy of the message content: a render cannot be held open here')
  b = threading.Thread(target=run, args=('other', other))
  b.start()
  b.join(0.5)  # B renders now, unless B waits for A's render to end.
  _SlowText.gate.set()
  a.join(10)
  b.join(10)
  assert not errors, errors
  assert results == {'held': want_held, 'other': want_other}
  assert sum(want_held[1]) > 0 and sum(want_other[1]) > 0
