"""Where the time goes: the top XLA ops of a profiler trace, as a table.

  python -m structffn_jax.traces runs/quickstart            # newest trace under <workdir>/profile
  python -m structffn_jax.traces path/to/host.xplane.pb --top 20 --json

Reads the `.xplane.pb` that `train --profile K:N` writes. On GPUs/TPUs it sums the device's
'XLA Ops' line; on CPU, the XLA executor threads of the host plane (Python-side events excluded).
Times are self times: an event that encloses others on its line (a fusion wrapper, a thunk
executor around its ops) counts only the time none of them covers, so the shares add up to 100%.
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


def self_times(events) -> list[tuple[str, float]]:
  """(name, self ns) of each (name, start_ns, end_ns) event of one trace line: its duration less
  the time of the events directly inside it (a child reaching past its parent's end counts only
  up to that end)."""
  order = sorted(range(len(events)), key=lambda i: (events[i][1], -events[i][2]))
  own = [float(end - start) for _, start, end in events]
  stack: list[int] = []
  for i in order:
    _, start, end = events[i]
    while stack and events[stack[-1]][2] <= start:
      stack.pop()
    if stack:
      own[stack[-1]] -= min(end, events[stack[-1]][2]) - start
    stack.append(i)
  return [(events[i][0], own[i]) for i in range(len(events))]


def _add_line(line, where, totals, counts):
  for name, ns in self_times([(ev.name, ev.start_ns, ev.start_ns + ev.duration_ns)
                              for ev in line.events]):
    totals[(name, where)] += ns
    counts[(name, where)] += 1


def top_ops(path, top: int = 15) -> list[dict]:
  """[{op, where, total_ms, count, share}] sorted by self time, for the trace at `path`."""
  from jax.profiler import ProfileData
  data = ProfileData.from_file(str(find_trace(path)))
  totals = collections.Counter()
  counts = collections.Counter()
  devices = [p for p in data.planes if p.name.startswith('/device:')]
  for plane in devices:
    for line in _device_lines(plane):
      _add_line(line, plane.name, totals, counts)
  if not totals:  # CPU backend: XLA work runs on the host's executor threads
    for plane in data.planes:
      if plane.name != '/host:CPU':
        continue
      for line in plane.lines:
        if line.name == 'python' or not line.name.startswith('tf_XLA'):
          continue
        _add_line(line, 'host CPU', totals, counts)
  grand = sum(totals.values()) or 1
  return [{'op': name, 'where': where, 'total_ms': ns / 1e6, 'count': counts[(name, where)],
           'share': ns / grand} for (name, where), ns in totals.most_common(top)]


def format_table(rows) -> str:
  width = max([len(r['op']) for r in rows] + [2])
  width = min(width, 60)
  out = [f'{"op":<{width}}  {"self ms":>10}  {"calls":>6}  {"share":>6}']
  for r in rows:
    out.append(f'{r["op"][:width]:<{width}}  {r["total_ms"]:>10.3f}  {r["count"]:>6}  '
               f'{100 * r["share"]:>5.1f}%')
  return '\n'.join(out)


def main(argv=None):
  parser = cli.parser(__doc__, 'structffn_jax.traces')
  parser.add_argument('path', help='workdir, profile directory or .xplane.pb file')
  parser.add_argument('--top', type=cli.integer(1), default=15,
                      help='how many ops to list (default: 15)')
  parser.add_argument('--json', action='store_true', help='print JSON rows instead of a table')
  args = cli.parse(parser, argv)
  try:
    rows = top_ops(args.path, args.top)
  except FileNotFoundError as e:
    sys.exit(f'error: {e}')
  print(json.dumps(rows) if args.json else format_table(rows))


if __name__ == '__main__':
  main()
