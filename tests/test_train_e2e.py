"""End to end: a short `configs/tiny.py` run writes the output-directory contract, and its `hf/` export
loads in transformers with jaxsft's logits."""

import json

import numpy as np
import pytest

from tests.helpers import runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  out = tmp_path_factory.mktemp('e2e') / 'run'
  proc = runs.train_cli('configs/tiny.py', output_dir=out, max_steps=6, logging_steps=2,
                        per_device_train_batch_size=8, gradient_accumulation_steps=2, accuracy_eval_problems=4,
                        accuracy_eval_max_new_tokens=8, disable_tqdm=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return out, proc


def test_output_directory_contract(tiny_run):
  out, proc = tiny_run
  config = runs.config_json(out)
  assert config['dataset_name'] == 'synthetic:arithmetic'
  assert config['resolved']['total_steps'] == 6
  rows = runs.metrics(out)
  train_rows = [r for r in rows if 'loss' in r]
  assert [r['step'] for r in train_rows] == [2, 4, 6]
  for key in ('step', 'loss', 'learning_rate', 'grad_norm', 'num_tokens', 'tokens_per_second', 'mfu', 'epoch'):
    assert all(key in r for r in train_rows), key
  assert all(np.isfinite(r['loss']) and r['grad_norm'] > 0 for r in train_rows)
  counts = [r['num_tokens'] for r in train_rows]
  assert counts == sorted(counts) and counts[0] > 0
  assert any('eval_accuracy' in r for r in rows)
  assert 'held-out exact-match accuracy' in proc.stderr
  for name in ('config.json', 'model.safetensors', 'tokenizer.json', 'generation_config.json'):
    assert (out / 'hf' / name).exists(), name


def test_export_loads_in_transformers_with_same_logits(tiny_run):
  import jax.numpy as jnp
  import torch
  import transformers
  from jaxsft.models import hf
  from jaxsft.models import hf_config

  out, _ = tiny_run
  hf_dir = out / 'hf'
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  generation = json.loads((hf_dir / 'generation_config.json').read_text())
  assert generation['eos_token_id'] == tokenizer.convert_tokens_to_ids('<|im_end|>')
  ids = tokenizer.apply_chat_template([{'role': 'user', 'content': 'Ann has 3 apples and buys 4 more.'}],
                                      add_generation_prompt=True, return_dict=False)
  ours_cfg = hf_config.model_config_from_hf(hf_config.read_hf_config(hf_dir))
  ours = hf.load_pretrained(hf_dir, ours_cfg)
  tokens = jnp.asarray([ids], jnp.int32)
  logits_ours = np.asarray(ours(tokens, jnp.arange(len(ids))[None], jnp.ones_like(tokens)))
  theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  with torch.no_grad():
    logits_theirs = theirs(torch.tensor([ids])).logits.numpy()
  np.testing.assert_allclose(logits_ours, logits_theirs, atol=1e-4, rtol=0)
