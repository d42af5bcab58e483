"""The workdir of a run: its identity, its lock, and what a full disk leaves of it.

  config.json           the run's config, written once the run has started. Starting another
                        config in a workdir that holds checkpoints is an error naming the fields
                        that differ, unless each is named by `--allow-change`; which fields may
                        change at all is the schema's (`schema.resume_change`).
  config_history.jsonl  the accepted changes, one line per resumption that made any.
  data_identity.json    what the run trains on (`Manifest.identity`: the tokenizer's sha256 and
                        the train rows' hash), compared on resume like a config field: another
                        tokenizer or other data is refused unless named by `--allow-change`
                        (`data.tokenizer_sha256`, `data.train_sha256`), and then recorded.
  lock                  which trainer (pid, host) runs there, touched by a heartbeat; a stale one
                        (its process gone, or silent from another host) is taken over.

The checkpoints themselves (Orbax, the fallback to an older one, setting one aside) are
`checkpoint.py`'s; its messages for a failed write read `free_space`, `why` and `saved_steps`
from here.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import pathlib
import shutil
import socket
import threading
import time

import jax
import ml_collections

from structffn_jax import distributed, schema
from structffn_jax.errors import ConfigError

HISTORY = 'config_history.jsonl'
DATA_IDENTITY = 'data_identity.json'
# The fields of the data's identity (not config fields: `Manifest.identity`).
IDENTITY_FIELDS = ('data.tokenizer_sha256', 'data.train_sha256')
LOCK = 'lock'


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
    if field not in known and field not in IDENTITY_FIELDS:
      raise ConfigError(f'--allow-change {field}: no such config field.')
    if schema.resume_change(field) == 'fixed':
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
                  if old.get(k) != new.get(k) and schema.resume_change(k) != 'free')
  if not differ:
    return {}
  changes = {k: (old.get(k), new.get(k)) for k in differ}
  if not saved_steps(workdir):
    return changes
  _refuse(workdir, 'of another config', changes, allow_change)
  return changes


def _refuse(workdir, what: str, changes: dict, allow_change) -> None:
  refused = [k for k in changes if k not in allow_change]
  if refused:
    shown = ', '.join(f'{k}: {changes[k][0]!r} -> {changes[k][1]!r}' for k in refused[:6])
    raise ValueError(
        f'workdir {workdir} holds a run {what} ({shown}'
        f'{", ..." if len(refused) > 6 else ""}); use a new --workdir, the same config to '
        f'resume, or --allow-change FIELD to resume with a changed train.* or data.* field. '
        f'Nothing was overwritten.')


def check_data_identity(workdir: pathlib.Path, identity: dict, *, allow_change=()) -> dict:
  """Compare the identity of the run's data (`Manifest.identity`) with the one the run in
  `workdir` trained on (data_identity.json); write nothing. Returns the accepted changes, as
  `check_workdir_config` does: named in `allow_change`, or any while the workdir holds no
  checkpoint. A workdir without the file (a run older than it) accepts any."""
  path = workdir / DATA_IDENTITY
  try:
    saved = json.loads(path.read_text())
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as e:
    raise ValueError(f'{path} cannot be read ({why(e)}); restore it, or use a new --workdir.') \
        from None
  changes = {k: (saved.get(k), v) for k, v in identity.items()
             if k in saved and saved.get(k) != v}
  if changes and saved_steps(workdir):
    _refuse(workdir, 'trained on other data (another tokenizer or other train rows, e.g. from '
            'another data.data_dir)', changes, allow_change)
  return changes


def write_workdir_config(workdir: pathlib.Path, config: ml_collections.ConfigDict,
                         changes: dict | None = None, step: int | None = None,
                         reason: str = '', data_identity: dict | None = None) -> None:
  """Write config.json (and data_identity.json, when given) atomically, and append the accepted
  `changes` to config_history.jsonl.

  A write that fails (a full disk) leaves each as it was: the old config.json, the history
  without a partial line."""
  _write_atomic(workdir / 'config.json',
                json.dumps(json.loads(config.to_json_best_effort()), indent=2, sort_keys=True))
  if data_identity:
    _write_atomic(workdir / DATA_IDENTITY, json.dumps(data_identity, indent=2, sort_keys=True))
  if changes:
    record = {'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
              'step': step, 'reason': reason,
              'changes': {k: [old, new] for k, (old, new) in changes.items()}}
    append_line(workdir / HISTORY, json.dumps(record))


def _write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(f'.{path.name}.tmp')
  try:
    with open(tmp, 'w') as f:
      f.write(text)
    tmp.replace(path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def append_line(path: pathlib.Path, line: str) -> None:
  """Append `line` and a newline to `path`, all or nothing: a write or close that fails (a full
  disk) cuts the file back to its old length before the error is raised."""
  size = path.stat().st_size if path.exists() else 0
  f = open(path, 'a')  # pylint: disable=consider-using-with
  try:
    f.write(line + '\n')
    f.close()
  except BaseException:
    with contextlib.suppress(OSError):
      f.close()  # the file is closed even when its last flush fails
    with contextlib.suppress(OSError):
      os.truncate(path, size)
    raise


def record_start(workdir: pathlib.Path, config: ml_collections.ConfigDict, changes: dict,
                 step: int, *, log=print, write: bool = True,
                 data_identity: dict | None = None) -> None:
  """Once the run has started (at `step`): log the accepted `changes` (from
  `check_workdir_config` and `check_data_identity`) and, where `write` (process 0), write
  config.json, data_identity.json and the history."""
  reason = ''
  if changes:
    reason = ('allowed by --allow-change' if step else
              'no checkpoint yet: the run starts from step 0 with the new config')
    shown = ', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changes.items())
    log(f'config changed ({shown}): {reason}')
  if write:
    write_workdir_config(workdir, config, changes, step, reason, data_identity)


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
    try:
      with open(tmp, 'w') as f:  # a full disk: the error, and no temporary file left
        f.write(json.dumps(me))
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
    try:
      holder = self.holder()
    except OSError:  # unreadable: remove it only if it is certainly this trainer's
      return
    if holder and holder.get('pid') == os.getpid():
      self.path.unlink(missing_ok=True)


def close_then_release(closes, lock: WorkdirLock | None) -> list[Exception]:
  """Call each of `closes` whatever the one before raised, then release `lock` (always, an
  interrupt included); the errors they raised, in order: the first is the one to report."""
  errors = []
  try:
    for close in closes:
      try:
        close()
      except Exception as e:  # pylint: disable=broad-except
        errors.append(e)
  finally:
    if lock is not None:
      lock.release()
  return errors


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
