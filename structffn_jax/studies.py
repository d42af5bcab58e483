"""Runs of a study, read from their workdirs: status, final losses, loss spikes, wall time.

`launch/sweep.py` uses this to skip finished runs, resume unfinished ones and record failures;
`structffn_jax.scaling` and the study reports in RESULTS.md read runs through it. A run is
*finished* when metrics.jsonl holds the final evaluation at the last step of its plan, *failed*
when its last attempt exited non-zero without finishing (`<workdir>/sweep.json` keeps the exit
status and the error line; a non-finite loss is reported as *diverged*), *partial* when it has
records but neither, and *new* otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import time

import numpy as np

from structffn_jax import accounting, metrics

SWEEP_FILE = 'sweep.json'
LOG_FILE = 'train.log'
# A spike: a step whose training loss exceeds the mean of the up to SPIKE_WINDOW steps before it
# (at least SPIKE_MIN_HISTORY) by more than SPIKE_NATS. Consecutive spiking steps count as one.
SPIKE_WINDOW = 32
SPIKE_MIN_HISTORY = 4
SPIKE_NATS = 0.5


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
  """metrics.jsonl of `workdir` ([] when there is none yet)."""
  if not (pathlib.Path(workdir) / 'metrics.jsonl').exists():
    return []
  return metrics.read_metrics(workdir)


def run_status(config, workdir) -> Status:
  """Where the run of `config` in `workdir` stands (see the module docstring)."""
  workdir = pathlib.Path(workdir)
  total = accounting.schedule_steps(config)[0]
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
  start = time.time()
  with open(workdir / LOG_FILE, 'ab') as log:
    rc = subprocess.call(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
  wall = time.time() - start
  lines = (workdir / LOG_FILE).read_text(errors='replace').splitlines()
  errors = [line for line in lines if line.startswith('error:')]
  sweep = workdir / SWEEP_FILE
  history = json.loads(sweep.read_text()).get('attempts', []) if sweep.exists() else []
  history.append({'exit': rc, 'wall_s': round(wall, 1), 'ended': time.strftime('%FT%T')})
  sweep.write_text(json.dumps({
      'exit': rc, 'error': errors[-1][len('error: '):] if (rc and errors) else
      (f'exit status {rc}' if rc else ''),
      'wall_s': round(sum(a['wall_s'] for a in history), 1), 'attempts': history}, indent=1))
  return rc, wall


def wall_seconds(workdir) -> float | None:
  """Wall time of every attempt of the run, as the sweep recorded it (None: not run by a sweep)."""
  sweep = pathlib.Path(workdir) / SWEEP_FILE
  return json.loads(sweep.read_text()).get('wall_s') if sweep.exists() else None


def train_losses(recs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
  """(steps, training losses) of every step with a loss, the last record of a step winning."""
  by_step = {int(r['step']): float(r['loss']) for r in recs if 'loss' in r}
  steps = np.array(sorted(by_step), dtype=np.int64)
  return steps, np.array([by_step[s] for s in steps])


def count_spikes(losses: np.ndarray, window: int = SPIKE_WINDOW, nats: float = SPIKE_NATS,
                 min_history: int = SPIKE_MIN_HISTORY) -> int:
  """Spikes in a training-loss curve: runs of steps whose loss exceeds the mean of the up to
  `window` steps before it (from step `min_history` on, so the warm-up counts) by more than
  `nats`."""
  spikes, inside = 0, False
  for t in range(min_history, len(losses)):
    high = losses[t] > losses[max(0, t - window):t].mean() + nats
    spikes += high and not inside
    inside = high
  return spikes


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
        'tokens': status.step * config.train.global_batch * config.model.seq_len,
        'train_flops': accounting.account(config).train_flops if status.state == 'finished'
                       else None,  # the paper's accounting of the whole run
        'valid_loss': final(recs),
        'spikes': count_spikes(losses) if len(losses) else None,
        'wall': duration(wall) if wall is not None else '',
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
