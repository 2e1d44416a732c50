"""The training loop: composes config, model, data, loss and optimizer; owns all I/O.

One optimizer step = `gradient_accumulation_steps` micro-batches of `per_device_train_batch_size ×
devices` rows, run by one call of the train step (jaxsft/step.py, which owns the loss contract): the loss of
a step is the sum of token losses over every loss token of the step divided by that step's number of loss
tokens (TRL's `num_items_in_batch`), counted by the host before the step runs. The result does not depend on
how the step is split into micro-batches or devices.
"""

import dataclasses
import json
import os
import queue
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import config_dict

from jaxsft import checkpoint
from jaxsft import config as config_lib
from jaxsft import export as export_lib
from jaxsft import generate
from jaxsft import guard
from jaxsft import library_log
from jaxsft import loss as loss_lib
from jaxsft import metrics as metrics_lib
from jaxsft import optim
from jaxsft import reporting
from jaxsft import run_dir
from jaxsft import sharding
from jaxsft import step as step_lib
from jaxsft.data import index as index_lib
from jaxsft.data import pipeline
from jaxsft.data import prepare
from jaxsft.errors import InputError
from jaxsft.models import attention
from jaxsft.models import hf
from jaxsft.models import transformer

log = metrics_lib.log


def load_tokenizer(config: config_dict.ConfigDict, model_dir: str):
  """The tokenizer with the config's chat_template / eos_token overrides applied (as TRL does)."""
  import transformers  # pylint: disable=import-outside-toplevel
  name = config.tokenizer_name_or_path
  tok_dir = (str(hf.resolve_model_dir(name, config.model_revision, field='tokenizer_name_or_path',
                                      require_config=False)) if name else model_dir)
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
  except (OSError, ValueError) as e:
    field = 'tokenizer_name_or_path' if name else 'model_name_or_path'
    raise InputError(f'config field {field!r}: cannot load a tokenizer from {tok_dir!r} '
                     f'({" ".join(str(e).split())[:200]})') from None
  template = config_lib.load_chat_template(config.chat_template)
  if template:
    tokenizer.chat_template = template
  if config.eos_token:
    if config.eos_token not in tokenizer.get_vocab():
      raise InputError(f"config field 'eos_token': {config.eos_token!r} is not in the tokenizer's vocabulary")
    tokenizer.eos_token = config.eos_token
  if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer


def model_config(config: config_dict.ConfigDict, hf_cfg: dict) -> transformer.ModelConfig:
  """The model as `config` trains it: bf16 compute over float32 master weights (or float32), its remat."""
  return hf.model_config_from_hf(hf_cfg, dtype='bfloat16' if config.bf16 else 'float32', param_dtype='float32',
                                 attention_impl=config.model.attention_impl, remat=config_lib.remat_policy(config),
                                 scan_layers=config.model.scan_layers, mlp_chunk_size=config.model.mlp_chunk_size)


def make_optimizer(config: config_dict.ConfigDict, total_steps: int):
  """(AdamW with clipping, schedule) from the config's optimizer fields, for `total_steps` optimizer steps.

  Accumulation over a step's micro-batches happens inside the train step (jaxsft/step.py).
  """
  return optim.make_optimizer(
      learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler_type, total_steps=total_steps,
      warmup_steps=config.warmup_steps, warmup_ratio=config.warmup_ratio, min_lr_rate=config.min_lr_rate,
      weight_decay=config.weight_decay, adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2,
      adam_epsilon=config.adam_epsilon, max_grad_norm=config.max_grad_norm)


def build_model(config, model_dir: str, model_cfg: transformer.ModelConfig, shardings=None):
  """The model, its parameters created directly in their shards when `shardings` is given."""
  if config.model_init == 'random':
    return hf.init_random(model_cfg, config.seed, shardings=shardings)
  return hf.load_pretrained(model_dir, model_cfg, shardings=shardings)


def state_shardings(model_cfg: transformer.ModelConfig, tx: optax.GradientTransformation, mesh, *, warn=None):
  """(graphdef, abstract params, shardings of {'params', 'opt_state'}) from the rules, without any weights.

  The optimizer state's parameter-shaped leaves (Adam's moments) take
  their parameter's sharding: ZeRO-3 partitions them exactly as the parameters; counters are replicated.
  """
  graphdef, abstract_params, _ = nnx.split(hf.abstract_model(model_cfg), nnx.Param, ...)
  param_shardings = sharding.param_shardings(abstract_params, mesh, warn=warn)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                        transform_non_params=lambda _: sharding.replicated(mesh),
                                        is_leaf=lambda x: isinstance(x, nnx.Variable))
  return graphdef, abstract_params, {'params': param_shardings, 'opt_state': opt_shardings}


def init_state(config, model_dir: str, model_cfg: transformer.ModelConfig, tx, mesh):
  """Parameters and optimizer state, partitioned over the mesh by the rules; logs the bytes per device."""
  graphdef, _, shardings = state_shardings(model_cfg, tx, mesh, warn=log)
  # Each process reads (or draws) only the slices its devices hold: the model is never whole on a host.
  model = build_model(config, model_dir, model_cfg, shardings['params'])
  _, params, rest = nnx.split(model, nnx.Param, ...)
  del model
  opt_state = jax.jit(tx.init, out_shardings=shardings['opt_state'])(params)
  log(f"memory per device: parameters {_gib(sharding.bytes_per_device(params))}, optimizer state "
      f"{_gib(sharding.bytes_per_device(opt_state))} (mesh {dict(mesh.shape)})")
  return {'params': params, 'opt_state': opt_state}, shardings, graphdef, rest


_gib = step_lib.gib


class Preempted(Exception):
  """Training stopped on SIGTERM/SIGINT after saving a checkpoint; rerunning the command resumes it."""

  def __init__(self, signum: int, step: int, where: str):
    self.signum, self.step = signum, step
    super().__init__(f'stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved in {where!r}; '
                     'run the same command again to resume')


class Preemption:
  """SIGTERM / SIGINT → a checkpoint at the next step boundary, then a clean stop (TPU spot, SLURM, Ctrl-C).

  One process: a Python handler notes the signal. Several processes must all save at the same step, so the
  notice goes through jax's preemption sync service instead: `jax.distributed.initialize` installs its own
  SIGTERM handler, the service propagates the notice to every process and agrees on the first step they can
  all reach (`reached_preemption_sync_point`, called once per step on every process); SIGINT is forwarded to
  it as a SIGTERM. A second SIGINT stops the process at once; so does a second SIGTERM, except with several
  processes before the agreed step (jax's handler absorbs it, as it absorbs a SIGTERM outside the loop: use
  SIGKILL then). The process that got SIGINT exits with 130, the others with 143.
  """

  def __init__(self):
    self.signum = None
    self._multi = jax.process_count() > 1
    self._previous = {}
    if threading.current_thread() is not threading.main_thread():
      log('not on the main thread: SIGTERM/SIGINT will not save a checkpoint')
      return
    for signum in (signal.SIGINT,) if self._multi else (signal.SIGINT, signal.SIGTERM):
      self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.signum is not None:  # The second signal: stop now.
      raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
    self.signum = signum
    log(f'{signal.Signals(signum).name}: saving a checkpoint at the next step boundary (again to stop at once)')
    if self._multi:
      os.kill(os.getpid(), signal.SIGTERM)  # To jax's preemption notifier, which tells the other processes.

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step` (all processes get the same answer at the same step)."""
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      if multihost_utils.reached_preemption_sync_point(step):
        self.signum = self.signum or signal.SIGTERM
        # jax's handler absorbs every later SIGTERM; from here on one should stop the process, as documented.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        return True
      return False
    return self.signum is not None

  def close(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}


@dataclasses.dataclass
class Resume:
  """Where a run starts: step 0, or a checkpoint's step with the loop's saved state."""
  step: int = 0
  num_tokens: int = 0
  log_window: list = dataclasses.field(default_factory=list)
  skipped_steps: int = 0  # Steps skipped for a non-finite gradient (nonfinite_policy='skip').


def _resolved_config(config: config_dict.ConfigDict, extra: dict) -> dict:
  resolved = json.loads(config.to_json_best_effort())
  resolved['resolved'] = extra
  return resolved


def run(config: config_dict.ConfigDict) -> dict[str, Any]:
  """Trains per `config`; returns the final metrics row. Raises InputError for bad input."""
  config_lib.validate(config)
  reporting.check_report_to(config_lib.report_to(config))  # A missing package or W&B login fails here, not later.
  run_dir.check_shared(config.output_dir)
  # The lock is also the check that output_dir is writable, before any work; from then on, what libraries print
  # goes to OUTPUT_DIR/logs (a failed save is one line on the console, pointing there).
  with run_dir.RunLock(config.output_dir), library_log.LibraryLog(config.output_dir) as libraries:
    try:
      return _run(config)
    except checkpoint.CheckpointError as e:
      if libraries.count:
        raise checkpoint.CheckpointError(f"{e} (the libraries' messages are in {libraries.path})") from e
      raise


def _run(config: config_dict.ConfigDict) -> dict[str, Any]:
  start = run_dir.resume_point(config)

  # Everything that can fail on user input happens before any device work.
  mesh = sharding.make_mesh(config.mesh)
  model_dir = str(hf.resolve_model_dir(config.model_name_or_path, config.model_revision))
  hf_cfg = hf.read_hf_config(model_dir)
  model_cfg = model_config(config, hf_cfg)
  attention_impl = attention.resolve_impl(model_cfg.attention_impl, dtype=model_cfg.dtype,
                                          head_dim=model_cfg.head_dim)  # An impossible kernel fails here.
  tokenizer = load_tokenizer(config, model_dir)
  if len(tokenizer) > model_cfg.vocab_size:
    raise InputError(f'the tokenizer has {len(tokenizer)} tokens but the model at {model_dir!r} '
                     f'embeds only {model_cfg.vocab_size}')
  saved_meta = checkpoint.read_meta(*start) if start else None
  per_device, accumulation = config_lib.batch_split(config, jax.device_count())
  micro_batch_size = per_device * jax.device_count()
  data = prepare.prepare(config, tokenizer, micro_batch_size=micro_batch_size, accumulation=accumulation,
                         eval_batch_size=config.per_device_eval_batch_size * jax.device_count(),
                         process_index=jax.process_index(), process_count=jax.process_count(), log=log)
  geometry = data.train.geometry
  if config.accuracy_eval_problems > 0 and not (config.dataset_name or '').startswith('synthetic:'):
    raise InputError("config field 'accuracy_eval_problems' needs a 'synthetic:' dataset_name (set it to 0)")
  if attention_impl == 'cudnn':  # Size cuDNN's packed layout for the fullest row (+1: the padding run).
    splits = [data.train] + ([data.eval] if data.eval is not None else [])
    most = max(split.steps.max_documents_per_row for split in splits) + 1
    model_cfg = dataclasses.replace(model_cfg, max_segments=most)
  warmup = optim.num_warmup_steps(geometry.total_steps, config.warmup_steps, config.warmup_ratio)
  tx, schedule = make_optimizer(config, geometry.total_steps)
  resolved = _resolved_config(config, {
      'num_devices': jax.device_count(), 'num_processes': jax.process_count(),
      'mesh': dict(mesh.shape), 'micro_batch_size': micro_batch_size,
      'global_batch_size': micro_batch_size * geometry.accumulation,
      'steps_per_epoch': geometry.steps_per_epoch, 'total_steps': geometry.total_steps,
      'warmup_steps': warmup, 'num_rows': len(data.train.index), 'num_examples': len(data.train.index.kept),
      'num_dropped': data.train.index.num_dropped, 'num_bad_rows_skipped': data.train.index.num_bad,
      'num_packed_rows': len(data.train.plan), 'packing_efficiency': data.train.plan.efficiency,
      'data_fingerprint': index_lib.data_fingerprint(data.train.steps.source, tokenizer),
      'model': dataclasses.asdict(model_cfg)})
  if start:
    where = os.path.join(*map(str, start))
    for change in checkpoint.check_config(where, saved_meta['config'], resolved, config.resume_allow_changes):
      log(f'resuming with a changed config field: {change}')
    if saved_meta['step'] > geometry.total_steps:
      raise InputError(f'cannot resume from {where!r}: it is at step {saved_meta["step"]}, past this run\'s '
                       f'{geometry.total_steps} steps')
  log(f'training {geometry.total_steps} steps ({geometry.steps_per_epoch} per epoch) of '
      f'{geometry.accumulation} × {micro_batch_size} rows × {config.max_length} tokens on '
      f'{jax.device_count()} {jax.devices()[0].platform} device(s), mesh {dict(mesh.shape)}')

  if start:
    state, shardings, graphdef, rest = restore_state(start, model_cfg, tx, mesh)
    resume = Resume(step=saved_meta['step'], num_tokens=saved_meta['num_tokens'], log_window=saved_meta['log_window'],
                    skipped_steps=saved_meta.get('skipped_steps', 0))
    guard.check_params(state['params'], f'of checkpoint {where!r}')
  else:
    state, shardings, graphdef, rest = init_state(config, model_dir, model_cfg, tx, mesh)
    resume = Resume()
    guard.check_params(state['params'], 'initialised at random' if config.model_init == 'random'
                       else f'loaded from {model_dir!r}')
  # Written only now: a run that failed on its input (incompatible checkpoint, bad weights) changed nothing.
  if metrics_lib.is_main_process():
    os.makedirs(config.output_dir, exist_ok=True)
    run_dir.write_json_atomically(os.path.join(config.output_dir, 'config.json'), resolved)
    run_dir.save_tokenizer(tokenizer, config.output_dir)
  if start:
    run_dir.rewind_metrics(config.output_dir, resume.step)
    log(f'resumed from {where} at step {resume.step}')
  meta = {'config': resolved, 'hf_config': hf_cfg, 'model_dir': model_dir,
          'generation_config': export_lib.generation_config(model_dir, tokenizer),
          'chat_template': tokenizer.chat_template, 'eos_token': tokenizer.eos_token,
          'export_dtype': config_lib.export_dtype(config), 'rng': {'seed': config.seed}}
  manager = checkpoint.Manager(checkpoint.root_of(config.output_dir), max_to_keep=config.save_total_limit)
  try:
    with jax.set_mesh(mesh):
      num_params = sum(x.size for x in jax.tree.leaves(state['params']))
      log(f'model: {hf_cfg.get("model_type")} with {num_params / 1e6:.2f}M parameters '
          f'({"random init" if config.model_init == "random" else "from " + model_dir}), '
          f'compute {model_cfg.dtype}, remat {model_cfg.remat}, attention {attention_impl}')
      step_fn = step_lib.TrainStep(graphdef, rest, tx, config.model.loss_chunk_size, state_shardings=shardings,
                                   attention_windows=metrics_lib.layer_windows(model_cfg),
                                   skip_nonfinite=config.nonfinite_policy == 'skip')
      state, last_row = _train_loop(config, mesh, step_fn, state, data, schedule, model_cfg, manager, meta, resume,
                                    tokenizer)
      model = nnx.merge(graphdef, sharding.gather_to_host(state['params']), rest)
  finally:
    manager.close()
  export_dir = os.path.join(config.output_dir, 'hf')
  if metrics_lib.is_main_process():
    export_lib.write_hf_dir(model, hf_cfg, tokenizer, meta['generation_config'], export_dir,
                            dtype=meta['export_dtype'])
  log(f'exported the Hugging Face model to {export_dir}')
  return last_row


def restore_state(start: tuple[str, int], model_cfg: transformer.ModelConfig, tx, mesh):
  """The parameters and optimizer state of checkpoint `start`, placed by this mesh's rules (any mesh)."""
  graphdef, abstract_params, shardings = state_shardings(model_cfg, tx, mesh, warn=log)
  abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
  abstract_state = checkpoint.abstract({'params': abstract_params, 'opt_state': abstract_opt_state}, shardings)
  _, _, rest = nnx.split(hf.abstract_model(model_cfg), nnx.Param, ...)
  manager = checkpoint.Manager(start[0], read_only=True)
  try:
    state, _ = manager.restore(start[1], abstract_state)
  finally:
    manager.close()
  log(f"memory per device: parameters {_gib(sharding.bytes_per_device(state['params']))}, optimizer state "
      f"{_gib(sharding.bytes_per_device(state['opt_state']))} (mesh {dict(mesh.shape)})")
  return state, shardings, graphdef, rest


def _host_window(window) -> list:
  """The logging window's per-micro-step sums as JSON floats (float32 values round-trip exactly)."""
  return [[{k: float(v) for k, v in sums.items()} for sums in step_sums] for step_sums in jax.device_get(window)]


PREFETCH_STEPS = 2  # Optimizer steps whose batches wait on the devices ahead of the running one.


class Prefetcher:
  """Iterates a Loader's steps with their micro-batches already on the devices, `depth` steps ahead.

  A background thread pulls each step from the loader and turns its micro-batches into global arrays
  (`sharding.global_batch`: host → device transfers, no collective), while the main thread dispatches and
  runs the steps before it; a bounded queue keeps at most `depth` steps waiting (and the thread builds one
  more). Every process runs one such thread over its own loader, in step order, so all processes build the
  same steps' arrays in the same order. Yields `(element, global micro-batches, loader state)`, where the
  state is the loader's after that step: the state of the steps *consumed*, which is what a checkpoint must
  save (the loader itself is ahead by the prefetched steps). An error in the thread (bad data) is raised by
  the `__next__` that reaches its step. `depth=0`: no thread; each step is loaded and transferred when asked.
  """

  _END = object()

  def __init__(self, loader: pipeline.Loader, mesh, depth: int = PREFETCH_STEPS):
    self._loader, self._mesh = loader, mesh
    self._done = False
    self._thread = None
    if depth > 0:
      self._queue = queue.Queue(maxsize=depth)
      self._stop = threading.Event()
      self._thread = threading.Thread(target=self._fill, name='jaxsft-prefetch', daemon=True)
      self._thread.start()

  def _load(self):
    """The loader's next step, placed on the devices (StopIteration at the end)."""
    element = next(self._loader)
    state = self._loader.get_state()
    return element, [sharding.global_batch(self._mesh, batch) for batch in element['micro_batches']], state

  def _fill(self) -> None:
    try:
      while self._put(self._load()):
        pass
    except StopIteration:
      self._put(self._END)
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the consuming thread)
      self._put(_Failure(e))

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def __iter__(self):
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    if self._thread is None:
      try:
        return self._load()
      except StopIteration:
        self._done = True
        raise
    item = self._queue.get()
    if item is self._END:
      self._done = True
      raise StopIteration
    if isinstance(item, _Failure):
      self._done = True
      raise item.error
    return item

  def close(self) -> None:
    """Stops the thread (it finishes the step it is building) and drops the prefetched steps."""
    self._done = True
    if self._thread is None:
      return
    self._stop.set()
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=60)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


@dataclasses.dataclass
class _Failure:
  error: BaseException


def _train_loop(config, mesh, step_fn: step_lib.TrainStep, state, data: prepare.Data, schedule, model_cfg,
                manager: checkpoint.Manager, meta: dict, resume: Resume, tokenizer):
  """Runs the steps from `resume.step` on, then the held-out accuracy check if asked; returns (state, the last
  metrics row).

  Each evaluation also answers `eval_generation_prompts` prompts of the eval split with the KV-cache sampler on
  the training mesh (the sharded training parameters, nothing gathered), reported as text.

  Timing: the first step of the run (compilation included) is timed on its own and reported once, with
  the compilation alone, as 'compile_seconds' / 'first_step_seconds' in the first row; tokens/s, step_time
  and MFU cover the later steps, without evaluation time.
  """
  geometry = data.train.geometry
  # metrics.jsonl + TensorBoard/W&B (report_to); first, so that a W&B failure leaves nothing running.
  reporter = reporting.Reporter.from_config(config, meta['config'], resume.step)
  loader = pipeline.Loader(data.train.steps, start=resume.step, num_workers=config.dataloader_num_workers)
  eval_every = config_lib.eval_interval(config, geometry.total_steps) if config.eval_strategy == 'steps' else 0
  save_every = config_lib.save_interval(config, geometry.total_steps)
  throughput = metrics_lib.Throughput(model_cfg, config.max_length, jax.device_count())
  bar = reporting.ProgressBar(geometry.total_steps, resume.step,
                              disable=config.disable_tqdm or not metrics_lib.is_main_process())
  preemption = Preemption()
  nonfinite = guard.Guard(config.nonfinite_policy, config.learning_rate, skipped=resume.skipped_steps)
  window_sums, last_row = list(resume.log_window), {}  # The steps since the last logged row (for loss metrics).
  first_row_extra = {}  # Compilation timings, for the first row this run writes.
  num_tokens_total = resume.num_tokens
  step = resume.step
  saved_step = resume.step if resume.step else None
  loader_state = loader.get_state()  # After the steps consumed so far (the prefetcher runs ahead of it).
  t_start = time.perf_counter()
  exit_code, preempting = 1, False  # How the run ended, for W&B; a failure until the loop completes.
  prefetcher = Prefetcher(loader, mesh)

  def save(step):
    nonfinite.check(window_sums, step)  # Never a checkpoint of non-finite state.
    t0 = time.perf_counter()
    manager.save(step, state, dict(meta, loader=loader_state, num_tokens=num_tokens_total,
                                   log_window=_host_window(window_sums), skipped_steps=nonfinite.skipped))
    log(f'checkpoint {step}: saving in the background ({time.perf_counter() - t0:.2f}s blocking)')
    return step

  try:
    for element, global_batches, loader_state in prefetcher:
      step_tokens = element['num_targets']
      inv = jnp.float32(1.0 / max(step_tokens, 1))
      state, step_sums = step_fn(state, global_batches, inv)  # One dict of sums per micro-batch.
      step += 1
      num_tokens_total += step_tokens
      window_sums.append(step_sums)
      if step == resume.step + 1:  # Compilation and warm-up: timed on their own, kept out of tokens/s.
        jax.block_until_ready(state)
        first_row_extra = {'compile_seconds': step_fn.compile_seconds,
                           'first_step_seconds': time.perf_counter() - t_start}
        log(f'first step (compilation included) took {first_row_extra["first_step_seconds"]:.1f}s')
        throughput.reset()
      else:
        throughput.add_step(step_tokens, element['num_input_tokens'],
                            [sums['attended_keys'] for sums in step_sums if 'attended_keys' in sums] or None)
      bar.step()
      if step % config.logging_steps == 0 or step == geometry.total_steps:
        nonfinite.check(window_sums, step)  # Waits for the devices.
        last_row = _log_row(window_sums, step, geometry, schedule, num_tokens_total)
        if config.nonfinite_policy == 'skip':
          last_row['skipped_steps'] = nonfinite.skipped
        last_row.update(throughput.measure())
        peak = metrics_lib.peak_memory_bytes()
        if peak is not None:
          last_row['peak_memory_gib'] = peak / 2**30
        last_row.update(first_row_extra)
        first_row_extra = {}
        reporter.write(last_row)
        bar.show(last_row)
        log(' '.join(f'{k}={_fmt(v)}' for k, v in last_row.items()))
        window_sums = []
      epoch_end = step % geometry.steps_per_epoch == 0 or step == geometry.total_steps
      if data.eval is not None and ((eval_every and step % eval_every == 0)
                                    or (config.eval_strategy == 'epoch' and epoch_end)):
        jax.block_until_ready(state)  # The training steps before it are training time...
        throughput.pause()  # ...evaluation is not.
        t_eval = time.perf_counter()
        row = evaluate(mesh, step_fn, state['params'], data.eval)
        row.update(step=step, epoch=step / geometry.steps_per_epoch, eval_runtime=time.perf_counter() - t_eval)
        reporter.write(row)
        log(' '.join(f'{k}={_fmt(v)}' for k, v in row.items()))
        last_row = {**last_row, **row}
        if config.eval_generation_prompts > 0:
          _eval_generations(config, step_fn, state['params'], tokenizer, data.eval, meta, step, reporter)
        throughput.resume()
      preempted = preemption.reached(step)  # Every process asks at every step (the sync protocol needs it).
      if preempted or epoch_end or (save_every and step % save_every == 0):
        saved_step = save(step)
      if preempted:
        manager.wait()
        raise Preempted(preemption.signum, step, os.path.join(manager.root, str(step)))
    if saved_step != step:
      saved_step = save(step)
    manager.wait()
    if manager.last_save.get('total_seconds') is not None:
      log(f'checkpoint {saved_step} written ({manager.last_save["total_seconds"]:.2f}s from start to complete)')
    if config.accuracy_eval_problems > 0:
      row = _accuracy_eval(config, nnx.merge(step_fn.graphdef, state['params'], step_fn.rest), tokenizer, step)
      reporter.write(row)
      last_row.update(row)
    exit_code = 0
  except Preempted as e:
    exit_code, preempting = 128 + e.signum, True  # As the CLI exits; W&B marks the run preempted, not failed.
    raise
  except KeyboardInterrupt:
    exit_code = 130
    raise
  finally:
    prefetcher.close()
    preemption.close()
    bar.close()
    reporter.close(exit_code, preempted=preempting)  # W&B records how the run ended (non-zero: failed).
  return state, last_row


def evaluate(mesh, step_fn: step_lib.TrainStep, params, split: prepare.Split) -> dict:
  """eval_loss (token-weighted over the whole split) and eval_mean_token_accuracy.

  transformers' Trainer averages per-batch mean losses; here every loss token of the split weighs the same,
  so the figure does not depend on the eval batch size or on packing.
  """
  totals = dict.fromkeys(loss_lib.SUM_KEYS, 0.0)
  pending = None  # One batch in flight while the next is prepared.
  with Prefetcher(pipeline.Loader(split.steps), mesh) as batches:
    for _, (global_batch,), _ in batches:
      sums = step_fn.eval_step(params, global_batch)
      if pending is not None:
        _accumulate(totals, pending)
      pending = sums
  if pending is not None:
    _accumulate(totals, pending)
  num = max(float(totals['num_tokens']), 1.0)
  return {'eval_loss': float(totals['loss_sum']) / num, 'eval_mean_token_accuracy': float(totals['num_correct']) / num,
          'eval_entropy': float(totals['entropy_sum']) / num, 'eval_num_tokens': int(totals['num_tokens'])}


def _accumulate(totals: dict, sums) -> None:
  for key, value in jax.device_get(sums).items():  # float64 on the host: exact enough for any split size.
    totals[key] += float(value)


def _log_row(window, step, geometry, schedule, num_tokens_total) -> dict:
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


def _eval_generations(config, step_fn: step_lib.TrainStep, params, tokenizer, split: prepare.Split, meta: dict,
                      step: int, reporter: reporting.Reporter) -> None:
  """Answers the first `eval_generation_prompts` usable prompts of the eval split; reports them as text."""
  t0 = time.perf_counter()
  rows = generate.eval_generations(
      nnx.merge(step_fn.graphdef, params, step_fn.rest), tokenizer, split.steps.source,
      num_prompts=config.eval_generation_prompts, max_new_tokens=config.eval_generation_max_new_tokens,
      temperature=config.eval_generation_temperature, top_p=config.eval_generation_top_p, seed=config.seed + step,
      max_prompt_tokens=config.max_length, eos_ids=generate.eos_ids_of(tokenizer, meta['generation_config']))
  reporter.text('eval_generations', step, rows)
  for row in rows[:2]:
    log(f'eval generation: {json.dumps(row)[:500]}')
  log(f'eval generations: {len(rows)} prompts answered in {time.perf_counter() - t0:.1f}s')


def _accuracy_eval(config, model, tokenizer, step: int) -> dict:
  from jaxsft.data import synthetic  # pylint: disable=import-outside-toplevel
  problems = synthetic.held_out_problems(config.accuracy_eval_problems, config.seed)
  t0 = time.perf_counter()
  accuracy, samples = synthetic.evaluate_accuracy(model, tokenizer, problems,
                                                  max_new_tokens=config.accuracy_eval_max_new_tokens)
  for sample in samples[:3]:
    log(f'sample: {json.dumps(sample)}')
  log(f'held-out exact-match accuracy: {accuracy:.1%} on {len(problems)} problems '
      f'({time.perf_counter() - t0:.1f}s of greedy decoding)')
  return {'step': step, 'eval_accuracy': accuracy, 'eval_problems': len(problems)}
