"""Attention dispatch (jaxsft.models.attention): 'auto' | 'xla' | 'cudnn' | 'splash'.

On CPU: 'auto' is 'xla'; explicit 'cudnn' / 'splash' fail at trace time with an InputError naming
`model.attention_impl`; the GPU/TPU choice logic runs with the backend patched. TPU splash attention runs in
Pallas interpret mode (the real kernel code, interpreted) and matches the XLA path on packed rows with several
segments and padding, GQA / MHA / MQA, sliding windows, T that needs padding to 128, float32 within 1e-5 and
bf16 within bf16 accuracy (defined below); also under a 4-device mesh, where it runs in shard_map. cuDNN's
packed layout (the seqlens/offsets built from segment ids, the GQA head repeat, the NaN guard for rows it
cannot describe) is checked with the cuDNN call emulated from jax's documented packed-layout contract; the
kernel itself runs only in the GPU-only tests (skipped here), as the real splash kernel only on TPU.

The XLA path computes in blocks of queries (causal: only the keys a block may see); it equals the whole masked
computation within 1e-5 in float32.

bf16 tolerance: a bf16 kernel's error against a float32 computation on the same bf16-rounded inputs must be at
most twice the error of the XLA path computing in bf16 (the accepted reference), outputs and gradients alike.
A wrong mask or head mapping gives errors of order one, far above it.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.errors import InputError
from jaxsft.models import attention

if __name__ == '__main__':  # A worker subprocess: its device count must be set before jax starts.
  jax.config.update('jax_num_cpu_devices', 4)
ON_GPU = jax.default_backend() == 'gpu'
ON_TPU = jax.default_backend() == 'tpu'


def _segments(batch: int, seq_len: int) -> np.ndarray:
  """Packed rows: row 0 has three documents and padding, row 1 one document and padding, row 2 (if any) a
  single document filling the row, row 3 (if any) only padding."""
  seg = np.zeros((batch, seq_len), np.int32)
  a, b, c = seq_len // 4, seq_len // 2 + 7, seq_len - seq_len // 16
  seg[0, :a], seg[0, a:b], seg[0, b:c] = 1, 2, 3
  seg[1, :seq_len * 3 // 5] = 1
  if batch > 2:
    seg[2] = 1
  return seg


def _inputs(batch=2, seq_len=256, heads=4, kv_heads=2, head_dim=64, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, seq_len, heads, head_dim), jnp.float32)
  k = jax.random.normal(keys[1], (batch, seq_len, kv_heads, head_dim), jnp.float32)
  v = jax.random.normal(keys[2], (batch, seq_len, kv_heads, head_dim), jnp.float32)
  cotangent = jax.random.normal(keys[3], (batch, seq_len, heads, head_dim), jnp.float32)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), jnp.asarray(_segments(batch, seq_len)), cotangent


def _value_and_grads(fn, q, k, v, seg, cotangent):
  """fn's output and the gradients of <output, cotangent> w.r.t. q, k, v, all as float32 numpy."""
  def loss(q, k, v):
    out = fn(q, k, v, seg)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return [np.asarray(x, np.float32) for x in (out, *grads)]


def _xla(window):
  return lambda q, k, v, seg: attention.xla_attention(q, k, v, seg, sliding_window=window)


def _assert_matches_xla(fn, window, q, k, v, seg, cotangent):
  """float32: fn equals the XLA path within 1e-5; bf16: within bf16 accuracy (module docstring)."""
  got = _value_and_grads(fn, q, k, v, seg, cotangent)
  names = ('output', 'dq', 'dk', 'dv')
  if q.dtype == jnp.float32:
    want = _value_and_grads(_xla(window), q, k, v, seg, cotangent)
    for name, g, w in zip(names, got, want):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)
    return
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  exact = _value_and_grads(_xla(window), *f32, seg, cotangent)
  xla_bf16 = _value_and_grads(_xla(window), q, k, v, seg, cotangent)
  for name, g, w, x in zip(names, got, exact, xla_bf16):
    error, xla_error = np.abs(g - w).max(), np.abs(x - w).max()
    assert np.all(np.isfinite(g)), name
    assert error <= 2 * xla_error, f'{name}: bf16 error {error} vs the XLA bf16 path\'s {xla_error}'


@pytest.fixture
def platform(monkeypatch):
  """Pretend the JAX backend is another one (the kernels themselves still run on the real backend)."""
  def set_platform(name: str, cuda=((9, 0), 90600)):
    monkeypatch.setattr(attention, '_platform', lambda: name)
    monkeypatch.setattr(attention, '_cuda_info', lambda: cuda if name == 'gpu' else None)
    monkeypatch.setattr(attention, '_warned', set())
  return set_platform


# ----------------------------------------------------------------------------------------------------------
# Names and dispatch.


def test_impl_names():
  """Every name in IMPLS passes check_impl (config validation uses IMPLS); others fail naming the field."""
  assert set(attention.IMPLS) == {'auto', 'xla', 'cudnn', 'splash'}
  for impl in attention.IMPLS:
    attention.check_impl(impl)
  with pytest.raises(InputError, match=r"'model\.attention_impl' is 'flash'.*auto, xla, cudnn, splash"):
    attention.check_impl('flash')


@pytest.mark.skipif(ON_GPU or ON_TPU, reason='CPU behaviour')
def test_auto_is_xla_on_cpu():
  """On CPU 'auto' resolves to 'xla' for any dtype and gives exactly the XLA path's output."""
  for dtype in (jnp.float32, jnp.bfloat16):
    assert attention.resolve_impl('auto', dtype=dtype, head_dim=64) == 'xla'
  q, k, v, seg, _ = _inputs(seq_len=64)
  got = attention.attention(q, k, v, seg, sliding_window=None, impl='auto')
  np.testing.assert_array_equal(got, attention.xla_attention(q, k, v, seg, sliding_window=None))


@pytest.mark.skipif(ON_GPU or ON_TPU, reason='CPU behaviour')
@pytest.mark.parametrize('impl, needs', [('cudnn', 'NVIDIA GPU'), ('splash', 'needs a TPU')])
def test_accelerator_impl_on_cpu_fails_at_trace(impl, needs):
  """An explicit GPU/TPU kernel on CPU raises InputError naming model.attention_impl while tracing, before
  any compile."""
  q, k, v, seg, _ = _inputs(seq_len=64, dtype=jnp.bfloat16)
  step = jax.jit(lambda q, k, v, seg: attention.attention(q, k, v, seg, sliding_window=None, impl=impl))
  with pytest.raises(InputError, match=rf"'model\.attention_impl' is '{impl}'.*{needs}.*'cpu'"):
    step.trace(q, k, v, seg)


def test_resolution_on_gpu(platform, caplog):
  """On a (pretended) GPU: 'auto' is cuDNN for bf16/fp16 and a supported head_dim, else XLA with a single
  warning; explicit 'cudnn' that cannot run raises InputError saying why."""
  platform('gpu')
  for dtype in (jnp.bfloat16, jnp.float16):
    assert attention.resolve_impl('auto', dtype=dtype, head_dim=128) == 'cudnn'
    assert attention.resolve_impl('cudnn', dtype=dtype, head_dim=256) == 'cudnn'
  assert attention.resolve_impl('xla', dtype=jnp.bfloat16, head_dim=128) == 'xla'
  with caplog.at_level('WARNING'):
    for _ in range(3):
      assert attention.resolve_impl('auto', dtype=jnp.float32, head_dim=128) == 'xla'
  assert [r.getMessage() for r in caplog.records if 'auto uses xla' in r.getMessage()] == [
      'attention: auto uses xla, not cuDNN flash attention: it computes in bfloat16 or float16, and the attention '
      'inputs are float32 (train with bf16=True, or set model.attention_impl=xla)']
  with pytest.raises(InputError, match=r"'model\.attention_impl' is 'cudnn'.*bfloat16 or float16.*float32"):
    attention.resolve_impl('cudnn', dtype=jnp.float32, head_dim=128)
  with pytest.raises(InputError, match=r'multiple of 8 and at most 256.*got 60'):
    attention.resolve_impl('cudnn', dtype=jnp.bfloat16, head_dim=60)
  with pytest.raises(InputError, match=r"'model\.attention_impl' is 'splash'.*'gpu'"):
    attention.resolve_impl('splash', dtype=jnp.bfloat16, head_dim=128)
  platform('gpu', cuda=((8, 0), 90100))  # Ampere: head_dim up to 128.
  assert attention.resolve_impl('auto', dtype=jnp.bfloat16, head_dim=256) == 'xla'
  with pytest.raises(InputError, match=r'at most 128 on this GPU, got 256'):
    attention.resolve_impl('cudnn', dtype=jnp.bfloat16, head_dim=256)
  platform('gpu', cuda=None)  # ROCm, or no cuDNN.
  assert attention.resolve_impl('auto', dtype=jnp.bfloat16, head_dim=128) == 'xla'
  with pytest.raises(InputError, match='no CUDA device with cuDNN'):
    attention.resolve_impl('cudnn', dtype=jnp.bfloat16, head_dim=128)


def test_resolution_on_tpu(platform):
  """On a (pretended) TPU 'auto' and 'splash' are splash for any dtype; 'cudnn' is an InputError."""
  platform('tpu')
  for impl in ('auto', 'splash'):
    for dtype in (jnp.float32, jnp.bfloat16):
      assert attention.resolve_impl(impl, dtype=dtype, head_dim=64) == 'splash'
  with pytest.raises(InputError, match=r"'model\.attention_impl' is 'cudnn'.*NVIDIA GPU.*'tpu'"):
    attention.resolve_impl('cudnn', dtype=jnp.bfloat16, head_dim=128)


# ----------------------------------------------------------------------------------------------------------
# XLA in query blocks.


def _whole(window):
  """The XLA attention of the definition: every (query, key) pair computed, the [B, 1, T, T] mask applied."""
  return lambda q, k, v, seg: jax.nn.dot_product_attention(q, k, v, mask=attention.make_mask(seg, window),
                                                           implementation='xla')


def test_query_blocks_skip_masked_keys():
  """Blocks tile the queries; each sees keys up to its last query (from its first query's window); past
  16 blocks of 128 they grow; causal attention at 2048 positions computes 53% of the pairs."""
  for t, window in ((100, None), (1024, None), (2048, None), (4096, None), (1000, 300), (640, 1)):
    blocks = attention.query_blocks(t, window)
    assert [b[0] for b in blocks] == list(range(0, t, blocks[0][1])) and blocks[-1][1] == t
    assert len(blocks) <= attention.XLA_MAX_QUERY_BLOCKS
    for start, end, first_key in blocks:
      assert first_key == (0 if window is None else max(0, start - window + 1))
  assert attention.query_blocks(1024, None)[1] == (128, 256, 0)
  assert attention.query_blocks(4096, None)[1] == (256, 512, 0)
  pairs = sum((end - start) * (end - first_key) for start, end, first_key in attention.query_blocks(2048, None))
  assert pairs / 2048**2 == pytest.approx(0.53125)


@pytest.mark.parametrize('seq_len, window', [(64, None), (384, None), (300, None), (384, 100), (300, 1),
                                             (384, 1000)])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_xla_blocks_equal_the_whole_computation(seq_len, window, dtype):
  """Outputs and q/k/v gradients of the blocked XLA path equal the whole masked computation (float32 within
  1e-5; bf16 within bf16 accuracy as defined above), on packed rows with padding, a row of padding only, GQA,
  windows shorter and longer than a block, and T not a multiple of the block."""
  q, k, v, seg, cotangent = _inputs(batch=4, seq_len=seq_len, dtype=dtype)
  got = _value_and_grads(_xla(window), q, k, v, seg, cotangent)
  if dtype == jnp.float32:
    want = _value_and_grads(_whole(window), q, k, v, seg, cotangent)
    for name, g, w in zip(('output', 'dq', 'dk', 'dv'), got, want):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)
    return
  exact = _value_and_grads(_whole(window), *(x.astype(jnp.float32) for x in (q, k, v)), seg, cotangent)
  whole_bf16 = _value_and_grads(_whole(window), q, k, v, seg, cotangent)
  for name, g, w, x in zip(('output', 'dq', 'dk', 'dv'), got, exact, whole_bf16):
    assert np.abs(g - w).max() <= 2 * np.abs(x - w).max(), name


# ----------------------------------------------------------------------------------------------------------
# Splash attention (Pallas interpret mode off TPU).


def test_splash_block_size():
  """Blocks are the largest of 512/256/128 dividing T rounded up to a multiple of 128."""
  cases = {1: 128, 128: 128, 200: 256, 256: 256, 384: 128, 512: 512, 640: 128, 768: 256, 1024: 512, 4096: 512,
           1000: 512, 1100: 128}
  assert {t: attention.splash_block_size(t) for t in cases} == cases


@pytest.mark.parametrize('window', [None, 1, 5, 300])
def test_splash_mask_is_the_xla_mask(window):
  """The static splash mask (CausalMask / LocalMask) allows exactly what make_mask allows in one segment."""
  t = 256
  mask = attention.splash_mask(t, 2, window)
  want = np.asarray(attention.make_mask(jnp.ones((1, t), jnp.int32), window))[0, 0]
  for head in range(2):
    np.testing.assert_array_equal(np.asarray(mask[head, :, :]), want)


SPLASH_CASES = {
    # name: (dtype, seq_len, heads, kv_heads, head_dim, window)
    'f32_gqa_padded_T': (jnp.float32, 200, 4, 2, 64, None),
    'f32_gqa_window': (jnp.float32, 256, 4, 2, 64, 16),
    'f32_mha_3_blocks': (jnp.float32, 384, 2, 2, 32, None),
    'f32_mqa_window_padded_T': (jnp.float32, 136, 4, 1, 64, 40),
    'bf16_gqa': (jnp.bfloat16, 256, 4, 2, 64, None),
    'bf16_gqa_window_padded_T': (jnp.bfloat16, 200, 4, 2, 64, 16),
}


@pytest.mark.parametrize('case', list(SPLASH_CASES))
def test_splash_matches_xla(case, platform):
  """attention(impl='splash') — dispatch, q scaling, BNTH transposes, T padding, GQA head grouping, segment
  ids and the causal/local mask — equals the XLA path in output and q/k/v gradients."""
  dtype, seq_len, heads, kv_heads, head_dim, window = SPLASH_CASES[case]
  platform('tpu')
  q, k, v, seg, cotangent = _inputs(batch=4, seq_len=seq_len, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                    dtype=dtype)
  splash = lambda q, k, v, seg: attention.attention(q, k, v, seg, sliding_window=window, impl='splash')
  _assert_matches_xla(splash, window, q, k, v, seg, cotangent)


def test_splash_does_not_see_across_segments(platform):
  """Changing the keys and values of every other segment leaves a segment's splash output unchanged (the
  segment masking is real, not an accident of the test data)."""
  platform('tpu')
  q, k, v, seg, _ = _inputs(batch=2, seq_len=128)
  run = jax.jit(lambda k, v: attention.attention(q, k, v, seg, sliding_window=None, impl='splash'))
  other_BxTx1x1 = (seg != 2)[:, :, None, None]
  base = run(k, v)
  changed = run(jnp.where(other_BxTx1x1, k + 3.0, k), jnp.where(other_BxTx1x1, -v, v))
  in_2 = np.asarray(seg == 2)
  np.testing.assert_array_equal(np.asarray(base)[in_2], np.asarray(changed)[in_2])
  assert np.abs(np.asarray(base)[~in_2] - np.asarray(changed)[~in_2]).max() > 0.1


def _mesh_worker() -> None:
  """Subprocess: 4 CPU devices, mesh data=1 x fsdp=2 x tensor=2; splash under jax.set_mesh equals XLA."""
  assert jax.device_count() == 4, jax.devices()
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  from jaxsft import sharding  # pylint: disable=import-outside-toplevel
  attention._platform = lambda: 'tpu'  # pylint: disable=protected-access
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 2, 'tensor': 2})
  q, k, v, seg, cotangent = _inputs(batch=4, seq_len=128, heads=4, kv_heads=2, head_dim=32)
  splash = lambda q, k, v, seg: attention.attention(q, k, v, seg, sliding_window=24, impl='splash')
  with jax.set_mesh(mesh):
    act = NamedSharding(mesh, P(('data', 'fsdp'), None, 'tensor', None))
    q, k, v = (jax.device_put(x, act) for x in (q, k, v))
    seg = jax.device_put(seg, NamedSharding(mesh, P(('data', 'fsdp'), None)))
    jaxpr = str(jax.make_jaxpr(splash)(q, k, v, seg))
    assert 'shard_map' in jaxpr and "'tensor'" in jaxpr, jaxpr[:2000]
    _assert_matches_xla(splash, 24, q, k, v, seg, cotangent)
  print('mesh ok')


def test_splash_under_a_mesh_runs_in_shard_map():
  """Under a 4-device mesh splash is wrapped in shard_map (batch over fsdp, heads over tensor) and still
  equals the XLA path in output and gradients (fresh process: the device count is fixed at jax start)."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  env['PYTHONPATH'] = os.pathsep.join([os.getcwd(), env.get('PYTHONPATH', '')])
  proc = subprocess.run([sys.executable, '-m', 'tests.test_attention', 'mesh'], env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0 and 'mesh ok' in proc.stdout, (proc.stdout + proc.stderr)[-4000:]


# ----------------------------------------------------------------------------------------------------------
# cuDNN packed layout (kernel emulated on CPU).


def test_max_segment_runs():
  assert attention.max_segment_runs(_segments(4, 64)) == 4  # Row 0: three documents and padding.
  assert attention.max_segment_runs(np.zeros((2, 5), np.int32)) == 1
  assert attention.max_segment_runs(np.array([[1, 1, 0, 1, 2]])) == 4


def test_packed_layout_describes_runs():
  """Offsets are run starts then -1 (M + 1 slots), seqlens run lengths then -1 (M slots), as jax's cuDNN
  packed layout takes them; a row with more than M runs, or with non-contiguous equal ids, is not ok."""
  seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0],
                     [1, 1, 1, 1, 1, 1, 1, 1],
                     [0, 0, 0, 0, 0, 0, 0, 0],
                     [1, 2, 3, 4, 5, 0, 0, 0],
                     [1, 1, 0, 0, 1, 1, 0, 0]], jnp.int32)
  offsets, seqlens, ok = attention.packed_layout(seg, 4)
  np.testing.assert_array_equal(offsets, [[0, 3, 5, 6, -1],
                                          [0, -1, -1, -1, -1],
                                          [0, -1, -1, -1, -1],
                                          [0, 1, 2, 3, -1],
                                          [0, 2, 4, 6, -1]])
  np.testing.assert_array_equal(seqlens, [[3, 2, 1, 2],
                                          [8, -1, -1, -1],
                                          [8, -1, -1, -1],
                                          [1, 1, 1, 1],
                                          [2, 2, 2, 2]])
  np.testing.assert_array_equal(ok, [True, True, True, False, False])
  _, _, ok = attention.packed_layout(seg, 6)
  np.testing.assert_array_equal(ok, [True, True, True, True, False])


def test_packed_layout_matches_jax_flattening():
  """jax's own `_fix_seqlen_offsets` turns the layout into the flat per-segment lists cuDNN reads: every run of
  every row in order, lengths, and cumulative starts scaled by the token stride N*H (k and v carry N heads after
  the GQA repeat, so the kv offsets equal the q offsets)."""
  from jax._src.cudnn import fused_attention_stablehlo as sdpa  # pylint: disable=import-outside-toplevel
  seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]], jnp.int32)
  offsets, seqlens, _ = attention.packed_layout(seg, 4)
  q = jnp.zeros((2, 8, 3, 16), jnp.bfloat16)
  fix = sdpa._fix_seqlen_offsets  # pylint: disable=protected-access
  q_len, kv_len, q_off, kv_off = fix(seqlens, seqlens, offsets, offsets, q, q)
  np.testing.assert_array_equal(q_len.reshape(-1), [3, 2, 1, 2, 4, 4, 0, 0])
  np.testing.assert_array_equal(q_off.reshape(-1), np.array([0, 3, 5, 6, 8, 12, 16, 16, 16, 16]) * 3 * 16)
  np.testing.assert_array_equal(kv_len, q_len)
  np.testing.assert_array_equal(kv_off, q_off)


def _emulated_packed_kernel(calls):
  """The cuDNN packed call as jax documents it: token i belongs to sequence j of its row iff
  offsets[j] <= i < offsets[j] + seqlens[j]; attention is causal (and windowed) within a sequence."""
  def kernel(q, k, v, seqlens_BxM, offsets_BxM1, *, sliding_window):
    calls.append((k.shape, v.shape))
    t, m = q.shape[1], seqlens_BxM.shape[1]
    i_1x1xT = jnp.arange(t)[None, None, :]
    start_BxMx1 = offsets_BxM1[:, :m, None]
    member_BxMxT = (start_BxMx1 >= 0) & (start_BxMx1 <= i_1x1xT) & (i_1x1xT < start_BxMx1 + seqlens_BxM[:, :, None])
    sequence_BxT = jnp.where(member_BxMxT.any(1), jnp.argmax(member_BxMxT, 1), -1 - jnp.arange(t))
    return attention.xla_attention(q, k, v, sequence_BxT, sliding_window=sliding_window)
  return kernel


@pytest.mark.parametrize('window', [None, 7])
def test_cudnn_packed_path_emulated(window, monkeypatch):
  """cudnn_attention with the packed kernel emulated: GQA heads repeated to N before the call (in HF's order),
  output and gradients equal the XLA path (float32 within 1e-5: the emulation is not limited to bf16); a row
  with more runs than max_segments comes out all NaN while the other rows are unaffected."""
  calls = []
  monkeypatch.setattr(attention, '_packed_supported', lambda: True)
  monkeypatch.setattr(attention, '_cudnn_packed_kernel', _emulated_packed_kernel(calls))
  q, k, v, seg, cotangent = _inputs(batch=4, seq_len=64, heads=4, kv_heads=2, head_dim=16)
  cudnn = lambda q, k, v, seg: attention.cudnn_attention(q, k, v, seg, sliding_window=window, max_segments=4)
  got = _value_and_grads(cudnn, q, k, v, seg, cotangent)
  want = _value_and_grads(_xla(window), q, k, v, seg, cotangent)
  assert calls and all(shape == (4, 64, 4, 16) for shapes in calls for shape in shapes)
  for name, g, w in zip(('output', 'dq', 'dk', 'dv'), got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)

  out = jax.jit(lambda q, k, v, seg: attention.cudnn_attention(q, k, v, seg, sliding_window=window,
                                                               max_segments=3))(q, k, v, seg)
  out = np.asarray(out, np.float32)
  assert np.isnan(out[0]).all()  # Row 0 has four runs (three documents and padding).
  np.testing.assert_allclose(out[1:], want[0][1:], rtol=1e-5, atol=1e-5)


def test_cudnn_noncontiguous_segment_is_nan(monkeypatch):
  """A row whose equal segment ids are not contiguous (runs differ from ids) is NaN, never silently wrong."""
  monkeypatch.setattr(attention, '_packed_supported', lambda: True)
  monkeypatch.setattr(attention, '_cudnn_packed_kernel', _emulated_packed_kernel([]))
  q, k, v, _, _ = _inputs(batch=2, seq_len=16, heads=2, kv_heads=2, head_dim=8, dtype=jnp.bfloat16)
  seg = jnp.asarray([[1] * 8 + [0] * 8, [1] * 4 + [2] * 4 + [1] * 8], jnp.int32)
  out = np.asarray(attention.cudnn_attention(q, k, v, seg, sliding_window=None), np.float32)
  assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()


# ----------------------------------------------------------------------------------------------------------
# On the accelerators themselves (skipped elsewhere).


@pytest.mark.skipif(not ON_GPU, reason='needs an NVIDIA GPU')
@pytest.mark.parametrize('layout', ['packed', 'bias'])
@pytest.mark.parametrize('window', [None, 16])
def test_cudnn_matches_xla_on_gpu(layout, window, monkeypatch):
  """Real cuDNN flash attention (packed layout on Hopper+, segment mask as bias otherwise) equals the XLA path
  within bf16 accuracy on packed rows with GQA, outputs and gradients."""
  if layout == 'packed' and not attention._packed_supported():  # pylint: disable=protected-access
    pytest.skip('the packed layout needs Hopper and cuDNN >= 9.6')
  if layout == 'bias':
    monkeypatch.setattr(attention, '_packed_supported', lambda: False)
  q, k, v, seg, cotangent = _inputs(batch=4, seq_len=256, heads=8, kv_heads=2, head_dim=64, dtype=jnp.bfloat16)
  cudnn = lambda q, k, v, seg: attention.attention(q, k, v, seg, sliding_window=window, impl='cudnn')
  _assert_matches_xla(cudnn, window, q, k, v, seg, cotangent)


@pytest.mark.skipif(not ON_GPU, reason='needs an NVIDIA GPU')
def test_cudnn_too_many_segments_is_nan_on_gpu():
  """On the GPU too, a row with more runs than max_segments is NaN and the other rows are right."""
  if not attention._packed_supported():  # pylint: disable=protected-access
    pytest.skip('the packed layout needs Hopper and cuDNN >= 9.6')
  q, k, v, seg, _ = _inputs(batch=4, seq_len=256, heads=8, kv_heads=2, head_dim=64, dtype=jnp.bfloat16)
  out = np.asarray(attention.cudnn_attention(q, k, v, seg, sliding_window=None, max_segments=3), np.float32)
  want = np.asarray(attention.xla_attention(q, k, v, seg, sliding_window=None), np.float32)
  assert np.isnan(out[0]).all()
  np.testing.assert_allclose(out[1:], want[1:], atol=0.05)


@pytest.mark.skipif(not ON_TPU, reason='needs a TPU')
@pytest.mark.parametrize('window', [None, 16])
def test_splash_matches_xla_on_tpu(window):
  """The compiled splash kernel on a TPU equals the XLA path within bf16 accuracy."""
  q, k, v, seg, cotangent = _inputs(batch=4, seq_len=512, heads=8, kv_heads=2, head_dim=128, dtype=jnp.bfloat16)
  splash = lambda q, k, v, seg: attention.attention(q, k, v, seg, sliding_window=window, impl='splash')
  _assert_matches_xla(splash, window, q, k, v, seg, cotangent)


if __name__ == '__main__':
  {'mesh': _mesh_worker}[sys.argv[1]]()
