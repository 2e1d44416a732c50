"""open-r1's OpenR1-Distill-7B: Qwen2.5-Math-7B (RoPE 300k) distilled on DeepSeek-R1 reasoning traces.

What: open-r1's `recipes/OpenR1-Distill-7B/sft/config_distill.yaml`, number for number (tests/test_recipes.py
lists every value): full fine-tuning of `open-r1/Qwen2.5-Math-7B-RoPE-300k` on `open-r1/Mixture-of-Thoughts`
(config `all`, 349,317 conversations), max_length 32768, no packing, 5 epochs, lr 4e-5 `cosine_with_min_lr`
(min_lr_rate 0.1), warmup ratio 0.03, per-device batch 2 × 8 accumulation steps on 8 devices = 128 conversations
per step (`global_batch_size=128` keeps that on any device count: 2 × 4 × 16 on a v5p-32), max_grad_norm 0.2, bf16,
gradient checkpointing, seed 42, eos `<|im_end|>`, open-r1's chat template (its default system prompt is added
to conversations without one), a checkpoint per epoch keeping 1, W&B logging. Parameters, gradients and
optimizer state are partitioned over every device (`mesh.fsdp=-1`: ZeRO-3, as open-r1's DeepSpeed config).

Where: a TPU v5p-32 slice (16 chips, 95 GB HBM each). Size it on any CPU machine first with the real TPU
compiler, nothing downloaded: `python -m jaxsft.dryrun --config configs/r1_distill.py --topology v5p-32` (peak
38.38 GiB of 95.74 GiB per chip with 4 micro-batches of 2 rows × 32768 tokens per chip on libtpu 0.0.42.1, compiled
in 81 s; 29.11 GiB on libtpu 0.0.52; the largest per-device batch that fits is 4 rows, 8 on libtpu 0.0.52).

Beyond the recipe (`BEYOND_RECIPE`, none of it changes the loss): `global_batch_size`, the mesh, `padding_free`
(each step's 128 conversations, exactly those the unpacked run trains on, laid out best-fit-decreasing in the fewest
32768-token rows instead of one per row) and `model.mlp_chunk_size` (the MLP runs over 8192-position tiles, so its
[rows, 32768, 18944] intermediates exist a quarter at a time: 55.57 GiB per chip untiled on libtpu 0.0.42.1).

How long: an estimate, not a measurement (no TPU run of this recipe yet), at an assumed 40% MFU (jaxsft's `mfu`
metric, not yet measured on TPU). A 32768-token row costs 2.0e15 FLOPs (6 × 7.07B matmul parameters per token
plus the causal attention square, which the kernel computes whatever the documents). The conversations
average ~5.6k tokens (7.06 GB of text ≈ 2.0B tokens per epoch), so a step's 128 fill ~23 rows: one micro-batch
of 2 × 16 = 32 rows. 13,650 steps × 32 rows = 8.9e20 FLOPs: about 3.5 days on a v5p-32, or 1.75 days on a
v5p-64 with `--config.per_device_train_batch_size=1` (still one 32-row micro-batch per step). Without
padding_free every conversation fills a row of its own: 1.75M rows, 3.6e21 FLOPs, 4× longer.

  python -m jaxsft.train --config configs/r1_distill.py [--config.report_to=tensorboard]
"""

import os

import jaxsft
from jaxsft import config as config_lib

# Fields this config sets beyond the recipe YAML (none changes the loss): the device-independent batch, the
# mesh, and the padding-free layout of each step's conversations.
BEYOND_RECIPE = ('global_batch_size', 'padding_free', 'mesh.data', 'mesh.fsdp', 'mesh.tensor', 'model.mlp_chunk_size')
CHAT_TEMPLATE = os.path.join(os.path.dirname(jaxsft.__file__), 'assets', 'chat_templates', 'open_r1.jinja')


def get_config():
  c = config_lib.base_config()
  c.model_name_or_path = 'open-r1/Qwen2.5-Math-7B-RoPE-300k'
  c.model_revision = 'main'
  c.chat_template = config_lib.load_chat_template(CHAT_TEMPLATE)  # The text itself: config.json records it.
  c.dataset_name = 'open-r1/Mixture-of-Thoughts'
  c.dataset_config = 'all'
  c.dataset_num_proc = 12
  c.eos_token = '<|im_end|>'
  c.bf16 = True
  c.eval_strategy = 'no'
  c.gradient_accumulation_steps = 8
  c.gradient_checkpointing = True
  c.learning_rate = 4e-5
  c.logging_steps = 1
  c.lr_scheduler_type = 'cosine_with_min_lr'
  c.min_lr_rate = 0.1
  c.packing = False
  c.max_grad_norm = 0.2
  c.max_length = 32768
  c.max_steps = -1
  c.num_train_epochs = 5.0
  c.output_dir = 'data/OpenR1-Distill-7B'
  c.per_device_eval_batch_size = 1
  c.per_device_train_batch_size = 2
  c.report_to = 'wandb'
  c.save_steps = 0  # save_strategy 'epoch'.
  c.save_total_limit = 1
  c.seed = 42
  c.warmup_ratio = 0.03
  c.global_batch_size = 2 * 8 * 8  # open-r1's 8 GPUs, on any device count.
  c.padding_free = True
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.model.mlp_chunk_size = 8192  # The MLP over 8192-position tiles: its [B, T, F] intermediates a quarter as big.
  return c
