"""open-r1's OlympicCoder-7B: Qwen2.5-Coder-7B-Instruct on DeepSeek-R1's Codeforces reasoning traces.

What: open-r1's `recipes/OlympicCoder-7B/sft/config_v00.00.yaml`, number for number (tests/test_recipes.py lists
every value): full fine-tuning of `Qwen/Qwen2.5-Coder-7B-Instruct` on `open-r1/codeforces-cots` (config
`solutions_decontaminated`, 40.7k conversations), max_length 32768, no packing, 10 epochs, lr 1e-5
`cosine_with_min_lr` (min_lr_rate 0.1), warmup ratio 0.03, per-device batch 2 × 8 accumulation steps on 8 devices
= 128 per step (kept on any device count by `global_batch_size`), max_grad_norm 0.2, bf16, gradient checkpointing,
seed 42, the model's own chat template and eos, a checkpoint every 20% of the run keeping 1, W&B logging.
ZeRO-3-style partitioning over every device (`mesh.fsdp=-1`).

Where: a TPU v5p-32 slice (16 chips). Size it first, on any CPU host with the real TPU compiler:
`python -m jaxsft.dryrun --config configs/olympic_coder_7b.py --topology v5p-32` (peak 38.38 GiB of 95.74 GiB per
chip with 4 micro-batches of 2 rows × 32768 tokens per chip on libtpu 0.0.42.1, compiled in 88 s; 29.11 GiB on
0.0.52). Beyond the recipe, as in configs/r1_distill.py: `global_batch_size`, the mesh, `padding_free` and the
MLP in 8192-position tiles (`model.mlp_chunk_size`; none changes the loss).

How long: an estimate at an assumed 40% MFU (not yet measured on TPU). A 32768-token row costs 2.0e15 FLOPs; if
every conversation filled a row of its own, 407k rows (10 epochs) would take 3.3 days on a v5p-32. Padding-free
steps divide that by how many of a step's 128 conversations share a row, which depends on the traces' lengths (not
measured here): the first log line of a run prints the micro-batches it will compute.

  python -m jaxsft.train --config configs/olympic_coder_7b.py [--config.report_to=tensorboard]
"""

from jaxsft import config as config_lib

BEYOND_RECIPE = ('global_batch_size', 'padding_free', 'mesh.data', 'mesh.fsdp', 'mesh.tensor', 'model.mlp_chunk_size')


def get_config():
  c = config_lib.base_config()
  c.model_name_or_path = 'Qwen/Qwen2.5-Coder-7B-Instruct'
  c.model_revision = 'main'
  c.dataset_name = 'open-r1/codeforces-cots'
  c.dataset_config = 'solutions_decontaminated'
  c.dataset_num_proc = 48
  c.bf16 = True
  c.eval_strategy = 'no'
  c.gradient_accumulation_steps = 8
  c.gradient_checkpointing = True
  c.learning_rate = 1e-5
  c.logging_steps = 1
  c.lr_scheduler_type = 'cosine_with_min_lr'
  c.min_lr_rate = 0.1
  c.packing = False
  c.max_grad_norm = 0.2
  c.max_length = 32768
  c.max_steps = -1
  c.num_train_epochs = 10.0
  c.output_dir = 'data/OlympicCoder-7B'
  c.per_device_eval_batch_size = 1
  c.per_device_train_batch_size = 2
  c.report_to = 'wandb'
  c.save_steps = 0.2  # save_strategy 'steps', every 20% of the run.
  c.save_total_limit = 1
  c.seed = 42
  c.warmup_ratio = 0.03
  c.global_batch_size = 2 * 8 * 8
  c.padding_free = True
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.model.mlp_chunk_size = 8192  # The MLP over 8192-position tiles: its [B, T, F] intermediates a quarter as big.
  return c
