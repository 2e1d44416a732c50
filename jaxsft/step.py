"""The jitted train and eval steps, and the loss-normalisation contract, once.

One optimizer step is one call: `TrainStep(state, micro_batches, inv_step_tokens)` with the step's micro-batches
(global arrays of `[B, T]` per key). Each micro-batch's gradient is its token-sum loss gradient times
`inv_step_tokens` = 1 / (the step's loss tokens over every micro-batch, device and host; the host counts them
from the data index before the step runs); the gradients are summed and the optimizer applies one update to the
sum. That sum is the gradient of the step's token-mean loss, as TRL computes it with `num_items_in_batch`,
whatever the split into micro-batches and devices. The arithmetic is `optax.MultiSteps(use_grad_mean=False)`'s:
zeros, plus each micro-gradient in order, then one inner update.

Memory (why not MultiSteps): MultiSteps keeps the accumulated gradients in the optimizer state, so a float32
copy of the parameters sits in device memory, and in every checkpoint, even when a step has one micro-batch. Here
a step of one micro-batch is one program (`step`: forward, backward, update) with no accumulator at all; a step
of G > 1 runs `accumulate` G times (forward, backward, the gradient added in place into a donated accumulator
that exists only during the step) and then `apply` (clip, AdamW). Measured with the real TPU compiler (libtpu
0.0.42.1, Qwen2.5-7B FSDP over a v5p-32, 2 rows of 4096 tokens per chip, peak per chip): one micro-batch 13.24
GiB (MultiSteps: 15.0). Four micro-batches: MultiSteps' micro-step 15.0 GiB; the last micro-batch fused with
the update 15.01; all four scanned in one program 16.91 (the scan's carry and the micro-batch's gradient are
live together); `accumulate` 11.57 + the optimizer state resident beside it 3.55 = 15.12, `apply` 7.10. This
form is within 1% of the best of them with a single forward/backward program for any G (compile time).
"""

import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxsft import loss as loss_lib
from jaxsft import metrics as metrics_lib
from jaxsft import optim
from jaxsft.models import lora as lora_lib


class TrainStep:
  """The train step (forward, chunked masked cross-entropy, gradients summed over the micro-batches, one optax
  update) as jitted programs (see the module docstring), and the eval step (loss sums only).

  `__call__(state, micro_batches, inv)`: one optimizer step over any number of micro-batches, through executables
  compiled (timed, their memory logged) on first use; returns (state, one dict of sums per micro-batch, the last
  with the step's 'grad_norm'). `step(state, batch, inv)`: the same for one micro-batch, with its sums dict.
  """

  def __init__(self, graphdef, tx: optax.GradientTransformation, loss_chunk_size: int, *,
               state_shardings=None, attention_windows: tuple[int | None, ...] | None = None,
               skip_nonfinite: bool = False, frozen: nnx.State | None = None, dropout_seed: int = 0):
    """`attention_windows` (one per layer, `metrics.layer_windows`): the sums also hold 'attended_keys'.
    `skip_nonfinite`: a step whose gradient norm is not finite leaves the state unchanged (jaxsft/guard.py).
    `frozen`: the parameters that are not trained (a LoRA run's base; jaxsft/state.py), an argument of every
    program, never differentiated nor donated. `dropout_seed`: LoRA dropout's masks are drawn from it and the
    micro-batch's number (the same masks after a resume)."""
    self.skip_nonfinite = skip_nonfinite
    self.graphdef = graphdef  # The model's structure; its parameters are the state's and `frozen`.
    self.frozen = nnx.State({}) if frozen is None else frozen
    self.dropout_seed = dropout_seed
    self.tx = tx
    self.loss_chunk_size = loss_chunk_size
    self.attention_windows = attention_windows
    self.compile_seconds = None  # Of the programs compiled for the first step.
    self.last_compile_seconds = 0.0  # Of those compiled by the last call (a new row width: data/buckets.py).
    self._compiled = {}
    # With shardings: the new state keeps the partitioning of the old one (and its buffers, donated); the
    # accumulator is partitioned as the parameters (ZeRO-3: as their gradients are reduce-scattered).
    params_out = None if state_shardings is None else state_shardings['params']
    state_out = None if state_shardings is None else (state_shardings, None)
    self._programs = {
        'step': jax.jit(self._step, donate_argnums=(0,), out_shardings=state_out),
        'accumulate': jax.jit(self._accumulate, donate_argnums=(0,),
                              out_shardings=None if params_out is None else (params_out, None)),
        # The accumulator is not donated to `apply`: no output could reuse it (XLA would warn and ignore it).
        'apply': jax.jit(self._apply, donate_argnums=(0,), out_shardings=state_out),
    }
    self._zeros = jax.jit(lambda params: jax.tree.map(jnp.zeros_like, params), out_shardings=params_out)
    self._eval = jax.jit(self.loss_sums)

  @staticmethod
  def programs(num_micro_batches: int) -> tuple[str, ...]:
    """The programs a step of that many micro-batches runs."""
    return ('step',) if num_micro_batches == 1 else ('accumulate', 'apply')

  def lower(self, name: str, state, batch, inv_step_tokens):
    """Lowers program `name` ('step' | 'accumulate' | 'apply') for these (possibly abstract) arguments."""
    acc = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=getattr(p, 'sharding', None)),
                       state['params'])
    micro = jax.ShapeDtypeStruct((), jnp.int32)
    if name == 'step':
      return self._programs[name].lower(state, self.frozen, batch, inv_step_tokens, micro)
    if name == 'accumulate':
      return self._programs[name].lower(acc, state['params'], self.frozen, batch, inv_step_tokens, micro)
    return self._programs[name].lower(state, acc)

  def model(self, params):
    """The model of these trained parameters (and the frozen ones)."""
    return nnx.merge(self.graphdef, params, self.frozen)

  def eval_step(self, params, batch):
    """The loss sums of one batch (jitted; no dropout)."""
    return self._eval(params, self.frozen, batch)

  def _run(self, name: str, *args):
    """Program `name` through an executable compiled (timed, memory logged) on first use with these shapes."""
    batch = next((a for a in args if isinstance(a, dict) and 'input_ids' in a), None)
    key = (name, None if batch is None else batch['input_ids'].shape)
    if key not in self._compiled:
      t0 = time.perf_counter()
      compiled = self._programs[name].lower(*args).compile()
      seconds = time.perf_counter() - t0
      shape = '' if batch is None else f" for {' × '.join(map(str, key[1]))} tokens"
      metrics_lib.log(f'compiled the train step\'s {name} program{shape} in {seconds:.1f}s, memory per device: '
                      f'{memory_report(compiled)}')
      self._compiled[key] = compiled
      self._compile_seconds_now += seconds
    return self._compiled[key](*args)

  def __call__(self, state, micro_batches: list, inv_step_tokens, step: int = 0):
    """`step`: the optimizer steps done before this one (numbers the micro-batches for LoRA dropout)."""
    self._compile_seconds_now = 0.0
    first = step * len(micro_batches)
    if len(micro_batches) == 1:
      state, sums = self._run('step', state, self.frozen, micro_batches[0], inv_step_tokens, jnp.int32(first))
      all_sums = [sums]
    else:
      acc = self._zeros(state['params'])
      all_sums = []
      for g, batch in enumerate(micro_batches):
        acc, sums = self._run('accumulate', acc, state['params'], self.frozen, batch, inv_step_tokens,
                              jnp.int32(first + g))
        all_sums.append(sums)
      state, grad_norm = self._run('apply', state, acc)
      all_sums[-1] = dict(all_sums[-1], grad_norm=grad_norm)
    if self.compile_seconds is None:
      self.compile_seconds = self._compile_seconds_now
    self.last_compile_seconds = self._compile_seconds_now
    return state, all_sums

  def step(self, state, batch, inv_step_tokens, step: int = 0):
    """One optimizer step of one micro-batch: (state, its sums with 'grad_norm')."""
    state, (sums,) = self(state, [batch], inv_step_tokens, step)
    return state, sums

  def loss_sums(self, params, frozen, batch, dropout_key=None):
    """The token-sum loss (and counts) of `batch`; LoRA dropout draws from `dropout_key` (None: off)."""
    # copy: `frozen` comes from outside the gradient's trace; the model's variables must all be of this one.
    model = nnx.merge(self.graphdef, params, frozen, copy=True)
    with lora_lib.dropout_key(dropout_key):
      hidden_BxTxD = model.hidden_states(batch['input_ids'], batch['positions'], batch['segment_ids'])
    targets_BxT, weights_BxT = loss_lib.next_token_targets(batch['input_ids'], batch['loss_mask'],
                                                           batch['segment_ids'])
    # A LoRA run's frozen parameters include the unembedding: its gradient is not computed.
    return loss_lib.cross_entropy_sums(hidden_BxTxD, model.unembedding(), targets_BxT, weights_BxT,
                                       chunk_size=self.loss_chunk_size, unembed_grad=not jax.tree.leaves(frozen))

  def _grads(self, params, frozen, batch, inv_step_tokens, micro):
    """The gradient of the micro-batch's token-sum loss × inv_step_tokens (trained parameters only); its sums."""
    dropout_key = jax.random.fold_in(jax.random.key(self.dropout_seed), micro)  # Unused without LoRA dropout.

    def objective(p):
      sums = self.loss_sums(p, frozen, batch, dropout_key)
      return sums['loss_sum'] * inv_step_tokens, sums

    grads, sums = jax.grad(objective, has_aux=True)(params)
    if self.attention_windows is not None:  # For MFU: the attention work this micro-batch actually does.
      sums['attended_keys'] = metrics_lib.attended_keys(batch['positions'], batch['segment_ids'],
                                                        self.attention_windows)
    return grads, sums

  def _accumulate(self, acc, params, frozen, batch, inv_step_tokens, micro):
    grads, sums = self._grads(params, frozen, batch, inv_step_tokens, micro)
    return jax.tree.map(jnp.add, acc, grads), sums

  def _step(self, state, frozen, batch, inv_step_tokens, micro):
    grads, sums = self._grads(state['params'], frozen, batch, inv_step_tokens, micro)
    state, sums['grad_norm'] = self._apply(state, grads)
    return state, sums

  def _apply(self, state, grads):
    """One optimizer update with the step's summed gradient; and its norm before clipping (as TRL logs it)."""
    updates, opt_state = self.tx.update(grads, state['opt_state'], state['params'])
    new_state = {'params': optax.apply_updates(state['params'], updates), 'opt_state': opt_state}
    grad_norm = optim.global_norm(grads)
    if self.skip_nonfinite:  # Selected in the program: the old state's buffers live until the select.
      new_state = jax.tree.map(lambda new, old: jnp.where(jnp.isfinite(grad_norm), new, old), new_state, state)
    return new_state, grad_norm


def check_token_counts(window: list, host_counts: list[int], last_step: int) -> None:
  """The loss contract's two counts agree, for each step of `window` (one list of micro-batch sums per step, the
  last being `last_step`): the loss tokens the devices summed ('num_tokens', every micro-batch, device and host)
  and the data index's count that `inv_step_tokens` was made of. A difference would mean the gradient was
  normalised by another count than the loss: a bug, never bad input.
  """
  first = last_step - len(window) + 1
  for step, (step_sums, expected) in enumerate(zip(jax.device_get(window), host_counts), start=first):
    counted = sum(float(sums['num_tokens']) for sums in step_sums)
    if abs(counted - expected) > 0.5 + 1e-6 * expected:  # Float32 sums are exact below 2**24 tokens a micro-batch.
      raise RuntimeError(f'step {step}: the devices counted {counted:.0f} loss tokens, the data index {expected} '
                         '(the gradient was normalised by the index\'s count): the loss contract is broken')


def memory_report(compiled) -> str:
  """Arguments, outputs and temporaries of a compiled executable, from XLA's memory analysis."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (some backends have none)
    m = None
  if m is None:
    return 'not available on this backend'
  return (f'arguments {gib(m.argument_size_in_bytes)}, outputs {gib(m.output_size_in_bytes)} '
          f'({gib(m.alias_size_in_bytes)} of them reuse donated arguments), temporaries '
          f'{gib(m.temp_size_in_bytes)}, code {gib(m.generated_code_size_in_bytes)}')


def gib(n: int) -> str:
  return f'{n / 2**30:.3f} GiB' if n >= 2**27 else f'{n / 2**20:.2f} MiB'
