"""jaxsft/storage.py behaves the same on a local directory and on a bucket (fake-gcs-server on 127.0.0.1)."""

import os

import pytest

from jaxsft import storage
from jaxsft.errors import InputError
from tests.helpers.gcs import BUCKET
from tests.helpers.gcs import gcs_emulator  # pylint: disable=unused-import  (a fixture)


@pytest.fixture(params=['local', 'gs'])
def base(request, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  if request.param == 'local':
    return str(tmp_path / 'store')
  return request.getfixturevalue('gcs_emulator').uri('store')


def test_files_round_trip(base):
  run = storage.join(base, 'run')
  storage.makedirs(run)
  assert not storage.exists(storage.join(run, 'config.json'))
  storage.write_atomically(storage.join(run, 'config.json'), '{"a": 1}')
  storage.makedirs(storage.join(run, 'hf'))
  storage.write_atomically(storage.join(run, 'hf', 'model.bin'), b'\x00\x01')
  assert storage.read_text(storage.join(run, 'config.json')) == '{"a": 1}'
  with storage.open_file(storage.join(run, 'hf', 'model.bin'), 'rb') as f:
    assert f.read() == b'\x00\x01'
  assert sorted(storage.listdir(run)) == ['config.json', 'hf']
  assert storage.isdir(storage.join(run, 'hf')) and not storage.isfile(storage.join(run, 'hf'))
  assert storage.isfile(storage.join(run, 'config.json')) and not storage.isdir(storage.join(run, 'config.json'))
  assert storage.files_under(run) == ['config.json', 'hf/model.bin']
  storage.write_atomically(storage.join(run, 'config.json'), '{"a": 2}')  # Replaced whole.
  assert storage.read_text(storage.join(run, 'config.json')) == '{"a": 2}'
  assert not any(n.endswith('.tmp') for n in storage.files_under(run))
  storage.rename(storage.join(run, 'hf'), storage.join(run, 'hf.old'))
  assert storage.files_under(run) == ['config.json', 'hf.old/model.bin']
  storage.remove(storage.join(run, 'config.json'))
  with pytest.raises(FileNotFoundError):
    storage.remove(storage.join(run, 'config.json'))
  storage.rmtree(run)
  assert not storage.exists(run) and storage.listdir(base) == []
  storage.rmtree(run)  # Nothing there: no error.


def test_create_exclusive_gives_the_file_to_one_writer(base):
  storage.makedirs(base)
  path = storage.join(base, '.lock')
  assert storage.create_exclusive(path, 'first')
  assert not storage.create_exclusive(path, 'second')
  assert storage.read_text(path) == 'first'
  storage.remove(path)
  assert storage.create_exclusive(path, 'third')


def test_staged_dir_writes_all_or_nothing(base, tmp_path):
  storage.makedirs(base)
  target = storage.join(base, 'tokenizer')
  with storage.staged_dir(target) as local:
    with open(os.path.join(local, 'tokenizer.json'), 'w', encoding='utf-8') as f:
      f.write('{}')
  assert storage.files_under(target) == ['tokenizer.json']
  with pytest.raises(RuntimeError):
    with storage.staged_dir(target) as local:
      with open(os.path.join(local, 'partial.json'), 'w', encoding='utf-8') as f:
        f.write('{')
      raise RuntimeError('killed mid-write')
  assert storage.files_under(target) == ['tokenizer.json']  # The earlier copy, untouched.
  with storage.local_copy(target) as local:
    assert sorted(os.listdir(local)) == ['tokenizer.json']
  assert not os.path.exists(tmp_path / 'gs:')


def test_remote_paths_are_urls_and_local_ones_are_not():
  assert storage.is_remote('gs://b/x') and not storage.is_remote('/tmp/x') and not storage.is_remote('org/name')
  assert not storage.is_remote('s3://b/x')  # Refused at validation (jaxsft/urls.py), never opened here.
  assert storage.join('gs://b/run/', 'checkpoints', '5') == 'gs://b/run/checkpoints/5'
  assert storage.dirname('gs://b/run/checkpoints') == 'gs://b/run' and storage.dirname('gs://b') == 'gs://b'
  assert storage.basename('gs://b/run/5/') == '5'
  assert storage.absolute('gs://b/run/') == 'gs://b/run'


def test_nothing_lands_in_the_working_directory(gcs_emulator, tmp_path, monkeypatch):
  (tmp_path / 'cwd').mkdir()
  monkeypatch.chdir(tmp_path / 'cwd')
  storage.write_atomically(gcs_emulator.uri('run', 'metrics.jsonl'), '{}\n')
  assert os.listdir('.') == []
  assert os.path.isfile(os.path.join(gcs_emulator.root, BUCKET, 'run', 'metrics.jsonl'))


def test_missing_gcsfs_is_one_line(monkeypatch):
  import builtins  # pylint: disable=import-outside-toplevel
  real_import = builtins.__import__

  def no_gcsfs(name, *args, **kwargs):
    if name == 'gcsfs':
      raise ImportError(name)
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, '__import__', no_gcsfs)
  with pytest.raises(InputError, match=r"gs:// paths need gcsfs: pip install 'jaxsft\[gcs\]'"):
    storage.exists('gs://b/x')


def test_an_upload_cut_short_leaves_no_commit_file(gcs_emulator, tmp_path, monkeypatch):
  """put_dir removes the commit file first and uploads it last: a copy that fails midway leaves a directory that
  readers refuse (no config.json), never old and new files mixed."""
  target = gcs_emulator.uri('hf')
  old = tmp_path / 'old'
  old.mkdir()
  for name in ('config.json', 'model.safetensors', 'tokenizer.json'):
    (old / name).write_text(f'old {name}')
  storage.put_dir(str(old), target, commit='config.json')
  assert storage.read_text(storage.join(target, 'config.json')) == 'old config.json'
  new = tmp_path / 'new'
  new.mkdir()
  for name in ('config.json', 'model.safetensors', 'tokenizer.json'):
    (new / name).write_text(f'new {name}')
  fs = storage._fs()  # pylint: disable=protected-access
  uploaded = []
  real_put = fs.put_file

  def put_then_fail(local, remote, *args, **kwargs):
    if uploaded:
      raise ConnectionError('lost the network')
    uploaded.append(remote)
    return real_put(local, remote, *args, **kwargs)

  assert storage._fs() is fs  # pylint: disable=protected-access  (one instance per process: the patch applies)
  with monkeypatch.context() as patch:
    patch.setattr(fs, 'put_file', put_then_fail)
    with pytest.raises(ConnectionError):
      storage.put_dir(str(new), target, commit='config.json')
  assert uploaded and not uploaded[0].endswith('config.json')
  assert 'config.json' not in storage.listdir(target)
  storage.put_dir(str(new), target, commit='config.json')
  assert {n: storage.read_text(storage.join(target, n)) for n in storage.listdir(target)} == {
      n: f'new {n}' for n in ('config.json', 'model.safetensors', 'tokenizer.json')}
