"""`run(config)`: validate → data → state → step → loop → export.

One optimizer step = `gradient_accumulation_steps` micro-batches of `per_device_train_batch_size × devices` rows,
run by one call of the train step (jaxsft/step.py, which owns the loss contract): the loss of a step is the sum
of token losses over every loss token of the step divided by that step's number of loss tokens (TRL's
`num_items_in_batch`), counted by the host before the step runs. The result does not depend on how the step is
split into micro-batches or devices. Everything that can fail on the user's input (config, paths, tokenizer,
data rows, a checkpoint that does not fit) fails before any device work; the run directory (jaxsft/run_dir.py)
is written only after that. The loop and its actions are jaxsft/loop.py.
"""

import dataclasses
import json
from typing import Any

import jax
from flax import nnx
from ml_collections import config_dict

from jaxsft import checkpoint
from jaxsft import config as config_lib
from jaxsft import export as export_lib
from jaxsft import guard
from jaxsft import library_log
from jaxsft import loop
from jaxsft import metrics as metrics_lib
from jaxsft import optim
from jaxsft import peft_config
from jaxsft import reporting
from jaxsft import run_dir
from jaxsft import sharding
from jaxsft import state as state_lib
from jaxsft import step as step_lib
from jaxsft import storage
from jaxsft import tokenizer as tokenizer_lib
from jaxsft.data import index as index_lib
from jaxsft.data import prepare
from jaxsft.errors import InputError
from jaxsft.models import attention
from jaxsft.models import hf_config
from jaxsft.models import lora as lora_lib

log = metrics_lib.log


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
  mesh = sharding.make_mesh(config.mesh)
  model_dir = str(hf_config.resolve_model_dir(config.model_name_or_path, config.model_revision))
  hf_cfg = hf_config.read_hf_config(model_dir)
  model_cfg = state_lib.model_config(config, hf_cfg)
  attention_impl = attention.resolve_impl(model_cfg.attention_impl, dtype=model_cfg.dtype,
                                          head_dim=model_cfg.head_dim)  # An impossible kernel fails here.
  tokenizer = tokenizer_lib.load_tokenizer(config, model_dir)
  if len(tokenizer) > model_cfg.vocab_size:
    raise InputError(f'the tokenizer has {len(tokenizer)} tokens but the model at {model_dir!r} '
                     f'embeds only {model_cfg.vocab_size}')
  saved = run_dir.RunMeta.from_json(checkpoint.read_meta(*start)) if start else None
  data, micro_batch_size = _data(config, tokenizer)
  geometry = data.train.geometry
  if attention_impl == 'cudnn':  # Size cuDNN's packed layout for the fullest row (+1: the padding run).
    splits = [data.train] + ([data.eval] if data.eval is not None else [])
    most = max(split.steps.max_documents_per_row for split in splits) + 1
    model_cfg = dataclasses.replace(model_cfg, max_segments=most)
  tx, schedule = state_lib.make_optimizer(config, geometry.total_steps)
  resolved = _resolved_config(config, mesh, data, micro_batch_size, tokenizer, model_cfg)
  if start:
    where = storage.join(*map(str, start))
    for change in checkpoint.check_config(where, saved.config, resolved, config.resume_allow_changes):
      log(f'resuming with a changed config field: {change}')
    if saved.step > geometry.total_steps:
      raise InputError(f'cannot resume from {where!r}: it is at step {saved.step}, past this run\'s '
                       f'{geometry.total_steps} steps')
  log(f'training {geometry.total_steps} steps ({geometry.steps_per_epoch} per epoch) of '
      f'{geometry.accumulation} × {micro_batch_size} rows × {config.max_length} tokens on '
      f'{jax.device_count()} {jax.devices()[0].platform} device(s), mesh {dict(mesh.shape)}')

  lora = peft_config.settings(config)
  if start:
    state, shardings, graphdef, frozen = state_lib.restore(start, model_cfg, tx, mesh, lora=lora, model_dir=model_dir)
    guard.check_params(state['params'], f'of checkpoint {where!r}')
  else:
    state, shardings, graphdef, frozen = state_lib.init(config, model_dir, model_cfg, tx, mesh)
    guard.check_params(state['params'], 'initialised at random' if config.model_init == 'random'
                       else f'loaded from {model_dir!r}' if lora is None or not config.adapter_name_or_path
                       else f'loaded from {config.adapter_name_or_path!r}')
  if lora is not None:
    guard.check_params(frozen, f'loaded from {model_dir!r}')
  # Written only now: a run that failed on its input (incompatible checkpoint, bad weights) changed nothing.
  if metrics_lib.is_main_process():
    storage.makedirs(config.output_dir)
    run_dir.write_json_atomically(storage.join(config.output_dir, 'config.json'), resolved)
    run_dir.save_tokenizer(tokenizer, config.output_dir)
  meta = run_dir.RunMeta(config=resolved, hf_config=hf_cfg, model_dir=model_dir,
                         generation_config=tokenizer_lib.generation_config(model_dir, tokenizer),
                         chat_template=tokenizer.chat_template, eos_token=tokenizer.eos_token,
                         export_dtype=config_lib.export_dtype(config))
  if start:
    meta = dataclasses.replace(meta, step=saved.step, num_tokens=saved.num_tokens, log_window=saved.log_window,
                               skipped_steps=saved.skipped_steps)
    run_dir.rewind_metrics(config.output_dir, meta.step)
    log(f'resumed from {where} at step {meta.step}')
  manager = checkpoint.Manager(checkpoint.root_of(config.output_dir), max_to_keep=config.save_total_limit)
  try:
    with jax.set_mesh(mesh):
      num_params = sum(x.size for x in jax.tree.leaves((state['params'], frozen)))
      if lora is not None:
        trained = sum(x.size for x in jax.tree.leaves(state['params']))
        log(f'LoRA: r={lora.r}, alpha={lora.alpha:g} (scaling {lora.scaling:g}), dropout {lora.dropout:g} on '
            f'{",".join(lora.targets)}: {trained / 1e6:.3f}M trained parameters ({trained / num_params:.3%}), '
            f'the base frozen in {model_cfg.param_dtype}')
      log(f'model: {hf_cfg.get("model_type")} with {num_params / 1e6:.2f}M parameters '
          f'({"random init" if config.model_init == "random" else "from " + model_dir}), '
          f'compute {model_cfg.dtype}, remat {model_cfg.remat}, attention {attention_impl}')
      step_fn = step_lib.TrainStep(graphdef, tx, config.model.loss_chunk_size, state_shardings=shardings,
                                   attention_windows=metrics_lib.layer_windows(model_cfg),
                                   skip_nonfinite=config.nonfinite_policy == 'skip', frozen=frozen,
                                   dropout_seed=config.seed)
      progress = loop.Run(
          config=config, mesh=mesh, step_fn=step_fn, state=state, data=data, meta=meta,
          throughput=metrics_lib.Throughput(
              model_cfg, config.max_length, jax.device_count(),
              adapter_params=None if lora is None else sum(x.size for x in jax.tree.leaves(state['params']))),
          guard=guard.Guard(config.nonfinite_policy, config.learning_rate, skipped=meta.skipped_steps),
          step=meta.step, num_tokens=meta.num_tokens, window=list(meta.log_window))
      state, last_row = loop.train(progress, schedule, tokenizer, manager)
      model = nnx.merge(graphdef, sharding.gather_to_host(state['params']), sharding.gather_to_host(frozen))
  finally:
    manager.close()
  export_dir = storage.join(config.output_dir, 'hf')
  if lora is not None:
    adapter_dir = storage.join(config.output_dir, 'adapter')
    if metrics_lib.is_main_process():
      export_lib.write_adapter_dir(model, lora, adapter_dir, base_model=config.model_name_or_path)
    log(f'exported the LoRA adapter (PEFT format) to {adapter_dir}')
    model = lora_lib.merge(model)
  if metrics_lib.is_main_process():
    export_lib.write_hf_dir(model, hf_cfg, tokenizer, meta.generation_config, export_dir, dtype=meta.export_dtype)
  log(f'exported the Hugging Face model{" (merged)" if lora is not None else ""} to {export_dir}')
  return last_row


def _data(config, tokenizer) -> tuple[prepare.Data, int]:
  """(the train and eval splits, indexed and batched for this process; the micro-batch's rows)."""
  per_device, accumulation = config_lib.batch_split(config, jax.device_count())
  micro_batch_size = per_device * jax.device_count()
  data = prepare.prepare(config, tokenizer, micro_batch_size=micro_batch_size, accumulation=accumulation,
                         eval_batch_size=config.per_device_eval_batch_size * jax.device_count(),
                         process_index=jax.process_index(), process_count=jax.process_count(), log=log)
  if config.accuracy_eval_problems > 0 and not (config.dataset_name or '').startswith('synthetic:'):
    raise InputError("config field 'accuracy_eval_problems' needs a 'synthetic:' dataset_name (set it to 0)")
  return data, micro_batch_size


def _resolved_config(config, mesh, data: prepare.Data, micro_batch_size: int, tokenizer, model_cfg) -> dict:
  """OUTPUT_DIR/config.json: the config, plus what the run derived from it under 'resolved'."""
  geometry = data.train.geometry
  resolved = json.loads(config.to_json_best_effort())
  resolved['resolved'] = {
      'num_devices': jax.device_count(), 'num_processes': jax.process_count(),
      'mesh': dict(mesh.shape), 'micro_batch_size': micro_batch_size,
      'global_batch_size': micro_batch_size * geometry.accumulation,
      'steps_per_epoch': geometry.steps_per_epoch, 'total_steps': geometry.total_steps,
      'warmup_steps': optim.num_warmup_steps(geometry.total_steps, config.warmup_steps, config.warmup_ratio),
      'num_rows': len(data.train.index), 'num_examples': len(data.train.index.kept),
      'num_dropped': data.train.index.num_dropped, 'num_bad_rows_skipped': data.train.index.num_bad,
      'num_packed_rows': len(data.train.plan), 'packing_efficiency': data.train.plan.efficiency,
      'data_fingerprint': index_lib.data_fingerprint(data.train.steps.source, tokenizer),
      'model': dataclasses.asdict(model_cfg)}
  return resolved
