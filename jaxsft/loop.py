"""The training loop: prefetched steps, one jitted optimizer step each, then a short list of actions.

`train` runs the steps from the resume point on. After every step each action's `after_step(run)` looks at the
shared `Run` (the state, the step, the logging window) and does its job when its interval comes: `Logger` (the
metrics row: metrics.jsonl, TensorBoard/W&B, the progress bar and console; the non-finite and token-count
checks on the steps it logs), `Evaluator` (eval loss and eval generations), `Checkpointer` (interval, epoch and
preemption saves; the final one in `at_end`) and `AccuracyCheck` (the synthetic held-out accuracy, `at_end`).
A new concern adds an action; the loop itself does not grow.

Timing: the first step of the run (compilation included) is timed on its own and reported once, with the
compilation alone, as 'compile_seconds' / 'first_step_seconds' in the first row; tokens/s, step_time and MFU
cover the later steps, without evaluation time and without the compilations of later row widths
(jaxsft/data/buckets.py); 'non_padding' is the share of the computed positions that are tokens.
"""

import dataclasses
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft import checkpoint
from jaxsft import config as config_lib
from jaxsft import evals
from jaxsft import guard
from jaxsft import metrics as metrics_lib
from jaxsft import preemption as preemption_lib
from jaxsft import reporting
from jaxsft import run_dir
from jaxsft import step as step_lib
from jaxsft import storage
from jaxsft.data import pipeline
from jaxsft.data import prepare
from jaxsft.prefetch import Prefetcher

log = metrics_lib.log


@dataclasses.dataclass
class Run:
  """What the loop and its actions share: the state after `step`, and the steps not logged yet (`window`: one list
  of per-micro-batch device sums per step; `window_targets`: the data index's loss-token count of the latest of
  them, for the contract check)."""
  config: Any
  mesh: Any
  step_fn: step_lib.TrainStep
  state: Any
  data: prepare.Data
  meta: run_dir.RunMeta
  throughput: metrics_lib.Throughput
  guard: guard.Guard
  step: int
  num_tokens: int
  window: list
  window_targets: list = dataclasses.field(default_factory=list)
  loader_state: Any = None
  last_row: dict = dataclasses.field(default_factory=dict)
  reporter: reporting.Reporter | None = None  # Set by `train`.

  @property
  def geometry(self):
    return self.data.train.geometry

  def epoch_end(self) -> bool:
    return self.step % self.geometry.steps_per_epoch == 0 or self.step == self.geometry.total_steps

  def model(self):
    return self.step_fn.model(self.state['params'])


class Logger:
  """Every `logging_steps` steps (and the last): one metrics row, after the guard and the loss contract's checks."""

  def __init__(self, config, schedule, start_step: int):
    self.every, self.schedule, self.start_step = config.logging_steps, schedule, start_step
    self.skip_policy = config.nonfinite_policy == 'skip'
    self.bar = reporting.ProgressBar(0, 0, disable=True)
    self._t_start = time.perf_counter()
    self._first_row_extra = {}

  def attach(self, bar: reporting.ProgressBar) -> None:
    self.bar = bar

  def after_step(self, run: Run, element: dict) -> None:
    if run.step == self.start_step + 1:  # Compilation and warm-up: timed on their own, kept out of tokens/s.
      jax.block_until_ready(run.state)
      self._first_row_extra = {'compile_seconds': run.step_fn.compile_seconds,
                               'first_step_seconds': time.perf_counter() - self._t_start}
      log(f'first step (compilation included) took {self._first_row_extra["first_step_seconds"]:.1f}s')
      run.throughput.reset()
    else:
      run.throughput.exclude(run.step_fn.last_compile_seconds)  # A new row width compiled: not step time.
      run.throughput.add_step(element['num_targets'], element['num_input_tokens'],
                              [s['attended_keys'] for s in run.window[-1] if 'attended_keys' in s] or None,
                              num_positions=element['num_positions'])
    self.bar.step()
    if run.step % self.every and run.step != run.geometry.total_steps:
      return
    run.guard.check(run.window, run.step)  # Waits for the devices.
    step_lib.check_token_counts(run.window[len(run.window) - len(run.window_targets):], run.window_targets,
                                run.step)
    row = log_row(run.window, run.step, run.geometry, self.schedule, run.num_tokens)
    if self.skip_policy:
      row['skipped_steps'] = run.guard.skipped
    row.update(run.throughput.measure())
    peak = metrics_lib.peak_memory_bytes()
    if peak is not None:
      row['peak_memory_gib'] = peak / 2**30
    row.update(self._first_row_extra)
    self._first_row_extra = {}
    run.reporter.write(row)
    self.bar.show(row)
    log(' '.join(f'{k}={_fmt(v)}' for k, v in row.items()))
    run.last_row = row
    run.window, run.window_targets = [], []


class Evaluator:
  """Eval loss (and eval generations) every `eval_steps` steps or at each epoch's end (eval_strategy)."""

  def __init__(self, config, tokenizer):
    self.config, self.tokenizer = config, tokenizer

  def after_step(self, run: Run, element: dict) -> None:
    del element
    config = self.config
    every = config_lib.eval_interval(config, run.geometry.total_steps) if config.eval_strategy == 'steps' else 0
    if run.data.eval is None or not ((every and run.step % every == 0)
                                     or (config.eval_strategy == 'epoch' and run.epoch_end())):
      return
    jax.block_until_ready(run.state)  # The training steps before it are training time...
    run.throughput.pause()  # ...evaluation is not.
    t0 = time.perf_counter()
    row = evals.eval_loss(run.mesh, run.step_fn, run.state['params'], run.data.eval)
    row.update(step=run.step, epoch=run.step / run.geometry.steps_per_epoch, eval_runtime=time.perf_counter() - t0)
    run.reporter.write(row)
    log(' '.join(f'{k}={_fmt(v)}' for k, v in row.items()))
    run.last_row = {**run.last_row, **row}
    if config.eval_generation_prompts > 0:
      self._generations(run)
    run.throughput.resume()

  def _generations(self, run: Run) -> None:
    """Answers the first `eval_generation_prompts` usable prompts of the eval split; reports them as text."""
    config, t0 = self.config, time.perf_counter()
    rows = evals.eval_generations(
        run.model(), self.tokenizer, run.data.eval.steps.source, num_prompts=config.eval_generation_prompts,
        max_new_tokens=config.eval_generation_max_new_tokens, temperature=config.eval_generation_temperature,
        top_p=config.eval_generation_top_p, seed=config.seed + run.step, max_prompt_tokens=config.max_length,
        generation_config=run.meta.generation_config)
    run.reporter.text('eval_generations', run.step, rows)
    for row in rows[:2]:
      log(f'eval generation: {json.dumps(row)[:500]}')
    log(f'eval generations: {len(rows)} prompts answered in {time.perf_counter() - t0:.1f}s')


class Checkpointer:
  """Saves every `save_steps` steps, at each epoch's end, at the end, and on SIGTERM/SIGINT (then stops)."""

  def __init__(self, config, manager: checkpoint.Manager, start_step: int, total_steps: int):
    self.manager = manager
    self.every = config_lib.save_interval(config, total_steps)
    self.saved_step = start_step if start_step else None
    self.preemption = preemption_lib.Preemption()

  def after_step(self, run: Run, element: dict) -> None:
    del element
    preempted = self.preemption.reached(run.step)  # Every process asks at every step (the sync protocol needs it).
    if preempted or run.epoch_end() or (self.every and run.step % self.every == 0):
      self.save(run)
    if preempted:
      self.manager.wait()
      raise preemption_lib.Preempted(self.preemption.signum, run.step, storage.join(self.manager.root, str(run.step)))

  def save(self, run: Run) -> None:
    run.guard.check(run.window, run.step)  # Never a checkpoint of non-finite state.
    meta = dataclasses.replace(run.meta, step=run.step, num_tokens=run.num_tokens, log_window=_host_window(run.window),
                               skipped_steps=run.guard.skipped)
    t0 = time.perf_counter()
    self.manager.save(run.step, run.state, meta.to_json())
    log(f'checkpoint {run.step}: saving in the background ({time.perf_counter() - t0:.2f}s blocking)')
    self.saved_step = run.step

  def at_end(self, run: Run) -> None:
    if self.saved_step != run.step:
      self.save(run)
    self.manager.wait()
    if self.manager.last_save.get('total_seconds') is not None:
      log(f'checkpoint {self.saved_step} written ({self.manager.last_save["total_seconds"]:.2f}s from start to '
          'complete)')

  def close(self) -> None:
    self.preemption.close()


class AccuracyCheck:
  """After training: the held-out exact-match accuracy of a 'synthetic:' dataset (accuracy_eval_problems)."""

  def __init__(self, config, tokenizer):
    self.config, self.tokenizer = config, tokenizer

  def after_step(self, run: Run, element: dict) -> None:
    del run, element

  def at_end(self, run: Run) -> None:
    if self.config.accuracy_eval_problems <= 0:
      return
    row = evals.accuracy_check(self.config, run.model(), self.tokenizer, run.step)
    run.reporter.write(row)
    run.last_row.update(row)


def train(run: Run, schedule, tokenizer, manager: checkpoint.Manager):
  """Runs the steps from `run.step` on, then the end actions; returns (state, the last metrics row)."""
  config = run.config
  start = run.step
  # metrics.jsonl + TensorBoard/W&B (report_to); first, so that a W&B failure leaves nothing running.
  run.reporter = reporting.Reporter.from_config(config, run.meta.config, start)
  loader = pipeline.Loader(run.data.train.steps, start=start, num_workers=config.dataloader_num_workers)
  logger = Logger(config, schedule, start)
  checkpointer = Checkpointer(config, manager, start, run.geometry.total_steps)
  actions = [logger, Evaluator(config, tokenizer), checkpointer, AccuracyCheck(config, tokenizer)]
  bar = reporting.ProgressBar(run.geometry.total_steps, start,
                              disable=config.disable_tqdm or not metrics_lib.is_main_process())
  logger.attach(bar)
  exit_code, preempting = 1, False  # How the run ended, for W&B; a failure until the loop completes.
  prefetcher = Prefetcher(loader, run.mesh)
  try:
    for element, global_batches, run.loader_state in prefetcher:
      inv = jnp.float32(1.0 / max(element['num_targets'], 1))
      run.state, step_sums = run.step_fn(run.state, global_batches, inv, run.step)  # Sums per micro-batch.
      run.step += 1
      run.num_tokens += element['num_targets']
      run.window.append(step_sums)
      run.window_targets.append(element['num_targets'])
      for action in actions:
        action.after_step(run, element)
    for action in actions:
      if hasattr(action, 'at_end'):
        action.at_end(run)
    exit_code = 0
  except preemption_lib.Preempted as e:
    exit_code, preempting = 128 + e.signum, True  # As the CLI exits; W&B marks the run preempted, not failed.
    raise
  except KeyboardInterrupt:
    exit_code = 130
    raise
  finally:
    prefetcher.close()
    checkpointer.close()
    bar.close()
    run.reporter.close(exit_code, preempted=preempting)  # W&B records how the run ended (non-zero: failed).
  return run.state, run.last_row


def _host_window(window) -> list:
  """The logging window's per-micro-step sums as JSON floats (float32 values round-trip exactly)."""
  return [[{k: float(v) for k, v in sums.items()} for sums in step_sums] for step_sums in jax.device_get(window)]


def log_row(window, step, geometry, schedule, num_tokens_total) -> dict:
  """Reduces a logging window of steps to one metrics row (mean of the per-step losses, as TRL).

  Fetching the window's sums from the devices is the loop's only synchronisation point.
  """
  host = jax.device_get(window)
  losses, accs, ents = [], [], []
  for step_sums in host:
    num = max(sum(float(s['num_tokens']) for s in step_sums), 1.0)
    losses.append(sum(float(s['loss_sum']) for s in step_sums) / num)
    accs.append(sum(float(s['num_correct']) for s in step_sums) / num)
    ents.append(sum(float(s['entropy_sum']) for s in step_sums) / num)
  return {
      'step': step,
      'loss': float(np.mean(losses)),
      'learning_rate': float(schedule(step - 1)),
      'grad_norm': float(host[-1][-1]['grad_norm']),
      'mean_token_accuracy': float(np.mean(accs)),
      'entropy': float(np.mean(ents)),
      'num_tokens': int(num_tokens_total),
      'epoch': step / geometry.steps_per_epoch,
  }


def _fmt(v):
  if isinstance(v, float):
    return f'{v:.4g}'
  return str(v)
