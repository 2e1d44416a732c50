"""The registry of config fields: every field once, with its default, doc, resume rule and origin.

`FIELDS` is the one table of what a jaxsft config holds. Everything else derives from it:
`config.base_config()` builds the ConfigDict from it, `checkpoint.HARMLESS_FIELDS` is its `HARMLESS_FIELDS`,
and the recipe YAML import (jaxsft/recipe.py) takes its TRL / open-r1 names (`RECIPE_FIELDS`) and lists the
rest as `JAXSFT_ONLY_FIELDS`. The names of the values a field may take (`SCHEDULES`, `REMAT_POLICIES`,
`ATTENTION_IMPLS`, ...) live here too, for `config.validate`.

A `Field` has:
  name      dotted for a nested field ('mesh.fsdp', 'model.remat'); the groups are `GROUPS`.
  default   the value, or `Placeholder(type)`: None, and only that type may be set
            (`ml_collections.config_dict.placeholder(type)`).
  doc       one line: what it does and what its values mean.
  origin    where the name and meaning come from: TRL's `SFTConfig` (transformers' `TrainingArguments`
            included), `ScriptArguments` or `ModelConfig`, open-r1's additions, or jaxsft only. A field named by
            TRL / open-r1 has their meaning, so a recipe ports field by field.
  harmless  a resumed run may change it freely: it does not change what is computed (logging, evaluation,
            checkpoints, mesh, remat, how the step's batch splits into devices and micro-batches). Every other
            field must equal the checkpoint's unless named in `resume_allow_changes`.

Nothing here imports jax (nor ml_collections): the command line reports a config typo without it.
"""

import dataclasses
from typing import Any, NamedTuple

SFT_CONFIG = 'TRL SFTConfig'
SCRIPT_ARGUMENTS = 'TRL ScriptArguments'
MODEL_CONFIG = 'TRL ModelConfig'
OPEN_R1 = 'open-r1'
JAXSFT = 'jaxsft'
ORIGINS = (SFT_CONFIG, SCRIPT_ARGUMENTS, MODEL_CONFIG, OPEN_R1, JAXSFT)

# The values some fields take (config.validate checks them; the modules that implement them use the same names).
SCHEDULES = ('constant', 'constant_with_warmup', 'linear', 'cosine', 'cosine_with_min_lr')  # jaxsft/optim.py.
# models/remat.py, fastest (most memory) first, as MaxText's base.yml orders them.
REMAT_POLICIES = ('none', 'minimal_with_context', 'minimal', 'save_dot_with_context_except_mlp',
                  'save_dot_except_mlpwi', 'save_dot_except_mlp', 'save_qkv_proj', 'save_out_proj', 'full',
                  'minimal_offloaded', 'qkv_proj_offloaded')
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn', 'splash')  # models/attention.py.
MODEL_INITS = ('pretrained', 'random')
EXPORT_DTYPES = ('bfloat16', 'float32')
EVAL_STRATEGIES = ('no', 'steps', 'epoch')
REPORT_TO = ('tensorboard', 'wandb')
NONFINITE_POLICIES = ('stop', 'skip')  # jaxsft/guard.py.
LENGTH_BUCKETS = ('auto', 'pow2', 'none')  # jaxsft/data/buckets.py.


class Placeholder(NamedTuple):
  """The default of a field that is None until set, and then only to a `type` value."""
  type: type


@dataclasses.dataclass(frozen=True)
class Field:
  name: str
  default: Any
  doc: str
  origin: str = JAXSFT
  harmless: bool = False


# The nested groups: JAX-only settings.
GROUPS = {
    'mesh': 'JAX-only: the device mesh (-1 = all remaining devices).',
    'model': 'JAX-only: model implementation overrides.',
}

_STR, _INT, _FLOAT, _BOOL = Placeholder(str), Placeholder(int), Placeholder(float), Placeholder(bool)
F = Field

FIELDS = (
    # Model and tokenizer.
    F('model_name_or_path', _STR, 'HF hub id or local directory (with config.json).', MODEL_CONFIG),
    F('model_revision', _STR, 'Hub revision (branch, tag or commit) of model_name_or_path.', MODEL_CONFIG),
    F('tokenizer_name_or_path', _STR, 'The tokenizer; None: model_name_or_path.'),
    F('model_init', 'pretrained', "'pretrained': load the weights; 'random': train from scratch."),

    # Data.
    F('dataset_name', _STR, "Hub id, file/dir (local or gs://), save_to_disk dir, or 'synthetic:...'.",
      SCRIPT_ARGUMENTS),
    F('dataset_config', _STR, "The hub dataset's configuration name.", SCRIPT_ARGUMENTS),
    F('dataset_train_split', 'train', 'The training split.', SCRIPT_ARGUMENTS),
    F('dataset_test_split', 'test', 'The eval split: a split name, or the path (local or gs://) of an eval file '
      '(.jsonl / .json / .parquet).', SCRIPT_ARGUMENTS),
    F('dataset_mixture', Placeholder(object), "open-r1's mixture: {'datasets': [{'id', 'config', 'split', "
      "'columns', 'weight'}, ...], 'seed', 'test_split_size'} (weight = the fraction of the dataset kept), or the "
      'path (local or gs://) of a YAML/JSON file with it; ids may be gs:// files or prefixes.', OPEN_R1),
    F('dataset_text_field', 'text', 'The column of plain-text rows.', SFT_CONFIG),
    F('max_length', 1024, 'Tokens per row; a longer example is truncated to it.', SFT_CONFIG),
    F('packing', False, "Best-fit-decreasing packing of whole conversations into max_length rows (TRL's bfd).",
      SFT_CONFIG),
    F('padding_free', False, 'Unpacked steps (the same conversations per step as packing=False) laid out '
      'best-fit-decreasing into the fewest max_length rows: the unpacked loss, with far fewer padding tokens '
      "computed (TRL's padding_free).", SFT_CONFIG, harmless=True),
    F('length_buckets', 'auto', "Unpacked rows (packing and padding_free off): each micro-batch padded to the "
      "smallest of a few widths holding its longest row, one compiled step per width: 'auto' (128, 256, 384, 512, "
      "768, ...: at most 1.5x the longest row past 256), 'pow2' (128, 256, 512, ...: fewer compiles), 'none' "
      '(every row max_length, one compile). jaxsft/data/buckets.py.', harmless=True),
    F('skip_bad_rows', False, 'False: a malformed row is an error naming it; True: skipped and counted.'),
    F('dataset_num_proc', _INT, 'Processes for the length pass; None: all CPU cores.', SFT_CONFIG, harmless=True),
    F('dataloader_num_workers', 0, 'grain worker processes that tokenize batches (0: threads in-process).',
      SFT_CONFIG, harmless=True),
    F('dataset_cache_dir', _STR, 'The data index cache; None: $JAXSFT_CACHE_DIR or ~/.cache/jaxsft.',
      harmless=True),
    F('assistant_only_loss', False, 'Train on the assistant tokens only (the chat template marks them).',
      SFT_CONFIG),
    F('completion_only_loss', _BOOL, 'Train on the completion only; None: on for prompt/completion data.',
      SFT_CONFIG),
    F('chat_template', _STR, 'A Jinja string or a path to a template file; None: the tokenizer\'s.', OPEN_R1),
    F('eos_token', _STR, "Overrides the tokenizer's eos (open-r1: '<|im_end|>').", SFT_CONFIG),

    # Optimisation.
    F('output_dir', _STR, 'The run directory (local or gs://): config.json, metrics.jsonl, checkpoints/, hf/.',
      SFT_CONFIG, harmless=True),
    F('seed', 42, 'The seed of the random initialisation, the data order and the eval generations.', SFT_CONFIG),
    F('learning_rate', 2e-5, 'The peak learning rate.', SFT_CONFIG),
    F('lr_scheduler_type', 'linear', f'The schedule: {" | ".join(SCHEDULES)}.', SFT_CONFIG),
    F('min_lr_rate', _FLOAT, 'For cosine_with_min_lr: the final rate as a fraction of learning_rate.'),
    F('warmup_ratio', 0.0, 'Warmup steps as a fraction of the total steps (rounded up).', SFT_CONFIG),
    F('warmup_steps', 0, 'Warmup steps; takes precedence over warmup_ratio when > 0.', SFT_CONFIG),
    F('num_train_epochs', 3.0, 'Epochs over the training data.', SFT_CONFIG),
    F('max_steps', -1, 'Optimizer steps; > 0 overrides num_train_epochs.', SFT_CONFIG),
    F('per_device_train_batch_size', 8, 'Rows per device per micro-batch.', SFT_CONFIG, harmless=True),
    F('per_device_eval_batch_size', 8, 'Rows per device per eval batch.', SFT_CONFIG, harmless=True),
    F('gradient_accumulation_steps', 1, 'Micro-batches per optimizer step.', SFT_CONFIG, harmless=True),
    F('global_batch_size', _INT, 'Rows per optimizer step, kept whatever the device count: when set, '
      'gradient_accumulation_steps is derived as global_batch_size / (per_device_train_batch_size × devices) '
      "(open-r1's recipes: 2 × 8 × 8 = 128)."),
    F('max_grad_norm', 1.0, 'Gradients are clipped to this global norm.', SFT_CONFIG),
    F('weight_decay', 0.0, "AdamW's decoupled weight decay (not on biases and norm scales).", SFT_CONFIG),
    F('adam_beta1', 0.9, "AdamW's beta1.", SFT_CONFIG),
    F('adam_beta2', 0.999, "AdamW's beta2.", SFT_CONFIG),
    F('adam_epsilon', 1e-8, "AdamW's epsilon.", SFT_CONFIG),
    F('bf16', True, 'bfloat16 compute with float32 master weights; False = float32 throughout.', SFT_CONFIG),
    F('gradient_checkpointing', True, 'Rematerialise each layer (config.model.remat overrides).', SFT_CONFIG,
      harmless=True),

    # Evaluation (on dataset_test_split, or the mixture's test split).
    F('eval_strategy', 'no', "'no' | 'steps' (every eval_steps) | 'epoch'.", SFT_CONFIG, harmless=True),
    F('eval_steps', _FLOAT, 'None: logging_steps; < 1: a fraction of the total steps.', SFT_CONFIG, harmless=True),
    F('eval_generation_prompts', 4, 'At each evaluation, answer this many prompts of the eval split (their '
      'conversation up to the last assistant turn) with the KV-cache sampler; logged to metrics.jsonl and '
      'TensorBoard/W&B text. 0 = off.', harmless=True),
    F('eval_generation_max_new_tokens', 256, 'The most tokens generated per eval prompt.', harmless=True),
    F('eval_generation_temperature', 0.0, 'The eval generations\' sampling temperature; 0: greedy.', harmless=True),
    F('eval_generation_top_p', 1.0, "The eval generations' nucleus sampling mass, in (0, 1].", harmless=True),

    # Logging: process 0 only.
    F('logging_steps', 10, 'Steps between metrics.jsonl rows (and console / TensorBoard / W&B).', SFT_CONFIG,
      harmless=True),
    F('disable_tqdm', False, 'No progress bar.', SFT_CONFIG, harmless=True),
    F('report_to', 'none', "metrics.jsonl always; this adds 'tensorboard' and/or 'wandb' (comma-separated, 'all' "
      "or 'none'; W&B honours WANDB_MODE=offline).", SFT_CONFIG, harmless=True),
    F('run_name', _STR, "W&B run name; None: the output_dir's base name.", SFT_CONFIG, harmless=True),
    F('logging_dir', _STR, 'TensorBoard event directory; None: OUTPUT_DIR/tensorboard.', SFT_CONFIG,
      harmless=True),
    F('wandb_project', _STR, "open-r1's name; None: $WANDB_PROJECT or 'jaxsft'.", OPEN_R1, harmless=True),
    F('wandb_entity', _STR, "The W&B entity (open-r1's name).", OPEN_R1, harmless=True),
    F('wandb_run_group', _STR, "The W&B run group (open-r1's name).", OPEN_R1, harmless=True),

    # LoRA (TRL's ModelConfig names and defaults; jaxsft/peft_config.py, jaxsft/models/lora.py).
    F('use_peft', False, 'Train LoRA adapters on a frozen base instead of every weight; writes OUTPUT_DIR/adapter '
      '(PEFT format) beside the merged OUTPUT_DIR/hf.', MODEL_CONFIG),
    F('lora_r', 16, "The adapters' rank.", MODEL_CONFIG),
    F('lora_alpha', 32.0, 'The adapters are scaled by lora_alpha / lora_r (/ sqrt(lora_r) with use_rslora).',
      MODEL_CONFIG),
    F('lora_dropout', 0.05, "Dropout on the adapters' input (PEFT's), training only.", MODEL_CONFIG),
    F('lora_target_modules', _STR, "'all-linear' (every projection but lm_head) or module names, e.g. "
      "'q_proj,v_proj'; None: PEFT's default, q_proj,v_proj.", MODEL_CONFIG),
    F('lora_modules_to_save', _STR, 'Whole modules trained beside the adapters: not implemented (an error).',
      MODEL_CONFIG),
    F('use_rslora', False, 'rsLoRA: scale by lora_alpha / sqrt(lora_r).', MODEL_CONFIG),
    F('use_dora', False, 'DoRA: not implemented (an error).', MODEL_CONFIG),
    F('load_in_4bit', False, 'QLoRA with a 4-bit base: not implemented (an error).', MODEL_CONFIG),
    F('load_in_8bit', False, 'QLoRA with an 8-bit base: not implemented (an error).', MODEL_CONFIG),
    F('adapter_name_or_path', _STR, 'A PEFT LoRA adapter directory to start from (its r, alpha and targets must '
      'equal the lora_* fields); None: fresh adapters (PEFT init: A Kaiming-uniform, B zero).'),

    # Checkpoints (OUTPUT_DIR/checkpoints/STEP, Orbax, asynchronous) and the Hugging Face export (OUTPUT_DIR/hf).
    F('save_steps', 500.0, 'Steps between checkpoints; a value below 1 is a fraction of the total steps '
      "(transformers' meaning); 0: only at epoch ends. Also saved at the end of each epoch, at the end of "
      'training and on SIGTERM/SIGINT.', SFT_CONFIG, harmless=True),
    F('save_total_limit', _INT, 'Keep the newest N checkpoints; None: keep all.', SFT_CONFIG, harmless=True),
    F('resume_from_checkpoint', _STR, 'A run whose output_dir holds checkpoints resumes from the newest complete '
      'one; this names another (OUTPUT_DIR or OUTPUT_DIR/checkpoints/STEP) to start from.', SFT_CONFIG,
      harmless=True),
    F('resume_allow_changes', _STR, "Comma-separated config fields allowed to differ from the checkpoint's "
      "although they change the training (learning_rate, max_steps, ...; 'all' for any). Logging, eval, mesh and "
      'remat may always change.', harmless=True),
    F('export_dtype', _STR, "'bfloat16' | 'float32'; None: bfloat16 if bf16 else float32.", harmless=True),
    F('nonfinite_policy', 'stop', "A NaN/inf loss or gradient norm: 'stop' the run there (exit 1, earlier "
      "checkpoints kept, nothing exported), or 'skip' the step (parameters and optimizer state unchanged; counted "
      'as skipped_steps). jaxsft/guard.py.', harmless=True),

    # The tiny default's proof that SFT worked.
    F('accuracy_eval_problems', 0, "After training, greedy-decode this many held-out problems of a 'synthetic:' "
      'dataset and print the exact-match accuracy. 0 = off.', harmless=True),
    F('accuracy_eval_max_new_tokens', 96, 'The most tokens generated per accuracy problem.', harmless=True),

    # JAX-only: device mesh (-1 = all remaining devices).
    F('mesh.data', -1, 'Data-parallel axis size.', harmless=True),
    F('mesh.fsdp', 1, 'Axis over which parameters and optimizer state are sharded (ZeRO-3).', harmless=True),
    F('mesh.tensor', 1, 'Tensor-parallel axis size.', harmless=True),

    # JAX-only: model implementation overrides.
    F('model.attention_impl', 'auto', 'auto: cuDNN flash on NVIDIA GPUs, Pallas splash on TPU, else xla.',
      harmless=True),
    F('model.remat', _STR, "None: 'full' if gradient_checkpointing else 'none'. Also MaxText's names: minimal, "
      'save_dot_except_mlp, save_qkv_proj, save_out_proj, ... (REMAT_POLICIES).', harmless=True),
    F('model.scan_layers', True, 'Stack the layers and apply them with a scan: compile time and program size flat '
      "in depth, and with remat XLA keeps one layer's activations at a time (unscanned, XLA:CPU hoists the "
      'recomputation and saves little).'),
    F('model.loss_chunk_size', 1024, 'Tokens per cross-entropy chunk (bounds the float32 logits).', harmless=True),
    F('model.mlp_chunk_size', 0, 'Sequence positions per MLP tile: longer rows run the MLP tile by tile, so its '
      '[B, T, F] intermediates exist one tile at a time (models/mlp.py; the long-context recipes use 8192). '
      '0 = untiled.', harmless=True),
)
del F

BY_NAME = {f.name: f for f in FIELDS}
NAMES = tuple(BY_NAME)
# Fields a resumed run may change freely (checkpoint.HARMLESS_FIELDS).
HARMLESS_FIELDS = frozenset(f.name for f in FIELDS if f.harmless)
# Top-level fields with TRL's / open-r1's name and meaning: a recipe YAML sets them as they are (recipe.py).
RECIPE_FIELDS = tuple(f.name for f in FIELDS if f.origin != JAXSFT)
# Top-level fields (and groups) TRL and open-r1 do not have: set on the command line, not in a recipe.
JAXSFT_ONLY_FIELDS = tuple(dict.fromkeys(f.name.split('.')[0] for f in FIELDS if f.origin == JAXSFT))
MESH_AXES = tuple(name.removeprefix('mesh.') for name in NAMES if name.startswith('mesh.'))  # data, fsdp, tensor.
