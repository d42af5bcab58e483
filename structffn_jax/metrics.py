"""Where a run reports: a progress line, metrics.jsonl, TensorBoard events, and MFU estimates."""

from __future__ import annotations

import json
import pathlib
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
  """Writes metrics from process 0 only; the others stay silent."""

  def __init__(self, workdir: pathlib.Path, total_steps: int, enabled: bool = True):
    self.enabled = enabled
    self.total_steps = total_steps
    self.jsonl = None
    self.tb = None
    if enabled:
      self.jsonl = open(workdir / 'metrics.jsonl', 'a', buffering=1)
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(str(workdir / 'tb'))
      except ImportError:
        self.tb = None

  def log(self, msg: str) -> None:
    if self.enabled:
      print(msg, flush=True, file=sys.stdout)

  def write(self, step: int, metrics: dict) -> None:
    """Append one record (step + scalars) to metrics.jsonl and TensorBoard."""
    if not self.enabled:
      return
    record = {'step': step, 'time': time.time(), **{k: _scalar(v) for k, v in metrics.items()}}
    self.jsonl.write(json.dumps(record) + '\n')
    if self.tb is not None:
      for k, v in record.items():
        if k not in ('step', 'time') and isinstance(v, (int, float)):
          self.tb.add_scalar(k, v, step)

  def progress(self, step: int, m: dict, steps_per_s: float) -> None:
    eta = (self.total_steps - step) / steps_per_s if steps_per_s > 0 else float('nan')
    mfu = f'{100 * m["mfu"]:.1f}%' if m.get('mfu') is not None else 'n/a'
    alpha = f' α {m["alpha"]:.3f}' if 'alpha' in m else ''
    self.log(f'step {step:>6}/{self.total_steps}  loss {m["loss"]:.4f}{alpha}  '
             f'lr {m["lr"]:.2e}  {m["tokens_per_s"]:,.0f} tok/s  MFU {mfu}  '
             f'ETA {_duration(eta)}')

  def close(self) -> None:
    if self.jsonl:
      self.jsonl.close()
    if self.tb is not None:
      self.tb.close()


def _scalar(v):
  try:
    return float(v)
  except (TypeError, ValueError):
    return v


def read_metrics(workdir) -> list[dict]:
  """All records of <workdir>/metrics.jsonl (the last record of a step wins on resume)."""
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    raise FileNotFoundError(f'{path}: no metrics; is {workdir} a training workdir?')
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
