"""Sharded projections on a mesh: models/projection.einsum and the tiled MLP (models/mlp.py) compute what the plain
forms do.

The collectives they exist for (reduce-scatters along a leading axis, weights gathered once per layer) are
checked on the real TPU compile (test_target_compile.py); here, on 8 CPU devices (a subprocess: the device count
is set before jax starts) with fsdp=4 × tensor=2, that their values and gradients equal plain `jnp.einsum`'s
(every kernel layout the model uses) and the untiled MLP's, under the same mesh and shardings.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

if __name__ == '__main__':
  jax.config.update('jax_num_cpu_devices', 8)

from jax.sharding import NamedSharding  # pylint: disable=wrong-import-position

from flax import nnx  # pylint: disable=wrong-import-position

from jaxsft import sharding  # pylint: disable=wrong-import-position
from jaxsft.models import mlp  # pylint: disable=wrong-import-position
from jaxsft.models import projection  # pylint: disable=wrong-import-position

# (spec, x shape, kernel shape, kernel logical names): o_proj and down_proj have embed last (the custom
# gradient); q_proj and up_proj have it first (plain einsum).
_CASES = [
    ('btnh,nhd->btd', (4, 6, 4, 8), (4, 8, 16), ('q_heads', 'head_dim', 'embed')),
    ('btf,fd->btd', (4, 6, 24), (24, 16), ('mlp', 'embed')),
    ('btd,dnh->btnh', (4, 6, 16), (16, 4, 8), ('embed', 'q_heads', 'head_dim')),
    ('btd,df->btf', (4, 6, 16), (16, 24), ('embed', 'mlp')),
]


def _worker() -> None:
  assert jax.device_count() == 8, jax.devices()
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 4, 'tensor': 2})
  rng = np.random.RandomState(0)
  for spec, x_shape, k_shape, names in _CASES:
    x = rng.randn(*x_shape).astype(np.float32)
    kernel = rng.randn(*k_shape).astype(np.float32)
    dy = rng.randn(*jnp.einsum(spec, x, kernel).shape).astype(np.float32)
    x = jax.device_put(x, sharding.batch_sharding(mesh))
    kernel = jax.device_put(kernel, NamedSharding(mesh, sharding.logical_to_spec(names, k_shape, mesh)))

    def vjp(fn, x=x, kernel=kernel, dy=dy):
      y, pullback = jax.vjp(fn, x, kernel)
      return (y, *pullback(dy))

    with jax.set_mesh(mesh):
      got = jax.jit(lambda a, b, s=spec, n=names: vjp(lambda u, v: projection.einsum(s, u, v, n), a, b))(x, kernel)
      want = jax.jit(lambda a, b, s=spec: vjp(lambda u, v: jnp.einsum(s, u, v), a, b))(x, kernel)
      jaxpr = str(jax.make_jaxpr(lambda a, b, s=spec, n=names: projection.einsum(s, a, b, n))(x, kernel))
    # The custom gradient is used exactly where the embed (fsdp) axis is not the kernel's first.
    assert ('custom_vjp_call' in jaxpr) == (names[0] != 'embed'), (spec, jaxpr)
    for name, g, w in zip(('y', 'dx', 'dkernel'), got, want):
      assert g.shape == w.shape and g.dtype == w.dtype, (spec, name, g.shape, w.shape)
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-5, err_msg=f'{spec} {name}')
  # Without a mesh it is jnp.einsum itself.
  x, kernel = np.ones((2, 3, 24), np.float32), np.ones((24, 16), np.float32)
  np.testing.assert_array_equal(projection.einsum('btf,fd->btd', x, kernel, ('mlp', 'embed')),
                                jnp.einsum('btf,fd->btd', x, kernel))
  _check_tiled_mlp(mesh)
  print('CHECKED', len(_CASES))


def _check_tiled_mlp(mesh) -> None:
  """The tiled MLP (tiles of 4 positions, 10-position rows: the last tile padded) against the untiled one."""
  rng = np.random.RandomState(1)
  x = jax.device_put(rng.randn(4, 10, 16).astype(np.float32), sharding.batch_sharding(mesh))
  dy = rng.randn(4, 10, 16).astype(np.float32)
  results = []
  for chunk_size in (0, 4):
    module = mlp.MLP(16, 24, bias=True, chunk_size=chunk_size, dtype='float32', param_dtype='float32',
                     rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(module)
    params = jax.tree.map(lambda p: p + 0.1 * np.random.RandomState(2).randn(*p.shape).astype(np.float32), params)
    params = jax.device_put(params, sharding.param_shardings(params, mesh))

    def objective(p, a, graphdef=graphdef):
      return jnp.sum(nnx.merge(graphdef, p)(a) * dy)

    with jax.set_mesh(mesh):
      value, grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))(params, x)
    results.append((value, jax.tree.leaves(grads)))
  (want, want_grads), (got, got_grads) = results
  assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want)), (got, want)
  assert len(got_grads) == len(want_grads) == 7  # 3 kernels, 3 biases, x.
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-5 * np.abs(np.asarray(w)).max())


def test_values_and_gradients_equal_einsum_on_a_mesh():
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, '-m', 'tests.test_projection'], cwd=root, env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  assert f'CHECKED {len(_CASES)}' in proc.stdout, proc.stdout


if __name__ == '__main__':
  _worker()
