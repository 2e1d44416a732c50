"""jaxsft against transformers' and TRL's stored results (tests/data/golden, scripts/build_golden.py), without torch.

Where torch is missing (TPU VMs, the Python 3.12 stack) these are the transformers parity tests: each tiny model
of the golden set (Qwen2, Qwen2 with sliding windows, Qwen3, Qwen3 with YaRN, Llama 3 with biases and llama3
RoPE, Mistral's window, tied Llama) is loaded from its saved Hugging Face files and run on the right- and
left-padded batches transformers ran; the logits of the real positions must agree within tests/test_model.py's
tolerance. Where torch is installed, the stored logits are checked to still be what the installed transformers
computes for the stored weights, so a release that changes the reference is noticed (rebuild with the script).

Export: importing each golden model and exporting it gives back every tensor bit for bit. Training: jaxsft's
12-step runs of tests/test_trl_parity.py's setting (on a smaller model) follow TRL's stored loss curve and end on
TRL's stored final weights, with that module's tolerances, as one micro-batch per step and as four; where TRL
is installed, the stored run is checked to be what it computes.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from jaxsft.models import hf
from jaxsft.models import hf_config
from tests import test_trl_parity as parity
from tests.helpers import runs

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'golden')
NAMES = sorted(name for name in os.listdir(GOLDEN) if os.path.exists(os.path.join(GOLDEN, name, 'logits.npz')))
TRL = os.path.join(GOLDEN, 'trl')
ATOL = 1e-4  # As tests/test_model.py: max abs logit difference to transformers, float32 on CPU.


def _golden(name: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(GOLDEN, name, 'logits.npz')) as arrays:
    return dict(arrays)


def test_the_golden_set_covers_every_tiny_architecture():
  from tests.conftest import TINY_HF_CONFIGS  # pylint: disable=import-outside-toplevel
  assert NAMES == sorted(TINY_HF_CONFIGS)


@pytest.mark.parametrize('name', NAMES)
def test_logits_match_the_stored_transformers_logits(name):
  path = os.path.join(GOLDEN, name)
  model = hf.load_pretrained(path, hf_config.model_config_from_hf(hf_config.read_hf_config(path)))
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, *inputs: nnx.merge(graphdef, state)(*inputs))
  golden = _golden(name)
  for padding in ('right', 'left'):
    tokens, mask, positions = (jnp.asarray(golden[f'{padding}_{k}'], jnp.int32) for k in ('tokens', 'mask', 'positions'))
    got = np.asarray(forward(state, tokens, positions, mask))
    want, real = golden[f'{padding}_logits'], golden[f'{padding}_mask'] > 0
    assert got.shape == want.shape and np.abs(want[real]).max() > 1.0  # Not vacuous.
    np.testing.assert_allclose(got[real], want[real], rtol=0, atol=ATOL, err_msg=f'{name}, {padding} padding')


@pytest.mark.parametrize('name', NAMES)
def test_the_stored_logits_are_what_transformers_computes(name):
  pytest.importorskip('torch', reason='transformers models need torch')
  import transformers  # pylint: disable=import-outside-toplevel
  from tests.conftest import TinyHF  # pylint: disable=import-outside-toplevel
  model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(GOLDEN, name), attn_implementation='eager')
  golden = _golden(name)
  for padding in ('right', 'left'):
    got = TinyHF.logits(model.eval(), *(golden[f'{padding}_{k}'] for k in ('tokens', 'mask', 'positions')))
    np.testing.assert_allclose(got, golden[f'{padding}_logits'], rtol=0, atol=1e-5, err_msg=f'{name}, {padding}')


@pytest.mark.parametrize('name', NAMES)
def test_import_then_export_gives_back_every_tensor(name, tmp_path):
  path = os.path.join(GOLDEN, name)
  cfg = hf_config.read_hf_config(path)
  hf.save_pretrained(hf.load_pretrained(path, hf_config.model_config_from_hf(cfg)), cfg, tmp_path)
  original, exported = runs.weights(path), runs.weights(tmp_path)
  assert sorted(original) == sorted(exported)
  for key, value in original.items():
    assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key


def _trl_reference() -> tuple[dict, list[float], dict[str, np.ndarray]]:
  with open(os.path.join(TRL, 'trl.json'), encoding='utf-8') as f:
    stored = json.load(f)
  return stored['settings'], stored['losses'], safetensors.numpy.load_file(os.path.join(TRL, 'final.safetensors'))


@pytest.mark.slow
@pytest.mark.parametrize('batch, accumulation', [(16, 1), (4, 4)])
def test_training_follows_the_stored_trl_run(tmp_path, batch, accumulation):
  settings, losses, final = _trl_reference()
  assert settings == parity.settings(16, 1) and len(losses) == parity.NUM_STEPS
  model_dir = os.path.join(TRL, 'model')
  runs.train(**parity.settings(batch, accumulation), model_name_or_path=model_dir,
             dataset_name=os.path.join(TRL, 'train.jsonl'), output_dir=tmp_path / 'out', bf16=False,
             gradient_checkpointing=False, disable_tqdm=True)
  np.testing.assert_allclose(runs.losses(tmp_path / 'out'), losses, atol=parity.TOL, rtol=0)
  assert losses[-1] < losses[0] - 0.3  # The curve really moves (6.36 to 6.03: 3000x TOL).
  bad = parity.weight_mismatches(runs.weights(tmp_path / 'out' / 'hf'), final, runs.weights(model_dir))
  assert not bad, f'{len(bad)} of {len(final)} tensors differ from TRL:\n' + '\n'.join(bad)


@pytest.mark.slow
def test_the_stored_trl_run_is_what_trl_computes(tmp_path):
  pytest.importorskip('trl', reason='TRL needs torch')
  settings, losses, final = _trl_reference()
  run = parity.trl_run(os.path.join(TRL, 'model'), os.path.join(TRL, 'train.jsonl'), tmp_path, 16, 1)
  assert settings == parity.settings(16, 1)
  np.testing.assert_allclose(run.losses, losses, atol=1e-6, rtol=0)
  for name, value in final.items():
    np.testing.assert_allclose(run.weights[name], value, atol=1e-6, rtol=0, err_msg=name)
