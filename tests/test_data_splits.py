"""Where splits come from besides data files: `save_to_disk` directories (Dataset, DatasetDict), and an eval split
given as a file path (`dataset_test_split=/data/test.jsonl`), for `dataset_name` and for mixtures."""

import json
import pickle

import pytest

from jaxsft.data import paths
from jaxsft.data import sources
from jaxsft.data import splits as splits_lib
from jaxsft.errors import InputError

datasets = pytest.importorskip('datasets')

ROWS = [{'messages': [{'role': 'user', 'content': f'q{i}'}, {'role': 'assistant', 'content': f'a{i}'}]}
        for i in range(5)]


def _load(name, *, need_eval=False, split='train', test_split='test', mixture=None) -> sources.Splits:
  return splits_lib.load_splits(dataset_name=None if name is None else str(name), dataset_config=None,
                                dataset_train_split=split,
                                dataset_test_split=None if test_split is None else str(test_split),
                                dataset_mixture=mixture, need_eval=need_eval)


def _jsonl(path, rows) -> str:
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows), encoding='utf-8')
  return str(path)


def _saved_dataset(path, rows) -> str:
  datasets.Dataset.from_list(rows).save_to_disk(str(path))
  return str(path)


def _saved_dict(path, **splits) -> str:
  saved = datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})
  saved.save_to_disk(str(path))
  return str(path)


def test_saved_dataset_is_the_train_split(tmp_path):
  path = _saved_dataset(tmp_path / 'ds', ROWS)
  assert paths.saved_kind(path) == 'Dataset'
  splits = _load(path)
  assert list(splits.train) == ROWS and splits.eval is None
  assert splits.train.column_names() == ['messages']
  assert splits.train.origin(3) == f"dataset '{path}' split 'train' row 3"
  assert splits.train_name == f"{path} split 'train'"
  assert pickle.loads(pickle.dumps(splits.train))[1] == ROWS[1]
  with pytest.raises(InputError, match=r"^config field 'dataset_test_split': 'test' is not available: .* saved "
                                       r"Dataset \(its only split is 'train'\); .*dataset_test_split to its path"):
    _load(path, need_eval=True)


def test_saved_dataset_fingerprint_follows_the_content(tmp_path):
  path = _saved_dataset(tmp_path / 'ds', ROWS)
  first = _load(path).train.fingerprint()
  assert _load(path).train.fingerprint() == first
  other = _saved_dataset(tmp_path / 'ds2', ROWS[:2] + ROWS[3:])
  assert _load(other).train.fingerprint() != first
  assert sources.select_columns(_load(path).train, ['messages']).fingerprint() != first  # Another view.


def test_saved_dataset_dict_splits_by_name(tmp_path):
  path = _saved_dict(tmp_path / 'dd', train=ROWS, validation=ROWS[:2])
  assert paths.saved_kind(path) == 'DatasetDict'
  splits = _load(path, need_eval=True, test_split='validation')
  assert list(splits.train) == ROWS and list(splits.eval) == ROWS[:2]
  assert splits.eval.origin(1) == f"dataset '{path}' split 'validation' row 1"
  assert splits.eval_name == f"{path} split 'validation'"
  assert splits.train.fingerprint() != splits.eval.fingerprint()
  with pytest.raises(InputError, match=r"^config field 'dataset_test_split': no split 'test' in .*dd' \(a saved "
                                       r"DatasetDict with splits \['train', 'validation'\]\)"):
    _load(path, need_eval=True)
  with pytest.raises(InputError, match=r"^config field 'dataset_train_split': no split 'dev' .*\['train', "
                                       r"'validation'\]\)$"):
    _load(path, split='dev')


def test_a_damaged_saved_directory_is_one_line(tmp_path):
  path = _saved_dataset(tmp_path / 'ds', ROWS)
  for arrow in (tmp_path / 'ds').glob('*.arrow'):
    arrow.unlink()
  with pytest.raises(InputError, match=r"^config field 'dataset_name': cannot load the saved Dataset .*ds'") as e:
    _load(path)
  assert '\n' not in str(e.value)


def test_eval_split_given_as_a_file_path(tmp_path):
  train = _jsonl(tmp_path / 'train.jsonl', ROWS)
  test = _jsonl(tmp_path / 'held out.jsonl', ROWS[:2])
  splits = _load(train, need_eval=True, test_split=test)
  assert list(splits.train) == ROWS and list(splits.eval) == ROWS[:2]
  assert splits.eval_name == test and splits.eval.origin(1) == f'{test} line 2'
  # Any train data: a directory of split files, a saved dataset, a synthetic dataset.
  (tmp_path / 'dir').mkdir()
  _jsonl(tmp_path / 'dir' / 'train.jsonl', ROWS)
  assert list(_load(tmp_path / 'dir', need_eval=True, test_split=test).eval) == ROWS[:2]
  saved = _saved_dataset(tmp_path / 'ds', ROWS)
  assert list(_load(saved, need_eval=True, test_split=test).eval) == ROWS[:2]
  assert list(_load('synthetic:arithmetic?train=3&test=0', need_eval=True, test_split=test).eval) == ROWS[:2]
  # A parquet file, and a saved Dataset as the eval split.
  parquet = tmp_path / 'eval.parquet'
  datasets.Dataset.from_list(ROWS[:3]).to_parquet(str(parquet))
  assert list(_load(train, need_eval=True, test_split=parquet).eval) == ROWS[:3]
  assert list(_load(train, need_eval=True, test_split=saved).eval) == ROWS
  # Without evaluation, the path is not even looked at.
  assert _load(train, test_split=tmp_path / 'nope.jsonl').eval is None


def test_eval_file_path_errors_are_one_line(tmp_path):
  train = _jsonl(tmp_path / 'train.jsonl', ROWS)
  with pytest.raises(InputError, match=r"^config field 'dataset_test_split': no such file: '.*/nope\.jsonl'$"):
    _load(train, need_eval=True, test_split=tmp_path / 'nope.jsonl')
  with pytest.raises(InputError, match=r"^config field 'dataset_test_split': .* is a directory; expected a .jsonl"):
    _load(train, need_eval=True, test_split=tmp_path)
  (tmp_path / 'notes.txt').write_text('x', encoding='utf-8')
  with pytest.raises(InputError, match=r"^config field 'dataset_test_split': .*notes.txt' is not a .jsonl"):
    _load(train, need_eval=True, test_split=tmp_path / 'notes.txt')
  with pytest.raises(InputError, match=r"^config field 'dataset_train_split': expected a split name, got the path "
                                       r".*set 'dataset_name' to it"):
    _load(train, split=str(tmp_path / 'train.jsonl'))


def test_split_names_of_a_single_file(tmp_path):
  train = _jsonl(tmp_path / 'train.jsonl', ROWS)
  with pytest.raises(InputError, match=r"'dataset_test_split': 'test' is not available: .*single file \(its only "
                                       r"split is 'train'\); .*set dataset_test_split to its path") as e:
    _load(train, need_eval=True)
  assert '.jsonl.jsonl' not in str(e.value)
  with pytest.raises(InputError, match=r"^config field 'dataset_train_split': 'dev' is not available"):
    _load(train, split='dev')


def test_split_values_that_are_paths():
  for value in ('/data/test.jsonl', 'test.jsonl', 'eval.PARQUET', './x', 'data/test', '~/t.json'):
    assert paths.is_split_path(value), value
  for value in ('test', 'validation', 'train[:10%]', 'test_sft', None, ''):
    assert not paths.is_split_path(value), value


def test_mixture_of_saved_datasets(tmp_path):
  ds = _saved_dataset(tmp_path / 'ds', ROWS)
  dd = _saved_dict(tmp_path / 'dd', train=ROWS[:2], extra=ROWS[2:])
  spec = {'datasets': [{'id': ds, 'weight': None}, {'id': dd, 'split': 'extra', 'weight': None}], 'seed': 0}
  splits = _load(None, test_split='test', mixture=spec)
  assert sorted(r['messages'][0]['content'] for r in splits.train) == sorted(
      [r['messages'][0]['content'] for r in ROWS] + [r['messages'][0]['content'] for r in ROWS[2:]])
  bad = {'datasets': [{'id': dd, 'split': 'test'}]}
  with pytest.raises(InputError, match=r"^config field 'dataset_mixture.datasets\[0\].split': no split 'test' .*"
                                       r"\['train', 'extra'\]"):
    _load(None, mixture=bad)


def test_mixture_with_an_eval_file(tmp_path):
  a = _jsonl(tmp_path / 'a.jsonl', ROWS)
  test = _jsonl(tmp_path / 'test.jsonl', ROWS[:2])
  spec = {'datasets': [{'id': a}], 'seed': 0}
  splits = _load(None, need_eval=True, test_split=test, mixture=spec)
  assert len(splits.train) == 5 and list(splits.eval) == ROWS[:2] and splits.eval_name == test
  with pytest.raises(InputError, match=r"'dataset_test_split' \(the file .*\) and 'dataset_mixture.test_split_size' "
                                       'both make an eval split'):
    _load(None, need_eval=True, test_split=test, mixture={**spec, 'test_split_size': 2})
  with pytest.raises(InputError, match=r"'dataset_mixture.test_split_size' is not set.*an eval file's path"):
    _load(None, need_eval=True, mixture=spec)
