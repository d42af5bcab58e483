"""Self-guided training (docs/design.md §3), every decision it makes in one module.

  steps = sgt.step_counts(config)        # S, G and the total (fixedstep / fixedflop, §3.5)
  steps.batch_index(t)                   # the batch step t reads (fixedflop replays [0, G))
  alpha = sgt.alpha_schedule('cosine', G)  # α(t), §3.2
  sgt.is_guided(t, G)                    # the one hand-over rule (§3.3): t < G
  sgt.guide_cost(config)                 # the guide's expected share of its cost (§3.4)
  sgt.alpha_of(opt_state)                # α carried by the train state (None without SGT)
  state = sgt.hand_over(graphdef, state, tx)  # the guides and their moments dropped

The schedule runs inside the optimizer as `self_guided`, the last link of the Optax chain
(§3.7): its state, `SelfGuidedState(step, alpha)`, is the last entry of the chain's state, so
`train_state['opt_state'][-1]` is where the step and α live. The trainer hands over before the
first step t with `is_guided(t, G)` false; the transformation stops the guides' updates by the
same rule, so a driver that keeps the guides past G (a benchmark, a test) trains the same
structured factors with a guide that no longer moves and, at α = 0, no longer contributes.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx


# ------------------------------------------------------------------------------- the step plan


@dataclasses.dataclass(frozen=True)
class StepCounts:
  """How many optimizer steps a run takes, how many of them guided, and their batches."""
  base: int  # S: the steps of the token budget
  guided: int  # G (0 without SGT)
  total: int  # S, or S + G with fixedflop

  def batch_index(self, step: int) -> int:
    """The batch optimizer step `step` reads, counted from the run's first batch: steps [0, S)
    read batches [0, S), and fixedflop's extra steps [S, S + G) replay batches [0, G)."""
    return step - self.base if step >= self.base else step


def step_counts(config: ml_collections.ConfigDict) -> StepCounts:
  """S = round(tokens / (global_batch · seq_len)), G = round(ratio · S) (§3.5)."""
  t = config.train
  base = max(1, round(t.tokens / (t.global_batch * config.model.seq_len)))
  if not config.sgt.enabled:
    return StepCounts(base, 0, base)
  guided = max(1, round(config.sgt.ratio * base))
  total = base + guided if config.sgt.mode == 'fixedflop' else base
  return StepCounts(base, min(guided, total), total)


# ------------------------------------------------------------------------------- α and hand-over


def is_guided(step, guided_steps: int):
  """The hand-over rule: optimizer step `step` (0-based) runs with the guides iff step < G.

  The trainer drops the guides before the first step for which this is false; the Optax
  transformation stops the guides' updates by it. Works on ints and on traced arrays.
  """
  return step < guided_steps


def alpha_schedule(kind: str, guided_steps: int):
  """α(t): 1 at t=0, falling to 0 at t=G (cosine ½(1+cos(πt/G)) or linear 1−t/G), 0 after."""
  g = max(int(guided_steps), 1)

  def alpha(step):
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / g, 0.0, 1.0)
    value = 0.5 * (1 + jnp.cos(jnp.pi * frac)) if kind == 'cosine' else 1.0 - frac
    return jnp.where(guided_steps > 0, value, 0.0).astype(jnp.float32)

  if kind not in ('cosine', 'linear'):
    raise ValueError(f'sgt.schedule={kind!r} is not allowed; use cosine or linear.')
  return alpha


# With reduce_flop the guide runs with probability α(t); the mean of α over [0, G) is ½ for
# both schedules, so the guide costs half of its full cost over the guided steps (§3.4).
REDUCE_FLOP_COST = 0.5


def guide_cost(config: ml_collections.ConfigDict) -> float:
  """The guide's expected cost over the guided steps, as a fraction of its full cost."""
  return REDUCE_FLOP_COST if config.sgt.reduce_flop else 1.0


# ------------------------------------------------------------------------------- the transformation


class SelfGuidedState(NamedTuple):
  step: jax.Array  # optimizer steps taken
  alpha: jax.Array  # α for the next forward pass


def guide_mask(params):
  """True on every guide parameter leaf (a path ending in 'guide')."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(k, 'key', None) == 'guide' for k in path), params)


def self_guided(schedule, guided_steps: int, is_guide) -> optax.GradientTransformation:
  """Carry (step, α) and stop the guides' updates once `is_guided(step, G)` is false.

  schedule: step -> α. is_guide: a pytree of bools like the params (True on guide leaves), or
  a function of the updates giving one. The last link of the chain (see the module docstring).
  """

  def init_fn(params):
    del params
    return SelfGuidedState(step=jnp.zeros([], jnp.int32), alpha=schedule(0))

  def update_fn(updates, state, params=None):
    del params
    active = is_guided(state.step, guided_steps)
    mask = is_guide(updates) if callable(is_guide) else is_guide
    updates = jax.tree.map(lambda u, g: jnp.where(active, u, jnp.zeros_like(u)) if g else u,
                           updates, mask)
    step = state.step + 1
    return updates, SelfGuidedState(step=step, alpha=schedule(step))

  return optax.GradientTransformation(init_fn, update_fn)


def transformation(config: ml_collections.ConfigDict,
                   guided_steps: int) -> optax.GradientTransformation:
  """`self_guided` as the config asks for it (sgt.schedule over G steps, on the guide leaves)."""
  return self_guided(alpha_schedule(config.sgt.schedule, guided_steps), guided_steps, guide_mask)


def alpha_of(opt_state) -> jax.Array | None:
  """α of the next forward: the SelfGuidedState that ends the chain's state (None without SGT)."""
  last = opt_state[-1] if isinstance(opt_state, tuple) and opt_state else None
  return last.alpha if isinstance(last, SelfGuidedState) else None


# ------------------------------------------------------------------------------- the hand-over


def transplant(old_state, new_state):
  """Copy the leaves of `old_state` into `new_state` wherever their tree paths agree.

  Used to drop the guides: re-initialise the optimizer for the params without guides, then move
  every surviving moment and counter across unchanged.
  """
  old = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(old_state)[0]}

  def pick(path, fresh):
    del fresh
    key = jax.tree_util.keystr(path)
    if key not in old:
      raise KeyError(f'optimizer state entry {key} has no counterpart in the old state')
    return old[key]

  return jax.tree_util.tree_map_with_path(pick, new_state)


def hand_over(graphdef, state, tx: optax.GradientTransformation):
  """The train state without guides (§3.3): {'params', 'opt_state'} of the model with every
  guide removed, every other parameter, moment and counter moved across unchanged. Its graph is
  that of the model built without guides (`run.abstract_state(..., guides=False)`)."""
  model = nnx.merge(graphdef, state['params'])
  model.drop_guides()
  params = nnx.split(model, nnx.Param)[1]
  fresh = jax.eval_shape(tx.init, params)  # the structure only: every leaf moves across
  return {'params': params, 'opt_state': transplant(state['opt_state'], fresh)}
