"""Builds `tests/data/golden/`: tiny random Hugging Face models and transformers' logits for them.

The parity tests that need torch (transformers' forward pass) cannot run where torch is not installed (TPU VMs,
the Python 3.12 stack: torch for it is a CUDA build only). These files let jaxsft's numerics be checked there
against what transformers computed here: for each architecture of tests/conftest.py's TINY_HF_CONFIGS, at a
smaller width (vocabulary 128, hidden 32, 2 layers: ~25k parameters), `NAME/config.json` and
`NAME/model.safetensors` (as `save_pretrained` writes them, float32, O(1) random weights as in the tests) and
`NAME/logits.npz`: a right-padded and a left-padded batch (tokens, attention mask, positions) and transformers'
float32 eager-attention logits for each. `trl/`: tests/test_trl_parity.py's 12-step SFTTrainer run on a
smaller model (its loss curve and final weights), so jaxsft's training is checked against TRL without torch.

  python scripts/build_golden.py [--out tests/data/golden]

tests/test_golden.py checks jaxsft against them (no torch needed) and, where torch is installed, that they are
still what the installed transformers computes (rebuild them with this script if a release changes that).
"""

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.conftest import TINY_HF_CONFIGS, TinyHF  # pylint: disable=wrong-import-position

VOCAB = 128
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48)
HEAD_DIMS = {'qwen3': 12, 'qwen3_yarn': 8}  # Theirs are 24 and 16 at hidden 64; other models: hidden / heads.
LENGTH = 12
TRL_HIDDEN, TRL_INTERMEDIATE = 32, 64


def _drop_version_stamp(config_file: str) -> None:
  """The files do not depend on the installed transformers' `transformers_version` stamp."""
  with open(config_file, encoding='utf-8') as f:
    config = json.load(f)
  config.pop('transformers_version', None)
  with open(config_file, 'w', encoding='utf-8') as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write('\n')


def batch(padding: str) -> dict[str, np.ndarray]:
  """Two rows of LENGTH tokens, 3 and 5 of them padding on the `padding` side ('right' | 'left')."""
  tokens, mask, positions = TinyHF.batch(padding, length=LENGTH)
  return {'tokens': tokens % VOCAB, 'mask': mask, 'positions': positions}


def build_one(name: str, out_dir: str) -> None:
  import pathlib  # pylint: disable=import-outside-toplevel
  overrides = dict(SIZES, **({'head_dim': HEAD_DIMS[name]} if name in HEAD_DIMS else {}))
  tiny = TinyHF(pathlib.Path(out_dir))
  model = tiny.model(name, seed=0, **overrides)
  model_dir = os.path.join(out_dir, name)
  model.save_pretrained(model_dir)
  for config_name in ('config.json', 'generation_config.json'):
    _drop_version_stamp(os.path.join(model_dir, config_name))
  arrays = {}
  for padding in ('right', 'left'):
    inputs = batch(padding)
    arrays.update({f'{padding}_{key}': value for key, value in inputs.items()})
    arrays[f'{padding}_logits'] = TinyHF.logits(model, inputs['tokens'], inputs['mask'], inputs['positions'])
  np.savez(os.path.join(model_dir, 'logits.npz'), **arrays)


def build_trl(out_dir: str) -> None:
  """`trl/`: tests/test_trl_parity.py's setting at a smaller width, trained once by TRL's SFTTrainer.

  `model/` (a random float32 Qwen2, hidden 32, untied, with the tiny tokenizer), `train.jsonl` (its 16
  conversations), `trl.json` (the settings and TRL's per-step losses of the (16, 1) run) and `final.safetensors`
  (TRL's final weights).
  """
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  from tests import test_trl_parity as parity  # pylint: disable=import-outside-toplevel
  from tests.helpers import models  # pylint: disable=import-outside-toplevel
  root = os.path.join(out_dir, 'trl')
  model_dir = models.save_tiny_qwen2(os.path.join(root, 'model'), hidden_size=TRL_HIDDEN,
                                     intermediate_size=TRL_INTERMEDIATE)
  for config_name in ('config.json', 'generation_config.json'):
    _drop_version_stamp(os.path.join(model_dir, config_name))
  data_file = os.path.join(root, 'train.jsonl')
  parity.write_rows(data_file)
  run = parity.trl_run(model_dir, data_file, os.path.join(out_dir, '.trl_run'), 16, 1)
  with open(os.path.join(root, 'trl.json'), 'w', encoding='utf-8') as f:
    json.dump({'settings': parity.settings(16, 1), 'losses': run.losses}, f, indent=2)
    f.write('\n')
  safetensors.numpy.save_file({name: np.ascontiguousarray(w) for name, w in sorted(run.weights.items())},
                              os.path.join(root, 'final.safetensors'))
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.rmtree(os.path.join(out_dir, '.trl_run'))


def build(out_dir: str) -> list[str]:
  """Writes every model's files and the TRL run under `out_dir`; returns the model names."""
  os.makedirs(out_dir, exist_ok=True)
  for name in sorted(TINY_HF_CONFIGS):
    build_one(name, out_dir)
  build_trl(out_dir)
  return sorted(TINY_HF_CONFIGS)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
  parser.add_argument('--out', default=os.path.join(ROOT, 'tests', 'data', 'golden'))
  args = parser.parse_args()
  names = build(args.out)
  print(f'wrote {len(names)} models to {args.out}: {", ".join(names)}')


if __name__ == '__main__':
  main()
