"""What the benchmarks and the pre-merge calibration measure with: the FFN under test at a width,
a median timer, a plain-text table and a self-describing JSON file.

Every benchmark prints a table and writes JSON that records where and how it ran (device, jax
version, date, command line), so a number in BENCHMARKS.md can always be traced to its command.
Compare variants inside one process, interleaved (`time_interleaved`), so that a busy shared CPU
slows them all alike.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
from flax import nnx

from structffn_jax import hostmem
from structffn_jax import model as model_lib
from structffn_jax import schema


def ffn_module(width: int, structure: Mapping[str, Any], dtype: str, *,
               implementation: str = 'auto', seed: int = 0) -> model_lib.FeedForward:
  """The model's FeedForward (GELU, biases) at `width`, ffn = 4 × width, with `structure`'s
  method / rank / blocks. Gaussian init: timings do not depend on the values, and it skips the
  SVDs of the paper's init."""
  cfg = schema.base_config().model
  cfg.hidden_dim, cfg.ffn_dim, cfg.activation, cfg.use_bias = width, 4 * width, 'gelu', True
  cfg.ffn.update(structure)
  cfg.ffn.init, cfg.ffn.implementation = 'gaussian', implementation
  return model_lib.FeedForward(cfg, structure['method'], model_lib.DTYPES[dtype], guide=False,
                               reduce_flop=False, rngs=nnx.Rngs(seed))


def ffn_settings(method: str, width: int, fraction: str) -> dict:
  """rank / blocks of `method` at this width for the 63% or 32% parameter fraction, ffn = 4 ×
  width (docs/design.md §6.3): LowRank R = d/2, d/4; BlockShuffle C = 2, 4; BlockDense (C, R) =
  (4, 3d/4), (4, 3d/8) for widths divisible by 8 (m, xl), (2, 2d/3), (2, d/3) otherwise."""
  small = fraction == '32'
  if method == 'lowrank':
    return dict(rank=width // 4 if small else width // 2, blocks=1)
  if method == 'blockshuffle':
    return dict(rank=0, blocks=4 if small else 2)
  if method == 'blockdense':
    if width % 8 == 0 and width % 3:
      return dict(rank=3 * width // 8 if small else 3 * width // 4, blocks=4)
    return dict(rank=width // 3 if small else 2 * width // 3, blocks=2)
  return dict(rank=0, blocks=1)


def jitted_forward(module) -> tuple[Callable, Any]:
  """(fn, state) with fn(state, x) = module(x), jitted: the module's state is an argument."""
  graphdef, state = nnx.split(module)
  return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)), state


def _block(out):
  return jax.block_until_ready(out)


def time_fn(fn: Callable, *args, warmup: int = 2, iters: int = 10) -> float:
  """Median wall-clock seconds of `fn(*args)`, waiting for the device; `warmup` untimed calls."""
  for _ in range(warmup):
    _block(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    _block(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def time_interleaved_samples(fns: Mapping[str, tuple[Callable, tuple]], *, warmup: int = 2,
                             iters: int = 10) -> dict[str, list[float]]:
  """Every timed call (seconds) of each `name: (fn, args)`, the variants run round-robin."""
  for fn, args in fns.values():
    for _ in range(warmup):
      _block(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(iters):
    for name, (fn, args) in fns.items():
      t0 = time.perf_counter()
      _block(fn(*args))
      times[name].append(time.perf_counter() - t0)
  return times


def time_interleaved(fns: Mapping[str, tuple[Callable, tuple]], *, warmup: int = 2,
                     iters: int = 10) -> dict[str, float]:
  """Median seconds of each `name: (fn, args)`, the variants run round-robin in one process.

  Interleaving makes a ratio between variants robust to other load on a shared machine.
  """
  samples = time_interleaved_samples(fns, warmup=warmup, iters=iters)
  return {name: statistics.median(t) for name, t in samples.items()}


def _fmt(value) -> str:
  if isinstance(value, float):
    return f'{value:.3g}' if abs(value) < 1000 else f'{value:.0f}'
  return str(value)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *, file=None) -> str:
  """Print rows (dicts) as an aligned Markdown table with the given columns; returns the text."""
  cells = [[_fmt(r.get(c, '')) for c in columns] for r in rows]
  widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
  line = lambda vals: '| ' + ' | '.join(v.ljust(w) for v, w in zip(vals, widths)) + ' |'
  text = '\n'.join([line(columns), '|' + '|'.join('-' * (w + 2) for w in widths) + '|']
                   + [line(row) for row in cells])
  print(text, file=file or sys.stdout, flush=True)
  return text


def device_info() -> dict[str, Any]:
  """The device the default backend runs on, and the software around it."""
  dev = jax.devices()[0]
  return {
      'backend': jax.default_backend(),
      'device': getattr(dev, 'device_kind', str(dev)),
      'device_count': jax.device_count(),
      'cpu_count': os.cpu_count(),
      'host': platform.node(),
      'loadavg': os.getloadavg() if hasattr(os, 'getloadavg') else None,  # others' load too
      'host_allocator': hostmem.status(),
      'jax': jax.__version__,
      'python': platform.python_version(),
  }


def write_json(path: str, payload: Mapping[str, Any]) -> str:
  """Write `payload` plus device, jax version, UTC date and command line to `path`; returns it."""
  main = sys.modules.get('__main__')
  spec = getattr(main, '__spec__', None)  # run as `python -m package.module`
  program = ['-m', spec.name] if spec is not None and spec.name else sys.argv[:1]
  record = {
      'command': ' '.join(['python'] + program + sys.argv[1:]),
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      **device_info(),
      **payload,
  }
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(record, f, indent=2, default=str)
  print(f'wrote {path}')
  return path


def default_out(name: str) -> str:
  """Default JSON path for benchmark `name`: bench_results/<name>_<backend>.json."""
  return os.path.join('bench_results', f'{name}_{jax.default_backend()}.json')
