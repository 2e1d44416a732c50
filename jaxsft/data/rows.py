"""A dataset row's columns, checked: the conversation of a row, its chat-template arguments, typed columns.

Every check fails with an `InputError` that starts with the row's origin (`where`) and names the column, so
tokenization (`jaxsft.data.formats`) and evaluation prompts (`jaxsft.evals`) read rows the same way.
"""

import json
from typing import Any

from jaxsft.errors import InputError


def column(row: dict, name: str, where: str, types, expected: str) -> Any:
  """`row[name]`, which must be present, not None, and of `types` (`expected` names them for the message)."""
  if name not in row or row[name] is None:
    raise InputError(f'{where}: missing column {name!r} (columns: {sorted(row)})')
  value = row[name]
  if not isinstance(value, types):
    raise InputError(f'{where}: column {name!r} must be {expected}, got {type(value).__name__}')
  return value


def row_messages(row: dict, where: str) -> list[dict]:
  """The row's message list; ShareGPT `conversations` (from/value) are converted as TRL does."""
  if row.get('messages') is None and row.get('conversations') is not None:
    raw = column(row, 'conversations', where, list, 'a list of messages')
    converted = []
    for message in raw:
      if isinstance(message, dict) and ('from' in message or 'value' in message):
        message = dict(message)
        if 'from' in message:
          message['role'] = message.pop('from')
        if 'value' in message:
          message['content'] = message.pop('value')
      converted.append(message)
    return message_list(converted, where, 'conversations')
  return message_list(column(row, 'messages', where, list, 'a list of messages'), where, 'messages')


def message_list(messages: list, where: str, column: str) -> list[dict]:
  """`messages`, checked to be a non-empty list of {role, content} dicts (content may be None with tool_calls)."""
  if not isinstance(messages, list) or not messages:
    raise InputError(f'{where}: column {column!r} must be a non-empty list of {{role, content}} messages')
  for j, message in enumerate(messages):
    if not isinstance(message, dict):
      raise InputError(f'{where}: column {column!r} message {j} must be an object with role and content, '
                       f'got {type(message).__name__}')
    if not isinstance(message.get('role'), str):
      raise InputError(f"{where}: column {column!r} message {j} needs a string 'role'")
    content = message.get('content')
    if not (isinstance(content, (str, list)) or (content is None and message.get('tool_calls'))):
      raise InputError(f"{where}: column {column!r} message {j} needs a string 'content' "
                       f'(got {type(content).__name__})')
  return messages


def template_kwargs(row: dict, where: str) -> dict:
  """`tools` and `chat_template_kwargs` of a row, passed to the chat template as TRL does."""
  kwargs = {}
  tools = row.get('tools')
  if isinstance(tools, str):
    try:
      tools = json.loads(tools)
    except json.JSONDecodeError as e:
      raise InputError(f"{where}: column 'tools': malformed JSON ({e})") from None
  if tools is not None:
    if not isinstance(tools, list):
      raise InputError(f"{where}: column 'tools' must be a list of tool definitions")
    kwargs['tools'] = tools
  extra = row.get('chat_template_kwargs')
  if extra is not None:
    if not isinstance(extra, dict):
      raise InputError(f"{where}: column 'chat_template_kwargs' must be an object")
    kwargs.update(extra)
  return kwargs

