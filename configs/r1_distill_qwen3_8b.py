"""open-r1's R1-Distill-Qwen3-8B: Qwen3-8B-Base distilled on DeepSeek-R1 reasoning traces.

What: open-r1's `recipes/R1-Distill-Qwen3-8B/sft/config_v00.00.yaml` (2 nodes of 8 GPUs: per-device batch 2 × 4
accumulation × 16 = 128 per step, kept on any device count by `global_batch_size`): full fine-tuning of
`Qwen/Qwen3-8B-Base` at max_length 32768, no packing, 5 epochs, lr 4e-5 `cosine_with_min_lr` (min_lr_rate 0.1),
warmup ratio 0.03, max_grad_norm 0.2, bf16, gradient checkpointing, seed 42, eos `<|im_end|>`, open-r1's chat
template with its default system prompt. One change: the recipe's `open-r1/reasoning-mix` is not public, so this
trains on `open-r1/Mixture-of-Thoughts` (config `all`), the public mix OpenR1-Distill-7B uses.

Where: a TPU v5p-32 slice (16 chips). Size it first, on any CPU host with the real TPU compiler:
`python -m jaxsft.dryrun --config configs/r1_distill_qwen3_8b.py --topology v5p-32` (peak 44.69 GiB of 95.74 GiB
per chip with 4 micro-batches of 2 rows × 32768 tokens per chip on libtpu 0.0.42.1, compiled in 46 s; 35.80 GiB on
libtpu 0.0.52; the largest per-device batch that fits is 4 rows). Beyond the recipe, as in configs/r1_distill.py:
`global_batch_size`, the mesh, `padding_free` and the MLP in 8192-position tiles (`model.mlp_chunk_size`; none
changes the loss).

How long: an estimate at an assumed 40% MFU (not yet measured on TPU): 7.6B matmul parameters and 36 layers make a
32768-token row 2.4e15 FLOPs; padding-free, a step's 128 conversations (~5.6k tokens each) fill one micro-batch of
32 rows, so 13,650 steps are 1.07e21 FLOPs: about 4.2 days on a v5p-32, 2.1 days on a v5p-64 with
`--config.per_device_train_batch_size=1`.

  python -m jaxsft.train --config configs/r1_distill_qwen3_8b.py [--config.report_to=tensorboard]
"""

import os

import jaxsft
from jaxsft import config as config_lib

BEYOND_RECIPE = ('global_batch_size', 'padding_free', 'mesh.data', 'mesh.fsdp', 'mesh.tensor', 'model.mlp_chunk_size')
CHAT_TEMPLATE = os.path.join(os.path.dirname(jaxsft.__file__), 'assets', 'chat_templates', 'open_r1.jinja')


def get_config():
  c = config_lib.base_config()
  c.model_name_or_path = 'Qwen/Qwen3-8B-Base'
  c.model_revision = 'main'
  c.chat_template = config_lib.load_chat_template(CHAT_TEMPLATE)
  c.dataset_name = 'open-r1/Mixture-of-Thoughts'  # The recipe's open-r1/reasoning-mix is not public.
  c.dataset_config = 'all'
  c.dataset_num_proc = 12
  c.eos_token = '<|im_end|>'
  c.bf16 = True
  c.eval_strategy = 'no'
  c.gradient_accumulation_steps = 4
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
  c.output_dir = 'data/R1-Distill-Qwen3-8B'
  c.per_device_eval_batch_size = 2
  c.per_device_train_batch_size = 2
  c.report_to = 'wandb'
  c.save_steps = 0  # save_strategy 'epoch'.
  c.save_total_limit = 1
  c.seed = 42
  c.warmup_ratio = 0.03
  c.global_batch_size = 2 * 4 * 16  # open-r1's 2 nodes × 8 GPUs, on any device count.
  c.padding_free = True
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.model.mlp_chunk_size = 8192  # The MLP over 8192-position tiles: its [B, T, F] intermediates a quarter as big.
  return c
