"""The embedded default: a tiny Qwen2-architecture model learns step-by-step arithmetic from scratch.

What: trains a 0.86M-parameter Qwen2-architecture model (shipped config and tokenizer in
`jaxsft/assets/tiny`, random initialisation) on a synthetic reasoning-distillation dataset generated
deterministically by `jaxsft.data.synthetic` (arithmetic word problems with `<think>` traces, system
prompts, multi-turn follow-ups), assistant-only loss, then greedy-decodes held-out problems and prints the
exact-match accuracy.
Where: CPU (2 cores is enough); no network, nothing downloaded.
How long: under 5 minutes on 2 CPU cores, compilation included.

  python -m jaxsft.train --config configs/tiny.py
"""

import os

import jaxsft
from jaxsft import config as config_lib


def get_config():
  c = config_lib.base_config()  # = configs/sft.py
  c.model_name_or_path = os.path.join(os.path.dirname(jaxsft.__file__), 'assets', 'tiny')
  c.model_init = 'random'
  c.dataset_name = 'synthetic:arithmetic'
  c.output_dir = 'runs/tiny'
  c.assistant_only_loss = True
  c.max_length = 128  # The longest conversation is 118 tokens.
  c.bf16 = False
  c.gradient_checkpointing = False
  c.learning_rate = 3e-3
  c.lr_scheduler_type = 'cosine'
  c.warmup_ratio = 0.05
  c.weight_decay = 0.01
  c.num_train_epochs = 1.0  # One pass over 20k rows beats several over fewer (more distinct problems).
  c.per_device_train_batch_size = 32
  c.logging_steps = 20
  c.accuracy_eval_problems = 200
  c.accuracy_eval_max_new_tokens = 64
  return c
