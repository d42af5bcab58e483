"""The optimisation recipe (design §6.1) and self-guided training as an Optax transformation (§3).

`self_guided(...)` is the last link of the chain. Its state carries the optimizer step and the guide
weight α that the model reads for the next forward; from step G on it zeroes the guides' updates
(the trainer then drops the guides and their optimizer state, see `transplant`).

  tx = optim.make_optimizer(config, total_steps, guided_steps)
  α = optim.alpha_of(opt_state)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax


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


class SelfGuidedState(NamedTuple):
  step: jax.Array  # optimizer steps taken
  alpha: jax.Array  # α for the next forward pass


def self_guided(schedule, guided_steps: int, is_guide) -> optax.GradientTransformation:
  """Carry (step, α) and stop the guides' updates once step ≥ G.

  schedule: step -> α. is_guide: a pytree of bools like the params (True on guide leaves).
  """

  def init_fn(params):
    del params
    return SelfGuidedState(step=jnp.zeros([], jnp.int32), alpha=schedule(0))

  def update_fn(updates, state, params=None):
    del params
    active = state.step < guided_steps
    mask = is_guide(updates) if callable(is_guide) else is_guide
    updates = jax.tree.map(lambda u, g: jnp.where(active, u, jnp.zeros_like(u)) if g else u,
                           updates, mask)
    step = state.step + 1
    return updates, SelfGuidedState(step=step, alpha=schedule(step))

  return optax.GradientTransformation(init_fn, update_fn)


def lr_schedule(train: ml_collections.ConfigDict, total_steps: int):
  """Linear warm-up over warmup_frac of the steps, then cosine to min_lr_ratio × peak."""
  warmup = max(1, int(round(train.warmup_frac * total_steps)))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.peak_lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=train.min_lr_ratio * train.peak_lr)


def guide_mask(params):
  """True on every guide parameter leaf (a path ending in 'guide')."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(k, 'key', None) == 'guide' for k in path), params)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int,
                   guided_steps: int) -> optax.GradientTransformation:
  """Clip → AdamW (decay on all parameters) → self-guided hand-over."""
  t = config.train
  chain = [
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(lr_schedule(t, total_steps), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay),
  ]
  if config.sgt.enabled:
    chain.append(self_guided(alpha_schedule(config.sgt.schedule, guided_steps), guided_steps,
                             guide_mask))
  return optax.chain(*chain)


def alpha_of(opt_state) -> jax.Array | None:
  """The α carried by the SelfGuidedState inside an optax chain state (None without SGT)."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SelfGuidedState))
           if isinstance(s, SelfGuidedState)]
  return found[0].alpha if found else None


def transplant(old_state, new_state):
  """Copy the leaves of `old_state` into `new_state` wherever their tree paths agree.

  Used to drop the guides: re-initialise the optimizer for the params without guides, then move
  every surviving moment and counter across unchanged.
  """
  old = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(old_state)[0]}

  def pick(path, fresh):
    key = jax.tree_util.keystr(path)
    if key not in old:
      raise KeyError(f'optimizer state entry {key} has no counterpart in the old state')
    return old[key]

  return jax.tree_util.tree_map_with_path(pick, new_state)
