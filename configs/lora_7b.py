"""LoRA SFT of Qwen2.5-7B-Instruct on open-r1's Mixture-of-Thoughts, sized for a TPU v5e-8 (16 GiB per chip).

What: TRL's LoRA recipe as open-r1 users write it (`use_peft: true`, TRL's ModelConfig defaults r=16, alpha=32,
dropout 0.05, here on every projection: `lora_target_modules=all-linear`), on `open-r1/Mixture-of-Thoughts`
(config `all`), max_length 8192, padding-free rows, lr 1e-4 cosine with 3% warmup, 1 epoch, 32 conversations per
step, bf16, gradient checkpointing. The 7.6B base is frozen in bf16 (no gradient, no optimizer state, FSDP-sharded);
40.4M adapter parameters (0.53%) train with their AdamW state in float32; checkpoints hold the adapters only.
Writes OUTPUT_DIR/adapter (PEFT's format) and OUTPUT_DIR/hf (the merged model, for vLLM and lm-eval).

Where: a TPU v5e-8 (8 chips, 15.75 GiB each), where the full fine-tune of the same model does not fit (its
float32 parameters and AdamW state alone are 10.7 GiB per chip). Size it first on any CPU host with the real TPU
compiler: `python -m jaxsft.dryrun --config configs/lora_7b.py --topology v5e-8` gives a peak of 8.80 GiB of 15.75
per chip (44% headroom; 4 micro-batches of 1 row × 8192 tokens per chip; frozen base 1.77 GiB, adapters 0.11, AdamW
0.23; libtpu 0.0.42.1, compiled in 405 s on a 2-core host). The README's "LoRA" section has the full fine-tune's
refusal beside it.

How long: an estimate, not a measurement (no TPU run yet), at an assumed 40% MFU of the v5e's 197 bf16 TFLOP/s
(6.3e14 FLOP/s on 8 chips). A LoRA token costs about 4 × 7.07B matmul FLOPs (forward and the activations' backward;
no base weight gradient), plus attention. Mixture-of-Thoughts conversations average ~5.6k tokens (longer ones are
cut at max_length 8192), so a 32-conversation step is ~180k tokens, ~5.3e15 FLOPs, ~8 s; one epoch of 349k
conversations is 10.9k steps, about a day.

  python -m jaxsft.train --config configs/lora_7b.py [--config.report_to=tensorboard]
"""

from jaxsft import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.model_name_or_path = 'Qwen/Qwen2.5-7B-Instruct'
  c.dataset_name = 'open-r1/Mixture-of-Thoughts'
  c.dataset_config = 'all'
  c.use_peft = True
  c.lora_r = 16
  c.lora_alpha = 32.0
  c.lora_dropout = 0.05
  c.lora_target_modules = 'all-linear'
  c.bf16 = True
  c.gradient_checkpointing = True
  c.learning_rate = 1e-4
  c.lr_scheduler_type = 'cosine'
  c.warmup_ratio = 0.03
  c.num_train_epochs = 1.0
  c.max_length = 8192
  c.padding_free = True
  c.per_device_train_batch_size = 1
  c.global_batch_size = 32
  c.logging_steps = 10
  c.save_steps = 500
  c.save_total_limit = 2
  c.output_dir = 'data/Qwen2.5-7B-Instruct-LoRA'
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c
