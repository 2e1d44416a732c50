"""What the command-line modules share: flag parsing, config loading, one-line failure.

Each entry point (`python -m jaxsft.train`, `jaxsft.dryrun`, `jaxsft.export`, `jaxsft.generate`) defines its own
absl flags, the config-taking ones with `define_config_flag()`, and runs

  app.run(main, flags_parser=cli.parse_flags)

with a `main` that starts with `cli.no_arguments(argv)` (and `config = cli.load_config()`). Bad input ends the
program with one `error: ...` line on stderr and exit status 2 (`fail`), before anything heavy is imported: this
module, its imports and the config files import no jax, so a config typo is reported in well under a second.
"""

import contextlib
import os
import re
import sys
from typing import NoReturn
import warnings

from absl import flags
from ml_collections import config_dict
from ml_collections import config_flags

from jaxsft.errors import InputError
from jaxsft.errors import one_line

# transformers prints "PyTorch was not found..." at import wherever torch is absent (every TPU VM): advice for
# users of its torch models, which jaxsft does not use, and a second line under a one-line error. Its advisory
# warnings (only those) are off in jaxsft's commands unless the user set the variable.
os.environ.setdefault('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')

_config_flag = None  # The --config flag once define_config_flag() has run.
# ml_collections' KeyError for an unknown field: "'learnig_rate'" then, when it has one, its guess.
_UNKNOWN = re.compile(r"""^'?(?P<key>[^'\n]*)'?(\nDid you mean "(?P<guess>[^"]+)" instead of .*)?$""", re.DOTALL)


def fail(message: str, status: int = 2) -> NoReturn:
  """Prints `error: message` on stderr and exits with `status` (2: bad input)."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(status)


def define_config_flag():
  """Defines `--config configs/NAME.py[:ARG]` (locked: an unknown field is an error) once; returns its holder."""
  global _config_flag  # pylint: disable=global-statement
  if _config_flag is None:
    _config_flag = config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/NAME.py[:ARG]).',
                                                   lock_config=True)
  return _config_flag


def no_arguments(argv: list[str]) -> None:
  """Fails on positional arguments (absl leaves them in argv after the program name)."""
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a bad flag and the config's errors (unknown field, bad value, missing file, a config file
  that fails) as one line each; with the --config flag defined, it is required."""
  try:
    with _quiet_config_loader():
      rest = flags.FLAGS(argv)
  except flags.Error as e:
    cause = _input_error(e)
    fail(str(cause) if cause else _config_file_error(e) or _first_line(e))
  except SyntaxError as e:
    fail(f'--config {e.filename} line {e.lineno}: {e.msg}')
  except (AttributeError, KeyError) as e:
    cause = _input_error(e)
    fail(str(cause) if cause else _unknown_field(e, argv))
  except (ValueError, TypeError) as e:
    cause = _input_error(e)
    fail(str(cause) if cause else f'--config: {_first_line(e)}')
  except Exception as e:  # pylint: disable=broad-except  (what a config file's get_config() raised)
    if _config_flag is None:
      raise
    cause = _input_error(e)
    fail(str(cause) if cause else f'--config {_config_arg(argv)}: {one_line(_innermost(e), typed=True)}')
  if _config_flag is not None and flags.FLAGS['config'].present == 0 and flags.FLAGS.config is None:
    fail('--config is required, e.g. --config configs/tiny.py')
  return rest


def load_config() -> config_dict.ConfigDict:
  """The --config file's locked ConfigDict (loaded lazily, as config_flags does), its failures as one line."""
  filename = flags.FLAGS['config'].config_filename.split(':', 1)[0]  # configs/NAME.py[:ARG]: ARG is get_config's.
  if not os.path.isfile(filename):
    fail(f'--config: no such file {filename!r}')
  try:
    with _quiet_config_loader():
      config = define_config_flag().value
    if not isinstance(config, config_dict.ConfigDict):  # config_flags defers load errors to first use.
      config.lock()
  except InputError as e:
    fail(str(e))
  except Exception as e:  # pylint: disable=broad-except
    cause = _input_error(e)
    fail(str(cause) if cause else f'--config {filename}: {one_line(_innermost(e), typed=True)}')
  if not isinstance(config, config_dict.ConfigDict):
    fail(f'--config {filename}: get_config() must return a ConfigDict')
  return config


@contextlib.contextmanager
def _quiet_config_loader():
  """ml_collections 1.1's loader calls importlib's deprecated `load_module()`: its DeprecationWarning is not the
  user's concern."""
  with warnings.catch_warnings():
    warnings.filterwarnings('ignore', message=r'the load_module\(\) method is deprecated', category=DeprecationWarning)
    yield


def _input_error(e: BaseException) -> InputError | None:
  """The innermost InputError in `e`'s chain (config_flags re-raises get_config()'s with a traceback as message)."""
  found = None
  for link in _chain(e):
    if isinstance(link, InputError):
      found = link
  return found


def _chain(e: BaseException) -> list[BaseException]:
  """`e`, its cause (or context), that one's, ... without repeats."""
  links, seen = [], set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    links.append(e)
    e = e.__cause__ or e.__context__
  return links


def _innermost(e: BaseException) -> BaseException:
  return _chain(e)[-1]


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _config_file_error(e: flags.Error) -> str | None:
  """'--config FILE: TypeError: ...' for a config file whose get_config() failed (config_flags' message is a
  traceback); None for any other flag error."""
  match = re.match(r'flag --config=(\S+): Error whilst parsing config file', str(e))
  if match is None:
    return None
  return f'--config {match.group(1)}: {one_line(_innermost(e), typed=True)}'


def _unknown_field(e: BaseException, argv: list[str]) -> str:
  """'unknown config field mesh.fsdpp (did you mean mesh.fsdp?)' from config_dict's KeyError (which names the
  last part only) and the --config.PATH=VALUE flag that caused it."""
  while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(msg)).
    e = e.args[0]
  text = str(e.args[0] if e.args else e)
  match = _UNKNOWN.match(text)
  if match is None:
    return f'--config: {one_line(text)}'
  key, guess = match.group('key'), match.group('guess')
  prefix = _path_prefix(key, argv)
  return f'unknown config field {prefix}{key}' + (f' (did you mean {prefix}{guess}?)' if guess else '')


def _config_arg(argv: list[str]) -> str:
  """The value of --config in `argv` ('?' if none)."""
  for i, arg in enumerate(argv):
    if arg in ('--config', '-config') and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith(('--config=', '-config=')):
      return arg.split('=', 1)[1]
  return '?'


def _path_prefix(key: str, argv: list[str]) -> str:
  """'mesh.' when `key` is a part of an overridden path --config.mesh.KEY[.…]=VALUE; '' for a top-level one."""
  for arg in argv:
    path = arg.lstrip('-').split('=', 1)[0]
    if path.startswith('config.'):
      parts = path.split('.')[1:]
      if key in parts:
        return ''.join(part + '.' for part in parts[:parts.index(key)])
  return ''

