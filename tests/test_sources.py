"""Dataset sources: files, directories, hub ids (stubbed), synthetic; lazy access, pickling, fingerprints, errors."""

import concurrent.futures
import json
import os
import pickle
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxsft.data import sources
from jaxsft.data import splits as splits_lib
from jaxsft.errors import InputError

ROWS = [{'messages': [{'role': 'user', 'content': f'q{i}'}, {'role': 'assistant', 'content': f'a{i}'}]}
        for i in range(3)]


def _load(name, *, need_eval=False, split='train', test_split='test', config=None) -> sources.Splits:
  return splits_lib.load_splits(dataset_name=str(name), dataset_config=config, dataset_train_split=split,
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
  assert [splits.train.origin(i) for i in range(3)] == [f'{path} line 1', f'{path} line 4', f'{path} line 5']


def test_jsonl_malformed_line_names_line_number(tmp_path):
  path = _write_jsonl(tmp_path / 'd.jsonl', [json.dumps(ROWS[0]), '', '{"messages": [}'])
  splits = _load(path)  # Lazy: the bad line fails when read, not when the file is opened.
  assert len(splits.train) == 2 and splits.train[0] == ROWS[0]
  with pytest.raises(InputError, match=rf'^{path} line 3: malformed JSON \(Expecting value: line 1 column 15'):
    splits.train[1]


def test_jsonl_line_that_is_not_an_object(tmp_path):
  path = _write_jsonl(tmp_path / 'd.jsonl', [json.dumps(ROWS[0]), '[1, 2]'])
  with pytest.raises(InputError, match=rf'^{path} line 2: expected a JSON object, got an array$'):
    _load(path).train[1]


def test_jsonl_invalid_utf8_names_line(tmp_path):
  path = tmp_path / 'd.jsonl'
  path.write_bytes(json.dumps(ROWS[0]).encode() + b'\n{"text": "\xff\xfe"}\n')
  with pytest.raises(InputError, match=r'd.jsonl line 2: not UTF-8'):
    _load(path).train[1]


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
  assert list(splits.train) == ROWS and splits.train.origin(2) == f'{array} item 2'
  lines = tmp_path / 'b.json'
  lines.write_text('\n'.join(json.dumps(r) for r in ROWS), encoding='utf-8')
  splits = _load(lines)
  assert list(splits.train) == ROWS and splits.train.origin(1) == f'{lines} line 2'
  assert isinstance(splits.train, sources.JsonLinesFile)  # Indexed lazily, not read whole.
  bad = tmp_path / 'c.json'
  bad.write_text('[{"a": 1}, 3]', encoding='utf-8')
  with pytest.raises(InputError, match=r'c.json item 1: expected a JSON object, got a number'):
    _load(bad).train[1]
  malformed = tmp_path / 'm.json'
  malformed.write_text('[{"a": 1},\n {"a": }]', encoding='utf-8')
  with pytest.raises(InputError, match=r'm.json line 2: malformed JSON'):
    _load(malformed)
  one = tmp_path / 'one.json'
  one.write_text(json.dumps({'text': 'hello', 'n': 1}, indent=2), encoding='utf-8')
  splits = _load(one)
  assert list(splits.train) == [{'text': 'hello', 'n': 1}] and splits.train.origin(0) == f'{one} line 1'
  data = tmp_path / 'data.json'
  data.write_text(json.dumps({'data': ROWS}, indent=1), encoding='utf-8')
  assert list(_load(data).train) == ROWS


def test_parquet_file(tmp_path):
  path = tmp_path / 'train.parquet'
  pq.write_table(pa.Table.from_pylist(ROWS), path)
  splits = _load(path)
  assert list(splits.train) == ROWS and splits.train.origin(1) == f'{path} row 1'
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
  assert splits.eval.origin(0) == f'{tmp_path}/test.jsonl line 1'
  assert splits.train.origin(2) == f'{tmp_path}/train.jsonl line 3'
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
  assert splits.train.origin(2) == f'{tmp_path}/data/train-00001-of-00002.parquet row 0'
  assert splits.train.column_names() == ['messages']


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
  assert splits.train.origin(3) == "dataset 'org/name' split 'train' row 3"
  assert splits.eval.origin(0) == "dataset 'org/name' split 'test' row 0"
  assert splits.train.column_names() == ['text'] and splits.train.name == "org/name split 'train'"
  assert pickle.loads(pickle.dumps(splits.train))[2] == {'text': 'train 2'}
  assert splits.train.fingerprint() == _load('org/name', config='default').train.fingerprint()
  assert splits.train.fingerprint() != splits.eval.fingerprint()
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
  assert splits.train.origin(1) == "dataset 'synthetic:arithmetic?train=3&test=2' split 'train' row 1"
  assert splits.eval.origin(1) == "dataset 'synthetic:arithmetic?train=3&test=2' split 'test' row 1"
  splits = _load('synthetic:arithmetic?train=3&test=2')
  assert splits.eval is None and splits.eval_name is None
  with pytest.raises(InputError, match='dataset_name'):
    _load('synthetic:nope')


def test_unset_dataset_name():
  with pytest.raises(InputError, match="'dataset_name' is not set"):
    _load('')


# ----------------------------------------------------------------------------------------------------------
# Lazy sources.


def test_jsonl_index_offsets_blank_lines_bom_crlf_and_no_trailing_newline(tmp_path):
  rows = [{'i': i, 'text': f'row {i} é'} for i in range(4)]
  path = tmp_path / 'd.jsonl'
  lines = [b'\xef\xbb\xbf' + json.dumps(rows[0]).encode(), b'', b' \t ', json.dumps(rows[1]).encode() + b'\r',
           '\u00a0\u2003'.encode(), b'  ' + json.dumps(rows[2]).encode(), b'\r', json.dumps(rows[3]).encode()]
  path.write_bytes(b'\n'.join(lines))  # No newline after the last line.
  source = sources.JsonLinesFile(str(path))
  assert len(source) == 4 and list(source) == rows
  assert [source.origin(i) for i in range(4)] == [f'{path} line {n}' for n in (1, 4, 6, 8)]
  starts = np.cumsum([0] + [len(line) + 1 for line in lines])
  assert source.offsets.dtype == np.int64 and source.offsets.tolist() == [starts[k] for k in (0, 3, 5, 7)]
  assert source.lines.tolist() == [1, 4, 6, 8]
  assert source.column_names() == ['i', 'text']
  assert source[-1] == rows[3]
  with pytest.raises(IndexError):
    source[4]
  with pytest.raises(IndexError):
    source.origin(-5)


def test_jsonl_without_blank_lines_stores_no_line_numbers(tmp_path):
  path = _write_jsonl(tmp_path / 'd.jsonl', [json.dumps(r) for r in ROWS])
  source = sources.JsonLinesFile(path)
  assert source.lines is None and source.origin(2) == f'{path} line 3' and list(source) == ROWS


def test_jsonl_bad_lines_fail_only_when_read(tmp_path):
  path = _write_jsonl(tmp_path / 'd.jsonl', [json.dumps(ROWS[0]), '{"messages": [', '"just a string"',
                                             json.dumps(ROWS[1])])
  source = _load(path).train
  assert len(source) == 4 and source[0] == ROWS[0] and source[3] == ROWS[1]
  with pytest.raises(InputError, match=rf'^{path} line 2: malformed JSON'):
    source[1]
  with pytest.raises(InputError, match=rf'^{path} line 3: expected a JSON object, got a string$'):
    source[2]
  assert source.column_names() == ['messages']
  bad_first = _write_jsonl(tmp_path / 'e.jsonl', ['{', json.dumps({'text': 'x'})])
  assert sources.JsonLinesFile(bad_first).column_names() == ['text']  # The first row that parses.
  all_bad = _write_jsonl(tmp_path / 'f.jsonl', ['{', '['])
  with pytest.raises(InputError, match='f.jsonl line 1: malformed JSON'):
    sources.JsonLinesFile(all_bad).column_names()


def test_jsonl_indexes_across_chunks(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, '_CHUNK', 7)  # Lines and blank runs straddle every chunk boundary.
  rows = [{'k': 'x' * (i % 13)} for i in range(50)]
  lines = []
  for i, row in enumerate(rows):
    lines.append(json.dumps(row))
    lines += [''] * (i % 3)
  path = _write_jsonl(tmp_path / 'd.jsonl', lines)
  source = sources.JsonLinesFile(path)
  assert list(source) == rows
  expected_lines = [n + 1 for n, line in enumerate(lines) if line]
  assert [source.origin(i) for i in range(len(rows))] == [f'{path} line {n}' for n in expected_lines]


def test_parquet_random_access_across_row_groups(tmp_path):
  rows = [{'id': i, 'text': f't{i}', 'extra': [i, i + 1]} for i in range(57)]
  path = tmp_path / 'd.parquet'
  pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10)
  source = _load(path).train
  assert isinstance(source, sources.ParquetFile) and len(source) == 57
  assert source.column_names() == ['id', 'text', 'extra']
  order = np.random.default_rng(0).permutation(57).tolist() + [56, 0, 9, 10, 49, 50]
  assert [source[i] for i in order] == [rows[i] for i in order]
  assert source.origin(23) == f'{path} row 23'
  narrow = sources.select_columns(source, ['text'])
  assert narrow[31] == {'text': 't31'} and narrow.column_names() == ['text']
  assert narrow.fingerprint() != source.fingerprint()
  with pytest.raises(IndexError):
    source[57]


def _every_kind(tmp_path) -> dict[str, sources.Source]:
  """One source of each kind, with 3 rows or more (files written on the first call only)."""
  jsonl, array, parquet = str(tmp_path / 'a.jsonl'), tmp_path / 'b.json', tmp_path / 'c.parquet'
  if not os.path.exists(jsonl):
    _write_jsonl(tmp_path / 'a.jsonl', [json.dumps(r) for r in ROWS])
    array.write_text(json.dumps(ROWS), encoding='utf-8')
    pq.write_table(pa.Table.from_pylist(ROWS), parquet, row_group_size=2)
  datasets = pytest.importorskip('datasets')
  hub = sources.HubSplit(datasets.Dataset.from_list(ROWS), 'org/name', None, 'train')
  rows = sources.RowList(ROWS, 'synthetic:x', 'train')
  concat = sources.Concat([sources.JsonLinesFile(jsonl), sources.open_files([str(parquet)])], 'both')
  return {'jsonl': sources.JsonLinesFile(jsonl), 'json': sources.open_files([str(array)]),
          'parquet': sources.open_files([str(parquet)]), 'hub': hub, 'rows': rows, 'concat': concat,
          'select': sources.Select(concat, [5, 0, 3], 'picked'),
          'columns': sources.Columns(sources.JsonLinesFile(jsonl), ['messages', 'missing'])}


def test_every_source_kind_pickles(tmp_path):
  for kind, source in _every_kind(tmp_path).items():
    expected = [source[i] for i in range(len(source))]  # Read first: open handles and caches are not pickled.
    clone = pickle.loads(pickle.dumps(source))
    assert type(clone) is type(source), kind
    assert [clone[i] for i in reversed(range(len(clone)))] == expected[::-1], kind
    assert [clone.origin(i) for i in range(len(clone))] == [source.origin(i) for i in range(len(source))], kind
    assert clone.fingerprint() == source.fingerprint(), kind
    assert clone.column_names() == source.column_names(), kind
  picked = _every_kind(tmp_path)['select']
  assert picked[0] == ROWS[2] and picked.origin(0) == f'{tmp_path}/c.parquet row 2'
  assert picked[1] == ROWS[0] and picked.origin(1) == f'{tmp_path}/a.jsonl line 1'
  columns = _every_kind(tmp_path)['columns']
  assert columns[1] == {'messages': ROWS[1]['messages'], 'missing': None}


def test_fingerprints_are_stable_and_follow_the_content(tmp_path):
  first = {kind: source.fingerprint() for kind, source in _every_kind(tmp_path).items()}
  assert {kind: source.fingerprint() for kind, source in _every_kind(tmp_path).items()} == first
  assert len(set(first.values())) == len(first)
  assert all(len(f) == 64 and int(f, 16) >= 0 for f in first.values())
  assert (sources.RowList(ROWS[:2], 'x', 'train').fingerprint()
          != sources.RowList(ROWS[1:], 'x', 'train').fingerprint())
  path = tmp_path / 'a.jsonl'
  before = sources.JsonLinesFile(str(path)).fingerprint()
  stat = os.stat(path)
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # Same bytes, newer mtime.
  touched = sources.JsonLinesFile(str(path)).fingerprint()
  assert touched != before
  _write_jsonl(path, [json.dumps(r) for r in ROWS[::-1]])
  assert sources.JsonLinesFile(str(path)).fingerprint() not in (before, touched)


def test_a_file_changed_after_indexing_is_an_error_when_read(tmp_path):
  path = _write_jsonl(tmp_path / 'd.jsonl', [json.dumps(r) for r in ROWS])
  source = sources.JsonLinesFile(path)
  time.sleep(0.01)
  _write_jsonl(tmp_path / 'd.jsonl', [json.dumps(r) for r in ROWS[:2]])
  with pytest.raises(InputError, match='d.jsonl: the file changed after it was indexed'):
    pickle.loads(pickle.dumps(source))[0]


def test_load_splits_returns_lazy_sources_for_directories(tmp_path):
  _write_jsonl(tmp_path / 'train-0.jsonl', [json.dumps(ROWS[0]), '{'])
  _write_jsonl(tmp_path / 'train-1.jsonl', [json.dumps(r) for r in ROWS[1:]])
  (tmp_path / 'train-2.jsonl').write_text('\n', encoding='utf-8')  # Empty parts are left out.
  splits = _load(tmp_path)
  assert isinstance(splits.train, sources.Concat) and len(splits.train) == 4
  assert splits.train.name == f"{tmp_path} split 'train'" and splits.train.column_names() == ['messages']
  assert splits.train[3] == ROWS[2] and splits.train.origin(3) == f'{tmp_path}/train-1.jsonl line 2'
  with pytest.raises(InputError, match=rf'^{tmp_path}/train-0.jsonl line 2: malformed JSON'):
    splits.train[1]


def test_concurrent_reads_from_threads(tmp_path):
  rows = [{'id': i, 'text': 'x' * (i % 50)} for i in range(400)]
  jsonl = _write_jsonl(tmp_path / 'd.jsonl', [json.dumps(r) for r in rows])
  parquet = tmp_path / 'd.parquet'
  pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=16)
  order = np.random.default_rng(1).integers(0, 400, 3000).tolist()
  for source in (sources.JsonLinesFile(jsonl), sources.open_files([str(parquet)])):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      assert list(pool.map(source.__getitem__, order)) == [rows[i] for i in order]
