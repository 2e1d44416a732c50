"""Tokenize + pack throughput of jaxsft's data path against TRL's SFTTrainer preprocessing, on the same rows.

Usage (from the repository root; needs the `bench` extra: torch, trl, accelerate):

  python benchmarks/data_throughput.py                          # 100_000 conversations, max_length 32768
  python benchmarks/data_throughput.py --num-conversations 20000 --num-proc 2
  python benchmarks/data_throughput.py --assistant-only-loss    # loss on assistant tokens, both sides

The data: N synthetic `messages` rows (a user question, then an assistant reasoning trace
`<think>\n...\n</think>\n\nanswer`) whose token counts resemble open-r1/Mixture-of-Thoughts, the data of
open-r1's OpenR1-Distill-7B recipe (max_length 32768, packing, loss on all tokens). Its dataset card gives,
per subset, the number of rows and of bytes: science 172_514 rows of 9.2 KB, math 93_733 of 17.1 KB, code
83_070 of 46.6 KB on average. At ~3.6 bytes per token (Qwen2.5's tokenizer on English reasoning and code),
those are means of ~2_600, ~4_700 and ~12_900 tokens. Each conversation draws its subset with those weights
(49% / 27% / 24%) and its length from a log-normal with that mean and sigma 0.6 (the card gives no shape:
log-normal is the usual long-tailed fit of generation lengths, and sigma 0.6 puts the median of the mix at a
few thousand tokens and ~0.8% of the rows at the 32k cap), clipped to [64, 32768] tokens. The text is random
words, sized to the target token count with the tokenizer's measured characters per token; what is measured
(render, encode, pack, batch) depends on the token counts, not on what the words say.

The tokenizer is jaxsft's tiny one (jaxsft/assets/tiny, a byte-level BPE with a ChatML template that has
`{% generation %}` markers, so `--assistant-only-loss` makes both sides compute the same transformers mask).
The rows are written to a JSON Lines file in a temporary directory; jaxsft reads it lazily
(`splits.load_splits`), TRL through `datasets.load_dataset('json')` (the Arrow conversion is timed apart and
not counted: SFTTrainer receives a loaded dataset).

What is timed:
* jaxsft, cold time to first batch: open the file, the length index with an empty cache (`build_index`,
  `--num-proc` processes), the packing plan (best-fit decreasing over the whole dataset), and the loader's
  first optimizer step (its micro-batches tokenized and packed).
* jaxsft, warm time to first batch: the same with the index read from the cache (a relaunch or a resume).
* jaxsft, loader throughput: a fresh loader iterating every step of one epoch (grain threads, the trainer's
  defaults), from its creation to the last batch: conversations/s and non-padding tokens/s.
* TRL: `SFTTrainer._prepare_dataset` with `packing=True` (bfd) and `dataset_num_proc=--num-proc` (and once
  more at TRL's default, one process), which is all SFTTrainer does to the data before its first batch:
  ChatML conversion check, tokenization (`apply_chat_template` per row), labels, packing. The trainer is
  built once beforehand on 4 rows with a tiny random model, so model loading is not in the time.
Packing efficiency is the non-padding fraction of the packed rows at max_length, on both sides.
"""

import argparse
import copy
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from jaxsft.data import formats  # pylint: disable=wrong-import-position
from jaxsft.data import index as index_lib  # pylint: disable=wrong-import-position
from jaxsft.data import pipeline  # pylint: disable=wrong-import-position
from jaxsft.data import splits as splits_lib  # pylint: disable=wrong-import-position

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'jaxsft', 'assets', 'tiny')

# (subset, share of rows, mean tokens): open-r1/Mixture-of-Thoughts' card, bytes per row / 3.6 bytes per token.
SUBSETS = (('science', 172_514, 9.2e3 / 3.6), ('math', 93_733, 17.1e3 / 3.6), ('code', 83_070, 46.6e3 / 3.6))
SIGMA = 0.6
MIN_TOKENS = 64

WORDS = ('the a of to and is in that we so let me check wait this number answer first then next because '
         'therefore since which means equation value sum product term terms function point line circle '
         'angle triangle area length width probability case cases count total step steps compute find '
         'solve given assume suppose consider note hmm actually right okay but if not when where each '
         'every all only also now again maybe perhaps think thought sure correct wrong error factor prime '
         'even odd integer real root roots square cube power log sin cos limit derivative integral x y z n '
         'k i j m a b c f g p q r 0 1 2 3 4 5 6 7 8 9 10 12 15 16 20 25 32 64 100 = + - * / ^ ( ) [ ] { } '
         '< > <= >= != , . : ; ? \\frac{1}{2} \\sqrt{2} \\pi \\boxed{42} $x$ def return for in range '
         'while if else elif print len list dict int str import class self None True False append '
         'molecule energy force mass velocity acceleration charge field reaction acid base cell protein').split()


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--num-conversations', type=int, default=100_000)
  parser.add_argument('--max-length', type=int, default=32768, help='max_length (truncation and packed rows)')
  parser.add_argument('--num-proc', type=int, default=os.cpu_count() or 1,
                      help="processes for jaxsft's index pass and TRL's dataset_num_proc (default: all cores)")
  parser.add_argument('--assistant-only-loss', action='store_true', help='loss on assistant tokens only, both sides')
  parser.add_argument('--micro-batch-size', type=int, default=8, help='packed rows per micro-batch')
  parser.add_argument('--accumulation', type=int, default=1, help='micro-batches per optimizer step')
  parser.add_argument('--no-trl-default', action='store_true', help='skip the extra TRL run at one process')
  parser.add_argument('--no-trl', action='store_true', help='measure jaxsft only')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workdir', default=None, help='where to write the data and caches (default: a temp dir)')
  parser.add_argument('--json', default=None, help='also write the figures to this JSON file')
  return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ the data


def sample_lengths(n: int, max_tokens: int, rng: np.random.Generator) -> np.ndarray:
  """Conversation lengths in tokens: the Mixture-of-Thoughts-like mixture of log-normals (module docstring)."""
  rows = np.array([s[1] for s in SUBSETS], np.float64)
  subset = rng.choice(len(SUBSETS), size=n, p=rows / rows.sum())
  means = np.array([s[2] for s in SUBSETS])[subset]
  medians = means * math.exp(-SIGMA ** 2 / 2)
  lengths = medians * np.exp(SIGMA * rng.standard_normal(n))
  return np.clip(np.round(lengths), MIN_TOKENS, max_tokens).astype(np.int64)


def write_conversations(path: str, n: int, tokenizer, max_tokens: int, seed: int) -> np.ndarray:
  """Writes n `messages` rows to `path` (JSON Lines); returns their target lengths in tokens."""
  rng = np.random.default_rng(seed)
  words = rng.choice(WORDS, size=1_500_000)
  newlines = rng.random(len(words)) < 0.04
  corpus = ''.join(f'{w}\n' if nl else f'{w} ' for w, nl in zip(words.tolist(), newlines.tolist()))
  sample = corpus[:200_000]
  chars_per_token = len(sample) / len(tokenizer(sample, add_special_tokens=False)['input_ids'])
  corpus += corpus  # Slices wrap around.
  size = len(corpus) // 2
  lengths = sample_lengths(n, max_tokens, rng)

  def text(tokens: int) -> str:
    chars = max(int(tokens * chars_per_token), 1)
    start = int(rng.integers(0, size))
    return corpus[start:start + min(chars, size)].strip()

  with open(path, 'w', encoding='utf-8') as f:
    for total in lengths.tolist():
      body = total - 12  # The template's tokens.
      question = int(min(max(rng.lognormal(math.log(120), 0.7), 8), body // 4))
      answer = max(body // 10, 4)
      thought = max(body - question - answer, 1)
      messages = [{'role': 'user', 'content': text(question)},
                  {'role': 'assistant', 'content': f'<think>\n{text(thought)}\n</think>\n\n{text(answer)}'}]
      f.write(json.dumps({'messages': messages}, ensure_ascii=False) + '\n')
  return lengths


# ---------------------------------------------------------------------------------------------- jaxsft side


def jaxsft_first_batch(path: str, tokenizer, args, cache_dir: str):
  """(seconds to the first step's batches, index, plan, step source): load, index, plan, first step."""
  start = time.perf_counter()
  source = splits_lib.load_splits(dataset_name=path, dataset_config=None, dataset_train_split='train',
                               dataset_test_split=None, need_eval=False).train
  options = index_lib.Options(fmt=formats.detect_format(source.column_names()), max_length=args.max_length,
                              assistant_only_loss=args.assistant_only_loss, completion_only_loss=None,
                              dataset_text_field='text')
  index = index_lib.build_index(source, tokenizer, options, skip_bad_rows=False, num_workers=args.num_proc,
                                cache_dir=cache_dir)
  plan = pipeline.make_plan(index, seq_len=args.max_length, pack=True)
  geometry = pipeline.Geometry.create(len(plan), args.micro_batch_size, args.accumulation, 1.0, -1)
  steps = pipeline.StepSource(source, tokenizer, options, plan, geometry, seed=args.seed, shuffle=True,
                              pad_id=tokenizer.pad_token_id)
  next(iter(pipeline.Loader(steps)))
  return time.perf_counter() - start, index, plan, steps


def jaxsft_epoch(steps) -> float:
  """Seconds for a fresh loader to yield every step of one epoch (checks the tokens it yields)."""
  start = time.perf_counter()
  loader = pipeline.Loader(steps)
  tokens = 0
  for _ in range(steps.geometry.steps_per_epoch):
    element = next(loader)
    tokens += sum(int((batch['segment_ids'] > 0).sum()) for batch in element['micro_batches'])
  seconds = time.perf_counter() - start
  expected = int(steps.plan.num_input_tokens.sum())
  if tokens != expected:
    raise RuntimeError(f'the loader yielded {tokens} tokens in an epoch, the plan holds {expected}')
  return seconds


# ------------------------------------------------------------------------------------------------- TRL side


def trl_trainer(tokenizer, args, workdir: str, dataset):
  """An SFTTrainer on 4 rows with a tiny random model: `_prepare_dataset` is then timed on the real data."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  import trl  # pylint: disable=import-outside-toplevel

  config = transformers.AutoConfig.from_pretrained(TINY)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config)
  sft_args = trl.SFTConfig(output_dir=os.path.join(workdir, 'trl_out'), use_cpu=True, bf16=False, report_to='none',
                           save_strategy='no', max_length=args.max_length, packing=True,
                           assistant_only_loss=args.assistant_only_loss, dataset_num_proc=None,
                           per_device_train_batch_size=args.micro_batch_size,
                           gradient_accumulation_steps=args.accumulation, seed=args.seed)
  return trl.SFTTrainer(model=model, args=sft_args, train_dataset=dataset.select(range(4)), processing_class=tokenizer)


def trl_prepare(trainer, dataset, num_proc: int | None):
  """(seconds, packed rows, non-padding tokens) of SFTTrainer's preprocessing of `dataset`."""
  import pyarrow.compute as pc  # pylint: disable=import-outside-toplevel
  args = copy.copy(trainer.args)
  args.dataset_num_proc = num_proc
  prepare = trainer._prepare_dataset  # pylint: disable=protected-access
  start = time.perf_counter()
  prepared = prepare(dataset, trainer.processing_class, args, True, None, 'train')
  seconds = time.perf_counter() - start
  seq_lengths = prepared.with_format('arrow')[:]['seq_lengths']
  tokens = int(pc.sum(pc.list_flatten(seq_lengths)).as_py())
  return seconds, len(prepared), tokens


def load_for_trl(path: str, cache_dir: str):
  """(seconds, datasets.Dataset): the JSON Lines file converted to Arrow in its own cache directory."""
  import datasets  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  dataset = datasets.load_dataset('json', data_files=path, split='train', cache_dir=cache_dir)
  return time.perf_counter() - start, dataset


# -------------------------------------------------------------------------------------------------- report


def _row(name: str, first_batch: str, convs: str, tokens: str, efficiency: str) -> str:
  return f'{name:<40} {first_batch:>16} {convs:>10} {tokens:>12} {efficiency:>9}'


def _rate(value: float) -> str:
  return f'{value:,.0f}'


def main(argv=None) -> dict:
  args = parse_args(argv)
  import transformers  # pylint: disable=import-outside-toplevel
  import datasets  # pylint: disable=import-outside-toplevel
  transformers.logging.set_verbosity_error()
  datasets.disable_progress_bars()
  warnings.filterwarnings('ignore', category=FutureWarning)
  own_workdir = args.workdir is None
  workdir = tempfile.mkdtemp(prefix='jaxsft-bench-') if own_workdir else args.workdir
  os.makedirs(workdir, exist_ok=True)
  tokenizer = transformers.AutoTokenizer.from_pretrained(TINY)
  results = {}
  try:
    path = os.path.join(workdir, 'train.jsonl')
    start = time.perf_counter()
    targets = write_conversations(path, args.num_conversations, tokenizer, args.max_length, args.seed)
    print(f'data: {args.num_conversations:,} conversations written to {path} in {time.perf_counter() - start:.1f} s '
          f'({os.path.getsize(path) / 2 ** 20:,.0f} MiB); target tokens per conversation: median '
          f'{int(np.median(targets)):,}, mean {int(targets.mean()):,}, p90 {int(np.percentile(targets, 90)):,}, '
          f'p99 {int(np.percentile(targets, 99)):,}, max {int(targets.max()):,}', flush=True)
    print(f'settings: max_length={args.max_length}, packing=bfd, assistant_only_loss={args.assistant_only_loss}, '
          f'num_proc={args.num_proc}, micro_batch_size={args.micro_batch_size}, accumulation={args.accumulation}, '
          f'tokenizer={os.path.normpath(TINY)} ({len(tokenizer)} tokens), {os.cpu_count()} CPU cores', flush=True)

    cache_dir = os.path.join(workdir, 'index_cache')
    cold, index, plan, steps = jaxsft_first_batch(path, tokenizer, args, cache_dir)
    print(f'jaxsft: cold time to first batch {cold:.2f} s', flush=True)
    warm, _, _, steps = jaxsft_first_batch(path, tokenizer, args, cache_dir)
    print(f'jaxsft: warm time to first batch {warm:.2f} s', flush=True)
    epoch = jaxsft_epoch(steps)
    num_convs, num_tokens = len(index.kept), int(plan.num_input_tokens.sum())
    print(f'jaxsft: one epoch through the loader, {steps.geometry.steps_per_epoch} steps, in {epoch:.2f} s',
          flush=True)
    results['jaxsft'] = dict(cold_s=cold, warm_s=warm, epoch_s=epoch, conversations=num_convs, tokens=num_tokens,
                             index_convs_per_s=len(index) / cold, convs_per_s=num_convs / epoch,
                             tokens_per_s=num_tokens / epoch, efficiency=plan.efficiency, rows=len(plan))
    del index, plan, steps
    gc.collect()

    if not args.no_trl:
      trainer = None
      runs = [('trl', args.num_proc)]
      if not args.no_trl_default and args.num_proc != 1:
        runs.append(('trl_default', None))
      for key, num_proc in runs:
        hf_cache = os.path.join(workdir, f'hf_cache_{key}')
        load_s, dataset = load_for_trl(path, hf_cache)
        if trainer is None:
          trainer = trl_trainer(tokenizer, args, workdir, dataset)
        seconds, rows, tokens = trl_prepare(trainer, dataset, num_proc)
        results[key] = dict(load_s=load_s, prepare_s=seconds, num_proc=num_proc or 1, rows=rows, tokens=tokens,
                            convs_per_s=len(dataset) / seconds, tokens_per_s=tokens / seconds,
                            efficiency=tokens / (rows * args.max_length))
        print(f'TRL ({num_proc or 1} process{"es" if (num_proc or 1) > 1 else ""}): preprocessing {seconds:.2f} s '
              f'(+ {load_s:.2f} s load_dataset, not counted)', flush=True)
        del dataset
        gc.collect()
        shutil.rmtree(hf_cache, ignore_errors=True)
  finally:
    if own_workdir:
      shutil.rmtree(workdir, ignore_errors=True)

  _report(results, args)
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=1)
  return results


def _report(results: dict, args) -> None:
  j = results['jaxsft']
  print()
  print(_row('', 'time to 1st batch', 'conv/s', 'tokens/s', 'packing'))
  print(_row(f'jaxsft cold (index pass, {args.num_proc} proc)', f'{j["cold_s"]:.2f} s', _rate(j['index_convs_per_s']),
             _rate(j['tokens'] / j['cold_s']), f'{j["efficiency"]:.2%}'))
  print(_row('jaxsft warm (index from cache)', f'{j["warm_s"]:.2f} s', '', '', ''))
  print(_row('jaxsft loader (one epoch)', '', _rate(j['convs_per_s']), _rate(j['tokens_per_s']), ''))
  for key in ('trl', 'trl_default'):
    if key in results:
      t = results[key]
      label = f'TRL _prepare_dataset ({t["num_proc"]} proc{", default" if key == "trl_default" else ""})'
      print(_row(label, f'{t["prepare_s"]:.2f} s', _rate(t['convs_per_s']), _rate(t['tokens_per_s']),
                 f'{t["efficiency"]:.2%}'))
  print(f'jaxsft: {j["conversations"]:,} conversations kept, {j["tokens"]:,} tokens in {j["rows"]:,} packed rows'
        + ''.join(f'; TRL ({results[k]["num_proc"]} proc): {results[k]["tokens"]:,} tokens in {results[k]["rows"]:,} '
                  'rows' for k in ('trl', 'trl_default') if k in results))
  if 'trl' in results:
    t = results['trl']
    print(f'same non-padding tokens on both sides: {"yes" if t["tokens"] == j["tokens"] else "NO"}')
    ratios = dict(cold_first_batch=j['cold_s'] / t['prepare_s'], warm_first_batch=j['warm_s'] / t['prepare_s'],
                  loader_convs_per_s=j['convs_per_s'] / t['convs_per_s'],
                  loader_tokens_per_s=j['tokens_per_s'] / t['tokens_per_s'],
                  packing_efficiency=j['efficiency'] / t['efficiency'])
    if 'trl_default' in results:
      ratios['cold_first_batch_vs_trl_default'] = j['cold_s'] / results['trl_default']['prepare_s']
    results['ratios'] = ratios
    print(f'ratios jaxsft / TRL ({t["num_proc"]} proc; times: lower is better, rates: higher is better): '
          + ', '.join(f'{name} {value:.3f}' for name, value in ratios.items()))


if __name__ == '__main__':
  main()
