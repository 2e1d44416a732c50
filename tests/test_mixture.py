"""open-r1's dataset_mixture on lazy sources, checked row for row against open-r1's code on `datasets` itself."""

import json
import math

import pytest

from jaxsft.data import mixture as mixture_lib
from jaxsft.data import splits as splits_lib
from jaxsft.errors import InputError

datasets = pytest.importorskip('datasets')

SIZES = {'a': 37, 'b': 50, 'c': 23}


@pytest.fixture(scope='module')
def files(tmp_path_factory) -> dict[str, str]:
  """Three JSON Lines datasets of 37, 50 and 23 rows; 'c' has an extra column."""
  root = tmp_path_factory.mktemp('mixture')
  paths = {}
  for name, n in SIZES.items():
    rows = []
    for i in range(n):
      row = {'id': f'{name}{i}', 'messages': [{'role': 'user', 'content': f'{name} q{i}'},
                                               {'role': 'assistant', 'content': f'{name} a{i}'}]}
      if name == 'c':
        row['source'] = f'src{i % 4}'
      rows.append(json.dumps(row))
    paths[name] = str(root / f'{name}.jsonl')
    with open(paths[name], 'w', encoding='utf-8') as f:
      f.write('\n'.join(rows) + '\n')
  return paths


@pytest.fixture(scope='module')
def hf_cache(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp('hf_cache'))


def _open_r1(spec: dict, cache_dir: str) -> dict[str, list[dict]]:
  """open-r1's get_dataset (src/open_r1/utils/data.py) on `datasets`, the mixture's ids being local JSON Lines.

  Entries are normalised as open-r1's ScriptArguments.__post_init__ does (a missing weight is 1.0).
  """
  seed = spec.get('seed', 0)
  datasets_list = []
  for entry in spec['datasets']:
    ds = datasets.load_dataset('json', data_files=entry['id'], split=entry.get('split', 'train'),
                               cache_dir=cache_dir)
    columns, weight = entry.get('columns'), entry.get('weight', 1.0)
    if columns is not None:
      ds = ds.select_columns(columns)
    if weight is not None:
      ds = ds.shuffle(seed=seed).select(range(int(len(ds) * weight)))
    datasets_list.append(ds)
  combined_dataset = datasets.concatenate_datasets(datasets_list)
  combined_dataset = combined_dataset.shuffle(seed=seed)
  if spec.get('test_split_size') is not None:
    combined_dataset = combined_dataset.train_test_split(test_size=spec['test_split_size'], seed=seed)
  else:
    combined_dataset = datasets.DatasetDict({'train': combined_dataset})
  return {split: ds.to_list() for split, ds in combined_dataset.items()}


def _spec(files, entries, **kwargs) -> dict:
  return {'datasets': [{'id': files[name], **extra} for name, extra in entries], **kwargs}


CASES = {
    'weights_default_and_null': ([('a', {}), ('b', {'weight': None})], {}),
    'fractional_weights_seed': ([('a', {'weight': 0.5}), ('b', {'weight': 0.3}),
                                 ('c', {'weight': 1.0, 'columns': ['id', 'messages']})], {'seed': 42}),
    'columns_float_test_split': ([('a', {'weight': 0.77, 'columns': ['messages', 'id']}),
                                  ('c', {'columns': ['id', 'messages'], 'weight': None})],
                                 {'seed': 3, 'test_split_size': 0.1}),
    'int_test_split': ([('a', {'weight': None}), ('b', {'weight': 0.9}), ('c', {'columns': ['messages', 'id']})],
                       {'seed': 7, 'test_split_size': 11}),
    'single_dataset': ([('c', {'columns': ['source', 'id'], 'weight': 0.9})], {'test_split_size': 0.25}),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_mixture_matches_open_r1_on_datasets(files, hf_cache, case):
  entries, kwargs = CASES[case]
  spec = _spec(files, entries, **kwargs)
  expected = _open_r1(spec, hf_cache)
  mixture = mixture_lib.load_mixture(spec)
  assert sorted(mixture) == sorted(expected)
  for split, rows in expected.items():
    assert [mixture[split][i] for i in range(len(mixture[split]))] == rows, split
  assert len(expected['train']) > 10
  ids = [row.get('id') for row in expected['train']]
  assert ids != sorted(ids)  # The case shuffles: equality above is about order, not only about membership.


def test_mixture_sizes_origins_and_columns(files):
  spec = _spec(files, [('a', {'weight': 0.5}), ('b', {'weight': None}), ('c', {'columns': ['id', 'messages']})],
               seed=1, test_split_size=0.2)
  mixture = mixture_lib.load_mixture(spec)
  n = int(37 * 0.5) + 50 + 23
  assert len(mixture['test']) == math.ceil(0.2 * n) and len(mixture['train']) == n - math.ceil(0.2 * n)
  train = mixture['train']
  assert train.name == "mixture split 'train'" and mixture['test'].name == "mixture split 'test'"
  assert train.column_names() == ['id', 'messages']  # The first dataset's.
  ids = {row['id'] for split in mixture.values() for row in split}
  assert len(ids) == n and sum(i.startswith('a') for i in ids) == int(37 * 0.5)
  for i in range(len(train)):
    row_id = train[i]['id']
    assert train.origin(i) == f"{files[row_id[0]]} line {int(row_id[1:]) + 1}"
    if row_id[0] == 'c':
      assert set(train[i]) == {'id', 'messages'}  # 'source' is not selected.
  assert train.fingerprint() == mixture_lib.load_mixture(spec)['train'].fingerprint()
  assert train.fingerprint() != mixture['test'].fingerprint()
  assert train.fingerprint() != mixture_lib.load_mixture({**spec, 'seed': 2})['train'].fingerprint()


def test_load_splits_with_a_mixture(files, tmp_path):
  spec = _spec(files, [('a', {}), ('b', {'weight': 0.5})], test_split_size=10)
  kwargs = dict(dataset_name=None, dataset_config=None, dataset_train_split='train', dataset_test_split='test')
  splits = splits_lib.load_splits(dataset_mixture=spec, need_eval=True, **kwargs)
  mixture = mixture_lib.load_mixture(spec)
  assert list(splits.train) == list(mixture['train']) and list(splits.eval) == list(mixture['test'])
  assert len(splits.eval) == 10 and splits.train_name == "mixture split 'train'"
  assert splits.eval_name == "mixture split 'test'"
  splits = splits_lib.load_splits(dataset_mixture=spec, need_eval=False, **kwargs)
  assert splits.eval is None and splits.eval_name is None and len(splits.train) == 37 + 25 - 10
  # The same mixture from a YAML file, a JSON file, an open-r1 recipe and inline text.
  yaml_path = tmp_path / 'mixture.yaml'
  entries = [f'  - id: {e["id"]}\n' + (f'    weight: {e["weight"]}\n' if 'weight' in e else '')
             for e in spec['datasets']]
  yaml_path.write_text('datasets:\n' + ''.join(entries) + 'test_split_size: 10\n', encoding='utf-8')
  json_path = tmp_path / 'mixture.json'
  json_path.write_text(json.dumps(spec), encoding='utf-8')
  recipe = tmp_path / 'recipe.yaml'
  recipe.write_text('learning_rate: 1.0e-5\ndataset_mixture:\n' + ''.join(
      f'  {line}\n' for line in yaml_path.read_text(encoding='utf-8').splitlines()), encoding='utf-8')
  for given in (str(yaml_path), str(json_path), str(recipe), json.dumps(spec)):
    again = splits_lib.load_splits(dataset_mixture=given, need_eval=True, **kwargs)
    assert list(again.train) == list(mixture['train']) and list(again.eval) == list(mixture['test']), given


def test_mixture_of_a_directory_and_a_file(files, tmp_path):
  (tmp_path / 'train.jsonl').write_text(open(files['b'], encoding='utf-8').read(), encoding='utf-8')
  (tmp_path / 'test.jsonl').write_text(open(files['a'], encoding='utf-8').read(), encoding='utf-8')
  mixture = mixture_lib.load_mixture({'datasets': [{'id': str(tmp_path), 'split': 'test', 'weight': None},
                                               {'id': files['b'], 'weight': None}]})
  ids = sorted(row['id'] for row in mixture['train'])
  assert ids == sorted([f'a{i}' for i in range(37)] + [f'b{i}' for i in range(50)])


ERRORS = [
    ({'datasets': []}, r"'dataset_mixture.datasets': expected a non-empty list"),
    ({'datasets': [{'id': 'A'}], 'sead': 1}, r"'dataset_mixture': unknown key 'sead'"),
    ({'datasets': [{'id': 'A', 'wieght': 0.5}]}, r"'dataset_mixture.datasets\[0\]': unknown key 'wieght'"),
    ({'datasets': [{'id': 'A'}, {'weight': 0.5}]}, r"'dataset_mixture.datasets\[1\].id': expected a dataset name"),
    ({'datasets': [{'id': 'A'}, {'id': 'B', 'weight': 2.0}]},
     r"^config field 'dataset_mixture.datasets\[1\].weight': must be in \(0, 1\], got 2.0$"),
    ({'datasets': [{'id': 'A', 'weight': 0}]}, r"'dataset_mixture.datasets\[0\].weight': must be in \(0, 1\]"),
    ({'datasets': [{'id': 'A', 'weight': True}]}, r"'dataset_mixture.datasets\[0\].weight': must be in"),
    ({'datasets': [{'id': 'C', 'weight': 0.01}]},
     r"'dataset_mixture.datasets\[0\].weight': 0.01 of the 23 rows of '.*c.jsonl' is 0 rows"),
    ({'datasets': [{'id': 'A', 'columns': 'messages'}]}, r"'dataset_mixture.datasets\[0\].columns': expected a"),
    ({'datasets': [{'id': 'A', 'columns': ['messages', 'nope']}]},
     r"'dataset_mixture.datasets\[0\].columns': '.*a.jsonl' has no column 'nope' "
     r"\(its columns: \['id', 'messages'\]\)"),
    ({'datasets': [{'id': 'A'}, {'id': 'C'}]},
     r"^config field 'dataset_mixture': datasets have different columns: '.*a.jsonl' \['id', 'messages'\] vs "
     r"'.*c.jsonl' \['id', 'messages', 'source'\]; set 'columns' on each$"),
    ({'datasets': [{'id': 'A', 'split': 'test'}]},
     r"'dataset_mixture.datasets\[0\].split': 'test' is not available: '.*a.jsonl' is a single file"),
    ({'datasets': [{'id': './nope.jsonl'}]}, r"'dataset_mixture.datasets\[0\].id': no such file or directory"),
    ({'datasets': [{'id': 'A'}], 'seed': -1}, r"'dataset_mixture.seed': must be a non-negative integer"),
    ({'datasets': [{'id': 'A'}], 'test_split_size': 1.0},
     r"'dataset_mixture.test_split_size': must be a float in \(0, 1\) or an integer in \[1, 37\) \(the mixture "
     r"has 37 rows\), got 1.0"),
    ({'datasets': [{'id': 'A'}], 'test_split_size': 37}, r"'dataset_mixture.test_split_size': .* got 37"),
    ({'datasets': [{'id': 'A'}], 'test_split_size': 0}, r"'dataset_mixture.test_split_size': .* got 0"),
    ({'datasets': [{'id': 'A'}], 'test_split_size': 0.99},
     r"'dataset_mixture.test_split_size': 0.99 of the 37 rows of the mixture leaves no training rows"),
    ({'datasets': [{'id': 'A'}], 'test_split_size': '0.1'}, r"'dataset_mixture.test_split_size': must be a float"),
    (['A'], r"'dataset_mixture': expected a dict with a 'datasets' list, got list"),
]


@pytest.mark.parametrize('spec, message', ERRORS)
def test_mixture_errors(files, spec, message):
  spec = json.loads(json.dumps(spec).replace('"A"', json.dumps(files['a'])).replace('"B"', json.dumps(files['b']))
                    .replace('"C"', json.dumps(files['c'])))
  with pytest.raises(InputError, match=message) as e:
    mixture_lib.load_mixture(spec)
  assert '\n' not in str(e.value)


def test_load_splits_mixture_errors(files, tmp_path):
  spec = {'datasets': [{'id': files['a']}]}

  def load(**kwargs):
    args = dict(dataset_name=None, dataset_config=None, dataset_train_split='train', dataset_test_split='test',
                dataset_mixture=spec, need_eval=False)
    return splits_lib.load_splits(**{**args, **kwargs})

  with pytest.raises(InputError, match="'dataset_name' and 'dataset_mixture' are both set"):
    load(dataset_name=files['a'])
  with pytest.raises(InputError, match=r"'dataset_mixture.test_split_size' is not set, but an eval split is needed"):
    load(need_eval=True)
  with pytest.raises(InputError, match=r"'dataset_train_split': a dataset_mixture's splits are 'train' and 'test', "
                                       "got 'training'"):
    load(dataset_train_split='training')
  with pytest.raises(InputError, match=r"'dataset_test_split': .* got 'validation'"):
    load(dataset_test_split='validation')
  with pytest.raises(InputError, match=r"'dataset_config' has no effect with 'dataset_mixture'"):
    load(dataset_config='default')
  with pytest.raises(InputError, match="'dataset_name' is not set"):
    load(dataset_mixture=None)
  assert len(load(dataset_test_split=None).train) == 37
  with pytest.raises(InputError, match=r"'dataset_mixture': cannot read the mixture file '.*nope.yaml'"):
    load(dataset_mixture=str(tmp_path / 'nope.yaml'))
  bad = tmp_path / 'bad.yaml'
  bad.write_text('datasets: [\n', encoding='utf-8')
  with pytest.raises(InputError, match=r"'dataset_mixture': '.*bad.yaml': malformed YAML \(") as e:
    load(dataset_mixture=str(bad))
  assert '\n' not in str(e.value)
  bad_json = tmp_path / 'bad.json'
  bad_json.write_text('{"datasets": }', encoding='utf-8')
  with pytest.raises(InputError, match=r"'dataset_mixture': '.*bad.json': malformed JSON"):
    load(dataset_mixture=str(bad_json))


def test_hub_ids_in_a_mixture(monkeypatch):
  calls = []

  def load_dataset(name, config=None, split=None):
    calls.append((name, config, split))
    return datasets.Dataset.from_list([{'messages': f'{name} {split} {i}', 'other': i} for i in range(8)])

  monkeypatch.setattr(datasets, 'load_dataset', load_dataset)
  mixture = mixture_lib.load_mixture({'datasets': [
      {'id': 'org/one', 'config': 'all', 'split': 'train', 'columns': ['messages'], 'weight': 0.5},
      {'id': 'org/two', 'columns': ['messages']}], 'test_split_size': 2})
  assert calls == [('org/one', 'all', 'train'), ('org/two', None, 'train')]
  rows = list(mixture['train']) + list(mixture['test'])
  assert len(rows) == 12 and all(set(row) == {'messages'} for row in rows)
  origins = {mixture['train'].origin(i).rsplit(' row ', 1)[0] for i in range(len(mixture['train']))}
  assert origins == {"dataset 'org/one' split 'train'", "dataset 'org/two' split 'train'"}
