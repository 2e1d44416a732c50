"""Size a run before renting it: compile a config's train step at its real shape on simulated devices.

  python -m jaxsft.dryrun --config configs/r1_distill.py --devices 8 [--config.FIELD=VALUE ...]

Builds the model abstractly (shapes only: no weights, no data, no network) from the model's `config.json`
(a local `model_name_or_path`, the Hugging Face cache, or a shape shipped in `jaxsft/assets/shapes/` for the
recipes' models; `--model_config` names another), partitions parameters and optimizer state by the sharding
rules on the config's mesh over `--devices` simulated CPU devices, lowers and compiles one micro-step of
`per_device_train_batch_size` × devices rows of `max_length` tokens, and prints per-device memory:
parameters, optimizer state, the step's arguments, outputs and temporaries (XLA's memory analysis of the CPU
compilation: the same program a TPU or GPU would run, though each backend's fusion and scheduling moves the
temporaries somewhat).
"""

import os
import sys

from absl import app
from absl import flags

from jaxsft import train
from jaxsft.errors import InputError

_DEVICES = flags.DEFINE_integer('devices', 8, 'Simulated CPU devices (the mesh is built over them).')
_MODEL_CONFIG = flags.DEFINE_string('model_config', None, "A Hugging Face config.json for the model's shape "
                                    '(default: found from model_name_or_path).')
SHAPES = os.path.join(os.path.dirname(__file__), 'assets', 'shapes')


def model_config_path(name: str, override: str | None) -> str:
  """The config.json describing `name`'s shape, without downloading anything."""
  if override:
    if not os.path.isfile(override):
      raise InputError(f'--model_config: no such file {override!r}')
    return override
  shipped = os.path.join(SHAPES, name.replace('/', '--') + '.json')
  if os.path.isfile(shipped):
    return shipped
  if os.path.isfile(os.path.join(name, 'config.json')):
    return os.path.join(name, 'config.json')
  try:
    import huggingface_hub  # pylint: disable=import-outside-toplevel
    return huggingface_hub.hf_hub_download(name, 'config.json', local_files_only=True)
  except Exception:  # pylint: disable=broad-except
    raise InputError(f"config field 'model_name_or_path': no config.json for {name!r} here (not a local "
                     f'directory, not in the Hugging Face cache, not in {SHAPES}); pass --model_config') from None


def run(config, num_devices: int, model_config: str | None) -> dict:
  import json  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jaxsft import sharding  # pylint: disable=import-outside-toplevel
  from jaxsft import trainer  # pylint: disable=import-outside-toplevel
  from jaxsft.data import packing  # pylint: disable=import-outside-toplevel

  with open(model_config_path(config.model_name_or_path, model_config), encoding='utf-8') as f:
    hf_cfg = json.load(f)
  model_cfg = trainer.model_config(config, hf_cfg)
  mesh = sharding.make_mesh(config.mesh)
  tx, _ = trainer.make_optimizer(config, total_steps=1000)  # The step count only shapes the schedule.
  graphdef, abstract_params, shardings = trainer.state_shardings(model_cfg, tx, mesh, warn=print)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)

  def with_sharding(shapes, shards):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shards)

  state = {'params': with_sharding(abstract_params, shardings['params']),
           'opt_state': with_sharding(abstract_opt, shardings['opt_state'])}
  rows = config.per_device_train_batch_size * num_devices
  batch = {key: jax.ShapeDtypeStruct((rows, config.max_length), jnp.int32, sharding=sharding.batch_sharding(mesh))
           for key in packing.BATCH_KEYS}
  inv = jax.ShapeDtypeStruct((), jnp.float32)
  rest = nnx.State({})  # The model's non-parameter variables: none.
  step = trainer.TrainStep(graphdef, rest, tx, config.model.loss_chunk_size, state_shardings=shardings)
  with jax.set_mesh(mesh):
    compiled = step.step.lower(state, batch, inv).compile()
  analysis = compiled.memory_analysis()
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))
  report = {
      'model': f'{hf_cfg.get("model_type")} with {num_params / 1e9:.3f}B parameters',
      'mesh': dict(mesh.shape), 'micro_batch': f'{rows} rows × {config.max_length} tokens',
      'remat': model_cfg.remat, 'compute_dtype': model_cfg.dtype,
      'parameters': sharding.bytes_per_device(state['params']),
      'optimizer_state': sharding.bytes_per_device(state['opt_state']),
      'step_arguments': analysis.argument_size_in_bytes, 'step_outputs': analysis.output_size_in_bytes,
      'step_outputs_aliased': analysis.alias_size_in_bytes, 'step_temporaries': analysis.temp_size_in_bytes,
  }
  report['peak_estimate'] = (report['step_arguments'] + report['step_outputs'] - report['step_outputs_aliased']
                             + report['step_temporaries'])
  return report


def print_report(report: dict) -> None:
  gib = 2 ** 30
  print(f"model: {report['model']}; mesh {report['mesh']}; micro-batch {report['micro_batch']}; "
        f"remat {report['remat']}; compute {report['compute_dtype']}")
  print(f"{'per device':<34}{'GiB':>10}{'MiB':>12}")
  for key in ('parameters', 'optimizer_state', 'step_arguments', 'step_outputs', 'step_outputs_aliased',
              'step_temporaries', 'peak_estimate'):
    print(f"{key.replace('_', ' '):<34}{report[key] / gib:>10.2f}{report[key] / 2**20:>12.2f}")


def main(argv):
  if len(argv) > 1:
    train.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  config = train.load_config()
  # XLA:CPU's default scheduler runs independent work concurrently and keeps its buffers alive together (8
  # independent 64 MiB temporaries: 512 MiB); the memory-minimising schedule is what TPU and GPU compilers
  # aim for, so it is the one whose temporaries say something about an accelerator (64 MiB).
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_cpu_enable_concurrency_optimized_scheduler=false').strip()
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', _DEVICES.value)
  try:
    report = run(config, _DEVICES.value, _MODEL_CONFIG.value)
  except InputError as e:
    train.fail(str(e))
  print_report(report)


if __name__ == '__main__':
  app.run(main, flags_parser=train.parse_flags)
  sys.exit(0)
