"""The one exception type for bad user input.

Anything the user can fix (a config typo, a missing path, a malformed dataset row, an incompatible
checkpoint) raises `InputError` with a one-line message that names the field, file or row. The CLIs
catch it, print `error: <message>` and exit with status 2, without a traceback.
"""


class InputError(ValueError):
  """Bad user input: the message names the field, file or row at fault."""
