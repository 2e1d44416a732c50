"""A Hugging Face cache laid out by hand under HF_HOME, so that hub ids resolve with HF_HUB_OFFLINE=1.

  model(hf_home, repo_id, source_dir)     HF_HOME/hub/models--ORG--NAME/snapshots/REVISION/ holding source_dir's files
                                          (plain copies, no blobs/), refs/main holding REVISION: what
                                          huggingface_hub.snapshot_download(repo_id) returns offline
  dataset(hf_home, repo_id, data_dir)     datasets' own Arrow cache of repo_id, HF_HOME/datasets/ORG___NAME/default/
                                          0.0.0/HASH/ (NAME-SPLIT.arrow, dataset_info.json): what
                                          datasets.load_dataset(repo_id) reads offline (it never reads the hub cache)
  environment(hf_home, **variables)       runs.environment() offline, with HF_HOME and no other cache location

Offline, datasets (4.7 and 5.x alike) finds a hub id only in its Arrow cache, and has no public way to write
that cache under a hub id from local files: 4.7 accepts load_dataset(DIR, repo_id=ID), 5.x refuses it ("Data files
don't belong to ID"). Both name the cache of a local directory DIR/NAME, with split files NAME-SPLIT.arrow, and
name a hub id's ORG___NAME with the same split files; so `dataset` loads DATA_DIR once as a directory named NAME
(offline) into a scratch cache, and moves that cache's NAME folder to ORG___NAME.
"""

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys

from tests.helpers import runs

# A fixed 40-hex "commit" for the hand-made model snapshots (the hub's revisions are commit hashes).
REVISION = hashlib.sha1(b'jaxsft hub-cache test snapshot').hexdigest()
# Where HF libraries would look instead of HF_HOME: cleared, so that only HF_HOME/hub and HF_HOME/datasets count.
_OTHER_CACHES = ('HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE', 'HF_DATASETS_CACHE', 'TRANSFORMERS_CACHE', 'HF_ASSETS_CACHE',
                 'HF_XET_CACHE', 'HF_TOKEN', 'HF_TOKEN_PATH', 'HF_ENDPOINT')
# A closed port on this machine: were offline mode ever ignored, a request fails at once instead of reaching out.
_NO_ENDPOINT = 'http://127.0.0.1:9'


def environment(hf_home, **variables) -> dict:
  """runs.environment() with HF_HOME=hf_home, HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1, no other HF cache or token
  variable, and the hub endpoint a closed local port (belt and braces: nothing can reach the network)."""
  env = runs.environment(HF_HOME=hf_home, HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1, **variables)
  for name in _OTHER_CACHES:
    env.pop(name, None)
  env['HF_ENDPOINT'] = _NO_ENDPOINT
  return env


def _parts(repo_id: str) -> tuple[str, str]:
  org, sep, name = repo_id.partition('/')
  assert sep and org and name and '/' not in name, f'expected ORG/NAME, got {repo_id!r}'
  return org, name


def model_repo(hf_home, repo_id: str) -> pathlib.Path:
  """HF_HOME/hub/models--ORG--NAME (the cache folder of a model repository)."""
  org, name = _parts(repo_id)
  return pathlib.Path(hf_home) / 'hub' / f'models--{org}--{name}'


def model(hf_home, repo_id: str, source_dir, revision: str = REVISION) -> pathlib.Path:
  """Copies the files of `source_dir` (a saved model and tokenizer) into repo_id's snapshot `revision` and points
  refs/main at it; returns the snapshot directory."""
  repo = model_repo(hf_home, repo_id)
  snapshot = repo / 'snapshots' / revision
  shutil.copytree(source_dir, snapshot)
  (repo / 'refs').mkdir(parents=True, exist_ok=True)
  (repo / 'refs' / 'main').write_text(revision)
  return snapshot


def dataset_cache(hf_home, repo_id: str) -> pathlib.Path:
  """HF_HOME/datasets/ORG___NAME: datasets' Arrow cache of a hub dataset (NAME as datasets writes it)."""
  org, name = _parts(repo_id)
  assert name == name.lower(), f'{repo_id!r}: keep NAME lower-case (datasets snake-cases it in cache names)'
  return pathlib.Path(hf_home) / 'datasets' / f'{org}___{name}'


_LOAD_ONCE = """
import sys, datasets
dataset = datasets.load_dataset(sys.argv[1], cache_dir=sys.argv[2])
print({split: part.num_rows for split, part in dataset.items()})
"""


def dataset(hf_home, repo_id: str, data_dir, scratch) -> pathlib.Path:
  """Writes datasets' Arrow cache of hub dataset `repo_id` from the data files of `data_dir` (train.jsonl,
  test.jsonl, ...: split by name as the hub splits a repository's files); returns that cache's folder.

  `scratch`: an empty directory for the one-time load (in a subprocess, offline)."""
  _, name = _parts(repo_id)
  scratch = pathlib.Path(scratch)
  source = scratch / 'files' / name  # The directory's name is the dataset name datasets gives it.
  shutil.copytree(data_dir, source)
  build = scratch / 'arrow'
  proc = subprocess.run([sys.executable, '-c', _LOAD_ONCE, str(source), str(build)], env=environment(scratch / 'home'),
                        text=True, capture_output=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  built = build / name
  assert list(built.glob(f'*/*/*/{name}-train.arrow')), sorted(map(str, build.rglob('*')))
  target = dataset_cache(hf_home, repo_id)
  target.parent.mkdir(parents=True, exist_ok=True)
  os.replace(built, target)
  return target
