"""Hugging Face conversion: config.json interpretation, safetensors loading and saving, and bad input."""

import json
import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jaxsft.errors import InputError
from jaxsft.models import hf
from jaxsft.models import hf_config
from jaxsft.models import hf_layout
from jaxsft.models import rope

ATOL = 1e-4


def _ours(path, **cfg_overrides):
  return hf.load_pretrained(path, hf_config.model_config_from_hf(hf_config.read_hf_config(path), **cfg_overrides))


def _logits(model, tokens, mask, positions):
  as_i32 = lambda x: np.asarray(x, np.int32)
  return np.asarray(jax.jit(lambda a, b, c: model(a, b, c))(as_i32(tokens), as_i32(positions), as_i32(mask)))


def _st_tensors(path: pathlib.Path) -> dict:
  """All tensors of a HF model directory, read with safetensors' own torch reader (independent of ours)."""
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  out = {}
  for file in sorted(path.glob('*.safetensors')):
    out.update(load_file(file))
  return out


def _perturb(model, seed: int):
  """Moves every parameter away from the checkpoint it was loaded from."""
  rng = np.random.RandomState(seed)
  state = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda x: x + rng.normal(0, 0.1, x.shape).astype(np.float32), state))


# ----------------------------------------------------------------------------------------------------------
# config.json → ModelConfig, against what transformers' own classes make of the same file.

_SMALL = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, hidden_act='silu')
_CONFIG_CASES = {
    # Qwen2.5 on the hub: window fields present but off, old top-level rope_theta, no layer_types.
    'qwen2.5_hub': dict(model_type='qwen2', use_sliding_window=False, sliding_window=32768, max_window_layers=1,
                        rope_theta=1e6, tie_word_embeddings=True),
    'qwen2_window_from_max_window_layers': dict(model_type='qwen2', use_sliding_window=True, sliding_window=8,
                                                max_window_layers=1),
    'qwen3_explicit_layer_types': dict(model_type='qwen3', use_sliding_window=True, sliding_window=8, head_dim=16,
                                       layer_types=['sliding_attention', 'full_attention', 'sliding_attention']),
    'qwen3_default_head_dim': dict(model_type='qwen3', attention_bias=True),
    'mistral_default_window': dict(model_type='mistral'),
    'mistral_no_window': dict(model_type='mistral', sliding_window=None, head_dim=16),
    'llama3_old_rope_scaling': dict(model_type='llama', rope_theta=500000.0, mlp_bias=True, rope_scaling={
        'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
        'original_max_position_embeddings': 64}),
    'llama_linear_old_type_key': dict(model_type='llama', rope_theta=10000.0,
                                      rope_scaling={'type': 'linear', 'factor': 2.0}),
    'qwen2_yarn_no_original': dict(model_type='qwen2', rope_parameters={'rope_type': 'yarn', 'factor': 4.0,
                                                                        'rope_theta': 1e6}),
}


@pytest.mark.parametrize('case', sorted(_CONFIG_CASES))
def test_config_interpretation_matches_transformers(case):
  import transformers  # pylint: disable=import-outside-toplevel
  raw = {**_SMALL, **_CONFIG_CASES[case]}
  ours = hf_config.model_config_from_hf(json.loads(json.dumps(raw)))
  config = transformers.CONFIG_MAPPING[raw['model_type']].from_dict(json.loads(json.dumps(raw)))
  model = transformers.AutoModelForCausalLM.from_config(config)
  layers = model.model.layers
  attn = layers[0].self_attn
  assert ours.num_layers == len(layers) and ours.vocab_size == config.vocab_size
  assert ours.head_dim == attn.head_dim
  assert ours.num_heads * ours.head_dim == attn.q_proj.out_features
  assert ours.num_kv_heads * ours.head_dim == attn.k_proj.out_features
  assert ours.qkv_bias == (attn.q_proj.bias is not None) == (attn.k_proj.bias is not None)
  assert ours.o_bias == (attn.o_proj.bias is not None)
  assert ours.mlp_bias == (layers[0].mlp.up_proj.bias is not None)
  assert ours.qk_norm == hasattr(attn, 'q_norm')
  assert ours.tie_word_embeddings == config.tie_word_embeddings
  assert ours.rms_norm_eps == config.rms_norm_eps
  if raw['model_type'] == 'mistral':  # MistralAttention masks every layer with config.sliding_window.
    theirs_windows = [config.sliding_window] * len(layers)
  else:
    theirs_windows = [getattr(layer.self_attn, 'sliding_window', None) for layer in layers]
  assert list(ours.sliding_windows or [None] * ours.num_layers) == theirs_windows
  inv_freq, scaling = rope.rope_frequencies(ours)
  np.testing.assert_array_max_ulp(inv_freq, model.model.rotary_emb.inv_freq.numpy(), maxulp=1)
  assert scaling == pytest.approx(model.model.rotary_emb.attention_scaling, rel=1e-12)


def test_config_json_written_by_transformers_round_trips(tiny_hf):
  path = tiny_hf.save(tiny_hf.model('llama3'))
  cfg = hf_config.model_config_from_hf(hf_config.read_hf_config(path), dtype='bfloat16', remat='full')
  assert cfg.dtype == 'bfloat16' and cfg.param_dtype == 'float32' and cfg.remat == 'full'
  assert dict(cfg.rope_scaling)['rope_type'] == 'llama3' and cfg.qkv_bias and cfg.o_bias and cfg.mlp_bias
  hash(cfg)  # Usable as a static jit argument.


@pytest.mark.parametrize('change, field', [
    (dict(model_type='gpt2'), 'gpt2'),
    (dict(model_type=None), 'model_type'),
    (dict(hidden_act='gelu'), 'hidden_act'),
    (dict(hidden_size=None), 'hidden_size'),
    (dict(num_key_value_heads=3), 'num_key_value_heads'),
    (dict(rope_parameters={'rope_type': 'dynamic', 'factor': 2.0}), 'dynamic'),
    (dict(rope_parameters={'rope_type': 'default', 'partial_rotary_factor': 0.5}), 'partial_rotary_factor'),
    (dict(model_type='qwen2', layer_types=['sliding_attention'] * 3), 'sliding_window'),
    (dict(model_type='qwen2', layer_types=['full_attention']), 'layer_types'),
])
def test_bad_config_raises_input_error_naming_the_field(change, field):
  raw = {**_SMALL, 'model_type': 'llama', **change}
  with pytest.raises(InputError, match=field):
    hf_config.model_config_from_hf(raw)


# ----------------------------------------------------------------------------------------------------------
# Model directories.


def test_resolve_model_dir(tmp_path):
  (tmp_path / 'config.json').write_text('{}')
  assert hf_config.resolve_model_dir(str(tmp_path)) == tmp_path.resolve()
  missing = tmp_path / 'no_such_model'
  with pytest.raises(InputError, match=f"model_name_or_path.*{missing}"):
    hf_config.resolve_model_dir(str(missing))
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(InputError, match=f'model_name_or_path.*{empty}.*config.json'):
    hf_config.resolve_model_dir(str(empty))
  assert hf_config.resolve_model_dir(str(empty), require_config=False) == empty.resolve()
  with pytest.raises(InputError, match='tokenizer_name_or_path'):
    hf_config.resolve_model_dir(str(missing), field='tokenizer_name_or_path')
  with pytest.raises(InputError, match='is a file'):
    hf_config.resolve_model_dir(str(tmp_path / 'config.json'))


def test_unreachable_hub_id_raises_input_error():
  name = 'jaxsft-test-org/this-model-does-not-exist-8f3a1c'
  with pytest.raises(InputError, match=f'model_name_or_path.*{name}'):
    hf_config.resolve_model_dir(name)


def test_read_hf_config_errors(tmp_path):
  with pytest.raises(InputError, match='config.json'):
    hf_config.read_hf_config(tmp_path)
  (tmp_path / 'config.json').write_text('{"model_type": ')
  with pytest.raises(InputError, match='config.json: malformed JSON'):
    hf_config.read_hf_config(tmp_path)
  (tmp_path / 'config.json').write_text('[1, 2]')
  with pytest.raises(InputError, match='config.json'):
    hf_config.read_hf_config(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Loading.


def test_sharded_checkpoint_with_index_loads(tiny_hf):
  hf_model = tiny_hf.model('qwen2')
  path = tiny_hf.save(hf_model, max_shard_size='40KB')
  assert (path / hf.INDEX_FILE).exists() and len(list(path.glob('model-*.safetensors'))) > 1
  assert not (path / hf.SINGLE_FILE).exists()
  ours = _ours(path)
  tokens, mask, positions = tiny_hf.batch('right')
  real = mask > 0
  np.testing.assert_allclose(_logits(ours, tokens, mask, positions)[real],
                             tiny_hf.logits(hf_model, tokens, mask, positions)[real], rtol=0, atol=ATOL)
  theirs = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  for name, value in hf.to_hf_tensors(ours).items():
    np.testing.assert_array_equal(value, theirs[name], err_msg=name)


@pytest.mark.parametrize('param_dtype', ['float32', 'bfloat16'])
def test_bfloat16_checkpoint_loads(tiny_hf, param_dtype):
  import torch  # pylint: disable=import-outside-toplevel
  hf_model = tiny_hf.model('qwen3').to(torch.bfloat16)
  path = tiny_hf.save(hf_model)
  header = json.loads((path / hf.SINGLE_FILE).read_bytes()[8:8 + int.from_bytes(
      (path / hf.SINGLE_FILE).read_bytes()[:8], 'little')])
  assert {v['dtype'] for k, v in header.items() if k != '__metadata__'} == {'BF16'}
  ours = _ours(path, param_dtype=param_dtype)
  tensors = hf.to_hf_tensors(ours)
  assert {v.dtype for v in tensors.values()} == {np.dtype(ml_dtypes.bfloat16 if param_dtype == 'bfloat16'
                                                          else np.float32)}
  for name, value in hf_model.state_dict().items():
    np.testing.assert_array_equal(tensors[name].astype(np.float32), value.float().numpy(), err_msg=name)


def _rewrite_checkpoint(path: pathlib.Path, edit) -> None:
  from safetensors.torch import load_file, save_file  # pylint: disable=import-outside-toplevel
  tensors = load_file(path / hf.SINGLE_FILE)
  edit(tensors)
  save_file(tensors, path / hf.SINGLE_FILE, metadata={'format': 'pt'})


def test_missing_tensor_raises_naming_tensor_and_file(tiny_hf):
  path = tiny_hf.save(tiny_hf.model('qwen2'))
  _rewrite_checkpoint(path, lambda t: t.pop('model.layers.1.mlp.up_proj.weight'))
  with pytest.raises(InputError, match=r"'model.layers.1.mlp.up_proj.weight' is missing from model.safetensors"):
    _ours(path)


def test_wrongly_shaped_tensor_raises(tiny_hf):
  import torch  # pylint: disable=import-outside-toplevel
  path = tiny_hf.save(tiny_hf.model('qwen2'))
  _rewrite_checkpoint(path, lambda t: t.update({'model.layers.0.self_attn.k_proj.weight': torch.zeros(16, 64)}))
  with pytest.raises(InputError, match=r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' has "
                                       r'shape \[16, 64\], expected \[32, 64\]'):
    _ours(path)


def test_unexpected_tensor_raises_but_tied_lm_head_is_ignored(tiny_hf):
  import torch  # pylint: disable=import-outside-toplevel
  path = tiny_hf.save(tiny_hf.model('qwen2'))
  _rewrite_checkpoint(path, lambda t: t.update({'model.layers.0.self_attn.o_proj.bias': torch.zeros(64)}))
  with pytest.raises(InputError, match="'model.layers.0.self_attn.o_proj.bias' is not part of the model"):
    _ours(path)
  hf_model = tiny_hf.model('llama_tied')
  path = tiny_hf.save(hf_model)
  assert 'lm_head.weight' not in _st_tensors(path)
  _rewrite_checkpoint(path, lambda t: t.update({'lm_head.weight': torch.zeros(tiny_hf.vocab_size, 64)}))
  tokens, mask, positions = tiny_hf.batch('left')
  real = mask > 0
  np.testing.assert_allclose(_logits(_ours(path), tokens, mask, positions)[real],
                             tiny_hf.logits(hf_model, tokens, mask, positions)[real], rtol=0, atol=ATOL)


def test_bad_checkpoint_files_raise(tiny_hf, tmp_path):
  path = tiny_hf.save(tiny_hf.model('qwen2'))
  cfg = hf_config.model_config_from_hf(hf_config.read_hf_config(path))
  no_weights = tmp_path / 'no_weights'
  no_weights.mkdir()
  with pytest.raises(InputError, match='no model.safetensors or model.safetensors.index.json'):
    hf.load_pretrained(no_weights, cfg)
  truncated = tmp_path / 'truncated'
  truncated.mkdir()
  (truncated / hf.SINGLE_FILE).write_bytes((path / hf.SINGLE_FILE).read_bytes()[:5000])
  with pytest.raises(InputError, match='truncated/model.safetensors'):
    hf.load_pretrained(truncated, cfg)
  sharded = tmp_path / 'sharded'
  sharded.mkdir()
  index = {'weight_map': {'model.norm.weight': 'model-00001-of-00002.safetensors'}}
  (sharded / hf.INDEX_FILE).write_text(json.dumps(index))
  with pytest.raises(InputError, match='model.norm.weight.*model-00001-of-00002.safetensors'):
    hf.load_pretrained(sharded, cfg)


# ----------------------------------------------------------------------------------------------------------
# Saving.


@pytest.mark.parametrize('name', ['qwen2', 'qwen3', 'llama3', 'mistral', 'llama_tied', 'qwen2_sliding'])
def test_import_then_export_reproduces_every_tensor(tiny_hf, tmp_path, name):
  source = tiny_hf.save(tiny_hf.model(name))
  hf.save_pretrained(_ours(source), hf_config.read_hf_config(source), tmp_path)
  original, exported = _st_tensors(source), _st_tensors(tmp_path)
  assert sorted(original) == sorted(exported)
  for key, value in original.items():
    assert exported[key].dtype == value.dtype
    assert np.array_equal(exported[key].numpy(), value.numpy()), key


@pytest.mark.parametrize('name', ['qwen2', 'qwen3', 'llama3', 'mistral'])
def test_export_names_its_transformers_class_even_when_the_config_does_not(tiny_hf, tmp_path, name):
  """A random-init run's config (the shipped tiny one) has no `architectures`; tools that dispatch on it (vLLM,
  lm-eval, the hub) need it: every export carries its family's *ForCausalLM class, which transformers loads."""
  import transformers  # pylint: disable=import-outside-toplevel
  hf_model = tiny_hf.model(name)
  source = tiny_hf.save(hf_model)
  hf_cfg = hf_config.read_hf_config(source)
  hf_cfg.pop('architectures', None)
  hf.save_pretrained(_ours(source), hf_cfg, tmp_path)
  written = json.loads((tmp_path / 'config.json').read_text())
  assert written['architectures'] == [type(hf_model).__name__], written.get('architectures')
  assert type(transformers.AutoModelForCausalLM.from_pretrained(tmp_path)).__name__ == type(hf_model).__name__


def test_bfloat16_import_then_export_is_exact(tiny_hf, tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  source = tiny_hf.save(tiny_hf.model('llama3').to(torch.bfloat16))
  hf.save_pretrained(_ours(source), hf_config.read_hf_config(source), tmp_path, dtype='bfloat16')
  original, exported = _st_tensors(source), _st_tensors(tmp_path)
  assert sorted(original) == sorted(exported)
  for key, value in original.items():
    assert exported[key].dtype == value.dtype == torch.bfloat16
    assert torch.equal(exported[key], value), key


@pytest.mark.parametrize('name, max_shard_bytes', [('qwen3', 5 * 2**30), ('llama_tied', 5 * 2**30),
                                                   ('qwen2', 100_000)])
def test_saved_model_loads_in_transformers_with_same_logits(tiny_hf, tmp_path, name, max_shard_bytes):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  source = tiny_hf.save(tiny_hf.model(name))
  ours = _ours(source)
  _perturb(ours, seed=1)
  hf.save_pretrained(ours, hf_config.read_hf_config(source), tmp_path, max_shard_bytes=max_shard_bytes)
  files = sorted(p.name for p in tmp_path.iterdir())
  if max_shard_bytes < 2**20:
    shards = [f for f in files if f.startswith('model-')]
    assert len(shards) > 1 and hf.INDEX_FILE in files and hf.SINGLE_FILE not in files
    index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
    assert set(index['weight_map']) == set(hf.to_hf_tensors(ours))
    for shard in shards:
      sizes = [v.nbytes for v in _st_tensors_of(tmp_path / shard).values()]
      assert sum(sizes) <= max_shard_bytes or len(sizes) == 1  # A bigger tensor gets a shard of its own.
  else:
    assert files == ['config.json', hf.SINGLE_FILE]
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['dtype'] == config['torch_dtype'] == 'float32'
  theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                             attn_implementation='eager').eval()
  tokens, mask, positions = tiny_hf.batch('left')
  real = mask > 0
  expected = _logits(ours, tokens, mask, positions)
  before = tiny_hf.logits(tiny_hf.model(name), tokens, mask, positions)
  assert np.abs(expected - before)[real].max() > 1e-2  # The perturbation is visible in the logits.
  np.testing.assert_allclose(tiny_hf.logits(theirs, tokens, mask, positions)[real], expected[real],
                             rtol=0, atol=ATOL)


def _st_tensors_of(file: pathlib.Path) -> dict:
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  return load_file(file)


def test_save_bfloat16_loads_in_transformers(tiny_hf, tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  source = tiny_hf.save(tiny_hf.model('mistral'))
  ours = _ours(source)
  hf.save_pretrained(ours, hf_config.read_hf_config(source), tmp_path, dtype='bfloat16')
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['dtype'] == config['torch_dtype'] == 'bfloat16'
  theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
  ours_tensors = hf.to_hf_tensors(ours)
  for name, value in theirs.state_dict().items():
    assert value.dtype == torch.bfloat16, name
    expected = ours_tensors[name].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(value.float().numpy(), expected, err_msg=name)


def test_save_replaces_earlier_weights_and_leaves_no_temporary_files(tiny_hf, tmp_path):
  source = tiny_hf.save(tiny_hf.model('qwen2'))
  ours, hf_cfg = _ours(source), hf_config.read_hf_config(source)
  (tmp_path / 'tokenizer.json').write_text('{}')  # Other files are left alone.
  hf.save_pretrained(ours, hf_cfg, tmp_path, max_shard_bytes=60_000)
  assert hf.INDEX_FILE in {p.name for p in tmp_path.iterdir()}
  hf.save_pretrained(ours, hf_cfg, tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json', hf.SINGLE_FILE, 'tokenizer.json']
  hf.save_pretrained(ours, hf_cfg, tmp_path, max_shard_bytes=60_000)
  names = sorted(p.name for p in tmp_path.iterdir())
  assert hf.SINGLE_FILE not in names and not any(n.startswith('.') for n in names)
  reloaded = hf.to_hf_tensors(_ours(tmp_path))
  for key, value in hf.to_hf_tensors(ours).items():
    np.testing.assert_array_equal(reloaded[key], value)


# ----------------------------------------------------------------------------------------------------------
# Sharded loading: block reads (the multi-device checks are in tests/test_sharded_load.py).


def _random_ranges(rng, shape):
  ranges = []
  for n in shape:
    a = int(rng.randint(0, n))
    ranges.append((a, int(rng.randint(a + 1, n + 1))))
  return ranges


@pytest.mark.parametrize('dtype', [np.float32, ml_dtypes.bfloat16])
def test_read_slice_reads_exactly_the_block(tmp_path, monkeypatch, dtype):
  from jaxsft.models import safetensors_io  # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(0)
  tensors = {'a': rng.normal(size=(37, 11)).astype(dtype), 'b': rng.normal(size=(5, 6, 7)).astype(dtype),
             'c': rng.normal(size=(13,)).astype(dtype)}
  safetensors_io.write_file(tmp_path / hf.SINGLE_FILE, tensors)
  reader = safetensors_io.open_checkpoint(tmp_path)
  monkeypatch.setattr(safetensors_io, 'CHUNK_BYTES', 3 * 11 * 4)  # Several chunks, the last one partial.
  for name, value in tensors.items():
    cases = [[(0, n) for n in value.shape], [(1, value.shape[0] - 1)] + [(0, n) for n in value.shape[1:]]]
    cases += [_random_ranges(rng, value.shape) for _ in range(20)]
    for ranges in cases:
      got = reader.read_slice(name, ranges)
      want = value[tuple(slice(a, b) for a, b in ranges)]
      assert got.dtype == value.dtype and got.flags.c_contiguous
      np.testing.assert_array_equal(got, want, err_msg=f'{name} {ranges}')
  with pytest.raises(ValueError, match='outside tensor'):
    reader.read_slice('a', [(0, 38), (0, 11)])


@pytest.mark.parametrize('name', ['qwen2', 'llama3', 'llama_tied'])
def test_read_block_equals_the_converted_tensor_sliced(tiny_hf, name):
  """Every parameter's block, mapped through the HF layout (transpose, head split), equals today's conversion."""
  path = tiny_hf.save(tiny_hf.model(name))
  cfg = hf_config.model_config_from_hf(hf_config.read_hf_config(path), param_dtype='bfloat16')
  reader = hf.safetensors_io.open_checkpoint(path)
  rng = np.random.RandomState(1)
  count = 0
  for param_path, variable in nnx.to_flat_state(nnx.state(hf.abstract_model(cfg), nnx.Param)):
    tensor_name = hf_layout.hf_name(param_path)  # pylint: disable=protected-access
    shape = tuple(variable.shape)
    whole = hf_layout.from_hf(param_path, reader.get(tensor_name), shape)  # pylint: disable=protected-access
    for _ in range(4):
      ranges = _random_ranges(rng, shape)
      index = tuple(slice(a, b) for a, b in ranges)
      got = hf_layout.read_block(reader, tensor_name, param_path, shape, index, np.dtype(variable.dtype))
      assert got.dtype == ml_dtypes.bfloat16 and got.shape == tuple(b - a for a, b in ranges)
      np.testing.assert_array_equal(got, whole[index].astype(ml_dtypes.bfloat16), err_msg=str(param_path))
      count += 1
  assert count >= 4 * 12


def _mesh_1():
  return jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ('data', 'fsdp', 'tensor'),
                           axis_types=(jax.sharding.AxisType.Auto,) * 3)


def test_sharded_load_on_one_device_equals_plain_load_and_checks_the_shardings_tree(tiny_hf):
  path = tiny_hf.save(tiny_hf.model('qwen2'))
  cfg = hf_config.model_config_from_hf(hf_config.read_hf_config(path))
  mesh = _mesh_1()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('fsdp'))
  params = nnx.state(hf.abstract_model(cfg), nnx.Param)
  shardings = jax.tree.map(lambda _: sharding, params)
  with jax.set_mesh(mesh):  # The abstract model must build under a global mesh too.
    model = hf.load_pretrained(path, cfg, shardings=shardings)
  plain = dict(nnx.to_flat_state(nnx.state(_ours(path), nnx.Param)))
  for param_path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    assert variable.get_value().sharding == sharding
    np.testing.assert_array_equal(np.asarray(variable.get_value()), np.asarray(plain[param_path].get_value()))
  del shardings['norm']
  with pytest.raises(ValueError, match=r"missing \['norm.scale'\]"):
    hf.load_pretrained(path, cfg, shardings=shardings)
  with pytest.raises(ValueError, match=r"missing \['norm.scale'\]"):
    hf.init_random(cfg, 0, shardings=shardings)


def test_sharded_load_still_validates_the_checkpoint(tiny_hf, tmp_path):
  from jaxsft.models import safetensors_io  # pylint: disable=import-outside-toplevel
  source = tiny_hf.save(tiny_hf.model('qwen2'))
  tensors = _st_tensors(source)
  tensors = {k: v.numpy() for k, v in tensors.items() if k != 'model.norm.weight'}
  safetensors_io.write_file(tmp_path / hf.SINGLE_FILE, tensors)
  (tmp_path / 'config.json').write_text((source / 'config.json').read_text())
  cfg = hf_config.model_config_from_hf(hf_config.read_hf_config(tmp_path))
  sharding = jax.sharding.NamedSharding(_mesh_1(), jax.sharding.PartitionSpec())
  shardings = jax.tree.map(lambda _: sharding, nnx.state(hf.abstract_model(cfg), nnx.Param))
  with pytest.raises(InputError, match="'model.norm.weight' is missing"):
    hf.load_pretrained(tmp_path, cfg, shardings=shardings)
