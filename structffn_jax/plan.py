"""The step plan of a run: how many optimizer steps, how many of them guided, which batch each
step reads, and how a global batch splits into micro-batches (docs/design.md §3.5).

The step counts and fixedflop's replay are self-guided training's (structffn_jax/sgt.py); the
plan adds where the run's data starts and the micro-batches. The trainer follows it, and the
training benchmark builds the same step from it.
"""

from __future__ import annotations

import dataclasses

from structffn_jax import sgt
from structffn_jax.errors import ConfigError


@dataclasses.dataclass
class Plan:
  """The step schedule of a run, from its config."""
  steps: sgt.StepCounts  # S, G and the total
  micro_batches: int  # gradient-accumulation slices per step
  data_start: int = 0  # the global batch step 0 reads (train.data_start)

  @property
  def total_steps(self) -> int:  # S, or S + G with fixedflop
    return self.steps.total

  @property
  def base_steps(self) -> int:  # S
    return self.steps.base

  @property
  def guided_steps(self) -> int:  # G (0 without SGT)
    return self.steps.guided

  def data_index(self, step: int) -> int:
    """Which global batch optimizer step `step` reads (fixedflop replays [0, G) at the end)."""
    return self.data_start + self.steps.batch_index(step)

  def start_line(self, step: int, tokens: int) -> str:
    """The trainer's line before it trains on from `step` (`tokens` trained so far): where it
    starts, or that the plan has no step left."""
    total = self.total_steps
    if step < total:
      return f'training from step {step}; the first step compiles'
    return (f'step {step}: {"past" if step > total else "at"} the end of this config\'s {total} '
            f'steps (train.tokens / (global_batch x seq_len)); nothing to train, {tokens:,} '
            f'tokens trained. Raise train.tokens (--allow-change train.tokens) to train on.')


def make_plan(config) -> Plan:
  t = config.train
  micro = t.micro_batch or t.global_batch
  if t.global_batch % micro:
    raise ConfigError(f'train.micro_batch={micro} must divide train.global_batch='
                      f'{t.global_batch}.')
  return Plan(sgt.step_counts(config), t.global_batch // micro, int(t.data_start))
