"""LoRA adapters against PEFT itself: the same logits from the same adapter, PEFT's format both ways, merging,
PEFT's initialisation, and the LoRA fields' one-line errors."""

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from jaxsft import config as config_lib
from jaxsft import peft_config
from jaxsft.errors import InputError
from jaxsft.models import hf
from jaxsft.models import hf_config
from jaxsft.models import lora as lora_lib
from jaxsft.models import peft_io

ATOL = 1e-4
TARGET_CASES = {'all-linear': 'all-linear', 'q_proj,v_proj': 'q_proj,v_proj', 'o_proj,down_proj': 'o_proj,down_proj'}


def _settings(targets: str, r: int = 4, alpha: float = 8.0, rslora: bool = False) -> peft_config.Settings:
  return peft_config.Settings(r=r, alpha=alpha, dropout=0.0, targets=peft_config.parse_targets(targets),
                              rslora=rslora)


def _ours(path, **overrides):
  return hf.load_pretrained(path, hf_config.model_config_from_hf(hf_config.read_hf_config(path), **overrides))


def _logits(model, tokens, mask, positions):
  i32 = lambda x: np.asarray(x, np.int32)
  graphdef, state = nnx.split(model)
  return np.asarray(jax.jit(lambda s, a, b, c: nnx.merge(graphdef, s)(a, b, c))(state, i32(tokens), i32(positions),
                                                                                  i32(mask)))


def _peft_adapter(tiny_hf, base, out_dir, targets: str, *, r=4, alpha=8.0, rslora=False, seed=1):
  """A PEFT adapter on `base` with random A and non-zero B, saved to `out_dir`; returns the PeftModel."""
  import peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  target_modules = 'all-linear' if targets == 'all-linear' else targets.split(',')
  model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, use_rslora=rslora,
                                                    target_modules=target_modules, task_type='CAUSAL_LM'))
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'lora_B' in name:
        p.normal_(0.0, 0.2)
  model.save_pretrained(out_dir)
  return model.eval()


@pytest.fixture(scope='module')
def qwen2(tiny_hf):
  """A tiny Qwen2 (q/k/v biases, untied lm_head) and its directory."""
  model = tiny_hf.model('qwen2')
  return model, tiny_hf.save(model)


@pytest.mark.parametrize('scan', [False, True])
@pytest.mark.parametrize('targets', sorted(TARGET_CASES))
def test_adapter_logits_equal_peft(tiny_hf, qwen2, tmp_path, targets, scan):
  """The same PEFT adapter on the same base: our logits equal PeftModel's; merged, they stay the same."""
  base, path = qwen2
  import copy  # pylint: disable=import-outside-toplevel
  peft_model = _peft_adapter(tiny_hf, copy.deepcopy(base), tmp_path / 'adapter', targets)
  tokens, mask, positions = tiny_hf.batch('right')
  expected = tiny_hf.logits(peft_model, tokens, mask, positions)
  plain = tiny_hf.logits(base, tokens, mask, positions)
  assert np.abs(expected - plain).max() > 1e-2  # The adapter matters: a test that can fail.

  lora = _settings(targets)
  model = peft_io.attach_from_dir(_ours(path, scan_layers=scan), lora, str(tmp_path / 'adapter'))
  valid = mask.astype(bool)
  np.testing.assert_allclose(_logits(model, tokens, mask, positions)[valid], expected[valid], atol=ATOL, rtol=0)
  merged = lora_lib.merge(model)
  assert not [p for p, v in nnx.to_flat_state(nnx.state(merged)) if isinstance(v, lora_lib.LoRAParam)]
  np.testing.assert_allclose(_logits(merged, tokens, mask, positions)[valid], expected[valid], atol=ATOL, rtol=0)


def test_rslora_scaling_equals_peft(tiny_hf, qwen2, tmp_path):
  import copy  # pylint: disable=import-outside-toplevel
  base, path = qwen2
  peft_model = _peft_adapter(tiny_hf, copy.deepcopy(base), tmp_path / 'adapter', 'all-linear', r=16, alpha=8.0,
                             rslora=True)
  tokens, mask, positions = tiny_hf.batch('right')
  lora = _settings('all-linear', r=16, alpha=8.0, rslora=True)
  assert lora.scaling == pytest.approx(8.0 / 4.0)
  model = peft_io.attach_from_dir(_ours(path), lora, str(tmp_path / 'adapter'))
  valid = mask.astype(bool)
  np.testing.assert_allclose(_logits(model, tokens, mask, positions)[valid],
                             tiny_hf.logits(peft_model, tokens, mask, positions)[valid], atol=ATOL, rtol=0)


@pytest.mark.parametrize('scan', [False, True])
def test_saved_adapter_is_peft_format_and_round_trips(tiny_hf, qwen2, tmp_path, scan):
  """Our saved adapter holds exactly PEFT's tensor names and values, and PeftModel loads it."""
  import copy  # pylint: disable=import-outside-toplevel
  import peft  # pylint: disable=import-outside-toplevel
  base, path = qwen2
  peft_model = _peft_adapter(tiny_hf, copy.deepcopy(base), tmp_path / 'theirs', 'all-linear')
  lora = _settings('all-linear')
  model = peft_io.attach_from_dir(_ours(path, scan_layers=scan), lora, str(tmp_path / 'theirs'))
  peft_io.save_adapter(model, lora, str(tmp_path / 'ours'), base_model=str(path))
  theirs, ours = peft_io.read_tensors(str(tmp_path / 'theirs')), peft_io.read_tensors(str(tmp_path / 'ours'))
  assert sorted(ours) == sorted(theirs)
  for name, value in theirs.items():
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
  loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / 'ours')).eval()
  tokens, mask, positions = tiny_hf.batch('right')
  np.testing.assert_allclose(tiny_hf.logits(loaded, tokens, mask, positions),
                             tiny_hf.logits(peft_model, tokens, mask, positions), atol=1e-6, rtol=0)
  config = json.loads((tmp_path / 'ours' / 'adapter_config.json').read_text())
  assert (config['r'], config['lora_alpha'], config['peft_type']) == (4, 8.0, 'LORA')


@pytest.mark.parametrize('scan', [False, True])
def test_fresh_adapters_are_peft_init_and_leave_the_logits(tiny_hf, qwen2, scan):
  """B = 0: the first logits are the base model's; A ~ U(±1/sqrt(fan_in)), the same in both layouts."""
  _, path = qwen2
  lora = _settings('all-linear', r=8)
  base = _ours(path, scan_layers=scan)
  tokens, mask, positions = tiny_hf.batch('right')
  before = _logits(base, tokens, mask, positions)
  model = lora_lib.attach(base, lora, lambda shape: lora_lib.init_values(shape, seed=3))
  np.testing.assert_array_equal(_logits(model, tokens, mask, positions), before)
  tensors = peft_io.adapter_tensors(model, lora)
  assert len(tensors) == 2 * 7 * 2  # A and B of 7 projections in each of 2 layers.
  for name, value in tensors.items():
    if 'lora_B' in name:
      assert not value.any(), name
    else:
      bound = 1 / math.sqrt(value.shape[1])
      assert np.abs(value).max() <= bound and np.abs(value).max() > 0.8 * bound, name
  if scan:  # The same draws as the unscanned layout's.
    unscanned = lora_lib.attach(_ours(path), lora, lambda shape: lora_lib.init_values(shape, seed=3))
    for name, value in peft_io.adapter_tensors(unscanned, lora).items():
      np.testing.assert_array_equal(tensors[name], value, err_msg=name)


def _config(**fields):
  config = config_lib.base_config()
  config.update(dict(model_name_or_path='Qwen/Qwen2.5-0.5B', dataset_name='synthetic:arithmetic',
                     output_dir='/tmp/x', use_peft=True))
  config.update(fields)
  return config


@pytest.mark.parametrize('fields,needles', [
    ({'lora_r': 0}, ("'lora_r'", '0')),
    ({'lora_r': -4}, ("'lora_r'", '-4')),
    ({'lora_alpha': 0.0}, ("'lora_alpha'",)),
    ({'lora_dropout': 1.0}, ("'lora_dropout'",)),
    ({'lora_target_modules': 'q_proj,qproj'}, ("'lora_target_modules'", "'qproj'")),
    ({'lora_target_modules': 'lm_head'}, ("'lora_target_modules'", "'lm_head'")),
    ({'use_dora': True}, ("'use_dora'", 'DoRA')),
    ({'load_in_4bit': True}, ("'load_in_4bit'", 'QLoRA')),
    ({'load_in_8bit': True}, ("'load_in_8bit'",)),
    ({'lora_modules_to_save': 'lm_head'}, ("'lora_modules_to_save'",)),
    ({'use_peft': False, 'adapter_name_or_path': '/nowhere'}, ("'adapter_name_or_path'", 'use_peft')),
    ({'adapter_name_or_path': '/nowhere'}, ("'adapter_name_or_path'", '/nowhere')),
    ({'model_init': 'random'}, ("'model_init'",)),
    ({'model': {'mlp_chunk_size': 64}}, ("'model.mlp_chunk_size'", 'gate_proj')),
])
def test_bad_lora_fields_are_one_line_naming_the_field(fields, needles):
  overrides = dict(fields)
  if 'model' in overrides:
    model = overrides.pop('model')
    config = _config(lora_target_modules='all-linear', **overrides)
    config.model.update(model)
  else:
    config = _config(**overrides)
  with pytest.raises(InputError) as info:
    config_lib.validate(config)
  message = str(info.value)
  assert '\n' not in message
  for needle in needles:
    assert needle in message, message


def test_an_adapter_of_another_shape_is_refused(tiny_hf, qwen2, tmp_path):
  import copy  # pylint: disable=import-outside-toplevel
  base, _ = qwen2
  _peft_adapter(tiny_hf, copy.deepcopy(base), tmp_path / 'adapter', 'q_proj,v_proj', r=4, alpha=8.0)
  for fields, name in (({'lora_r': 8}, 'lora_r'), ({'lora_alpha': 16.0}, 'lora_alpha'),
                       ({'lora_target_modules': 'all-linear'}, 'lora_target_modules')):
    config = _config(**{'adapter_name_or_path': str(tmp_path / 'adapter'), 'lora_r': 4, 'lora_alpha': 8.0, **fields})
    with pytest.raises(InputError, match=f"'{name}'"):
      config_lib.validate(config)
  config_lib.validate(_config(adapter_name_or_path=str(tmp_path / 'adapter'), lora_r=4, lora_alpha=8.0))


def test_lora_flops_leave_out_the_base_weight_gradient():
  """MFU of a LoRA run counts 4 FLOPs a frozen weight per token (no weight gradient) and 6 per adapter weight."""
  from jaxsft import metrics  # pylint: disable=import-outside-toplevel
  from jaxsft.models import transformer  # pylint: disable=import-outside-toplevel
  cfg = transformer.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=8)
  n = metrics.matmul_params(cfg)
  attention = 12.0 * 4 * 8 * 50
  assert metrics.train_flops(cfg, 10, 50) == pytest.approx(60 * n + attention)
  assert metrics.train_flops(cfg, 10, 50, adapter_params=100) == pytest.approx(40 * n + 6000 + attention)
