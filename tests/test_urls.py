"""URL paths that jaxsft cannot open (s3://, hdfs://, ...; gs:// outside the run-directory and data fields) are
refused in one line naming the field, before anything is written.

Unchecked, `--config.output_dir=gs://bucket/run` trained into a local folder './gs:/bucket/run' (issue 17); gs://
output directories now go through jaxsft/storage.py (tests/test_gcs_runs.py), gs:// data through
jaxsft/data/remote.py (tests/test_gcs_data.py).
"""

import os
import subprocess
import sys

import pytest

from jaxsft import config as config_lib
from jaxsft import export
from jaxsft import urls
from jaxsft.data import mixture
from jaxsft.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('value,expected', [
    ('gs://bucket/run', 'gs'), ('GS://Bucket', 'gs'), ('s3://b/k', 's3'), ('hdfs://nn:8020/x', 'hdfs'),
    ('https://huggingface.co/x', 'https'), ('file:///tmp/x', 'file'), ('gcs+grpc://b', 'gcs+grpc'),
    ('runs/tiny', None), ('/abs/gs://x', None), ('./gs:/bucket/run', None), ('Qwen/Qwen2.5-0.5B', None),
    ('C:\\data\\train.jsonl', None), ('', None), (None, None), (3, None),
])
def test_scheme(value, expected):
  assert urls.scheme(value) == expected


def _config(**overrides):
  c = config_lib.base_config()
  c.model_name_or_path = 'org/model'
  c.model_init = 'random'
  c.dataset_name = 'org/data'
  c.output_dir = 'runs/x'
  for key, value in overrides.items():
    c[key] = value
  return c


def test_local_config_passes():
  config_lib.validate(_config())


def _overrides(field, value):
  overrides = {field: value}
  if field == 'dataset_mixture':
    overrides['dataset_name'] = None
  return overrides


@pytest.mark.parametrize('url', ['s3://bucket/x', 'hdfs://nn:8020/x', 'https://host/x'])
@pytest.mark.parametrize('field', urls.PATH_FIELDS)
def test_every_path_field_refuses_schemes_jaxsft_cannot_open(field, url):
  with pytest.raises(InputError) as e:
    config_lib.validate(_config(**_overrides(field, url)))
  takes = 'a local path or a gs:// URL' if field in urls.GS_FIELDS else 'a local path'
  assert str(e.value) == f"config field {field!r}: {url!r} is a {url.split(':')[0]}:// URL; this takes {takes}"
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('field', urls.PATH_FIELDS)
def test_gs_urls_only_where_a_bucket_is_read_or_written(field):
  if field in urls.GS_FIELDS:
    config_lib.validate(_config(**_overrides(field, 'gs://bucket/x')))
    return
  with pytest.raises(InputError) as e:
    config_lib.validate(_config(**_overrides(field, 'gs://bucket/x')))
  assert str(e.value).startswith(f"config field '{field}': 'gs://bucket/x' is a gs:// URL; this takes a local path "
                                 '(copy it to local disk, or mount the bucket'), str(e.value)


def test_mixture_entry_id_is_refused_unless_gs():
  with pytest.raises(InputError, match=r"config field 'dataset_mixture.datasets\[1\].id': 's3://b/d.jsonl' is a s3://"):
    mixture.parse_mixture({'datasets': [{'id': 'org/a'}, {'id': 's3://b/d.jsonl'}]})
  parsed = mixture.parse_mixture({'datasets': [{'id': 'org/a'}, {'id': 'gs://b/d.jsonl'}]})  # Read by data/remote.py.
  assert parsed.datasets[1].id == 'gs://b/d.jsonl'


def test_export_refuses_urls_it_cannot_open_before_reading(tmp_path):
  with pytest.raises(InputError, match=r"^--checkpoint: 's3://b/run' is a s3:// URL; this takes a local path or a gs"):
    export.export_checkpoint('s3://b/run', str(tmp_path / 'hf'))
  with pytest.raises(InputError, match=r"^--out: 'hdfs://b/hf' is a hdfs:// URL"):
    export.export_checkpoint(str(tmp_path), 'hdfs://b/hf')


def _run(module: str, *args: str, cwd) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', module, *args], cwd=cwd, env=env, text=True, capture_output=True,
                        timeout=180, check=False)


@pytest.mark.parametrize('module,args', [
    ('jaxsft.train', ('--config', os.path.join(ROOT, 'configs/tiny.py'), '--config.model_name_or_path=gs://bucket/m')),
    ('jaxsft.train', ('--config', os.path.join(ROOT, 'configs/tiny.py'), '--config.output_dir=hdfs://nn/run')),
    ('jaxsft.export', ('--checkpoint', 'runs/none', '--out', 's3://bucket/hf')),
])
def test_command_line_refuses_a_url_and_writes_nothing(tmp_path, module, args):
  """Through the real command line, in an empty working directory: one `error:` line, exit 2, no folder made."""
  proc = _run(module, *args, cwd=tmp_path)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and ' URL; this takes a local path' in errors[0], proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert os.listdir(tmp_path) == []
