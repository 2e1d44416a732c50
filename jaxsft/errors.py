"""The one exception type for bad user input, and the one way to put an exception on one line.

Anything the user can fix (a config typo, a missing path, a malformed dataset row, an incompatible
checkpoint) raises `InputError` with a one-line message that names the field, file or row. The CLIs
catch it, print `error: <message>` and exit with status 2, without a traceback (jaxsft/cli.py).

`one_line(e)` flattens another exception's message (a library's, often multi-line) for such a message.
"""


class InputError(ValueError):
  """Bad user input: the message names the field, file or row at fault."""


def one_line(e: BaseException | str, limit: int | None = None, *, typed: bool = False,
             keep_end: bool = False) -> str:
  """`e`'s message on one line: every run of whitespace (newlines included) becomes one space.

  Args:
    e: an exception (or a message).
    limit: at most this many characters of the message: its beginning, or with `keep_end` its beginning and end
      joined by ' ... ' (long tensorstore / XLA messages put the cause, e.g. "No space left on device", last).
    typed: prefix the exception's type name ('OSError: ...'); the type name alone when the message is empty.
    keep_end: see `limit`.
  """
  text = ' '.join(str(e).split())
  if limit is not None and len(text) > limit:
    if keep_end:
      head = (limit - 5) // 2
      text = f'{text[:head]} ... {text[len(text) - (limit - 5 - head):]}'
    else:
      text = text[:limit]
  if typed and isinstance(e, BaseException):
    return f'{type(e).__name__}: {text}' if text else type(e).__name__
  return text
