"""The train state: what the model and optimizer are for a config, and the state created, restored or described.

`TrainState` is `{'params': nnx.State of the model's parameters, 'opt_state': the optax state}`, partitioned over
the mesh by the logical-axis rules (jaxsft/sharding.py): ZeRO-3 under FSDP, the optimizer's parameter-shaped
leaves (Adam's moments) taking their parameter's sharding, counters replicated. It is created directly in its
shards (`init`: each process reads or draws only the slices its devices hold), restored from a checkpoint into
this mesh's shardings (`restore`, any mesh), or described without any weights (`abstract`: the dry run
compiles against it). The model's structure (`graphdef`) comes with it; the model has no variables but its
parameters.

A LoRA run (use_peft; jaxsft/models/lora.py) trains its adapters only: `params` holds the adapters (float32), and
the base model's parameters are `frozen` (in the compute dtype, sharded by the same rules), beside the state: no
gradient, no optimizer state and no checkpoint holds them. A restore reads the base from the model directory again.
"""

import os
from typing import NamedTuple, TypedDict

import jax
import numpy as np
import optax
from flax import nnx
from ml_collections import config_dict

from jaxsft import checkpoint
from jaxsft import config as config_lib
from jaxsft import metrics as metrics_lib
from jaxsft import optim
from jaxsft import peft_config
from jaxsft import sharding
from jaxsft import step as step_lib
from jaxsft.models import hf
from jaxsft.models import hf_config
from jaxsft.models import lora as lora_lib
from jaxsft.models import peft_io
from jaxsft.models import transformer


class TrainState(TypedDict):
  params: nnx.State
  opt_state: optax.OptState


class Built(NamedTuple):
  """A train state made, restored or described: the state, its shardings, the model's structure, and the frozen
  parameters (a LoRA run's base: in the compute dtype, sharded by the same rules, never in the state, the
  gradients or a checkpoint; an empty State in full fine-tuning). `nnx.merge(graphdef, params, frozen)` is the
  model."""
  state: TrainState
  shardings: dict
  graphdef: nnx.GraphDef
  frozen: nnx.State


def model_config(config: config_dict.ConfigDict, hf_cfg: dict) -> transformer.ModelConfig:
  """The model as `config` trains it: bf16 compute over float32 master weights (or float32), its remat. A LoRA
  run's base is frozen, so it is stored in the compute dtype (its adapters are float32: jaxsft/models/lora.py)."""
  dtype = 'bfloat16' if config.bf16 else 'float32'
  return hf_config.model_config_from_hf(hf_cfg, dtype=dtype, param_dtype=dtype if config.use_peft else 'float32',
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


def trainable(lora: peft_config.Settings | None):
  """The filter of the trained parameters: the adapters in a LoRA run, else every parameter."""
  return nnx.Param if lora is None else lora_lib.LoRAParam


def shardings(model_cfg: transformer.ModelConfig, tx: optax.GradientTransformation, mesh, *, lora=None, warn=None):
  """(graphdef, abstract params, shardings of the TrainState, (abstract frozen params, their shardings)) from the
  rules, without any weights. `lora`: the run's LoRA settings (None: full fine-tuning)."""
  model = hf.abstract_model(model_cfg)
  if lora is not None:
    lora_lib.attach(model, lora, lora_lib.abstract_values, mlp_tiled=model_cfg.mlp_chunk_size > 0)
  graphdef, abstract_params, abstract_frozen = nnx.split(model, trainable(lora), nnx.Param)
  param_shardings = sharding.param_shardings(abstract_params, mesh, warn=warn)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                        transform_non_params=lambda _: sharding.replicated(mesh),
                                        is_leaf=lambda x: isinstance(x, nnx.Variable))
  frozen_shardings = sharding.param_shardings(abstract_frozen, mesh, warn=warn)
  return graphdef, abstract_params, {'params': param_shardings, 'opt_state': opt_shardings}, (abstract_frozen,
                                                                                               frozen_shardings)


def abstract(model_cfg: transformer.ModelConfig, tx, mesh, *, lora=None, warn=None) -> Built:
  """The TrainState and the frozen parameters as ShapeDtypeStructs with their shardings (nothing allocated)."""
  graphdef, abstract_params, state_shardings, (frozen, frozen_shardings) = shardings(model_cfg, tx, mesh, lora=lora,
                                                                                    warn=warn)
  abstract_state = {'params': abstract_params, 'opt_state': jax.eval_shape(tx.init, abstract_params)}
  return Built(checkpoint.abstract(abstract_state, state_shardings), state_shardings, graphdef,
               checkpoint.abstract(frozen, frozen_shardings))


def init(config, model_dir: str, model_cfg: transformer.ModelConfig, tx, mesh) -> Built:
  """The model loaded (or drawn), a LoRA run's adapters added (fresh, or `adapter_name_or_path`'s), and AdamW
  initialised, all in their shards."""
  lora = peft_config.settings(config)
  graphdef, _, state_shardings, (_, frozen_shardings) = shardings(model_cfg, tx, mesh, lora=lora,
                                                                   warn=metrics_lib.log)
  # Each process reads (or draws) only the slices its devices hold: the model is never whole on a host.
  model = build_model(config, model_dir, model_cfg, frozen_shardings if lora else state_shardings['params'])
  if lora is not None:
    _add_adapters(config, model, lora)
  _, params, frozen = nnx.split(model, trainable(lora), nnx.Param)
  del model
  if lora is not None:  # The adapters were made on the host: placed in their shards now.
    params = _place(params, state_shardings['params'])
  opt_state = jax.jit(tx.init, out_shardings=state_shardings['opt_state'])(params)
  state = TrainState(params=params, opt_state=opt_state)
  _log_memory(state, frozen, mesh)
  return Built(state, state_shardings, graphdef, frozen)


def restore(start: tuple[str, int], model_cfg: transformer.ModelConfig, tx, mesh, *, lora=None,
            model_dir: str | None = None) -> Built:
  """The TrainState of checkpoint `start` = (checkpoints root, step), placed by this mesh's rules (any mesh); a
  LoRA run's frozen base read from `model_dir` again (a checkpoint holds the adapters only)."""
  abstract_state, state_shardings, graphdef, frozen = abstract(model_cfg, tx, mesh, lora=lora, warn=metrics_lib.log)
  manager = checkpoint.Manager(start[0], read_only=True)
  try:
    restored, _ = manager.restore(start[1], abstract_state)
  finally:
    manager.close()
  state = TrainState(params=restored['params'], opt_state=restored['opt_state'])
  if lora is not None:
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    frozen = nnx.state(hf.load_pretrained(model_dir, model_cfg, shardings=frozen_shardings), nnx.Param)
  _log_memory(state, frozen, mesh)
  return Built(state, state_shardings, graphdef, frozen)


def _add_adapters(config, model, lora: peft_config.Settings) -> None:
  """A LoRA run's adapters on `model`: `adapter_name_or_path`'s, or PEFT's init from the config's seed."""
  if config.adapter_name_or_path:
    peft_io.attach_from_dir(model, lora, os.path.expanduser(config.adapter_name_or_path))
  else:
    lora_lib.attach(model, lora, lambda shape: tuple(map(np.asarray, lora_lib.init_values(shape, config.seed))))


def _place(params: nnx.State, shardings) -> nnx.State:
  """Host values (the same on every process) as global arrays in `shardings`, each device taking its block."""
  def place(value, sharding_):
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding_, lambda index: host[index])
  return jax.tree.map(place, params, shardings)


def _log_memory(state: TrainState, frozen: nnx.State, mesh) -> None:
  frozen_bytes = sharding.bytes_per_device(frozen)
  base = f'frozen base {step_lib.gib(frozen_bytes)}, trained ' if frozen_bytes else ''
  metrics_lib.log(f"memory per device: {base}parameters {step_lib.gib(sharding.bytes_per_device(state['params']))}, "
                  f"optimizer state {step_lib.gib(sharding.bytes_per_device(state['opt_state']))} "
                  f'(mesh {dict(mesh.shape)})')
