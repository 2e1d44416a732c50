"""jaxsft's LoRA trains like TRL's SFTTrainer + PEFT: the same per-step losses from the same adapter, the exported
adapter and merged model equal to what PEFT makes of them, and PEFT's fresh init leaving the base model's loss.

The setting is tests/test_trl_parity.py's (the same tiny Qwen2, 16 conversations, every optimizer step the whole
dataset, assistant-only loss, float32, decay, clipping, warmup + linear schedule), with LoRA r=4, alpha=8,
dropout 0 (so both trainers compute the same function) starting from one PEFT adapter whose B is not zero, so the
adapters matter from the first step.
"""

import copy
import json
import pathlib

import numpy as np
import pytest

from tests import test_trl_parity as parity
from tests.helpers import models
from tests.helpers import runs

pytest.importorskip('peft')
pytestmark = pytest.mark.slow

NUM_STEPS = 8
TOL = 1e-4
LORA = dict(lora_r=4, lora_alpha=8.0, lora_dropout=0.0)
CASES = {'all-linear': ('all-linear', 16, 1), 'q_proj,v_proj': ('q_proj,v_proj', 16, 1),
         'all-linear-accumulated': ('all-linear', 4, 4)}


def settings(batch: int, accumulation: int) -> dict:
  # LoRA's usual learning rate is ~10× full fine-tuning's: the adapters then move the loss far in 8 steps.
  return dict(parity.settings(batch, accumulation), num_train_epochs=float(NUM_STEPS), learning_rate=1e-2)


def _peft_targets(targets: str):
  return 'all-linear' if targets == 'all-linear' else targets.split(',')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """The base model, the data and one PEFT adapter per target set (B ~ N(0, 0.1), seeded)."""
  import peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('lora_trl')
  model_dir = models.save_tiny_qwen2(root / 'model', hidden_size=64, intermediate_size=128)
  data_file = root / 'train.jsonl'
  parity.write_rows(data_file)
  adapters = {}
  for targets in ('all-linear', 'q_proj,v_proj'):
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype='float32')
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type='CAUSAL_LM',
                                                      target_modules=_peft_targets(targets)))
    torch.manual_seed(7)
    with torch.no_grad():
      for name, p in model.named_parameters():
        if 'lora_B' in name:
          p.normal_(0.0, 0.1)
    adapters[targets] = root / f'adapter-{targets}'
    model.save_pretrained(adapters[targets])
  return model_dir, str(data_file), root, adapters


def _trl_run(model_dir, data_file, adapter_dir, out_dir, batch, accumulation) -> list[float]:
  import datasets  # pylint: disable=import-outside-toplevel
  import peft  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  import trl  # pylint: disable=import-outside-toplevel
  args = trl.SFTConfig(output_dir=str(out_dir), use_cpu=True, bf16=False, gradient_checkpointing=False,
                       report_to='none', save_strategy='no', dataloader_num_workers=0, **settings(batch, accumulation))
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype='float32')
  model = peft.PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
  dataset = datasets.load_dataset('json', data_files=data_file, split='train')
  sft = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
  sft.train()
  losses = [row['loss'] for row in sft.state.log_history if 'loss' in row]
  assert len(losses) == NUM_STEPS
  return losses


@pytest.fixture(scope='module')
def trl_losses(setup):
  model_dir, data_file, root, adapters = setup
  done = {}

  def losses(targets: str) -> list[float]:
    if targets not in done:
      done[targets] = _trl_run(model_dir, data_file, adapters[targets], root / f'trl-{targets}', 16, 1)
    return done[targets]

  return losses


def _jaxsft_run(setup, name: str, targets: str, batch: int, accumulation: int, **fields):
  model_dir, data_file, root, adapters = setup
  out = root / f'jaxsft-{name}'
  runs.train(**settings(batch, accumulation), **LORA, model_name_or_path=model_dir, dataset_name=data_file,
             output_dir=out, bf16=False, gradient_checkpointing=False, disable_tqdm=True, use_peft=True,
             lora_target_modules=targets, adapter_name_or_path=str(adapters[targets]), **fields)
  return out


@pytest.mark.parametrize('case', sorted(CASES))
def test_loss_curve_matches_trl_with_peft(setup, trl_losses, case):
  """From the same adapter, every step's loss equals TRL + PEFT's within 1e-4; and the curve moves."""
  targets, batch, accumulation = CASES[case]
  out = _jaxsft_run(setup, case, targets, batch, accumulation)
  theirs = trl_losses(targets)
  ours = runs.losses(out)
  assert len(ours) == NUM_STEPS
  np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
  assert theirs[-1] < theirs[0] - 0.1  # The adapters learn (0.14 to 0.30 here): a test that can fail.


def test_exported_adapter_loads_in_peft_and_equals_the_merged_model(setup, trl_losses):
  """OUTPUT_DIR/adapter loads in PEFT; base + adapter gives the logits of OUTPUT_DIR/hf (merged) within 1e-4; the
  checkpoint holds the adapters only."""
  import peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  del trl_losses
  model_dir, _, root, _ = setup
  out = root / 'jaxsft-all-linear'
  if not (out / 'adapter').is_dir():
    _jaxsft_run(setup, 'all-linear', 'all-linear', 16, 1)
  config = json.loads((out / 'adapter' / 'adapter_config.json').read_text())
  assert (config['peft_type'], config['r'], config['lora_alpha']) == ('LORA', 4, 8.0)
  base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype='float32')
  adapted = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out / 'adapter')).eval()
  merged = transformers.AutoModelForCausalLM.from_pretrained(out / 'hf', dtype='float32').eval()
  tokens = torch.as_tensor(np.random.RandomState(0).randint(0, 256, (2, 24)))
  with torch.no_grad():
    ours = merged(input_ids=tokens).logits.numpy()
    theirs = adapted(input_ids=tokens).logits.numpy()
    plain = base.eval()(input_ids=tokens).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  assert np.abs(theirs - plain).max() > 1e-2  # The trained adapter changes the model.
  checkpoint = max((out / 'checkpoints').iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1)
  size = sum(f.stat().st_size for f in checkpoint.rglob('*') if f.is_file())
  base_size = sum(f.stat().st_size for f in pathlib.Path(model_dir).glob('*.safetensors'))
  assert size < base_size / 2, (size, base_size)  # Adapters and their AdamW state only, not the base.


def test_fresh_adapters_start_at_the_base_models_loss(setup):
  """Without adapter_name_or_path (PEFT's init, B = 0), the first step's loss is the base model's, and it
  trains (with dropout too)."""
  model_dir, data_file, root, _ = setup
  full = runs.train(**dict(settings(16, 1), num_train_epochs=1.0), model_name_or_path=model_dir,
                    dataset_name=data_file, output_dir=root / 'full-1', bf16=False, gradient_checkpointing=False,
                    disable_tqdm=True)
  out = runs.train(**settings(16, 1), model_name_or_path=model_dir, dataset_name=data_file,
                   output_dir=root / 'fresh', bf16=False, gradient_checkpointing=False, disable_tqdm=True,
                   use_peft=True, lora_target_modules='all-linear', lora_r=4, lora_alpha=8.0, lora_dropout=0.1)
  first = runs.losses(full)[0]
  losses = runs.losses(out)
  assert losses[0] == pytest.approx(first, abs=1e-5)  # Dropout only touches the adapters' input: B = 0.
  assert losses[-1] < losses[0] - 0.1
