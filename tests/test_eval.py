"""Evaluation in the training loop, and the chat_template / eos_token overrides, through trainer.run.

eval_loss must be the token-weighted mean over the whole eval split: it is recomputed here directly, with
transformers' own model on the exported weights, row by row, unpacked.
"""

import json
import os

import numpy as np
import pytest

from jaxsft import config as config_lib
from jaxsft import trainer
from tests.helpers import models
from jaxsft.data import formats

pytestmark = pytest.mark.slow

TEMPLATE = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\n' }}"
            "{%- if message['role'] == 'assistant' %}{%- generation %}{{- message['content'] + '<|endoftext|>' }}"
            "{%- endgeneration %}{{- '\n' }}{%- else %}{{- message['content'] + '<|endoftext|>' + '\n' }}"
            "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
            '{%- endif %}')


@pytest.fixture(scope='module')
def model_and_data(tmp_path_factory):
  from jaxsft.data import synthetic

  root = tmp_path_factory.mktemp('eval')
  model_dir = models.save_tiny_qwen2(root / 'model', hidden_size=32, intermediate_size=64)
  data = synthetic.load('synthetic:arithmetic?train=48&test=21&seed=1')
  data_dir = root / 'data'
  data_dir.mkdir()
  for name, split in (('train', data.train), ('test', data.eval)):
    with open(data_dir / f'{name}.jsonl', 'w', encoding='utf-8') as f:
      for i in range(len(split)):
        f.write(json.dumps({'messages': split[i]['messages']}) + '\n')
  return model_dir, str(data_dir), root


def _run(model_dir, data_dir, out, **overrides) -> list[dict]:
  config = config_lib.base_config()
  config.update(dict(model_name_or_path=model_dir, dataset_name=data_dir, output_dir=str(out), bf16=False,
                     gradient_checkpointing=False, disable_tqdm=True, learning_rate=3e-3, max_length=256,
                     per_device_train_batch_size=8, per_device_eval_batch_size=5, num_train_epochs=2.0,
                     logging_steps=1, assistant_only_loss=True, dataset_cache_dir=str(out) + '-cache',
                     eval_generation_max_new_tokens=24))
  config.update(overrides)
  config.lock()
  trainer.run(config)
  with open(os.path.join(out, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _direct_eval(hf_dir, data_dir, tokenizer=None) -> tuple[float, float, int]:
  """Token-weighted CE and top-1 accuracy of transformers' model over test.jsonl, one row at a time."""
  import torch
  import transformers

  tokenizer = tokenizer or transformers.AutoTokenizer.from_pretrained(hf_dir)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  loss_sum, correct, count = 0.0, 0, 0
  with open(os.path.join(data_dir, 'test.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  for row in rows:
    example = formats.tokenize_row(row, tokenizer, fmt='messages', max_length=256, assistant_only_loss=True,
                                   completion_only_loss=None, dataset_text_field='text', where='')
    with torch.no_grad():
      logits = model(torch.from_numpy(example.input_ids[None].astype(np.int64))).logits[0, :-1].double()
    targets = torch.tensor(example.input_ids[1:]).long()
    weights = torch.tensor(example.loss_mask[1:]).double()
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction='none')
    loss_sum += float((ce * weights).sum())
    correct += int(((logits.argmax(-1) == targets).double() * weights).sum())
    count += int(weights.sum())
  return loss_sum / count, correct / count, count


@pytest.mark.parametrize('packing', [False, True])
def test_eval_loss_is_the_token_weighted_mean_over_the_eval_split(model_and_data, packing):
  model_dir, data_dir, root = model_and_data
  out = root / f'run-packing-{packing}'
  rows = _run(model_dir, data_dir, out, eval_strategy='steps', eval_steps=4.0, packing=packing, max_steps=8,
              eval_generation_temperature=1.0)  # Sampled: 8 steps leave greedy answers near-constant.
  config = json.loads((out / 'config.json').read_text())['resolved']
  eval_rows = [r for r in rows if 'eval_loss' in r]
  assert [r['step'] for r in eval_rows] == [4, 8]
  assert all(0 < r['eval_mean_token_accuracy'] <= 1 for r in eval_rows)
  assert eval_rows[-1]['eval_loss'] < eval_rows[0]['eval_loss']  # It learns.
  loss, accuracy, count = _direct_eval(out / 'hf', data_dir)
  assert eval_rows[-1]['eval_num_tokens'] == count
  np.testing.assert_allclose(eval_rows[-1]['eval_loss'], loss, rtol=2e-5)
  np.testing.assert_allclose(eval_rows[-1]['eval_mean_token_accuracy'], accuracy, atol=1.5 / count)
  if packing:
    assert config['num_packed_rows'] < config['num_examples'] and config['packing_efficiency'] > 0.8
  else:
    _check_eval_generations(rows, out, data_dir)


def _check_eval_generations(rows, out, data_dir):
  """Each eval answers the split's first 4 prompts; the last eval's answers are exactly what the sampler gives on the
  exported model with the same seed (config seed + step): the generation ran on the training state's own weights."""
  from jaxsft import evals  # pylint: disable=import-outside-toplevel
  from jaxsft import generate  # pylint: disable=import-outside-toplevel
  from jaxsft import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  from jaxsft.data import sources  # pylint: disable=import-outside-toplevel
  generations = [r for r in rows if 'eval_generations' in r]
  assert [r['step'] for r in generations] == [4, 8]
  last = generations[-1]['eval_generations']
  with open(os.path.join(data_dir, 'test.jsonl'), encoding='utf-8') as f:
    test_rows = [json.loads(line) for line in f]
  assert [g['reference'] for g in last] == [r['messages'][-1]['content'] for r in test_rows[:4]]
  assert [g['prompt'] for g in last] == [r['messages'][-2]['content'] for r in test_rows[:4]]
  assert len({g['generated'] for g in last}) == 4  # Sampled answers: a strong comparison below.
  model, tokenizer, generation_config = generate.load_model(str(out / 'hf'), dtype='float32')
  direct = evals.eval_generations(model, tokenizer, sources.RowList(test_rows, 'test.jsonl', 'test'),
                                  num_prompts=4, max_new_tokens=24, temperature=1.0, top_p=1.0, seed=42 + 8,
                                  max_prompt_tokens=256, eos_ids=tokenizer_lib.eos_ids(tokenizer, generation_config))
  assert direct == last


def test_eval_strategy_epoch(model_and_data):
  model_dir, data_dir, root = model_and_data
  rows = _run(model_dir, data_dir, root / 'run-epoch', eval_strategy='epoch', packing=True)
  resolved = json.loads((root / 'run-epoch' / 'config.json').read_text())['resolved']
  steps_per_epoch = resolved['steps_per_epoch']
  # The schedule counts packed rows: ceil(packed rows / 8 per micro-batch) steps per epoch, 2 epochs.
  assert resolved['num_packed_rows'] < resolved['num_examples']
  assert steps_per_epoch == -(-resolved['num_packed_rows'] // 8) and resolved['total_steps'] == 2 * steps_per_epoch
  assert [r['step'] for r in rows if 'eval_loss' in r] == [steps_per_epoch, 2 * steps_per_epoch]


def test_chat_template_and_eos_overrides_reach_labels_tokenizer_and_generation_config(model_and_data):
  import transformers

  model_dir, data_dir, root = model_and_data
  template_file = root / 'template.jinja'
  template_file.write_text(TEMPLATE, encoding='utf-8')
  out = root / 'run-overrides'
  _run(model_dir, data_dir, out, chat_template=str(template_file), eos_token='<|endoftext|>', max_steps=2,
       eval_strategy='steps', eval_steps=2.0)
  exported = transformers.AutoTokenizer.from_pretrained(out / 'hf')
  assert exported.chat_template == TEMPLATE and exported.eos_token == '<|endoftext|>'
  generation = json.loads((out / 'hf' / 'generation_config.json').read_text())
  assert generation['eos_token_id'] == exported.convert_tokens_to_ids('<|endoftext|>')
  # The labels: each assistant turn's loss tokens end with the override eos, not the template's default.
  example = formats.tokenize_row(
      {'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}]}, exported,
      fmt='messages', max_length=96, assistant_only_loss=True, completion_only_loss=None, dataset_text_field='text',
      where='')
  assert exported.decode(example.input_ids[example.loss_mask == 1]) == 'a<|endoftext|>'
  # And the eval loss computed with those labels matches the direct computation with the exported tokenizer.
  rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
  loss, _, _ = _direct_eval(out / 'hf', data_dir, exported)
  np.testing.assert_allclose([r['eval_loss'] for r in rows if 'eval_loss' in r][-1], loss, rtol=2e-5)
