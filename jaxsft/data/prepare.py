"""Config → the train (and eval) data of a run: splits, index, plan, geometry, step sources, with a log line each.

Everything here reads only the data and the tokenizer, never the devices, so every data error surfaces
before any compilation.
"""

import dataclasses
import os

from ml_collections import config_dict

from jaxsft import config as config_lib
from jaxsft.data import buckets
from jaxsft.data import formats
from jaxsft.data import index as index_lib
from jaxsft.data import pipeline
from jaxsft.data import remote
from jaxsft.data import splits as splits_lib
from jaxsft.errors import InputError


@dataclasses.dataclass
class Split:
  """One split, ready to iterate."""
  name: str
  index: index_lib.Index
  plan: pipeline.Plan
  geometry: pipeline.Geometry
  steps: pipeline.StepSource


@dataclasses.dataclass
class Data:
  train: Split
  eval: Split | None
  options: index_lib.Options
  assistant_mask_method: str | None


def _options(config: config_dict.ConfigDict, source, tokenizer) -> tuple[index_lib.Options, str | None]:
  fmt = formats.detect_format(source.column_names(), config.dataset_text_field)
  _check_chat_template(config, source, tokenizer, fmt)
  method = None
  if config.assistant_only_loss:
    if fmt == formats.TEXT:
      raise InputError("config field 'assistant_only_loss': needs conversational rows ('messages' or "
                       f"'prompt'/'completion' message lists), but {source.name} is plain text "
                       f'({config.dataset_text_field!r})')
    method = formats.assistant_mask_method(tokenizer)
  options = index_lib.Options(fmt=fmt, max_length=config.max_length, assistant_only_loss=config.assistant_only_loss,
                              completion_only_loss=config.completion_only_loss,
                              dataset_text_field=config.dataset_text_field)
  return options, method


def _check_chat_template(config: config_dict.ConfigDict, source, tokenizer, fmt: str) -> None:
  """Conversational rows need a chat template: without one, fail once, naming the tokenizer, before the data pass."""
  if fmt == formats.TEXT:
    return
  if fmt == formats.PROMPT_COMPLETION:  # Plain-string prompts and completions need no template.
    try:
      first = source[0]
    except (InputError, IndexError):
      return  # The data pass names the bad row.
    if not isinstance(first, dict) or isinstance(first.get('prompt'), str):
      return
  try:
    tokenizer.get_chat_template()
    return
  except ValueError:  # transformers: no chat template set.
    pass
  except AttributeError:  # Not a transformers tokenizer: its own calls will tell.
    return
  field = 'tokenizer_name_or_path' if config.tokenizer_name_or_path else 'model_name_or_path'
  name = getattr(tokenizer, 'name_or_path', None) or config[field]
  raise InputError(f'the tokenizer {name!r} (config field {field!r}) has no chat template, but the rows of '
                   f'{source.name} are conversations (message lists): set config field \'chat_template\' to a '
                   'Jinja template or the path of a file holding one, or use a tokenizer that has one')


def _index(config, source, tokenizer, options, process_index, process_count, log) -> index_lib.Index:
  return index_lib.build_index(source, tokenizer, options, skip_bad_rows=config.skip_bad_rows,
                               num_workers=config.dataset_num_proc or os.cpu_count() or 1,
                               cache_dir=os.path.join(config_lib.cache_dir(config), 'index'),
                               process_index=process_index, process_count=process_count, log=log)


def _describe(name: str, index: index_lib.Index, plan: pipeline.Plan, max_length: int) -> str:
  text = (f'{len(index)} rows from {name}; {len(index.kept)} kept, {index.num_dropped} dropped (no loss token '
          f'after truncation to max_length={max_length}), {index.num_truncated} truncated')
  if index.num_bad:
    text += f', {index.num_bad} bad rows skipped'
  text += f'; {int(plan.num_targets.sum())} loss tokens'
  if plan.packed:
    text += (f'; packed into {len(plan)} rows of {plan.seq_len} tokens, packing efficiency '
             f'{plan.efficiency:.1%} (non-padding tokens)')
  else:
    text += f'; one conversation per row, padding efficiency {plan.efficiency:.1%}'
  return text


def _padding_free_efficiency(steps: pipeline.StepSource) -> float:
  """Non-padding fraction of the tokens the padding-free steps compute (empty rows included)."""
  epochs = steps.geometry.total_steps / steps.geometry.steps_per_epoch
  computed = int(steps.micro_batches_per_step.sum()) * steps.geometry.micro_batch_size * steps.plan.seq_len
  return float(steps.plan.num_input_tokens.sum()) * epochs / max(computed, 1)


def prepare(config: config_dict.ConfigDict, tokenizer, *, micro_batch_size: int, eval_batch_size: int,
            process_index: int, process_count: int, log, accumulation: int | None = None) -> Data:
  """The train split (and the eval split when `config.eval_strategy` != 'no') of `config`.

  `accumulation`: micro-batches per optimizer step (None: `config.gradient_accumulation_steps`).
  """
  need_eval = config.eval_strategy != 'no'
  splits = splits_lib.load_splits(dataset_name=config.dataset_name, dataset_config=config.dataset_config,
                                  dataset_train_split=config.dataset_train_split,
                                  dataset_test_split=config.dataset_test_split,
                                  dataset_mixture=config.dataset_mixture, need_eval=need_eval,
                                  remote_cache=remote.cache_under(config_lib.cache_dir(config), log))
  options, method = _options(config, splits.train, tokenizer)
  pad_id = tokenizer.pad_token_id

  index = _index(config, splits.train, tokenizer, options, process_index, process_count, log)
  plan = pipeline.make_plan(index, seq_len=config.max_length, pack=config.packing)
  geometry = pipeline.Geometry.create(len(plan), micro_batch_size, accumulation or config.gradient_accumulation_steps,
                                      config.num_train_epochs, config.max_steps)
  padding_free = config.padding_free and not config.packing
  steps = pipeline.StepSource(splits.train, tokenizer, options, plan, geometry, seed=config.seed, shuffle=True,
                              pad_id=pad_id, process_index=process_index, process_count=process_count,
                              padding_free=padding_free,
                              widths=buckets.row_widths(config, packed=plan.packed or padding_free))
  log(f'data: {_describe(splits.train_name, index, plan, config.max_length)}; format {options.fmt}'
      + (f', assistant mask from {method}' if method else ''))
  if padding_free:
    micro_batches = int(steps.micro_batches_per_step.sum())
    log(f'padding-free: {micro_batches} micro-batches of {micro_batch_size} rows instead of '
        f'{geometry.accumulation * geometry.total_steps} (tokens fill {_padding_free_efficiency(steps):.1%} of them)')
  train = Split(splits.train_name, index, plan, geometry, steps)

  evaluation = None
  if need_eval:
    eval_options, _ = _options(config, splits.eval, tokenizer)
    eval_index = _index(config, splits.eval, tokenizer, eval_options, process_index, process_count, log)
    # Eval loss is token-weighted over the split, whatever the layout: padding-free packs it whole.
    eval_plan = pipeline.make_plan(eval_index, seq_len=config.max_length, pack=config.packing or config.padding_free)
    eval_geometry = pipeline.Geometry.create(len(eval_plan), eval_batch_size, 1, 1.0, -1)
    eval_steps = pipeline.StepSource(splits.eval, tokenizer, eval_options, eval_plan, eval_geometry,
                                     seed=config.seed, shuffle=False, pad_id=pad_id, process_index=process_index,
                                     process_count=process_count,
                                     widths=buckets.row_widths(config, packed=eval_plan.packed))
    log(f'eval data: {_describe(splits.eval_name, eval_index, eval_plan, config.max_length)}')
    evaluation = Split(splits.eval_name, eval_index, eval_plan, eval_geometry, eval_steps)
  return Data(train, evaluation, options, method)
