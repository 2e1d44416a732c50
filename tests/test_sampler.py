"""Tests for the KV-cache sampler (jaxsft.sampler.sample), its CLI and eval_generations.

The tiny models come from tests/conftest.py (`tiny_hf`): O(1)-scale random weights, so greedy choices are
not near-ties (see test_cached_greedy_equals_uncached for why that matters in bf16).
Run as a script (`python -m tests.test_sampler mesh MODEL_DIR OUT_JSON`), this file is the 8-device child of
test_mesh_greedy_equals_single_device.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsft import evals
from jaxsft import generate
from jaxsft import sampler
from jaxsft import tokenizer as tokenizer_lib
from jaxsft.errors import InputError
from jaxsft.models import hf
from jaxsft.models import hf_config

ASSETS = os.path.join(os.path.dirname(generate.__file__), 'assets', 'tiny')
NEW_TOKENS = 12
PROMPT_LENGTHS = (5, 1, 13, 8, 3)  # 13 > the sliding windows (4, 5) of 'qwen2_sliding' and 'mistral'.


def _ours(tiny_hf, name: str, *, scan: bool, dtype: str = 'float32', **overrides):
  model_dir = tiny_hf.save(tiny_hf.model(name, **overrides))
  cfg = hf_config.model_config_from_hf(hf_config.read_hf_config(model_dir), dtype=dtype, scan_layers=scan)
  return hf.load_pretrained(model_dir, cfg), model_dir


def _prompts(seed: int = 0, lengths=PROMPT_LENGTHS, vocab: int = 300) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [rng.integers(1, vocab, n).tolist() for n in lengths]


# ----------------------------------------------------------------------------------------------------------
# Cached greedy decoding against the cache-free reference.


@pytest.mark.parametrize('name,scan,dtype', [
    ('qwen2', True, 'float32'),  # q/k/v bias.
    ('qwen3', False, 'float32'),  # q/k norm.
    ('llama3', True, 'float32'),  # llama3 RoPE, o and MLP bias.
    ('qwen2_sliding', True, 'float32'),  # Layers of different windows: scanned, switched per layer.
    ('mistral', False, 'float32'),  # A window on every layer, unscanned.
    ('qwen2_sliding', False, 'bfloat16'),
    ('qwen3', True, 'bfloat16'),
])
def test_cached_greedy_equals_uncached(tiny_hf, name, scan, dtype):
  """Greedy with the KV cache equals greedy without it, token for token, for rows of different lengths,
  decoding past the sliding windows, with and without end-of-sequence stopping.

  bf16: both paths compute in bf16 (float32 softmax and logits), but they reduce over different lengths (the
  cache's S slots against the reference's T tokens) in different shapes, so a float32 → bf16 cast can round
  the other way now and then. Measured on these models' greedy sequences: logits differ by at most ~5e-7
  between the paths, while the top-2 logit gap is never below ~2e-3: the comparison is meaningful, and the
  tokens are equal. It would not be with transformers' std-0.02 init (the tiny default's random model): there
  the logits are nearly flat (std 0.23), the two paths differ by up to ~3e-3 in bf16 and the top-2 gap falls
  to ~4e-4, so a tie can flip and an equality there would prove nothing.
  """
  ours, _ = _ours(tiny_hf, name, scan=scan, dtype=dtype)
  cfg = ours.cfg
  graphdef, state = nnx.split(ours)
  _, cache = jax.eval_shape(lambda state: nnx.merge(graphdef, state).prefill(
      jnp.ones((8, 32), jnp.int32), jnp.ones((8,), jnp.int32), 128), state)
  for x in cache.values():  # [L, B, S, K, H] in the compute dtype.
    assert x.shape == (cfg.num_layers, 8, 128, cfg.num_kv_heads, cfg.head_dim) and x.dtype == jnp.dtype(dtype)
  prompts = _prompts()
  free = sampler.greedy_generate(ours, prompts, max_new_tokens=NEW_TOKENS, eos_ids=[], pad_id=0)
  assert [len(g) for g in free] == [NEW_TOKENS] * len(prompts)
  assert free == sampler.greedy_generate_uncached(ours, prompts, max_new_tokens=NEW_TOKENS, eos_ids=[], pad_id=0)
  # End-of-sequence ids that rows produce midway: those rows stop there, the others run on.
  eos_ids = [free[0][4], free[2][1]]
  stopped = sampler.greedy_generate(ours, prompts, max_new_tokens=NEW_TOKENS, eos_ids=eos_ids, pad_id=0)
  assert stopped == sampler.greedy_generate_uncached(ours, prompts, max_new_tokens=NEW_TOKENS, eos_ids=eos_ids,
                                                      pad_id=0)
  assert len(stopped[0]) <= 4 and len(stopped[2]) <= 1
  for row, full in zip(stopped, free):  # Stopping truncates the same sequence, right before the eos id.
    assert full[:len(row)] == row
    assert len(row) == NEW_TOKENS or full[len(row)] in eos_ids


def test_rows_do_not_depend_on_the_batch_or_the_pad_id(tiny_hf):
  """A row's output (greedy, and sampled with the same row index and seed) is the same alone or batched,
  whatever fills the padding: the prompt padding slots of the cache are never attended to."""
  ours, _ = _ours(tiny_hf, 'qwen2_sliding', scan=True)
  prompts = _prompts(1, (7, 2, 16, 11, 4))
  together = sampler.greedy_generate(ours, prompts, max_new_tokens=8, eos_ids=[5], pad_id=0)
  alone = [sampler.greedy_generate(ours, [p], max_new_tokens=8, eos_ids=[5], pad_id=299)[0] for p in prompts]
  assert together == alone
  kw = dict(max_new_tokens=8, eos_ids=[], temperature=1.0, top_p=0.9, seed=3)
  first = sampler.sample(ours, prompts, pad_id=0, **kw)[0]
  assert first == sampler.sample(ours, prompts[:1], pad_id=299, **kw)[0]


def test_sampling_seeds_and_a_tiny_top_p(tiny_hf):
  """top_p tiny keeps only the most likely token (= greedy); a seed fixes the draws; another seed changes
  them; temperature sampling stays within the vocabulary."""
  ours, _ = _ours(tiny_hf, 'qwen2', scan=True)
  prompts = _prompts(2)
  kw = dict(max_new_tokens=NEW_TOKENS, eos_ids=[], pad_id=0)
  greedy = sampler.greedy_generate(ours, prompts, **kw)
  assert sampler.sample(ours, prompts, temperature=1.0, top_p=1e-6, seed=5, **kw) == greedy
  draws = sampler.sample(ours, prompts, temperature=1.5, seed=7, **kw)
  assert draws == sampler.sample(ours, prompts, temperature=1.5, seed=7, **kw)
  assert draws != sampler.sample(ours, prompts, temperature=1.5, seed=8, **kw)
  assert draws != greedy
  assert all(0 <= t < 300 for row in draws for t in row) and [len(r) for r in draws] == [NEW_TOKENS] * 5


def test_edge_cases_and_bad_arguments(tiny_hf):
  ours, _ = _ours(tiny_hf, 'llama_tied', scan=True)
  assert sampler.sample(ours, [], max_new_tokens=5, eos_ids=[1], pad_id=0) == []
  assert sampler.sample(ours, [[3, 4], [5]], max_new_tokens=0, eos_ids=[1], pad_id=0) == [[], []]
  with pytest.raises(InputError, match='prompt 1 is empty'):
    sampler.sample(ours, [[3], []], max_new_tokens=5, eos_ids=[1], pad_id=0)
  with pytest.raises(InputError, match='temperature'):
    sampler.sample(ours, [[3]], max_new_tokens=5, eos_ids=[1], pad_id=0, temperature=-1.0)
  with pytest.raises(InputError, match='top_p'):
    sampler.sample(ours, [[3]], max_new_tokens=5, eos_ids=[1], pad_id=0, temperature=1.0, top_p=0.0)
  # One new token; and a row whose first generated token is an end-of-sequence id yields nothing.
  first = sampler.sample(ours, [[3, 4]], max_new_tokens=1, eos_ids=[], pad_id=0)[0]
  assert len(first) == 1
  assert sampler.sample(ours, [[3, 4]], max_new_tokens=4, eos_ids=first, pad_id=0) == [[]]


# ----------------------------------------------------------------------------------------------------------
# Drawing from logits.


def _hf_warped(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
  """transformers' own temperature and top-p warpers applied to float32 logits [B, V]."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers.generation import logits_process  # pylint: disable=import-outside-toplevel
  scores = torch.tensor(logits)
  scores = logits_process.TemperatureLogitsWarper(temperature)(None, scores)
  if top_p < 1:
    scores = logits_process.TopPLogitsWarper(top_p)(None, scores)
  return scores.numpy()


def test_nucleus_mask_is_transformers_top_p():
  """The kept set equals TopPLogitsWarper's, row by row, for several top_p (random logits: no ties)."""
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (64, 50)).astype(np.float32)
  for top_p in (1e-4, 0.1, 0.5, 0.9, 0.99):
    ours = np.asarray(sampler.nucleus_mask(jnp.asarray(logits), top_p))
    theirs = np.isfinite(_hf_warped(logits, 1.0, top_p))
    np.testing.assert_array_equal(ours, theirs, err_msg=f'top_p {top_p}')
    assert ours.sum(axis=1).min() >= 1
  assert np.asarray(sampler.nucleus_mask(jnp.asarray(logits), 1e-4)).sum() == 64  # Only the argmax is kept.


@pytest.mark.parametrize('temperature,top_p', [(0.7, 0.8), (1.3, 1.0)])
def test_draw_frequencies_match_the_nucleus_distribution(temperature, top_p):
  """N = 40000 draws from fixed logits (one row each, keys as `sample` derives them): the frequency of every
  token is within 5 sigma of transformers' warped softmax, sigma = sqrt(p (1 - p) / N), and a token outside
  the nucleus is never drawn.

  A count is Binomial(N, p), close to normal here (N p >= 800 for every kept token), so a correct sampler
  leaves the bound with probability < 6e-7 per token (< 1e-5 for the ten); the keys are fixed, so the test is
  deterministic anyway. The bound is tight enough to catch a wrong distribution: the same check rejects the
  untempered softmax and, with top_p < 1, the softmax not restricted to the nucleus (asserted below).
  """
  n = 40000
  logits_V = np.array([2.0, 1.6, 1.5, 0.9, 0.5, 0.0, -0.3, -1.0, -2.0, -4.0], np.float32)
  expected_V = jax.nn.softmax(jnp.asarray(_hf_warped(logits_V[None], temperature, top_p)[0])).__array__()
  mode = sampler.sampling_mode(temperature, top_p)
  keys_N = sampler.step_keys(np.uint32(11), n, 3)
  draws = sampler.draw_tokens(jnp.broadcast_to(jnp.asarray(logits_V), (n, logits_V.size)), keys_N,
                               np.float32(temperature), np.float32(top_p), mode=mode)
  freq_V = np.bincount(np.asarray(draws), minlength=logits_V.size) / n

  def within(p_V):
    return np.all(np.abs(freq_V - p_V) <= 5 * np.sqrt(p_V * (1 - p_V) / n))

  assert within(expected_V), (freq_V, expected_V)
  outside = expected_V == 0
  assert freq_V[outside].sum() == 0
  assert not within(np.asarray(jax.nn.softmax(jnp.asarray(logits_V))))  # Temperature ignored: rejected.
  if top_p < 1:
    assert outside.sum() >= 3
    assert not within(np.asarray(jax.nn.softmax(jnp.asarray(logits_V / temperature))))  # No nucleus: rejected.


def test_default_sampling_and_eos_ids_follow_generation_config():
  import transformers  # pylint: disable=import-outside-toplevel
  assert generate.default_sampling({}) == (0.0, 1.0)
  assert generate.default_sampling({'temperature': 0.6, 'top_p': 0.9}) == (0.0, 1.0)  # do_sample unset: greedy.
  assert generate.default_sampling({'do_sample': True, 'temperature': 0.6, 'top_p': 0.95}) == (0.6, 0.95)
  assert generate.default_sampling({'do_sample': True}) == (1.0, 1.0)
  tokenizer = transformers.AutoTokenizer.from_pretrained(ASSETS)
  assert tokenizer_lib.eos_ids(tokenizer, {}) == [tokenizer.eos_token_id]
  assert tokenizer_lib.eos_ids(tokenizer, {'eos_token_id': [7, 2]}) == sorted({7, 2, tokenizer.eos_token_id})


# ----------------------------------------------------------------------------------------------------------
# eval_generations.


def test_eval_generations_builds_prompts_from_each_row_format():
  """Conversations lose their last assistant message (the reference), prompt/completion rows keep the prompt,
  text rows and over-long prompts are skipped; 'generated' is the sampler's output, special tokens kept."""
  import transformers  # pylint: disable=import-outside-toplevel
  from jaxsft.data import sources  # pylint: disable=import-outside-toplevel
  tokenizer = transformers.AutoTokenizer.from_pretrained(ASSETS)
  model = hf.init_random(hf_config.model_config_from_hf(hf_config.read_hf_config(ASSETS), scan_layers=True), seed=0)
  conversation = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Tom has 3 apples.'},
                  {'role': 'assistant', 'content': 'Yes.'}, {'role': 'user', 'content': 'How many now?'},
                  {'role': 'assistant', 'content': 'The answer is 3.'}]
  rows = [
      {'text': 'plain text is not a prompt'},
      {'messages': conversation},
      {'messages': [{'role': 'user', 'content': 'What is 2 plus 2? ' * 40}, {'role': 'assistant', 'content': '4'}]},
      {'prompt': 'Anna has 4 pens.', 'completion': ' She has 4.'},
      {'prompt': [{'role': 'user', 'content': 'What is 5 plus 1?'}],
       'completion': [{'role': 'assistant', 'content': 'The answer is 6.'}]},
      {'messages': [{'role': 'user', 'content': 'never reached'}, {'role': 'assistant', 'content': '.'}]},
  ]
  source = sources.RowList(rows, 'test', 'eval')
  out = evals.eval_generations(model, tokenizer, source, num_prompts=3, max_new_tokens=5, temperature=0.0,
                                  top_p=1.0, seed=0, max_prompt_tokens=64)
  assert [(o['prompt'], o['reference']) for o in out] == [
      ('How many now?', 'The answer is 3.'), ('Anna has 4 pens.', ' She has 4.'),
      ('What is 5 plus 1?', 'The answer is 6.')]

  def chat(messages):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)['input_ids']

  prompts = [chat(conversation[:4]), tokenizer('Anna has 4 pens.')['input_ids'], chat(rows[4]['prompt'])]
  direct = sampler.sample(model, prompts, max_new_tokens=5, eos_ids=[tokenizer.eos_token_id],
                           pad_id=tokenizer.pad_token_id)
  assert [o['generated'] for o in out] == [tokenizer.decode(ids, skip_special_tokens=False) for ids in direct]
  assert evals.eval_generations(model, tokenizer, sources.RowList(rows[:1], 'test', 'eval'), num_prompts=2,
                                   max_new_tokens=5, temperature=0.0, top_p=1.0, seed=0,
                                   max_prompt_tokens=64) == []


# ----------------------------------------------------------------------------------------------------------
# Exported model: the CLI against transformers' generate; CLI errors; the mesh.


def _env() -> dict:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  env['PYTHONPATH'] = os.pathsep.join([os.getcwd(), env.get('PYTHONPATH', '')])
  return env


@pytest.mark.slow
def test_cli_equals_transformers_generate_on_an_exported_model(tiny_hf, tmp_path):
  """A jaxsft model written by export.write_hf_dir: `python -m jaxsft.generate` (chat template, system
  message, two prompts in one batch) produces the tokens of transformers' generate(do_sample=False) on the
  same directory and chat-templated prompts."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from jaxsft import export  # pylint: disable=import-outside-toplevel
  tokenizer = transformers.AutoTokenizer.from_pretrained(ASSETS)
  ours, model_dir = _ours(tiny_hf, 'qwen2', scan=True, vocab_size=576)
  out_dir = export.write_hf_dir(ours, hf_config.read_hf_config(model_dir), tokenizer,
                                tokenizer_lib.generation_config(str(model_dir), tokenizer), tmp_path / 'hf', dtype='float32')
  questions = ['What is 3 plus 4?', 'Tom has 12 apples and gives 5 to Anna. How many are left?']
  proc = subprocess.run([sys.executable, '-m', 'jaxsft.generate', '--model', out_dir, '--system', 'Be brief.',
                         '--max_new_tokens', '16', '--json'] + [f'--prompt={q}' for q in questions],
                        env=_env(), capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ours_ids = [json.loads(line)['ids'] for line in proc.stdout.splitlines()]
  assert 'greedy' in proc.stderr

  model = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
  eos = model.generation_config.eos_token_id
  eos = set(eos if isinstance(eos, list) else [eos])
  for question, got in zip(questions, ours_ids):
    messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)['input_ids']
    with torch.no_grad():
      out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=16, do_sample=False)
    want = out[0, len(ids):].tolist()
    if want and want[-1] in eos:
      want = want[:-1]
    assert got == want
  assert ours_ids[0] != ours_ids[1]


@pytest.mark.slow
def test_cli_bad_input_is_one_error_line(tmp_path):
  """A missing directory, a directory without config.json, a bad flag value, an unknown flag: one
  `error:` line on stderr and exit status 2 (the processes run side by side)."""
  (tmp_path / 'empty').mkdir()
  cases = {
      'no such directory': ['--model', str(tmp_path / 'missing'), '--prompt', 'hi'],
      'has no config.json': ['--model', str(tmp_path / 'empty'), '--prompt', 'hi'],
      'temperature': ['--model', str(tmp_path / 'empty'), '--prompt', 'hi', '--temperature', 'warm'],
      'nope': ['--model', str(tmp_path / 'empty'), '--nope'],
  }
  procs = {k: subprocess.Popen([sys.executable, '-m', 'jaxsft.generate', *args], env=_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k, args in cases.items()}
  for expected, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=120)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (expected, stderr)
    assert lines[0].startswith('error: ') and expected in lines[0] and not stdout


@pytest.mark.slow
def test_mesh_greedy_equals_single_device(tiny_hf, tmp_path):
  """On 8 CPU devices, fsdp 4 x tensor 2, parameters sharded as the trainer shards them: greedy output equals
  the single-device output; the cache is split over the batch axes and its kv heads over 'tensor'."""
  _, model_dir = _ours(tiny_hf, 'qwen2', scan=True)
  out = tmp_path / 'mesh.json'
  env = {**_env(), 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  proc = subprocess.run([sys.executable, '-m', 'tests.test_sampler', 'mesh', str(model_dir), str(out)], env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result['devices'] == 8
  assert result['meshed'] == result['single'] and all(len(r) == 10 for r in result['single'])
  assert result['q_proj_spec'] == [None, 'fsdp', 'tensor', None]
  layers, batch, slots, kv_heads, head_dim = result['cache_shape']
  assert result['cache_shard_shape'] == [layers, batch // 4, slots, kv_heads // 2, head_dim]


def _mesh_child(model_dir: str, out_path: str) -> None:
  from jaxsft import sharding  # pylint: disable=import-outside-toplevel
  cfg = hf_config.model_config_from_hf(hf_config.read_hf_config(model_dir), scan_layers=True)
  prompts = _prompts(3, (9, 4, 17, 1, 6))
  kw = dict(max_new_tokens=10, eos_ids=[], pad_id=0)
  single = sampler.greedy_generate(hf.load_pretrained(model_dir, cfg), prompts, **kw)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 4, 'tensor': 2})
  shardings = sharding.param_shardings(nnx.state(hf.abstract_model(cfg), nnx.Param), mesh)
  graphdef, params, rest = nnx.split(hf.load_pretrained(model_dir, cfg, shardings=shardings), nnx.Param, ...)
  model = nnx.merge(graphdef, params, rest)  # As the trainer rebuilds it from its state.
  with jax.set_mesh(mesh):
    meshed = sampler.greedy_generate(model, prompts, **kw)
    graphdef, state = nnx.split(model)
    tokens = jax.device_put(np.ones((8, 32), np.int32), sharding.batch_sharding(mesh))
    lengths = jax.device_put(np.full((8,), 3, np.int32), sharding.batch_sharding(mesh))
    _, cache = sampler._prefill(graphdef, state, tokens, lengths, np.uint32(0), np.float32(1), np.float32(1),
                                 cache_len=128, mode=sampler.GREEDY)  # pylint: disable=protected-access
  q_spec = list(params['layers']['self_attn']['q_proj']['kernel'].get_value().sharding.spec)
  with open(out_path, 'w', encoding='utf-8') as f:
    json.dump({'devices': len(jax.devices()), 'single': single, 'meshed': meshed, 'q_proj_spec': q_spec,
               'cache_shape': cache['key'].shape, 'cache_shard_shape': cache['key'].sharding.shard_shape(
                   cache['key'].shape)}, f)


if __name__ == '__main__':
  if sys.argv[1] == 'mesh':
    _mesh_child(*sys.argv[2:])
