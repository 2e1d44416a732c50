"""Data read from a bucket (fake-gcs-server on 127.0.0.1, issue 17): gs:// files, prefixes and mixtures train as the
same files on local disk do (jaxsft/data/remote.py copies them to the data cache).

Through the real command line (`python -m jaxsft.train --config configs/sft.py`, a tiny Qwen2, synthetic rows): a
JSON Lines file and an eval file on the bucket, a prefix of parquet shards split by name, and a mixture file on the
bucket naming both, each against the local run on the same rows, metric for metric, bit for bit. A relaunch into a
fresh data cache (another host, a new VM) resumes (the data fingerprint is the objects', not the copies'), a changed
object is refused as changed local data is, and a missing object is one `error:` line naming the field. In this
process: copies are reused, a changed object is copied again, a copy in use is never replaced by a concurrent
stager's, an object replaced mid-copy is listed again, errors name the bucket, a `save_to_disk` prefix loads.
"""

import asyncio
import dataclasses
import json
import os
import pathlib
import threading

import pytest

from jaxsft import storage
from jaxsft.data import mixture as mixture_lib
from jaxsft.data import remote
from jaxsft.data import splits as splits_lib
from jaxsft.errors import InputError
from tests.helpers import gcs
from tests.helpers import models
from tests.helpers import processes
from tests.helpers import runs

pytestmark = pytest.mark.slow
STEPS = 4
SETTINGS = dict(bf16=False, gradient_checkpointing=False, max_length=128, per_device_train_batch_size=2,
                logging_steps=1, disable_tqdm=True, max_steps=STEPS, save_steps=2, eval_strategy='steps', eval_steps=2,
                eval_generation_prompts=0, seed=3)


@dataclasses.dataclass
class Bucket:
  emulator: gcs.Emulator
  env: dict  # For subprocesses.
  root: pathlib.Path
  model_dir: str
  train: str  # Local files; the bucket holds them as data/train.jsonl, data/test.jsonl.
  test: str
  parquet: pathlib.Path  # Local directory; the bucket holds it under pq/.

  def uri(self, *parts: str) -> str:
    return self.emulator.uri(*parts)


def _drop_clients() -> None:
  import gcsfs  # pylint: disable=import-outside-toplevel
  gcsfs.GCSFileSystem.clear_instance_cache()  # Bound to one server's port.


def _upload(local, url: str) -> None:
  storage.write_atomically(url, pathlib.Path(local).read_bytes())


def _write_parquet(path, rows: list[dict]) -> None:
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), path)


def _rows(path) -> list[dict]:
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


@pytest.fixture(scope='module')
def bucket(tmp_path_factory):
  """The emulator (its client environment set in this process for the module), the model and the data, uploaded."""
  root = tmp_path_factory.mktemp('gcs_data')
  model_dir = models.save_tiny_qwen2(root / 'model', hidden_size=32, intermediate_size=64)
  train = processes.write_synthetic_jsonl(root / 'train.jsonl', 24, seed=1)
  test = processes.write_synthetic_jsonl(root / 'test.jsonl', 6, seed=2)
  rows = _rows(train)
  parquet = root / 'parquet'  # The same rows as HF-style shards: train in two, in order; test in one.
  _write_parquet(parquet / 'data' / 'train-00000-of-00002.parquet', rows[:10])
  _write_parquet(parquet / 'data' / 'train-00001-of-00002.parquet', rows[10:])
  _write_parquet(parquet / 'data' / 'test-00000-of-00001.parquet', _rows(test))
  (parquet / 'README.md').write_text('not data\n')
  (root / 'gcs').mkdir()
  with gcs.running(root / 'gcs') as emulator, pytest.MonkeyPatch.context() as patch:
    for key, value in emulator.env.items():
      patch.setenv(key, value)
    _drop_clients()
    _upload(train, emulator.uri('data', 'train.jsonl'))
    _upload(test, emulator.uri('data', 'test.jsonl'))
    for name in storage.files_under(str(parquet)):
      _upload(parquet / name, emulator.uri('pq', name))
    try:
      yield Bucket(emulator, runs.environment(**emulator.env), root, model_dir, train, test, parquet)
    finally:
      _drop_clients()


def _train(bucket: Bucket, out, *extra, env=None, **fields):
  return runs.train_cli('configs/sft.py', *extra, env=env or bucket.env,
                        **{'model_name_or_path': bucket.model_dir, 'output_dir': out, **SETTINGS, **fields})


def _ok(proc) -> None:
  assert proc.returncode == 0, proc.stderr[-4000:]


def _eval_rows(out) -> list[tuple]:
  return [(r['step'], r['eval_loss']) for r in runs.metrics(out) if 'eval_loss' in r]


def _one_error(proc) -> str:
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  (line,) = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  return line


@pytest.fixture(scope='module')
def local_run(bucket):
  """The reference: the local files, dataset_name = train.jsonl and dataset_test_split = test.jsonl."""
  out = bucket.root / 'local'
  _ok(_train(bucket, out, dataset_name=bucket.train, dataset_test_split=bucket.test))
  return {'exact': runs.exact(runs.metrics(out)), 'eval': _eval_rows(out), 'resolved': runs.resolved(out)}


@pytest.fixture(scope='module')
def bucket_run(bucket):
  """The same run with both files on the bucket (kept for the relaunch test)."""
  out = bucket.root / 'from_bucket'
  proc = _train(bucket, out, dataset_name=bucket.uri('data', 'train.jsonl'),
                dataset_test_split=bucket.uri('data', 'test.jsonl'))
  _ok(proc)
  return {'out': out, 'stderr': proc.stderr, 'exact': runs.exact(runs.metrics(out)), 'eval': _eval_rows(out),
          'config': runs.config_json(out)}


def test_a_jsonl_file_and_an_eval_file_on_the_bucket_train_as_the_local_files(bucket, local_run, bucket_run):
  config = bucket_run['config']
  assert config['dataset_name'] == bucket.uri('data', 'train.jsonl')  # As given, not the local copy.
  assert config['dataset_test_split'] == bucket.uri('data', 'test.jsonl')
  assert [r['step'] for r in bucket_run['exact']] == list(range(1, STEPS + 1))
  assert bucket_run['exact'] == local_run['exact']
  assert bucket_run['eval'] == local_run['eval'] and len(local_run['eval']) == 2
  assert config['resolved']['num_rows'] == local_run['resolved']['num_rows'] == 24
  assert f"data: 24 rows from {bucket.uri('data', 'train.jsonl')};" in bucket_run['stderr']
  assert 'data: copying 1 object(s)' in bucket_run['stderr']
  assert not os.path.exists(os.path.join(runs.ROOT, 'gs:'))


def test_a_prefix_of_parquet_shards_is_split_by_file_name(bucket, local_run):
  out = bucket.root / 'parquet_prefix'
  proc = _train(bucket, out, dataset_name=bucket.uri('pq'), dataset_test_split='test')
  _ok(proc)
  assert runs.config_json(out)['dataset_name'] == bucket.uri('pq')
  # The train shards in order are train.jsonl's rows, the test shard test.jsonl's: the local run, bit for bit.
  assert runs.exact(runs.metrics(out)) == local_run['exact']
  assert _eval_rows(out) == local_run['eval']
  assert f"data: 24 rows from {bucket.uri('pq')} split 'train'" in proc.stderr
  assert 'data: copying 2 object(s)' in proc.stderr and 'data: copying 1 object(s)' in proc.stderr  # Only data.


def test_a_mixture_file_on_the_bucket_naming_gs_datasets(bucket):
  """The mixture file and its datasets on the bucket, against the same mixture of the local files."""
  def spec(train, prefix):
    return {'datasets': [{'id': train, 'weight': 0.5}, {'id': prefix, 'split': 'test'}], 'seed': 5}

  local_file = bucket.root / 'mixture.json'
  local_file.write_text(json.dumps(spec(bucket.train, str(bucket.parquet))))
  storage.write_atomically(bucket.uri('mixture.json'), json.dumps(spec(bucket.uri('data', 'train.jsonl'),
                                                                       bucket.uri('pq'))))
  outs = {}
  for name, mixture in (('local', str(local_file)), ('bucket', bucket.uri('mixture.json'))):
    outs[name] = bucket.root / f'mixture_{name}'
    _ok(_train(bucket, outs[name], dataset_mixture=mixture, dataset_test_split=bucket.test))
  assert runs.config_json(outs['bucket'])['dataset_mixture'] == bucket.uri('mixture.json')
  assert runs.resolved(outs['bucket'])['num_rows'] == 12 + 6
  assert runs.exact(runs.metrics(outs['bucket'])) == runs.exact(runs.metrics(outs['local']))
  assert _eval_rows(outs['bucket']) == _eval_rows(outs['local'])


def test_a_relaunch_on_a_fresh_cache_resumes_and_a_changed_object_is_refused(bucket, bucket_run, tmp_path):
  out, url = bucket_run['out'], bucket.uri('data', 'train.jsonl')
  args = dict(dataset_name=url, dataset_test_split=bucket.uri('data', 'test.jsonl'))
  # Another host, or a new VM: an empty data cache, so new copies (other paths, other times) of the same objects.
  fresh = dict(bucket.env, JAXSFT_CACHE_DIR=str(tmp_path / 'fresh_cache'))
  proc = _train(bucket, out, env=fresh, **args)
  _ok(proc)
  assert f'resumed from {out}/checkpoints/{STEPS} at step {STEPS}' in proc.stderr, proc.stderr[-3000:]
  assert 'data: copying 1 object(s)' in proc.stderr  # Really copied again.
  assert runs.resolved(out)['data_fingerprint'] == bucket_run['config']['resolved']['data_fingerprint']

  lines = pathlib.Path(bucket.train).read_text().splitlines()
  storage.write_atomically(url, '\n'.join(lines[:-1]) + '\n')  # One row fewer.
  try:
    before = runs.metrics(out)
    line = _one_error(_train(bucket, out, env=fresh, **args))
    assert 'cannot resume from' in line and 'data_fingerprint' in line, line
    assert runs.metrics(out) == before
  finally:
    _upload(bucket.train, url)


def test_a_missing_object_is_one_error_line_naming_the_field(bucket, tmp_path):
  url = bucket.uri('data', 'missing.jsonl')
  proc = _train(bucket, tmp_path / 'out', dataset_name=url)
  line = _one_error(proc)
  assert line == f"error: config field 'dataset_name': no such object or prefix: {url!r}", line
  assert 'tokeniz' not in proc.stderr.lower() and 'compil' not in proc.stderr.lower(), proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / 'out' / 'checkpoints')


# ----------------------------------------------------------------------------------------------------------
# In this process: the copies.


def _load(name, cache, **kwargs) -> splits_lib.Splits:
  args = dict(dataset_name=name, dataset_config=None, dataset_train_split='train', dataset_test_split='test',
              need_eval=False, remote_cache=cache)
  return splits_lib.load_splits(**{**args, **kwargs})


def _copies(cache: remote.Cache) -> list[str]:
  return sorted(str(p.relative_to(cache.root)) for p in pathlib.Path(cache.root).rglob('*') if p.is_file())


def test_copies_are_reused_until_the_object_changes(bucket, tmp_path):
  url = bucket.uri('copies', 'train.jsonl')
  _upload(bucket.train, url)
  logs = []
  first = remote.Cache(str(tmp_path / 'a'), logs.append)
  source = _load(url, first).train
  assert source.name == url and source.origin(3) == f'{url} line 4' and len(source) == 24
  (copy,) = _copies(first)
  inode = os.stat(pathlib.Path(first.root, copy)).st_ino
  logs.clear()
  again = _load(url, first).train
  assert logs == [] and _copies(first) == [copy] and os.stat(pathlib.Path(first.root, copy)).st_ino == inode
  elsewhere = _load(url, remote.Cache(str(tmp_path / 'b'))).train  # Another host's cache.
  assert source.fingerprint() == again.fingerprint() == elsewhere.fingerprint()

  _upload(bucket.train, url)  # The same bytes again: a new generation, a new copy, the same fingerprint.
  assert _load(url, first).train.fingerprint() == source.fingerprint() and len(_copies(first)) == 2
  storage.write_atomically(url, pathlib.Path(bucket.test).read_bytes())  # Other rows.
  changed = _load(url, first).train
  assert len(changed) == 6 and changed.fingerprint() != source.fingerprint() and len(_copies(first)) == 3


def test_a_copy_in_use_is_never_replaced_by_a_concurrent_stager(bucket, tmp_path, monkeypatch):
  """B starts copying first, A copies, links and indexes its copy, then B finishes: B keeps A's copy (were A's
  replaced, A would refuse to read it: the file changed after it was indexed, jaxsft/data/handles.py)."""
  import gcsfs  # pylint: disable=import-outside-toplevel
  cache = remote.Cache(str(tmp_path / 'cache'))
  url = bucket.uri('data', 'train.jsonl')
  get_file, calls, b_copying, a_done = gcsfs.GCSFileSystem._get_file, [], threading.Event(), threading.Event()

  async def get_file_first_ends_last(self, *args, **kwargs):
    await get_file(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == 1:  # B's copy, done: B links it only after A has linked and indexed its own.
      b_copying.set()
      assert await asyncio.get_running_loop().run_in_executor(None, a_done.wait, 60)  # Not blocking fsspec's loop.

  # gcsfs binds its sync methods when an instance is made (one per thread): patch the class, make new instances.
  monkeypatch.setattr(gcsfs.GCSFileSystem, '_get_file', get_file_first_ends_last)
  _drop_clients()
  loaded = {}
  b = threading.Thread(target=lambda: loaded.update(b=_load(url, cache).train))
  b.start()
  try:
    assert b_copying.wait(60)
    loaded['a'] = _load(url, cache).train
  finally:
    a_done.set()
    b.join(60)
    monkeypatch.undo()
    _drop_clients()
  assert len(calls) == 2, calls  # Both copied.
  assert len(_copies(cache)) == 1  # One copy, no temporary file left.
  for source in (loaded['a'], loaded['b']):
    assert [source[i] for i in range(len(source))] == _rows(bucket.train)
  assert loaded['a'].fingerprint() == loaded['b'].fingerprint()


def test_an_object_replaced_while_it_is_copied_is_listed_again(bucket, tmp_path, monkeypatch):
  url = bucket.uri('replaced', 'train.jsonl')
  _upload(bucket.train, url)
  text = pathlib.Path(bucket.train).read_text()
  other = text.replace('"user"', '"USER"', 1)  # Other bytes of the same size: only the generation tells.
  assert len(other) == len(text) and other != text
  listing, calls = remote._listing, []  # pylint: disable=protected-access

  def listing_then_replace(*args):
    found = listing(*args)
    calls.append(1)
    if len(calls) == 1:  # Listed at one generation, replaced before the download.
      storage.write_atomically(url, other)
    return found

  monkeypatch.setattr(remote, '_listing', listing_then_replace)
  source = _load(url, remote.Cache(str(tmp_path / 'cache'))).train
  assert len(calls) == 2  # The copy of the listed generation failed (a 404), and the object was listed again.
  assert source[0]['messages'][0]['role'] == 'USER'
  monkeypatch.setattr(remote, '_listing', listing)
  assert source.fingerprint() == _load(url, remote.Cache(str(tmp_path / 'other'))).train.fingerprint()


def test_prefixes_split_files_and_mixtures_name_the_bucket_in_errors(bucket, tmp_path):
  cache = remote.Cache(str(tmp_path / 'cache'))
  prefix = bucket.uri('pq')
  splits = _load(prefix, cache, need_eval=True)
  assert splits.train_name == f"{prefix} split 'train'" and len(splits.train) == 24 and len(splits.eval) == 6
  assert splits.train.origin(12) == f'{prefix}/data/train-00001-of-00002.parquet row 2'
  with pytest.raises(InputError, match=r"^config field 'dataset_test_split': no file for split 'validation' in "
                     + f"'{prefix}'"):
    _load(prefix, cache, dataset_test_split='validation', need_eval=True)
  with pytest.raises(InputError, match=r"^config field 'dataset_test_split': 'test' is not available: 'gs://"):
    _load(bucket.uri('data', 'train.jsonl'), cache, need_eval=True)
  with pytest.raises(InputError, match=r"^config field 'dataset_test_split': 'gs://jaxsft-test/pq' is a prefix"):
    _load(bucket.train, cache, dataset_test_split=prefix, need_eval=True)
  storage.write_atomically(bucket.uri('notes', 'x.txt'), 'no data')
  with pytest.raises(InputError, match=r"^config field 'dataset_name': the prefix 'gs://jaxsft-test/notes/' holds no "):
    _load(bucket.uri('notes') + '/', cache)
  with pytest.raises(InputError, match=r"^config field 'dataset_name': no such object or prefix: 'gs://jaxsft-test/"
                     r"data/\*\.jsonl' \(globs are not expanded"):
    _load(bucket.uri('data', '*.jsonl'), cache)
  missing = bucket.uri('nothing', 'here.jsonl')
  with pytest.raises(InputError, match=r"^config field 'dataset_mixture.datasets\[1\].id': no such object or prefix: "
                     + repr(missing).replace('.', r'\.') + '$'):
    mixture_lib.load_mixture({'datasets': [{'id': bucket.train}, {'id': missing}]}, cache)
  with pytest.raises(InputError, match=r"^config field 'dataset_mixture': cannot read the mixture file "
                     r"'gs://jaxsft-test/none\.yaml' \(no such object\)$"):
    mixture_lib.load_mixture(bucket.uri('none.yaml'), cache)
  (tmp_path / 'a_file').write_text('')  # A data cache that cannot be written: one line, naming the object.
  with pytest.raises(InputError, match=r"^config field 'dataset_name': cannot copy 'gs://jaxsft-test/data/train\.jsonl'"
                     r" to '.*/a_file/.*' \(NotADirectoryError: "):
    _load(bucket.uri('data', 'train.jsonl'), remote.Cache(str(tmp_path / 'a_file' / 'gcs')))


def test_a_saved_dataset_prefix_loads_from_its_copy(bucket, tmp_path):
  datasets = pytest.importorskip('datasets')
  saved = tmp_path / 'saved'
  datasets.DatasetDict({'train': datasets.Dataset.from_list(_rows(bucket.train)),
                        'test': datasets.Dataset.from_list(_rows(bucket.test))}).save_to_disk(str(saved))
  prefix = bucket.uri('saved')
  for name in storage.files_under(str(saved)):
    _upload(saved / name, storage.join(prefix, name))
  first, second = remote.Cache(str(tmp_path / 'a')), remote.Cache(str(tmp_path / 'b'))
  splits = _load(prefix, first, need_eval=True)
  assert [splits.train[i] for i in range(24)] == _rows(bucket.train) and len(splits.eval) == 6
  assert splits.train.fingerprint() == _load(prefix, second).train.fingerprint()
  with pytest.raises(InputError, match=rf"^config field 'dataset_test_split': no split 'dev' in '{prefix}'"):
    _load(prefix, first, dataset_test_split='dev', need_eval=True)
