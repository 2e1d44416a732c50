"""Tests for jaxsft.generate: batched greedy decoding equals transformers' generate(do_sample=False).

`greedy_generate` is the KV-cache sampler at temperature 0, `greedy_generate_uncached` the cache-free
reference; both are checked against transformers here (tests/test_sampler.py checks them against each other
on more architectures, and the sampler itself).
"""

import os

import numpy as np
import pytest
import transformers

from jaxsft import evals
from jaxsft import generate
from jaxsft import sampler
from jaxsft.errors import InputError
from jaxsft.models import hf
from jaxsft.models import hf_config

# torch (the reference) is imported where used: without it (TPU VMs, CI's 3.12 lane) tests/conftest.py skips the
# tests that need it and the others still run.

MAX_NEW_TOKENS = 10


def _hf_model(tmp_path, *, tied: bool):
  """A tiny random Qwen2 (peaked logits, so greedy choices are not near-ties) and its jaxsft twin."""
  import torch  # pylint: disable=import-outside-toplevel
  cfg = transformers.Qwen2Config(
      vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied, initializer_range=0.2)
  torch.manual_seed(1 if tied else 0)
  model = transformers.Qwen2ForCausalLM(cfg).to(torch.float32).eval()
  model_dir = tmp_path / ('tied' if tied else 'untied')
  model.save_pretrained(model_dir)
  ours = hf.load_pretrained(model_dir, hf_config.model_config_from_hf(hf_config.read_hf_config(model_dir)))
  return model, ours


def _hf_greedy(model, prompt: list[int], eos_ids: list[int]) -> list[int]:
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=eos_ids or None,
                         pad_token_id=0)
  generated = out[0, len(prompt):].tolist()
  if generated and generated[-1] in eos_ids:
    generated = generated[:-1]
  return generated


@pytest.mark.parametrize('fn', ['greedy_generate', 'greedy_generate_uncached'])
@pytest.mark.parametrize('tied', [False, True])
def test_greedy_generate_matches_transformers(tmp_path, tied, fn):
  model, ours = _hf_model(tmp_path, tied=tied)
  greedy = getattr(sampler, fn)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 96, n).tolist() for n in (5, 1, 13, 8, 3)]
  # First without an end-of-sequence id: every row runs to max_new_tokens.
  free = greedy(ours, prompts, max_new_tokens=MAX_NEW_TOKENS, eos_ids=[], pad_id=0)
  assert [len(g) for g in free] == [MAX_NEW_TOKENS] * len(prompts)
  assert free == [_hf_greedy(model, p, []) for p in prompts]
  # Then with ids that rows produce midway as end-of-sequence: those rows stop early, others do not.
  eos_ids = [free[0][4], free[2][1]]
  stopped = greedy(ours, prompts, max_new_tokens=MAX_NEW_TOKENS, eos_ids=eos_ids, pad_id=0)
  assert stopped == [_hf_greedy(model, p, eos_ids) for p in prompts]
  assert len(stopped[0]) <= 4 and len(stopped[2]) <= 1
  assert any(len(g) == MAX_NEW_TOKENS for g in stopped)
  for row, full in zip(stopped, free):  # Stopping truncates the same greedy sequence.
    assert full[:len(row)] == row
    assert len(row) == MAX_NEW_TOKENS or full[len(row)] in eos_ids


def test_result_does_not_depend_on_batching_or_pad_id(tmp_path):
  _, ours = _hf_model(tmp_path, tied=False)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(1, 96, n).tolist() for n in (7, 2, 30, 11, 4, 9, 1, 16, 3)]
  together = sampler.greedy_generate(ours, prompts, max_new_tokens=6, eos_ids=[5], pad_id=0)
  alone = [sampler.greedy_generate(ours, [p], max_new_tokens=6, eos_ids=[5], pad_id=95)[0] for p in prompts]
  assert together == alone


def test_edge_cases(tmp_path):
  _, ours = _hf_model(tmp_path, tied=True)
  assert sampler.greedy_generate(ours, [], max_new_tokens=5, eos_ids=[1], pad_id=0) == []
  assert sampler.greedy_generate(ours, [[3, 4], [5]], max_new_tokens=0, eos_ids=[1], pad_id=0) == [[], []]
  with pytest.raises(InputError, match='prompt 1 is empty'):
    sampler.greedy_generate(ours, [[3], []], max_new_tokens=5, eos_ids=[1], pad_id=0)
  with pytest.raises(InputError, match='max_new_tokens'):
    sampler.greedy_generate(ours, [[3]], max_new_tokens=-1, eos_ids=[1], pad_id=0)
  # A row whose first generated token is an end-of-sequence id yields nothing.
  first = sampler.greedy_generate(ours, [[3, 4]], max_new_tokens=1, eos_ids=[], pad_id=0)[0][0]
  assert sampler.greedy_generate(ours, [[3, 4]], max_new_tokens=4, eos_ids=[first], pad_id=0) == [[]]


def test_evaluate_accuracy_end_to_end_on_the_tiny_assets():
  """The real pieces together: shipped tokenizer and config, random model, greedy decoding with the KV cache,
  scoring."""
  from jaxsft.data import synthetic
  assets = os.path.join(os.path.dirname(generate.__file__), 'assets', 'tiny')
  tokenizer = transformers.AutoTokenizer.from_pretrained(assets)
  model = hf.init_random(hf_config.model_config_from_hf(hf_config.read_hf_config(assets)), seed=0)
  problems = synthetic.held_out_problems(3, 0)
  accuracy, samples = evals.evaluate_accuracy(model, tokenizer, problems, max_new_tokens=4)
  assert accuracy == 0.0  # Four tokens cannot hold '<think>...The answer is N.'
  assert [s['prompt'] for s in samples] == [m[-1]['content'] for m, _ in problems]
  prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)['input_ids'] for m, _ in problems]
  eos_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids('<|endoftext|>')]
  direct = sampler.greedy_generate(model, prompts, max_new_tokens=4, eos_ids=eos_ids,
                                    pad_id=tokenizer.pad_token_id)
  assert [s['generated'] for s in samples] == [tokenizer.decode(ids) for ids in direct]
