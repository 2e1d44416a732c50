"""Tiny Hugging Face models saved to disk, shared by the trainer-level tests."""

import os


def save_tiny_qwen2(model_dir, *, hidden_size: int, intermediate_size: int) -> str:
  """A random float32 Qwen2 with the shipped tiny tokenizer (jaxsft/assets/tiny), saved to `model_dir`."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  import jaxsft  # pylint: disable=import-outside-toplevel

  assets = os.path.join(os.path.dirname(jaxsft.__file__), 'assets', 'tiny')
  tokenizer = transformers.AutoTokenizer.from_pretrained(assets)
  hf_cfg = transformers.Qwen2Config(
      vocab_size=len(tokenizer) + (-len(tokenizer)) % 64, hidden_size=hidden_size,
      intermediate_size=intermediate_size, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
      eos_token_id=tokenizer.eos_token_id)
  torch.manual_seed(0)
  transformers.Qwen2ForCausalLM(hf_cfg).to(torch.float32).save_pretrained(model_dir)
  tokenizer.save_pretrained(model_dir)
  return str(model_dir)
