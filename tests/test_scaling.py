"""The scaling fit (structffn_jax.scaling): known exponents recovered from a noisy power law, and
the runs it refuses (unfinished, mixed datasets, too few)."""

import json

import numpy as np
import pytest

from structffn_jax import config as config_lib
from structffn_jax import scaling, schema
from structffn_jax.data import prepare as prepare_lib

TRUE = {'dense': (1.6, 0.30), 'lowrank 32%': (1.9, 0.24), 'blockshuffle 32%': (2.2, 0.18)}
OFFSET = 1.7


def _points(rng, per_group, noise):
  points = []
  for group, (a, b) in TRUE.items():
    for flops in np.geomspace(1e12, 3e14, per_group) * rng.uniform(0.9, 1.1, per_group):
      loss = a * (flops / scaling.C0) ** (-b) + OFFSET + rng.normal(0, noise)
      points.append({'group': group, 'flops': float(flops), 'loss': float(loss)})
  return points


@pytest.mark.parametrize('offset', ['shared', 'per-group'])
def test_fit_recovers_known_exponents(offset):
  rng = np.random.default_rng(7)
  fits = scaling.fit(_points(rng, per_group=8, noise=0.003), offset)
  assert list(fits) == ['dense', 'blockshuffle 32%', 'lowrank 32%']  # dense first
  for group, (a, b) in TRUE.items():
    assert fits[group]['b'] == pytest.approx(b, abs=0.04), group
    assert fits[group]['a'] == pytest.approx(a, rel=0.15), group
    assert fits[group]['c'] == pytest.approx(OFFSET, abs=0.08), group
    assert fits[group]['rmse'] < 0.01
  if offset == 'shared':
    assert len({f['c'] for f in fits.values()}) == 1


def test_fit_needs_enough_points():
  rng = np.random.default_rng(0)
  points = _points(rng, per_group=2, noise=0.0)
  with pytest.raises(scaling.ScalingError, match='too few runs.*per-group'):
    scaling.fit(points, 'per-group')
  with pytest.raises(scaling.ScalingError, match='too few runs'):
    scaling.fit([p for p in points if p['group'] == 'dense'][:1], 'shared')


def _run_dir(tmp_path, name, data_dir, seq_len=16, steps_done=None):
  """A workdir as the trainer leaves it: config.json and metrics.jsonl (2 steps planned)."""
  c = config_lib.base_config()
  c.name = name
  c.model.update(vocab_size=300, seq_len=seq_len, hidden_dim=32, ffn_dim=64, attn_dim=32,
                 num_layers=2, num_heads=2, num_kv_heads=2)
  c.train.update(tokens=2 * 4 * seq_len, global_batch=4)
  c.data.data_dir = str(data_dir)
  workdir = tmp_path / name
  workdir.mkdir()
  (workdir / 'config.json').write_text(c.to_json())
  steps = 2 if steps_done is None else steps_done
  lines = [json.dumps({'step': s, 'loss': 5.0 - s, 'train_flops': 1e9 * s}) for s in
           range(1, steps + 1)]
  if steps_done is None:
    lines.append(json.dumps({'step': 2, 'valid_loss': 4.5}))
  (workdir / 'metrics.jsonl').write_text('\n'.join(lines) + '\n')
  return workdir


@pytest.fixture(scope='module')
def two_datasets(tmp_path_factory):
  """Two prepared data directories of the same text, at context 16 and 24."""
  root = tmp_path_factory.mktemp('scaling_data')
  text = root / 'text.txt'
  rng = np.random.default_rng(1)
  words = ['alpha', 'beta', 'gamma', 'delta', 'omega', 'sigma', 'kappa', 'theta']
  text.write_text('\n'.join(' '.join(rng.choice(words, 12)) for _ in range(400)))
  dirs = []
  for seq_len in (16, 24):
    cfg = schema.base_config().data
    cfg.update(source='text', train_paths=[str(text)], valid_paths=[str(text)], vocab_size=300)
    prepare_lib.prepare(cfg, root / f'data{seq_len}', seq_len)
    dirs.append(root / f'data{seq_len}')
  return dirs


def test_refuses_unfinished_and_mixed_runs(tmp_path, two_datasets):
  d16, d24 = two_datasets
  done = _run_dir(tmp_path, 'done', d16)
  points = scaling.load_points([done])
  assert points[0]['loss'] == 4.5 and points[0]['group'] == 'dense' and points[0]['flops'] > 0
  partial = _run_dir(tmp_path, 'partial', d16, steps_done=1)
  with pytest.raises(scaling.ScalingError, match=r'partial.*not finished \(partial \(1/2'):
    scaling.load_points([done, partial])
  other = _run_dir(tmp_path, 'other', d24, seq_len=24)
  with pytest.raises(scaling.ScalingError, match='mix datasets'):
    scaling.load_points([done, other])
  with pytest.raises(scaling.ScalingError, match='no config.json'):
    scaling.load_points([tmp_path])


def test_command_writes_json_and_png(tmp_path, two_datasets, capsys):
  d16, _ = two_datasets
  runs = []
  for i, (method, rank) in enumerate([('dense', 0)] * 3 + [('lowrank', 8)] * 3):
    w = _run_dir(tmp_path, f'{method}{i}', d16)
    cfg = json.loads((w / 'config.json').read_text())
    cfg['model']['ffn'].update(method=method, rank=rank)
    cfg['train']['tokens'] = 2 * 4 * 16 * (i % 3 + 1)  # different FLOPs, same steps: 2
    cfg['train']['global_batch'] = 4 * (i % 3 + 1)
    (w / 'config.json').write_text(json.dumps(cfg))
    loss = 4.0 + 2.0 / (i % 3 + 1) ** 0.5 + (0.3 if method == 'lowrank' else 0)
    (w / 'metrics.jsonl').write_text(json.dumps({'step': 2, 'loss': loss}) + '\n'
                                     + json.dumps({'step': 2, 'valid_loss': loss}) + '\n')
    runs.append(str(w))
  out = tmp_path / 'fig' / 'scaling.png'
  assert scaling.main([*runs, '--out', str(out)]) == 0
  result = json.loads(out.with_suffix('.json').read_text())
  assert set(result['fits']) == {'dense', 'lowrank 38%'} and len(result['points']) == 6
  assert out.stat().st_size > 10_000
  assert 'lowrank 38%' in capsys.readouterr().out
  assert scaling.main([runs[0], '--out', str(out)]) == 2
  assert 'too few runs' in capsys.readouterr().err


def test_spikes_counted_from_the_warm_up_on():
  from structffn_jax import studies  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(3)
  curve = 8.0 * np.exp(-np.arange(200) / 30.0) + 4.0 + rng.normal(0, 0.05, 200)
  assert studies.count_spikes(curve) == 0  # a falling, noisy curve has none
  spiked = curve.copy()
  spiked[8] += 2.5  # in the warm-up, above the falling curve's recent mean
  spiked[100:103] += 1.0  # one spike over three steps
  spiked[150] += 0.4  # below the 0.5-nat threshold
  assert studies.count_spikes(spiked) == 2
