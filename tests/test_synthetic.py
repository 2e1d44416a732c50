"""Tests for jaxsft.data.synthetic and the shipped tiny assets (tokenizer, chat template, configs)."""

import collections
import filecmp
import importlib.util
import os
import re

import numpy as np
import pytest
import transformers

from jaxsft.data import synthetic
from jaxsft.errors import InputError
from jaxsft.models import hf_config

ROOT = os.path.join(os.path.dirname(__file__), '..')
ASSETS = os.path.join(ROOT, 'jaxsft', 'assets', 'tiny')
ASSISTANT_RE = re.compile(r'<think>\n(?:[^\n]+\n)+</think>\n\nThe answer is (\d+)\.')
STEP_RE = re.compile(r'^(\d+) ([-+*]) (\d+) = (\d+)$', re.M)
OPS = {'+': lambda a, b: a + b, '-': lambda a, b: a - b, '*': lambda a, b: a * b}


@pytest.fixture(scope='module')
def tokenizer():
  return transformers.AutoTokenizer.from_pretrained(ASSETS)


@pytest.fixture(scope='module')
def default_splits():
  return synthetic.load('synthetic:arithmetic')


def _skeleton(text: str) -> str:
  """The template of a problem text: numbers, names and objects replaced by placeholders."""
  text = re.sub(r'\d+', '#', text)
  words = [('N' if w in synthetic.NAMES else 'O' if w in synthetic.OBJECTS + synthetic.CONTAINERS else w)
           for w in re.findall(r'\w+|[^\w\s]', text)]
  return ' '.join(words)


def _kind_of_skeleton(rows) -> dict[str, tuple[str, ...]]:
  """Skeleton -> the operator sequence of its reasoning trace, learnt from rows with answers."""
  kinds = {}
  for row in rows:
    user, assistant = [m['content'] for m in row['messages'] if m['role'] != 'system'][:2]
    ops = tuple(op for _, op, _, _ in STEP_RE.findall(assistant))
    assert kinds.setdefault(_skeleton(user), ops) == ops, user
  return kinds


def _key(text: str, kinds) -> tuple:
  """(kind, operands) of a problem text: what held-out problems must not share with training rows."""
  return kinds[_skeleton(text)], tuple(int(n) for n in re.findall(r'\d+', text))


def _first_user(messages) -> str:
  return next(m['content'] for m in messages if m['role'] == 'user')


DRILL_RE = re.compile(r'What is (\d+) ([-+*]) (\d+)\?')


def _problems(rows) -> list:
  """The word-problem rows of a split (drill rows state one fact; they are not problems)."""
  return [r for r in rows if not DRILL_RE.fullmatch(_first_user(r['messages']))]


def test_load_is_deterministic_and_seeded():
  a = synthetic.load('synthetic:arithmetic?train=300&test=40&seed=3')
  b = synthetic.load('synthetic:arithmetic?train=300&test=40&seed=3')
  c = synthetic.load('synthetic:arithmetic?train=300&test=40&seed=4')
  assert list(a.train) == list(b.train) and list(a.eval) == list(b.eval)
  assert len(a.train) == 300 and len(a.eval) == 40
  assert list(a.train) != list(c.train) and list(a.eval) != list(c.eval)
  assert a.train_name == 'synthetic:arithmetic/train' and a.eval_name == 'synthetic:arithmetic/test'
  assert synthetic.held_out_problems(30, 1) == synthetic.held_out_problems(30, 1)
  assert synthetic.held_out_problems(30, 1) != synthetic.held_out_problems(30, 2)


def test_default_sizes(default_splits):
  assert len(default_splits.train) == synthetic.DEFAULT_TRAIN
  assert len(default_splits.eval) == synthetic.DEFAULT_TEST


@pytest.mark.parametrize('name, needle', [
    ('synthetic:fractions', "'synthetic:fractions'"),
    ('synthetic:arithmetic?trian=10', "'trian'"),
    ('synthetic:arithmetic?train=ten', "'train'"),
    ('synthetic:arithmetic?train=0', "'train'"),
])
def test_bad_names_raise_one_line_input_error(name, needle):
  with pytest.raises(InputError) as e:
    synthetic.load(name)
  message = str(e.value)
  assert 'dataset_name' in message and needle in message and '\n' not in message


def test_held_out_problems_are_not_in_training(default_splits):
  kinds = _kind_of_skeleton(_problems(default_splits.train))
  assert sorted(set(kinds.values())) == sorted({('+',), ('-',), ('*',), ('+', '-'), ('*', '+')})
  train_texts = {_first_user(r['messages']) for r in _problems(default_splits.train)}
  train_keys = {_key(t, kinds) for t in train_texts}
  held_out = [p for seed in range(3) for p in synthetic.held_out_problems(200, seed)]
  held_out += [(r['messages'], None) for r in default_splits.eval]
  held_out_keys = collections.Counter()
  for messages, _ in held_out:
    text = _first_user(messages)
    assert text not in train_texts, text
    key = _key(text, kinds)
    assert key not in train_keys, (text, key)
    held_out_keys[key[0]] += 1
  assert len(held_out_keys) == 5  # Every kind is tested.
  assert len(train_keys) > 1000


def test_held_out_problems_are_distinct_and_answers_correct(default_splits):
  problems = synthetic.held_out_problems(200, 0)
  assert len(problems) == 200 and len({_first_user(m) for m, _ in problems}) == 200
  kinds = _kind_of_skeleton(_problems(default_splits.train))
  for messages, expected in problems:
    assert messages[-1]['role'] == 'user'
    ops, numbers = _key(messages[-1]['content'], kinds)
    value = numbers[0]
    for op, n in zip(ops, numbers[1:]):
      value = OPS[op](value, n)
    assert str(value) == expected, messages
  with pytest.raises(InputError, match='accuracy_eval_problems'):
    synthetic.held_out_problems(synthetic.MAX_HELD_OUT + 1, 0)


def test_rows_are_r1_shaped_with_correct_reasoning(default_splits):
  rows = list(default_splits.train) + list(default_splits.eval)
  with_system = multi_turn = 0
  for row in rows:
    assert set(row) == {'messages'}
    messages = row['messages']
    if messages[0]['role'] == 'system':
      with_system += 1
      messages = messages[1:]
    assert [m['role'] for m in messages] == ['user', 'assistant'] * (len(messages) // 2)
    multi_turn += len(messages) > 2
    previous = None
    for turn in range(0, len(messages), 2):
      user, assistant = messages[turn]['content'], messages[turn + 1]['content']
      match = ASSISTANT_RE.fullmatch(assistant)
      assert match, assistant
      steps = STEP_RE.findall(assistant)
      assert steps, assistant
      for a, op, b, c in steps:
        assert OPS[op](int(a), int(b)) == int(c), assistant
      assert match.group(1) == steps[-1][3]
      numbers = [int(n) for n in re.findall(r'\d+', user)]
      if previous is None:  # The first question's operands feed the computation in order.
        assert int(steps[0][0]) == numbers[0] and int(steps[0][2]) == numbers[1], (user, assistant)
      else:  # Follow-ups compute on the previous answer.
        assert int(steps[0][0]) == previous, (user, assistant)
      previous = int(match.group(1))
  assert 0.2 < with_system / len(rows) < 0.4
  assert 0.15 < multi_turn / len(rows) < 0.35


def test_training_states_every_fact_of_the_held_out_problems_in_drills(default_splits):
  """Held-out problems test reading and reasoning over problems never seen, not arithmetic facts never shown: every
  line of their reasoning is a training drill's fact (and the eval split has no drills)."""
  drills = {}
  for row in default_splits.train:
    match = DRILL_RE.fullmatch(_first_user(row['messages']))
    if match:
      a, op, b = match.groups()
      assert [m['role'] for m in row['messages']] == ['user', 'assistant']
      assert STEP_RE.findall(row['messages'][1]['content']) == [(a, op, b, str(OPS[op](int(a), int(b))))]
      drills[(a, op, b)] = drills.get((a, op, b), 0) + 1
  assert 0.15 < sum(drills.values()) / len(default_splits.train) < 0.25
  assert len(_problems(default_splits.eval)) == len(default_splits.eval)
  kinds = _kind_of_skeleton(_problems(default_splits.train))
  for messages, _ in synthetic.held_out_problems(200, 0):
    ops, numbers = _key(messages[-1]['content'], kinds)
    value = numbers[0]
    for op, n in zip(ops, numbers[1:]):
      assert (str(value), op, str(n)) in drills, (messages, value, op, n)
      value = OPS[op](value, n)
  assert min(drills.values()) >= 2  # Each of the ~500 facts, several times.


@pytest.mark.parametrize('text, expected', [
    ('<think>\n3 + 5 = 8\n</think>\n\nThe answer is 8.', '8'),
    ('The answer is 12. Wait. The answer is 13.', '13'),
    ('The answer is 7', None),
    ('the answer is 7.', None),
    ('The answer is -4.', '-4'),
    ('', None),
    ('<think>\nhmm\n</think>\n\nThe answer is 42.<|im_end|>', '42'),
])
def test_extract_answer(text, expected):
  assert synthetic.extract_answer(text) == expected


def test_every_row_tokenizes_without_unk(tokenizer, default_splits):
  rows = list(default_splits.train)[:1500] + list(default_splits.eval)
  prompts = [m for m, _ in synthetic.held_out_problems(200, 0)]
  for messages in [r['messages'] for r in rows] + prompts:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)['input_ids']
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
  # Characters outside the corpus do not crash (byte-level BPE covers every byte).
  text = 'Zwölf Äpfel ☃ 日本 😀'
  ids = tokenizer(text, add_special_tokens=False)['input_ids']
  assert tokenizer.decode(ids) == text and tokenizer.unk_token_id not in ids


def test_special_tokens_and_digits(tokenizer):
  assert tokenizer.unk_token == '<unk>'
  assert tokenizer.pad_token == '<|endoftext|>' and tokenizer.eos_token == '<|im_end|>'
  for token in ('<|im_start|>', '<|im_end|>', '<|endoftext|>', '<think>', '</think>'):
    assert tokenizer.tokenize(f'a{token}b')[1] == token
  assert [t for t in tokenizer.tokenize('x 1234') if t.isdigit()] == ['1', '2', '3', '4']
  assert 500 <= len(tokenizer) <= 1000


def _assistant_spans(mask) -> list[tuple[int, int]]:
  spans, start = [], None
  for i, m in enumerate(list(mask) + [0]):
    if m and start is None:
      start = i
    elif not m and start is not None:
      spans.append((start, i))
      start = None
  return spans


def test_assistant_mask_covers_exactly_assistant_content_and_im_end(tokenizer, default_splits):
  rows = list(default_splits.train)[:400]
  assert any(len(r['messages']) > 3 for r in rows) and any(r['messages'][0]['role'] == 'system' for r in rows)
  for row in rows:
    encoded = tokenizer.apply_chat_template(row['messages'], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    ids, mask = encoded['input_ids'], encoded['assistant_masks']
    assert len(ids) == len(mask) and sum(mask) > 0
    spans = _assistant_spans(mask)
    contents = [m['content'] for m in row['messages'] if m['role'] == 'assistant']
    assert [tokenizer.decode(ids[s:e]) for s, e in spans] == [c + '<|im_end|>' for c in contents]
    for s, _ in spans:  # Each span follows the assistant header.
      assert tokenizer.decode(ids[:s]).endswith('<|im_start|>assistant\n')


def test_generation_prompt_is_a_prefix_of_the_conversation(tokenizer, default_splits):
  for row in list(default_splits.train)[:100]:
    messages = row['messages']
    last_user = max(i for i, m in enumerate(messages) if m['role'] == 'user')
    prompt = tokenizer.apply_chat_template(messages[:last_user + 1], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)['input_ids']
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)['input_ids']
    assert full[:len(prompt)] == prompt
    assert tokenizer.decode(prompt).endswith('<|im_start|>assistant\n')
    answer = tokenizer.decode(full[len(prompt):])
    assert answer == messages[last_user + 1]['content'] + '<|im_end|>\n'


def test_model_and_generation_configs(tokenizer):
  hf_cfg = hf_config.read_hf_config(ASSETS)
  assert hf_cfg['model_type'] == 'qwen2' and hf_cfg['tie_word_embeddings'] is True
  assert hf_cfg['vocab_size'] % 64 == 0 and len(tokenizer) <= hf_cfg['vocab_size'] < len(tokenizer) + 64
  assert hf_cfg['max_position_embeddings'] == 512
  assert hf_cfg['rope_parameters']['rope_theta'] == 10000.0
  assert hf_cfg['eos_token_id'] == tokenizer.convert_tokens_to_ids('<|im_end|>')
  cfg = hf_config.model_config_from_hf(hf_cfg)
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (128, 4, 4, 2)
  assert cfg.tie_word_embeddings and cfg.qkv_bias
  generation = transformers.GenerationConfig.from_pretrained(ASSETS)
  assert generation.eos_token_id == tokenizer.convert_tokens_to_ids('<|im_end|>')
  assert generation.pad_token_id == tokenizer.pad_token_id


def test_shipped_assets_are_what_the_script_builds(tmp_path):
  spec = importlib.util.spec_from_file_location('build_tiny_assets',
                                                os.path.join(ROOT, 'scripts', 'build_tiny_assets.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  files = module.build(str(tmp_path / 'tiny'))
  assert files == sorted(os.listdir(ASSETS))
  assert {'config.json', 'tokenizer.json', 'tokenizer_config.json', 'generation_config.json'} <= set(files)
  match, mismatch, errors = filecmp.cmpfiles(ASSETS, tmp_path / 'tiny', files, shallow=False)
  assert not mismatch and not errors, mismatch + errors


def test_evaluate_accuracy_scores_exact_matches(tokenizer, monkeypatch):
  from jaxsft import evals
  from jaxsft import sampler
  problems = synthetic.held_out_problems(6, 0)
  header = tokenizer.convert_tokens_to_ids(['<|im_start|>', 'assistant'])
  calls = []

  def fake_generate(model, prompts, *, max_new_tokens, eos_ids, pad_id):
    calls.append((model, max_new_tokens, list(eos_ids), pad_id))
    outputs = []
    for prompt in prompts:
      assert prompt[-3:-1] == header  # Ends with the generation prompt.
      text = tokenizer.decode(prompt)
      expected = next(e for m, e in problems if m[-1]['content'] in text)
      # Right for the problems whose answer is even; the last answer line counts.
      answer = expected if int(expected) % 2 == 0 else str(int(expected) + 1)
      body = f'<think>\nThe answer is 0.\n</think>\n\nThe answer is {answer}.'
      outputs.append(tokenizer(body, add_special_tokens=False)['input_ids'])
    return outputs

  monkeypatch.setattr(sampler, 'greedy_generate', fake_generate)
  accuracy, samples = evals.evaluate_accuracy('MODEL', tokenizer, problems, max_new_tokens=17, batch_size=4)
  want = np.mean([int(e) % 2 == 0 for _, e in problems])
  assert 0 < want < 1 and accuracy == pytest.approx(want)
  assert len(calls) == 2 and calls[0][:2] == ('MODEL', 17)
  assert tokenizer.eos_token_id in calls[0][2] and calls[0][3] == tokenizer.pad_token_id
  assert len(samples) == 5
  for sample, (messages, expected) in zip(samples, problems):
    assert sample['prompt'] == messages[-1]['content'] and sample['expected'] == expected
    assert sample['correct'] == (int(expected) % 2 == 0)
    assert sample['generated'].endswith('.')
