"""open-r1's OpenR1-Distill-7B: Qwen2.5-Math-7B (RoPE 300k) distilled on DeepSeek-R1 traces.

What: open-r1's `recipes/OpenR1-Distill-7B/sft/config_distill.yaml` field by field: full fine-tuning of
`open-r1/Qwen2.5-Math-7B-RoPE-300k` on `open-r1/Mixture-of-Thoughts` (config `all`, 349k conversations),
max_length 32768, 5 epochs, lr 4e-5 cosine with min lr 10%, warmup 3%, per-device batch 2 × 8 accumulation
steps, max_grad_norm 0.2, bf16, gradient checkpointing, eos `<|im_end|>`. Parameters, gradients and optimizer
state are partitioned over every device (`mesh.fsdp=-1`: ZeRO-3, as open-r1's DeepSpeed config).
Where: a TPU v5p-32 / v6e-32 slice or 8×H100 (open-r1's setup). Size it first on this machine, without
downloading anything: `python -m jaxsft.dryrun --config configs/r1_distill.py --devices 8`.
How long: open-r1 reports about 3 days on 8×H100 for the 5 epochs.

  python -m jaxsft.train --config configs/r1_distill.py --config.output_dir=runs/openr1-distill-7b
"""

from jaxsft import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.model_name_or_path = 'open-r1/Qwen2.5-Math-7B-RoPE-300k'
  c.dataset_name = 'open-r1/Mixture-of-Thoughts'
  c.dataset_config = 'all'
  c.eos_token = '<|im_end|>'
  c.max_length = 32768
  c.packing = False
  c.num_train_epochs = 5.0
  c.learning_rate = 4e-5
  c.lr_scheduler_type = 'cosine_with_min_lr'
  c.min_lr_rate = 0.1
  c.warmup_ratio = 0.03
  c.per_device_train_batch_size = 2
  c.per_device_eval_batch_size = 1
  c.gradient_accumulation_steps = 8
  c.max_grad_norm = 0.2
  c.bf16 = True
  c.gradient_checkpointing = True
  c.seed = 42
  c.logging_steps = 1
  c.output_dir = 'runs/openr1-distill-7b'
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c
