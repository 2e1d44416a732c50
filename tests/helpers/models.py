"""Tiny Hugging Face models saved to disk, shared by the trainer-level tests."""

import importlib.util
import os


def save_tiny_qwen2(model_dir, *, hidden_size: int, intermediate_size: int) -> str:
  """A random float32 Qwen2 with the shipped tiny tokenizer (jaxsft/assets/tiny), saved to `model_dir`: transformers'
  init (torch's generator, seed 0), or where torch is missing jaxsft's random init (seed 0) written by its export."""
  import transformers  # pylint: disable=import-outside-toplevel
  import jaxsft  # pylint: disable=import-outside-toplevel

  assets = os.path.join(os.path.dirname(jaxsft.__file__), 'assets', 'tiny')
  tokenizer = transformers.AutoTokenizer.from_pretrained(assets)
  hf_cfg = transformers.Qwen2Config(
      vocab_size=len(tokenizer) + (-len(tokenizer)) % 64, hidden_size=hidden_size,
      intermediate_size=intermediate_size, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
      eos_token_id=tokenizer.eos_token_id)
  if importlib.util.find_spec('torch') is None:  # CI's Python 3.12 lane, TPU VMs: jaxsft's own random init.
    from jaxsft.models import hf  # pylint: disable=import-outside-toplevel
    from jaxsft.models import hf_config  # pylint: disable=import-outside-toplevel
    config = dict(hf_cfg.to_dict(), architectures=['Qwen2ForCausalLM'], torch_dtype='float32')
    model = hf.init_random(hf_config.model_config_from_hf(config), seed=0)
    hf.save_pretrained(model, config, model_dir)
  else:
    import torch  # pylint: disable=import-outside-toplevel
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(hf_cfg).to(torch.float32).save_pretrained(model_dir)
  tokenizer.save_pretrained(model_dir)
  return str(model_dir)


def write_logits_spec(tiny_hf, names, out_dir) -> str:
  """Saves each tiny model `names` and its transformers logits on a right-padded batch (for the subprocess
  sharded-load tests); returns the path of the spec.json listing the (model dir, expected .npz) pairs."""
  import json  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  out_dir = pathlib.Path(out_dir)
  models = []
  for name in names:
    hf_model = tiny_hf.model(name, **({'head_dim': 16} if name == 'qwen3' else {}))
    path = tiny_hf.save(hf_model)
    tokens, mask, positions = tiny_hf.batch('right', batch=4)
    expected = out_dir / f'{name}.npz'
    np.savez(expected, tokens=tokens, mask=mask, positions=positions,
             logits=tiny_hf.logits(hf_model, tokens, mask, positions))
    models.append((str(path), str(expected)))
  spec = out_dir / 'spec.json'
  spec.write_text(json.dumps({'models': models}))
  return str(spec)
