"""The plain SFT base: TRL SFTConfig's defaults, nothing model- or data-specific.

What: fine-tunes the weights at `model_name_or_path` on `dataset_name` (conversational `messages`,
`prompt`/`completion` or `text` rows), with TRL's defaults (lr 2e-5 linear, 3 epochs, per-device batch 8,
max_length 1024, bf16 compute, gradient checkpointing).
Where: any backend; the batch is split over all devices (data parallel).
How long: depends on model and data; every other config starts from this one.

  python -m jaxsft.train --config configs/sft.py \
      --config.model_name_or_path=Qwen/Qwen2.5-0.5B-Instruct \
      --config.dataset_name=data/train.jsonl --config.output_dir=runs/first
"""

from jaxsft import config as config_lib


def get_config():
  return config_lib.base_config()
