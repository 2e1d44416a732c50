"""Learning-rate schedules, AdamW with the weight-decay mask, and clipping (accumulation: jaxsft/step.py).

Everything follows the Hugging Face Trainer path that TRL's SFTTrainer takes (torch.optim.AdamW,
torch.nn.utils.clip_grad_norm_, transformers.get_scheduler), so a recipe ported from open-r1 trains with
the same learning rates and updates. tests/test_optim.py checks this against transformers and torch.

Schedules are exact on the host: called with a Python or NumPy integer they compute in Python floats with
transformers' own expressions (the learning rate logged is transformers' value to the last bit); traced
inside jit (optax's step counter) they compute the same expressions in float32.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsft import fields
from jaxsft.errors import InputError

SCHEDULES = fields.SCHEDULES  # transformers' names; config.validate checks the name.


def num_warmup_steps(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
  """Warmup length as transformers resolves it: `warmup_steps` if > 0, else ceil(warmup_ratio × total)."""
  if warmup_steps > 0:
    return int(warmup_steps)
  return math.ceil(total_steps * warmup_ratio)


class _HostMath:
  """The three operations the schedules need, on Python floats (float64, as transformers computes)."""
  where = staticmethod(lambda cond, a, b: a if cond else b)
  maximum = staticmethod(max)
  cos = staticmethod(math.cos)


def _is_host_step(step) -> bool:
  return isinstance(step, (int, np.integer)) or (isinstance(step, np.ndarray) and step.ndim == 0)


def make_schedule(name: str, *, learning_rate: float, total_steps: int, warmup_steps: int,
                  min_lr_rate: float | None = None) -> optax.Schedule:
  """lr(step): the learning rate of the (step + 1)-th optimizer update, as transformers computes it.

  lr(step) equals `transformers.get_scheduler(name, optimizer, warmup_steps, total_steps, kwargs)` after
  `step` calls of `scheduler.step()`; i.e. `learning_rate × lambda(step)` with transformers' lr lambdas:
  linear warmup `step / max(1, warmup)` for step < warmup, then constant, linear decay to 0 at
  `total_steps`, or half-cosine decay (to `min_lr_rate × learning_rate` for 'cosine_with_min_lr').

  Args:
    name: one of SCHEDULES (config field `lr_scheduler_type`).
    learning_rate: the peak learning rate.
    total_steps: number of optimizer updates of the run.
    warmup_steps: resolved warmup length (see `num_warmup_steps`).
    min_lr_rate: for 'cosine_with_min_lr': the final learning rate as a fraction of `learning_rate`.

  Returns:
    An optax schedule: exact Python float for a host integer step, float32 array for a traced step.
  """
  if name not in SCHEDULES:
    raise InputError(f'config field \'lr_scheduler_type\' is {name!r}; expected one of {", ".join(SCHEDULES)}')
  if name == 'cosine_with_min_lr' and min_lr_rate is None:
    raise InputError("config field 'min_lr_rate' must be set for lr_scheduler_type 'cosine_with_min_lr'")
  warmup = int(warmup_steps)
  total = int(total_steps)
  floor = float(min_lr_rate) if name == 'cosine_with_min_lr' else 0.0
  num_cycles = 0.5  # transformers' default: half a cosine wave, from the peak down to the floor.

  def factor(step, xp):
    # The expressions (and their evaluation order) of transformers.optimization's lr lambdas.
    warm = step / float(max(1, warmup))
    if name == 'constant':
      return 1.0
    if name == 'constant_with_warmup':
      return xp.where(step < warmup, warm, 1.0)
    if name == 'linear':
      decay = xp.maximum(0.0, (total - step) / float(max(1, total - warmup)))
      return xp.where(step < warmup, warm, decay)
    progress = (step - warmup) / float(max(1, total - warmup))
    cosine = 0.5 * (1.0 + xp.cos(math.pi * float(num_cycles) * 2.0 * progress))
    cosine = xp.maximum(0.0, cosine * (1 - floor) + floor)
    return xp.where(step < warmup, warm, cosine)

  def schedule(step):
    if _is_host_step(step):
      return learning_rate * factor(float(int(step)), _HostMath)
    step = jnp.asarray(step).astype(jnp.float32)
    return jnp.asarray(learning_rate, jnp.float32) * jnp.asarray(factor(step, jnp), jnp.float32)

  return schedule


def _key_name(key) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def decay_mask(params: Any) -> Any:
  """True for the leaves that weight decay applies to (transformers' Trainer rule).

  False for any leaf whose path has a component equal to 'bias' or containing 'norm' (RMSNorm scales,
  q_norm / k_norm); True otherwise, embeddings and lm_head included. Works on an `nnx.State` of `nnx.Param`
  and on plain nested dicts alike (it reads `jax.tree_util` key paths); the result has the structure of
  `params` with bool leaves.
  """

  def decays(path, _) -> bool:
    names = [_key_name(k).lower() for k in path]
    return not any(n == 'bias' or 'norm' in n for n in names)

  return jax.tree_util.tree_map_with_path(decays, params)


def global_norm(tree: Any) -> jax.Array:
  """The L2 norm of all leaves together, accumulated in float32."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in leaves))


def make_optimizer(*, learning_rate: float, lr_scheduler_type: str, total_steps: int, warmup_steps: int,
                   warmup_ratio: float, min_lr_rate: float | None, weight_decay: float, adam_beta1: float,
                   adam_beta2: float, adam_epsilon: float,
                   max_grad_norm: float) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW + global-norm clipping with transformers' schedule; and the schedule.

  The transformation is `chain(clip_by_global_norm, adamw)`: one `update` per optimizer step, given the SUM of
  the step's micro-batch gradients, each ALREADY divided by the total number of loss tokens of the whole step
  (all micro-batches, all devices): exactly the gradient of the step's token-mean loss, as TRL computes it with
  `num_items_in_batch`, independent of how the step is split. The train step (jaxsft/step.py) does the summing
  inside one jitted call, so no accumulator lives in the optimizer state (as `optax.MultiSteps` keeps one).

  Differences from torch (the transformers Trainer path), all at rounding level:
  - torch.nn.utils.clip_grad_norm_ scales by min(1, max_norm / (norm + 1e-6)); optax by max_norm / norm
    when norm >= max_norm. The update differs by a relative ~1e-6 / norm, and only on clipped steps.
  - torch.optim.AdamW decays first, `p *= 1 - lr·wd`, then `p -= lr·m̂ / (sqrt(v̂) + eps)`; optax adds
    `wd·p` to the Adam direction and scales by -lr: the same update algebraically.

  Args:
    learning_rate, lr_scheduler_type, min_lr_rate: see `make_schedule`.
    total_steps: optimizer updates of the run.
    warmup_steps, warmup_ratio: resolved with `num_warmup_steps`.
    weight_decay: decoupled weight decay, masked by `decay_mask`.
    adam_beta1, adam_beta2, adam_epsilon: AdamW's hyperparameters (eps added outside the square root).
    max_grad_norm: clip the step's gradient to this global norm; <= 0 disables clipping.

  Returns:
    (the transformation, the schedule: lr of update number `step`, counted from 0).
  """
  warmup = num_warmup_steps(total_steps, warmup_steps, warmup_ratio)
  schedule = make_schedule(lr_scheduler_type, learning_rate=learning_rate, total_steps=total_steps,
                           warmup_steps=warmup, min_lr_rate=min_lr_rate)
  parts = []
  if max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(max_grad_norm))
  parts.append(optax.adamw(schedule, b1=adam_beta1, b2=adam_beta2, eps=adam_epsilon,
                           weight_decay=weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule
