"""traces: self times on a line with nested events (a hand-computed case), and on a real CPU
profiler trace: per line, the self times add up to the time the line's events cover (the union
of their intervals, computed independently), so no time is counted twice."""

import jax
import jax.numpy as jnp
import pytest

from structffn_jax import traces


def union_ns(intervals):
  covered, end = 0.0, float('-inf')
  for start, stop in sorted(intervals):
    if stop > end:
      covered += stop - max(start, end)
      end = stop
  return covered


def test_self_times_of_nested_events():
  events = [('wrapper', 0, 100), ('a', 10, 40), ('b', 50, 90), ('c', 60, 70), ('d', 100, 120),
            ('overhang', 110, 130)]  # reaches past d's end: counted inside d up to 120
  got = dict(traces.self_times(events))
  assert got == {'wrapper': 30, 'a': 30, 'b': 30, 'c': 10, 'd': 10, 'overhang': 20}
  assert sum(got.values()) == union_ns([(s, e) for _, s, e in events]) == 130


def test_real_trace_counts_each_nanosecond_once(tmp_path):
  from jax.profiler import ProfileData
  f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
  x = jnp.ones((256, 256))
  f(x).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(3):
      f(x).block_until_ready()
  path = traces.find_trace(tmp_path)
  nested = 0
  for plane in ProfileData.from_file(str(path)).planes:
    for line in plane.lines:
      events = [(e.name, e.start_ns, e.start_ns + e.duration_ns) for e in line.events]
      if not events:
        continue
      own = traces.self_times(events)
      assert all(ns >= -1e-3 for _, ns in own)
      assert sum(ns for _, ns in own) == pytest.approx(union_ns([(s, e) for _, s, e in events]),
                                                       rel=1e-9, abs=1.0)
      nested += sum(e - s for _, s, e in events) > union_ns([(s, e) for _, s, e in events]) + 1
  assert nested, 'the trace has no nested events: nothing was tested'
  rows = traces.top_ops(path, top=1000)
  assert sum(r['share'] for r in rows) == pytest.approx(1.0)
  assert 'self ms' in traces.format_table(rows)
