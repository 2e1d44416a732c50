"""Training on finite numbers only: non-finite weights, losses and gradients stop the run (or skip the step).

* `check_params`: the weights a run starts from (loaded, initialised or restored) are all finite, checked once,
  before the first step; a NaN or inf names the first parameter that holds one.
* `Guard`, a loop action: every step's loss and gradient norm are looked at whenever the loop fetches its
  sums anyway (each logged row) and before every checkpoint, so no non-finite state is ever saved.
  `nonfinite_policy='stop'` (the default) raises `NonFiniteError` naming the first such step: the run exits
  non-zero, keeps every checkpoint written before it and exports nothing. `'skip'`: the train step itself
  leaves the parameters and optimizer state unchanged at a step whose gradient norm is not finite (jaxsft/
  step.py), and the guard counts those steps (`skipped_steps` in metrics.jsonl).
  It also warns, once, when the gradient norm has been exactly 0 and the loss has not moved for
  `STALL_STEPS` steps in a row: the model is not learning (a diverged learning rate saturates the softmax).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft import metrics as metrics_lib
from jaxsft.errors import InputError

STALL_STEPS = 10


class NonFiniteError(RuntimeError):
  """A step produced a non-finite loss or gradient norm (policy 'stop')."""


def check_params(params, where: str) -> None:
  """Raises InputError naming the first parameter of `params` (an nnx State) with a NaN or inf."""
  finite = jax.jit(lambda p: jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), p))(params)
  for path, ok in jax.tree_util.tree_flatten_with_path(jax.device_get(finite))[0]:
    if not bool(ok):
      name = '.'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
      raise InputError(f'the weights {where} hold non-finite values (first: {name}); nothing was trained')


def _step_values(step_sums: list[dict]) -> tuple[float, float]:
  """(loss, grad_norm) of one step from its micro-batches' host sums."""
  tokens = max(sum(float(s['num_tokens']) for s in step_sums), 1.0)
  return sum(float(s['loss_sum']) for s in step_sums) / tokens, float(step_sums[-1]['grad_norm'])


class Guard:
  """The non-finite and stalled-training checks of the loop (see the module docstring)."""

  def __init__(self, policy: str, learning_rate: float, skipped: int = 0):
    self.policy = policy
    self.learning_rate = learning_rate
    self.skipped = skipped  # Steps skipped so far (policy 'skip'), a checkpoint restores it.
    self._checked = 0  # The last step looked at.
    self._stall = []  # (step, loss) of the latest steps with grad_norm exactly 0 and the loss unchanged.
    self._warned = False

  def check(self, window: list, last_step: int) -> None:
    """Looks at the steps of `window` (device or host sums, one list per step, the last being `last_step`) that it
    has not seen yet; raises NonFiniteError at the first non-finite one under policy 'stop'."""
    host = jax.device_get(window)
    first = last_step - len(host) + 1
    for step, step_sums in enumerate(host, start=first):
      if step <= self._checked:
        continue
      self._checked = step
      loss, grad_norm = _step_values(step_sums)
      if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        what = ' and '.join(f'the {name} is {value}' for name, value in (('loss', loss), ('gradient norm', grad_norm))
                            if not math.isfinite(value))
        if self.policy == 'stop':
          raise NonFiniteError(f'step {step}: {what}; the run stops there (nonfinite_policy=stop): checkpoints up to '
                               f'step {step - 1} are kept and nothing is exported')
        if math.isfinite(grad_norm):  # The update used a finite gradient: the step ran.
          metrics_lib.log(f'warning: step {step}: {what}; its gradient was finite, so the step was applied')
          continue
        self.skipped += 1
        metrics_lib.log(f'warning: step {step}: {what}; the step was skipped (nonfinite_policy=skip, '
                        f'{self.skipped} so far)')
        continue
      self._watch_stall(step, loss, grad_norm)

  def _watch_stall(self, step: int, loss: float, grad_norm: float) -> None:
    if grad_norm != 0.0 or (self._stall and not np.isclose(loss, self._stall[-1][1], rtol=1e-6, atol=0)):
      self._stall = []
      if grad_norm != 0.0:
        return
    self._stall.append((step, loss))
    if len(self._stall) >= STALL_STEPS and not self._warned:
      self._warned = True
      metrics_lib.log(f'warning: steps {self._stall[0][0]}-{step}: the gradient norm is 0 and the loss has not moved '
                      f'({loss:.6g}): the model is not learning (is learning_rate={self.learning_rate:g} too large?)')
