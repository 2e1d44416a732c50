"""Paths given as URLs (gs://, s3://, hdfs://, https://, ...): the ones jaxsft cannot open are refused in one line.

jaxsft opens local paths and, where a field says so, gs:// URLs (jaxsft/storage.py). An `os.path` function given
'gs://bucket/run' sees the relative folder './gs:/bucket/run': unchecked, a run to an unsupported URL trained,
wrote metrics.jsonl, config.json and the tokenizer into that local folder without a word, and failed at its
first checkpoint. Every path field of the config and every path flag of the command-line tools passes through
`refuse` first, before any I/O or compilation.
"""

import re

from jaxsft.errors import InputError

# RFC 3986 scheme, then '://'. Hub ids ('org/name'), local paths and Windows drives ('C:\\x') never match.
_URL_RE = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*)://')

# The config fields that name a file or directory (None and '' are unset; a non-str, e.g. dataset_mixture's dict,
# is no URL), and those of them that may be a gs:// URL: the run directory and what is read back from it
# (jaxsft/storage.py), and data files, prefixes and mixture files (copied locally by jaxsft/data/remote.py).
PATH_FIELDS = ('model_name_or_path', 'tokenizer_name_or_path', 'dataset_name', 'dataset_test_split',
               'dataset_mixture', 'dataset_cache_dir', 'chat_template', 'output_dir', 'logging_dir',
               'resume_from_checkpoint', 'adapter_name_or_path')
GS_FIELDS = ('output_dir', 'logging_dir', 'resume_from_checkpoint', 'dataset_name', 'dataset_test_split',
             'dataset_mixture')


def scheme(value) -> str | None:
  """The URL scheme of `value` ('gs' for 'gs://bucket/x'), or None for a local path, a hub id or a non-str."""
  match = _URL_RE.match(value) if isinstance(value, str) else None
  return match.group(1).lower() if match else None


def refuse(value, field: str, *, gs: bool = False) -> None:
  """Raises InputError naming `field` if `value` is a URL it cannot take (a gs:// one is taken where `gs`)."""
  name = scheme(value)
  if name is None or (gs and name == 'gs'):
    return
  takes = 'a local path or a gs:// URL' if gs else 'a local path'
  hint = ' (copy it to local disk, or mount the bucket with gcsfuse and give the mounted path)' if name == 'gs' else ''
  raise InputError(f'{field}: {value!r} is a {name}:// URL; this takes {takes}{hint}')


def refuse_config(config) -> None:
  """`refuse` for every path field of a config (`PATH_FIELDS`; gs:// where `GS_FIELDS`)."""
  for field in PATH_FIELDS:
    refuse(config.get(field), f'config field {field!r}', gs=field in GS_FIELDS)
