"""PEFT adapter directories both ways: `adapter_config.json` + `adapter_model.safetensors`, PEFT's tensor names.

`attach_from_dir` puts the adapters of a PEFT LoRA directory (`adapter_name_or_path`) on a model; `save_adapter`
writes a model's adapters as a directory that `peft.PeftModel.from_pretrained(base, dir)` loads. The layouts and
names are jaxsft/models/lora.py's `to_peft` / `from_peft`.
"""

import json
import os
import pathlib

import jax
import numpy as np
from flax import nnx

from jaxsft import peft_config
from jaxsft.errors import InputError
from jaxsft.models import lora as lora_lib
from jaxsft.models import safetensors_io


def read_tensors(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of `directory`'s adapter_model.safetensors (float32 host arrays), by PEFT's name."""
  path = pathlib.Path(directory) / peft_config.ADAPTER_WEIGHTS
  header, _ = safetensors_io.read_header(path)
  reader = safetensors_io.Reader({name: path for name in header if name != '__metadata__'})
  return {name: np.asarray(reader.get(name), np.float32) for name in reader.names()}


def attach_from_dir(model: nnx.Module, lora: peft_config.Settings, directory: str,
                    field: str = "config field 'adapter_name_or_path'") -> nnx.Module:
  """`model` with the adapters of the PEFT directory `directory` (checked: `peft_config.check_adapter_dir`); an
  InputError naming `field` and a missing, misshapen or unused tensor."""
  peft_config.check_adapter_dir(directory, lora, field)
  tensors = read_tensors(directory)
  used = set()

  def values(shape: lora_lib.Shape):
    try:
      a, b = lora_lib.from_peft(shape, tensors, os.path.join(directory, peft_config.ADAPTER_WEIGHTS))
    except ValueError as e:
      raise InputError(f'{field}: {e}') from None
    used.update(n + s for _, n in lora_lib.peft_names(shape) for s in ('.lora_A.weight', '.lora_B.weight'))
    return a, b

  lora_lib.attach(model, lora, values)
  unused = sorted(set(tensors) - used)
  if unused:
    raise InputError(f'{field}: {os.path.join(directory, peft_config.ADAPTER_WEIGHTS)} holds tensors this model '
                     f'has no place for, e.g. {unused[0]!r} ({len(unused)} in all)')
  return model


def adapter_tensors(model: nnx.Module, lora: peft_config.Settings) -> dict[str, np.ndarray]:
  """The model's adapters as PEFT's tensors (float32, on this host: the adapters are gathered)."""
  out = {}
  for path, dense in lora_lib.targets(model, lora):
    adapter = dense.lora
    if adapter is None:
      continue
    shape = lora_lib.shape_of(path, dense, lora)
    a = np.asarray(jax.device_get(adapter.a[...]), np.float32)
    b = np.asarray(jax.device_get(adapter.b[...]), np.float32)
    out.update(lora_lib.to_peft(shape, a, b))
  return dict(sorted(out.items()))


def save_adapter(model: nnx.Module, lora: peft_config.Settings, directory: str, *, base_model: str | None,
                 dtype: str = 'float32') -> None:
  """Writes `directory` (a local directory): adapter_config.json and adapter_model.safetensors in `dtype`."""
  tensors = adapter_tensors(model, lora)
  if not tensors:
    raise ValueError('the model has no LoRA adapters to save')
  np_dtype = {'float32': np.float32, 'bfloat16': safetensors_io.DTYPES['BF16']}[dtype]
  os.makedirs(directory, exist_ok=True)
  safetensors_io.write_file(pathlib.Path(directory) / peft_config.ADAPTER_WEIGHTS,
                            {k: v.astype(np_dtype) for k, v in tensors.items()})
  with open(os.path.join(directory, peft_config.ADAPTER_CONFIG), 'w', encoding='utf-8') as f:
    json.dump(peft_config.adapter_config(lora, base_model), f, indent=2, sort_keys=True)
    f.write('\n')
