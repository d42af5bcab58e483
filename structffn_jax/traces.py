"""Where the time goes: the top XLA ops of a profiler trace, as a table.

  python -m structffn_jax.traces runs/quickstart            # newest trace under <workdir>/profile
  python -m structffn_jax.traces path/to/host.xplane.pb --top 20 --json

Reads the `.xplane.pb` that `train --profile K:N` writes. On GPUs/TPUs it sums the device's
'XLA Ops' line; on CPU, the XLA executor threads of the host plane (Python-side events excluded).
"""

from __future__ import annotations

import collections
import json
import pathlib
import sys

from structffn_jax import cli


def find_trace(path) -> pathlib.Path:
  """The newest .xplane.pb at `path` (a file, a workdir, or a profile directory)."""
  path = pathlib.Path(path)
  if path.is_file():
    return path
  found = sorted(path.rglob('*.xplane.pb'), key=lambda p: p.stat().st_mtime)
  if not found:
    raise FileNotFoundError(f'no .xplane.pb under {path}; train with --profile K:N first.')
  return found[-1]


def _device_lines(plane):
  lines = list(plane.lines)
  ops = [l for l in lines if l.name == 'XLA Ops']
  return ops or lines


def top_ops(path, top: int = 15) -> list[dict]:
  """[{op, where, total_ms, count, share}] sorted by total time, for the trace at `path`."""
  from jax.profiler import ProfileData
  data = ProfileData.from_file(str(find_trace(path)))
  totals = collections.Counter()
  counts = collections.Counter()
  devices = [p for p in data.planes if p.name.startswith('/device:')]
  for plane in devices:
    for line in _device_lines(plane):
      for ev in line.events:
        totals[(ev.name, plane.name)] += ev.duration_ns
        counts[(ev.name, plane.name)] += 1
  if not totals:  # CPU backend: XLA work runs on the host's executor threads
    for plane in data.planes:
      if plane.name != '/host:CPU':
        continue
      for line in plane.lines:
        if line.name == 'python' or not line.name.startswith('tf_XLA'):
          continue
        for ev in line.events:
          totals[(ev.name, 'host CPU')] += ev.duration_ns
          counts[(ev.name, 'host CPU')] += 1
  grand = sum(totals.values()) or 1
  return [{'op': name, 'where': where, 'total_ms': ns / 1e6, 'count': counts[(name, where)],
           'share': ns / grand} for (name, where), ns in totals.most_common(top)]


def format_table(rows) -> str:
  width = max([len(r['op']) for r in rows] + [2])
  width = min(width, 60)
  out = [f'{"op":<{width}}  {"total ms":>10}  {"calls":>6}  {"share":>6}']
  for r in rows:
    out.append(f'{r["op"][:width]:<{width}}  {r["total_ms"]:>10.3f}  {r["count"]:>6}  '
               f'{100 * r["share"]:>5.1f}%')
  return '\n'.join(out)


def main(argv=None):
  parser = cli.parser(__doc__, 'structffn_jax.traces')
  parser.add_argument('path', help='workdir, profile directory or .xplane.pb file')
  parser.add_argument('--top', type=int, default=15, help='how many ops to list (default: 15)')
  parser.add_argument('--json', action='store_true', help='print JSON rows instead of a table')
  args = cli.parse(parser, argv)
  try:
    rows = top_ops(args.path, args.top)
  except FileNotFoundError as e:
    sys.exit(f'error: {e}')
  print(json.dumps(rows) if args.json else format_table(rows))


if __name__ == '__main__':
  main()
