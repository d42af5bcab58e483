"""The benchmark commands end to end at toy sizes: each prints its table, writes its JSON with the
rows the docs describe, and computes its derived columns from its own timings.

Timings themselves are not asserted (that is what BENCHMARKS.md is for); the structure, the
variants, the FLOP bounds and the ratios' arithmetic are.
"""

import json

import jax
import pytest

from structffn_jax.bench import decode, ffn, kernels, train
from tests.tiny_setup import REPO


def _rows(path, key='rows'):
  record = json.loads(path.read_text())
  assert record['command'].startswith('python ') and record['device'] and record['jax']
  return record, record[key]


def test_ffn_bench(tmp_path, capsys):
  out = tmp_path / 'ffn.json'
  ffn.main(['--widths', '32,64', '--tokens', '32', '--iters', '1', '--warmup', '1', '--einsum',
            '--out', str(out), '--plot'])
  assert '| width | variant' in capsys.readouterr().out
  assert (tmp_path / 'ffn.png').stat().st_size > 0
  record, rows = _rows(out)
  assert [r['width'] for r in rows if r['variant'] == 'dense'] == [32, 64]
  by_name = {r['variant']: r for r in rows if r['width'] == 64}
  assert list(by_name)[0] == 'dense' and by_name['dense']['fwd_speedup'] == 1
  for method in ('lowrank', 'blockdense', 'blockshuffle'):
    for fraction in ('63', '32'):
      for suffix in ('', ' einsum'):
        assert f'{method} {fraction}%{suffix}' in by_name
  assert by_name['blockshuffle 32%']['implementation'] == 'xla fused ffn'
  assert by_name['blockshuffle 32% layers']['implementation'] == 'xla'
  assert by_name['lowrank 32% einsum']['implementation'] == 'reference'
  assert by_name['lowrank 32%']['flop_bound'] == pytest.approx(3.2)
  assert by_name['lowrank 63%']['flop_bound'] == pytest.approx(1.6)
  for r in by_name.values():
    for p in record['passes']:
      assert r[f'{p}_speedup'] == pytest.approx(by_name['dense'][f'{p}_ms'] / r[f'{p}_ms'])
      assert len(r[f'{p}_samples_ms']) == 1


def test_decode_bench_ffn_part(tmp_path, capsys):
  out = tmp_path / 'decode.json'
  decode.main(['--part', 'ffn', '--widths', '64', '--tokens', '1,8', '--iters', '1',
               '--out', str(out)])
  assert 'FFN forward latency' in capsys.readouterr().out
  _, rows = _rows(out, 'ffn')
  assert {(r['ffn'], r['tokens']) for r in rows} >= {('dense', 1), ('blockshuffle-32', 8)}
  for r in rows:
    assert r['speedup'] == pytest.approx(r['dense_us'] / r['structured_us'], rel=1e-3)
    assert r['crossover'] >= 0


def test_train_bench(tmp_path, capsys):
  out = tmp_path / 'train.json'
  train.main(['--config', f'{REPO}/configs/tiny.py:method=blockshuffle', '--steps', '1',
              '--out', str(out)])
  assert 'tiny-blockshuffle' in capsys.readouterr().out
  _, rows = _rows(out)
  (row,) = rows
  assert row['tokens_per_s'] == pytest.approx(8 * 64 / row['step_s'], rel=1e-3)


@pytest.mark.skipif(jax.default_backend() == 'gpu', reason='checks the interpreter run')
def test_kernels_bench(tmp_path, capsys):
  out = tmp_path / 'kernels.json'
  kernels.main(['--widths', '32', '--tokens', '16', '--fractions', '32', '--iters', '1',
                '--warmup', '1', '--out', str(out)])
  printed = capsys.readouterr().out
  assert 'NOTE: no GPU' in printed and 'largest Pallas error relative to the reference' in printed
  record, rows = _rows(out)
  assert record['interpret'] and {r['op'] for r in rows} == {'blockshuffle', 'blockdense'}
  for r in rows:  # the interpreted kernels agree with the reference einsums
    assert r['pallas_runs'] == 'pallas'
    assert max(r['fwd_pallas_err'], r['fwdbwd_pallas_err'], r['fwd_xla_err']) < 1e-4
