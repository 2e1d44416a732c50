"""jaxsft's per-step loss curve equals TRL's SFTTrainer on the same model, data and settings.

Same tiny Qwen2 model directory (random weights, float32), same `messages` dataset of 16 rows,
`assistant_only_loss=True`, every optimizer step covers the whole dataset (batch × accumulation = 16),
so the step's loss does not depend on either trainer's shuffling. Weight decay, clipping and a warmup
+ linear schedule are on, so the optimizer path is exercised too.
"""

import json
import os

import numpy as np
import pytest

from jaxsft import config as config_lib
from jaxsft import trainer
from tests.helpers import models

NUM_ROWS = 16
NUM_STEPS = 12
TOL = 1e-4

pytestmark = pytest.mark.slow


def _settings(batch: int, accumulation: int) -> dict:
  return dict(
      learning_rate=1e-3, lr_scheduler_type='linear', warmup_steps=2, weight_decay=0.1,
      max_grad_norm=1.0, num_train_epochs=float(NUM_STEPS), per_device_train_batch_size=batch,
      gradient_accumulation_steps=accumulation, max_length=96, assistant_only_loss=True,
      logging_steps=1, seed=0)


@pytest.fixture(scope='module')
def model_and_data(tmp_path_factory):
  from jaxsft.data import synthetic

  root = tmp_path_factory.mktemp('parity')
  model_dir = models.save_tiny_qwen2(root / 'model', hidden_size=64, intermediate_size=128)

  train = synthetic.load('synthetic:arithmetic').train
  rows = [train[i] for i in range(NUM_ROWS)]
  data_file = root / 'train.jsonl'
  with open(data_file, 'w', encoding='utf-8') as f:
    for row in rows:
      f.write(json.dumps({'messages': row['messages']}) + '\n')
  return model_dir, str(data_file), root


def _trl_losses(model_dir, data_file, out_dir, batch, accumulation) -> list[float]:
  import datasets
  import transformers
  import trl

  settings = _settings(batch, accumulation)
  args = trl.SFTConfig(
      output_dir=str(out_dir), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to='none',
      save_strategy='no', dataloader_num_workers=0, **settings)
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype='float32')
  dataset = datasets.load_dataset('json', data_files=data_file, split='train')
  sft = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
  sft.train()
  losses = [row['loss'] for row in sft.state.log_history if 'loss' in row]
  assert len(losses) == NUM_STEPS
  return losses


def _jaxsft_losses(model_dir, data_file, out_dir, batch, accumulation) -> list[float]:
  config = config_lib.base_config()
  config.update(_settings(batch, accumulation))
  config.model_name_or_path = model_dir
  config.dataset_name = data_file
  config.output_dir = str(out_dir)
  config.bf16 = False
  config.gradient_checkpointing = False
  config.disable_tqdm = True
  config.lock()
  trainer.run(config)
  with open(os.path.join(out_dir, 'metrics.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  losses = [row['loss'] for row in rows if 'loss' in row]
  assert len(losses) == NUM_STEPS
  return losses


@pytest.fixture(scope='module')
def trl_reference(model_and_data):
  model_dir, data_file, root = model_and_data
  return _trl_losses(model_dir, data_file, root / 'trl', 16, 1)


@pytest.mark.parametrize('batch,accumulation', [(16, 1), (4, 4), (2, 8)])
def test_loss_curve_matches_trl(model_and_data, trl_reference, batch, accumulation):
  model_dir, data_file, root = model_and_data
  ours = _jaxsft_losses(model_dir, data_file, root / f'jaxsft_{batch}x{accumulation}', batch, accumulation)
  np.testing.assert_allclose(ours, trl_reference, atol=TOL, rtol=0)
  assert trl_reference[-1] < trl_reference[0] - 0.5  # The curve really moves: a test that can fail.


def test_trl_itself_is_split_invariant(model_and_data, trl_reference):
  """TRL's own (4, 4) curve equals its (16, 1) curve: the reference we match is itself consistent."""
  model_dir, data_file, root = model_and_data
  other = _trl_losses(model_dir, data_file, root / 'trl_4x4', 4, 4)
  np.testing.assert_allclose(other, trl_reference, atol=TOL, rtol=0)
