"""`python -m jaxsft.generate`: answers prompts with a Hugging Face model directory (say, a run's OUTPUT_DIR/hf).

python -m jaxsft.generate --model OUTPUT_DIR/hf --prompt "..." [--prompt ...] [--system TEXT] [--adapter DIR]
[--max_new_tokens 512] [--temperature T] [--top_p P] [--seed 0] [--raw] [--dtype auto] [--json]
loads the Hugging Face directory sharded over all local devices (fsdp), applies the tokenizer's chat
template with the generation prompt (--raw: the prompt is plain text), decodes the prompts as one batch with
the KV-cache sampler (`jaxsft.sampler`), and prints each answer. The end-of-sequence ids are the tokenizer's
plus generation_config.json's; sampling defaults to that file's when it sets do_sample=true, else greedy.
`--adapter DIR` applies a PEFT LoRA adapter (a LoRA run's OUTPUT_DIR/adapter) to --model, its base model.
"""

import json
import os
import sys
import time

import jax
from flax import nnx

from jaxsft import cli
from jaxsft import peft_config
from jaxsft import sampler
from jaxsft import sharding
from jaxsft import tokenizer as tokenizer_lib
from jaxsft import urls
from jaxsft.data import formats
from jaxsft.errors import InputError
from jaxsft.models import hf_config


def default_sampling(generation: dict) -> tuple[float, float]:
  """(temperature, top_p) of generation_config.json when it sets do_sample=true, else greedy (0.0, 1.0)."""
  if not generation.get('do_sample'):
    return 0.0, 1.0
  temperature, top_p = generation.get('temperature'), generation.get('top_p')
  return 1.0 if temperature is None else float(temperature), 1.0 if top_p is None else float(top_p)


def load_model(model_dir: str, *, dtype: str = 'auto', mesh=None, adapter: str | None = None):
  """(model, tokenizer, generation config dict) of a Hugging Face directory, parameters sharded on `mesh`.

  `dtype` 'auto' computes in config.json's dtype (float32 if it names none); parameters are stored in it too.
  `adapter`: a PEFT LoRA directory (a run's OUTPUT_DIR/adapter) applied to the model, merged into its weights.
  """
  from jaxsft.models import hf  # pylint: disable=import-outside-toplevel
  urls.refuse(model_dir, '--model')
  urls.refuse(adapter, '--adapter')
  lora = None if adapter is None else peft_config.adapter_settings(adapter)
  if not os.path.isdir(model_dir):
    raise InputError(f'--model: no such directory {model_dir!r}')
  if not os.path.isfile(os.path.join(model_dir, 'config.json')):
    raise InputError(f'--model: {model_dir!r} has no config.json')
  hf_cfg = hf_config.read_hf_config(model_dir)
  if dtype == 'auto':
    dtype = hf_cfg.get('dtype') or hf_cfg.get('torch_dtype') or 'float32'
    if dtype not in ('float32', 'bfloat16', 'float16'):
      raise InputError(f"{model_dir}/config.json: dtype {dtype!r} is not supported; pass --dtype")
  cfg = hf_config.model_config_from_hf(hf_cfg, dtype=dtype, param_dtype=dtype, attention_impl='auto', scan_layers=True)
  shardings = None
  if mesh is not None:
    shardings = sharding.param_shardings(nnx.state(hf.abstract_model(cfg), nnx.Param), mesh)
  model = hf.load_pretrained(model_dir, cfg, shardings=shardings)
  if lora is not None:
    from jaxsft.models import lora as lora_lib  # pylint: disable=import-outside-toplevel
    from jaxsft.models import peft_io  # pylint: disable=import-outside-toplevel
    peft_io.attach_from_dir(model, lora, adapter, field='--adapter')
    lora_lib.merge(model)  # W + scaling·A·B once, then decoding costs what the base model's does.
  tokenizer = tokenizer_lib.from_pretrained(model_dir, '--model')
  return model, tokenizer, tokenizer_lib.read_generation_config(model_dir)


def encode_prompt(tokenizer, text: str, *, system: str | None, raw: bool) -> list[int]:
  """The prompt's ids: chat-templated with the generation prompt (and `system` first), or plain text (`raw`)."""
  if raw:
    return list(tokenizer(text)['input_ids'])
  if not tokenizer.chat_template:
    raise InputError('--prompt: the tokenizer has no chat template; pass --raw to use the prompt as plain text')
  messages = ([{'role': 'system', 'content': system}] if system else []) + [{'role': 'user', 'content': text}]
  return formats.chat_ids(tokenizer, messages, {}, '--prompt', 'prompt', add_generation_prompt=True)


def run_cli(model_dir: str, prompts: list[str], *, system: str | None, max_new_tokens: int,
            temperature: float | None, top_p: float | None, seed: int, raw: bool, dtype: str,
            as_json: bool, adapter: str | None = None) -> None:
  """What `python -m jaxsft.generate` does (flags checked); raises InputError for bad input."""
  if not prompts:
    raise InputError('--prompt is required (repeat it for several prompts)')
  if max_new_tokens < 1:
    raise InputError(f'--max_new_tokens must be >= 1, got {max_new_tokens}')
  if system and raw:
    raise InputError('--system needs the chat template; it cannot be combined with --raw')
  # The values are checked before loading.
  sampler.sampling_mode(1.0 if temperature is None else temperature, 1.0 if top_p is None else top_p)
  t0 = time.perf_counter()
  mesh = sharding.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1})
  model, tokenizer, generation = load_model(model_dir, dtype=dtype, mesh=mesh, adapter=adapter)
  default_temperature, default_top_p = default_sampling(generation)
  temperature = default_temperature if temperature is None else temperature
  top_p = default_top_p if top_p is None else top_p
  sampler.sampling_mode(temperature, top_p)  # Checks the values before any compile.
  ids = [encode_prompt(tokenizer, text, system=system, raw=raw) for text in prompts]
  eos_ids = tokenizer_lib.eos_ids(tokenizer, generation)
  print(f'loaded {model_dir} in {time.perf_counter() - t0:.1f}s ({len(jax.devices())} devices); '
        f'{"greedy" if temperature == 0 else f"temperature {temperature}, top_p {top_p}, seed {seed}"}',
        file=sys.stderr)
  with jax.set_mesh(mesh):
    outputs = sampler.sample(model, ids, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                             pad_id=tokenizer_lib.pad_id(tokenizer, eos_ids), temperature=temperature, top_p=top_p,
                             seed=seed)
  for n, (text, generated) in enumerate(zip(prompts, outputs)):
    answer = tokenizer.decode(generated, skip_special_tokens=True)
    if as_json:
      print(json.dumps({'prompt': text, 'ids': generated, 'text': answer}))
    elif len(prompts) == 1:
      print(answer)
    else:
      print(f'### prompt {n + 1}: {text}\n{answer}\n')


def main(argv):
  cli.no_arguments(argv)
  if not _MODEL.value:
    cli.fail('--model is required, e.g. --model runs/tiny/hf')
  logging.set_verbosity(logging.WARNING)  # Not jax's INFO lines about the backends it did not find.
  try:
    run_cli(_MODEL.value, list(_PROMPT.value or []), system=_SYSTEM.value, max_new_tokens=_MAX_NEW_TOKENS.value,
            temperature=_TEMPERATURE.value, top_p=_TOP_P.value, seed=_SEED.value, raw=_RAW.value, dtype=_DTYPE.value,
            as_json=_JSON.value, adapter=_ADAPTER.value)
  except InputError as e:
    cli.fail(str(e))


if __name__ == '__main__':
  # The flags exist only when this file is the program (other modules may import this one, and must neither
  # see them defined twice nor find them on `python -m jaxsft.train`'s command line).
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  _MODEL = flags.DEFINE_string('model', None, 'A Hugging Face model directory (a run writes OUTPUT_DIR/hf).')
  _PROMPT = flags.DEFINE_multi_string('prompt', None, 'A prompt; repeat the flag for several (decoded as a batch).')
  _SYSTEM = flags.DEFINE_string('system', None, 'A system message put before each prompt.')
  _MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 512, 'The most tokens generated per prompt.')
  _TEMPERATURE = flags.DEFINE_float(
      'temperature', None, '0 = greedy. Default: generation_config.json\'s temperature when it sets '
      'do_sample=true (1.0 if it sets none), else 0 (greedy). Its top_k and repetition_penalty are not applied.')
  _TOP_P = flags.DEFINE_float('top_p', None, "Nucleus sampling mass in (0, 1]. Default: generation_config.json's "
                              'top_p when it sets do_sample=true, else 1.0.')
  _SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed (the same seed gives the same output).')
  _RAW = flags.DEFINE_bool('raw', False, 'Use the prompt as plain text (no chat template).')
  _DTYPE = flags.DEFINE_enum('dtype', 'auto', ['auto', 'float32', 'bfloat16'],
                             "Compute and weight dtype; auto = config.json's dtype (float32 if none).")
  _ADAPTER = flags.DEFINE_string('adapter', None, 'A PEFT LoRA adapter directory (a LoRA run writes OUTPUT_DIR/'
                                 'adapter) applied to --model, its base model.')
  _JSON = flags.DEFINE_bool('json', False, 'Print one JSON object per prompt: prompt, generated ids, text.')
  app.run(main, flags_parser=cli.parse_flags)
