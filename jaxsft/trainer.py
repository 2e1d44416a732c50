"""The training loop: composes config, model, data, loss and optimizer; owns all I/O.

One optimizer step = `gradient_accumulation_steps` micro-batches of `per_device_train_batch_size ×
devices` rows. The loss of a step is the sum of token losses over every loss token of the step divided
by that step's number of loss tokens (TRL's `num_items_in_batch`): the host counts the step's loss tokens
before running it, each micro-step's gradient is that micro-batch's token-sum gradient divided by the
step's count, and `optax.MultiSteps(use_grad_mean=False)` sums them. The result does not depend on how the
step is split into micro-batches or devices.
"""

import dataclasses
import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx
from ml_collections import config_dict

from jaxsft import config as config_lib
from jaxsft import loss as loss_lib
from jaxsft import metrics as metrics_lib
from jaxsft import optim
from jaxsft import sharding
from jaxsft.data import pipeline
from jaxsft.data import prepare
from jaxsft.errors import InputError
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


def prepare_output_dir(output_dir: str) -> None:
  """Refuses to reuse a directory that holds an earlier run: nothing written is ever overwritten."""
  if os.path.exists(os.path.join(output_dir, 'metrics.jsonl')):
    raise InputError(f"config field 'output_dir': {output_dir!r} already holds a run (metrics.jsonl); "
                     'choose another output_dir or remove that one')
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise InputError(f"config field 'output_dir': {output_dir!r} exists and is not a directory")


def write_resolved_config(config: config_dict.ConfigDict, output_dir: str, extra: dict) -> None:
  if not metrics_lib.is_main_process():
    return
  os.makedirs(output_dir, exist_ok=True)
  resolved = json.loads(config.to_json_best_effort())
  resolved['resolved'] = extra
  tmp = os.path.join(output_dir, 'config.json.tmp')
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(resolved, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(output_dir, 'config.json'))


class TrainStep:
  """The jitted micro-step: forward, chunked masked cross-entropy, gradients, optax update."""

  def __init__(self, graphdef, rest, tx: optax.GradientTransformation, loss_chunk_size: int, *,
               state_shardings=None):
    self.graphdef = graphdef
    self.rest = rest  # Non-trainable variables (none today), kept out of the optimizer.
    self.tx = tx
    self.loss_chunk_size = loss_chunk_size
    # With shardings: the new state keeps the partitioning of the old one (and its buffers, donated).
    out = None if state_shardings is None else (state_shardings, None)
    self.step = jax.jit(self._step, donate_argnums=(0,), out_shardings=out)
    self.eval_step = jax.jit(self.loss_sums)

  def compile(self, state, batch, inv_step_tokens) -> None:
    """Compiles the step for these shapes, logs its memory per device, and uses the executable from now on."""
    compiled = self.step.lower(state, batch, inv_step_tokens).compile()
    log('compiled train step, memory per device: ' + memory_report(compiled))
    self.step = compiled

  def loss_sums(self, params, batch):
    model = nnx.merge(self.graphdef, params, self.rest)
    hidden_BxTxD = model.hidden_states(batch['input_ids'], batch['positions'], batch['segment_ids'])
    targets_BxT, weights_BxT = loss_lib.next_token_targets(batch['input_ids'], batch['loss_mask'],
                                                           batch['segment_ids'])
    return loss_lib.cross_entropy_sums(hidden_BxTxD, model.unembedding(), targets_BxT, weights_BxT,
                                       chunk_size=self.loss_chunk_size)

  def _step(self, state, batch, inv_step_tokens):
    params, opt_state = state['params'], state['opt_state']

    def objective(p):
      sums = self.loss_sums(p, batch)
      return sums['loss_sum'] * inv_step_tokens, sums

    grads, sums = jax.grad(objective, has_aux=True)(params)
    # The step's accumulated gradient so far (MultiSteps sums micro-gradients): its norm at the last
    # micro-step is the pre-clipping grad_norm of the optimizer step.
    acc_grads = jax.tree.map(jnp.add, opt_state.acc_grads, grads)
    sums['grad_norm'] = optim.global_norm(acc_grads)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return {'params': params, 'opt_state': opt_state}, sums


def model_config(config: config_dict.ConfigDict, hf_cfg: dict) -> transformer.ModelConfig:
  """The model as `config` trains it: bf16 compute over float32 master weights (or float32), its remat."""
  return hf.model_config_from_hf(hf_cfg, dtype='bfloat16' if config.bf16 else 'float32', param_dtype='float32',
                                 attention_impl=config.model.attention_impl, remat=config_lib.remat_policy(config))


def make_optimizer(config: config_dict.ConfigDict, total_steps: int):
  """(MultiSteps AdamW, schedule) from the config's optimizer fields, for `total_steps` optimizer steps."""
  return optim.make_optimizer(
      learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler_type, total_steps=total_steps,
      warmup_steps=config.warmup_steps, warmup_ratio=config.warmup_ratio, min_lr_rate=config.min_lr_rate,
      weight_decay=config.weight_decay, adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2,
      adam_epsilon=config.adam_epsilon, max_grad_norm=config.max_grad_norm,
      gradient_accumulation_steps=config.gradient_accumulation_steps)


def build_model(config, model_dir: str, model_cfg: transformer.ModelConfig, shardings=None):
  """The model, its parameters created directly in their shards when `shardings` is given."""
  if config.model_init == 'random':
    return hf.init_random(model_cfg, config.seed, shardings=shardings)
  return hf.load_pretrained(model_dir, model_cfg, shardings=shardings)


def state_shardings(model_cfg: transformer.ModelConfig, tx: optax.GradientTransformation, mesh, *, warn=None):
  """(graphdef, abstract params, shardings of {'params', 'opt_state'}) from the rules, without any weights.

  The optimizer state's parameter-shaped leaves (MultiSteps' accumulated gradients, Adam's moments) take
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


def memory_report(compiled) -> str:
  """Arguments, outputs and temporaries of a compiled executable, from XLA's memory analysis."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (some backends have none)
    m = None
  if m is None:
    return 'not available on this backend'
  return (f'arguments {_gib(m.argument_size_in_bytes)}, outputs {_gib(m.output_size_in_bytes)} '
          f'({_gib(m.alias_size_in_bytes)} of them reuse donated arguments), temporaries '
          f'{_gib(m.temp_size_in_bytes)}, code {_gib(m.generated_code_size_in_bytes)}')


def _gib(n: int) -> str:
  return f'{n / 2**30:.3f} GiB' if n >= 2**27 else f'{n / 2**20:.2f} MiB'


def run(config: config_dict.ConfigDict) -> dict[str, Any]:
  """Trains per `config`; returns the final metrics row. Raises InputError for bad input."""
  config_lib.validate(config)
  prepare_output_dir(config.output_dir)

  # Everything that can fail on user input happens before any device work.
  mesh = sharding.make_mesh(config.mesh)
  model_dir = str(hf.resolve_model_dir(config.model_name_or_path, config.model_revision))
  hf_cfg = hf.read_hf_config(model_dir)
  model_cfg = model_config(config, hf_cfg)
  tokenizer = load_tokenizer(config, model_dir)
  if len(tokenizer) > model_cfg.vocab_size:
    raise InputError(f'the tokenizer has {len(tokenizer)} tokens but the model at {model_dir!r} '
                     f'embeds only {model_cfg.vocab_size}')
  micro_batch_size = config.per_device_train_batch_size * jax.device_count()
  data = prepare.prepare(config, tokenizer, micro_batch_size=micro_batch_size,
                         eval_batch_size=config.per_device_eval_batch_size * jax.device_count(),
                         process_index=jax.process_index(), process_count=jax.process_count(), log=log)
  geometry = data.train.geometry
  warmup = optim.num_warmup_steps(geometry.total_steps, config.warmup_steps, config.warmup_ratio)
  tx, schedule = make_optimizer(config, geometry.total_steps)
  write_resolved_config(config, config.output_dir, {
      'num_devices': jax.device_count(), 'num_processes': jax.process_count(),
      'mesh': dict(mesh.shape), 'micro_batch_size': micro_batch_size,
      'global_batch_size': micro_batch_size * geometry.accumulation,
      'steps_per_epoch': geometry.steps_per_epoch, 'total_steps': geometry.total_steps,
      'warmup_steps': warmup, 'num_rows': len(data.train.index), 'num_examples': len(data.train.index.kept),
      'num_dropped': data.train.index.num_dropped, 'num_bad_rows_skipped': data.train.index.num_bad,
      'num_packed_rows': len(data.train.plan), 'packing_efficiency': data.train.plan.efficiency,
      'model': dataclasses.asdict(model_cfg)})
  log(f'training {geometry.total_steps} steps ({geometry.steps_per_epoch} per epoch) of '
      f'{geometry.accumulation} × {micro_batch_size} rows × {config.max_length} tokens on '
      f'{jax.device_count()} {jax.devices()[0].platform} device(s), mesh {dict(mesh.shape)}')

  # Parameters carry logical axis names; until the logical → mesh rules exist (sharding issue) the model
  # is built off-mesh and replicated explicitly.
  state, shardings, graphdef, rest = init_state(config, model_dir, model_cfg, tx, mesh)
  with jax.set_mesh(mesh):
    num_params = sum(x.size for x in jax.tree.leaves(state['params']))
    log(f'model: {hf_cfg.get("model_type")} with {num_params / 1e6:.2f}M parameters '
        f'({"random init" if config.model_init == "random" else "from " + model_dir}), '
        f'compute {model_cfg.dtype}, remat {model_cfg.remat}')
    step_fn = TrainStep(graphdef, rest, tx, config.model.loss_chunk_size, state_shardings=shardings)
    state, last_row = _train_loop(config, mesh, step_fn, state, data, schedule, model_cfg)
    model = nnx.merge(graphdef, sharding.gather_to_host(state['params']), rest)
    export_dir = export_hf(model, hf_cfg, tokenizer, model_dir, config.output_dir,
                           dtype='bfloat16' if config.bf16 else 'float32')
    log(f'exported the Hugging Face model to {export_dir}')
    if config.accuracy_eval_problems > 0:
      last_row.update(_accuracy_eval(config, model, tokenizer, geometry.total_steps))
  return last_row


def _train_loop(config, mesh, step_fn: TrainStep, state, data: prepare.Data, schedule, model_cfg):
  geometry = data.train.geometry
  loader = pipeline.Loader(data.train.steps, num_workers=config.dataloader_num_workers)
  eval_every = config_lib.eval_interval(config, geometry.total_steps) if config.eval_strategy == 'steps' else 0
  writer = metrics_lib.MetricsWriter(config.output_dir)
  throughput = metrics_lib.Throughput(model_cfg, config.max_length, jax.device_count())
  bar = tqdm.tqdm(total=geometry.total_steps, disable=config.disable_tqdm or not metrics_lib.is_main_process(),
                  dynamic_ncols=True, desc='train')
  window_sums, last_row = [], {}  # The steps since the last logged row (for loss metrics).
  timed_loss_tokens = timed_all_tokens = 0  # Tokens since throughput.reset() (for tokens/s and MFU).
  num_tokens_total = 0
  step = 0
  t_start = time.perf_counter()
  try:
    for element in loader:
      step_tokens = element['num_targets']
      inv = jnp.float32(1.0 / max(step_tokens, 1))
      step_sums = []
      for batch in element['micro_batches']:
        global_batch = sharding.global_batch(mesh, batch)
        if step == 0 and not step_sums:
          step_fn.compile(state, global_batch, inv)
        state, sums = step_fn.step(state, global_batch, inv)
        step_sums.append(sums)
      step += 1
      num_tokens_total += step_tokens
      timed_loss_tokens += step_tokens
      timed_all_tokens += element['num_input_tokens']
      window_sums.append(step_sums)
      if step == 1:  # Compilation: timed on its own, kept out of tokens/s.
        jax.block_until_ready(state)
        log(f'first step (compilation included) took {time.perf_counter() - t_start:.1f}s')
        throughput.reset()
        timed_loss_tokens = timed_all_tokens = 0
      bar.update(1)
      if step % config.logging_steps == 0 or step == geometry.total_steps:
        last_row = _log_row(window_sums, step, geometry, schedule, num_tokens_total)
        last_row.update(throughput.measure(timed_loss_tokens, timed_all_tokens))
        timed_loss_tokens = timed_all_tokens = 0
        writer.write(last_row)
        bar.set_postfix(loss=f'{last_row["loss"]:.4f}', tok_s=f'{last_row["tokens_per_second"]:.0f}')
        log(' '.join(f'{k}={_fmt(v)}' for k, v in last_row.items()))
        window_sums = []
      epoch_end = step % geometry.steps_per_epoch == 0 or step == geometry.total_steps
      if data.eval is not None and ((eval_every and step % eval_every == 0)
                                    or (config.eval_strategy == 'epoch' and epoch_end)):
        t_eval = time.perf_counter()
        row = evaluate(mesh, step_fn, state['params'], data.eval)
        row.update(step=step, epoch=step / geometry.steps_per_epoch, eval_runtime=time.perf_counter() - t_eval)
        writer.write(row)
        log(' '.join(f'{k}={_fmt(v)}' for k, v in row.items()))
        throughput.reset()  # Evaluation time is not training time.
        timed_loss_tokens = timed_all_tokens = 0
        last_row = {**last_row, **row}
  finally:
    bar.close()
    writer.close()
  return state, last_row


def evaluate(mesh, step_fn: TrainStep, params, split: prepare.Split) -> dict:
  """eval_loss (token-weighted over the whole split) and eval_mean_token_accuracy.

  transformers' Trainer averages per-batch mean losses; here every loss token of the split weighs the same,
  so the figure does not depend on the eval batch size or on packing.
  """
  totals = dict.fromkeys(loss_lib.SUM_KEYS, 0.0)
  pending = None  # One batch in flight while the next is prepared.
  for element in pipeline.Loader(split.steps):
    (batch,) = element['micro_batches']
    sums = step_fn.eval_step(params, sharding.global_batch(mesh, batch))
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


def export_hf(model, hf_cfg: dict, tokenizer, model_dir: str, output_dir: str, *, dtype: str) -> str:
  """OUTPUT_DIR/hf: safetensors + config + tokenizer + generation_config with the training eos.

  Written to a temporary directory first and renamed, so a crash never leaves a half-written `hf/`.
  """
  final = os.path.join(output_dir, 'hf')
  if not metrics_lib.is_main_process():
    return final
  tmp = final + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  hf.save_pretrained(model, hf_cfg, tmp, dtype=dtype)
  tokenizer.save_pretrained(tmp)
  generation = {}
  source = os.path.join(model_dir, 'generation_config.json')
  if os.path.isfile(source):
    with open(source, encoding='utf-8') as f:
      generation = json.load(f)
  generation.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  if tokenizer.bos_token_id is not None:
    generation['bos_token_id'] = tokenizer.bos_token_id
  with open(os.path.join(tmp, 'generation_config.json'), 'w', encoding='utf-8') as f:
    json.dump(generation, f, indent=2, sort_keys=True)
  if os.path.exists(final):
    shutil.rmtree(final)
  os.replace(tmp, final)
  return final


def _accuracy_eval(config, model, tokenizer, step: int) -> dict:
  from jaxsft.data import synthetic  # pylint: disable=import-outside-toplevel
  if not config.dataset_name.startswith('synthetic:'):
    raise InputError("config field 'accuracy_eval_problems' needs a 'synthetic:' dataset_name")
  problems = synthetic.held_out_problems(config.accuracy_eval_problems, config.seed)
  t0 = time.perf_counter()
  accuracy, samples = synthetic.evaluate_accuracy(model, tokenizer, problems,
                                                  max_new_tokens=config.accuracy_eval_max_new_tokens)
  for sample in samples[:3]:
    log(f'sample: {json.dumps(sample)}')
  log(f'held-out exact-match accuracy: {accuracy:.1%} on {len(problems)} problems '
      f'({time.perf_counter() - t0:.1f}s of greedy decoding)')
  row = {'step': step, 'eval_accuracy': accuracy, 'eval_problems': len(problems)}
  metrics_lib.MetricsWriter(config.output_dir).write(row)
  return row
