"""Tests for jaxsft.optim against transformers (schedules, decay rule) and torch (AdamW, clipping)."""

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from flax import nnx

from jaxsft import optim
from jaxsft.errors import InputError

# torch is imported by the tests that compare with it: absent (TPU VMs, CI's 3.12 lane), tests/conftest.py turns
# their ImportError (or transformers' "needs PyTorch" one) into a skip and the others still run.

# (total_steps, warmup_steps, warmup_ratio): warmup by steps, by ratio (ceil), none, and longer than the run.
SCHEDULE_CASES = [(10, 0, 0.0), (10, 3, 0.0), (37, 0, 0.1), (100, 0, 0.03), (30, 0, 0.1), (7, 0, 1.0),
                  (6, 9, 0.0), (1, 0, 0.0)]


def _hf_warmup(total_steps, warmup_steps, warmup_ratio):
  """transformers 5 folds the ratio into `warmup_steps` (a float < 1)."""
  value = warmup_steps if warmup_steps > 0 else warmup_ratio
  args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), warmup_steps=value, report_to=[])
  return args.get_warmup_steps(total_steps)


def _hf_lrs(name, learning_rate, total_steps, warmup, num_steps, min_lr_rate=None):
  import torch  # pylint: disable=import-outside-toplevel
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([param], lr=learning_rate)
  kwargs = {'min_lr_rate': min_lr_rate} if name == 'cosine_with_min_lr' else None
  sched = transformers.get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total_steps,
                                     scheduler_specific_kwargs=kwargs)
  lrs = []
  for _ in range(num_steps):
    lrs.append(opt.param_groups[0]['lr'])
    opt.step()
    sched.step()
  return lrs


# transformers 5 reads warmup_steps=1.0 as one step, not as a ratio: compare ratios below 1 only.
@pytest.mark.parametrize('total_steps,warmup_steps,warmup_ratio', [c for c in SCHEDULE_CASES if c[2] < 1])
def test_num_warmup_steps_matches_transformers(total_steps, warmup_steps, warmup_ratio):
  assert optim.num_warmup_steps(total_steps, warmup_steps, warmup_ratio) == _hf_warmup(
      total_steps, warmup_steps, warmup_ratio)


@pytest.mark.parametrize('name', optim.SCHEDULES)
@pytest.mark.parametrize('total_steps,warmup_steps,warmup_ratio', SCHEDULE_CASES)
def test_schedule_matches_transformers(name, total_steps, warmup_steps, warmup_ratio):
  learning_rate = 2e-5
  min_lr_rate = 0.1 if name == 'cosine_with_min_lr' else None
  warmup = optim.num_warmup_steps(total_steps, warmup_steps, warmup_ratio)
  steps = total_steps + 3  # A few past the end too.
  want = _hf_lrs(name, learning_rate, total_steps, warmup, steps, min_lr_rate)
  schedule = optim.make_schedule(name, learning_rate=learning_rate, total_steps=total_steps,
                                 warmup_steps=warmup, min_lr_rate=min_lr_rate)
  got = [schedule(step) for step in range(steps)]
  assert all(isinstance(x, float) for x in got)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
  assert schedule(np.int64(2)) == got[2]
  # Traced (as optax calls it inside jit): the same values in float32.
  traced = jax.jit(jax.vmap(schedule))(jnp.arange(steps, dtype=jnp.int32))
  assert traced.dtype == jnp.float32
  np.testing.assert_allclose(traced, want, rtol=2e-6, atol=learning_rate * 1e-6)


def test_schedule_shapes():
  """Spot values that do not depend on transformers: warmup ramps from 0, cosine_with_min_lr ends at the floor."""
  s = optim.make_schedule('cosine_with_min_lr', learning_rate=1.0, total_steps=12, warmup_steps=2, min_lr_rate=0.1)
  assert (s(0), s(1), s(2)) == (0.0, 0.5, 1.0)
  assert s(12) == pytest.approx(0.1, rel=1e-15)
  s = optim.make_schedule('linear', learning_rate=3.0, total_steps=10, warmup_steps=0)
  assert (s(0), s(5), s(10), s(11)) == (3.0, 1.5, 0.0, 0.0)


def test_unknown_schedule_is_input_error():
  with pytest.raises(InputError, match=r"lr_scheduler_type.*'cosine_with_restarts'.*constant, constant_with_warmup"):
    optim.make_schedule('cosine_with_restarts', learning_rate=1.0, total_steps=10, warmup_steps=0)
  with pytest.raises(InputError, match='min_lr_rate'):
    optim.make_schedule('cosine_with_min_lr', learning_rate=1.0, total_steps=10, warmup_steps=0)


class _Block(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.embed_tokens = nnx.Embed(11, 4, rngs=rngs)
    self.q_proj = nnx.Linear(4, 6, use_bias=True, rngs=rngs)
    self.q_norm = nnx.RMSNorm(6, rngs=rngs)
    self.input_layernorm = nnx.RMSNorm(4, rngs=rngs)
    self.norm = nnx.RMSNorm(4, rngs=rngs)
    self.lm_head = nnx.Linear(4, 11, use_bias=False, rngs=rngs)


def _flat(tree):
  """{'a.b.c': leaf}, skipping the 'value' attribute of nnx Variables."""
  def name(key):
    return str(getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key))))
  return {'.'.join(name(k) for k in path if name(k) != 'value'): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_decay_mask_on_nnx_state_and_dict():
  model = _Block(nnx.Rngs(0))
  _, params = nnx.split(model, nnx.Param)
  mask = optim.decay_mask(params)
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  want = {'embed_tokens.embedding': True, 'q_proj.kernel': True, 'q_proj.bias': False, 'q_norm.scale': False,
          'input_layernorm.scale': False, 'norm.scale': False, 'lm_head.kernel': True}
  assert _flat(mask) == want
  assert _flat(optim.decay_mask(params.to_pure_dict())) == want
  nested = {'layers': {0: {'mlp': {'gate_proj': {'kernel': 0}}, 'post_attention_layernorm': {'scale': 0}}}}
  assert _flat(optim.decay_mask(nested)) == {'layers.0.mlp.gate_proj.kernel': True,
                                              'layers.0.post_attention_layernorm.scale': False}


@pytest.mark.parametrize('model_type', ['qwen3', 'qwen2', 'llama'])
def test_decay_mask_matches_transformers_trainer(model_type):
  """The mask on HF parameter names (as our tree spells them) equals Trainer.get_decay_parameter_names."""
  config = transformers.AutoConfig.for_model(
      model_type, vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
      num_key_value_heads=1, head_dim=8, tie_word_embeddings=False)
  model = transformers.AutoModelForCausalLM.from_config(config)
  decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
  tree, hf_names = {}, {}
  for name, _ in model.named_parameters():
    parts = name.split('.')
    if parts[0] == 'model':
      parts = parts[1:]
    leaf = {'weight': 'kernel', 'bias': 'bias'}[parts[-1]]
    if 'norm' in parts[-2]:
      leaf = 'scale'
    elif parts[-2] == 'embed_tokens':
      leaf = 'embedding'
    path = parts[:-1] + [leaf]
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = np.zeros(())
    hf_names['.'.join(path)] = name
  got = _flat(optim.decay_mask(tree))
  assert got == {ours: hf_names[ours] in decay for ours in hf_names}
  assert any(got.values()) and not all(got.values())


def test_global_norm():
  tree = {'a': jnp.array([3.0, 0.0]), 'b': {'c': jnp.array([[4.0]], jnp.bfloat16)}}
  norm = optim.global_norm(tree)
  assert norm.dtype == jnp.float32 and float(norm) == 5.0
  _, params = nnx.split(_Block(nnx.Rngs(1)), nnx.Param)
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(params)]
  want = np.sqrt(sum((x ** 2).sum() for x in leaves))
  np.testing.assert_allclose(float(optim.global_norm(params)), want, rtol=1e-6)


def _optimizer(**overrides):
  kwargs = dict(learning_rate=1e-2, lr_scheduler_type='cosine', total_steps=6, warmup_steps=0, warmup_ratio=0.2,
                min_lr_rate=None, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
                max_grad_norm=1.0)
  kwargs.update(overrides)
  return optim.make_optimizer(**kwargs), kwargs


def test_weight_decay_applies_per_mask_on_nnx_state():
  """Zero gradients: Adam's direction is 0, so only decoupled decay moves the (decayed) parameters."""
  (tx, schedule), kw = _optimizer(lr_scheduler_type='constant', max_grad_norm=0.0)
  _, params = nnx.split(_Block(nnx.Rngs(2)), nnx.Param)
  params = jax.tree.map(lambda x: x + 1.0, params)  # Norm scales and biases are not 0 (or 1) either.
  state = tx.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  new = optax.apply_updates(params, updates)
  mask = _flat(optim.decay_mask(params))
  old_flat, new_flat = _flat(params), _flat(new)
  for name, decays in mask.items():
    factor = 1 - kw['learning_rate'] * kw['weight_decay'] if decays else 1.0
    np.testing.assert_allclose(new_flat[name], old_flat[name] * factor, rtol=1e-6, err_msg=name)
  assert schedule(0) == kw['learning_rate']


def _torch_tiny():
  """A torch module with one parameter of each decay kind, named as in HF models."""
  import torch  # pylint: disable=import-outside-toplevel

  class TorchTiny(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.embed_tokens = torch.nn.Embedding(11, 4)
      self.q_proj = torch.nn.Linear(4, 6, bias=True)
      self.input_layernorm = torch.nn.RMSNorm(4)
      self.lm_head = torch.nn.Linear(4, 11, bias=False)

  return TorchTiny()


def _to_jax(model):
  return {
      'embed_tokens': {'embedding': model.embed_tokens.weight.detach().numpy().copy()},
      'q_proj': {'kernel': model.q_proj.weight.detach().numpy().T.copy(),
                 'bias': model.q_proj.bias.detach().numpy().copy()},
      'input_layernorm': {'scale': model.input_layernorm.weight.detach().numpy().copy()},
      'lm_head': {'kernel': model.lm_head.weight.detach().numpy().T.copy()},
  }


@pytest.mark.parametrize('accumulation,schedule_name', [(1, 'cosine'), (3, 'linear'), (2, 'constant_with_warmup')])
def test_optimizer_matches_torch_adamw_clip_and_scheduler(accumulation, schedule_name):
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  model = _torch_tiny()
  with torch.no_grad():
    model.input_layernorm.weight.add_(torch.randn(4) * 0.1)
    model.embed_tokens.weight.mul_(0.5)  # O(1) values, like the other parameters (torch's default is N(0, 1)).
  (tx, schedule), kw = _optimizer(lr_scheduler_type=schedule_name)
  warmup = optim.num_warmup_steps(kw['total_steps'], kw['warmup_steps'], kw['warmup_ratio'])
  assert warmup == 2

  # transformers' Trainer.create_optimizer: two groups, decay per get_decay_parameter_names.
  decay_names = set(transformers.Trainer.get_decay_parameter_names(None, model))
  assert decay_names == {'embed_tokens.weight', 'q_proj.weight', 'lm_head.weight'}
  groups = [
      {'params': [p for n, p in model.named_parameters() if n in decay_names], 'weight_decay': kw['weight_decay']},
      {'params': [p for n, p in model.named_parameters() if n not in decay_names], 'weight_decay': 0.0},
  ]
  opt = torch.optim.AdamW(groups, lr=kw['learning_rate'], betas=(kw['adam_beta1'], kw['adam_beta2']),
                          eps=kw['adam_epsilon'])
  sched = transformers.get_scheduler(schedule_name, opt, num_warmup_steps=warmup,
                                     num_training_steps=kw['total_steps'])

  params = initial = _to_jax(model)
  state = tx.init(params)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(0)
  clipped_steps = 0
  for step in range(kw['total_steps']):
    # Micro-batch gradients (already divided by the step's token count): their SUM is the step's gradient.
    # The scale varies so that some steps are clipped (norm > 1) and some are not.
    scale = [0.02, 0.5, 0.05, 2.0, 0.1, 0.3][step]
    micro = [jax.tree.map(lambda x: (rng.standard_normal(x.shape) * scale).astype(np.float32), params)
             for _ in range(accumulation)]
    total = jax.tree.map(lambda *g: np.asarray(sum(jnp.asarray(x) for x in g)), *micro)
    updates, state = update(total, state, params)  # One update per step, on the sum (the train step's).
    params = jax.tree.map(np.asarray, optax.apply_updates(params, updates))

    assert opt.param_groups[0]['lr'] == schedule(step)
    model.embed_tokens.weight.grad = torch.tensor(total['embed_tokens']['embedding'])
    model.q_proj.weight.grad = torch.tensor(total['q_proj']['kernel'].T.copy())
    model.q_proj.bias.grad = torch.tensor(total['q_proj']['bias'])
    model.input_layernorm.weight.grad = torch.tensor(total['input_layernorm']['scale'])
    model.lm_head.weight.grad = torch.tensor(total['lm_head']['kernel'].T.copy())
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), kw['max_grad_norm'])
    np.testing.assert_allclose(float(optim.global_norm(total)), norm.item(), rtol=1e-6)
    clipped_steps += norm.item() > kw['max_grad_norm']
    opt.step()
    sched.step()
    opt.zero_grad()

    want = _to_jax(model)
    for name in want:
      for leaf in want[name]:
        np.testing.assert_allclose(params[name][leaf], want[name][leaf], rtol=0, atol=1e-6,
                                   err_msg=f'step {step} {name}.{leaf}')
  assert 0 < clipped_steps < kw['total_steps']
  counts = [int(s.count) for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
  assert counts == [kw['total_steps']]  # Adam's: one update per optimizer step.
  for name in params:  # Every parameter moved (lr 1e-2 over a few steps), so the comparison is not vacuous.
    for leaf in params[name]:
      assert np.abs(params[name][leaf] - initial[name][leaf]).mean() > 1e-3, f'{name}.{leaf}'


def test_no_clipping_when_max_grad_norm_is_zero():
  (tx, _), _ = _optimizer(lr_scheduler_type='constant', max_grad_norm=0.0, weight_decay=0.0)
  (tx_clip, _), _ = _optimizer(lr_scheduler_type='constant', max_grad_norm=1e-6, weight_decay=0.0)
  params = {'w': jnp.ones((3,))}
  grads = {'w': jnp.array([100.0, 0.0, -1.0])}
  # Adam with one step is sign-like for both; eps makes the clipped (tiny) gradient's update smaller.
  u, _ = tx.update(grads, tx.init(params), params)
  u_clip, _ = tx_clip.update(grads, tx_clip.init(params), params)
  np.testing.assert_allclose(u['w'], [-1e-2, 0.0, 1e-2], rtol=1e-5)
  assert abs(float(u_clip['w'][2])) < 0.6e-2
