"""The field registry and the tables built from it, config validation, batch geometry (transformers' Trainer
arithmetic) and the host-side token count."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from ml_collections import config_dict

from jaxsft import config as config_lib
from jaxsft import fields
from jaxsft import recipe
from jaxsft.data import pipeline
from jaxsft.errors import InputError
from jaxsft.models import remat
from tests.helpers import batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def _leaves(config: config_dict.ConfigDict, prefix: str = '') -> dict[str, tuple]:
  """{dotted name: (value, type, placeholder?)} of every field of `config`."""
  out = {}
  for key in config:
    value = config[key]
    if isinstance(value, config_dict.ConfigDict):
      out.update(_leaves(value, f'{prefix}{key}.'))
    else:
      reference = config._fields[key]  # pylint: disable=protected-access
      out[prefix + key] = (value, config.get_type(key), isinstance(reference, config_dict.FieldReference))
  return out


def test_base_config_is_the_registry():
  """Every field of base_config() is in fields.FIELDS once, with the registry's default and type (a Placeholder:
  None, taking only that type), and nothing else is; groups are unlocked ConfigDicts named in GROUPS."""
  names = [f.name for f in fields.FIELDS]
  assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
  c = config_lib.base_config()
  assert not c.is_locked and all(not c[g].is_locked for g in fields.GROUPS)
  leaves = _leaves(c)
  assert set(leaves) == set(names), set(leaves) ^ set(names)
  for field in fields.FIELDS:
    value, kind, placeholder = leaves[field.name]
    if isinstance(field.default, fields.Placeholder):
      assert (value, kind, placeholder) == (None, field.default.type, True), field.name
    else:
      assert value == field.default and type(value) is type(field.default) and not placeholder, field.name
  assert {n.split('.')[0] for n in names if '.' in n} == set(fields.GROUPS)
  assert {k for k in c if isinstance(c[k], config_dict.ConfigDict)} == set(fields.GROUPS)


def test_base_configs_do_not_share_placeholders():
  a, b = config_lib.base_config(), config_lib.base_config()
  a.model_name_or_path, a.model.remat = 'x', 'full'
  assert (b.model_name_or_path, b.model.remat) == (None, None)


def test_each_field_has_a_doc_and_an_origin():
  for field in fields.FIELDS:
    assert field.doc.strip() and '\n' not in field.doc, field.name
    assert field.origin in fields.ORIGINS, field.name
    assert '.' not in field.name or field.origin == fields.JAXSFT, field.name  # The groups are JAX-only.


def test_tables_derive_from_the_registry():
  """checkpoint.HARMLESS_FIELDS and the recipe import's tables are the registry's; every name a table holds is
  known once: a config field is a recipe field or jaxsft-only, and a recipe-only name (mapped or ignored) is no
  config field, except warmup_steps, a field whose fractional TRL 1.x value is mapped."""
  from jaxsft import checkpoint  # pylint: disable=import-outside-toplevel  (imports jax)
  assert checkpoint.HARMLESS_FIELDS == fields.HARMLESS_FIELDS == {f.name for f in fields.FIELDS if f.harmless}
  assert fields.HARMLESS_FIELDS <= set(fields.NAMES)
  top_level = set(config_lib.base_config())
  assert set(recipe.RECIPE_FIELDS) | set(recipe.JAXSFT_ONLY_FIELDS) == top_level
  assert not set(recipe.RECIPE_FIELDS) & set(recipe.JAXSFT_ONLY_FIELDS)
  assert len(recipe.RECIPE_FIELDS) == len(set(recipe.RECIPE_FIELDS))
  assert len(recipe.JAXSFT_ONLY_FIELDS) == len(set(recipe.JAXSFT_ONLY_FIELDS))
  assert not set(recipe.RECIPE_MAPPED) & set(recipe.RECIPE_IGNORED)
  assert not set(recipe.RECIPE_IGNORED) & top_level
  assert set(recipe.RECIPE_MAPPED) & top_level == {'warmup_steps'}
  for field in fields.FIELDS:
    top = field.name.split('.')[0]
    assert top in (recipe.JAXSFT_ONLY_FIELDS if field.origin == fields.JAXSFT else recipe.RECIPE_FIELDS), field.name


def test_value_names_equal_the_implementations():
  """The names config.validate checks are the names the implementing modules accept (until those modules
  import them from jaxsft/fields.py)."""
  from jaxsft import optim  # pylint: disable=import-outside-toplevel
  from jaxsft.models import attention  # pylint: disable=import-outside-toplevel
  assert fields.SCHEDULES == optim.SCHEDULES
  assert fields.ATTENTION_IMPLS == attention.IMPLS
  assert fields.REMAT_POLICIES == remat.REMAT_POLICIES


@pytest.mark.parametrize('field,names', [
    ('lr_scheduler_type', fields.SCHEDULES), ('model.remat', fields.REMAT_POLICIES),
    ('model.attention_impl', fields.ATTENTION_IMPLS), ('model_init', fields.MODEL_INITS),
    ('eval_strategy', fields.EVAL_STRATEGIES), ('export_dtype', fields.EXPORT_DTYPES),
    ('nonfinite_policy', fields.NONFINITE_POLICIES),
    ('length_buckets', fields.LENGTH_BUCKETS),
])
def test_validate_is_where_names_are_checked(field, names):
  """Each name passes config.validate; any other value is an InputError naming the field and the choices."""
  group, _, leaf = field.rpartition('.')
  for name in names:
    c = _valid()
    (c[group] if group else c)[leaf] = name
    if name == 'cosine_with_min_lr':
      c.min_lr_rate = 0.1
    config_lib.validate(c)
  c = _valid()
  (c[group] if group else c)[leaf] = 'nonsense'
  with pytest.raises(InputError, match=f"'{field}'.*{names[0]}"):
    config_lib.validate(c)


def test_config_modules_import_no_jax():
  """The config, its registry, the recipe import, the command line's shared part and the shipped configs load
  without jax (a config typo is reported in well under a second)."""
  code = ('import sys; from jaxsft import cli, config, fields, recipe; import configs.sft, configs.tiny, '
          'configs.r1_distill, configs.olympic_coder_7b, configs.r1_distill_qwen3_8b, configs.from_yaml; '
          "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'flax', 'optax', 'orbax'}))")
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, text=True, capture_output=True, check=True)
  assert proc.stdout.strip() == '[]', proc.stdout


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
