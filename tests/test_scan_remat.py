"""scan_layers and the named remat policies: the same model and the same numbers; less memory, flat programs.

Scanned layers are a layout: a scanned model loads the same Hugging Face weights (slice i of each stacked array
is layer i), gives the same loss and gradients, exports the same tensors and initialises to the same values
as the unscanned one, and a sharded load still reads only each device's blocks. Remat policies change what
the backward pass keeps, never its result. The 8-device sharded load runs in a subprocess of this module
(`python -m tests.test_scan_remat WORKER ...`), since the pytest process's jax has one CPU device.
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsft import sharding
from jaxsft.models import hf
from jaxsft.models import hf_config
from jaxsft.models import hf_layout
from jaxsft.models import remat
from jaxsft.models import safetensors_io
from jaxsft.models import transformer
from tests.helpers import models as models_helper

ATOL = 1e-4  # Logits against transformers (as tests/test_model.py).
SCAN_MODELS = ('qwen2', 'qwen2_sliding', 'qwen3', 'mistral', 'llama_tied')

# Model-level tests of remat: a tiny model whose activations, not its weights, dominate the backward pass.
_REMAT_CFG = transformer.ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_layers=4,
                                     num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, qk_norm=True,
                                     sliding_windows=(None, 8, 8, None))


def _cfg(cfg: transformer.ModelConfig, **changes) -> transformer.ModelConfig:
  return dataclasses.replace(cfg, **changes)


def _unstacked(state) -> dict[tuple, np.ndarray]:
  """{unscanned parameter path: value} of a model's (or gradient's) state, stacked arrays split per layer."""
  out = {}
  for path, variable in nnx.to_flat_state(state):
    value = np.asarray(variable.get_value())
    if path[0] == 'layers' and not isinstance(path[1], int):
      out.update({('layers', i, *path[1:]): value[i] for i in range(value.shape[0])})
    else:
      out[path] = value
  return out


def _batch(tiny_hf):
  """(tokens, positions, segment ids, next-token targets, loss mask) of a right-padded batch, as int32 arrays."""
  tokens, mask, positions = tiny_hf.batch('right')
  targets = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], axis=1)
  weights = np.concatenate([mask[:, 1:], np.zeros_like(mask[:, :1])], axis=1) * mask
  return [jnp.asarray(x, jnp.int32) for x in (tokens, positions, mask, targets, weights)]


def _loss_fn(model, batch):
  """(loss(params), params): the mean next-token cross-entropy over the batch's loss tokens."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens, positions, segment_ids, targets, weights = batch

  def loss(p):
    logits_BxTxV = nnx.merge(graphdef, p, rest)(tokens, positions, segment_ids)
    logp_BxT = jnp.take_along_axis(jax.nn.log_softmax(logits_BxTxV), targets[..., None], axis=-1)[..., 0]
    return -jnp.sum(logp_BxT * weights) / jnp.sum(weights)

  return loss, params


def _value_and_grads(model, batch) -> tuple[float, dict[tuple, np.ndarray]]:
  loss, params = _loss_fn(model, batch)
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return float(value), _unstacked(grads)


def _logits(model, tokens, positions, segment_ids) -> np.ndarray:
  return np.asarray(jax.jit(lambda m, *a: m(*a))(model, *(jnp.asarray(x, jnp.int32) for x in
                                                          (tokens, positions, segment_ids))))


def _assert_grads_close(got: dict, want: dict, rel: float) -> float:
  """Every gradient within `rel` x its largest magnitude of `want`'s; returns the worst such ratio seen."""
  assert got.keys() == want.keys()
  worst = 0.0
  for path, g in want.items():
    scale = np.abs(g).max()
    assert scale > 0, path
    np.testing.assert_allclose(got[path], g, rtol=0, atol=rel * scale, err_msg=str(path))
    worst = max(worst, float(np.abs(got[path] - g).max() / scale))
  print(f'worst gradient difference: {worst:.2e} of scale')
  return worst


# ----------------------------------------------------------------------------------------------------------
# scan_layers.


@pytest.mark.parametrize('name, remat', [(name, 'none') for name in SCAN_MODELS] + [('qwen2_sliding', 'full')])
def test_scanned_model_loads_the_same_weights_and_gives_the_same_loss_and_gradients(tiny_hf, name, remat):
  """Slice i of each stacked parameter is HF layer i, bit for bit; logits equal transformers'; the loss equals
  the unscanned model's within 1e-6 relative (measured: equal) and every gradient within 1e-5 of its scale
  (measured: up to 1.5e-6, float32 reassociation where XLA fuses the loop body differently from the unrolled
  layers; a wrong layer order or window moves them by O(1)).

  qwen2_sliding mixes full and windowed layers (the scan switches between them per layer), mistral has a
  window on every layer, llama_tied ties the embeddings.
  """
  hf_model = tiny_hf.model(name)
  path = tiny_hf.save(hf_model)
  hf_cfg = hf_config.read_hf_config(path)
  unscanned = hf.load_pretrained(path, hf_config.model_config_from_hf(hf_cfg, remat=remat))
  scanned = hf.load_pretrained(path, hf_config.model_config_from_hf(hf_cfg, remat=remat, scan_layers=True))
  stacked = dict(nnx.to_flat_state(nnx.state(scanned, nnx.Param)))
  assert stacked[('layers', 'mlp', 'up_proj', 'kernel')].shape[0] == unscanned.cfg.num_layers
  assert not any(isinstance(p[1], int) for p in stacked if p[0] == 'layers')  # Really stacked.
  want_params = _unstacked(nnx.state(unscanned, nnx.Param))
  got_params = _unstacked(nnx.state(scanned, nnx.Param))
  assert got_params.keys() == want_params.keys()
  for key, value in want_params.items():
    np.testing.assert_array_equal(got_params[key], value, err_msg=str(key))

  tokens, mask, positions = tiny_hf.batch('right')
  real = mask > 0
  np.testing.assert_allclose(_logits(scanned, tokens, positions, mask)[real],
                             tiny_hf.logits(hf_model, tokens, mask, positions)[real], rtol=0, atol=ATOL)
  batch = _batch(tiny_hf)
  want_loss, want_grads = _value_and_grads(unscanned, batch)
  got_loss, got_grads = _value_and_grads(scanned, batch)
  assert want_loss > 1.0
  assert got_loss == pytest.approx(want_loss, rel=1e-6, abs=0)
  _assert_grads_close(got_grads, want_grads, 1e-5)


@pytest.mark.parametrize('name', ['qwen2_sliding', 'qwen3', 'llama_tied'])
def test_export_of_a_scanned_model_reproduces_every_hf_tensor(tiny_hf, tmp_path, name):
  """save_pretrained of a scanned model writes exactly the tensors it loaded: same names, shapes, bits; and
  to_hf_tensors lists them in the unscanned model's order (so the file layout does not depend on scan)."""
  hf_model = tiny_hf.model(name)
  path = tiny_hf.save(hf_model)
  hf_cfg = hf_config.read_hf_config(path)
  scanned = hf.load_pretrained(path, hf_config.model_config_from_hf(hf_cfg, scan_layers=True))
  out = tmp_path / 'export'
  hf.save_pretrained(scanned, hf_cfg, out, max_shard_bytes=40_000)  # Several shards: the index too.
  reader = safetensors_io.open_checkpoint(out)
  original = {k: v.numpy() for k, v in hf_model.state_dict().items()
              if not (scanned.cfg.tie_word_embeddings and k == 'lm_head.weight')}
  assert len(reader.names()) > 2 * scanned.cfg.num_layers
  assert sorted(reader.names()) == sorted(original)
  for key, value in original.items():
    np.testing.assert_array_equal(reader.get(key), value, err_msg=key)
  unscanned = hf.load_pretrained(path, hf_config.model_config_from_hf(hf_cfg))
  assert list(hf.to_hf_tensors(scanned)) == list(hf.to_hf_tensors(unscanned))


def test_init_random_gives_the_same_weights_scanned_or_not():
  """One seed, one model: the scanned init stacks exactly the unscanned init's layers."""
  cfg = _cfg(_REMAT_CFG, num_layers=3, sliding_windows=(None, 8, 8))
  plain = hf.to_hf_tensors(hf.init_random(cfg, 7))
  scanned = hf.to_hf_tensors(hf.init_random(_cfg(cfg, scan_layers=True), 7))
  assert list(scanned) == list(plain)
  for key, value in plain.items():
    np.testing.assert_array_equal(scanned[key], value, err_msg=key)
  assert not np.array_equal(plain['model.layers.0.mlp.up_proj.weight'], plain['model.layers.1.mlp.up_proj.weight'])


def test_stacked_parameters_carry_the_layers_axis_and_it_is_replicated():
  """Every stacked parameter's logical names are ('layers', *its unstacked names); the sharding rules leave
  the layers axis unsharded and shard the rest as they shard the unstacked parameter."""
  cfg = _cfg(_REMAT_CFG, num_layers=3, sliding_windows=(None, 8, 8))
  plain = {p: v.get_metadata()['out_sharding']
           for p, v in nnx.to_flat_state(nnx.state(hf.abstract_model(cfg), nnx.Param))}
  stacked = nnx.to_flat_state(nnx.state(hf.abstract_model(_cfg(cfg, scan_layers=True)), nnx.Param))
  mesh = type('FakeMesh', (), {'shape': {'data': 1, 'fsdp': 4, 'tensor': 2}})()  # Only .shape is read.
  checked = 0
  for path, variable in stacked:
    names = variable.get_metadata()['out_sharding']
    if path[0] != 'layers':
      assert names == plain[path]
      continue
    assert variable.shape[0] == cfg.num_layers and len(names) == len(variable.shape)
    assert names == ('layers', *plain[('layers', 0, *path[1:])]), path
    spec = sharding.logical_to_spec(names, variable.shape, mesh)
    assert spec[0] is None
    assert tuple(spec[1:]) == tuple(sharding.logical_to_spec(names[1:], variable.shape[1:], mesh)), path
    checked += 1
  assert checked == len([p for p in plain if p[0] == 'layers']) // cfg.num_layers


def _grad_hlo_chars(cfg: transformer.ModelConfig) -> int:
  """Characters of the lowered (StableHLO) program of the loss gradient."""
  graphdef, params = nnx.split(hf.abstract_model(cfg), nnx.Param)
  tokens = jnp.zeros((2, 64), jnp.int32)
  loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens, tokens, tokens + 1))
  return len(jax.jit(jax.grad(loss)).lower(params).as_text())


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_scanned_program_size_is_flat_in_depth(remat):
  """With scan_layers the gradient program of 8 layers is the size of 2 layers' (within 2%: the layer count
  and per-layer window indices are constants in it); unscanned, it grows with the layer count (> 3x)."""
  def chars(layers, scan):
    windows = tuple(None if i % 2 else 8 for i in range(layers))  # Mixed windows: the switch is in it too.
    return _grad_hlo_chars(_cfg(_REMAT_CFG, num_layers=layers, sliding_windows=windows, scan_layers=scan,
                                remat=remat))

  scanned_2, scanned_8 = chars(2, True), chars(8, True)
  plain_2, plain_8 = chars(2, False), chars(8, False)
  assert scanned_8 <= 1.02 * scanned_2, (scanned_2, scanned_8)
  assert plain_8 > 3 * plain_2, (plain_2, plain_8)


# ----------------------------------------------------------------------------------------------------------
# Remat policies.


def _remat_batch(length: int = 32):
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, _REMAT_CFG.vocab_size, (2, length))
  segment_ids = np.array([[1] * (length // 2) + [2] * (length // 2), [1] * (length - 5) + [0] * 5])
  positions = np.concatenate([np.arange(length // 2)] * 2)[None].repeat(2, 0)
  positions[1] = np.where(segment_ids[1] > 0, np.arange(length), 0)
  weights = (segment_ids > 0) & (np.roll(segment_ids, -1, axis=1) == segment_ids)
  return [jnp.asarray(x, jnp.int32) for x in (tokens, positions, segment_ids, np.roll(tokens, -1, axis=1), weights)]


@pytest.mark.parametrize('scan', [False, True])
def test_every_remat_policy_gives_the_gradients_of_none(scan):
  """Every policy in REMAT_POLICIES gives the loss and gradients of 'none' (packed rows, mixed windows).

  XLA fuses a recomputed program differently from one that keeps residuals (tests/test_model.py's remat test
  explains it), which moves gradients by float32 reassociation noise: measured up to 9.3e-7 of their scale
  unscanned and 1.9e-7 scanned. The bounds, 3e-6 and 1e-6 of scale, are far below any real difference (a
  wrong or stale residual moves gradients by O(1) of their scale).
  """
  rel = 1e-6 if scan else 3e-6
  batch = _remat_batch()
  cfg = _cfg(_REMAT_CFG, num_layers=2, sliding_windows=(None, 8), scan_layers=scan)
  weights = nnx.state(hf.init_random(cfg, 0))
  results = {}
  for policy in remat.REMAT_POLICIES:
    graphdef = nnx.graphdef(hf.abstract_model(_cfg(cfg, remat=policy)))
    model = nnx.merge(graphdef, weights)
    assert model.cfg.remat == policy
    results[policy] = _value_and_grads(model, batch)
  want_loss, want_grads = results['none']
  assert want_loss > 1.0
  for policy, (loss, grads) in results.items():
    assert loss == pytest.approx(want_loss, rel=1e-6, abs=0), policy
    _assert_grads_close(grads, want_grads, rel)


def _saved_residuals(cfg: transformer.ModelConfig) -> list[str]:
  """jax.ad_checkpoint.print_saved_residuals of the loss gradient, one line per residual (params excluded)."""
  graphdef, params = nnx.split(hf.abstract_model(cfg), nnx.Param)
  tokens, positions, segment_ids, _, _ = _remat_batch()
  loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens, positions, segment_ids))
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(loss, params)
  return [line for line in out.getvalue().splitlines() if 'from the argument' not in line]


_DTYPE_BYTES = {'f32': 4, 'bf16': 2, 'f16': 2, 'i32': 4, 'bool': 1, 'u32': 4}


def _residual_bytes(lines: list[str], *, host: bool = False) -> int:
  """Bytes of the residuals kept in device memory (or, with host=True, offloaded to host memory)."""
  total = 0
  for line in lines:
    match = re.match(r'(\w+)(<host>)?\[([\d,]*)\]', line)
    assert match, line
    if bool(match.group(2)) == host:
      total += _DTYPE_BYTES[match.group(1)] * math.prod(int(d) for d in match.group(3).split(',') if d)
  return total


# What each policy keeps per layer: the tagged values the backward pass reads. 'mlpwo' (down_proj's output)
# is never kept, even where saveable: it only enters the residual sum, whose derivative does not need it.
_KEPT = {
    'full': (),
    'save_out_proj': ('out_proj',),
    'save_qkv_proj': ('query_proj', 'key_proj', 'value_proj'),
    'save_dot_except_mlp': ('query_proj', 'key_proj', 'value_proj', 'out_proj'),
    'save_dot_except_mlpwi': ('query_proj', 'key_proj', 'value_proj', 'out_proj'),
    'save_dot_with_context_except_mlp': ('query_proj', 'key_proj', 'value_proj', 'context', 'out_proj'),
    'minimal': ('query_proj', 'key_proj', 'value_proj', 'out_proj', 'mlpwi_0', 'mlpwi_1'),
    'minimal_with_context': ('query_proj', 'key_proj', 'value_proj', 'context', 'out_proj', 'mlpwi_0', 'mlpwi_1'),
}


@pytest.mark.parametrize('policy', sorted(_KEPT))
def test_a_policy_keeps_exactly_the_values_it_names_in_every_layer(policy):
  lines = _saved_residuals(_cfg(_REMAT_CFG, remat=policy))
  named = [re.search(r" named '(\w+)'", line).group(1) for line in lines if " named '" in line]
  assert sorted(named) == sorted(_KEPT[policy] * _REMAT_CFG.num_layers)


def test_remat_policies_order_the_memory_the_backward_pass_keeps():
  """Residual bytes (traced program, scanned and not): 'none' > 'minimal_with_context' > 'minimal' >
  'save_dot_with_context_except_mlp' > 'save_dot_except_mlp' > 'save_qkv_proj' > 'save_out_proj' > 'full';
  the offloaded policies keep on the device what 'full' keeps and move 'minimal''s / 'save_qkv_proj''s
  values to host memory. Compiled (scanned; XLA's temp buffers): 'full' < 'minimal' < 'none'."""
  order = ['full', 'save_out_proj', 'save_qkv_proj', 'save_dot_except_mlp', 'save_dot_with_context_except_mlp',
           'minimal', 'minimal_with_context', 'none']
  for scan in (False, True):
    lines = {p: _saved_residuals(_cfg(_REMAT_CFG, remat=p, scan_layers=scan)) for p in remat.REMAT_POLICIES}
    device = {p: _residual_bytes(lines[p]) for p in lines}
    sizes = [device[p] for p in order]
    assert sizes == sorted(set(sizes)), (scan, dict(zip(order, sizes)))  # Strictly increasing.
    assert device['save_dot_except_mlpwi'] == device['save_dot_except_mlp']  # 'mlpwo' is never needed.
    for offloaded, like in (('minimal_offloaded', 'minimal'), ('qkv_proj_offloaded', 'save_qkv_proj')):
      assert device[offloaded] == device['full'], (scan, offloaded)
      assert _residual_bytes(lines[offloaded], host=True) == device[like] - device['full'] > 0, (scan, offloaded)
    assert all(_residual_bytes(lines[p], host=True) == 0 for p in order)

  def temp_bytes(policy):
    loss, params = _loss_fn(hf.abstract_model(_cfg(_REMAT_CFG, remat=policy, scan_layers=True)), _remat_batch(128))
    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

  full, minimal, none = temp_bytes('full'), temp_bytes('minimal'), temp_bytes('none')
  assert full < minimal < none, (full, minimal, none)


def test_unknown_remat_policy_is_refused_naming_the_choices():
  from jaxsft.errors import InputError  # pylint: disable=import-outside-toplevel
  with pytest.raises(InputError, match="model.remat.*'dots'.*minimal_with_context"):
    _cfg(_REMAT_CFG, remat='dots')
  with pytest.raises(InputError, match='model.remat'):
    remat.remat_policy('dots')


# ----------------------------------------------------------------------------------------------------------
# The tiled MLP (model.mlp_chunk_size, models/mlp.py).


@pytest.mark.parametrize('scan, remat, chunk', [(False, 'none', 12), (True, 'full', 8), (True, 'minimal', 7),
                                                (False, 'full', 31)])
def test_tiled_mlp_gives_the_loss_and_gradients_of_the_untiled_mlp(scan, remat, chunk):
  """32-position rows in tiles of 8 (4 tiles), 12, 7 and 31 (the last tile padded), with MLP biases: the loss
  within 1e-6 relative and every gradient within 3e-6 of its scale of the untiled model's (float32: only the
  order of the sums over positions changes, as in the remat test above; measured up to 1.3e-6). A tile applied to the wrong positions, a lost
  bias or padding leaking into a sum moves them by O(1)."""
  batch = _remat_batch()
  cfg = _cfg(_REMAT_CFG, num_layers=2, sliding_windows=(None, 8), scan_layers=scan, remat=remat, mlp_bias=True)
  rng = np.random.RandomState(1)
  weights = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype),
                         nnx.state(hf.init_random(cfg, 0)))  # Non-zero biases.
  untiled = _value_and_grads(nnx.merge(nnx.graphdef(hf.abstract_model(cfg)), weights), batch)
  tiled = _value_and_grads(nnx.merge(nnx.graphdef(hf.abstract_model(_cfg(cfg, mlp_chunk_size=chunk))), weights),
                           batch)
  assert untiled[0] > 1.0
  assert tiled[0] == pytest.approx(untiled[0], rel=1e-6, abs=0)
  _assert_grads_close(tiled[1], untiled[1], 3e-6)


def test_tiled_mlp_keeps_no_full_length_intermediate():
  """Without remat, the untiled MLP keeps gate and up ([B, T, F]) of every layer for the backward pass; tiled, it
  keeps nothing of length T × F: each tile's gate and up are recomputed right before its gradient."""
  f, length = _REMAT_CFG.intermediate_size, 32
  full_length = re.compile(rf'\[2,{length},{f}\]')
  untiled = _saved_residuals(_REMAT_CFG)
  tiled = _saved_residuals(_cfg(_REMAT_CFG, mlp_chunk_size=8))
  assert sum(bool(full_length.match(line.split()[0].removeprefix('f32'))) for line in untiled) >= 2 * 4, untiled
  assert not any(f'{f}]' in line.split()[0] and f',{length},' in line.split()[0] for line in tiled), tiled
  assert _residual_bytes(tiled) < _residual_bytes(untiled) - 2 * 4 * 2 * length * f * 4 * 0.9


# ----------------------------------------------------------------------------------------------------------
# Sharded load of a scanned model (8 CPU devices, in a subprocess).

_MESH = {'data': 1, 'fsdp': 4, 'tensor': 2}


def _worker_sharded_load(spec_file: str) -> None:
  jax.config.update('jax_num_cpu_devices', 8)
  assert jax.device_count() == 8, jax.devices()
  with open(spec_file, encoding='utf-8') as f:
    spec = json.load(f)
  mesh = sharding.make_mesh(_MESH)
  reads = []
  read_slice = safetensors_io.Reader.read_slice

  def recording_read_slice(self, name, ranges):
    block = read_slice(self, name, ranges)
    reads.append((name, block.size))
    return block

  safetensors_io.Reader.read_slice = recording_read_slice
  checked = []
  for model_dir, expected_file in spec['models']:
    cfg = hf_config.model_config_from_hf(hf_config.read_hf_config(model_dir), scan_layers=True)
    reference = _unstacked(nnx.state(hf.load_pretrained(model_dir, cfg), nnx.Param))
    shardings = sharding.param_shardings(nnx.state(hf.abstract_model(cfg), nnx.Param), mesh)
    wanted = {path: v.get_value() for path, v in nnx.to_flat_state(shardings)}
    reads.clear()
    model = hf.load_pretrained(model_dir, cfg, shardings=shardings)
    read_by_name = {}
    for name, size in reads:
      read_by_name.setdefault(name, []).append(size)
    split = 0
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      array = variable.get_value()
      assert array.sharding == wanted[path], (path, array.sharding, wanted[path])
      blocks = {tuple(s.indices(n) for s, n in zip(index, array.shape))
                for index in array.sharding.devices_indices_map(array.shape).values()}
      block_size = math.prod(array.sharding.shard_shape(array.shape))
      if path[0] == 'layers':
        assert array.sharding.spec[0] is None, path  # Every device holds its block of every layer.
        names = [('layers', layer, *path[1:]) for layer in range(cfg.num_layers)]
        block_size //= cfg.num_layers
      else:
        names = [path]
      for name in (hf_layout.hf_name(p) for p in names):  # pylint: disable=protected-access
        # One read per distinct block, of exactly that block's slice of this (layer's) tensor.
        assert sorted(read_by_name.pop(name)) == [block_size] * len(blocks), (name, len(blocks))
      split += len(blocks) > 1
    assert not read_by_name, sorted(read_by_name)  # Nothing else was read.
    assert split > 0, 'no parameter was actually sharded'
    got = _unstacked(nnx.state(model, nnx.Param))
    for key, value in reference.items():
      np.testing.assert_array_equal(got[key], value, err_msg=str(key))
    expected = np.load(expected_file)
    args = [np.asarray(expected[k], np.int32) for k in ('tokens', 'positions', 'mask')]
    with jax.set_mesh(mesh):
      logits = np.asarray(jax.jit(lambda m, a, b, c: m(a, b, c))(model, *args))
    mask = expected['mask'] > 0
    np.testing.assert_allclose(logits[mask], expected['logits'][mask], rtol=0, atol=ATOL)
    checked.append(f'{model_dir}:{split}')
  # init_random with the shardings: each stacked array sharded as asked, values equal to the unsharded init.
  plain = _unstacked(nnx.state(hf.init_random(cfg, 3), nnx.Param))
  model = hf.init_random(cfg, 3, shardings=shardings)
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    assert variable.get_value().sharding == wanted[path], path
  got = _unstacked(nnx.state(model, nnx.Param))
  for key, value in plain.items():
    np.testing.assert_array_equal(got[key], value, err_msg=str(key))
  checked.append('init_random')
  print('CHECKED ' + json.dumps(checked))


def test_sharded_load_of_a_scanned_model_reads_only_each_devices_blocks(tiny_hf, tmp_path):
  """8 devices, mesh fsdp=4 x tensor=2 with the project's rules: each stacked array gets its sharding (layers
  axis unsharded), every layer's tensor is read once per distinct device block, exactly that block's size
  (never whole), the values equal the unsharded load bit for bit and the logits equal transformers';
  init_random with the same shardings equals the unsharded init."""
  names = ('qwen2_sliding', 'qwen3')
  spec = models_helper.write_logits_spec(tiny_hf, names, tmp_path)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  env['PYTHONPATH'] = os.pathsep.join([os.getcwd(), env.get('PYTHONPATH', '')])
  proc = subprocess.run([sys.executable, '-m', 'tests.test_scan_remat', 'sharded_load', spec], env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  checked = json.loads(proc.stdout.split('CHECKED ', 1)[1].splitlines()[0])
  assert len(checked) == len(names) + 1, checked


if __name__ == '__main__':
  {'sharded_load': _worker_sharded_load}[sys.argv[1]](*sys.argv[2:])
