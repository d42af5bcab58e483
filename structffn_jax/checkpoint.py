"""Orbax checkpoints of a run: model + optimizer state, and a JSON record of where the run is.

A checkpoint holds everything a resumed run needs to continue exactly: parameters, optimizer state
(which carries the self-guided step and α), the step, and whether the guides were already dropped.
The data position is a pure function of the step (see `data.pipeline.BatchStream`), so it is saved
implicitly and restored exactly.

Arrays are saved sharded: with several processes every one writes its shards (Orbax coordinates
them) and process 0 the metadata. A restore reads into whatever shardings its target asks for, so
a run saved on one mesh resumes on another (`mesh.*` may change between a run and its resumption).

Saves are asynchronous: a checkpoint becomes final a few steps after it is started. `poll()` says
when it did (and how long it took), and raises `CheckpointError` for a save that failed (a full
disk), so a run stops at the next step instead of training on without a checkpoint. A restore
tries the newest checkpoint first; one that cannot be read is moved aside to
`<step>.corrupt-<time>` (never deleted) once an older one restored.
A checkpoint whose loss is not finite is set aside the same way (`set_aside_non_finite`).
A full disk met by any write of a run is reported in one line naming the last good checkpoint
(`disk_full_in_one_line`).

The rest of the workdir (config.json, the lock, disk-space messages) is `workdir.py`'s.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import math
import pathlib
import sys
import time

import jax
import orbax.checkpoint as ocp

from structffn_jax import distributed, schema
from structffn_jax.workdir import free_space, is_disk_full, saved_steps, why


class CheckpointError(RuntimeError):
  """A checkpoint could not be written, or none of a run's checkpoints can be read."""


def last_good(workdir, failed_step: int | None = None) -> str:
  """The free space, the last good checkpoint of `workdir` (any but `failed_step`) and how to
  resume: the end of every one-line report of a failed write."""
  workdir = pathlib.Path(workdir)
  good = [s for s in saved_steps(workdir) if s != failed_step]
  path = (workdir / 'checkpoints').absolute() / str(good[-1]) if good else None
  last = (f'step {good[-1]} ({path}), intact' if good else
          'none yet (the run would start from step 0)')
  return (f'{free_space(workdir)} in {workdir}. The last good checkpoint: {last}. '
          f'Free space (or lower train.keep_ckpts) and run the same command to resume.')


def disk_full(workdir, e: OSError) -> str:
  """The one-line report of a write into `workdir` (metrics, TensorBoard, the config, the lock)
  that found the disk full."""
  where = getattr(e, 'filename', None) or workdir
  return f'{where} could not be written ({why(e)}); {last_good(workdir)}'


@contextlib.contextmanager
def disk_full_in_one_line(workdir, *, first=None):
  """A full disk met by any write into `workdir` (metrics, TensorBoard, config.json, the lock, a
  checkpoint) raised as a CheckpointError with the one-line report of `disk_full`. `first`:
  called before that report (the save in flight made final or failed, so that it names the last
  good checkpoint); what it raises is dropped."""
  try:
    yield
  except OSError as e:
    if not is_disk_full(e):
      raise
    if first is not None:
      with contextlib.suppress(Exception):
        first()
    raise CheckpointError(disk_full(workdir, e)) from None


# ----------------------------------------------------------------------------- Orbax


class _OrbaxFailureFilter(logging.Filter):
  """Drops Orbax's own error tracebacks (and asyncio's 'Task exception was never retrieved' for
  its writes): `Checkpointer` reports a failed save or restore itself, in one line."""

  def filter(self, record):
    if record.levelno < logging.ERROR:
      return not record.getMessage().startswith('Given directory is read only')
    if '/orbax/' in (record.pathname or ''):
      return False
    return not _from_orbax(record.exc_info[1] if record.exc_info else None)


_FILTER = _OrbaxFailureFilter()


def _from_orbax(exc: BaseException | None, obj=None) -> bool:
  code = getattr(obj, 'cr_code', None)
  if code is not None and ('/orbax/' in code.co_filename or '/tensorstore/' in code.co_filename):
    return True
  tb = exc.__traceback__ if exc is not None else None
  while tb is not None:
    name = tb.tb_frame.f_code.co_filename
    if '/orbax/' in name or '/tensorstore/' in name:
      return True
    tb = tb.tb_next
  return False


def _quiet_hook(previous):
  def hook(unraisable):
    exc = unraisable.exc_value
    if _from_orbax(exc, unraisable.object):
      return
    if isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed':
      return  # a write of a failed save, finishing after its event loop was closed
    previous(unraisable)
  hook.quiet = True
  return hook


@contextlib.contextmanager
def _quiet_unraisable():
  """Drop 'Exception ignored in <coroutine ...>' for the reads a failed restore left behind
  (they are collected here, while the hook is in place); the failure itself is reported."""
  previous = sys.unraisablehook
  sys.unraisablehook = _quiet_hook(previous)
  try:
    yield
  finally:
    gc.collect()
    sys.unraisablehook = previous


def _raise_interrupt(e: BaseException) -> None:
  """Raise the KeyboardInterrupt (or SystemExit) that `e` came from, if it came from one.

  A signal that lands inside Orbax's reads or writes (Ctrl-C, or SIGTERM in the trainer's
  start-up, which raises a KeyboardInterrupt) can come out of them as a plain Exception whose
  cause or context is the interrupt. Then the checkpoint is not unreadable and the save has not
  failed: the program was asked to stop, and stops."""
  inner, seen = e, set()
  while inner is not None and id(inner) not in seen:
    if not isinstance(inner, Exception):
      raise inner from None
    seen.add(id(inner))
    inner = inner.__cause__ or inner.__context__


def _quiet_unraisable_from_now():
  """From the trainer's first Checkpointer on: what the writes of a failed save raise as they
  finish in Orbax's threads (before `poll` notices the failure) is dropped, not printed; the
  failure itself is reported by `poll` in one line."""
  if not getattr(sys.unraisablehook, 'quiet', False):
    sys.unraisablehook = _quiet_hook(sys.unraisablehook)


def _quiet_orbax_failures():
  for name in ('absl', 'asyncio'):
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
      logger.addFilter(_FILTER)


def lower_lr(peak_lr: float) -> str:
  """The peak_lr the non-finite-loss advice suggests: a tenth of the run's, always a finite
  positive number (the schema's default when the run's is not one)."""
  lr = peak_lr / 10 if math.isfinite(peak_lr) and peak_lr > 0 else 0.0
  if not lr > 0:  # not finite, not positive, or so small that a tenth of it is 0
    lr = schema.base_config().train.peak_lr
  return f'{lr:.3g}'


class Checkpointer:
  """Async Orbax checkpoints under <workdir>/checkpoints, keeping the newest `keep`.

  `read_only`: for commands that only read a run (evaluate, generate): nothing is created or
  moved. `cleanup`: for the trainer holding the workdir's lock only: remove what saves cut short
  left behind (`<step>.orbax-checkpoint-tmp*`), which a reader beside a trainer must not do.
  """

  def __init__(self, workdir: pathlib.Path, keep: int, *, read_only: bool = False,
               cleanup: bool = False, log=print):
    _quiet_orbax_failures()
    if not read_only:
      _quiet_unraisable_from_now()
    self.workdir = pathlib.Path(workdir)
    self.directory = (self.workdir / 'checkpoints').absolute()
    self.read_only = read_only
    self.log = log
    self._pending = None  # (step, start time) of the save in flight
    self._failed = False
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max(1, keep),
            save_interval_steps=0 if read_only else 1, enable_async_checkpointing=True,
            create=not read_only, read_only=read_only,
            cleanup_tmp_directories=cleanup and not read_only))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def path(self, step: int) -> pathlib.Path:
    return self.directory / str(step)

  # --------------------------------------------------------------------------- save

  def save(self, step: int, state, meta: dict) -> None:
    """Start an async save of `state` at `step` (after the previous one is final)."""
    if step in self.manager.all_steps():
      return
    self.poll(block=True)
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # pylint: disable=broad-except
      _raise_interrupt(e)
      self._failed = True
      _quiet_unraisable_from_now()
      raise CheckpointError(self.save_failed(step, e)) from None
    self._pending = (step, time.perf_counter())

  def poll(self, block: bool = False) -> dict | None:
    """The outcome of the save in flight once it is final: {'step', 'seconds'}; None while it
    runs (unless `block`) or when none is pending. Raises CheckpointError if it failed."""
    if self._pending is None:
      return None
    if not block and self.manager.is_saving_in_progress():
      return None
    step, start = self._pending
    self._pending = None
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      _raise_interrupt(e)
      self._failed = True
      _quiet_unraisable_from_now()
      raise CheckpointError(self.save_failed(step, e)) from None
    return {'step': step, 'seconds': time.perf_counter() - start}

  def save_failed(self, step: int, e: BaseException) -> str:
    """The one-line report of a save that failed: the workdir, its free space, the last good
    checkpoint (the previous ones are untouched: Orbax only removes them after a save is final)."""
    return (f'checkpoint step {step} could not be written to {self.directory} ({why(e)}); '
            f'{self._last_good(step)}')

  def disk_full(self, e: OSError) -> str:
    """The one-line report of a write into the workdir (metrics, TensorBoard) that found the
    disk full."""
    return disk_full(self.workdir, e)

  def _last_good(self, failed_step: int | None = None) -> str:
    return last_good(self.workdir, failed_step)

  def wait(self) -> dict | None:
    """Block until the save in flight is final; its outcome as for `poll`."""
    return self.poll(block=True)

  # --------------------------------------------------------------------------- restore

  def meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore(self, step: int, like):
    """Restore the state at `step` into the structure, shapes and shardings of `like`.

    `like`: arrays, or `jax.ShapeDtypeStruct`s with `sharding=` (see `sharding.with_shardings`),
    which restores straight into place without building the state first.
    """
    abstract = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else ocp.utils.to_shape_dtype_struct(x),
        like)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out['state'], out['meta']

  def restore_newest(self, target):
    """(step, state, meta) of the newest checkpoint that restores; None when there is none.

    `target(meta)` gives the abstract state a checkpoint with that metadata restores into (it
    depends on whether the guides were dropped). A checkpoint that cannot be read is reported
    and skipped; once an older one restored, the unreadable newer ones are moved aside (unless
    read-only) so that the run saves anew at their steps. When none restores, CheckpointError,
    and nothing is moved: the cause may be this program rather than the files. A signal during a
    read is no reason to skip a checkpoint: its interrupt goes on (`_raise_interrupt`).
    """
    failed = []
    for step in reversed(self.steps()):
      error = None
      try:
        with _quiet_unraisable():
          meta = self.meta(step)
          state, meta = self.restore(step, target(meta))
      except Exception as e:  # pylint: disable=broad-except
        _raise_interrupt(e)  # a signal during the read: the checkpoint may be fine
        error = why(e)
      if distributed.agree(error is not None):
        error = error or 'unreadable on another process'
        failed.append((step, error))
        self.log(f'checkpoint step {step} at {self.path(step)} cannot be restored ({error}); '
                 f'trying the one before')
        continue
      for bad, _ in failed:
        if self.read_only:
          self.log(f'note: skipped the unreadable checkpoint step {bad} ({self.path(bad)})')
        else:
          moved = self.move_aside(bad, 'corrupt')
          self.log(f'checkpoint step {bad}: moved aside to {moved}; resuming from step {step}')
      return step, state, meta
    if failed:
      shown = '; '.join(f'step {s}: {e}' for s, e in failed)
      raise CheckpointError(f'no checkpoint in {self.directory} can be restored ({shown}); '
                            f'nothing was moved. Use a new --workdir, or move the unreadable '
                            f'steps aside to start this one from step 0.')
    return None

  def move_aside(self, step: int, why_tag: str) -> pathlib.Path:
    """Rename checkpoint `step` to `<step>.<why_tag>-<UTC time>` (process 0; all wait), so that
    it is kept but no longer restored; the run saves anew at that step."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%S')
    target = self.directory / f'{step}.{why_tag}-{stamp}'
    if jax.process_index() == 0 and self.path(step).exists():
      n = 1
      while target.exists():
        target = self.directory / f'{step}.{why_tag}-{stamp}-{n}'
        n += 1
      self.path(step).rename(target)
    distributed.barrier(f'checkpoint {step} moved aside')
    self.manager.reload()
    return target

  def set_aside_non_finite(self, step: int, loss: float, peak_lr: float) -> str:
    """Set aside the checkpoints that cannot lead anywhere and say how to resume.

    The loss of step s is computed from the parameters after step s - 1, so a checkpoint of step
    s - 1 (or later) reproduces it whatever the learning rate: it is moved aside (kept, not
    restored). The one before gave a finite loss; a resume from it with a lower peak_lr (allowed
    by --allow-change) takes another path. `peak_lr`: the run's train.peak_lr, for the advice.
    """
    with contextlib.suppress(CheckpointError):
      self.wait()
    moved = [(s, self.move_aside(s, 'nonfinite')) for s in self.steps() if s >= step - 1]
    good = self.steps()
    parts = [f'non-finite loss ({loss}) at step {step}; training stopped.']
    for s, path in moved:
      parts.append(f'Checkpoint step {s}, whose parameters gave that loss, was moved aside to '
                   f'{path}.')
    if good:
      parts.append(f'The last good checkpoint is step {good[-1]} in {self.directory}; to '
                   f'resume from it with a lower learning rate, run')
    else:
      parts.append('No good checkpoint was saved, so the run starts again from step 0; run')
    parts.append(f'the same command with --set train.peak_lr={lower_lr(peak_lr)} --allow-change '
                 f'train.peak_lr (or raise train.warmup_frac the same way).')
    return ' '.join(parts)

  def close(self, quiet: bool = False) -> None:
    """Wait for the save in flight and close. Quietly (errors dropped) after a failure already
    reported, or when `quiet` (the caller is raising another error)."""
    try:
      if self._failed or quiet:
        with contextlib.suppress(Exception):
          self.manager.wait_until_finished()
      else:
        self.poll(block=True)
    finally:
      with contextlib.suppress(Exception):
        self.manager.close()
