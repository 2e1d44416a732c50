"""FSDP and tensor parallelism on 8 simulated CPU devices: the loss curve of every mesh equals one device's.

Meshes (fsdp=8), (fsdp=4, tensor=2) and (data=2, fsdp=4) against a single-device run of the same global
batch, float32, within 1e-5; parameters and optimizer state are sharded as the rules say (checked on the
arrays), and the parameter bytes per device fall as 1/fsdp.
"""

import json

import numpy as np
import pytest

from tests.helpers import models
from tests.helpers import processes
from tests.helpers import runs as runs_lib

pytestmark = pytest.mark.slow
MESHES = [{'data': 1, 'fsdp': 8, 'tensor': 1}, {'data': 1, 'fsdp': 4, 'tensor': 2}, {'data': 2, 'fsdp': 4, 'tensor': 1}]


def _run(root, name: str, num_devices: int, model_dir: str, data_file: str, meshes) -> list[dict]:
  out = root / name
  out.mkdir()
  proc = runs_lib.cli('tests.helpers.mesh_run', num_devices, model_dir, data_file, out, *map(json.dumps, meshes),
                      env=runs_lib.environment(XLA_FLAGS=''), timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads((out / 'result.json').read_text())


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('mesh')
  model_dir = models.save_tiny_qwen2(root / 'model', hidden_size=64, intermediate_size=128)
  data_file = processes.write_synthetic_jsonl(root / 'train.jsonl', 40, seed=2)
  single = _run(root, 'single', 1, model_dir, data_file, [{'data': 1, 'fsdp': 1, 'tensor': 1}])[0]
  return single, _run(root, 'eight', 8, model_dir, data_file, MESHES)


def test_every_mesh_gives_the_single_device_loss_curve(runs):
  single, meshed = runs
  assert len(single['losses']) == 5 and single['losses'][-1] < single['losses'][0]
  for result in meshed:
    np.testing.assert_allclose(result['losses'], single['losses'], rtol=0, atol=1e-5, err_msg=str(result['mesh']))


def test_parameters_and_optimizer_state_are_sharded_by_the_rules(runs):
  _, meshed = runs
  by_mesh = {json.dumps(r['mesh'], sort_keys=True): r for r in meshed}
  tp = by_mesh[json.dumps({'data': 1, 'fsdp': 4, 'tensor': 2}, sort_keys=True)]['specs']

  def spec(suffix, tree='params'):
    matches = [v for k, v in tp.items() if k.startswith(f"['{tree}']") and k.endswith(suffix)]
    assert matches, suffix
    return matches[0]

  # Layer parameters are stacked on a leading, unsharded 'layers' axis (scan_layers, the default).
  assert spec("['embed_tokens']['embedding']") == ['tensor', 'fsdp']  # (vocab, embed)
  assert spec("['self_attn']['q_proj']['kernel']") == [None, 'fsdp', 'tensor', None]  # (layers, embed, q_heads, hd)
  assert spec("['self_attn']['k_proj']['kernel']") == [None, 'fsdp', 'tensor', None]
  assert spec("['self_attn']['o_proj']['kernel']") == [None, 'tensor', None, 'fsdp']
  assert spec("['mlp']['down_proj']['kernel']") == [None, 'tensor', 'fsdp']
  assert spec("['lm_head']['kernel']") == ['fsdp', 'tensor']
  assert spec("['norm']['scale']") in ([None], [])
  # ZeRO-3: Adam's moments are partitioned like their parameters (no accumulator lives in the state).
  opt_q = [v for k, v in tp.items() if k.startswith("['opt_state']") and k.endswith("['q_proj']['kernel']")]
  assert len(opt_q) == 2 and all(v == [None, 'fsdp', 'tensor', None] for v in opt_q)  # mu, nu.


def test_parameter_bytes_per_device_fall_as_one_over_fsdp(runs):
  single, meshed = runs
  fsdp8, fsdp4 = meshed[0], meshed[2]
  assert (fsdp8['mesh']['fsdp'], fsdp4['mesh']['fsdp']) == (8, 4)
  # Everything with an embed dimension is split; only the norm scales and the attention biases (no embed
  # dimension: 2.7% of this 0.15M-parameter model, a rounding error of a real one) stay replicated.
  for key in ('param_bytes', 'opt_bytes'):
    full = single[key]
    assert full / 8 <= fsdp8[key] < full / 8 * 1.04, key
    assert full / 4 <= fsdp4[key] < full / 4 * 1.04, key
    assert 1.9 < fsdp4[key] / fsdp8[key] <= 2, key
