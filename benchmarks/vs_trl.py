"""Training throughput, time to first step and peak memory of jaxsft against TRL's SFTTrainer, same model and data.

Usage (from the repository root; needs the `bench` extra: torch, trl, accelerate, peft):

  python benchmarks/vs_trl.py                       # the default CPU benchmark (below): ~6 minutes on 2 cores
  python benchmarks/vs_trl.py --json figures.json   # also write every figure (and every step's) to a JSON file
  python benchmarks/vs_trl.py --runs trl,jaxsft     # only the equal-settings pair
  python benchmarks/vs_trl.py --quick               # tiny model, 3 steps: checks the script, measures nothing
  python benchmarks/vs_trl.py --preset cpu_long --runs trl,jaxsft   # rows far shorter than max_length (below)

The model: a random Qwen2-architecture model (transformers `Qwen2Config` -> `Qwen2ForCausalLM`, float32,
transformers' std-0.02 init), by default hidden 512, MLP 1536, 4 layers, 8 query heads and 2 key/value heads of
64, q/k/v biases, tied embeddings, vocabulary 32_768: 28.8M parameters, 12.1M in the layers and 16.8M in the
(tied) embedding, so the unembedding and the softmax over the vocabulary cost what they cost at a real
vocabulary size (they are most of the FLOPs at this width, as in a small Qwen). The tokenizer is jaxsft's tiny
byte-level BPE (jaxsft/assets/tiny, 551 tokens, ChatML template): there is no network to fetch Qwen's, and a BPE
trained on synthetic text from a few hundred words cannot reach a realistic vocabulary. The model's vocabulary
is padded to 32_768 instead: ids past the tokenizer are never produced, but every unembedding matmul and softmax
runs over all 32_768 entries on both sides. --hidden-size, --intermediate-size, --layers, --vocab-size change it.

The data: --num-conversations (default 2000) synthetic `messages` rows (an optional system prompt, then one to
three user/assistant turns) of random words from benchmarks/data_throughput.py's word list, whose total token
counts are log-normal with a median of --median-tokens (default 200) and sigma 0.8, so a batch mixes short and
long rows and ~13% of the rows exceed max_length (default 512) and are truncated. Loss on all tokens (TRL's
default for conversational data), both sides.

The runs, each in its own subprocess (so memory is per run), one after the other: the same number of optimizer
steps (--steps, default 8) with the same learning rate (linear schedule), micro-batch (--batch-size, default 4),
accumulation, max_length, seed, float32 compute (bf16=False), gradient checkpointing (default on: both trainers'
default), logging every step, no checkpoint within the timed steps.
* equal settings, packing=False: TRL's collator pads each batch to its longest row; jaxsft deals each
  optimizer step's rows into its micro-batches longest first (the same rows per step, the same summed loss)
  and pads each micro-batch to the smallest length bucket that holds its longest row (length_buckets='auto':
  128, 256, 384, 512, 768, ...; one compiled step per bucket, on first use; jaxsft/data/buckets.py).
* padding-free (jaxsft padding_free=True): the equal-settings steps, the same conversations per step, laid out
  best-fit-decreasing in as few rows as they fill, run as micro-batches of one row (batch 1 × accumulation
  batch-size), against TRL's equal-settings run.
* LoRA (trl_lora, jaxsft_lora): the equal-settings run with LoRA adapters (r 16, alpha 32, dropout 0.05, every
  projection: TRL's ModelConfig defaults with all-linear) on a frozen base, TRL through PEFT (peft_config),
  jaxsft through use_peft (jaxsft/models/lora.py).
* best settings: jaxsft with packing=True (best-fit decreasing of whole conversations into max_length rows),
  against the fastest of TRL's CPU options measured here: packing=True (bfd, which TRL runs padding-free:
  one flattened row, documents separated by position ids) and packing=False with
  train_sampling_strategy='group_by_length' (batches of similar lengths, little padding).
Each side shuffles with its own sampler, so the two sides train on different rows at each step; the figures
are rates, and over the default dataset both see the same length distribution.

The 'cpu_long' preset is the case where padding decides: hidden 256, 4 layers, vocabulary 8192, batch 4 x
accumulation 4, max_length 2048 and conversations of median 340 (mean ~465) tokens, as users who set
max_length to their longest conversation and leave packing off (TRL's default) train them.

The figures, defined identically for both sides:
* tokens/s: the non-padding tokens of optimizer steps 2..N (every token of every trained row: TRL's logged
  `num_tokens`, jaxsft's per-step `num_input_tokens`) divided by the wall time from the end of step 1 to the
  end of step N, less the seconds jaxsft spent compiling the step for a row width first met in steps 2..N
  (the 'compile' column; steady state: each width compiles once per run; the JSON also has
  tokens_per_s_with_compile). Step 1 is excluded: it holds jaxsft's first compilation and torch's warm-up. Loss
  tokens are the non-padding tokens minus one per conversation on both sides.
* tokens/cpu-s: the same tokens divided by the process's CPU time (user + system, all threads) over the same
  steps, less the compile seconds (XLA compiles on one thread). On a shared machine another process takes cores
  from either side at random and wall-clock rates move by up to 2x; CPU time moves much less, so this is the
  figure to compare when the load is not ~0.
* positions/s and non-pad: token positions computed (padding included) per second, and the non-padding share
  of them: how much of each side's work is padding.
* time to first step: wall time from the launch of the run's process (interpreter start, imports, model
  load, tokenization of the whole dataset, compilation) to the end of optimizer step 1.
* peak memory: the process's peak resident set size (VmHWM) read at the end of step N, so both sides are
  measured on training alone (jaxsft's final checkpoint and Hugging Face export come after it).
* step: the median wall time of steps 2..N.
Ratios are jaxsft / TRL: above 1 is better for rates, below 1 for time and memory.
"""

import argparse
import concurrent.futures
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
TINY = os.path.join(ROOT, 'jaxsft', 'assets', 'tiny')
SIGMA = 0.8

RUNS = {  # name → (side, settings that differ from the equal-settings run).
    'trl': ('trl', {}),
    'jaxsft': ('jaxsft', {}),
    'trl_packing': ('trl', {'packing': True}),
    'trl_group_by_length': ('trl', {'train_sampling_strategy': 'group_by_length'}),
    'jaxsft_packing': ('jaxsft', {'packing': True}),
    # The equal-settings steps (the same conversations per step), padding-free: one-row micro-batches, so each
    # step computes only the rows its conversations fill (see `launch`).
    'jaxsft_padding_free': ('jaxsft', {'padding_free': True}),
    # LoRA (TRL: peft_config; jaxsft: use_peft) at equal settings: r 16, alpha 32, dropout 0.05, all-linear.
    'trl_lora': ('trl', {'lora': True}),
    'jaxsft_lora': ('jaxsft', {'lora': True}),
}
LORA = dict(r=16, alpha=32.0, dropout=0.05, targets='all-linear')  # TRL ModelConfig's defaults, every projection.
# Named with --runs only (not in 'all'): jaxsft's other row layouts of the equal-settings run.
EXTRA_RUNS = {
    'jaxsft_pow2_buckets': ('jaxsft', {'length_buckets': 'pow2'}),
    'jaxsft_no_buckets': ('jaxsft', {'length_buckets': 'none'}),  # Every unpacked row max_length long.
}


# Presets: model sizes and run settings. 'cpu' is the default benchmark; 'quick' only checks that the script
# runs; the Qwen2.5 ones are for a GPU machine (bf16, the real models' shapes, MFU printed).
QWEN_VOCAB = 151_936
PRESETS = {
    'cpu': dict(sizes=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=2, vocab_size=32_768),
                steps=8, batch_size=4, accumulation=1, max_length=512, median_tokens=200, num_conversations=2000,
                bf16=False),
    # Rows much shorter than max_length, as users who set max_length to their longest conversation train them:
    # TRL pads each batch to its longest row, jaxsft to its length bucket (jaxsft/data/buckets.py).
    'cpu_long': dict(sizes=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=8192),
                     steps=8, batch_size=4, accumulation=4, max_length=2048, median_tokens=340,
                     num_conversations=2000, bf16=False),
    'quick': dict(sizes=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=1024),
                  steps=3, batch_size=4, accumulation=1, max_length=128, median_tokens=40, num_conversations=48,
                  bf16=False),
    'qwen2.5-0.5b': dict(sizes=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                    num_attention_heads=14, num_key_value_heads=2, vocab_size=QWEN_VOCAB),
                         steps=20, batch_size=8, accumulation=1, max_length=1024, median_tokens=400,
                         num_conversations=4000, bf16=True),
    'qwen2.5-1.5b': dict(sizes=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                    num_attention_heads=12, num_key_value_heads=2, vocab_size=QWEN_VOCAB),
                         steps=20, batch_size=8, accumulation=1, max_length=1024, median_tokens=400,
                         num_conversations=4000, bf16=True),
}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--preset', choices=tuple(PRESETS), default='cpu',
                      help="sizes and settings (default 'cpu'; the qwen2.5 ones are for a GPU machine)")
  parser.add_argument('--quick', action='store_true', help="= --preset quick: tiny model, 3 steps (a smoke test)")
  parser.add_argument('--steps', type=int, help='optimizer steps per run (cpu: 8)')
  parser.add_argument('--batch-size', type=int, help='per_device_train_batch_size, both sides (cpu: 4)')
  parser.add_argument('--accumulation', type=int, help='gradient_accumulation_steps, both sides (cpu: 1)')
  parser.add_argument('--max-length', type=int, help='max_length (cpu: 512)')
  parser.add_argument('--median-tokens', type=int, help='median conversation length in tokens (cpu: 200)')
  parser.add_argument('--num-conversations', type=int, help='dataset rows (cpu: 2000)')
  parser.add_argument('--learning-rate', type=float, default=1e-4)
  parser.add_argument('--bf16', choices=('true', 'false'), help='bf16 compute on both sides (cpu: false)')
  parser.add_argument('--gradient-checkpointing', choices=('true', 'false'), default='true')
  parser.add_argument('--hidden-size', type=int)
  parser.add_argument('--intermediate-size', type=int)
  parser.add_argument('--layers', type=int)
  parser.add_argument('--vocab-size', type=int)
  parser.add_argument('--runs', default='all', help=f"comma-separated subset of: {', '.join([*RUNS, *EXTRA_RUNS])} "
                      "('all': all but the last two)")
  parser.add_argument('--parallel', type=int, default=1,
                      help='runs at once (smoke tests only: concurrent runs share the cores, so figures mean nothing)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workdir', help='where to write model, data and runs (default: a temp dir)')
  parser.add_argument('--json', help='also write the figures to this JSON file')
  parser.add_argument('--worker', help=argparse.SUPPRESS)  # Internal: run one side in this process.
  args = parser.parse_args(argv)
  preset = PRESETS['quick' if args.quick else args.preset]
  for key in ('steps', 'batch_size', 'accumulation', 'max_length', 'median_tokens', 'num_conversations'):
    if getattr(args, key) is None:
      setattr(args, key, preset[key])
  args.bf16 = preset['bf16'] if args.bf16 is None else args.bf16 == 'true'
  sizes = dict(preset['sizes'])
  for key, value in (('hidden_size', args.hidden_size), ('intermediate_size', args.intermediate_size),
                     ('num_hidden_layers', args.layers), ('vocab_size', args.vocab_size)):
    if value:
      sizes[key] = value
  args.sizes = sizes
  if args.steps < 2:
    parser.error('--steps must be at least 2 (step 1 is not timed)')
  return args


def matmul_params(sizes: dict) -> int:
  """Parameters in matmuls: the layers' projections and the unembedding (jaxsft.metrics.matmul_params)."""
  d, f, n, k = (sizes['hidden_size'], sizes['intermediate_size'], sizes['num_attention_heads'],
                sizes['num_key_value_heads'])
  head_dim = d // n
  per_layer = d * (n + 2 * k) * head_dim + n * head_dim * d + 3 * d * f
  return sizes['num_hidden_layers'] * per_layer + d * sizes['vocab_size']


# ------------------------------------------------------------------------------------------------ model + data


def build_model(model_dir: str, sizes: dict, seed: int) -> int:
  """Saves a random float32 Qwen2 model with the tiny tokenizer to `model_dir`; returns its parameter count."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  transformers.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  tokenizer = transformers.AutoTokenizer.from_pretrained(TINY)
  if sizes['vocab_size'] < len(tokenizer):
    raise ValueError(f'vocab_size {sizes["vocab_size"]} is below the tokenizer\'s {len(tokenizer)} tokens')
  config = transformers.Qwen2Config(
      **sizes, max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
      eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
  torch.manual_seed(seed)
  model = transformers.Qwen2ForCausalLM(config).to(torch.float32)
  model.save_pretrained(model_dir)
  tokenizer.save_pretrained(model_dir)
  return sum(p.numel() for p in model.parameters())


def write_conversations(path: str, n: int, median_tokens: int, max_tokens: int, seed: int) -> list[int]:
  """Writes n chat rows to `path` (JSON Lines); returns their target lengths in tokens (module docstring)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from data_throughput import WORDS  # pylint: disable=import-outside-toplevel
  tokenizer = transformers.AutoTokenizer.from_pretrained(TINY)
  rng = np.random.default_rng(seed)
  words = rng.choice(WORDS, size=200_000).tolist()
  corpus = ' '.join(words)
  chars_per_token = len(corpus[:50_000]) / len(tokenizer(corpus[:50_000], add_special_tokens=False)['input_ids'])
  lengths = np.clip(np.round(median_tokens * np.exp(SIGMA * rng.standard_normal(n))), 16, max_tokens)

  def text(tokens: int) -> str:
    chars = max(int(tokens * chars_per_token), 1)
    start = int(rng.integers(0, len(corpus) - chars - 1))
    return corpus[start:start + chars].strip() or 'ok'

  with open(path, 'w', encoding='utf-8') as f:
    for total in lengths.astype(int).tolist():
      turns = int(rng.integers(1, 4)) if total > 120 else 1
      messages = []
      body = total
      if rng.random() < 0.3:
        system = int(min(rng.integers(8, 40), body // 4 + 1))
        messages.append({'role': 'system', 'content': text(system)})
        body -= system + 5
      per_turn = max(body // turns - 10, 4)  # ~10 template tokens per turn.
      for _ in range(turns):
        question = max(int(per_turn * rng.uniform(0.1, 0.4)), 2)
        messages.append({'role': 'user', 'content': text(question)})
        messages.append({'role': 'assistant', 'content': text(max(per_turn - question, 2))})
      f.write(json.dumps({'messages': messages}) + '\n')
  return lengths.astype(int).tolist()


# -------------------------------------------------------------------------------------------------- workers


def _peak_rss_bytes() -> int:
  """This process's peak resident set size so far (VmHWM; ru_maxrss where /proc is missing)."""
  try:
    with open('/proc/self/status', encoding='ascii') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  import resource  # pylint: disable=import-outside-toplevel
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trl_worker(spec: dict) -> dict:
  """Trains with TRL's SFTTrainer; returns per-step (wall time, cumulative non-padding tokens) and peak memory."""
  import datasets  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  import trl  # pylint: disable=import-outside-toplevel
  transformers.logging.set_verbosity_error()
  datasets.disable_progress_bars()
  steps = []

  class Timer(transformers.TrainerCallback):
    """Notes the wall time and the peak memory at the end of every optimizer step."""

    def on_step_end(self, args, state, control, **kwargs):  # pylint: disable=unused-argument
      steps.append({'step': state.global_step, 'time': time.time(), 'cpu': time.process_time(),
                    'peak_rss': _peak_rss_bytes(),
                    'peak_device': torch.cuda.max_memory_allocated() if on_gpu else None})

  on_gpu = torch.cuda.is_available()
  model = transformers.AutoModelForCausalLM.from_pretrained(spec['model_dir'], dtype=torch.float32)
  tokenizer = transformers.AutoTokenizer.from_pretrained(spec['model_dir'])
  dataset = datasets.load_dataset('json', data_files=spec['data_file'], split='train',
                                  cache_dir=os.path.join(spec['output_dir'], 'hf_cache'))
  s = spec['settings']
  sampling = s.get('train_sampling_strategy', 'random')
  if 'train_sampling_strategy' in inspect.signature(trl.SFTConfig).parameters:
    sampler_args = {'train_sampling_strategy': sampling}
  else:  # transformers before train_sampling_strategy (5.0.x, the CI floor) spells it group_by_length.
    sampler_args = {'group_by_length': sampling == 'group_by_length'}
  args = trl.SFTConfig(
      output_dir=spec['output_dir'], use_cpu=not on_gpu, bf16=s['bf16'], report_to='none', save_strategy='no',
      disable_tqdm=True, logging_steps=1, max_steps=s['steps'], learning_rate=s['learning_rate'],
      lr_scheduler_type='linear', per_device_train_batch_size=s['batch_size'],
      gradient_accumulation_steps=s['accumulation'], max_length=s['max_length'],
      gradient_checkpointing=s['gradient_checkpointing'], packing=s.get('packing', False),
      dataloader_num_workers=0, seed=s['seed'], **sampler_args)
  peft_config = None
  if s.get('lora'):
    import peft  # pylint: disable=import-outside-toplevel
    peft_config = peft.LoraConfig(r=LORA['r'], lora_alpha=LORA['alpha'], lora_dropout=LORA['dropout'],
                                  target_modules=LORA['targets'], task_type='CAUSAL_LM')
  sft = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[Timer()],
                       peft_config=peft_config)
  positions = []  # Token positions each micro-batch computes, padding included.
  compute_loss = sft.compute_loss

  def counted_compute_loss(model, inputs, *a, **kw):
    if model.training:
      positions.append(int(inputs['input_ids'].numel()))
    return compute_loss(model, inputs, *a, **kw)

  sft.compute_loss = counted_compute_loss
  sft.train()
  logged = [row for row in sft.state.log_history if 'loss' in row and 'num_tokens' in row]
  if len(logged) != len(steps):
    raise RuntimeError(f'TRL logged {len(logged)} steps, the timer saw {len(steps)}')
  per_step = len(positions) // len(steps)
  total = 0
  for i, (row, step) in enumerate(zip(logged, steps)):
    total += sum(positions[i * per_step:(i + 1) * per_step])
    step.update(tokens=int(row['num_tokens']), loss=float(row['loss']), positions=total)
  device = torch.cuda.get_device_name() if on_gpu else f'cpu, {torch.get_num_threads()} threads'
  return {'steps': steps, 'device': device}


def jaxsft_worker(spec: dict) -> dict:
  """Trains with jaxsft's trainer.run; returns per-step (wall time, cumulative non-padding tokens) and peak memory.

  The per-step figures come from two hooks that leave the training untouched: each metrics row (one per step
  with logging_steps=1, written after the step's results are fetched from the device) is timestamped, and each
  step the data loader yields reports its non-padding tokens.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from jaxsft import config as config_lib  # pylint: disable=import-outside-toplevel
  from jaxsft import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  from jaxsft import step as step_lib  # pylint: disable=import-outside-toplevel
  from jaxsft import trainer  # pylint: disable=import-outside-toplevel
  from jaxsft.data import pipeline  # pylint: disable=import-outside-toplevel
  steps, input_tokens, positions_of, compile_seconds = [], {}, {}, []
  write, getitem, call = metrics_lib.MetricsWriter.write, pipeline.StepSource.__getitem__, step_lib.TrainStep.__call__

  def timed_write(self, row):
    if 'loss' in row:
      stats = jax.devices()[0].memory_stats() or {}  # None on CPU.
      steps.append({'step': row['step'], 'time': time.time(), 'cpu': time.process_time(),
                    'peak_rss': _peak_rss_bytes(), 'peak_device': stats.get('peak_bytes_in_use'),
                    'loss': float(row['loss'])})
    write(self, row)

  def counted_getitem(self, step):
    element = getitem(self, step)
    input_tokens[step] = int(element['num_input_tokens'])
    positions_of[step] = int(element['num_positions'])  # Padding included, at each micro-batch's row width.
    return element

  def timed_call(self, *args):
    out = call(self, *args)
    compile_seconds.append(self.last_compile_seconds)  # Programs compiled for a new row width in this step.
    return out

  metrics_lib.MetricsWriter.write = timed_write
  pipeline.StepSource.__getitem__ = counted_getitem
  step_lib.TrainStep.__call__ = timed_call
  s = spec['settings']
  config = config_lib.base_config()
  config.model_name_or_path = spec['model_dir']
  config.dataset_name = spec['data_file']
  config.output_dir = os.path.join(spec['output_dir'], 'run')
  config.dataset_cache_dir = os.path.join(spec['output_dir'], 'cache')
  config.bf16 = s['bf16']
  config.disable_tqdm = True
  config.logging_steps = 1
  config.save_steps = 0  # Saves only at an epoch's end (none within the timed steps) and after the last step.
  config.max_steps = s['steps']
  config.learning_rate = s['learning_rate']
  config.lr_scheduler_type = 'linear'
  config.per_device_train_batch_size = s['batch_size']
  config.gradient_accumulation_steps = s['accumulation']
  config.max_length = s['max_length']
  config.gradient_checkpointing = s['gradient_checkpointing']
  config.packing = s.get('packing', False)
  config.padding_free = s.get('padding_free', False)
  config.length_buckets = s.get('length_buckets', 'auto')
  config.seed = s['seed']
  if s.get('lora'):
    config.update(use_peft=True, lora_r=LORA['r'], lora_alpha=LORA['alpha'], lora_dropout=LORA['dropout'],
                  lora_target_modules=LORA['targets'])
  config.lock()
  trainer.run(config)
  total = positions = compiling = 0
  for i, step in enumerate(steps):
    total += input_tokens[i]
    positions += positions_of[i]
    compiling += compile_seconds[i]
    step.update(tokens=total, positions=positions, compile=compiling)
  device = jax.devices()[0]
  return {'steps': steps, 'device': f'{jax.device_count()} x {device.device_kind}',
          'peak_flops': metrics_lib.peak_flops_per_device(device)}


def run_worker(args) -> None:
  spec = json.loads(args.worker)
  result = (trl_worker if spec['side'] == 'trl' else jaxsft_worker)(spec)
  with open(spec['result'], 'w', encoding='utf-8') as f:
    json.dump(result, f)


# -------------------------------------------------------------------------------------------------- driver


def launch(name: str, args, model_dir: str, data_file: str, workdir: str) -> dict:
  """Runs one (side, settings) in a fresh process; returns its figures."""
  side, extra = {**RUNS, **EXTRA_RUNS}[name]
  out = os.path.join(workdir, name)
  os.makedirs(out, exist_ok=True)
  settings = dict(steps=args.steps, learning_rate=args.learning_rate, batch_size=args.batch_size,
                  accumulation=args.accumulation, max_length=args.max_length, seed=args.seed, bf16=args.bf16,
                  gradient_checkpointing=args.gradient_checkpointing == 'true', **extra)
  if extra.get('padding_free'):  # The same conversations per step, in micro-batches of one row.
    settings.update(batch_size=1, accumulation=args.batch_size * args.accumulation)
  spec = dict(side=side, model_dir=model_dir, data_file=data_file, output_dir=out, settings=settings,
              result=os.path.join(out, 'result.json'))
  env = dict(os.environ, JAXSFT_CACHE_DIR=os.path.join(out, 'cache'), HF_DATASETS_CACHE=os.path.join(out, 'hf_cache'),
             TOKENIZERS_PARALLELISM='false', PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  start = time.time()
  with open(os.path.join(out, 'log.txt'), 'w', encoding='utf-8') as log:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--worker', json.dumps(spec)], env=env,
                          stdout=log, stderr=subprocess.STDOUT, check=False)
  wall = time.time() - start
  if proc.returncode != 0:
    with open(os.path.join(out, 'log.txt'), encoding='utf-8') as log:
      raise RuntimeError(f'run {name!r} failed (exit {proc.returncode}):\n{log.read()[-4000:]}')
  with open(spec['result'], encoding='utf-8') as f:
    result = json.load(f)
  figures = summarize(result['steps'], start, args.steps)
  figures.update(name=name, side=side, settings=settings, wall_s=wall, matmul_params=matmul_params(args.sizes),
                 **{k: v for k, v in result.items() if k != 'steps'})
  figures['steps'] = result['steps']
  for sub in ('run', 'cache', 'hf_cache'):  # Keeps the log and the per-step figures.
    shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
  print(f'{name}: {figures["tokens_per_s"]:,.0f} tokens/s, first step after {figures["first_step_s"]:.1f} s, '
        f'peak {figures["peak_mib"]:,.0f} MiB ({wall:.0f} s in all)', flush=True)
  return figures


def summarize(steps: list[dict], start: float, num_steps: int) -> dict:
  """Tokens/s over steps 2..N (steady state: compilations of new row widths excluded), time to step 1, peak
  memory at step N (module docstring)."""
  if len(steps) != num_steps:
    raise RuntimeError(f'expected {num_steps} steps, got {len(steps)}')
  first, last = steps[0], steps[-1]
  compiling = last.get('compile', 0.0) - first.get('compile', 0.0)
  wall = last['time'] - first['time']
  seconds = wall - compiling
  tokens = last['tokens'] - first['tokens']
  positions = last['positions'] - first['positions']
  step_seconds = sorted((b['time'] - a['time']) - (b.get('compile', 0.0) - a.get('compile', 0.0))
                        for a, b in zip(steps, steps[1:]))
  return dict(tokens_per_s=tokens / seconds, tokens_per_s_with_compile=tokens / wall, timed_tokens=tokens,
              timed_s=seconds, compile_s=compiling, first_step_s=first['time'] - start,
              peak_mib=last['peak_rss'] / 2**20, step_s_median=step_seconds[len(step_seconds) // 2],
              positions_per_s=positions / seconds, padding_efficiency=tokens / positions,
              tokens_per_cpu_s=tokens / (last['cpu'] - first['cpu'] - compiling),
              peak_device_mib=None if last.get('peak_device') is None else last['peak_device'] / 2**20)


HEADER = ('', 'tokens/s', 'tokens/cpu-s', 'positions/s', 'non-pad', '1st step', 'peak memory', 'step', 'compile')


def _row(*cells) -> str:
  return '{:<30} {:>9} {:>12} {:>11} {:>7} {:>9} {:>11} {:>7} {:>8}'.format(*cells)


def report(results: dict) -> dict:
  """Prints the table and the ratios; adds 'ratios' (and 'best_trl') to `results`."""
  print()
  print(_row(*HEADER))
  for name, r in results.items():
    label = f'{r["side"]} {name.replace(r["side"], "").strip("_") or "equal settings"}'
    print(_row(label, f'{r["tokens_per_s"]:,.0f}', f'{r["tokens_per_cpu_s"]:,.0f}', f'{r["positions_per_s"]:,.0f}',
               f'{r["padding_efficiency"]:.1%}',
               f'{r["first_step_s"]:.1f} s', f'{r["peak_mib"]:,.0f} MiB', f'{r["step_s_median"]:.2f} s',
               f'{r["compile_s"]:.1f} s'))
  _report_device(results)
  ratios = {}
  if 'trl' in results and 'jaxsft' in results:
    ratios.update(_ratios('equal', results['jaxsft'], results['trl']))
  if 'trl' in results and 'jaxsft_padding_free' in results:
    ratios.update(_ratios('padding_free', results['jaxsft_padding_free'], results['trl']))
  if 'trl_lora' in results and 'jaxsft_lora' in results:
    ratios.update(_ratios('lora', results['jaxsft_lora'], results['trl_lora']))
  trl_runs = [n for n in ('trl', 'trl_packing', 'trl_group_by_length') if n in results]
  if trl_runs and 'jaxsft_packing' in results:
    best = max(trl_runs, key=lambda n: results[n]['tokens_per_s'])
    print(f"best settings: jaxsft packing against TRL's fastest measured option, {best}")
    ratios.update(_ratios('best', results['jaxsft_packing'], results[best]))
    results['best_trl'] = best
  results['ratios'] = ratios
  if ratios:
    print('ratios jaxsft / TRL (tokens/s: higher is better; time, memory: lower is better): '
          + ', '.join(f'{k} {v:.3f}' for k, v in ratios.items()))
  return results


def _report_device(results: dict) -> None:
  """On an accelerator: each run's peak device memory, and MFU (6 x matmul parameters x tokens/s / peak FLOP/s)."""
  peaks = [r.get('peak_flops') for r in results.values() if r.get('peak_flops')]
  for name, r in results.items():
    parts = []
    if r['peak_device_mib'] is not None:
      parts.append(f'peak device memory {r["peak_device_mib"]:,.0f} MiB')
    if peaks:  # Same machine for every run: the jaxsft runs report the device's peak.
      r['mfu'] = 6 * r['matmul_params'] * r['tokens_per_s'] / peaks[0]
      parts.append(f'MFU {r["mfu"]:.1%} (6·N·tokens/s over {peaks[0] / 1e12:.0f} TFLOP/s, attention not counted)')
    if parts:
      print(f'{name} on {r["device"]}: ' + ', '.join(parts))


def _ratios(prefix: str, ours: dict, theirs: dict) -> dict:
  return {f'{prefix}_tokens_per_s': ours['tokens_per_s'] / theirs['tokens_per_s'],
          f'{prefix}_tokens_per_cpu_s': ours['tokens_per_cpu_s'] / theirs['tokens_per_cpu_s'],
          f'{prefix}_first_step': ours['first_step_s'] / theirs['first_step_s'],
          f'{prefix}_peak_memory': ours['peak_mib'] / theirs['peak_mib']}


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.worker:
    run_worker(args)
    return {}
  names = list(RUNS) if args.runs == 'all' else args.runs.split(',')
  unknown = sorted(set(names) - set(RUNS) - set(EXTRA_RUNS))
  if unknown:
    raise SystemExit(f'--runs: unknown {", ".join(unknown)}; expected some of {", ".join([*RUNS, *EXTRA_RUNS])}')
  own_workdir = args.workdir is None
  workdir = tempfile.mkdtemp(prefix='jaxsft-vs-trl-') if own_workdir else args.workdir
  os.makedirs(workdir, exist_ok=True)
  results = {}
  load_start = os.getloadavg()[0]
  try:
    model_dir, data_file = os.path.join(workdir, 'model'), os.path.join(workdir, 'train.jsonl')
    num_params = build_model(model_dir, args.sizes, args.seed)
    lengths = write_conversations(data_file, args.num_conversations, args.median_tokens, 4 * args.max_length,
                                  args.seed)
    lengths.sort()
    over = sum(n > args.max_length for n in lengths) / len(lengths)
    print(f'model: random Qwen2 {args.sizes}, tied embeddings, float32 weights: {num_params / 1e6:.1f}M parameters',
          flush=True)
    print(f'data: {len(lengths):,} conversations, target tokens median {lengths[len(lengths) // 2]:,}, '
          f'p90 {lengths[int(len(lengths) * 0.9)]:,}, {over:.1%} over max_length', flush=True)
    print(f'settings: {args.steps} steps, batch {args.batch_size} x accumulation {args.accumulation}, '
          f'max_length {args.max_length}, lr {args.learning_rate} linear, {"bf16" if args.bf16 else "float32"} '
          f'compute, gradient_checkpointing '
          f'{args.gradient_checkpointing}, logging every step; {os.cpu_count()} CPU cores, load '
          f'{load_start:.2f}', flush=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(args.parallel, 1)) as pool:
      futures = {name: pool.submit(launch, name, args, model_dir, data_file, workdir) for name in names}
      results = {name: future.result() for name, future in futures.items()}
  finally:
    if own_workdir:
      shutil.rmtree(workdir, ignore_errors=True)
  report(results)
  results['meta'] = dict(sizes=args.sizes, num_params=num_params, steps=args.steps, batch_size=args.batch_size,
                         accumulation=args.accumulation, max_length=args.max_length, bf16=args.bf16,
                         load_start=load_start, load_end=os.getloadavg()[0])
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == '__main__':
  main()
