"""The shipped open-r1 recipes: every value of each, the device-independent global batch, the chat template's
default system prompt, and that each compiles at its real model shape (dry run, 8 simulated devices)."""

import importlib.util
import os
import subprocess
import sys

import pytest
import tokenizers
import transformers

from jaxsft import config as config_lib
from jaxsft.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPEN_R1_SYSTEM = (
    'You are Open-R1, a language model trained by Hugging Face to help users. Your role as an assistant involves '
    'thoroughly exploring questions through a systematic thinking process before providing the final precise and '
    'accurate solutions. This requires engaging in a comprehensive cycle of analysis, summarizing, exploration, '
    'reassessment, reflection, backtracing, and iteration to develop well-considered thinking process. Please '
    'structure your response into two main sections: Thought and Solution using the specified format: <think> '
    'Thought section </think> Solution section. In the Thought section, detail your reasoning process in steps. Each '
    'step should include detailed considerations such as analysing questions, summarizing relevant findings, '
    'brainstorming new ideas, verifying the accuracy of the current steps, refining any errors, and revisiting '
    'previous steps. In the Solution section, based on various attempts, explorations, and reflections from the '
    'Thought section, systematically present the final solution that you deem correct. The Solution section should be '
    'logical, accurate, and concise and detail necessary steps needed to reach the conclusion. Now, try to solve the '
    'following question through the above guidelines.')

# open-r1's recipes/OpenR1-Distill-7B/sft/config_distill.yaml, value by value (the chat template is checked below).
R1_DISTILL = {
    'model_name_or_path': 'open-r1/Qwen2.5-Math-7B-RoPE-300k', 'model_revision': 'main',
    'dataset_name': 'open-r1/Mixture-of-Thoughts', 'dataset_config': 'all', 'dataset_num_proc': 12,
    'eos_token': '<|im_end|>', 'bf16': True, 'eval_strategy': 'no', 'gradient_accumulation_steps': 8,
    'gradient_checkpointing': True, 'learning_rate': 4.0e-05, 'logging_steps': 1,
    'lr_scheduler_type': 'cosine_with_min_lr', 'min_lr_rate': 0.1, 'packing': False, 'max_grad_norm': 0.2,
    'max_length': 32768, 'max_steps': -1, 'num_train_epochs': 5, 'output_dir': 'data/OpenR1-Distill-7B',
    'per_device_eval_batch_size': 1, 'per_device_train_batch_size': 2, 'report_to': 'wandb',
    'save_steps': 0,  # save_strategy: epoch
    'save_total_limit': 1, 'seed': 42, 'warmup_ratio': 0.03,
    # Not in the YAML but fixed by it: TRL's defaults the recipe relies on.
    'weight_decay': 0.0, 'adam_beta1': 0.9, 'adam_beta2': 0.999, 'adam_epsilon': 1e-8, 'warmup_steps': 0,
    'assistant_only_loss': False, 'completion_only_loss': None, 'dataset_train_split': 'train',
    'model_init': 'pretrained',
}
# open-r1's recipes/OlympicCoder-7B/sft/config_v00.00.yaml.
OLYMPIC_CODER = {
    'model_name_or_path': 'Qwen/Qwen2.5-Coder-7B-Instruct', 'model_revision': 'main',
    'dataset_name': 'open-r1/codeforces-cots', 'dataset_config': 'solutions_decontaminated', 'dataset_num_proc': 48,
    'bf16': True, 'eval_strategy': 'no', 'gradient_accumulation_steps': 8, 'gradient_checkpointing': True,
    'learning_rate': 1.0e-05, 'logging_steps': 1, 'lr_scheduler_type': 'cosine_with_min_lr', 'min_lr_rate': 0.1,
    'packing': False, 'max_grad_norm': 0.2, 'max_length': 32768, 'max_steps': -1, 'num_train_epochs': 10,
    'output_dir': 'data/OlympicCoder-7B', 'per_device_eval_batch_size': 1, 'per_device_train_batch_size': 2,
    'report_to': 'wandb', 'save_steps': 0.2, 'save_total_limit': 1, 'seed': 42, 'warmup_ratio': 0.03,
    'chat_template': None, 'eos_token': None,  # The model's own template and eos.
}
# open-r1's recipes/R1-Distill-Qwen3-8B/sft/config_v00.00.yaml, on the public Mixture-of-Thoughts.
QWEN3_8B = {
    'model_name_or_path': 'Qwen/Qwen3-8B-Base', 'model_revision': 'main',
    'dataset_name': 'open-r1/Mixture-of-Thoughts', 'dataset_config': 'all', 'dataset_num_proc': 12,
    'eos_token': '<|im_end|>', 'bf16': True, 'eval_strategy': 'no', 'gradient_accumulation_steps': 4,
    'gradient_checkpointing': True, 'learning_rate': 4.0e-05, 'logging_steps': 1,
    'lr_scheduler_type': 'cosine_with_min_lr', 'min_lr_rate': 0.1, 'packing': False, 'max_grad_norm': 0.2,
    'max_length': 32768, 'max_steps': -1, 'num_train_epochs': 5, 'output_dir': 'data/R1-Distill-Qwen3-8B',
    'per_device_eval_batch_size': 2, 'per_device_train_batch_size': 2, 'report_to': 'wandb', 'save_steps': 0,
    'save_total_limit': 1, 'seed': 42, 'warmup_ratio': 0.03,
}
RECIPES = {'r1_distill': (R1_DISTILL, 128), 'olympic_coder_7b': (OLYMPIC_CODER, 128),
           'r1_distill_qwen3_8b': (QWEN3_8B, 128)}


def load(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('name', sorted(RECIPES))
def test_every_recipe_value(name):
  expected, global_batch = RECIPES[name]
  config = load(name).get_config()
  for field, value in expected.items():
    assert config[field] == value, field
    assert type(config[field]) in (type(value), float) or value is None, field  # 5 epochs may be 5.0.
  assert config.global_batch_size == global_batch
  assert config.padding_free  # The recipe's conversations per step, in fewer rows (tests/test_padding_free.py).
  assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (1, -1, 1)  # ZeRO-3 over every device.
  config_lib.validate(config)  # Model and dataset are hub ids: nothing is fetched to validate.


@pytest.mark.parametrize('name', ['r1_distill', 'r1_distill_qwen3_8b'])
def test_open_r1_chat_template_adds_the_default_system_prompt(name):
  """The template is open-r1's: its system prompt when a conversation has none, the conversation's own otherwise."""
  config = load(name).get_config()
  tokenizer = transformers.PreTrainedTokenizerFast(  # Rendering is text only: any tokenizer will do.
      tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel({'a': 0}, 'a')))
  user = [{'role': 'user', 'content': 'What is 2+2?'}, {'role': 'assistant', 'content': '<think>2+2</think> 4'}]
  text = tokenizer.apply_chat_template(user, chat_template=config.chat_template, tokenize=False)
  assert text == (f'<|im_start|>system\n{OPEN_R1_SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n'
                  '<|im_start|>assistant\n<think>2+2</think> 4<|im_end|>\n')
  own = [{'role': 'system', 'content': 'Be brief.'}] + user[:1]
  text = tokenizer.apply_chat_template(own, chat_template=config.chat_template, tokenize=False,
                                       add_generation_prompt=True)
  assert text == ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n'
                  '<|im_start|>assistant\n')


@pytest.mark.parametrize('devices,split', [(8, (2, 8)), (16, (2, 4)), (32, (2, 2)), (64, (2, 1))])
def test_global_batch_is_kept_on_any_device_count(devices, split):
  config = load('r1_distill').get_config()
  assert config_lib.batch_split(config, devices) == split
  assert split[0] * split[1] * devices == 128


def test_global_batch_that_does_not_divide_names_the_fields():
  config = load('r1_distill').get_config()
  with pytest.raises(InputError, match=r"'global_batch_size' 128 is not a multiple of per_device_train_batch_size 2 "
                                       r'× 128 devices = 256 \(--config.per_device_train_batch_size=1 would\)'):
    config_lib.batch_split(config, 128)
  with pytest.raises(InputError, match='× 48 devices = 96$'):
    config_lib.batch_split(config, 48)
  config.global_batch_size = None  # Without it: the configured split, whatever the device count.
  assert config_lib.batch_split(config, 48) == (2, 8)


def test_save_steps_fraction_and_report_to():
  config = config_lib.base_config()
  config.save_steps = 0.2
  assert config_lib.save_interval(config, 1001) == 201  # transformers: ceil(0.2 × total).
  config.save_steps = 0
  assert config_lib.save_interval(config, 1001) == 0
  for value, expected in (('none', ()), ('', ()), ('wandb', ('wandb',)),
                          ('tensorboard, wandb', ('tensorboard', 'wandb')), ('all', ('tensorboard', 'wandb'))):
    config.report_to = value
    assert config_lib.report_to(config) == expected
  config.report_to = 'tensorbord'
  with pytest.raises(InputError, match="'report_to' names 'tensorbord'"):
    config_lib.report_to(config)


@pytest.mark.slow
def test_the_recipes_compile_at_their_model_shapes():
  """Each recipe's train step compiles at its real model shape on 8 simulated devices (short rows keep it fast)."""
  for name in sorted(RECIPES):
    result = subprocess.run([sys.executable, '-m', 'jaxsft.dryrun', '--config', f'configs/{name}.py', '--devices', '8',
                             '--config.max_length=256'], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert '\npeak ' in result.stdout, result.stdout[-2000:]
