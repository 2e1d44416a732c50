"""Builds `jaxsft/assets/tiny/`: the tokenizer, chat template and Qwen2 config of the tiny default.

The tokenizer is a byte-level BPE (Qwen2's pre-tokenizer: digits split one by one) trained with the
`tokenizers` library on the synthetic arithmetic corpus (`jaxsft.data.synthetic`), so every byte is
representable and `<unk>` is never produced; it exists only so that tools expecting an unknown token
find one. Special tokens: `<|endoftext|>` (pad), `<|im_start|>`, `<|im_end|>` (eos), plus `<think>` and
`</think>` as ordinary added tokens (as in Qwen3). The ChatML template marks each assistant turn's
content and `<|im_end|>` with `{% generation %}`, so `apply_chat_template(...,
return_assistant_tokens_mask=True)` works, and supports `add_generation_prompt`.

Deterministic: running it twice writes byte-identical files, whatever the installed transformers version
(its `transformers_version` stamp is left out).

  python scripts/build_tiny_assets.py [--out jaxsft/assets/tiny]
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import trainers
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from jaxsft.data import synthetic  # pylint: disable=wrong-import-position

VOCAB_SIZE = 640  # Upper bound: the corpus saturates BPE (min_frequency=2) near 570 tokens.
UNK, PAD, IM_START, IM_END = '<unk>', '<|endoftext|>', '<|im_start|>', '<|im_end|>'
SPECIAL_TOKENS = (PAD, IM_START, IM_END, UNK)
THINK_TOKENS = ('<think>', '</think>')
# Qwen2's split pattern: contractions, words, single digits, punctuation runs, whitespace.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def corpus_texts() -> list[str]:
  """The training texts: every message content and role of the synthetic corpus."""
  texts = []
  for row in synthetic.corpus():
    for message in row['messages']:
      texts += [message['role'], message['content']]
  texts += list(synthetic.SYSTEM_PROMPTS) + list(synthetic.NAMES) + list(synthetic.OBJECTS)
  return texts


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
  tok = tokenizers.Tokenizer(models.BPE(unk_token=UNK))
  tok.normalizer = normalizers.NFC()  # As Qwen2's (transformers' Qwen2Tokenizer adds it on load).
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(QWEN2_PATTERN), behavior='isolated'),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(THINK_TOKENS), min_frequency=2,
                                special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(corpus_texts(), trainer=trainer)
  tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, unk_token=UNK, pad_token=PAD, eos_token=IM_END, chat_template=CHAT_TEMPLATE,
      model_max_length=512, clean_up_tokenization_spaces=False)


def model_config(tokenizer) -> transformers.Qwen2Config:
  vocab_size = len(tokenizer) + (-len(tokenizer)) % 64
  return transformers.Qwen2Config(
      vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
      rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0}, rms_norm_eps=1e-6,
      tie_word_embeddings=True, use_sliding_window=False, bos_token_id=None,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, dtype='float32')


def generation_config(tokenizer) -> transformers.GenerationConfig:
  return transformers.GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id, do_sample=False)


def build(out_dir: str) -> list[str]:
  """Writes the assets into `out_dir` (replacing it) and returns the file names."""
  tokenizer = build_tokenizer()
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer.save_pretrained(tmp)
    model_config(tokenizer).save_pretrained(tmp)
    generation_config(tokenizer).save_pretrained(tmp)
    for name in sorted(os.listdir(tmp)):  # Canonical JSON: sorted keys, fixed indentation.
      if name.endswith('.json'):
        path = os.path.join(tmp, name)
        with open(path, encoding='utf-8') as f:
          data = json.load(f)
        if name == 'tokenizer_config.json':  # What AutoTokenizer resolves it to; transformers 4 knows it.
          data['tokenizer_class'] = 'Qwen2Tokenizer'
        # The writer's version says nothing about the asset and would make the files depend on the installed
        # transformers (loading ignores a missing one).
        data.pop('transformers_version', None)
        with open(path, 'w', encoding='utf-8') as f:
          json.dump(data, f, indent=2, sort_keys=True, ensure_ascii=False)
          f.write('\n')
    if os.path.isdir(out_dir):
      shutil.rmtree(out_dir)
    shutil.copytree(tmp, out_dir)
  return sorted(os.listdir(out_dir))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'jaxsft', 'assets', 'tiny')
  parser.add_argument('--out', default=os.path.normpath(default), help='output directory')
  args = parser.parse_args()
  files = build(args.out)
  print(f'wrote {", ".join(files)} to {args.out}')


if __name__ == '__main__':
  main()
