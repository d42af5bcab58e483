"""Where a run reports: a progress line, metrics.jsonl, TensorBoard events, Weights & Biases
(optional), and MFU estimates."""

from __future__ import annotations

import json
import pathlib
import socket
import sys
import time

import jax

# Dense bf16 peak FLOP/s per device, for the MFU estimate (vendor datasheets, no sparsity).
PEAK_FLOPS = {
    'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L4': 121e12, 'A10': 125e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
    'TPU v6 lite': 918e12, 'TPU v6e': 918e12,
}


def peak_flops_per_device(override: float = 0.0) -> float | None:
  """Peak FLOP/s of one local device (None when unknown, e.g. on CPU)."""
  if override:
    return float(override)
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return None


def _duration(seconds: float) -> str:
  if not seconds == seconds or seconds == float('inf'):  # NaN or unknown
    return '?'
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


class Reporter:
  """Writes metrics from process 0 only; the others stay silent.

  Every writer (metrics.jsonl, TensorBoard, W&B) is opened on its first record, so that a run
  that fails before its first step leaves none of their files behind. A writer that fails (a
  full disk) raises once, from `write`; after that, and in `close`, it is dropped quietly: the
  first error is the one reported, and `close` always closes every writer (it raises the first
  error of a close only when nothing failed before)."""

  def __init__(self, workdir: pathlib.Path, total_steps: int, enabled: bool = True,
               config=None):
    self.enabled = enabled
    self.workdir = pathlib.Path(workdir)
    self.total_steps = total_steps
    self.config = config
    self.jsonl = None
    self.tb = None
    self.wandb = None  # WandbWriter when config.log.wandb is set
    self.failed = None  # the first error of a writer
    self._opened = False
    if enabled and WandbWriter.project_of(config):
      WandbWriter.package(WandbWriter.project_of(config))  # a missing package: now, not later

  def _open(self) -> None:
    self._opened = True
    path = self.workdir / 'metrics.jsonl'
    torn = path.exists() and path.stat().st_size and not _ends_with_newline(path)
    self.jsonl = open(path, 'a', buffering=1)  # pylint: disable=consider-using-with
    if torn:  # a kill cut the last record short: end it, so that the next one starts a line
      self.jsonl.write('\n')
    self.tb = TensorBoardWriter.create(self.workdir / 'tb')
    self.wandb = WandbWriter.from_config(self.config, self.workdir)

  def log(self, msg: str) -> None:
    if self.enabled:
      print(msg, flush=True, file=sys.stdout)

  def write(self, step: int, metrics: dict) -> None:
    """Append one record (step + scalars) to metrics.jsonl, TensorBoard and W&B."""
    if not self.enabled or self.failed is not None:
      return
    record = {'step': step, 'time': time.time(), **{k: _scalar(v) for k, v in metrics.items()}}
    try:
      if not self._opened:
        self._open()
      self.jsonl.write(json.dumps(record) + '\n')
      if self.tb is not None:
        self.tb.write(step, record)
      if self.wandb is not None:
        self.wandb.write(step, record)
    except Exception as e:
      self.failed = e
      raise

  def progress(self, step: int, m: dict, steps_per_s: float) -> None:
    eta = (self.total_steps - step) / steps_per_s if steps_per_s > 0 else float('nan')
    mfu = f'{100 * m["mfu"]:.1f}%' if m.get('mfu') is not None else 'n/a'
    alpha = f' α {m["alpha"]:.3f}' if 'alpha' in m else ''
    self.log(f'step {step:>6}/{self.total_steps}  loss {m["loss"]:.4f}{alpha}  '
             f'lr {m["lr"]:.2e}  {m["tokens_per_s"]:,.0f} tok/s  MFU {mfu}  '
             f'ETA {_duration(eta)}')

  def close(self, quiet: bool = False) -> None:
    """Close every writer, whatever each raises. Raises the first error of a close, unless a
    writer failed before (that error was raised already) or `quiet` (another one is on its
    way)."""
    first = None
    for writer in (self.jsonl, self.tb, self.wandb):
      if writer is None:
        continue
      try:
        writer.close()
      except Exception as e:  # pylint: disable=broad-except
        first = first or e
    self.jsonl = self.tb = self.wandb = None
    if first is not None and self.failed is None and not quiet:
      self.failed = first
      raise first


class TensorBoardWriter:
  """<workdir>/tb: one TensorBoard event file (tensorboardX's record format), written in the
  caller's thread and flushed after every record, so that a write that fails raises there and
  then, never from a thread of its own; `close` closes the file even when its last flush fails.
  """

  def __init__(self, logdir: pathlib.Path):
    # pylint: disable=import-outside-toplevel
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import RecordWriter
    from tensorboardX.summary import scalar
    self._event, self._scalar = event_pb2.Event, scalar
    logdir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    path, n = logdir / f'events.out.tfevents.{int(now)}.{socket.gethostname()}', 0
    while path.exists():  # a resume within the same second: a file of its own, none truncated
      n += 1
      path = path.with_name(f'events.out.tfevents.{int(now)}.{socket.gethostname()}.{n}')
    self.file = RecordWriter(str(path))
    self.file.write(self._event(wall_time=now, file_version='brain.Event:2').SerializeToString())

  @classmethod
  def create(cls, logdir: pathlib.Path) -> 'TensorBoardWriter | None':
    """A writer, or None when tensorboardX is not installed."""
    try:
      import tensorboardX  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      return None
    return cls(logdir)

  def write(self, step: int, record: dict) -> None:
    wall = record.get('time', time.time())
    for k, v in record.items():
      if k not in ('step', 'time') and isinstance(v, (int, float)):
        event = self._event(wall_time=wall, step=step, summary=self._scalar(k, v))
        self.file.write(event.SerializeToString())
    self.file.flush()

  def close(self) -> None:
    try:
      self.file.flush()
    finally:
      self.file.close()


class WandbWriter:
  """The Weights & Biases run of a workdir: the records of metrics.jsonl, each at its step.

  On when the config's `log.wandb` names a project ('' = off). The run id is kept in
  <workdir>/wandb_run_id, so that a resumed training continues the same W&B run; W&B's own files
  go under <workdir>/wandb. With WANDB_MODE=offline it needs no network (`wandb sync` uploads
  the run later).
  """

  ID_FILE = 'wandb_run_id'

  def __init__(self, project: str, workdir: pathlib.Path, config=None):
    import secrets  # pylint: disable=import-outside-toplevel
    wandb = self.package(project)
    id_path = pathlib.Path(workdir) / self.ID_FILE
    run_id = id_path.read_text().strip() if id_path.is_file() else secrets.token_hex(4)
    id_path.write_text(run_id + '\n')
    self.run = wandb.init(project=project, id=run_id, resume='allow', dir=str(workdir),
                          name=config.get('name') if config is not None else None,
                          config=config.to_dict() if config is not None else None)

  @staticmethod
  def package(project: str):
    """The wandb module; a ValueError naming `log.wandb` when it is not installed."""
    try:
      import wandb  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ValueError(f"log.wandb={project!r}: the wandb package is not installed; pip install "
                       "'.[wandb]', or set log.wandb='' to log without it.") from None
    return wandb

  @staticmethod
  def project_of(config) -> str:
    return (config.get('log') or {}).get('wandb', '') if config is not None else ''

  @classmethod
  def from_config(cls, config, workdir) -> 'WandbWriter | None':
    """A writer when `config.log.wandb` names a project, else None."""
    project = cls.project_of(config)
    return cls(project, workdir, config) if project else None

  def write(self, step: int, record: dict) -> None:
    scalars = {k: v for k, v in record.items() if k not in ('step', 'time')
               and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if scalars:
      self.run.log(scalars, step=step)

  def close(self) -> None:
    run, self.run = self.run, None
    if run is not None:
      run.finish()


def _scalar(v):
  try:
    return float(v)
  except (TypeError, ValueError):
    return v


def _ends_with_newline(path: pathlib.Path) -> bool:
  with open(path, 'rb') as f:
    f.seek(-1, 2)
    return f.read(1) == b'\n'


def read_jsonl(path, what: str = 'record', check=None) -> list[dict]:
  """The JSON objects of a JSON-lines file, one a line. A line that is not one (the partial
  record a kill leaves at the end, or in the middle once a resumed run appended after it) is
  skipped with a warning on stderr naming the file and line. `check(record)`: why a record of
  the right syntax cannot be used (None when it can); such lines are skipped the same way."""
  path = pathlib.Path(path)
  records, torn, wrong = [], [], []
  for number, line in enumerate(path.read_text(errors='replace').splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      record = None
    if not isinstance(record, dict):
      torn.append(number)
    elif check is not None and check(record):
      wrong.append(f'line {number}: {check(record)}')
    else:
      records.append(record)
  if torn:
    shown = ', '.join(map(str, torn[:5])) + (', ...' if len(torn) > 5 else '')
    print(f'warning: {path}: skipped {len(torn)} incomplete {what} line(s) (line {shown}; a '
          f'write cut short, e.g. by a kill)', file=sys.stderr)
  if wrong:
    print(f'warning: {path}: skipped {len(wrong)} {what} line(s) of the wrong type ('
          f'{"; ".join(wrong[:3])}{"; ..." if len(wrong) > 3 else ""}); fix or delete them',
          file=sys.stderr)
  return records


# The fields of a metrics record that are read back (plots, studies), and the types they need.
_NUMERIC_FIELDS = ('loss', 'valid_loss', 'tokens', 'train_flops')


def metrics_record_error(record: dict) -> str | None:
  """Why a metrics record cannot be read back (None when it can): its step must be an integer,
  its loss, valid_loss, tokens and train_flops numbers (a hand-edited '"step": "61"' is not)."""
  step = record.get('step')
  if isinstance(step, bool) or not isinstance(step, int):
    return f'step={step!r} is not an integer'
  for field in _NUMERIC_FIELDS:
    value = record.get(field, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return f'{field}={value!r} is not a number'
  return None


def read_metrics(workdir) -> list[dict]:
  """All records of <workdir>/metrics.jsonl (the last record of a step wins on resume); a line
  that is not a usable record is skipped with a warning."""
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    raise FileNotFoundError(f'{path}: no metrics; is {workdir} a training workdir?')
  return read_jsonl(path, 'metrics', check=metrics_record_error)
