"""launch/cpu_reproduction_report.py on synthetic runs: the verdicts it writes follow the
numbers (an effect built in is reproduced, its opposite is not, noise is inconclusive), and the
probe check catches a TUNED_LR that is not the probe's best."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from structffn_jax import config as config_lib
from structffn_jax import decisions

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def report():
  spec = importlib.util.spec_from_file_location('cpu_report',
                                                REPO / 'launch' / 'cpu_reproduction_report.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture()
def study():
  return config_lib.config_module(REPO / 'configs' / 'cpu_reproduction.py')


def _run(width, method, fraction, seed, loss, **extra):
  fraction = 100 if method == 'dense' else fraction
  curve = [[t * 1000, loss + 1.0 / t] for t in range(1, 9)]
  return {'run': f'w{width}-{method}-{fraction}-seed{seed}', 'state': 'finished',
          'width': width, 'method': method, 'fraction': fraction, 'seed': seed,
          'label': 'dense' if method == 'dense' else f'{method} {fraction}%',
          'valid_loss': loss, 'valid_curve': curve, 'steps': 100, 'guided_steps': 0,
          'warmup_steps': 10, 'params': 1000, 'tokens': 8000.0, 'train_flops': 1e12,
          'variant': extra.pop('variant', {}), **extra}


# The paper's Table 1 effects: every structure behind dense, 63% closer, LowRank < BlockDense <
# BlockShuffle; in nats above dense.
PAPER_LIKE = {('dense', 100): 0.0, ('lowrank', 63): 0.05, ('lowrank', 32): 0.10,
              ('blockdense', 32): 0.15, ('blockshuffle', 32): 0.20}


def _table1(study, effects, noise, seed=0):
  rng = np.random.default_rng(seed)
  runs = []
  for width in study.TABLE1_WIDTHS:
    for s in study.SEEDS:
      base = 3.0 + rng.normal(0, 0.05)  # seed noise shared by the pair: cancels in the gap
      for (method, fraction), effect in effects.items():
        runs.append(_run(width, method, fraction, s, base + effect + rng.normal(0, noise)))
  return runs


def test_table1_verdicts_follow_the_numbers(report, study, tmp_path):
  _, verdicts = report.report_table1(study, _table1(study, PAPER_LIKE, 0.002), tmp_path)
  assert len(verdicts) == 2 * (4 + 1 + 3)
  assert {v.verdict for _, v in verdicts} == {decisions.REPRODUCED}
  flipped = {k: -v for k, v in PAPER_LIKE.items()}
  _, verdicts = report.report_table1(study, _table1(study, flipped, 0.002), tmp_path)
  assert {v.verdict for _, v in verdicts} == {decisions.NOT_REPRODUCED}
  null = dict.fromkeys(PAPER_LIKE, 0.0)
  _, verdicts = report.report_table1(study, _table1(study, null, 0.05), tmp_path)
  assert decisions.INCONCLUSIVE in {v.verdict for _, v in verdicts}
  assert (tmp_path / 'table1.png').stat().st_size > 10_000


def test_sgt_and_wide_verdicts(report, study, tmp_path):
  t1 = _table1(study, PAPER_LIKE, 0.002)
  runs = []
  for s in study.SEEDS:
    dense = next(r for r in t1 if (r['width'], r['method'], r['seed']) ==
                 (study.SGT_WIDTH, 'dense', s))['valid_loss']
    for v, effect in (('fixedstep', 0.05), ('fixedflop', 0.03), ('more_tokens', 0.08)):
      runs.append(_run(study.SGT_WIDTH, 'lowrank', 32, s, dense + effect + 0.001 * s,
                       variant={'variant': v}))
  text, verdicts = report.report_sgt(study, runs, t1, tmp_path)
  assert [v.verdict for _, v in verdicts] == [decisions.REPRODUCED, decisions.REPRODUCED]
  assert 'S3 (reported): fixedflop − dense at equal FLOPs +0.03' in text
  wide = [_run(64, 'dense', 100, s, 3.0 + 0.01 * s + effect, variant={'variant': v})
          for s in study.SEEDS for v, effect in (('dense', 0.0), ('gqa', 0.01),
                                                 ('ours_same_tokens', -0.02), ('ours', -0.05))]
  text, verdicts = report.report_wide(study, wide, tmp_path)
  assert verdicts[0][1].verdict == decisions.REPRODUCED
  assert "dense's tokens, +0.020" in text and 'the extra tokens, +0.030' in text


def test_lr_verdicts_count_divergence_as_a_spike(report, study, tmp_path):
  study.LR_GRID = study.LR_GRID[:4]  # a grid of four LRs
  runs = []
  spikes = {'dense': (0, 0, 0, 1), 'lowrank': (0, 1, 2, 3), 'lowrank_sgt': (0, 0, 0, 1)}
  offset = {'dense': 0.0, 'lowrank': 0.25, 'lowrank_sgt': 0.5}
  for v, counts in spikes.items():
    for i, (lr, n) in enumerate(zip(study.LR_GRID[:4], counts)):
      loss = 3.0 + offset[v] + abs(i - (1 if v == 'dense' else 2)) * 0.1  # dense best at LR 2
      r = _run(study.LR_WIDTH, 'dense', 100, 1, loss, variant={'variant': v}, lr=lr, spikes=n,
               _curve=[[1, 5.0], [2, 4.0]], step=100)
      runs.append(r)
  text, verdicts = report.report_lr(study, runs, tmp_path)
  assert [v.verdict for _, v in verdicts] == [decisions.REPRODUCED, decisions.REPRODUCED]
  grid = study.LR_GRID
  assert (f'dense 3.000 at {grid[1]:g}; lowrank 3.250 at {grid[2]:g}; lowrank_sgt 3.500 at '
          f'{grid[2]:g}; each at its best, minus dense: lowrank +0.250, lowrank_sgt +0.500 nats.') in text
  extra = [dict(r, variant={'variant': 'lowrank63'}, valid_loss=r['valid_loss'] - 0.2)
           for r in runs if r['variant']['variant'] == 'lowrank' and r['lr'] != grid[0]]
  text, again = report.report_lr(study, runs + extra, tmp_path)  # a row in no claim
  assert [v.verdict for _, v in again] == [v.verdict for _, v in verdicts]
  assert '| lowrank63 | - |' in text and 'lowrank63 +0.050' in text
  runs[3]['state'] = 'diverged'  # dense at the top LR: that LR drops out of both claims
  _, verdicts = report.report_lr(study, runs, tmp_path)
  assert verdicts[0][1].n == 3
  _, verdicts = report.report_lr(study, [r for r in runs if r['lr'] != study.LR_GRID[0]],
                                 tmp_path)
  assert {v.verdict for _, v in verdicts} == {decisions.INCONCLUSIVE}  # a part of the grid


def test_probe_check_refuses_a_tuned_lr_that_is_not_the_best(report, study, tmp_path):
  runs = []
  for method, fraction in study.STRUCTURES_MAIN:
    for lr, loss in zip(study.PROBE_LRS, (4.0, 3.8, 3.7, 3.75, 3.9)):
      runs.append(_run(study.PROBE_WIDTH, method, fraction, 1, loss, lr=lr))
  study.TUNED_LR.update(dict.fromkeys(study.STRUCTURES_MAIN, study.PROBE_LRS[2]))
  _, problems, best = report.report_probe(study, runs, tmp_path)
  assert not problems and set(best.values()) == {study.PROBE_LRS[2]}
  study.TUNED_LR[('lowrank', 32)] = study.PROBE_LRS[1]
  _, problems, _ = report.report_probe(study, runs, tmp_path)
  assert len(problems) == 1 and 'lowrank 32%' in problems[0]


def _scaling_runs(study, b_dense, b_structured, noise, c=1.0, seed=0):
  """Seeds of every width and structure on L = a·(C/1e12)^(-b) + c, structured at 0.7× the FLOPs."""
  rng = np.random.default_rng(seed)
  runs = []
  for i, width in enumerate(study.WIDTHS):
    flops = 7e10 * 10.0 ** i
    for s in study.SEEDS:
      for method, fraction in study.STRUCTURES_SCALING:
        b, a, f = ((b_dense, 2.0, flops) if method == 'dense'
                   else (b_structured, 2.3, 0.7 * flops))
        loss = a * (f / 1e12) ** -b + c + rng.normal(0, noise)
        runs.append(_run(width, method, fraction, s, loss, train_flops=f))
  return runs


def test_scaling_verdicts_follow_the_exponents(report, study, tmp_path):
  text, verdicts = report.report_scaling(study, _scaling_runs(study, 0.10, 0.15, 0.002),
                                         tmp_path, resamples=100)
  steeper = [v for c, v in verdicts if c.startswith('F1:')]
  narrows = [v for c, v in verdicts if c.startswith("F1':")]
  assert len(steeper) == len(narrows) == len(study.STRUCTURES_SCALING) - 1
  assert {v.verdict for v in steeper + narrows} == {decisions.REPRODUCED}
  assert 'lower bound 0' not in text  # c = 1 is in reach of these sizes
  by_width = json.loads((tmp_path / 'scaling.json').read_text())['gap_by_width']
  for i, width in enumerate(study.WIDTHS):
    f = 7e10 * 10.0 ** i / 1e12
    expected = 2.3 * (0.7 * f) ** -0.15 - 2.0 * f ** -0.10  # the closed form of the paired gap
    for g in by_width.values():
      assert abs(g[str(width)]['mean'] - expected) < 0.01
  _, verdicts = report.report_scaling(study, _scaling_runs(study, 0.15, 0.10, 0.002), tmp_path,
                                      resamples=100)
  assert {v.verdict for c, v in verdicts if c.startswith('F1:')} == {decisions.NOT_REPRODUCED}
  _, verdicts = report.report_scaling(study, _scaling_runs(study, 0.12, 0.12, 0.05), tmp_path,
                                      resamples=100)
  assert decisions.INCONCLUSIVE in {v.verdict for c, v in verdicts if c.startswith('F1:')}
  assert (tmp_path / 'scaling.png').stat().st_size > 10_000


def test_scaling_says_when_the_shared_offset_sits_at_its_bound(report, study, tmp_path):
  """Data whose true offset is below 0: the fit stops at its bound, and the report says so."""
  text, _ = report.report_scaling(study, _scaling_runs(study, 0.10, 0.15, 0.002, c=-0.5),
                                  tmp_path, resamples=20)
  assert 'The shared irreducible loss c ended at its lower bound 0' in text
