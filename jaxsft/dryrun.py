"""Size a run before renting it: compile a config's train step for a real TPU slice or NVIDIA machine.

  python -m jaxsft.dryrun --config configs/r1_distill.py --topology v5p-32 [--config.FIELD=VALUE ...]
  python -m jaxsft.dryrun --config configs/tiny.py --topology v5e-8 --find_batch
  python -m jaxsft.dryrun --config configs/r1_distill.py --devices 16     # simulated CPU devices: approximate

Builds the model abstractly (shapes only: no weights, no data, no network) from the model's `config.json`
(a local `model_name_or_path`, the Hugging Face cache, or a shape shipped in `jaxsft/assets/shapes/` for the
recipes' models; `--model_config` names another), partitions parameters and optimizer state by the sharding
rules on the config's mesh over the target's chips, and compiles the very step the trainer runs: the same
state shardings, the attention kernel `auto` picks on that platform (splash on TPU), remat, loss chunking, and
the step's micro-batches (accumulation derived from the target's chip count as the trainer derives it).

With `--topology` the compiler is the chip's own (libtpu for TPU slices, XLA's GPU compiler for NVIDIA targets,
through compile-only devices: jaxsft/targets.py), so the memory figures are the chip's and an impossible step
is refused as the chip would refuse it. The report ends with one line:
`peak 55.62 GiB of 95.74 GiB per chip: fits (42% headroom)`, or exits 1 with `error: ... needs X GiB per chip,
the v5e-8 has Y GiB ...`. `--devices N` compiles with XLA:CPU on N simulated devices instead (XLA attention,
CPU fusion and scheduling): an approximation, labelled so.

The FLOPs line is jaxsft's analytic count (metrics.py: 6·N·tokens + causal attention, every row full) and the
step time it implies at an assumed MFU (`--mfu`): an estimate, not a measurement. XLA's `cost_analysis` is not
used: it counts a scanned layer stack once and Pallas kernels as 0 FLOPs.
"""

import os
import sys
import time

from absl import app
from absl import flags

from jaxsft import cli
from jaxsft.errors import InputError
from jaxsft.errors import one_line

cli.define_config_flag()  # --config configs/NAME.py[:ARG] [--config.FIELD=VALUE ...]
_TOPOLOGY = flags.DEFINE_string('topology', None, 'Compile for this TPU slice or NVIDIA machine, as cloud users '
                                'name it: v5e-8, v5p-32, v6e-16, v4-8, h100-8, 2xh100-8, h200-8, ...')
_DEVICES = flags.DEFINE_integer('devices', None, 'Without --topology: simulated CPU devices (default 8), an '
                                'approximation of an accelerator.')
_MODEL_CONFIG = flags.DEFINE_string('model_config', None, "A Hugging Face config.json for the model's shape "
                                    '(default: found from model_name_or_path).')
_FIND_BATCH = flags.DEFINE_bool('find_batch', False, 'Bisect the largest per_device_train_batch_size that fits.')
_MFU = flags.DEFINE_float('mfu', 0.4, 'The MFU assumed for the step-time estimate (not measured).')
SHAPES = os.path.join(os.path.dirname(__file__), 'assets', 'shapes')
GIB = 2**30


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


def read_hf_config(config, model_config: str | None) -> dict:
  import json  # pylint: disable=import-outside-toplevel
  with open(model_config_path(config.model_name_or_path, model_config), encoding='utf-8') as f:
    return json.load(f)


def lower_step(config, hf_cfg: dict, devices, *, target=None):
  """({program name: lowered} of `config`'s train step over `devices`, the report's figures known before
  compiling): the programs of the step (jaxsft/step.py): `step`, or with accumulation `accumulate` (once per
  micro-batch) and `apply`."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jaxsft import config as config_lib  # pylint: disable=import-outside-toplevel
  from jaxsft import metrics  # pylint: disable=import-outside-toplevel
  from jaxsft import peft_config  # pylint: disable=import-outside-toplevel
  from jaxsft import sharding  # pylint: disable=import-outside-toplevel
  from jaxsft import state as state_lib  # pylint: disable=import-outside-toplevel
  from jaxsft import step as step_lib  # pylint: disable=import-outside-toplevel
  from jaxsft.data import buckets  # pylint: disable=import-outside-toplevel
  from jaxsft.data import packing  # pylint: disable=import-outside-toplevel
  from jaxsft.models import attention  # pylint: disable=import-outside-toplevel

  num_chips = len(devices)
  per_device, accumulation = config_lib.batch_split(config, num_chips)
  model_cfg = state_lib.model_config(config, hf_cfg)
  mesh = sharding.make_mesh(config.mesh, devices=list(devices))
  tx, _ = state_lib.make_optimizer(config, total_steps=1000)  # The step count only shapes the schedule.
  lora = peft_config.settings(config)
  state, shardings, graphdef, frozen = state_lib.abstract(model_cfg, tx, mesh, lora=lora, warn=print)
  rows = per_device * num_chips
  batch = {key: jax.ShapeDtypeStruct((rows, config.max_length), jnp.int32, sharding=sharding.batch_sharding(mesh))
           for key in packing.BATCH_KEYS}
  inv = jax.ShapeDtypeStruct((), jnp.float32)
  step = step_lib.TrainStep(graphdef, tx, config.model.loss_chunk_size, state_shardings=shardings,
                            attention_windows=metrics.layer_windows(model_cfg), frozen=frozen)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves((state['params'], frozen)))
  trained = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state['params']))
  what = '' if lora is None else (f', LoRA r={lora.r} on {",".join(lora.targets)}: {trained / 1e6:.2f}M trained '
                                  f'({trained / num_params:.2%})')
  tokens = accumulation * rows * config.max_length
  report = {
      'target': target, 'num_chips': num_chips, 'platform': devices[0].platform, 'device_kind': devices[0].device_kind,
      'model': f'{hf_cfg.get("model_type")} with {num_params / 1e9:.3f}B parameters{what}',
      'mesh': dict(mesh.shape), 'per_device': per_device, 'accumulation': accumulation, 'rows': rows,
      'max_length': config.max_length, 'remat': model_cfg.remat, 'compute_dtype': model_cfg.dtype,
      'length_buckets': config.length_buckets,
      'widths': buckets.row_widths(config, packed=config.packing or config.padding_free),
      'frozen_base': sharding.bytes_per_device(frozen) if lora is not None else None,
      'parameters': sharding.bytes_per_device(state['params']),
      'optimizer_state': sharding.bytes_per_device(state['opt_state']),
      'hbm': target.hbm_bytes if target is not None else None,
      'flops_per_step': metrics.train_flops_per_token(model_cfg, config.max_length,
                                                      adapter_params=None if lora is None else trained) * tokens,
      'peak_flops_per_chip': metrics.peak_flops_per_device(devices[0]),
  }
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    report['attention'] = attention.resolve_impl(model_cfg.attention_impl, dtype=model_cfg.dtype,
                                                 head_dim=model_cfg.head_dim)
    lowered = {name: step.lower(name, state, batch, inv) for name in step.programs(accumulation)}
  report['lower_seconds'] = time.perf_counter() - t0
  return lowered, report


def compile_step(config, hf_cfg: dict, devices, *, target=None, keep: bool = False) -> dict:
  """Compiles `config`'s train step over `devices`; returns the sizing report (see `print_report`).

  A step the chip's compiler refuses for lack of HBM gives a report with 'fits' False and the compiler's figures
  ('needed', 'hbm'); any other compile failure raises InputError. `keep`: the report holds the executable too
  ('compiled').
  """
  from jaxsft import targets  # pylint: disable=import-outside-toplevel
  lowered, report = lower_step(config, hf_cfg, devices, target=target)
  t0 = time.perf_counter()
  report['programs'] = {}
  for name, program in lowered.items():
    try:
      compiled = program.compile()
    except Exception as e:  # pylint: disable=broad-except  (the compiler's refusal, as XlaRuntimeError)
      overflow = targets.hbm_overflow(e)
      if overflow is None:
        where = target.name if target is not None else f'{len(devices)} CPU devices'
        raise InputError(f'compiling the step for {where} failed: {one_line(e, 400)}') from None
      report.update(compile_seconds=report['lower_seconds'] + time.perf_counter() - t0, fits=False,
                    needed=overflow[0] * GIB, hbm=overflow[1] * GIB if overflow[1] == overflow[1] else report['hbm'])
      return report
    analysis = compiled.memory_analysis()
    # `accumulate` does not take the optimizer state, which stays in device memory beside it all the same.
    resident = report['optimizer_state'] if name == 'accumulate' else 0
    figures = {'step_arguments': analysis.argument_size_in_bytes, 'step_outputs': analysis.output_size_in_bytes,
               'step_outputs_aliased': analysis.alias_size_in_bytes, 'resident_state': resident,
               'step_temporaries': analysis.temp_size_in_bytes, 'peak': targets.peak_bytes(analysis) + resident}
    report['programs'][name] = figures['peak']
    if figures['peak'] >= report.get('peak', -1):  # The table shows the program with the highest peak.
      report.update(figures, peak_program=name)
      if keep:
        report['compiled'] = compiled
    report['splash_kernels'] = report.get('splash_kernels') or (report['attention'] == 'splash'
                                                                 and 'splash' in compiled.as_text())
  report['compile_seconds'] = report['lower_seconds'] + time.perf_counter() - t0
  report['fits'] = report['hbm'] is None or report['peak'] <= report['hbm']
  return report


TABLE = ('frozen_base', 'parameters', 'optimizer_state', 'step_arguments', 'step_outputs', 'step_outputs_aliased',
         'resident_state', 'step_temporaries', 'peak', 'hbm')


def summary_line(report: dict) -> str:
  """The report's last line: the verdict."""
  target = report['target']
  if target is None:
    return (f"peak {report['peak'] / GIB:.2f} GiB per device on {report['num_chips']} simulated CPU devices "
            '(an approximation: XLA:CPU, XLA attention; --topology compiles for a real chip)')
  if report['fits']:
    headroom = 1 - report['peak'] / report['hbm']
    return (f"peak {report['peak'] / GIB:.2f} GiB of {report['hbm'] / GIB:.2f} GiB per chip: fits "
            f'({headroom:.0%} headroom)')
  return (f"error: the step needs {report.get('needed', report.get('peak', 0)) / GIB:.2f} GiB per chip, the "
          f"{target.name} has {report['hbm'] / GIB:.2f} GiB (per_device_train_batch_size={report['per_device']}, "
          f"max_length={report['max_length']}, remat {report['remat']}): try a smaller "
          'per_device_train_batch_size (--find_batch finds the largest), model.remat=full, or a slice with more '
          'chips')


def print_report(report: dict, mfu: float) -> None:
  target = report['target']
  where = (f"{target.name} ({report['num_chips']} × {report['device_kind']}, topology {target.topology}), "
           f"the {report['platform'].upper()} compiler" if target is not None else
           f"{report['num_chips']} simulated CPU devices (XLA:CPU: an approximation)")
  print(f"target: {where}; compiled in {report['compile_seconds']:.1f}s")
  print(f"model: {report['model']}; mesh {report['mesh']}; step: {report['accumulation']} micro-batch(es) of "
        f"{report['rows']} rows × {report['max_length']} tokens ({report['per_device']} per chip); "
        f"remat {report['remat']}; compute {report['compute_dtype']}; attention {report['attention']}"
        + ('' if not report.get('splash_kernels') else ' (Pallas kernels in the program)'))
  if report.get('widths') and len(report['widths']) > 1:
    print(f"row widths (length_buckets={report['length_buckets']}): {len(report['widths'])}, "
          f"{report['widths'][0]} to {report['widths'][-1]} tokens, each compiled when a micro-batch first needs it; "
          'sized here: the widest (the others need less)')
  if len(report['programs']) > 1:
    peaks = ', '.join(f'{name} {peak / GIB:.2f} GiB' for name, peak in report['programs'].items())
    print(f"programs (peak per chip): {peaks}; the table: {report['peak_program']}")
  print(f"{'per chip':<34}{'GiB':>10}{'MiB':>12}")
  for key in TABLE:
    if report.get(key) is not None and (key != 'resident_state' or report[key]):
      print(f"{key.replace('_', ' '):<34}{report[key] / GIB:>10.2f}{report[key] / 2**20:>12.2f}")
  flops = report['flops_per_step']
  line = f'FLOPs per step: {flops:.3e} (analytic, every row full)'
  if report['peak_flops_per_chip']:
    seconds = flops / (report['peak_flops_per_chip'] * report['num_chips'] * mfu)
    line += (f'; at an assumed {mfu:.0%} MFU on {report["num_chips"]} chips: {seconds:.3g}s per step '
             f'({report["rows"] * report["accumulation"] * report["max_length"] / seconds:,.0f} tokens/s), '
             'an estimate, not a measurement')
  print(line)
  print(summary_line(report))


def find_batch(config, hf_cfg: dict, devices, target, mfu: float) -> int:
  """Bisects the largest per_device_train_batch_size whose step fits; prints each try. Returns it (0: none)."""
  num_chips = len(devices)
  if config.global_batch_size is not None:  # Only batches that divide the step's rows keep its size.
    limit = config.global_batch_size // num_chips
    candidates = [b for b in range(1, limit + 1) if config.global_batch_size % (b * num_chips) == 0]
    if not candidates:
      raise InputError(f"config field 'global_batch_size' {config.global_batch_size} is not a multiple of the "
                       f'{num_chips} chips: no per-device batch keeps it')
  else:
    candidates = [2**i for i in range(11)]
  low, high, best, best_report = 0, len(candidates) - 1, 0, None
  while low <= high:
    mid = (low + high) // 2
    with config.unlocked():
      config.per_device_train_batch_size = candidates[mid]
    report = compile_step(config, hf_cfg, devices, target=target)
    peak = report.get('peak', report.get('needed'))
    print(f"per_device_train_batch_size={candidates[mid]}: peak {peak / GIB:.2f} GiB per chip: "
          f"{'fits' if report['fits'] else 'does not fit'} ({report['compile_seconds']:.1f}s to compile)", flush=True)
    if report['fits']:
      best, best_report, low = candidates[mid], report, mid + 1
    else:
      high = mid - 1
  if best_report is not None:
    print_report(best_report, mfu)
    largest = best == candidates[-1] and config.global_batch_size is None
    ceiling = ' (the largest tried: more may fit)' if largest else ''
    print(f'largest per_device_train_batch_size that fits: {best}{ceiling}')
  return best


def main(argv):
  cli.no_arguments(argv)
  config = cli.load_config()
  if _TOPOLOGY.value and _DEVICES.value:
    cli.fail('--topology and --devices exclude each other (--devices simulates CPU devices)')
  if _FIND_BATCH.value and not _TOPOLOGY.value:
    cli.fail('--find_batch needs --topology: simulated CPU devices have no memory limit to find')
  if not _TOPOLOGY.value:
    # XLA:CPU's default scheduler runs independent work concurrently and keeps its buffers alive together (8
    # independent 64 MiB temporaries: 512 MiB); the memory-minimising schedule is what TPU and GPU compilers
    # aim for, so it is the one whose temporaries say something about an accelerator (64 MiB).
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               ' --xla_cpu_enable_concurrency_optimized_scheduler=false').strip()
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', _DEVICES.value or 8)
  try:
    from jaxsft import targets  # pylint: disable=import-outside-toplevel
    hf_cfg = read_hf_config(config, _MODEL_CONFIG.value)
    target = targets.get(_TOPOLOGY.value) if _TOPOLOGY.value else None
    devices = target.devices if target is not None else jax.devices()
    if _FIND_BATCH.value:
      if not find_batch(config, hf_cfg, devices, target, _MFU.value):
        cli.fail(f'not even per_device_train_batch_size=1 fits on {target.name if target else "these devices"}'
                 ' (try model.remat=full, a shorter max_length, or more chips)')
      return
    report = compile_step(config, hf_cfg, devices, target=target)
  except InputError as e:
    cli.fail(str(e))
  if not report['fits']:
    print(summary_line(report), file=sys.stderr)
    sys.exit(1)
  print_report(report, _MFU.value)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
  sys.exit(0)
