"""Dataset sources: local files and directories, hub ids (load_dataset stubbed), synthetic; error messages."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxsft.data import sources
from jaxsft.errors import InputError

ROWS = [{'messages': [{'role': 'user', 'content': f'q{i}'}, {'role': 'assistant', 'content': f'a{i}'}]}
        for i in range(3)]


def _load(name, *, need_eval=False, split='train', test_split='test', config=None) -> sources.Splits:
  return sources.load_splits(dataset_name=str(name), dataset_config=config, dataset_train_split=split,
                             dataset_test_split=test_split, need_eval=need_eval)


def _write_jsonl(path, lines: list[str]) -> str:
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return str(path)


def test_jsonl_rows_and_line_origins(tmp_path):
  path = _write_jsonl(tmp_path / 'train.jsonl', [json.dumps(ROWS[0]), '', '   ', json.dumps(ROWS[1]),
                                                  json.dumps(ROWS[2])])
  splits = _load(path)
  assert list(splits.train) == ROWS
  assert splits.eval is None and splits.eval_name is None and splits.train_name == path
  assert [splits.origin(i) for i in range(3)] == [f'{path} line 1', f'{path} line 4', f'{path} line 5']


def test_jsonl_malformed_line_names_line_number(tmp_path):
  path = _write_jsonl(tmp_path / 'd.jsonl', [json.dumps(ROWS[0]), '', '{"messages": [}'])
  with pytest.raises(InputError, match=rf'^{path} line 3: malformed JSON \(Expecting value: line 1 column 15'):
    _load(path)


def test_jsonl_line_that_is_not_an_object(tmp_path):
  path = _write_jsonl(tmp_path / 'd.jsonl', [json.dumps(ROWS[0]), '[1, 2]'])
  with pytest.raises(InputError, match=rf'^{path} line 2: expected a JSON object, got an array$'):
    _load(path)


def test_jsonl_invalid_utf8_names_line(tmp_path):
  path = tmp_path / 'd.jsonl'
  path.write_bytes(json.dumps(ROWS[0]).encode() + b'\n{"text": "\xff\xfe"}\n')
  with pytest.raises(InputError, match=r'd.jsonl line 2: not UTF-8'):
    _load(path)


def test_missing_file_names_field_and_path(tmp_path):
  missing = tmp_path / 'nope' / 'train.jsonl'
  with pytest.raises(InputError, match=rf"'dataset_name': no such file or directory: '{missing}'"):
    _load(missing)


@pytest.mark.parametrize('content', ['', '\n\n  \n', '[]'])
def test_empty_dataset(tmp_path, content):
  path = tmp_path / ('d.json' if content == '[]' else 'd.jsonl')
  path.write_text(content, encoding='utf-8')
  with pytest.raises(InputError, match=r'empty \(0 rows\)'):
    _load(path)


def test_json_array_and_json_lines_under_json_name(tmp_path):
  array = tmp_path / 'a.json'
  array.write_text(json.dumps(ROWS), encoding='utf-8')
  splits = _load(array)
  assert list(splits.train) == ROWS and splits.origin(2) == f'{array} item 2'
  lines = tmp_path / 'b.json'
  lines.write_text('\n'.join(json.dumps(r) for r in ROWS), encoding='utf-8')
  splits = _load(lines)
  assert list(splits.train) == ROWS and splits.origin(1) == f'{lines} line 2'
  bad = tmp_path / 'c.json'
  bad.write_text('[{"a": 1}, 3]', encoding='utf-8')
  with pytest.raises(InputError, match=r'c.json item 1: expected a JSON object, got a number'):
    _load(bad)


def test_parquet_file(tmp_path):
  path = tmp_path / 'train.parquet'
  pq.write_table(pa.Table.from_pylist(ROWS), path)
  splits = _load(path)
  assert list(splits.train) == ROWS and splits.origin(1) == f'{path} row 1'
  broken = tmp_path / 'broken.parquet'
  broken.write_bytes(b'not parquet')
  with pytest.raises(InputError, match='broken.parquet: cannot read parquet'):
    _load(broken)


def test_single_file_has_no_eval_split(tmp_path):
  path = _write_jsonl(tmp_path / 'd.jsonl', [json.dumps(ROWS[0])])
  with pytest.raises(InputError, match=r"'dataset_test_split': 'test' is not available.*single file"):
    _load(path, need_eval=True)


def test_directory_of_split_files(tmp_path):
  _write_jsonl(tmp_path / 'train.jsonl', [json.dumps(r) for r in ROWS])
  _write_jsonl(tmp_path / 'test.jsonl', [json.dumps(ROWS[0])])
  splits = _load(tmp_path)
  assert list(splits.train) == ROWS and splits.eval is None
  splits = _load(tmp_path, need_eval=True)
  assert list(splits.eval) == ROWS[:1]
  assert splits.eval_origin(0) == f'{tmp_path}/test.jsonl line 1'
  assert splits.origin(2) == f'{tmp_path}/train.jsonl line 3'
  with pytest.raises(InputError, match=r"'dataset_test_split': no file for split 'validation'"):
    _load(tmp_path, need_eval=True, test_split='validation')
  with pytest.raises(InputError, match=r"'dataset_train_split': no file for split 'dev'"):
    _load(tmp_path, split='dev')


def test_directory_of_hf_style_data_files(tmp_path):
  (tmp_path / 'data').mkdir()
  pq.write_table(pa.Table.from_pylist(ROWS[:2]), tmp_path / 'data' / 'train-00000-of-00002.parquet')
  pq.write_table(pa.Table.from_pylist(ROWS[2:]), tmp_path / 'data' / 'train-00001-of-00002.parquet')
  pq.write_table(pa.Table.from_pylist(ROWS[:1]), tmp_path / 'data' / 'test-00000-of-00001.parquet')
  (tmp_path / 'README.md').write_text('# card', encoding='utf-8')
  splits = _load(tmp_path, need_eval=True)
  assert list(splits.train) == ROWS and list(splits.eval) == ROWS[:1]
  assert splits.origin(2) == f'{tmp_path}/data/train-00001-of-00002.parquet row 0'


def test_directory_without_split_names_is_all_train(tmp_path):
  _write_jsonl(tmp_path / 'part_a.jsonl', [json.dumps(ROWS[0])])
  _write_jsonl(tmp_path / 'part_b.jsonl', [json.dumps(ROWS[1])])
  assert list(_load(tmp_path).train) == ROWS[:2]
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(InputError, match='holds no .jsonl, .json or .parquet files'):
    _load(empty)


@pytest.fixture
def fake_hub(monkeypatch):
  datasets = pytest.importorskip('datasets')
  calls = []

  def load_dataset(name, config=None, split=None):
    calls.append((name, config, split))
    if name == 'org/missing':
      raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")
    if split == 'empty':
      return datasets.Dataset.from_list([{'text': 'x'}]).select([])
    return datasets.Dataset.from_list([{'text': f'{split} {i}'} for i in range(4)])

  monkeypatch.setattr(datasets, 'load_dataset', load_dataset)
  return calls


def test_hub_dataset(fake_hub):
  splits = _load('org/name', config='default', need_eval=True)
  assert fake_hub == [('org/name', 'default', 'train'), ('org/name', 'default', 'test')]
  assert splits.train[1] == {'text': 'train 1'} and len(splits.eval) == 4
  assert splits.origin(3) == "dataset 'org/name' split 'train' row 3"
  assert splits.eval_origin(0) == "dataset 'org/name' split 'test' row 0"
  fake_hub.clear()
  assert _load('org/name').eval is None and fake_hub == [('org/name', None, 'train')]


def test_hub_failures_name_the_dataset(fake_hub):
  with pytest.raises(InputError, match=r"'dataset_name': cannot load 'org/missing'.*FileNotFoundError.*doesn't exist"):
    _load('org/missing')
  with pytest.raises(InputError, match=r"'org/name' split 'empty' is empty"):
    _load('org/name', split='empty')


def test_synthetic_names_dispatch_to_the_generator():
  splits = _load('synthetic:arithmetic?train=3&test=2', need_eval=True)
  assert len(splits.train) == 3 and len(splits.eval) == 2
  assert all('messages' in row for row in splits.train)
  assert splits.origin(1) == "dataset 'synthetic:arithmetic?train=3&test=2' split 'train' row 1"
  splits = _load('synthetic:arithmetic?train=3&test=2')
  assert splits.eval is None and splits.eval_name is None
  with pytest.raises(InputError, match='dataset_name'):
    _load('synthetic:nope')


def test_unset_dataset_name():
  with pytest.raises(InputError, match="'dataset_name' is not set"):
    _load('')
