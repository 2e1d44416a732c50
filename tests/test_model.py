"""The NNX decoder against transformers: logits, padding, packing, RoPE variants, sliding windows, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsft.errors import InputError
from jaxsft.models import attention
from jaxsft.models import hf
from jaxsft.models import hf_config
from jaxsft.models import rope
from jaxsft.models import transformer

ATOL = 1e-4  # Max abs logit difference to transformers (float32 on CPU; logits are O(1)-O(10) here).


def _load(tiny_hf, hf_model, **cfg_overrides):
  path = tiny_hf.save(hf_model)
  cfg = hf_config.model_config_from_hf(hf_config.read_hf_config(path), **cfg_overrides)
  return hf.load_pretrained(path, cfg)


def _logits(model, tokens, positions, segment_ids):
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, tokens, positions, segment_ids):
    return nnx.merge(graphdef, state)(tokens, positions, segment_ids)

  as_i32 = lambda x: jnp.asarray(np.asarray(x), jnp.int32)
  return np.asarray(forward(state, as_i32(tokens), as_i32(positions), as_i32(segment_ids)))


@pytest.mark.parametrize('padding', ['right', 'left'])
@pytest.mark.parametrize('name', ['qwen2', 'qwen2_sliding', 'qwen3', 'qwen3_yarn', 'llama3', 'mistral',
                                  'llama_tied'])
def test_logits_match_transformers(tiny_hf, name, padding):
  hf_model = tiny_hf.model(name)
  ours = _load(tiny_hf, hf_model)
  tokens, mask, positions = tiny_hf.batch(padding)
  expected = tiny_hf.logits(hf_model, tokens, mask, positions)
  got = _logits(ours, tokens, positions, mask)
  assert got.dtype == np.float32 and got.shape == expected.shape
  real = mask > 0
  assert np.abs(expected[real]).max() > 1.0  # The comparison below is not vacuous.
  np.testing.assert_allclose(got[real], expected[real], rtol=0, atol=ATOL)
  assert np.isfinite(got).all()  # Padding positions: garbage, but finite.


def test_sliding_window_actually_limits_attention(tiny_hf):
  """The Mistral window (5) is shorter than the sequence: a full-attention model gives other logits."""
  hf_model = tiny_hf.model('mistral')
  path = tiny_hf.save(hf_model)
  cfg = hf_config.model_config_from_hf(hf_config.read_hf_config(path))
  assert cfg.sliding_windows == (5, 5)
  tokens, mask, positions = tiny_hf.batch('right')
  windowed = _logits(hf.load_pretrained(path, cfg), tokens, positions, mask)
  full = _logits(hf.load_pretrained(path, transformer.ModelConfig(**{**cfg.__dict__, 'sliding_windows': None})),
                 tokens, positions, mask)
  np.testing.assert_array_equal(windowed[:, :5], full[:, :5])  # Inside the window: identical.
  assert np.abs(windowed[0, 5:9] - full[0, 5:9]).max() > 1e-2


def test_sliding_window_convention_is_transformers():
  """Our mask equals transformers' sliding_window_causal_mask_function (kv_idx > q_idx - window)."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import masking_utils  # pylint: disable=import-outside-toplevel
  t, window = 9, 3
  ours = np.asarray(attention.make_mask(jnp.ones((1, t), jnp.int32), window))[0, 0]
  theirs_fn = masking_utils.sliding_window_causal_mask_function(window)
  idx = [torch.tensor(i) for i in range(t)]
  theirs = np.array([[bool(theirs_fn(idx[0], idx[0], idx[q], idx[k])) for k in range(t)] for q in range(t)])
  np.testing.assert_array_equal(ours, theirs)
  assert ours[5, 3] and not ours[5, 2]  # q - k < window: 3 keys including the query itself.


def test_mask_separates_segments_and_keeps_the_diagonal():
  seg = jnp.asarray([[1, 1, 2, 2, 0, 0]], jnp.int32)
  mask = np.asarray(attention.make_mask(seg, None))[0, 0]
  expected = np.array([[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [0, 0, 1, 0, 0, 0],
                       [0, 0, 1, 1, 0, 0],
                       [0, 0, 0, 0, 1, 0],
                       [0, 0, 0, 0, 1, 1]], bool)
  np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize('name', ['qwen3', 'mistral', 'qwen2_sliding'])
def test_packed_row_equals_documents_alone(tiny_hf, name):
  hf_model = tiny_hf.model(name)
  ours = _load(tiny_hf, hf_model)
  rng = np.random.RandomState(1)
  doc_a, doc_b = rng.randint(0, tiny_hf.vocab_size, 5), rng.randint(0, tiny_hf.vocab_size, 6)
  t = 12
  packed = np.zeros((1, t), np.int64)
  packed[0, :11] = np.concatenate([doc_a, doc_b])
  seg = np.array([[1] * 5 + [2] * 6 + [0]])
  pos = np.array([list(range(5)) + list(range(6)) + [0]])
  got = _logits(ours, packed, pos, seg)[0]
  for doc, start in ((doc_a, 0), (doc_b, 5)):
    n = len(doc)
    alone_tokens = np.zeros((1, t), np.int64)
    alone_tokens[0, :n] = doc
    alone_seg = (np.arange(t) < n).astype(np.int64)[None]
    alone_pos = np.where(alone_seg > 0, np.arange(t), 0)
    alone = _logits(ours, alone_tokens, alone_pos, alone_seg)[0, :n]
    np.testing.assert_allclose(got[start:start + n], alone, rtol=0, atol=1e-5)
    theirs = tiny_hf.logits(hf_model, doc[None])[0]
    np.testing.assert_allclose(got[start:start + n], theirs, rtol=0, atol=ATOL)


def test_packed_row_matches_transformers_packed_position_ids(tiny_hf):
  """transformers detects packing from restarting position_ids (no attention_mask): same logits."""
  hf_model = tiny_hf.model('qwen2_sliding')
  ours = _load(tiny_hf, hf_model)
  rng = np.random.RandomState(2)
  tokens = rng.randint(0, tiny_hf.vocab_size, (1, 12))
  seg = np.array([[1] * 7 + [2] * 5])
  pos = np.array([list(range(7)) + list(range(5))])
  np.testing.assert_allclose(_logits(ours, tokens, pos, seg), tiny_hf.logits(hf_model, tokens, positions=pos),
                             rtol=0, atol=ATOL)


def test_remat_full_gives_same_logits_and_gradients(tiny_hf):
  """The forward pass is bit-identical; gradients agree to float32 reassociation noise.

  Under jax.grad, XLA fuses the non-remat program differently (it keeps residuals), which moves its logits
  by ~1e-6 from its own forward-only program, as much as jit vs op-by-op execution does; so gradients are
  compared at 1e-5 of their scale, i.e. well below any real difference.
  """
  hf_model = tiny_hf.model('qwen3')
  path = tiny_hf.save(hf_model)
  hf_cfg = hf_config.read_hf_config(path)
  tokens, mask, positions = tiny_hf.batch('right')
  weights = jnp.asarray(np.random.RandomState(3).randn(*tokens.shape, tiny_hf.vocab_size), jnp.float32)
  results = []
  for remat in ('none', 'full'):
    model = hf.load_pretrained(path, hf_config.model_config_from_hf(hf_cfg, remat=remat))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def forward(p, graphdef=graphdef, rest=rest):
      return nnx.merge(graphdef, p, rest)(jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32),
                                          jnp.asarray(mask, jnp.int32))

    grads = jax.jit(jax.grad(lambda p, f=forward: jnp.sum(f(p) * weights)))(params)
    results.append((np.asarray(jax.jit(forward)(params)), jax.tree.leaves(jax.tree.map(np.asarray, grads))))
  (logits_none, grads_none), (logits_full, grads_full) = results
  np.testing.assert_array_equal(logits_full, logits_none)
  assert len(grads_none) == len(grads_full) == len(jax.tree.leaves(params))
  for g_none, g_full in zip(grads_none, grads_full):
    scale = np.abs(g_none).max()
    assert scale > 0
    np.testing.assert_allclose(g_full, g_none, rtol=0, atol=1e-5 * scale)


def test_remat_full_rematerialises(tiny_hf):
  """remat='full' puts a checkpoint (remat) per layer into the traced program; 'none' has none."""
  cfg = hf_config.model_config_from_hf(tiny_hf.model('qwen2').config.to_dict())
  tokens = jnp.zeros((1, 4), jnp.int32)

  def grad_jaxpr(remat):
    remat_cfg = transformer.ModelConfig(**{**cfg.__dict__, 'remat': remat})
    graphdef, params = nnx.split(nnx.eval_shape(lambda: transformer.Transformer(remat_cfg, rngs=nnx.Rngs(0))))
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens, tokens, tokens + 1))
    return str(jax.make_jaxpr(jax.grad(loss))(params))

  full, none = grad_jaxpr('full'), grad_jaxpr('none')
  assert full.count('remat') + full.count('checkpoint') >= cfg.num_layers
  assert 'remat' not in none and 'checkpoint' not in none


_ROPE_CASES = {
    'default': dict(head_dim=128, rope_theta=1e6, rope_parameters={'rope_type': 'default'}),
    'linear': dict(head_dim=64, rope_theta=10000.0, rope_parameters={'rope_type': 'linear', 'factor': 2.5}),
    'llama3.1': dict(head_dim=128, rope_theta=500000.0, rope_parameters={
        'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
        'original_max_position_embeddings': 8192}),
    'yarn': dict(head_dim=128, rope_theta=1e6, rope_parameters={
        'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 32768}),
    'yarn_mscale': dict(head_dim=64, rope_theta=10000.0, rope_parameters={
        'rope_type': 'yarn', 'factor': 40.0, 'original_max_position_embeddings': 4096, 'mscale': 1.0,
        'mscale_all_dim': 0.5, 'beta_fast': 16, 'beta_slow': 2, 'truncate': False}),
}


@pytest.mark.parametrize('case', sorted(_ROPE_CASES))
def test_rope_frequencies_equal_transformers(case):
  pytest.importorskip('torch', reason="transformers' RoPE functions compute in torch")
  import transformers  # pylint: disable=import-outside-toplevel
  from transformers import modeling_rope_utils  # pylint: disable=import-outside-toplevel
  spec = _ROPE_CASES[case]
  params = {**spec['rope_parameters'], 'rope_theta': spec['rope_theta']}
  config = transformers.LlamaConfig(hidden_size=spec['head_dim'] * 4, num_attention_heads=4,
                                    head_dim=spec['head_dim'], max_position_embeddings=131072,
                                    rope_parameters=dict(params))
  rope_type = params['rope_type']
  if rope_type == 'default':
    inv_freq, scaling = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(
        config)
  else:
    inv_freq, scaling = modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope_type](config)
  cfg = hf_config.model_config_from_hf({**config.to_dict(), 'model_type': 'llama'})
  ours, our_scaling = rope.rope_frequencies(cfg)
  assert ours.dtype == np.float32
  # torch computes base ** x with a vectorised float32 pow that is not correctly rounded: within 1 ulp.
  np.testing.assert_array_max_ulp(ours, inv_freq.numpy(), maxulp=1)
  assert our_scaling == pytest.approx(scaling, rel=1e-12)
  if rope_type != 'default':
    default, _ = rope.rope_frequencies(transformer.ModelConfig(**{**cfg.__dict__, 'rope_scaling': None}))
    assert not np.array_equal(ours, default)  # The scaling did something.


@pytest.mark.parametrize('rope_type', ['dynamic', 'longrope', 'made_up'])
def test_unimplemented_rope_types_raise(rope_type):
  with pytest.raises(InputError, match=rope_type):
    transformer.ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                            num_kv_heads=1, head_dim=4, rope_scaling=(('factor', 2.0), ('rope_type', rope_type)))


def test_bad_model_settings_raise_input_error():
  base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
              head_dim=4)
  with pytest.raises(InputError, match='model.attention_impl'):
    transformer.ModelConfig(**base, attention_impl='flash')  # Not a name (cudnn-on-CPU: test_attention.py).
  with pytest.raises(InputError, match='model.remat'):
    transformer.ModelConfig(**base, remat='sometimes')
  with pytest.raises(InputError, match='num_kv_heads'):
    transformer.ModelConfig(**{**base, 'num_kv_heads': 3})
  with pytest.raises(InputError, match='sliding_windows'):
    transformer.ModelConfig(**base, sliding_windows=(4, 4))
  with pytest.raises(InputError, match='model.attention_impl'):
    attention.attention(jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 2, 1, 4)), jnp.zeros((1, 2, 1, 4)),
                        jnp.ones((1, 2), jnp.int32), sliding_window=None, impl='splash')


# Logical axis names by parameter (path without the layer index).
_AXES = {
    'embed_tokens.embedding': ('vocab', 'embed'),
    'self_attn.q_proj.kernel': ('embed', 'q_heads', 'head_dim'),
    'self_attn.k_proj.kernel': ('embed', 'kv_heads', 'head_dim'),
    'self_attn.v_proj.kernel': ('embed', 'kv_heads', 'head_dim'),
    'self_attn.o_proj.kernel': ('q_heads', 'head_dim', 'embed'),
    'self_attn.q_proj.bias': ('q_heads', 'head_dim'),
    'self_attn.k_proj.bias': ('kv_heads', 'head_dim'),
    'self_attn.v_proj.bias': ('kv_heads', 'head_dim'),
    'self_attn.o_proj.bias': ('embed',),
    'self_attn.q_norm.scale': ('norm',),
    'self_attn.k_norm.scale': ('norm',),
    'input_layernorm.scale': ('norm',),
    'post_attention_layernorm.scale': ('norm',),
    'mlp.gate_proj.kernel': ('embed', 'mlp'),
    'mlp.up_proj.kernel': ('embed', 'mlp'),
    'mlp.down_proj.kernel': ('mlp', 'embed'),
    'mlp.gate_proj.bias': ('mlp',),
    'mlp.up_proj.bias': ('mlp',),
    'mlp.down_proj.bias': ('embed',),
    'norm.scale': ('norm',),
    'lm_head.kernel': ('embed', 'vocab'),
}


@pytest.mark.parametrize('name', ['llama3', 'qwen3', 'llama_tied'])
def test_every_parameter_has_logical_axis_names(tiny_hf, name):
  path = tiny_hf.save(tiny_hf.model(name))
  cfg = hf_config.model_config_from_hf(hf_config.read_hf_config(path))
  abstract = nnx.eval_shape(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0)))
  for model in (abstract, hf.load_pretrained(path, cfg)):
    seen = set()
    for param_path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      key = '.'.join(str(p) for p in (param_path[2:] if param_path[0] == 'layers' else param_path))
      names = variable.get_metadata().get('out_sharding')
      assert names == _AXES[key], key
      assert len(names) == len(variable.shape), key
      seen.add(key)
    assert ('lm_head.kernel' in seen) == (not cfg.tie_word_embeddings)
    assert ('self_attn.q_norm.scale' in seen) == cfg.qk_norm
    assert ('mlp.down_proj.bias' in seen) == cfg.mlp_bias


@pytest.mark.parametrize('name', ['qwen2', 'llama_tied'])
def test_hidden_states_times_unembedding_are_the_logits(tiny_hf, name):
  """The trainer's chunked loss uses hidden_states() and unembedding() instead of __call__."""
  model = _load(tiny_hf, tiny_hf.model(name))
  tokens, mask, positions = tiny_hf.batch('left')
  args = [jnp.asarray(x, jnp.int32) for x in (tokens, positions, mask)]
  hidden = model.hidden_states(*args)
  unembedding = model.unembedding()
  assert hidden.shape == (*tokens.shape, model.cfg.hidden_size)
  assert unembedding.shape == (model.cfg.hidden_size, model.cfg.vocab_size)
  np.testing.assert_allclose(np.asarray(hidden @ unembedding), np.asarray(model(*args)), rtol=0, atol=1e-5)


def test_model_builds_without_a_mesh_and_under_one(tiny_hf):
  """Logical names are metadata only: building needs no mesh or axis rules, nor fails under a mesh."""
  cfg = hf_config.model_config_from_hf(tiny_hf.model('qwen2').config.to_dict())
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ('data', 'fsdp', 'tensor'),
                           axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    model = hf.init_random(cfg, 0)
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  assert specs['embed_tokens']['embedding'].get_value() == jax.sharding.PartitionSpec('vocab', 'embed')


def test_init_random_is_seeded_and_hf_like(tiny_hf):
  cfg = hf_config.model_config_from_hf(tiny_hf.model('llama3').config.to_dict())
  a, b, c = hf.init_random(cfg, 0), hf.init_random(cfg, 0), hf.init_random(cfg, 1)
  ta, tb, tc = hf.to_hf_tensors(a), hf.to_hf_tensors(b), hf.to_hf_tensors(c)
  assert all(np.array_equal(ta[k], tb[k]) for k in ta)
  assert not np.array_equal(ta['model.embed_tokens.weight'], tc['model.embed_tokens.weight'])
  assert np.all(ta['model.norm.weight'] == 1) and np.all(ta['model.layers.0.self_attn.q_proj.bias'] == 0)
  assert abs(float(ta['model.layers.0.mlp.up_proj.weight'].std()) - transformer.INIT_STD) < 0.002


def test_bfloat16_compute_matches_transformers_in_bfloat16(tiny_hf):
  """dtype='bfloat16' with float32 master weights tracks transformers run in bfloat16.

  Both round activations to bfloat16 (8 mantissa bits) at different points, so they agree to bfloat16
  precision, not to 1e-4; a float32 run of the same weights is the yardstick for that precision.
  """
  import torch  # pylint: disable=import-outside-toplevel
  hf_model = tiny_hf.model('qwen3')
  hf_model = hf_model.to(torch.bfloat16).to(torch.float32)  # Weights exactly representable in bfloat16.
  path = tiny_hf.save(hf_model)
  model = hf.load_pretrained(path, hf_config.model_config_from_hf(hf_config.read_hf_config(path), dtype='bfloat16'))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  tokens, mask, positions = tiny_hf.batch('right')
  hidden = model.hidden_states(jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32),
                               jnp.asarray(mask, jnp.int32))
  assert hidden.dtype == jnp.bfloat16 and model.unembedding().dtype == jnp.bfloat16
  got = _logits(model, tokens, positions, mask)
  assert got.dtype == np.float32 and np.isfinite(got).all()
  theirs_bf16 = tiny_hf.logits(hf_model.to(torch.bfloat16), tokens, mask, positions)
  theirs_f32 = tiny_hf.logits(hf_model.to(torch.float32), tokens, mask, positions)
  real = mask > 0
  bf16_error = np.abs(theirs_bf16 - theirs_f32)[real].max()  # How far bfloat16 rounding moves the logits.
  assert bf16_error > 1e-3
  assert np.abs(got - theirs_bf16)[real].max() <= 2 * bf16_error
  assert np.abs(got - theirs_f32)[real].max() <= 2 * bf16_error
