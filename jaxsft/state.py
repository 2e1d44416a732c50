"""The train state: what the model and optimizer are for a config, and the state created, restored or described.

`TrainState` is `{'params': nnx.State of the model's parameters, 'opt_state': the optax state}`, partitioned over
the mesh by the logical-axis rules (jaxsft/sharding.py): ZeRO-3 under FSDP, the optimizer's parameter-shaped
leaves (Adam's moments) taking their parameter's sharding, counters replicated. It is created directly in its
shards (`init`: each process reads or draws only the slices its devices hold), restored from a checkpoint into
this mesh's shardings (`restore`, any mesh), or described without any weights (`abstract`: the dry run
compiles against it). The model's structure (`graphdef`) comes with it; the model has no variables but its
parameters.
"""

from typing import TypedDict

import jax
import optax
from flax import nnx
from ml_collections import config_dict

from jaxsft import checkpoint
from jaxsft import config as config_lib
from jaxsft import metrics as metrics_lib
from jaxsft import optim
from jaxsft import sharding
from jaxsft import step as step_lib
from jaxsft.models import hf
from jaxsft.models import hf_config
from jaxsft.models import transformer


class TrainState(TypedDict):
  params: nnx.State
  opt_state: optax.OptState


def model_config(config: config_dict.ConfigDict, hf_cfg: dict) -> transformer.ModelConfig:
  """The model as `config` trains it: bf16 compute over float32 master weights (or float32), its remat."""
  return hf_config.model_config_from_hf(hf_cfg, dtype='bfloat16' if config.bf16 else 'float32', param_dtype='float32',
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


def shardings(model_cfg: transformer.ModelConfig, tx: optax.GradientTransformation, mesh, *, warn=None):
  """(graphdef, abstract params, shardings of the TrainState) from the rules, without any weights."""
  graphdef, abstract_params = nnx.split(hf.abstract_model(model_cfg), nnx.Param)
  param_shardings = sharding.param_shardings(abstract_params, mesh, warn=warn)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                        transform_non_params=lambda _: sharding.replicated(mesh),
                                        is_leaf=lambda x: isinstance(x, nnx.Variable))
  return graphdef, abstract_params, {'params': param_shardings, 'opt_state': opt_shardings}


def abstract(model_cfg: transformer.ModelConfig, tx, mesh, *, warn=None):
  """(graphdef, the TrainState as ShapeDtypeStructs with their shardings, the shardings)."""
  graphdef, abstract_params, state_shardings = shardings(model_cfg, tx, mesh, warn=warn)
  abstract_state = {'params': abstract_params, 'opt_state': jax.eval_shape(tx.init, abstract_params)}
  return graphdef, checkpoint.abstract(abstract_state, state_shardings), state_shardings


def init(config, model_dir: str, model_cfg: transformer.ModelConfig, tx, mesh):
  """(TrainState, its shardings, graphdef): the model loaded (or drawn) and AdamW initialised, in their shards."""
  graphdef, _, state_shardings = shardings(model_cfg, tx, mesh, warn=metrics_lib.log)
  # Each process reads (or draws) only the slices its devices hold: the model is never whole on a host.
  model = build_model(config, model_dir, model_cfg, state_shardings['params'])
  _, params = nnx.split(model, nnx.Param)
  del model
  opt_state = jax.jit(tx.init, out_shardings=state_shardings['opt_state'])(params)
  state = TrainState(params=params, opt_state=opt_state)
  _log_memory(state, mesh)
  return state, state_shardings, graphdef


def restore(start: tuple[str, int], model_cfg: transformer.ModelConfig, tx, mesh):
  """(TrainState of checkpoint `start` = (checkpoints root, step), its shardings, graphdef), placed by this mesh's
  rules (any mesh)."""
  graphdef, abstract_state, state_shardings = abstract(model_cfg, tx, mesh, warn=metrics_lib.log)
  manager = checkpoint.Manager(start[0], read_only=True)
  try:
    restored, _ = manager.restore(start[1], abstract_state)
  finally:
    manager.close()
  state = TrainState(params=restored['params'], opt_state=restored['opt_state'])
  _log_memory(state, mesh)
  return state, state_shardings, graphdef


def _log_memory(state: TrainState, mesh) -> None:
  metrics_lib.log(f"memory per device: parameters {step_lib.gib(sharding.bytes_per_device(state['params']))}, "
                  f"optimizer state {step_lib.gib(sharding.bytes_per_device(state['opt_state']))} "
                  f'(mesh {dict(mesh.shape)})')
