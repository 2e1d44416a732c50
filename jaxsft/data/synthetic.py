"""Synthetic reasoning-distillation data: arithmetic word problems with `<think>` traces.

Rows have the shape of R1-distillation data (`{"messages": [...]}`, the assistant turn being
`<think>\\n...steps...\\n</think>\\n\\nThe answer is N.`), small enough that a ~1M-parameter model learns
them in a few CPU minutes. Five problem kinds (add, subtract, multiply, add-then-subtract,
multiply-then-add) in several wordings, with names and objects; some rows carry a system prompt, some a
follow-up question about the previous (single-step) answer. With the shipped tokenizer every row is
under 128 tokens.

Held-out problems never occur in training data: each kind's operand tuples are split once, with a fixed
seed independent of the user's seed, into train and test tuples, and every problem's text contains all
its operands, so the held-out problem texts are disjoint from the training texts as well. A fifth of the
training rows are one-line drills ('What is 7 * 8?'), each arithmetic fact any problem's reasoning needs
equally often: a held-out problem is a new problem built from known facts, so the accuracy check measures
reading and reasoning, not recall of a fact the model was never shown (without drills, whether the few held-out
operand pairs' facts happened to be picked up elsewhere swung the tiny default by 15 points).

  load('synthetic:arithmetic?train=30000&test=200&seed=0') -> sources.Splits
  held_out_problems(n, seed) -> [(prompt messages, expected answer)]
  extract_answer(generated text) -> the answer it states, or None

`jaxsft.evals.evaluate_accuracy` decodes held-out problems with a model and scores the answers.
"""

import dataclasses
import functools
import random
import re
import urllib.parse
from collections.abc import Sequence

from jaxsft.data import sources
from jaxsft.errors import InputError

DATASET = 'arithmetic'
DEFAULT_TRAIN = 30000  # The tiny default trains one epoch of these, packed, in its 5-CPU-minute budget.
DEFAULT_TEST = 200
MAX_HELD_OUT = 10000
_SPLIT_SEED = 20240601  # Fixes which operand tuples are held out; never the user's seed.
_HELD_OUT_FRACTION = 0.1
_SYSTEM_FRACTION = 0.3
_FOLLOW_UP_FRACTION = 0.4  # Of single-step problems (two-step rows stay single-turn, all rows < 128 tokens).
_DRILL_FRACTION = 0.2  # Of training rows: one-line arithmetic drills (`_drills`).

KINDS = ('add', 'sub', 'mul', 'add_sub', 'mul_add')
NAMES = ('Tom', 'Anna', 'Ben', 'Mia', 'Sam', 'Lily', 'Max', 'Emma', 'Leo', 'Zoe', 'Jack', 'Ella',
         'Noah', 'Ava', 'Omar', 'Nina')
OBJECTS = ('apples', 'pears', 'books', 'pens', 'cards', 'eggs', 'coins', 'shells', 'stamps', 'marbles',
           'cookies', 'stickers', 'balls', 'flowers', 'toys', 'rocks')
CONTAINERS = ('bags', 'boxes', 'baskets', 'jars')
SYSTEM_PROMPTS = (
    'You are a helpful assistant.',
    'Think step by step.',
    'Reason first, then answer.',
)

Row = dict[str, list[dict[str, str]]]
Message = dict[str, str]


@dataclasses.dataclass(frozen=True)
class Problem:
  """One word problem: its text, the reasoning lines, and the answer."""
  kind: str
  operands: tuple[int, ...]
  name: str  # The person the problem is about (follow-up questions name them).
  text: str
  steps: tuple[str, ...]
  answer: int


def _operand_tuples(kind: str) -> list[tuple[int, ...]]:
  """Every operand tuple of a problem kind: single-digit operands, results of one or two digits."""
  digits = range(1, 10)
  if kind == 'add':
    return [(a, b) for a in digits for b in digits]
  if kind == 'sub':
    return [(a, b) for a in range(2, 19) for b in digits if b < a]
  if kind == 'mul':
    return [(a, b) for a in range(2, 10) for b in range(2, 10)]
  if kind == 'add_sub':
    return [(a, b, c) for a in digits for b in digits for c in digits if c < a + b]
  if kind == 'mul_add':
    return [(a, b, c) for a in range(2, 10) for b in range(2, 10) for c in digits]
  raise ValueError(kind)



@functools.cache
def _split_tuples() -> dict[str, tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]]:
  """kind -> (train tuples, held-out tuples), fixed by `_SPLIT_SEED`."""
  rng = random.Random(_SPLIT_SEED)
  split = {}
  for kind in KINDS:
    tuples = _operand_tuples(kind)
    rng.shuffle(tuples)
    n_test = max(1, round(len(tuples) * _HELD_OUT_FRACTION))
    split[kind] = (tuple(sorted(tuples[n_test:])), tuple(sorted(tuples[:n_test])))
  return split


def _problem(kind: str, operands: tuple[int, ...], rng: random.Random) -> Problem:
  """A worded problem for `operands`, names/objects/wording drawn from `rng`."""
  n, m = rng.sample(NAMES, 2)
  obj = rng.choice(OBJECTS)
  wording = rng.randrange(2)
  if kind == 'add':
    a, b = operands
    r = a + b
    text = (f'{n} has {a} {obj}. {m} gives {n} {b} more. How many {obj} does {n} have now?' if wording == 0
            else f'{n} has {a} {obj} and {m} has {b} {obj}. How many {obj} do they have together?')
    steps = (f'Start with {a} and add {b}.', f'{a} + {b} = {r}')
  elif kind == 'sub':
    a, b = operands
    r = a - b
    text = (f'{n} has {a} {obj} and gives {b} of them to {m}. How many {obj} does {n} have left?'
            if wording == 0 else f'There are {a} {obj} on the table. {n} takes {b}. How many {obj} are left?')
    steps = (f'Start with {a} and take away {b}.', f'{a} - {b} = {r}')
  elif kind == 'mul':
    a, b = operands
    r = a * b
    box = rng.choice(CONTAINERS)
    text = (f'{n} has {a} {box} with {b} {obj} in each. How many {obj} does {n} have?' if wording == 0
            else f'There are {a} {box} and each holds {b} {obj}. How many {obj} are there in total?')
    steps = (f'{a} groups of {b}.', f'{a} * {b} = {r}')
  elif kind == 'add_sub':
    a, b, c = operands
    s = a + b
    r = s - c
    text = (f'{n} has {a} {obj}. {n} finds {b} more and then gives {c} to {m}. '
            f'How many {obj} does {n} have now?' if wording == 0 else
            f'{n} has {a} {obj} and buys {b} more. Then {n} loses {c}. How many {obj} are left?')
    steps = (f'First add {b} to {a}.', f'{a} + {b} = {s}', f'Then take away {c}.', f'{s} - {c} = {r}')
  elif kind == 'mul_add':
    a, b, c = operands
    p = a * b
    r = p + c
    box = rng.choice(CONTAINERS)
    text = (f'{n} buys {a} {box} of {b} {obj} and already has {c}. How many {obj} does {n} have now?'
            if wording == 0 else
            f'{n} has {a} {box} with {b} {obj} in each and {c} more on the shelf. How many {obj} are there?')
    steps = (f'{a} groups of {b}.', f'{a} * {b} = {p}', f'Then add {c}.', f'{p} + {c} = {r}')
  else:
    raise ValueError(kind)
  return Problem(kind, operands, n, text, steps, r)


def _assistant(steps: Sequence[str], answer: int) -> str:
  return '<think>\n' + '\n'.join(steps) + f'\n</think>\n\nThe answer is {answer}.'


def _follow_up(previous: int, name: str, rng: random.Random) -> tuple[str, str]:
  """A follow-up question about the previous answer and its reply."""
  choice = rng.randrange(3)
  if choice == 0 or previous < 2:
    k = rng.randint(1, 9)
    return f'What if {name} gets {k} more?', _assistant([f'{previous} + {k} = {previous + k}'], previous + k)
  if choice == 1:
    return 'What is double that?', _assistant([f'{previous} * 2 = {previous * 2}'], previous * 2)
  k = rng.randint(1, min(previous - 1, 9))
  return (f'What if {name} then gives away {k}?',
          _assistant([f'{previous} - {k} = {previous - k}'], previous - k))


def _prompt(problem: Problem, rng: random.Random, system_fraction: float) -> list[Message]:
  messages = []
  if rng.random() < system_fraction:
    messages.append({'role': 'system', 'content': rng.choice(SYSTEM_PROMPTS)})
  messages.append({'role': 'user', 'content': problem.text})
  return messages


def _draw_problem(split: int, rng: random.Random) -> Problem:
  kind = rng.choice(KINDS)
  operands = rng.choice(_split_tuples()[kind][split])
  return _problem(kind, operands, rng)


@functools.cache
def _drill_facts() -> tuple[tuple[int, str, int], ...]:
  """Every arithmetic line a problem's reasoning can contain, as (a, op, b): the drills' facts."""
  facts = set()
  for kind in KINDS:
    for operands in _operand_tuples(kind):
      if kind in ('add', 'sub', 'mul'):
        facts.add((operands[0], {'add': '+', 'sub': '-', 'mul': '*'}[kind], operands[1]))
      elif kind == 'add_sub':
        a, b, c = operands
        facts |= {(a, '+', b), (a + b, '-', c)}
      else:
        a, b, c = operands
        facts |= {(a, '*', b), (a * b, '+', c)}
  return tuple(sorted(facts))


def _drills(rng: random.Random):
  """One-line drills ('What is 7 * 8?'), every fact of `_drill_facts` once per cycle in shuffled order: each fact a
  problem needs occurs in training equally often."""
  facts = list(_drill_facts())
  while True:
    rng.shuffle(facts)
    for a, op, b in facts:
      r = a + b if op == '+' else a - b if op == '-' else a * b
      yield {'messages': [{'role': 'user', 'content': f'What is {a} {op} {b}?'},
                          {'role': 'assistant', 'content': _assistant([f'{a} {op} {b} = {r}'], r)}]}


def _rows(n: int, split: int, seed: int, drills: bool = False) -> list[Row]:
  rng = random.Random(f'{DATASET}/{split}/{seed}')
  drill_rows = _drills(random.Random(f'{DATASET}/drills/{seed}'))
  rows = []
  for _ in range(n):
    if drills and rng.random() < _DRILL_FRACTION:
      rows.append(next(drill_rows))
      continue
    problem = _draw_problem(split, rng)
    messages = _prompt(problem, rng, _SYSTEM_FRACTION)
    messages.append({'role': 'assistant', 'content': _assistant(problem.steps, problem.answer)})
    if len(problem.operands) == 2 and rng.random() < _FOLLOW_UP_FRACTION:
      question, reply = _follow_up(problem.answer, problem.name, rng)
      messages += [{'role': 'user', 'content': question}, {'role': 'assistant', 'content': reply}]
    rows.append({'messages': messages})
  return rows


def _parse_name(name: str) -> dict[str, int]:
  """'synthetic:arithmetic?train=5000&test=200&seed=0' -> {'train': 5000, 'test': 200, 'seed': 0}."""
  base, _, query = name.partition('?')
  if base != f'synthetic:{DATASET}':
    raise InputError(f"config field 'dataset_name': unknown synthetic dataset {name!r} "
                     f"(available: 'synthetic:{DATASET}')")
  params = {'train': DEFAULT_TRAIN, 'test': DEFAULT_TEST, 'seed': 0}
  for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=False):
    if key not in params:
      raise InputError(f"config field 'dataset_name': unknown parameter {key!r} in {name!r} "
                       f"(known: {', '.join(params)})")
    if not re.fullmatch(r'\d+', value):
      raise InputError(f"config field 'dataset_name': parameter {key!r} in {name!r} must be a "
                       f'non-negative integer, got {value!r}')
    params[key] = int(value)
  if query and not urllib.parse.parse_qsl(query):
    raise InputError(f"config field 'dataset_name': cannot parse the parameters of {name!r}")
  if params['train'] < 1:
    raise InputError(f"config field 'dataset_name': 'train' in {name!r} must be at least 1")
  return params


def load(name: str) -> sources.Splits:
  """The synthetic dataset `name` as train/eval splits of `{"messages": [...]}` rows.

  `name` is 'synthetic:arithmetic', optionally with parameters, e.g.
  'synthetic:arithmetic?train=30000&test=200&seed=0' (these are the defaults); `test=0` means no eval
  split. The eval rows are drawn from the held-out operand tuples only.
  """
  params = _parse_name(name)
  base = name.partition('?')[0]
  return sources.Splits(
      train=sources.RowList(_rows(params['train'], 0, params['seed'], drills=True), name, 'train'),
      eval=sources.RowList(_rows(params['test'], 1, params['seed']), name, 'test') if params['test'] else None,
      train_name=f'{base}/train', eval_name=f'{base}/test' if params['test'] else None)


def held_out_problems(n: int, seed: int) -> list[tuple[list[Message], str]]:
  """`n` distinct single-turn held-out problems: (prompt messages, expected answer string)."""
  if not 0 <= n <= MAX_HELD_OUT:
    raise InputError(f"config field 'accuracy_eval_problems': must be between 0 and {MAX_HELD_OUT}, got {n}")
  rng = random.Random(f'{DATASET}/held-out/{seed}')
  problems, seen = [], set()
  while len(problems) < n:  # Far more distinct texts exist than MAX_HELD_OUT: this ends quickly.
    problem = _draw_problem(1, rng)
    messages = _prompt(problem, rng, _SYSTEM_FRACTION)
    if problem.text not in seen:
      seen.add(problem.text)
      problems.append((messages, str(problem.answer)))
  return problems


_ANSWER_RE = re.compile(r'The answer is (-?\d+)\.')


def extract_answer(text: str) -> str | None:
  """The N of the last 'The answer is N.' in `text`, or None."""
  matches = _ANSWER_RE.findall(text)
  return matches[-1] if matches else None


def corpus(n: int = 4000, seed: int = 0) -> list[Row]:
  """Rows covering every template, name, object and follow-up: the tokenizer's training corpus."""
  return _rows(n, 0, seed) + _rows(n // 4, 1, seed)
