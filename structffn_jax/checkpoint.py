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

The workdir also keeps `config.json` (the run's identity, written once the run has started) and
`lock` (which trainer runs there). Starting a different config in a workdir that holds checkpoints
is an error naming the fields that differ, unless each is named by `--allow-change`; accepted
changes are appended to `config_history.jsonl`.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import gc
import json
import logging
import os
import pathlib
import shutil
import socket
import sys
import threading
import time

import jax
import ml_collections
import orbax.checkpoint as ocp

from structffn_jax import distributed, schema
from structffn_jax.errors import ConfigError

# Fields that may change between a run and its resumption without changing what is trained.
RUNTIME_FIELDS = ('train.eval_every', 'train.log_every', 'train.ckpt_every', 'train.keep_ckpts',
                  'train.profile_start', 'train.profile_steps', 'train.peak_flops',
                  'train.eval_batch', 'train.micro_batch', 'model.remat', 'data.data_dir',
                  'mesh.data', 'mesh.fsdp', 'mesh.tensor', 'mesh.rules', 'mesh.distributed',
                  'model.ffn.merge_threshold', 'model.ffn.implementation',
                  'model.attention.implementation', 'data.num_workers', 'log.wandb')
# What `--allow-change` may name: fields that change how the run goes on, not the shapes of the
# state in its checkpoints (model.* and sgt.* do).
CHANGEABLE = ('name', 'train.', 'data.')
HISTORY = 'config_history.jsonl'
LOCK = 'lock'


class CheckpointError(RuntimeError):
  """A checkpoint could not be written, or none of a run's checkpoints can be read."""


class WorkdirLocked(RuntimeError):
  """Another live trainer holds the workdir."""


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten(v, key + '.'))
    else:
      out[key] = v
  return out


def free_space(path) -> str:
  """'1.2 MiB free of 4.0 MiB' for the file system holding `path` (or its nearest parent)."""
  path = pathlib.Path(path).absolute()
  while not path.exists() and path != path.parent:
    path = path.parent
  try:
    usage = shutil.disk_usage(path)
  except OSError:
    return 'free space unknown'
  return f'{_size(usage.free)} free of {_size(usage.total)}'


def _size(n: float) -> str:
  if n < 1024:
    return f'{int(n)} B'
  for unit in ('KiB', 'MiB', 'GiB', 'TiB'):
    n /= 1024
    if n < 1024 or unit == 'TiB':
      break
  return f'{n:.1f} {unit}'


def is_disk_full(e: BaseException) -> bool:
  """True for an out-of-space or over-quota error (an OSError, or TensorStore's message)."""
  while e is not None:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    text = str(e)
    if 'No space left on device' in text or 'Disk quota exceeded' in text:
      return True
    e = e.__cause__ or e.__context__
  return False


def why(e: BaseException) -> str:
  """A one-line reason for `e`: its type and first line, TensorStore details cut."""
  if is_disk_full(e):
    return 'no space left on device'
  inner = e
  while inner.__cause__ is not None:
    inner = inner.__cause__
  text = (str(inner).strip().splitlines() or [''])[0]
  text = text.split(' See full TensorStore details')[0]
  if len(text) > 160:
    text = text[:157] + '...'
  return f'{type(inner).__name__}: {text}' if text else type(inner).__name__


# ----------------------------------------------------------------------------- the run's identity


def saved_steps(workdir) -> list[int]:
  """Steps of the final checkpoints under <workdir>/checkpoints (a directory per step)."""
  root = pathlib.Path(workdir) / 'checkpoints'
  if not root.is_dir():
    return []
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def _defaults() -> dict:
  return _flatten(json.loads(schema.base_config().to_json_best_effort()))


def check_allow_change(fields) -> tuple[str, ...]:
  """The `--allow-change` fields, each a changeable field of the schema (else ConfigError)."""
  known = _defaults()
  for field in fields:
    if field not in known:
      raise ConfigError(f'--allow-change {field}: no such config field.')
    if not field.startswith(CHANGEABLE) or field == 'train.seed':
      raise ConfigError(
          f'--allow-change {field}: model.*, sgt.* and train.seed fix the state in the '
          f'checkpoints and cannot change within a run; use a new --workdir.')
  return tuple(fields)


def check_workdir_config(workdir: pathlib.Path, config: ml_collections.ConfigDict, *,
                         allow_change=()) -> dict:
  """Compare `config` with the run already in `workdir` (its config.json); write nothing.

  Returns the accepted changes {field: (old, new)}: fields named in `allow_change`, or any field
  while the workdir holds no checkpoint (a first start that failed). Runtime fields may always
  change and are not listed. A field missing from an older config.json counts as its default.
  Anything else raises ValueError naming the fields; nothing is overwritten.
  """
  path = workdir / 'config.json'
  if not path.exists():
    return {}
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f'{path} cannot be read ({why(e)}); restore it, or use a new --workdir.') \
        from None
  old, new = _flatten(saved), _flatten(json.loads(config.to_json_best_effort()))
  defaults = _defaults()
  for k, v in defaults.items():  # fields added to the schema after the run started
    old.setdefault(k, v)
  differ = sorted(k for k in set(old) | set(new)
                  if old.get(k) != new.get(k) and k not in RUNTIME_FIELDS)
  if not differ:
    return {}
  changes = {k: (old.get(k), new.get(k)) for k in differ}
  if not saved_steps(workdir):
    return changes
  refused = [k for k in differ if k not in allow_change]
  if refused:
    shown = ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in refused[:6])
    raise ValueError(
        f'workdir {workdir} holds a run of another config ({shown}'
        f'{", ..." if len(refused) > 6 else ""}); use a new --workdir, the same config to '
        f'resume, or --allow-change FIELD to resume with a changed train.* or data.* field. '
        f'Nothing was overwritten.')
  return changes


def write_workdir_config(workdir: pathlib.Path, config: ml_collections.ConfigDict,
                         changes: dict | None = None, step: int | None = None,
                         reason: str = '') -> None:
  """Write config.json (atomically), and append the accepted `changes` to config_history.jsonl."""
  path = workdir / 'config.json'
  tmp = path.with_name(f'.{path.name}.tmp')
  tmp.write_text(json.dumps(json.loads(config.to_json_best_effort()), indent=2, sort_keys=True))
  tmp.replace(path)
  if changes:
    record = {'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
              'step': step, 'reason': reason,
              'changes': {k: [old, new] for k, (old, new) in changes.items()}}
    with open(workdir / HISTORY, 'a') as f:
      f.write(json.dumps(record) + '\n')


# ----------------------------------------------------------------------------- the workdir lock


def _start_ticks(pid: int) -> int | None:
  """When process `pid` started (clock ticks since boot, Linux), to tell a reused pid apart."""
  try:
    stat = pathlib.Path(f'/proc/{pid}/stat').read_text()
    return int(stat.rsplit(')', 1)[1].split()[19])
  except (OSError, ValueError, IndexError):
    return None


def _alive(holder: dict) -> bool:
  pid = holder.get('pid')
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's process: alive
  start = holder.get('start')
  return start is None or _start_ticks(pid) in (None, start)


class WorkdirLock:
  """<workdir>/lock: which trainer (pid, host) runs in a workdir; one trainer at a time.

  The file is created atomically and holds the holder's pid, host and start time; the holder
  touches it every HEARTBEAT_S seconds. A second trainer refuses with WorkdirLocked naming them.
  A lock is stale, and taken over, when its process is no longer running on this host (killed,
  crashed), or when it comes from another host (a job requeued elsewhere after a kill -9 or a
  node failure) and has not been touched for STALE_AFTER_S seconds.
  """

  HEARTBEAT_S = 60
  STALE_AFTER_S = 600

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.held = False
    self.took_over = None  # what was taken over: a line for the log
    self._stop = threading.Event()

  def _heartbeat(self):
    while not self._stop.wait(self.HEARTBEAT_S):
      with contextlib.suppress(OSError):
        os.utime(self.path)

  def _start_heartbeat(self):
    self.held = True
    threading.Thread(target=self._heartbeat, name='workdir-lock', daemon=True).start()

  def _age(self) -> float:
    try:
      return time.time() - self.path.stat().st_mtime
    except OSError:
      return 0.0

  @classmethod
  def acquire(cls, workdir: pathlib.Path) -> 'WorkdirLock':
    workdir.mkdir(parents=True, exist_ok=True)
    lock = cls(workdir / LOCK)
    me = {'pid': os.getpid(), 'host': socket.gethostname(), 'start': _start_ticks(os.getpid()),
          'since': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}
    tmp = workdir / f'.{LOCK}.{me["pid"]}.tmp'
    tmp.write_text(json.dumps(me))
    try:
      for _ in range(3):
        try:
          os.link(tmp, lock.path)  # fails if a lock exists: create-if-absent, complete contents
          lock._start_heartbeat()
          return lock
        except FileExistsError:
          pass
        holder = lock.holder()
        if holder is None:
          continue  # released meanwhile
        who = f'pid {holder.get("pid")} on host {holder.get("host")}'
        age = lock._age()
        if not holder:
          who, why_stale = 'an unreadable lock file', 'no holder to check'
        elif holder.get('host') != me['host']:
          if age < lock.STALE_AFTER_S:
            raise WorkdirLocked(
                f'workdir {workdir} is locked by a trainer ({who}, since {holder.get("since")}, '
                f'alive {age:.0f}s ago); stop it first, or use another --workdir. If that '
                f'process is gone, remove {lock.path} (or wait {lock.STALE_AFTER_S}s).')
          why_stale = f'not touched for {age:.0f}s'
        elif holder.get('pid') == me['pid']:
          raise WorkdirLocked(
              f'workdir {workdir} is in use by another Trainer of this process ({who}); call its '
              f'close() first.')
        elif _alive(holder):
          raise WorkdirLocked(
              f'workdir {workdir} is in use by another trainer ({who}, since '
              f'{holder.get("since")}); stop it first, or use another --workdir.')
        else:
          why_stale = 'no longer running'
        stale = lock.path.with_name(f'.{LOCK}.stale-{holder.get("pid")}')
        try:
          os.replace(lock.path, stale)
        except FileNotFoundError:
          continue
        lock.took_over = f'workdir lock: took over the stale lock of {who} ({why_stale})'
        stale.unlink(missing_ok=True)
      raise WorkdirLocked(f'workdir {workdir}: could not take {lock.path}; another trainer is '
                          f'starting there.')
    finally:
      tmp.unlink(missing_ok=True)

  def holder(self) -> dict | None:
    """The lock's contents (None when there is no lock)."""
    try:
      text = self.path.read_text()
    except FileNotFoundError:
      return None
    try:
      holder = json.loads(text)
      return holder if isinstance(holder, dict) else {}
    except ValueError:
      return {}  # unreadable: no live pid to check, so stale

  def release(self) -> None:
    if not self.held:
      return
    self.held = False
    self._stop.set()
    holder = self.holder()
    if holder and holder.get('pid') == os.getpid():
      self.path.unlink(missing_ok=True)


def lock_workdir(workdir: pathlib.Path) -> WorkdirLock | None:
  """Process 0 takes the workdir's lock; every process raises WorkdirLocked when it could not."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock.acquire(workdir)
    except WorkdirLocked as e:
      error = e
  if distributed.agree(error is not None):
    if lock is not None:
      lock.release()
    raise error or WorkdirLocked(f'workdir {workdir}: process 0 could not take its lock (see '
                                 f'its log).')
  return lock


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
    where = getattr(e, 'filename', None) or self.workdir
    return f'{where} could not be written ({why(e)}); {self._last_good()}'

  def _last_good(self, failed_step: int | None = None) -> str:
    good = [s for s in saved_steps(self.workdir) if s != failed_step]
    last = (f'step {good[-1]} ({self.path(good[-1])}), intact' if good else
            'none yet (the run would start from step 0)')
    return (f'{free_space(self.workdir)} in {self.workdir}. The last good checkpoint: {last}. '
            f'Free space (or lower train.keep_ckpts) and run the same command to resume.')

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
    and nothing is moved: the cause may be this program rather than the files.
    """
    failed = []
    for step in reversed(self.steps()):
      error = None
      try:
        with _quiet_unraisable():
          meta = self.meta(step)
          state, meta = self.restore(step, target(meta))
      except Exception as e:  # pylint: disable=broad-except
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
