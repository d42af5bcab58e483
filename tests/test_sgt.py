"""Self-guided training's rules (sgt.py): the step counts and the hand-over rule, α's schedules
in closed form, the Optax transformation that freezes the guides after G steps, the fixed-FLOP
replay of the guided batches, and the optimizer state carried over the hand-over."""

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from structffn_jax import optim, sgt
from structffn_jax import plan as plan_lib
from tests import tiny_setup

tiny = tiny_setup.run_config  # (*overrides, method='lowrank', sgt=1)


def test_one_hand_over_rule_and_alpha_at_the_end_of_the_optimizer_state():
  c = tiny('train.tokens=3072')  # S = 6, G = 3
  counts = sgt.step_counts(c)
  assert (counts.base, counts.guided, counts.total) == (6, 3, 6)
  assert [sgt.is_guided(t, counts.guided) for t in range(6)] == [True] * 3 + [False] * 3
  params = {'guide': jnp.ones(2), 'u': jnp.ones(2)}
  state = optim.make_optimizer(c, counts.total, counts.guided).init(params)
  assert isinstance(state[-1], sgt.SelfGuidedState) and float(sgt.alpha_of(state)) == 1.0
  assert sgt.alpha_of(optim.make_optimizer(tiny(sgt=0), 6, 0).init(params)) is None
  assert sgt.guide_cost(tiny('sgt.reduce_flop=true')) == 0.5 and sgt.guide_cost(c) == 1.0


def test_alpha_schedule_closed_forms():
  g = 40
  cos = sgt.alpha_schedule('cosine', g)
  lin = sgt.alpha_schedule('linear', g)
  for t in (0, 1, 7, 20, 39, 40, 41, 100):
    expect_cos = 0.5 * (1 + math.cos(math.pi * t / g)) if t < g else 0.0
    expect_lin = 1 - t / g if t < g else 0.0
    assert float(cos(t)) == pytest.approx(expect_cos, abs=1e-6)
    assert float(lin(t)) == pytest.approx(expect_lin, abs=1e-6)
  assert float(cos(0)) == 1.0


def test_self_guided_transform_freezes_guides_after_g():
  g = 3
  params = {'guide': jnp.ones((2, 2)), 'u': jnp.ones((2,))}
  tx = sgt.self_guided(sgt.alpha_schedule('linear', g), g, sgt.guide_mask)
  state = tx.init(params)
  assert int(state.step) == 0 and float(state.alpha) == 1.0
  grads = {'guide': jnp.full((2, 2), 0.5), 'u': jnp.full((2,), 0.25)}
  for t in range(6):
    updates, state = tx.update(grads, state, params)
    assert int(state.step) == t + 1
    assert float(state.alpha) == pytest.approx(max(0.0, 1 - (t + 1) / g))
    np.testing.assert_array_equal(updates['u'], grads['u'])
    expected_guide = grads['guide'] if t < g else np.zeros((2, 2))
    np.testing.assert_array_equal(updates['guide'], expected_guide)


def test_fixedflop_plan_replays_the_guided_batches():
  c = tiny('sgt.mode=fixedflop', 'sgt.ratio=0.25', 'train.tokens=20480')  # S = 40
  plan = plan_lib.make_plan(c)
  assert (plan.base_steps, plan.guided_steps, plan.total_steps) == (40, 10, 50)
  indices = [plan.data_index(t) for t in range(plan.total_steps)]
  assert indices[:40] == list(range(40))
  assert indices[40:] == list(range(10))


def test_transplant_keeps_surviving_moments():
  tx = optax.adam(1e-3)
  big = {'a': jnp.arange(3.0), 'guide': jnp.ones(2)}
  small = {'a': jnp.zeros(3)}
  s_big = tx.init(big)
  s_big = tx.update(big, s_big, big)[1]
  moved = sgt.transplant(s_big, tx.init(small))
  np.testing.assert_array_equal(moved[0].mu['a'], s_big[0].mu['a'])
  assert int(moved[0].count) == 1
