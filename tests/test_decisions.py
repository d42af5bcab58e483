"""The CPU studies' decision rules (structffn_jax/decisions.py): each outcome of each rule on
synthetic numbers built to reach it, and the spike detector on the curve the first design's
detector missed."""

import json
import math
import pathlib

import numpy as np
import pytest

from structffn_jax import decisions, studies

REPO = pathlib.Path(__file__).resolve().parents[1]


def _gaps(mean, sd, n=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(0, 1, n)
  return mean + sd * (x - x.mean()) / x.std(ddof=1)  # exactly this mean and sd


@pytest.mark.parametrize('sign', [1, -1])
def test_paired_rule_reaches_each_outcome(sign):
  # Every seed with the predicted sign, mean 6 se away: reproduced.
  v = decisions.paired(sign * _gaps(0.10, 0.01), sign)
  assert v.verdict == decisions.REPRODUCED and v.n == 3
  assert math.isclose(v.se, 0.01 / math.sqrt(3)) and math.isclose(abs(v.mean), 0.10)
  # The opposite sign in every seed, by the same margin: not reproduced.
  assert decisions.paired(-sign * _gaps(0.10, 0.01), sign).verdict == decisions.NOT_REPRODUCED
  # The right sign everywhere but the mean under 3 se: inconclusive.
  weak = sign * np.array([0.001, 0.002, 0.05])
  mean, se = decisions.mean_se(weak)
  assert abs(mean) < 3 * se
  assert decisions.paired(weak, sign).verdict == decisions.INCONCLUSIVE
  # A large mean with one seed disagreeing: inconclusive.
  assert decisions.paired(sign * np.array([0.3, 0.3, -0.01]), sign).verdict == \
      decisions.INCONCLUSIVE
  # Too few seeds: inconclusive, whatever the numbers.
  assert decisions.paired(sign * np.array([0.3, 0.31]), sign).verdict == decisions.INCONCLUSIVE
  assert decisions.PAIRED_RULE == v.rule


def test_mean_se_against_the_definition():
  x = np.random.default_rng(1).normal(0.2, 0.05, 7)
  mean, se = decisions.mean_se(x)
  assert math.isclose(mean, sum(x) / 7)
  assert math.isclose(se, math.sqrt(sum((x - mean) ** 2) / 6) / math.sqrt(7))


def test_bootstrap_rule_reaches_each_outcome():
  rng = np.random.default_rng(2)
  boot = rng.normal(0.0, 0.02, 2000)
  assert decisions.bootstrap_difference(0.1, 0.1 + boot, 1).verdict == decisions.REPRODUCED
  assert decisions.bootstrap_difference(-0.1, -0.1 + boot, 1).verdict == \
      decisions.NOT_REPRODUCED
  assert decisions.bootstrap_difference(0.03, 0.03 + boot, 1).verdict == decisions.INCONCLUSIVE
  assert decisions.bootstrap_difference(0.1, [0.1, math.nan], 1).verdict == \
      decisions.INCONCLUSIVE  # one finite resample has no spread
  assert decisions.bootstrap_difference(0.1, [0.1] * 50, 1).verdict == \
      decisions.INCONCLUSIVE  # one seed per point: no spread, no evidence
  v = decisions.bootstrap_difference(0.1, 0.1 + boot, 1)
  assert math.isclose(v.se, float(np.std(0.1 + boot, ddof=1)))


def test_spike_rules_reach_each_outcome():
  lrs = (1e-3, 2e-3, 4e-3, 8e-3)
  dense = dict(zip(lrs, (0, 0, 1, 5)))
  trains = dict(zip(lrs, (False, False, False, True)))  # dense diverges at the last LR
  more = decisions.spikes_more(dict(zip(lrs, (0, 1, 2, 0))), dense, trains)
  assert more.verdict == decisions.REPRODUCED and more.n == 3  # 3 >= 1 + 2, never fewer
  assert decisions.spikes_more(dict(zip(lrs, (0, 0, 1, 9))), dense, trains).verdict == \
      decisions.NOT_REPRODUCED  # the diverged LR does not count
  assert decisions.spikes_more(dict(zip(lrs, (0, 2, 0, 0))), dense, trains).verdict == \
      decisions.INCONCLUSIVE  # fewer than dense at 4e-3
  plain = dict(zip(lrs, (0, 2, 2, 0)))
  assert decisions.spikes_removed(dict(zip(lrs, (0, 1, 1, 0))), plain).verdict == \
      decisions.REPRODUCED
  assert decisions.spikes_removed(dict(zip(lrs, (0, 2, 3, 0))), plain).verdict == \
      decisions.NOT_REPRODUCED
  assert decisions.spikes_removed(dict(zip(lrs, (0, 0, 3, 0))), plain).verdict == \
      decisions.INCONCLUSIVE  # fewer in total, but more at one LR
  assert decisions.spikes_removed(dict(zip(lrs, (0, 0, 0, 0))),
                                  dict(zip(lrs, (0, 1, 0, 0)))).verdict == \
      decisions.INCONCLUSIVE  # one spike: nothing to remove


def test_best_lr_and_its_edge():
  assert decisions.best_lr({1e-3: 4.0, 2e-3: 3.8, 4e-3: 3.9}) == (2e-3, False)
  assert decisions.best_lr({1e-3: 4.0, 2e-3: 3.8, 4e-3: None}) == (2e-3, False)  # bracketed
  assert decisions.best_lr({1e-3: 4.0, 2e-3: 3.9, 4e-3: 3.8}) == (4e-3, True)
  assert decisions.best_lr({1e-3: 3.0, 2e-3: 3.8, 4e-3: math.nan}) == (1e-3, True)
  with pytest.raises(ValueError, match='no probe run'):
    decisions.best_lr({1e-3: None})


def test_settled_from():
  xs = [1, 2, 3, 4, 5]
  assert decisions.settled_from(xs, [-0.2, 0.1, -0.05, 0.02, 0.03]) == 4
  assert decisions.settled_from(xs, [0.1, 0.2, 0.3, 0.2, 0.1]) == 1
  assert decisions.settled_from(xs, [0.1, 0.2, 0.3, 0.2, -0.1]) == 5
  assert decisions.settled_from([], []) is None


def test_spike_detector_finds_the_spike_inside_the_steep_initial_drop():
  """The first design's dense run at LR 1.6e-2 (its per-step losses are kept in
  results/cpu_repro/lr.json) jumps from 6.50 to 8.04 at step 11, while the loss still falls
  fast; a detector against the mean of the steps before missed it, one against their minimum
  finds it beside the spike at step 15."""
  runs = json.loads((REPO / 'results' / 'cpu_repro' / 'lr.json').read_text())['runs']
  curve = next(r['curve'] for r in runs if r['run'] == 'lr-dense-lr0.016')
  steps = np.array([s for s, _ in curve])
  losses = np.array([v for _, v in curve])
  starts = [int(steps[i]) for i in studies.spike_steps(losses)]
  assert starts[:2] == [11, 15]
  # The mean-based reference the first design used does not flag step 11.
  assert losses[10] < losses[:10].mean() + studies.SPIKE_NATS
  rng = np.random.default_rng(3)
  smooth = 8.0 * np.exp(-np.arange(400) / 30.0) + 4.0 + rng.normal(0, 0.05, 400)
  assert studies.count_spikes(smooth) == 0


def test_matches_rule_reaches_each_outcome():
  v = decisions.matches([3.10002, 3.09995], 3.1, 1e-4)
  assert v.verdict == decisions.REPRODUCED and v.n == 2 and math.isclose(v.mean, -5e-5, rel_tol=1e-6)  # the largest difference
  assert decisions.matches([3.1, 3.1003], 3.1, 1e-4).verdict == decisions.NOT_REPRODUCED
  assert decisions.matches([3.1], None, 1e-4).verdict == decisions.INCONCLUSIVE
  v = decisions.matches([3.1], 3.1, 1e-4, min_seeds=2)
  assert v.verdict == decisions.INCONCLUSIVE and '1 of the 2 seeds' in v.why
