"""Tokenizer facts, in one place: loading, the chat-template / eos overrides, eos and pad ids, generation_config.

* `load_tokenizer(config, model_dir)`: the training tokenizer, with the config's `chat_template` and
  `eos_token` overrides applied as TRL applies them (and the eos token as pad token when it has none);
  `from_pretrained(path, where)`: a tokenizer directory (or hub id) loaded, a failure one line naming `where`.
* `eos_ids(tokenizer, generation, extra)`: the ids that end a generation: the tokenizer's eos id, a
  generation_config's `eos_token_id` (an id or a list) and `extra`, sorted. `pad_id(tokenizer, eos_ids)`: the
  id that fills a prompt buffer: the tokenizer's pad id, else the smallest eos id, else 0.
* `read_generation_config(model_dir)`: a model directory's generation_config.json as a dict ({} if it has
  none); `generation_config(model_dir, tokenizer)`: the dict an export writes as generation_config.json, the
  model's own with the tokenizer's eos, pad and bos ids, so that generation stops at the eos the model was
  trained to emit (open-r1 PR #663: a mismatch makes generation never stop).

No jax here (transformers and the config are imported where a tokenizer is loaded).
"""

import json
import os
from collections.abc import Sequence

from jaxsft.errors import InputError
from jaxsft.errors import one_line
from jaxsft.models import hf_config

GENERATION_CONFIG = 'generation_config.json'


def from_pretrained(path: str, where: str):
  """`transformers.AutoTokenizer.from_pretrained(path)`; an InputError starting with `where` if it fails."""
  import transformers  # pylint: disable=import-outside-toplevel
  try:
    return transformers.AutoTokenizer.from_pretrained(path)
  except (OSError, ValueError) as e:
    raise InputError(f'{where}: cannot load a tokenizer from {path!r} ({one_line(e, 200)})'
                     ) from None


def load_tokenizer(config, model_dir: str):
  """The tokenizer with the config's chat_template / eos_token overrides applied (as TRL does).

  It comes from `config.tokenizer_name_or_path` (at `config.model_revision`) when set, else from `model_dir`.
  A tokenizer without a pad token gets the eos token as its pad token.
  """
  from jaxsft import config as config_lib  # pylint: disable=import-outside-toplevel
  name = config.tokenizer_name_or_path
  tok_dir = (str(hf_config.resolve_model_dir(name, config.model_revision, field='tokenizer_name_or_path',
                                      require_config=False)) if name else model_dir)
  field = 'tokenizer_name_or_path' if name else 'model_name_or_path'
  tokenizer = from_pretrained(tok_dir, f'config field {field!r}')
  template = config_lib.load_chat_template(config.chat_template)
  if template:
    tokenizer.chat_template = template
  if config.eos_token:
    if config.eos_token not in tokenizer.get_vocab():
      raise InputError(f"config field 'eos_token': {config.eos_token!r} is not in the tokenizer's vocabulary")
    tokenizer.eos_token = config.eos_token
  if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer


def eos_ids(tokenizer, generation: dict | None = None, extra: Sequence[int] = ()) -> list[int]:
  """The sorted ids that end a generation: `extra`, generation's eos_token_id (an id or a list), the tokenizer's."""
  value = (generation or {}).get('eos_token_id')
  ids = {int(i) for i in extra}
  ids.update(int(i) for i in (value if isinstance(value, list) else [] if value is None else [value]))
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  return sorted(ids)


def pad_id(tokenizer, eos: Sequence[int]) -> int:
  """The id filling a prompt buffer: the tokenizer's pad id, else the smallest of `eos`, else 0."""
  return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)


def read_generation_config(model_dir: str) -> dict:
  """`model_dir`/generation_config.json as a dict, {} without one; an InputError naming it if it is unreadable."""
  path = os.path.join(model_dir, GENERATION_CONFIG)
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding='utf-8') as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise InputError(f'{path}: cannot read ({e})') from None
  if not isinstance(config, dict):
    raise InputError(f'{path}: expected a JSON object')
  return config


def generation_config(model_dir: str, tokenizer) -> dict:
  """The model's generation_config.json (if any), with the tokenizer's eos, pad and bos ids: what an export writes."""
  generation = read_generation_config(model_dir)
  generation.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  if tokenizer.bos_token_id is not None:
    generation['bos_token_id'] = tokenizer.bos_token_id
  return generation
