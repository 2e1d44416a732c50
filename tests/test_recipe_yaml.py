"""open-r1 / TRL recipe YAML import (jaxsft/recipe.py, configs/from_yaml.py).

The fixtures in tests/data/open_r1 are open-r1's own recipes: `config_distill.yaml` is
`recipes/OpenR1-Distill-7B/sft/config_distill.yaml` verbatim, `olympic_coder_7b.yaml` is
`recipes/OlympicCoder-7B/sft/config_v00.00.yaml`.
"""

import copy
import json
import dataclasses
import os
import subprocess
import sys

import pytest
import yaml

from configs import from_yaml
from configs import olympic_coder_7b
from configs import r1_distill
from jaxsft import config as config_lib
from jaxsft import fields
from jaxsft import recipe
from jaxsft.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, 'tests', 'data', 'open_r1')

# open-r1's additions to TRL's SFTConfig / ScriptArguments (src/open_r1/configs.py), and names that older TRL /
# transformers releases had (open-r1's recipes still use them).
OPEN_R1_FIELDS = ('chat_template', 'dataset_mixture', 'wandb_entity', 'wandb_project', 'wandb_run_group',
                  'benchmarks', 'callbacks', 'hub_model_revision', 'push_to_hub_revision', 'overwrite_hub_revision')
OLDER_TRL_FIELDS = ('warmup_ratio', 'logging_dir', 'max_seq_length', 'torch_dtype', 'overwrite_output_dir',
                    'use_liger')


def _recipe(mapping: dict) -> tuple[dict, list[str]]:
  """The config dict of `mapping` and the warnings it gave."""
  warnings = []
  config = recipe.recipe_to_config(mapping, source='recipe.yaml', warn=warnings.append)
  return config.to_dict(), warnings


def _error(mapping: dict) -> str:
  with pytest.raises(InputError) as e:
    recipe.recipe_to_config(mapping, source='recipe.yaml', warn=lambda m: None)
  message = str(e.value)
  assert '\n' not in message and message.startswith('recipe.yaml'), message
  return message


def _without(tree: dict, paths) -> dict:
  """`tree` without the dotted `paths` (a path that is not there is a KeyError: BEYOND_RECIPE names a field)."""
  tree = copy.deepcopy(tree)
  for path in paths:
    *parents, leaf = path.split('.')
    node = tree
    for name in parents:
      node = node[name]
    del node[leaf]
  return tree


@pytest.mark.parametrize('recipe_file,module', [('config_distill.yaml', r1_distill),
                                           ('olympic_coder_7b.yaml', olympic_coder_7b)])
def test_open_r1_recipe_imports_as_the_hand_written_config(recipe_file, module):
  """The imported recipe equals the hand-written config on every field but the jaxsft-only ones it adds, and
  those are fields the recipe does not name; the import passes validation."""
  path = os.path.join(RECIPES, recipe_file)
  with open(path, encoding='utf-8') as f:
    named = set(yaml.safe_load(f))
  assert not {p.split('.')[0] for p in module.BEYOND_RECIPE} & named, module.BEYOND_RECIPE
  imported = recipe.from_recipe_yaml(path, warn=lambda m: None)
  config_lib.validate(imported)
  got = _without(imported.to_dict(), module.BEYOND_RECIPE)
  want = _without(module.get_config().to_dict(), module.BEYOND_RECIPE)
  assert got == want, {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}


def test_open_r1_recipe_warns_once_per_ignored_field():
  """The distill recipe's GPU/Hub-only fields give one warning line each, naming the field and the file."""
  warnings = []
  recipe.from_recipe_yaml(os.path.join(RECIPES, 'config_distill.yaml'), warn=warnings.append)
  ignored = ['attn_implementation', 'gradient_checkpointing_kwargs', 'hub_model_id', 'hub_strategy', 'log_level',
             'push_to_hub', 'use_liger_kernel']
  assert sorted(w.split(': ')[1].split()[0] for w in warnings) == sorted(ignored + ['overwrite_output_dir'])
  assert all(w.startswith(os.path.join(RECIPES, 'config_distill.yaml') + ': ') for w in warnings), warnings


def test_the_mapping_tables_use_trl_and_open_r1_names():
  """Every field the import takes, maps or ignores is a TRL SFTConfig / ModelConfig / ScriptArguments field, an
  open-r1 addition or an older TRL name (a typo in the tables would silently make a real field unknown), and
  every base_config() field is either such a name or listed as jaxsft-only."""
  from trl import ModelConfig, ScriptArguments, SFTConfig  # pylint: disable=import-outside-toplevel
  trl_fields = {f.name for cls in (SFTConfig, ModelConfig, ScriptArguments) for f in dataclasses.fields(cls)}
  known = trl_fields | set(OPEN_R1_FIELDS) | set(OLDER_TRL_FIELDS)
  tables = set(recipe.RECIPE_FIELDS) | set(recipe.RECIPE_MAPPED) | set(recipe.RECIPE_IGNORED)
  assert sorted(tables - known) == []
  assert sorted(set(recipe.JAXSFT_ONLY_FIELDS) & known) == []
  assert set(recipe.RECIPE_FIELDS) | set(recipe.JAXSFT_ONLY_FIELDS) == set(config_lib.base_config())


def test_each_field_origin_is_real():
  """A registry field whose origin is a TRL class is a field of that class (or an older TRL name), one whose
  origin is open-r1 is an open-r1 addition, and a jaxsft-only one is neither (jaxsft/fields.py)."""
  from trl import ModelConfig, ScriptArguments, SFTConfig  # pylint: disable=import-outside-toplevel
  classes = {fields.SFT_CONFIG: SFTConfig, fields.SCRIPT_ARGUMENTS: ScriptArguments, fields.MODEL_CONFIG: ModelConfig}
  names = {origin: {f.name for f in dataclasses.fields(cls)} for origin, cls in classes.items()}
  everything = set().union(*names.values()) | set(OPEN_R1_FIELDS) | set(OLDER_TRL_FIELDS)
  wrong = []
  for field in fields.FIELDS:
    if field.origin in classes:
      ok = field.name in names[field.origin] or field.name in OLDER_TRL_FIELDS
    elif field.origin == fields.OPEN_R1:
      ok = field.name in OPEN_R1_FIELDS
    else:
      ok = field.origin == fields.JAXSFT and field.name.split('.')[0] not in everything
    if not ok:
      wrong.append((field.name, field.origin))
  assert not wrong, wrong


@pytest.mark.parametrize('mapping,field', [
    ({'attn_implementation': 'flash_attention_2'}, 'attn_implementation'),
    ({'deepspeed': 'zero3.json'}, 'deepspeed'),
    ({'push_to_hub': True}, 'push_to_hub'),
    ({'optim': 'adamw_torch_fused'}, 'optim'),
    ({'save_strategy': 'no'}, 'save_strategy'),
    ({'do_eval': True, 'eval_strategy': 'no'}, 'do_eval'),
    ({'do_eval': False, 'eval_strategy': 'steps'}, 'do_eval'),
    ({'torch_dtype': 'bfloat16', 'bf16': False}, 'torch_dtype'),
    ({'max_seq_length': 4096}, 'max_seq_length'),
    ({'overwrite_output_dir': True}, 'overwrite_output_dir'),
])
def test_each_warning_is_one_line_naming_the_field(mapping, field):
  """Ignored, renamed and inconsistent fields: exactly one warning, naming the file and the field."""
  _, warnings = _recipe(mapping)
  assert len(warnings) == 1, warnings
  assert warnings[0].startswith(f'recipe.yaml: {field} ') and '\n' not in warnings[0], warnings


@pytest.mark.parametrize('mapping', [
    {'push_to_hub': False, 'torch_compile': False, 'use_peft': False, 'fp16': False, 'do_train': True},
    {'torch_dtype': 'float32', 'bf16': False},
    {'torch_dtype': 'bfloat16', 'do_eval': True, 'eval_strategy': 'steps', 'save_strategy': 'steps'},
    {'dtype': 'auto', 'overwrite_output_dir': False, 'logging_strategy': 'steps'},
])
def test_consistent_or_off_fields_are_silent(mapping):
  """A field that asks for nothing jaxsft lacks (false, consistent, the default) gives no warning."""
  assert _recipe(mapping)[1] == []


def test_mapped_fields_set_their_jaxsft_fields():
  """lr_scheduler_kwargs, save_strategy, max_seq_length, report_to lists and fractional warmup_steps land on the
  jaxsft fields with the same meaning."""
  config, _ = _recipe({'lr_scheduler_kwargs': {'min_lr_rate': 0.25}, 'save_strategy': 'epoch', 'save_steps': 50,
                       'max_seq_length': 4096, 'report_to': ['tensorboard', 'wandb'], 'warmup_steps': 0.05})
  assert (config['min_lr_rate'], config['save_steps'], config['max_length']) == (0.25, 0.0, 4096)
  assert (config['report_to'], config['warmup_ratio'], config['warmup_steps']) == ('tensorboard,wandb', 0.05, 0)
  config, _ = _recipe({'report_to': 'none', 'save_steps': 0.2, 'warmup_steps': 10,
                       'dataset_mixture': {'datasets': [{'id': 'a/b', 'weight': 0.5}], 'seed': 0}})
  assert (config['report_to'], config['save_steps'], config['warmup_steps']) == ('none', 0.2, 10)
  assert config['dataset_mixture'] == {'datasets': [{'id': 'a/b', 'weight': 0.5}], 'seed': 0}


def test_yaml_1_1_spellings(tmp_path):
  """A bare `no` (YAML 1.1: false) is the strategy 'no'; `1e-5` (YAML 1.1: a string) is the number."""
  path = tmp_path / 'recipe.yaml'
  path.write_text('eval_strategy: no\nsave_strategy: no\nlearning_rate: 1e-5\nreport_to: [none]\n')
  config = recipe.from_recipe_yaml(str(path), warn=lambda m: None)
  assert (config.eval_strategy, config.save_steps, config.learning_rate, config.report_to) == ('no', 0, 1e-5, 'none')


def test_unknown_fields_are_one_error_naming_all():
  """A typo, GRPO fields and a jaxsft-only field: one error naming each of them (and the likely intent)."""
  message = _error({'learning_rat': 1e-5, 'num_generations': 8, 'global_batch_size': 128, 'seed': 1})
  assert message.startswith('recipe.yaml: unknown fields learning_rat (did you mean learning_rate?), '
                            'num_generations, global_batch_size'), message
  assert '--config.FIELD' in message and 'seed' not in message


@pytest.mark.parametrize('mapping,needles', [
    ({'learning_rate': 'abc'}, ("'learning_rate'", "'abc'")),
    ({'packing': 1}, ("'packing'", '1')),
    ({'seed': 1.5}, ("'seed'", '1.5')),
    ({'max_length': None}, ("'max_length'", 'None')),
    ({'model_revision': 3}, ("'model_revision'", '3')),
    ({'report_to': ['wandb', 'mlflow']}, ('report_to', 'mlflow')),
    ({'dataset_mixture': 3}, ("'dataset_mixture'", '3')),
    ({'lr_scheduler_kwargs': {'min_lr': 1e-6}}, ('lr_scheduler_kwargs.min_lr',)),
    ({'lr_scheduler_kwargs': {'min_lr_rate': 'x'}}, ("'min_lr_rate'", "'x'")),
    ({'fp16': True}, ('fp16', 'bf16')),
    ({'use_peft': 'yes'}, ("'use_peft'", "'yes'")),
    ({'lora_r': 'x'}, ("'lora_r'", "'x'")),
    ({'lora_target_modules': 3}, ("'lora_target_modules'", '3')),
    ({'optim': 'adafactor'}, ("'optim'", 'adafactor')),
    ({'logging_strategy': 'epoch'}, ("'logging_strategy'", 'epoch')),
    ({'save_strategy': 'best'}, ("'save_strategy'", 'best')),
    ({'do_train': False}, ("'do_train'",)),
    ({'torch_dtype': 'float16'}, ("'torch_dtype'", 'float16')),
    ({'max_seq_length': 10, 'max_length': 20}, ('max_seq_length', 'max_length')),
    ({'warmup_steps': 0.1, 'warmup_ratio': 0.1}, ('warmup_steps', 'warmup_ratio')),
])
def test_bad_values_name_the_field_and_file(mapping, needles):
  """A wrong type or an unsupported setting is one InputError line naming the file, the field and the value."""
  message = _error(mapping)
  for needle in needles:
    assert needle in message, message


@pytest.mark.parametrize('text,needles', [
    (None, ('missing.yaml', 'No such file')),
    ('seed: 1\nlearning_rate: [1, 2\nbf16: true\n', ('bad.yaml line 3', 'YAML syntax error')),
    ('- seed: 1\n', ('bad.yaml', 'mapping', 'list')),
    ('', ('bad.yaml', 'mapping', 'nothing')),
])
def test_unreadable_recipes_name_the_file(tmp_path, text, needles):
  """A missing file, a YAML syntax error (with its line) or a top level that is not a mapping: one line."""
  path = tmp_path / ('missing.yaml' if text is None else 'bad.yaml')
  if text is not None:
    path.write_text(text)
  with pytest.raises(InputError) as e:
    recipe.from_recipe_yaml(str(path), warn=lambda m: None)
  assert '\n' not in str(e.value)
  for needle in needles:
    assert needle in str(e.value), str(e.value)


def test_config_file_needs_a_path():
  """configs/from_yaml.py without ':RECIPE.yaml' says how to call it."""
  with pytest.raises(InputError, match='configs/from_yaml.py:RECIPE.yaml'):
    from_yaml.get_config()


def test_cli_bad_recipe_is_one_error_line(tmp_path):
  """Through the real command line: exit 2 and one `error:` line naming every unknown field, no traceback."""
  bad = tmp_path / 'BAD.yaml'
  bad.write_text('learning_rat: 1.0e-5\nnum_generations: 8\nseed: 1\n')
  proc = subprocess.run([sys.executable, '-m', 'jaxsft.train', '--config', f'configs/from_yaml.py:{bad}'],
                        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'), text=True, capture_output=True,
                        timeout=120, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.splitlines() == [f'error: {bad}: unknown fields learning_rat (did you mean learning_rate?), '
                                      'num_generations (not TRL SFT / open-r1 settings jaxsft knows)'], proc.stderr


@pytest.mark.slow
def test_cli_trains_and_sizes_a_valid_recipe_yaml(tmp_path):
  """The README's command, `--config configs/from_yaml.py:RECIPE.yaml`, through the real command line of
  jaxsft.train and jaxsft.dryrun, with a recipe that is valid: it trains the steps the recipe names (on the tiny
  shipped model, initialised at random from the command line) and the dry run compiles it."""
  tiny = os.path.join(ROOT, 'jaxsft', 'assets', 'tiny')
  data = tmp_path / 'train.jsonl'
  row = {'messages': [{'role': 'user', 'content': 'What is 2 + 2?'}, {'role': 'assistant', 'content': '4'}]}
  data.write_text((json.dumps(row) + '\n') * 16)
  out = tmp_path / 'out'
  path = tmp_path / 'recipe.yaml'
  path.write_text(yaml.safe_dump({
      'model_name_or_path': tiny, 'dataset_name': str(data), 'output_dir': str(out), 'learning_rate': 1.0e-3,
      'lr_scheduler_type': 'constant', 'max_steps': 3, 'per_device_train_batch_size': 4, 'max_length': 64,
      'bf16': False, 'gradient_checkpointing': False, 'logging_steps': 1, 'save_strategy': 'no',
      'report_to': 'none', 'seed': 3, 'attn_implementation': 'flash_attention_2'}))
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  jaxsft_only = ['--config.model_init=random', '--config.accuracy_eval_problems=0', '--config.disable_tqdm=true']
  proc = subprocess.run([sys.executable, '-m', 'jaxsft.train', '--config', f'configs/from_yaml.py:{path}',
                         *jaxsft_only], cwd=ROOT, env=env, text=True, capture_output=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'{path}: attn_implementation ' in proc.stderr  # The one warning line of an ignored GPU-only field.
  rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2, 3], rows
  assert json.loads((out / 'config.json').read_text())['learning_rate'] == 1.0e-3
  proc = subprocess.run([sys.executable, '-m', 'jaxsft.dryrun', '--config', f'configs/from_yaml.py:{path}',
                         '--devices', '1', *jaxsft_only], cwd=ROOT, env=env, text=True, capture_output=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'peak' in proc.stdout.strip().splitlines()[-1], proc.stdout[-1000:]
