"""Config validation, batch geometry (transformers' Trainer arithmetic) and the host-side token count."""

import math

import numpy as np
import pytest

from jaxsft import config as config_lib
from jaxsft.data import pipeline
from jaxsft.errors import InputError
from tests.helpers import batches


def _valid():
  c = config_lib.base_config()
  c.model_name_or_path = 'org/model'
  c.dataset_name = 'data.jsonl'
  c.output_dir = '/tmp/out'
  return c


def test_base_config_is_valid_and_has_trl_defaults():
  c = _valid()
  config_lib.validate(c)
  assert (c.learning_rate, c.lr_scheduler_type, c.num_train_epochs, c.max_length) == (2e-5, 'linear', 3.0, 1024)
  assert (c.per_device_train_batch_size, c.bf16, c.gradient_checkpointing) == (8, True, True)
  assert config_lib.remat_policy(c) == 'full'


@pytest.mark.parametrize('field,value', [
    ('learning_rate', 0.0), ('gradient_accumulation_steps', 0), ('max_length', -1), ('adam_beta2', 1.0),
    ('max_steps', 0), ('lr_scheduler_type', 'polynomial'), ('model_init', 'scratch'), ('warmup_ratio', 2.0),
])
def test_invalid_fields_are_named(field, value):
  c = _valid()
  c[field] = value
  with pytest.raises(InputError, match=field):
    config_lib.validate(c)


def test_min_lr_rate_required_for_cosine_with_min_lr():
  c = _valid()
  c.lr_scheduler_type = 'cosine_with_min_lr'
  with pytest.raises(InputError, match='min_lr_rate'):
    config_lib.validate(c)
  c.min_lr_rate = 0.1
  config_lib.validate(c)


def test_local_model_path_must_exist(tmp_path):
  c = _valid()
  c.model_name_or_path = str(tmp_path / 'missing')
  with pytest.raises(InputError, match='model_name_or_path'):
    config_lib.validate(c)


@pytest.mark.parametrize('rows,micro,accum,epochs,max_steps,steps_per_epoch,total', [
    (16, 16, 1, 3.0, -1, 1, 3),
    (16, 4, 4, 3.0, -1, 1, 3),
    (100, 8, 3, 2.0, -1, 5, 10),   # 13 micro-batches → ceil(13/3) = 5 steps per epoch.
    (100, 8, 3, 1.5, -1, 5, 8),    # ceil(1.5 × 5).
    (100, 8, 3, 2.0, 7, 5, 7),     # max_steps wins.
    (3, 8, 4, 1.0, -1, 1, 1),      # Never fewer than one step per epoch.
])
def test_geometry_follows_transformers(rows, micro, accum, epochs, max_steps, steps_per_epoch, total):
  g = pipeline.Geometry.create(rows, micro, accum, epochs, max_steps)
  assert (g.steps_per_epoch, g.total_steps) == (steps_per_epoch, total)
  assert g.micro_batches_per_epoch == math.ceil(rows / micro)


def test_count_loss_tokens_matches_next_token_targets():
  import jax.numpy as jnp
  from jaxsft import loss

  rng = np.random.default_rng(0)
  seg = np.array([[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
  batch = {'input_ids': rng.integers(0, 50, seg.shape).astype(np.int32), 'segment_ids': seg,
           'loss_mask': rng.integers(0, 2, seg.shape).astype(np.int32),
           'positions': np.zeros_like(seg)}
  _, weights = loss.next_token_targets(jnp.asarray(batch['input_ids']), jnp.asarray(batch['loss_mask']),
                                       jnp.asarray(seg))
  assert batches.count_loss_tokens(batch) == int(np.asarray(weights).sum())
