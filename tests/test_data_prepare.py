"""The checks `jaxsft.data.prepare` makes before the data pass: conversational rows need a chat template."""

import os

import pytest
import transformers

from jaxsft import config as config_lib
from jaxsft.data import formats
from jaxsft.data import prepare
from jaxsft.data import sources
from jaxsft.errors import InputError

TINY = os.path.join(os.path.dirname(prepare.__file__), '..', 'assets', 'tiny')
CHAT = [{'role': 'user', 'content': 'Hi?'}, {'role': 'assistant', 'content': 'Hello.'}]


@pytest.fixture(scope='module')
def no_template(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tokenizer'))
  tokenizer = transformers.AutoTokenizer.from_pretrained(TINY)
  tokenizer.chat_template = None
  tokenizer.save_pretrained(path)
  return transformers.AutoTokenizer.from_pretrained(path)


def _config(**fields):
  config = config_lib.base_config()
  for key, value in fields.items():
    config[key] = value
  return config


def _rows(*rows):
  return sources.RowList(list(rows), 'data', 'train')


def _check(tokenizer, source, fmt, config=None):
  prepare._check_chat_template(config or _config(), source, tokenizer, fmt)  # pylint: disable=protected-access


def test_conversations_without_a_chat_template_fail_naming_the_tokenizer(no_template):
  source = _rows({'messages': CHAT})
  with pytest.raises(InputError) as e:
    _check(no_template, source, formats.MESSAGES)
  message = str(e.value)
  assert message.startswith(f"the tokenizer {no_template.name_or_path!r} (config field 'model_name_or_path') has "
                            "no chat template, but the rows of data split 'train' are conversations")
  assert message.endswith("set config field 'chat_template' to a Jinja template or the path of a file holding one, "
                          'or use a tokenizer that has one')
  with pytest.raises(InputError, match=r"\(config field 'tokenizer_name_or_path'\)"):
    _check(no_template, source, formats.MESSAGES, _config(tokenizer_name_or_path='some/tokenizer'))
  with pytest.raises(InputError, match='no chat template'):  # Prompt and completion as message lists.
    _check(no_template, _rows({'prompt': CHAT[:1], 'completion': CHAT[1:]}), formats.PROMPT_COMPLETION)


def test_rows_that_need_no_template_pass(no_template):
  _check(no_template, _rows({'text': 'Hello.'}), formats.TEXT)
  _check(no_template, _rows({'prompt': 'Hi?', 'completion': 'Hello.'}), formats.PROMPT_COMPLETION)
  _check(no_template, _rows('not a row'), formats.PROMPT_COMPLETION)  # The data pass names the bad row.
  _check(transformers.AutoTokenizer.from_pretrained(TINY), _rows({'messages': CHAT}), formats.MESSAGES)
