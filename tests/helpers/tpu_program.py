"""Compiles jaxsft's train step for a compile-only TPU slice and writes facts about the program as JSON.

  python -m tests.helpers.tpu_program OUT.json TOPOLOGY MODEL_CONFIG.json [--config.FIELD=VALUE ...]

The facts: the dry run's report (memory), and from the compiled (post-optimisation) HLO of each program every
collective with its result shape, and every float32 array shape that has the vocabulary as a dimension. Run in
a subprocess of its own: libtpu is loaded only there.
"""

import json
import re
import sys


def collectives(hlo: str) -> list[dict]:
  """[{op, dtype, shape, computation}] of every all-gather / reduce-scatter / all-reduce / all-to-all in the HLO
  text; `computation` names the HLO computation holding it (TPU writes a reduce-scatter as an all-reduce and a
  dynamic-slice inside a fused computation named `all-reduce-scatter...`)."""
  out = []
  pattern = (r'= (?:\()?([a-z0-9]+)\[([0-9,]*)\][^=]*? (all-gather|all-gather-start|reduce-scatter|all-reduce|'
             r'all-reduce-start|all-to-all|collective-permute|collective-permute-start)\(')
  computation = None
  for line in hlo.splitlines():
    header = re.match(r'^(?:ENTRY )?%?([\w.-]+) \(.*\{$', line)
    if header:
      computation = header.group(1)
      continue
    m = re.search(pattern, line)
    if m:
      shape = [int(d) for d in m.group(2).split(',') if d]
      out.append({'op': m.group(3).removesuffix('-start'), 'dtype': m.group(1), 'shape': shape,
                  'computation': computation})
  return out


def shapes_with(hlo: str, dim: int, dtype: str = 'f32') -> list[list[int]]:
  """Every distinct `dtype` array shape in the HLO text with a dimension equal to `dim`."""
  found = set()
  for m in re.finditer(dtype + r'\[([0-9,]+)\]', hlo):
    shape = tuple(int(d) for d in m.group(1).split(','))
    if dim in shape:
      found.add(shape)
  return sorted(map(list, found))


def main(out_path: str, topology: str, model_config: str, *overrides: str) -> None:
  from jaxsft import dryrun  # pylint: disable=import-outside-toplevel
  from jaxsft import cli  # pylint: disable=import-outside-toplevel
  cli.define_config_flag()
  cli.parse_flags(['tpu_program', '--config', 'configs/sft.py', *overrides])
  config = cli.load_config()
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_platforms', 'cpu')
  from jaxsft import targets  # pylint: disable=import-outside-toplevel
  with open(model_config, encoding='utf-8') as f:
    hf_cfg = json.load(f)
  target = targets.get(topology)
  lowered, report = dryrun.lower_step(config, hf_cfg, target.devices, target=target)
  facts = {'report': {k: v for k, v in report.items() if k != 'target'}, 'programs': {}}
  for name, program in lowered.items():
    hlo = program.compile().as_text()
    with open(f'{out_path}.{name}.hlo', 'w', encoding='utf-8') as f:  # To read when a test fails.
      f.write(hlo)
    facts['programs'][name] = {'collectives': collectives(hlo), 'vocab_f32_shapes': shapes_with(
        hlo, hf_cfg['vocab_size']), 'custom_calls': sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo))),
                               'splash': 'splash' in hlo}
  with open(out_path, 'w', encoding='utf-8') as f:
    json.dump(facts, f)


if __name__ == '__main__':
  main(*sys.argv[1:])
