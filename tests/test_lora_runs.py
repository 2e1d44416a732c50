"""LoRA runs the way users meet them: the command line with use_peft, a SIGTERM and a bit-exact resume (dropout on),
checkpoints that hold the adapters only, and `jaxsft.export` of a LoRA checkpoint (adapter + merged model)."""

import signal

import numpy as np
import pytest

from jaxsft import checkpoint
from tests.helpers import models
from tests.helpers import processes
from tests.helpers import runs

pytestmark = pytest.mark.slow

INTERRUPT_AT = 5
LORA = dict(use_peft=True, lora_r=4, lora_alpha=8.0, lora_dropout=0.1, lora_target_modules='all-linear')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('lora_runs')
  model_dir = models.save_tiny_qwen2(root / 'model', hidden_size=64, intermediate_size=128)
  data_file = processes.write_synthetic_jsonl(root / 'train.jsonl', 48, seed=5)
  return root, model_dir, data_file


def make_config(setup, out, **overrides):
  _, model_dir, data_file = setup
  return runs.config(**{**dict(
      model_name_or_path=model_dir, dataset_name=data_file, bf16=False, gradient_checkpointing=False,
      disable_tqdm=True, packing=True, max_length=128, per_device_train_batch_size=2, gradient_accumulation_steps=2,
      num_train_epochs=2.0, logging_steps=3, learning_rate=1e-2, warmup_steps=2, weight_decay=0.1,
      assistant_only_loss=True, seed=3, save_steps=0), **LORA, 'output_dir': out, **overrides})


@pytest.fixture(scope='module')
def reference(setup):
  out = setup[0] / 'reference'
  runs.run(make_config(setup, out))
  return out


def _adapter(out) -> dict:
  return runs.weights(out / 'adapter')


def test_sigterm_then_resume_is_bitwise_the_uninterrupted_lora_run(setup, reference, monkeypatch):
  """Dropout masks, adapters and AdamW state all come back: every metric, the adapter and the merged model are the
  uninterrupted run's, bit for bit."""
  out = setup[0] / 'interrupted'
  with monkeypatch.context() as patch:
    runs.interrupt_at(patch, INTERRUPT_AT, signal.SIGTERM)
    with pytest.raises(runs.Preempted):
      runs.run(make_config(setup, out))
  assert checkpoint.latest_step(str(out)) == INTERRUPT_AT
  runs.run(make_config(setup, out))
  ours, ref = runs.exact(runs.metrics(out)), runs.exact(runs.metrics(reference))
  assert ours == ref
  assert ref[-1]['loss'] < ref[0]['loss'] - 0.1
  for got, want in ((_adapter(out), _adapter(reference)), (runs.hf_weights(out), runs.hf_weights(reference))):
    assert sorted(got) == sorted(want)
    for name in want:
      assert np.array_equal(got[name], want[name]), name


def test_dropout_applies_in_training(setup, reference):
  """lora_dropout really applies: without it the same run gives another curve (the first logged row already
  covers 3 steps, of which the later ones have B != 0)."""
  ref = runs.losses(reference)
  runs.run(make_config(setup, setup[0] / 'no_dropout', lora_dropout=0.0))
  no_dropout = runs.losses(setup[0] / 'no_dropout')
  assert max(abs(a - b) for a, b in zip(no_dropout, ref)) > 1e-4


def test_a_lora_checkpoint_holds_the_adapters_only_and_exports_both(setup, reference, tmp_path):
  """The newest checkpoint's parameters are the adapters (float32), far smaller than the base; `jaxsft.export`
  writes the run's adapter and merged model again from it."""
  step = checkpoint.latest_step(str(reference))
  files = [p for p in (reference / 'checkpoints' / str(step)).rglob('*') if p.is_file()]
  size = sum(p.stat().st_size for p in files)
  base = sum(p.stat().st_size for p in (setup[0] / 'model').glob('*.safetensors'))
  assert size < base / 2, (size, base)
  result = runs.cli('jaxsft.export', '--checkpoint', str(reference), '--out', str(tmp_path / 'hf'))
  assert result.returncode == 0, result.stderr
  assert 'adapter' in result.stderr
  exported, trained = runs.weights(tmp_path / 'hf'), runs.hf_weights(reference)
  assert sorted(exported) == sorted(trained)
  for name in trained:
    np.testing.assert_array_equal(exported[name], trained[name], err_msg=name)
  adapter = runs.weights(tmp_path / 'hf-adapter')
  for name, value in _adapter(reference).items():
    np.testing.assert_array_equal(adapter[name], value, err_msg=name)


def test_the_command_line_trains_a_lora_run(setup, tmp_path):
  """`python -m jaxsft.train --config configs/sft.py --config.use_peft=True ...`: trains, writes adapter/ and hf/;
  a bad LoRA field is one line before any compile."""
  _, model_dir, data_file = setup
  out = tmp_path / 'cli'
  common = dict(model_name_or_path=model_dir, dataset_name=data_file, output_dir=out, max_steps=2, bf16=False,
                per_device_train_batch_size=2, max_length=64, disable_tqdm=True, save_steps=0)
  result = runs.train_cli(**common, use_peft=True, lora_target_modules='q_proj,v_proj', lora_r=2)
  assert result.returncode == 0, result.stderr
  assert (out / 'adapter' / 'adapter_config.json').is_file() and (out / 'hf' / 'config.json').is_file()
  assert 'LoRA: r=2' in result.stderr
  bad = runs.train_cli(**dict(common, output_dir=tmp_path / 'bad'), use_peft=True, lora_target_modules='q_proj,qkv')
  assert bad.returncode != 0
  assert bad.stderr.strip().splitlines()[-1].startswith('error: ') and "'lora_target_modules'" in bad.stderr
  assert not (tmp_path / 'bad').exists()


def test_generate_with_the_adapter_equals_the_merged_model(setup, reference):
  """`jaxsft.generate --model BASE --adapter OUTPUT_DIR/adapter` decodes what `--model OUTPUT_DIR/hf` does."""
  _, model_dir, _ = setup
  args = ('--prompt', 'What is 12 + 30?', '--max_new_tokens', '12', '--json', '--dtype', 'float32')
  merged = runs.cli('jaxsft.generate', '--model', str(reference / 'hf'), *args)
  adapted = runs.cli('jaxsft.generate', '--model', model_dir, '--adapter', str(reference / 'adapter'), *args)
  base = runs.cli('jaxsft.generate', '--model', model_dir, *args)
  for result in (merged, adapted, base):
    assert result.returncode == 0, result.stderr
  assert adapted.stdout == merged.stdout
  assert adapted.stdout != base.stdout  # The adapter changes what the model says.
  bad = runs.cli('jaxsft.generate', '--model', model_dir, '--adapter', str(setup[0]), *args)
  assert bad.returncode != 0 and '--adapter' in bad.stderr.strip().splitlines()[-1]
