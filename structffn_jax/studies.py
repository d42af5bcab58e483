"""Runs of a study, read from their workdirs: status, final losses, loss spikes, wall and CPU time.

`launch/sweep.py` uses this to skip finished runs, resume unfinished ones and record failures;
`structffn_jax.scaling` and the study reports in RESULTS.md read runs through it. A run is
*finished* when metrics.jsonl holds the final evaluation at the last step of its plan, *failed*
when its last attempt exited non-zero without finishing (`<workdir>/sweep.json` keeps the exit
status and the error line; a non-finite loss is reported as *diverged*), *partial* when it has
records but neither, and *new* otherwise.

A finished run's record (`record_run`: config.json, sweep.json and metrics.jsonl, gzipped) is a
small copy of its workdir without checkpoints, kept with a study's results; every reader here
takes a record where it takes a workdir.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import pathlib
import resource
import shutil
import subprocess
import time

import numpy as np

from structffn_jax import accounting, metrics, sgt

SWEEP_FILE = 'sweep.json'
LOG_FILE = 'train.log'
# A spike: a step whose training loss exceeds the lowest loss of the up to SPIKE_WINDOW steps
# before it by more than SPIKE_NATS. Consecutive spiking steps count as one. The minimum, not the
# mean, is the reference, so that a spike inside the steep initial drop is not hidden by the
# higher losses of the steps before it.
SPIKE_WINDOW = 8
SPIKE_NATS = 0.5
METRICS = 'metrics.jsonl'
RECORD_FILES = ('config.json', SWEEP_FILE)


def duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


@dataclasses.dataclass
class Status:
  state: str  # 'new' | 'partial' | 'finished' | 'failed'
  step: int  # last step with a record
  total: int  # steps of the run's plan
  note: str = ''  # the error line of a failed run

  @property
  def diverged(self) -> bool:
    return self.state == 'failed' and 'non-finite' in self.note

  def describe(self) -> str:
    if self.state == 'failed':
      return f'{"diverged" if self.diverged else "failed"} at step {self.step}/{self.total}: ' \
          f'{self.note}'
    return f'{self.state} ({self.step}/{self.total} steps)'


def records(workdir) -> list[dict]:
  """metrics.jsonl of `workdir`, or the gzipped copy of a record ([] when there is none yet)."""
  workdir = pathlib.Path(workdir)
  if (workdir / METRICS).exists():
    return metrics.read_metrics(workdir)
  packed = workdir / (METRICS + '.gz')
  if packed.exists():
    lines = gzip.decompress(packed.read_bytes()).decode().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
  return []


def record_run(workdir, record_dir) -> pathlib.Path:
  """Copy a run's config.json, sweep.json and metrics (gzipped) to <record_dir>/<name>: what the
  study reports read, without the checkpoints."""
  workdir = pathlib.Path(workdir)
  dest = pathlib.Path(record_dir) / workdir.name
  dest.mkdir(parents=True, exist_ok=True)
  for name in RECORD_FILES:
    if (workdir / name).exists():
      shutil.copyfile(workdir / name, dest / name)
  # mtime 0: the same metrics give the same bytes, so a rerun of the copy changes nothing.
  metrics = workdir / METRICS
  if metrics.exists():
    (dest / (METRICS + '.gz')).write_bytes(gzip.compress(metrics.read_bytes(), mtime=0))
  return dest


def run_status(config, workdir) -> Status:
  """Where the run of `config` in `workdir` stands (see the module docstring)."""
  workdir = pathlib.Path(workdir)
  total = sgt.step_counts(config).total
  recs = records(workdir)
  step = max((int(r['step']) for r in recs), default=0)
  if any(int(r['step']) == total and 'valid_loss' in r for r in recs):
    return Status('finished', step, total)
  sweep = workdir / SWEEP_FILE
  if sweep.exists():
    info = json.loads(sweep.read_text())
    if info.get('exit', 0) != 0:
      return Status('failed', step, total, info.get('error', ''))
  return Status('partial' if recs else 'new', step, total)


def run_logged(cmd: list[str], workdir, cwd=None) -> tuple[int, float]:
  """Run `cmd`, its output appended to <workdir>/train.log; record the outcome in sweep.json."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  start, cpu_start = time.time(), _children_cpu()
  with open(workdir / LOG_FILE, 'ab') as log:
    rc = subprocess.call(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
  wall, cpu = time.time() - start, _children_cpu() - cpu_start
  lines = (workdir / LOG_FILE).read_text(errors='replace').splitlines()
  errors = [line for line in lines if line.startswith('error:')]
  sweep = workdir / SWEEP_FILE
  history = json.loads(sweep.read_text()).get('attempts', []) if sweep.exists() else []
  history.append({'exit': rc, 'wall_s': round(wall, 1), 'cpu_s': round(cpu, 1),
                  'ended': time.strftime('%FT%T')})
  sweep.write_text(json.dumps({
      'exit': rc, 'error': errors[-1][len('error: '):] if (rc and errors) else
      (f'exit status {rc}' if rc else ''),
      'wall_s': round(sum(a['wall_s'] for a in history), 1),
      'cpu_s': round(sum(a.get('cpu_s', 0.0) for a in history), 1), 'attempts': history},
      indent=1))
  return rc, wall


def _children_cpu() -> float:
  """User + system CPU seconds of this process's finished children (all cores counted)."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def wall_seconds(workdir) -> float | None:
  """Wall time of every attempt of the run, as the sweep recorded it (None: not run by a sweep)."""
  sweep = pathlib.Path(workdir) / SWEEP_FILE
  return json.loads(sweep.read_text()).get('wall_s') if sweep.exists() else None


def cpu_seconds(workdir) -> float | None:
  """CPU time (user + system, every core) of every attempt, as the sweep recorded it (None: not
  run by a sweep, or by one that did not record it)."""
  sweep = pathlib.Path(workdir) / SWEEP_FILE
  return json.loads(sweep.read_text()).get('cpu_s') if sweep.exists() else None


def train_losses(recs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
  """(steps, training losses) of every step with a loss, the last record of a step winning."""
  by_step = {int(r['step']): float(r['loss']) for r in recs if 'loss' in r}
  steps = np.array(sorted(by_step), dtype=np.int64)
  return steps, np.array([by_step[s] for s in steps])


def spike_steps(losses: np.ndarray, window: int = SPIKE_WINDOW,
                nats: float = SPIKE_NATS) -> list[int]:
  """Indices where a spike starts: a run of steps whose loss exceeds the lowest loss of the up to
  `window` steps before it by more than `nats` (from the second step on, so the warm-up's
  steep drop counts)."""
  starts, inside = [], False
  for t in range(1, len(losses)):
    high = bool(losses[t] > losses[max(0, t - window):t].min() + nats)
    if high and not inside:
      starts.append(t)
    inside = high
  return starts


def count_spikes(losses: np.ndarray, window: int = SPIKE_WINDOW, nats: float = SPIKE_NATS) -> int:
  """The number of spikes in a training-loss curve (`spike_steps`)."""
  return len(spike_steps(losses, window, nats))


def final(recs: list[dict], key: str = 'valid_loss'):
  """The last record's value of `key` (None when no record has it)."""
  values = [r[key] for r in recs if key in r]
  return values[-1] if values else None


def summary_rows(runs) -> list[dict]:
  """One row per (config, workdir, ...) of a sweep: status, steps, tokens, FLOPs, losses, wall."""
  rows = []
  for config, workdir, *_ in runs:
    status = run_status(config, workdir)
    recs = records(workdir)
    _, losses = train_losses(recs)
    wall = wall_seconds(workdir)
    rows.append({
        'run': config.name,
        'status': 'diverged' if status.diverged else status.state,
        'steps': f'{status.step}/{status.total}',
        'tokens': status.step * accounting.tokens_per_step(config),
        # What the trainer counted (metrics.jsonl), the run's steps as trained.
        'train_flops': final(recs, 'train_flops') if status.state == 'finished' else None,
        'valid_loss': final(recs),
        'spikes': count_spikes(losses) if len(losses) else None,
        'wall': duration(wall) if wall is not None else '',
        'cpu': duration(cpu_seconds(workdir)) if cpu_seconds(workdir) is not None else '',
    })
  return rows


def format_table(rows: list[dict]) -> str:
  """Rows of equal keys as an aligned text table (floats to 4 significant digits)."""
  if not rows:
    return '(no runs)'
  def cell(v):
    if v is None:
      return '-'
    if isinstance(v, float):
      return f'{v:.4g}' if abs(v) < 1e5 else f'{v:.3e}'
    if isinstance(v, int) and not isinstance(v, bool):
      return f'{v:,}'
    return str(v)
  keys = list(rows[0])
  table = [keys] + [[cell(r[k]) for k in keys] for r in rows]
  widths = [max(len(line[i]) for line in table) for i in range(len(keys))]
  return '\n'.join('  '.join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                             enumerate(zip(line, widths))) for line in table)


# ----------------------------------------------------------------------------- study reports
# The JSON and markdown that the study reports (launch/*_report.py) write.


def report_json(obj) -> str:
  """`obj` as JSON: keys starting with '_' dropped, verdicts as their dicts, non-finite floats
  as null, numpy scalars as numbers."""
  def strip(o):
    if isinstance(o, dict):
      return {str(k): strip(v) for k, v in o.items() if not str(k).startswith('_')}
    if isinstance(o, (list, tuple)):
      return [strip(v) for v in o]
    if hasattr(o, 'as_dict'):  # a decisions.Verdict
      return strip(o.as_dict())
    if isinstance(o, float) and not math.isfinite(o):
      return None
    return o
  return json.dumps(strip(obj), indent=1, default=lambda o: o.item() if hasattr(o, 'item')
                    else str(o))


def cell(v, digits=3) -> str:
  """A table cell: '-' for None or a non-finite float, floats to `digits` decimals."""
  if v is None:
    return '-'
  if isinstance(v, float):
    return '-' if not math.isfinite(v) else f'{v:.{digits}f}'
  return str(v)


def markdown_table(header: list[str], rows: list[list]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(cell(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def plus_minus(mean, se, digits=3) -> str:
  """'+m ± se' (signed), '+m' without a finite se, '-' without a finite mean."""
  if mean is None or not math.isfinite(mean):
    return '-'
  return f'{mean:+.{digits}f} ± {se:.{digits}f}' if se is not None and math.isfinite(se) \
      else f'{mean:+.{digits}f}'
