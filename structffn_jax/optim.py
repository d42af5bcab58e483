"""The optimisation recipe (design §6.1): clip → AdamW → the self-guided link (§3.7).

  tx = optim.make_optimizer(config, total_steps, guided_steps)

The self-guided transformation, its state (step, α) and the hand-over live in
structffn_jax/sgt.py.
"""

from __future__ import annotations

import ml_collections
import optax

from structffn_jax import sgt


def lr_schedule(train: ml_collections.ConfigDict, total_steps: int):
  """Linear warm-up over warmup_frac of the steps, then cosine to min_lr_ratio × peak."""
  warmup = max(1, int(round(train.warmup_frac * total_steps)))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.peak_lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=train.min_lr_ratio * train.peak_lr)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int,
                   guided_steps: int) -> optax.GradientTransformation:
  """Clip → AdamW (decay on all parameters) → self-guided (with SGT, the last link, so that
  its state ends the chain's state: `sgt.alpha_of`)."""
  t = config.train
  chain = [
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(lr_schedule(t, total_steps), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay),
  ]
  if config.sgt.enabled:
    chain.append(sgt.transformation(config, guided_steps))
  return optax.chain(*chain)
