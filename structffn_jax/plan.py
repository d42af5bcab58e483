"""The step plan of a run: how many optimizer steps, how many of them guided, which batch each
step reads, and how a global batch splits into micro-batches (docs/design.md §3.5).

The trainer follows it, and the training benchmark builds the same step from it.
"""

from __future__ import annotations

import dataclasses

from structffn_jax import accounting
from structffn_jax import config as config_lib


@dataclasses.dataclass
class Plan:
  """The step schedule of a run, from its config."""
  total_steps: int  # S, or S + G with fixedflop
  base_steps: int  # S
  guided_steps: int  # G (0 without SGT)
  micro_batches: int  # gradient-accumulation slices per step
  data_start: int = 0  # the global batch step 0 reads (train.data_start)

  def data_index(self, step: int) -> int:
    """Which global batch optimizer step `step` reads (fixedflop replays [0, G) at the end)."""
    return self.data_start + (step - self.base_steps if step >= self.base_steps else step)


def make_plan(config) -> Plan:
  total, guided = accounting.schedule_steps(config)
  base = accounting.schedule_steps(config, base_only=True)[0]
  t = config.train
  micro = t.micro_batch or t.global_batch
  if t.global_batch % micro:
    raise config_lib.ConfigError(f'train.micro_batch={micro} must divide train.global_batch='
                                 f'{t.global_batch}.')
  return Plan(total, base, guided, t.global_batch // micro, int(t.data_start))
