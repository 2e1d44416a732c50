"""Orbax checkpoints of a run: OUTPUT_DIR/checkpoints/STEP/{state, meta}.

`state` holds the parameters and the optimizer state (Adam's moments and
counters) as global arrays: every process writes the shards its devices hold (OCDBT), and restoring reads
them into whatever shardings the restoring mesh asks for, so a checkpoint saved on fsdp=8 restores on
fsdp=4 × tensor=2 or on one device. `meta` is one JSON object written by process 0, a `run_dir.RunMeta` (the
run's config, model config, tokenizer facts and export dtype, so `python -m jaxsft.export` needs nothing but the
checkpoint; the step, which is also the data loader's position whatever the process and worker count; the
cumulative token count; the unlogged sums of the current logging window, so a resumed run logs exactly what an
uninterrupted one would) plus the format number. The step itself draws no random numbers: data order and
initialisation derive from the config's seed.

Saving is asynchronous: `save` returns once the arrays are copied to host memory and the files are written
in the background while training continues. Orbax writes each checkpoint to `STEP.orbax-checkpoint-tmp`
and renames it when complete, waits for the previous save before starting the next, and deletes checkpoints
beyond `save_total_limit` only after a newer one is complete. A process killed mid-save leaves only the
temporary directory, which is never read and is removed when the next manager opens the directory.

Integrity: every checkpoint carries `checksums.json` (jaxsft/integrity.py), written in the background save
thread once its files are complete and before Orbax gives the directory its final name. `newest_verified`
picks the checkpoint a run resumes from: the newest whose files all match their checksums (the processes of
a run split the reading); a corrupted one is named with the file that differs, and the run falls back to
the one before it, or stops if there is none. An explicitly named checkpoint (`resume_from_checkpoint`, an
export) is verified the same way and refused if corrupted.
"""

import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxsft import distributed
from jaxsft import fields
from jaxsft import integrity
from jaxsft import storage
from jaxsft.errors import InputError
from jaxsft.errors import one_line

CHECKPOINTS = 'checkpoints'
FORMAT = 1


class CheckpointError(RuntimeError):
  """A save that failed (full disk, lost filesystem): the run stops, earlier checkpoints are intact."""


def root_of(output_dir: str) -> str:
  return storage.join(output_dir, CHECKPOINTS)


def _complete_steps(root: str) -> list[int]:
  """Steps of the complete checkpoints under `root`.

  Locally an unfinished checkpoint is a temporary directory (a suffix after the step). A bucket has no renames:
  Orbax writes STEP/ in place and commits it with `commit_success.txt`, which jaxsft's checksums precede
  (`_write_checksums`): there a step is complete when both are in it.
  """
  if not storage.isdir(root):
    return []
  remote = storage.is_remote(root)
  steps = []
  for name in storage.listdir(root):
    if not name.isdigit():
      continue
    path = storage.join(root, name)
    if remote:
      files = set(storage.listdir(path))
      complete = {'state', 'meta', 'commit_success.txt', integrity.FILE} <= files
    else:
      complete = os.path.isdir(os.path.join(path, 'state')) and os.path.isdir(os.path.join(path, 'meta'))
    if complete:
      steps.append(int(name))
  return sorted(steps)


def latest_step(output_dir: str) -> int | None:
  steps = _complete_steps(root_of(output_dir))
  return steps[-1] if steps else None


def locate(path: str, *, field: str = 'checkpoint') -> tuple[str, int]:
  """(checkpoints root, step) for OUTPUT_DIR, OUTPUT_DIR/checkpoints (its newest) or OUTPUT_DIR/checkpoints/STEP,
  verified (InputError naming the file if it is corrupted)."""
  root, step = _locate(path, field)
  problem = verify(root, step)
  if problem:
    raise InputError(f'{field}: {problem}')
  return root, step


def _locate(path: str, field: str) -> tuple[str, int]:
  path = storage.absolute(path)
  if not storage.isdir(path):
    raise InputError(f'{field}: no such directory {path!r}')
  name = storage.basename(path)
  if '.orbax-checkpoint-tmp' in name:
    raise InputError(f'{field}: {path!r} is an unfinished checkpoint (a save that did not complete)')
  if name.isdigit() and storage.isdir(storage.dirname(path)):
    root, step = storage.dirname(path), int(name)
    if step not in _complete_steps(root):
      raise InputError(f'{field}: {path!r} is not a complete jaxsft checkpoint (no state/ and meta/ in it)')
    return root, step
  root = path if name == CHECKPOINTS else root_of(path)
  steps = _complete_steps(root)
  if not steps:
    raise InputError(f'{field}: no complete checkpoint in {root!r}')
  return root, steps[-1]


def verify(root: str, step: int) -> str | None:
  """One line saying why checkpoint `step` is corrupted, or None if its files match their checksums.

  Every process calls it (each reads its share of the files). A checkpoint without checksums (written by a
  jaxsft before them) cannot be verified: it is accepted, with a warning.
  """
  directory = storage.join(root, str(step))
  if not integrity.has_checksums(directory):
    _log(f'warning: checkpoint {directory} has no {integrity.FILE} (an older jaxsft wrote it): not verified')
    return None
  problem = integrity.verify(directory, share=(jax.process_index(), jax.process_count()))
  problems = [p for p in distributed.gather_text(problem or '') if p]
  return f'checkpoint {directory!r} is corrupted: {problems[0]}' if problems else None


def newest_verified(root: str) -> int | None:
  """The newest complete checkpoint under `root` whose files match their checksums (see the module docstring).

  Raises InputError if there are checkpoints but none verifies: resuming would train on corrupted state.
  """
  steps = _complete_steps(root)
  problems = []
  for step in reversed(steps):
    problem = verify(root, step)
    if problem is None:
      if problems:
        _quarantine(root, steps[steps.index(step) + 1:])
        _log(f'falling back to checkpoint {step}, the newest that verifies')
      return step
    _log(f'warning: {problem}')
    problems.append(problem)
  if problems:
    raise InputError(f'{problems[0]}; no earlier checkpoint verifies ({len(problems)} checked): the run cannot '
                     'resume from this directory (move the checkpoints aside to start over)')
  return None


def _quarantine(root: str, steps: list[int]) -> None:
  """Renames corrupted checkpoints to STEP.corrupted (kept, never read again): the resumed run saves those steps
  anew, and Orbax does not write over an existing step."""
  if jax.process_index() == 0:
    for step in steps:
      target = storage.join(root, f'{step}.corrupted')
      n = 1
      while storage.exists(target):
        n += 1
        target = storage.join(root, f'{step}.corrupted-{n}')
      storage.rename(storage.join(root, str(step)), target)
      _log(f'moved the corrupted checkpoint {step} aside to {target}')
  distributed.gather_text('')  # Every process waits for the renames.


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def read_meta(root: str, step: int) -> dict:
  directory = storage.join(root, str(step))
  try:
    meta = json.loads(storage.read_text(storage.join(directory, 'meta', 'metadata')))
  except (OSError, ValueError) as e:
    raise InputError(f'checkpoint {directory!r}: cannot read its meta ({e})') from None
  if meta.get('format') != FORMAT:
    raise InputError(f'checkpoint {directory!r}: format {meta.get("format")!r}, '
                     f'this jaxsft reads format {FORMAT}')
  return meta


def abstract(arrays, shardings=None):
  """ShapeDtypeStructs (with the given shardings, else the arrays' own) to restore into."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), arrays)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), arrays, shardings)


def _flat(tree) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator='.'): leaf for path, leaf in leaves}


def check_compatible(where: str, saved_tree, target_tree) -> None:
  """Raises InputError naming the first array whose name, shape or dtype differs (another model's checkpoint)."""
  saved, target = _flat(saved_tree), _flat(target_tree)
  missing = sorted(set(target) - set(saved))
  extra = sorted(set(saved) - set(target))
  if missing or extra:
    what = f'lacks {missing[0]!r}' if missing else f'has {extra[0]!r}, which this model does not'
    raise InputError(f'checkpoint {where!r} does not fit this model: it {what} '
                     f'({len(missing)} arrays missing, {len(extra)} unexpected)')
  for name in sorted(target, key=lambda n: (not n.startswith('params.'), n)):  # Parameters first: clearer.
    got, want = saved[name], target[name]
    if tuple(got.shape) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
      raise InputError(f'checkpoint {where!r} does not fit this model: {name!r} is '
                       f'{np.dtype(got.dtype).name}{list(got.shape)} there, {np.dtype(want.dtype).name}'
                       f'{list(want.shape)} here')


class Manager:
  """Saves and restores the checkpoints of one run directory (every process calls every method)."""

  def __init__(self, root: str, *, max_to_keep: int | None = None, read_only: bool = False):
    self.root = root
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=not read_only, create=not read_only,
        read_only=read_only, cleanup_tmp_directories=not read_only,
        async_options=None if read_only else ocp.AsyncOptions(post_finalization_callback=self._write_checksums))
    handlers = {'state': ocp.PyTreeCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(storage.absolute(root), options=options, item_handlers=handlers)
    self._pending = None  # (step, time the save started) of the save being written in the background.
    self._saving_step = None  # The step of the newest save started (its checksums are written in the background).
    self.last_save = {}  # Timings of the last save: 'blocking_seconds', 'total_seconds', 'checksum_seconds'.

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def _write_checksums(self) -> None:
    """Orbax's post-finalization callback (background thread, primary process): the step's files are complete
    and still in their temporary directory (or in place, on a bucket, not yet committed)."""
    step = self._saving_step
    root = storage.absolute(self.root)
    found = sorted(n for n in storage.listdir(root) if n.startswith(f'{step}.orbax-checkpoint-tmp'))
    directory = storage.join(root, found[-1] if found else str(step))
    t0 = time.perf_counter()
    integrity.write(directory)
    self.last_save['checksum_seconds'] = time.perf_counter() - t0

  def save(self, step: int, state: dict, meta: dict) -> None:
    """Starts writing checkpoint `step` (after the previous one completes); raises CheckpointError if that failed."""
    self._finish_pending()
    meta = dict(meta, format=FORMAT, step=step)
    t0 = time.perf_counter()
    self._saving_step = step  # Read by the background thread (_write_checksums).
    try:
      self._manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds; all mean "not saved")
      raise CheckpointError(f'saving checkpoint {step} to {self.root!r} failed: '
                            f'{one_line(e, 485, typed=True, keep_end=True)}') from e
    self._pending = (step, t0)
    self.last_save = dict(self.last_save, step=step, blocking_seconds=time.perf_counter() - t0)
    self.last_save.pop('total_seconds', None)

  def wait(self) -> None:
    """Blocks until the background write is complete; raises CheckpointError if it failed."""
    self._finish_pending()

  def _finish_pending(self) -> None:
    if self._pending is None:
      return
    step, t0 = self._pending
    self._pending = None
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'writing checkpoint {step} to {self.root!r} failed: '
                            f'{one_line(e, 485, typed=True, keep_end=True)}') from e
    if step not in self._manager.all_steps():  # Some failures surface only as a missing step.
      raise CheckpointError(f'writing checkpoint {step} to {self.root!r} failed: it is not in the directory')
    self.last_save['total_seconds'] = time.perf_counter() - t0

  def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
    """(state, meta) of checkpoint `step`, its arrays placed per `abstract_state`'s shardings."""
    where = storage.join(self.root, str(step))
    meta = read_meta(self.root, step)
    saved = self._manager.item_metadata(step)['state']
    check_compatible(where, _tree(saved), abstract_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(state=_restore_args(abstract_state)))
    return restored['state'], meta

  def restore_params(self, step: int, abstract_params) -> Any:
    """The parameters alone (an export needs no optimizer state: a third of the bytes)."""
    where = storage.join(self.root, str(step))
    saved = self._manager.item_metadata(step)['state']
    check_compatible(where, _tree(saved)['params'], abstract_params)
    args = _restore_args({'params': abstract_params}, partial=True)
    return self._manager.restore(step, args=ocp.args.Composite(state=args))['state']['params']

  def close(self) -> None:
    """Waits for the background write (raising if it failed) and releases the manager."""
    try:
      self._finish_pending()
    finally:
      self._manager.close()


def _restore_args(item, *, partial: bool = False):
  return ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                partial_restore=partial)


def _tree(metadata):
  return metadata.tree if hasattr(metadata, 'tree') else metadata


# Config fields that do not change what is computed: a resumed run may change them freely (jaxsft/fields.py marks
# them `harmless`). Every other field (model, data, optimizer, schedule, batch, precision, seed) must equal the
# checkpoint's unless named in `resume_allow_changes`.
HARMLESS_FIELDS = fields.HARMLESS_FIELDS


def _flatten_config(config: dict, prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in config.items():
    if key == 'resolved':
      continue
    if isinstance(value, dict) and key in ('mesh', 'model'):
      flat.update(_flatten_config(value, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = value
  return flat


def config_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
  """{field: (checkpoint value, current value)} for the fields that change the math of the run.

  `saved` and `current` are resolved configs (config.json's content), with 'resolved' holding the derived
  'global_batch_size' and 'data_fingerprint', which are compared too.
  """
  a, b = _flatten_config(saved), _flatten_config(current)
  for derived in ('global_batch_size', 'data_fingerprint'):
    a[derived] = saved.get('resolved', {}).get(derived)
    b[derived] = current.get('resolved', {}).get(derived)
  changes = {}
  for key in sorted(set(a) | set(b)):
    if key not in HARMLESS_FIELDS and a.get(key) != b.get(key):
      changes[key] = (a.get(key), b.get(key))
  return changes


def check_config(where: str, saved: dict, current: dict, allow: str | None) -> list[str]:
  """Raises InputError naming the math-changing fields that differ from the checkpoint's, unless allowed.

  Returns the allowed changes (for the log).
  """
  allowed = {f.strip() for f in (allow or '').split(',') if f.strip()}
  changes = config_changes(saved, current)
  refused = {k: v for k, v in changes.items() if k not in allowed and 'all' not in allowed}
  if refused:
    listed = ', '.join(f'{k} ({_short(a)} -> {_short(b)})' for k, (a, b) in refused.items())
    raise InputError(f'cannot resume from {where!r}: config fields that change the training differ from the '
                     f'checkpoint: {listed}; set --config.resume_allow_changes={",".join(refused)} to resume anyway')
  return [f'{k} ({_short(a)} -> {_short(b)})' for k, (a, b) in changes.items()]


def _short(value) -> str:
  text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
  return text if len(text) <= 60 else text[:57] + '...'


def abstract_host(arrays):
  """ShapeDtypeStructs without shardings: orbax restores them as host numpy arrays (no device memory)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), arrays)
