"""The run directory (OUTPUT_DIR): who may write it, where a run starts in it, and the files the loop keeps there.

* `RunLock`: one run per output_dir at a time. Process 0 creates `OUTPUT_DIR/.lock` (exclusively: of two runs
  started together, exactly one gets it) holding its host, pid and start time, and removes it when the run ends.
  A second run on a live directory is refused in its first seconds, naming the holder. A lock left by a process
  that died on this host (SIGKILL, power loss) is taken over with a warning; one from another host cannot be
  checked from here, so it is refused with the command that removes it. Creating the lock is also the check
  that output_dir can be written, before any data is read or any weight loaded.
* `check_shared`: with several processes, every one must see process 0's output_dir (each writes its
  checkpoint shards there).
* `resume_point`, `rewind_metrics`: where a run starts (the newest complete checkpoint) and the metrics rows
  the resumed run writes again.
* `write_json_atomically`, `save_tokenizer`: the run's config.json and tokenizer copy, never half-written.
* `RunMeta`: what a checkpoint records besides the arrays.
"""

import dataclasses
import datetime
import json
import os
import socket
import sys
import time

import jax
import numpy as np

from jaxsft import checkpoint
from jaxsft import distributed
from jaxsft import metrics as metrics_lib
from jaxsft import storage
from jaxsft.errors import InputError

LOCK = '.lock'
TOKENIZER_DIR = 'tokenizer'  # OUTPUT_DIR/tokenizer: the training tokenizer (jaxsft.export reads it).

log = metrics_lib.log


def _alive_here(pid: int) -> bool:
  """Whether process `pid` exists on this host (a process of another user counts as alive)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class RunLock:
  """OUTPUT_DIR/.lock, held by process 0 of the run for its lifetime (see the module docstring).

  `acquire` is called by every process: process 0 takes the lock, and its verdict (taken, or the one-line reason
  it was refused) reaches every process, which all raise the same InputError, so no process goes on alone into
  a collective. `release` removes the lock (process 0), and the output_dir itself if the run created it and
  left it empty (a run that failed on its input leaves nothing behind).
  """

  def __init__(self, output_dir: str):
    self.output_dir = output_dir
    self.path = storage.join(output_dir, LOCK)
    self._held = False
    self._created_dir = False

  def acquire(self) -> 'RunLock':
    error = distributed.gather_text(self._take() if jax.process_index() == 0 else '')[0]
    if error:
      raise InputError(error)
    return self

  def _take(self) -> str:
    """Takes the lock; returns '' or the reason it cannot be taken."""
    field = f"config field 'output_dir': {self.output_dir!r}"
    try:
      if storage.isfile(self.output_dir):
        return f'{field} exists and is not a directory'
      if not storage.isdir(self.output_dir):
        storage.makedirs(self.output_dir)
        self._created_dir = True
    except OSError as e:
      return f'{field} cannot be created: {e.strerror or e}'
    record = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time(),
              'command': ' '.join(sys.argv)[:500]}
    for _ in range(3):
      try:
        taken = storage.create_exclusive(self.path, json.dumps(record))
      except OSError as e:
        return f'{field} is not writable: {e.strerror or e}'
      if not taken:
        holder = self._holder()
        if holder is None:  # Vanished (its run just ended) or unreadable: try again.
          time.sleep(0.2)
          continue
        if holder.get('host') == record['host'] and not _alive_here(int(holder.get('pid', -1))):
          log(f'warning: taking over the lock of run pid {holder.get("pid")} on this host, which is no longer '
              f'running ({self.path}, started {_when(holder)})')
          try:
            storage.remove(self.path)
          except FileNotFoundError:
            pass
          continue
        where = 'on this host' if holder.get('host') == record['host'] else (
            f'on host {holder.get("host")!r} (if that run is dead, remove {self.path})')
        return (f'{field} is in use by another run: pid {holder.get("pid")} {where}, started {_when(holder)}; '
                'one run per output_dir at a time')
      self._held = True
      return ''
    return f'{field}: cannot take its lock {self.path} (it keeps changing)'

  def _holder(self) -> dict | None:
    try:
      holder = json.loads(storage.read_text(self.path))
      return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
      return None

  def _remove_quietly(self) -> None:
    try:
      storage.remove(self.path)
    except OSError:
      pass

  def release(self) -> None:
    if not self._held:
      return
    self._held = False
    holder = self._holder()
    if holder is not None and holder.get('pid') == os.getpid() and holder.get('host') == socket.gethostname():
      self._remove_quietly()
    if self._created_dir and not storage.is_remote(self.output_dir):  # (A bucket has no empty directories.)
      try:
        os.rmdir(self.output_dir)  # Only if the run left it empty.
      except OSError:
        pass

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _when(holder: dict) -> str:
  try:
    return datetime.datetime.fromtimestamp(float(holder['started'])).strftime('%Y-%m-%d %H:%M:%S')
  except (KeyError, TypeError, ValueError, OverflowError):
    return 'at an unknown time'


def check_shared(output_dir: str) -> None:
  """With several processes, every one must see process 0's output_dir: each writes its checkpoint shards there.

  Process 0 writes a marker file; each process looks for it. A per-host local disk, or a different path per
  process, fails here with a clear error instead of hanging in the first checkpoint.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  nonce = int(multihost_utils.broadcast_one_to_all(np.int64(time.time_ns() % 2**62)))
  marker = storage.join(output_dir, f'.shared-check-{nonce}')
  if jax.process_index() == 0:
    storage.makedirs(output_dir)
    storage.write_atomically(marker, '')
  multihost_utils.sync_global_devices('jaxsft: output_dir marker written')
  seen = np.asarray(multihost_utils.process_allgather(np.int32(storage.exists(marker))))
  multihost_utils.sync_global_devices('jaxsft: output_dir marker read')
  if jax.process_index() == 0:
    storage.remove(marker)
  if not seen.all():
    missing = ', '.join(str(p) for p in np.flatnonzero(seen == 0))
    raise InputError(f"config field 'output_dir': process(es) {missing} do not see {output_dir!r} as process 0 "
                     'does; every process writes its checkpoint shards there, so it must be one directory on a '
                     'filesystem all hosts share (a gs:// bucket, NFS/Filestore)')


def _refuse_earlier_run(output_dir: str) -> None:
  """Refuses to start over in a directory that holds an earlier run: nothing written is ever overwritten."""
  if storage.exists(storage.join(output_dir, 'metrics.jsonl')):
    raise InputError(f"config field 'output_dir': {output_dir!r} already holds a run (metrics.jsonl); "
                     'choose another output_dir or remove that one')
  if storage.isfile(output_dir):
    raise InputError(f"config field 'output_dir': {output_dir!r} exists and is not a directory")


def resume_point(config) -> tuple[str, int] | None:
  """(checkpoints root, step) to resume from: `resume_from_checkpoint`, else OUTPUT_DIR's newest complete one.

  An output_dir that holds a run (metrics.jsonl) but no complete checkpoint is refused: starting over would
  overwrite what is there.
  """
  if config.resume_from_checkpoint:
    return checkpoint.locate(config.resume_from_checkpoint, field="config field 'resume_from_checkpoint'")
  step = checkpoint.newest_verified(checkpoint.root_of(config.output_dir))
  if step is not None:
    return checkpoint.root_of(config.output_dir), step
  _refuse_earlier_run(config.output_dir)
  return None


def rewind_metrics(output_dir: str, step: int) -> None:
  """Keeps metrics.jsonl's rows up to `step` (the resumed run writes the later ones again).

  The rows removed (written after the checkpoint by the interrupted run) are kept in
  metrics.before-resume-at-STEP.jsonl; nothing is lost.
  """
  path = storage.join(output_dir, 'metrics.jsonl')
  if not metrics_lib.is_main_process() or not storage.isfile(path):
    return
  lines = storage.read_text(path).splitlines(keepends=True)
  keep = []
  for line in lines:
    try:
      if json.loads(line).get('step', 0) <= step:
        keep.append(line)
    except ValueError:  # A line cut short by a kill: dropped from the rewound file, kept in the backup.
      pass
  if len(keep) == len(lines):
    return
  backup = storage.join(output_dir, f'metrics.before-resume-at-{step}.jsonl')
  n = 1
  while storage.exists(backup):
    n += 1
    backup = storage.join(output_dir, f'metrics.before-resume-at-{step}.{n}.jsonl')
  storage.write_atomically(backup, ''.join(lines))
  storage.write_atomically(path, ''.join(keep))
  log(f'metrics.jsonl rewound to step {step} ({len(lines) - len(keep)} later rows kept in {backup})')


def save_tokenizer(tokenizer, output_dir: str) -> None:
  """OUTPUT_DIR/tokenizer: the training tokenizer, so an export needs nothing but the run directory."""
  if not metrics_lib.is_main_process():
    return
  with storage.staged_dir(storage.join(output_dir, TOKENIZER_DIR), commit='tokenizer_config.json') as local:
    tokenizer.save_pretrained(local)


def write_json_atomically(path: str, obj) -> None:
  storage.write_atomically(path, json.dumps(obj, indent=2, sort_keys=True))



@dataclasses.dataclass
class RunMeta:
  """What a checkpoint records besides the arrays (its `meta` item, JSON): the run, so that an export needs
  nothing but the checkpoint (the resolved config, the Hugging Face model config and where the model came from,
  the generation config, chat template and eos token the run trained with, the export dtype), and the loop's
  position, so that a resumed run continues exactly (the step, which is also the data loader's position; the
  cumulative loss-token count; the per-micro-batch sums of the unlogged steps of the current logging window;
  the steps skipped for a non-finite gradient)."""
  config: dict
  hf_config: dict
  model_dir: str
  generation_config: dict
  chat_template: str | None
  eos_token: str | None
  export_dtype: str
  step: int = 0
  num_tokens: int = 0
  log_window: list = dataclasses.field(default_factory=list)
  skipped_steps: int = 0

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, meta: dict) -> 'RunMeta':
    """From a checkpoint's meta (keys of older jaxsft releases that nothing reads are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in meta.items() if k in names})
