"""The evaluation loop: mean loss per token over a prepared split, on a device mesh.

One loop for the trainer's periodic validation and for the evaluate command, so that both
report the same number for the same parameters.
"""

from __future__ import annotations

import jax

from structffn_jax import sharding
from structffn_jax.data import pipeline


def mean_loss(eval_step, params, alpha, manifest, split: str, batch_size: int,
              max_rows: int | None, batch_sh, mask_sh) -> tuple[float, float]:
  """(mean loss per token, tokens) of `eval_step` over the first `max_rows` rows of `split` (all
  when None), each process reading its share of every global batch. Call it under the mesh."""
  index, share_count = sharding.process_share(batch_sh, (batch_size, 1))
  total = count = 0.0
  for tokens, mask in pipeline.eval_batches(manifest, split, batch_size, max_rows,
                                            process_index=index, process_count=share_count):
    s, n = eval_step(
        params, alpha,
        jax.make_array_from_process_local_data(batch_sh, tokens, (batch_size, tokens.shape[1])),
        jax.make_array_from_process_local_data(mask_sh, mask, (batch_size,)))
    total, count = total + float(s), count + float(n)
  return total / max(count, 1.0), count
