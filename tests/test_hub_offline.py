"""Hub ids offline (issue 17): `python -m jaxsft.train --config configs/sft.py` with model_name_or_path and
dataset_name given as Hugging Face hub ids trains from a pre-populated cache, with HF_HUB_OFFLINE=1 and
HF_DATASETS_OFFLINE=1 and the hub endpoint a closed local port (no network).

The model (a tiny Qwen2 and its tokenizer) is a snapshot laid out by hand, HF_HOME/hub/models--ORG--NAME/snapshots/
REV/ with refs/main naming REV; the dataset is datasets' own Arrow cache of the hub id (tests/helpers/hub_cache.py).
The run trains, checkpoints, and exports OUTPUT_DIR/hf, which loads (transformers' config and tokenizer, the
safetensors with the source's tensor names and shapes, changed by training), and its config.json records both ids.
An id that is in neither cache is one `error:` line naming its field, exit 2.
"""

import pathlib

import numpy as np
import pytest

from tests.helpers import hub_cache
from tests.helpers import models
from tests.helpers import processes
from tests.helpers import runs

pytestmark = pytest.mark.slow
pytest.importorskip('datasets')

MODEL_ID = 'jaxsft-test/tiny-qwen2'
DATASET_ID = 'jaxsft-test/tiny-chat'
STEPS = 4
SETTINGS = dict(bf16=False, gradient_checkpointing=False, max_length=128, per_device_train_batch_size=2,
                logging_steps=1, disable_tqdm=True, max_steps=STEPS, save_steps=2, eval_generation_prompts=0, seed=3)


@pytest.fixture(scope='module')
def hub(tmp_path_factory):
  """HF_HOME with MODEL_ID's snapshot and DATASET_ID's Arrow cache (16 train rows), and the offline environment."""
  root = tmp_path_factory.mktemp('hub_offline')
  model_dir, data_dir = processes.tiny_model_and_splits(root / 'inputs', num_train=16, num_test=4)
  home = root / 'hf_home'
  hub_cache.model(home, MODEL_ID, model_dir)
  hub_cache.dataset(home, DATASET_ID, data_dir, root / 'scratch')
  return {'home': home, 'env': hub_cache.environment(home), 'model_dir': pathlib.Path(model_dir), 'root': root}


def _train(hub, out, **fields):
  return runs.train_cli('configs/sft.py', env=hub['env'], timeout=300,
                        **{'model_name_or_path': MODEL_ID, 'dataset_name': DATASET_ID, 'output_dir': out, **SETTINGS,
                           **fields})


def _one_error(proc) -> str:
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  (line,) = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  return line


def test_trains_and_exports_from_hub_ids_in_the_offline_cache(hub):
  import transformers  # pylint: disable=import-outside-toplevel

  out = hub['root'] / 'run'
  proc = _train(hub, out)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert f"data: 16 rows from {DATASET_ID} split 'train'" in proc.stderr, proc.stderr[-4000:]
  config = runs.config_json(out)
  assert (config['model_name_or_path'], config['dataset_name']) == (MODEL_ID, DATASET_ID)
  assert config['resolved']['total_steps'] == STEPS
  assert [r['step'] for r in runs.loss_rows(out)] == list(range(1, STEPS + 1))
  assert all(np.isfinite(loss) for loss in runs.losses(out))
  assert sorted(p.name for p in (out / 'checkpoints').iterdir() if p.name.isdigit()) == ['2', '4']

  hf_dir = out / 'hf'
  exported = transformers.AutoConfig.from_pretrained(hf_dir)
  source = transformers.AutoConfig.from_pretrained(hub['model_dir'])
  assert exported.model_type == 'qwen2' and exported.architectures == ['Qwen2ForCausalLM']
  assert (exported.hidden_size, exported.num_hidden_layers, exported.vocab_size) == (
      source.hidden_size, source.num_hidden_layers, source.vocab_size)
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  assert tokenizer.get_vocab() == transformers.AutoTokenizer.from_pretrained(hub['model_dir']).get_vocab()
  trained, initial = runs.hf_weights(out), runs.weights(hub['model_dir'])
  assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in initial.items()}
  assert all(np.isfinite(v).all() for v in trained.values())
  assert any(not np.array_equal(trained[k], initial[k]) for k in initial), 'the export is the untrained model'


@pytest.mark.parametrize('field,fields', [
    ('model_name_or_path', {'model_name_or_path': 'jaxsft-test/not-cached-model'}),
    ('dataset_name', {'dataset_name': 'jaxsft-test/not-cached-data'}),
])
def test_an_id_missing_from_the_offline_cache_is_one_line_naming_the_field(hub, tmp_path, field, fields):
  line = _one_error(_train(hub, tmp_path / 'out', **fields))
  assert f"config field '{field}'" in line and fields[field] in line, line
