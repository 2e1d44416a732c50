"""Run reporting, process 0 only: metrics.jsonl, TensorBoard, W&B, and the progress bar.

Every row goes to OUTPUT_DIR/metrics.jsonl and to the integrations that `report_to` names, under transformers'
names (TensorBoardCallback / WandbCallback: `eval_loss` → `eval/loss`, any other key → `train/<key>`), at the row's
step. `check_report_to` fails fast, before any compilation, on a missing package or on W&B without credentials
(never an interactive prompt). On resume, TensorBoard's `purge_step` hides the events the interrupted run wrote
past its checkpoint, and W&B continues the run whose id OUTPUT_DIR/wandb_id holds.
"""

import importlib
import json
import numbers
import os
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np
import tqdm

from jaxsft import config as config_lib
from jaxsft import metrics as metrics_lib
from jaxsft import storage
from jaxsft.errors import InputError
from jaxsft.errors import one_line

# report_to name → (the module it needs, the pyproject extra that installs it).
INTEGRATIONS = {'tensorboard': ('tensorboardX', 'tensorboard'), 'wandb': ('wandb', 'wandb')}
WANDB_ID_FILE = 'wandb_id'  # In OUTPUT_DIR: the W&B run a resumed run continues.
_WANDB_LOCAL_MODES = ('offline', 'dryrun', 'disabled')


def _import(module: str):
  return importlib.import_module(module)


def report_to_problem(names) -> str | None:
  """Why the integrations `names` cannot report from this process (a one-line message), or None."""
  for name in names:
    module, extra = INTEGRATIONS[name]
    try:
      _import(module)
    except ImportError:
      return (f"config field 'report_to' names {name!r} but the {module} package is not installed "
              f"(pip install 'jaxsft[{extra}]')")
  if 'wandb' in names:
    return _wandb_credentials_problem()
  return None


def _wandb_credentials_problem() -> str | None:
  """None if W&B can start a run without asking anything: WANDB_MODE is offline/disabled, or credentials exist
  (WANDB_API_KEY, `wandb login`'s .netrc, the settings file). `wandb.login(prompt=False)` never prompts, and once
  it has found them the session holds them, so `wandb.init` has no reason to prompt either."""
  if os.environ.get('WANDB_MODE', '').strip().lower() in _WANDB_LOCAL_MODES:
    return None
  wandb = _import('wandb')
  try:
    if wandb.login(prompt=False, verify=False):
      return None
    why = 'no W&B credentials found (no WANDB_API_KEY, no `wandb login`)'
  except Exception as e:  # pylint: disable=broad-except  (an invalid key format, a bad settings file)
    why = f'W&B credentials are unusable ({one_line(e, 300, typed=True)})'
  return (f"config field 'report_to' names 'wandb' but {why}: run `wandb login` or set WANDB_API_KEY, or set "
          'WANDB_MODE=offline to log locally (and `wandb sync` later)')


def check_report_to(names) -> None:
  """Raises InputError (one line) if an integration of `names` cannot report. Cheap: call it before compiling.

  Process 0 checks (it alone reports); with several processes its verdict is broadcast, so every process raises
  the same error instead of the others waiting in a collective for a process that stopped.
  """
  if not names:
    return
  problem = report_to_problem(names) if metrics_lib.is_main_process() else None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    encoded = np.zeros(1024, np.uint8)
    if problem:
      raw = problem.encode()[:1024]
      encoded[:len(raw)] = np.frombuffer(raw, np.uint8)
    encoded = np.asarray(multihost_utils.broadcast_one_to_all(encoded))
    problem = bytes(encoded).rstrip(b'\0').decode(errors='replace') or None
  if problem:
    raise InputError(problem)


def scalar_name(key: str) -> str:
  """transformers' `rewrite_logs`: eval_loss → eval/loss, test_x → test/x, anything else → train/<key>."""
  for prefix in ('eval_', 'test_'):
    if key.startswith(prefix):
      return prefix[:-1] + '/' + key[len(prefix):]
  return 'train/' + key


def scalars(row: dict) -> dict[str, float]:
  """The numeric fields of a metrics row under their reported names (`step` is the x axis, not a scalar).

  An evaluation row (any `eval_` key) reports its eval fields only: its `epoch` repeats the training row's.
  """
  is_eval = any(k.startswith('eval_') for k in row)
  out = {}
  for key, value in row.items():
    if key == 'step' or (is_eval and not key.startswith('eval_')):
      continue
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
      out[scalar_name(key)] = value
  return out


def markdown_table(rows: list[dict]) -> str:
  """`rows` as a Markdown table (TensorBoard's text plugin renders it): columns in first-seen key order."""
  columns = list(dict.fromkeys(k for row in rows for k in row))

  def cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace('\\', '\\\\').replace('|', '\\|').replace('\r\n', '\n').replace('\n', '<br>')

  lines = ['| ' + ' | '.join(cell(c) for c in columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(cell(row.get(c, '')) for c in columns) + ' |' for row in rows]
  return '\n'.join(lines)


class Reporter:
  """Writes each metrics row to metrics.jsonl and to the `report_to` integrations (process 0; elsewhere a no-op).

  TensorBoard (tensorboardX): one scalar per numeric field at the row's step, in `logging_dir`
  (OUTPUT_DIR/tensorboard by default); a run resumed at step S writes `purge_step=S + 1`, so TensorBoard drops what
  the interrupted run logged past its checkpoint (metrics.jsonl is rewound the same way). W&B: a run in project
  `wandb_project` ($WANDB_PROJECT, else 'jaxsft'), named `run_name` (else OUTPUT_DIR's base name), local files in
  OUTPUT_DIR/wandb, config = the resolved config; its id is kept in OUTPUT_DIR/wandb_id and a later run in the same
  OUTPUT_DIR (a resume) continues it. Every write is flushed. `close` ends the W&B run with the exit code given.
  """

  def __init__(self, output_dir: str, *, report_to=(), run_config: dict | None = None, resume_step: int = 0,
               run_name: str | None = None, logging_dir: str | None = None, wandb_project: str | None = None,
               wandb_entity: str | None = None, wandb_run_group: str | None = None):
    self.output_dir = output_dir
    self._jsonl = metrics_lib.MetricsWriter(output_dir)
    self._tensorboard = self._wandb = None
    self.tensorboard_dir = None
    if not metrics_lib.is_main_process():
      return
    try:
      if 'tensorboard' in report_to:
        self.tensorboard_dir = logging_dir or storage.join(output_dir, 'tensorboard')
        self._tensorboard = _tensorboard_writer(self.tensorboard_dir, resume_step)
      if 'wandb' in report_to:
        self._wandb = _wandb_run(output_dir, run_config, run_name=run_name, project=wandb_project, entity=wandb_entity,
                                 group=wandb_run_group)
    except BaseException:
      self.close(exit_code=1)
      raise

  @classmethod
  def from_config(cls, config, resolved_config: dict | None = None, resume_step: int = 0) -> 'Reporter':
    """The reporter a run of `config` writes through (`resolved_config`: what W&B records as the run's config)."""
    return cls(config.output_dir, report_to=config_lib.report_to(config), run_config=resolved_config,
               resume_step=resume_step, run_name=config.run_name, logging_dir=config.logging_dir,
               wandb_project=config.wandb_project, wandb_entity=config.wandb_entity,
               wandb_run_group=config.wandb_run_group)

  def write(self, row: dict) -> None:
    """One metrics row (it carries its `step`): metrics.jsonl as is, the integrations its numeric fields."""
    self._jsonl.write(row)
    values = scalars(row)
    if self._tensorboard is not None:
      for name, value in values.items():
        self._tensorboard.add_scalar(name, value, row['step'])
      self._tensorboard.flush()
    if self._wandb is not None and values:
      self._wandb.log(values, step=row['step'])

  def text(self, tag: str, step: int, rows: list[dict]) -> None:
    """A table of text (e.g. tag 'eval_generations', rows of {prompt, reference, generated}) at `step`:
    metrics.jsonl gets `{'step': step, tag: rows}`, TensorBoard a Markdown table, W&B a `wandb.Table`."""
    self._jsonl.write({'step': step, tag: rows})
    name = scalar_name(tag)
    if self._tensorboard is not None:
      self._tensorboard.add_text(name, markdown_table(rows), step)
      self._tensorboard.flush()
    if self._wandb is not None:
      import wandb  # pylint: disable=import-outside-toplevel
      columns = list(dict.fromkeys(k for row in rows for k in row))
      data = [[_table_cell(row.get(c)) for c in columns] for row in rows]
      self._wandb.log({name: wandb.Table(columns=columns, data=data)}, step=step)

  def close(self, exit_code: int = 0, *, preempted: bool = False) -> None:
    """Flushes and closes everything; the W&B run ends with `exit_code` (non-zero: failed; `preempted`: W&B marks
    the run as preempted, to be resumed). Safe to call twice."""
    tensorboard, run = self._tensorboard, self._wandb
    self._tensorboard = self._wandb = None
    try:
      if tensorboard is not None:
        tensorboard.close()
      if run is not None:
        if preempted:
          run.mark_preempting()
        run.finish(exit_code=exit_code)
    finally:
      self._jsonl.close()

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    self.close(exit_code=0 if exc_type is None else 1)


def _table_cell(value):
  return value if value is None or isinstance(value, (str, int, float)) else json.dumps(value)


def _tensorboard_writer(logdir: str, resume_step: int):
  """A tensorboardX SummaryWriter; resumed at `resume_step` > 0, it purges the events from resume_step + 1 on.

  Its file name gets the creation time's nanoseconds: tensorboardX names files by the second only, and a second
  writer in the same second would overwrite the first, or sort before it and undo the purge.
  """
  from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  ns = time.time_ns()
  return SummaryWriter(logdir, purge_step=resume_step + 1 if resume_step else None,
                       filename_suffix=f'.{ns % 10**9:09d}.{os.getpid()}')


def _wandb_run(output_dir: str, run_config: dict | None, *, run_name, project, entity, group):
  """wandb.init for this OUTPUT_DIR: a new run, or (OUTPUT_DIR/wandb_id present) the same run continued."""
  import wandb  # pylint: disable=import-outside-toplevel
  problem = _wandb_credentials_problem()  # Checked again here: wandb.init must never prompt.
  if problem:
    raise InputError(problem)
  id_path = storage.join(output_dir, WANDB_ID_FILE)
  run_id = None
  if storage.isfile(id_path):
    run_id = storage.read_text(id_path).strip() or None
  try:
    run = wandb.init(project=project or os.environ.get('WANDB_PROJECT') or 'jaxsft', entity=entity, group=group,
                     name=run_name or storage.basename(storage.absolute(output_dir)), dir=_wandb_dir(output_dir),
                     config=run_config, id=run_id, resume='allow')
  except Exception as e:  # pylint: disable=broad-except  (network, server, permissions: all one line)
    raise InputError(f"config field 'report_to' names 'wandb' but W&B could not start a run "
                     f"({one_line(e, 300, typed=True)}); "
                     'check `wandb login` and the network, or set WANDB_MODE=offline to log locally') from None
  if run_id is None and run.id:
    storage.write_atomically(id_path, run.id + '\n')
  return run


def _wandb_dir(output_dir: str) -> str:
  """Where W&B keeps its local files: OUTPUT_DIR, or for a gs:// one a local directory (W&B writes only locally;
  it uploads them to its server itself)."""
  if not storage.is_remote(output_dir):
    return output_dir
  local = os.path.join(tempfile.gettempdir(), 'jaxsft-wandb', output_dir.split('://', 1)[1].replace('/', '_'))
  os.makedirs(local, exist_ok=True)
  return local


class ProgressBar:
  """The training bar (tqdm, on stderr like `log`'s lines, which print above it): step/total, loss, tokens/s, ETA.

  The ETA is the remaining steps × the mean time per step since the end of this run's first step, so the first
  step's compilation (minutes on a large model) does not inflate it; tqdm's own rate-based estimate, which would
  count it, is not shown.
  """

  BAR_FORMAT = '{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]'

  def __init__(self, total: int, initial: int = 0, *, disable: bool = False,
               clock: Callable[[], float] = time.perf_counter, file=None):
    self.total, self.n = total, initial
    self._clock = clock
    self._start = None  # (clock, n) at the end of this run's first step.
    self._metrics = ''
    self._bar = tqdm.tqdm(total=total, initial=initial, disable=disable, dynamic_ncols=True, desc='train',
                          unit='step', bar_format=self.BAR_FORMAT, file=file)

  def eta_seconds(self) -> float | None:
    """Seconds left at the pace of the steps after the first; None until one such step is done."""
    if self._start is None or self.n <= self._start[1]:
      return None
    seconds_per_step = (self._clock() - self._start[0]) / (self.n - self._start[1])
    return max(self.total - self.n, 0) * seconds_per_step

  def step(self) -> None:
    """One optimizer step done (the first of the run: call it once its compilation and execution are over)."""
    self.n += 1
    if self._start is None:
      self._start = (self._clock(), self.n)
    self._bar.set_postfix_str(self._postfix(), refresh=False)
    self._bar.update(1)

  def show(self, row: dict) -> None:
    """The loss and loss tokens/s of a logged training row."""
    parts = [f'loss={row["loss"]:.4f}'] if row.get('loss') is not None else []
    if row.get('tokens_per_second') is not None:
      parts.append(f'tok/s={row["tokens_per_second"]:.0f}')
    self._metrics = ', '.join(parts)
    self._bar.set_postfix_str(self._postfix())

  def _postfix(self) -> str:
    eta = self.eta_seconds()
    return ', '.join(p for p in (self._metrics, 'eta=' + (tqdm.tqdm.format_interval(eta) if eta is not None else '?'))
                     if p)

  def text(self) -> str:
    """The bar as it would be drawn now."""
    return str(self._bar)

  def close(self) -> None:
    self._bar.close()
