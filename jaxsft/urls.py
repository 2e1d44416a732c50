"""Paths given as URLs (gs://, s3://, hdfs://, https://, ...): refused in one line, naming the field.

jaxsft reads and writes local paths (a bucket is used through a mount, e.g. gcsfuse: README "TPU pods").
An `os.path` function given 'gs://bucket/run' sees the relative folder './gs:/bucket/run': unchecked, a run
to `--config.output_dir=gs://bucket/run` trained, wrote metrics.jsonl, config.json and the tokenizer into
that local folder without a word, and failed at its first checkpoint. Every path field of the config and every
path flag of the command-line tools passes through `refuse` first, before any I/O or compilation.
"""

import re

from jaxsft.errors import InputError

# RFC 3986 scheme, then '://'. Hub ids ('org/name'), local paths and Windows drives ('C:\\x') never match.
_URL_RE = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*)://')

# The config fields that name a file or directory (None and '' are unset; a non-str, e.g. dataset_mixture's dict,
# is no URL).
PATH_FIELDS = ('model_name_or_path', 'tokenizer_name_or_path', 'dataset_name', 'dataset_test_split',
               'dataset_mixture', 'dataset_cache_dir', 'chat_template', 'output_dir', 'logging_dir',
               'resume_from_checkpoint')


def scheme(value) -> str | None:
  """The URL scheme of `value` ('gs' for 'gs://bucket/x'), or None for a local path, a hub id or a non-str."""
  match = _URL_RE.match(value) if isinstance(value, str) else None
  return match.group(1).lower() if match else None


def refuse(value, field: str) -> None:
  """Raises InputError naming `field` if `value` is a URL (see the module docstring)."""
  name = scheme(value)
  if name is not None:
    raise InputError(f'{field}: {value!r} is a {name}:// URL; jaxsft reads and writes local paths only '
                     f'(mount the bucket, e.g. with gcsfuse, and give the mounted path: README "TPU pods")')


def refuse_config(config) -> None:
  """`refuse` for every path field of a config (`PATH_FIELDS`)."""
  for field in PATH_FIELDS:
    refuse(config.get(field), f'config field {field!r}')
