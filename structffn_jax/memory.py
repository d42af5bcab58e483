"""A lower bound on a run's memory per device, checked before anything is built or written.

A config can be valid field by field and still never fit: `model.num_layers=1e9` or
`train.global_batch=1e12` would fail deep in the set-up (a MemoryError, an out-of-memory error
from XLA) after the workdir has been written. `check` refuses such a config in one line with the
estimate and the fix.

The estimate is in closed form (no model is built, so it costs nothing for any size) and kept
low on purpose, so that it refuses only what clearly cannot fit:

  parameters, their gradients and AdamW's two moments   16 bytes per float32 parameter (the
                                                        self-guided guides too), split over the
                                                        mesh's fsdp x tensor devices
  activations at the per-device batch                   the residual stream of every layer (kept
                                                        even with model.remat=full) and the
                                                        logits, in the compute dtype; or, when
                                                        larger, one residual stream and the
                                                        logits at train.eval_batch

Biases, norms, attention scores, the FFN's inner activations and XLA's temporaries are left out.
The memory available is the device's `bytes_limit` (memory_stats) on an accelerator, and the
host's physical memory, shared by its CPU devices, on the CPU.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from structffn_jax.errors import ConfigError

_DTYPE_BYTES = {'float32': 4, 'bfloat16': 2, 'float16': 2}
# Bytes per parameter in training: the float32 value, its gradient and AdamW's two moments.
TRAIN_BYTES_PER_PARAM = 4 * 4


def _weights(method: str, n: int, m: int, rank: int, blocks: int) -> int:
  """Weight count of an (n, m) FFN matrix of `method` (structured.weight_params; repeated here in
  the same closed form so that this module imports no JAX)."""
  if method == 'lowrank':
    return rank * (n + m)
  if method == 'blockdense':
    return rank * (m + n // max(blocks, 1))
  if method == 'blockshuffle':
    return min(n, m) * (n + m) // max(blocks, 1)
  return n * m


def param_counts(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(parameters, self-guided guide parameters) of `config`'s model, weights only."""
  m, f = config.model, config.model.ffn
  d, layers = m.hidden_dim, m.num_layers
  kv = m.attn_dim // m.num_heads * m.num_kv_heads
  attention = 2 * d * m.attn_dim + 2 * d * kv
  fc1_out = 2 * m.ffn_dim if m.activation == 'swiglu' else m.ffn_dim
  dense_ffn = d * fc1_out + m.ffn_dim * d
  structured = (_weights(f.method, d, fc1_out, f.rank, f.blocks)
                + _weights(f.method, m.ffn_dim, d, f.rank, f.blocks))
  structured_layers = layers - 1 if m.first_layer_dense else layers
  ffn = dense_ffn * (layers - structured_layers) + structured * structured_layers
  embeddings = m.vocab_size * d * (1 if m.tie_embeddings else 2)
  if m.position == 'absolute':
    embeddings += m.seq_len * d
  guides = 0
  if config.sgt.enabled and f.method != 'dense':
    guides = dense_ffn * structured_layers
  return embeddings + layers * attention + ffn, guides


@dataclasses.dataclass(frozen=True)
class Estimate:
  state_bytes: int  # parameters, gradients, AdamW moments (guides included), per device
  activation_bytes: int  # residual stream and logits at the per-device batch
  device_batch: int  # sequences per device per forward pass
  eval_batch: bool = False  # the activations are the evaluation's (train.eval_batch)

  @property
  def total(self) -> int:
    return self.state_bytes + self.activation_bytes


def estimate(config: ml_collections.ConfigDict, mesh_shape: dict[str, int]) -> Estimate:
  """The lower bound of the module docstring, per device of a mesh of `mesh_shape` sizes."""
  m, t = config.model, config.train
  params, guides = param_counts(config)
  model_split = max(1, mesh_shape.get('fsdp', 1) * mesh_shape.get('tensor', 1))
  batch_split = max(1, mesh_shape.get('data', 1) * mesh_shape.get('fsdp', 1))
  state = TRAIN_BYTES_PER_PARAM * (params + guides) // model_split
  batch = -(-(t.micro_batch or t.global_batch) // batch_split)
  tokens = batch * m.seq_len
  width = _DTYPE_BYTES.get(m.dtype, 4)
  vocab_split = max(1, mesh_shape.get('tensor', 1))
  residual = tokens * m.hidden_dim * (m.num_layers + 1) * width
  logits = tokens * m.vocab_size * width // vocab_split
  # An evaluation forward holds one residual stream and its logits at train.eval_batch.
  eval_batch = -(-t.eval_batch // batch_split)
  eval_tokens = eval_batch * m.seq_len
  evaluation = eval_tokens * width * (m.hidden_dim + m.vocab_size // vocab_split)
  if evaluation > residual + logits:
    return Estimate(state, evaluation, eval_batch, eval_batch=True)
  return Estimate(state, residual + logits, batch)


def available(devices) -> tuple[int | None, str]:
  """(bytes one device may use, where that figure comes from); None when it is unknown."""
  device = devices[0]
  if device.platform == 'cpu':
    try:
      host = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
      return None, 'the host'
    local = max(1, sum(1 for d in devices if d.process_index == device.process_index))
    return host // local, f'the host\'s {human_bytes(host)} over {local} CPU device(s)'
  try:
    limit = (device.memory_stats() or {}).get('bytes_limit')
  except Exception:  # pylint: disable=broad-except  (a backend without memory_stats)
    limit = None
  if not limit:
    return None, device.device_kind
  return int(limit), f'the bytes_limit of a {device.device_kind}'


def human_bytes(n: float) -> str:
  for unit, scale in (('EB', 2**60), ('PB', 2**50), ('TB', 2**40), ('GB', 2**30), ('MB', 2**20),
                      ('KB', 2**10)):
    if n >= scale:
      return f'{n / scale:.3g} {unit}'
  return f'{int(n)} B'


def check(config: ml_collections.ConfigDict, mesh_shape: dict[str, int], devices) -> Estimate:
  """Raise ConfigError, in one line with the estimate and the fix, when the run cannot fit in
  the memory of one of `devices` (a mesh of `mesh_shape` over them); returns the estimate."""
  est = estimate(config, mesh_shape)
  limit, where = available(devices)
  if limit is None or est.total <= limit:
    return est
  t = config.train
  if est.activation_bytes >= est.state_bytes and est.eval_batch:
    fix = f'lower train.eval_batch={t.eval_batch} (0 = the training batch)'
  elif est.activation_bytes >= est.state_bytes:
    if est.device_batch > 1:
      fix = (f'lower train.global_batch={t.global_batch}, or set train.micro_batch to a divisor '
             f'of it (gradient accumulation), or model.seq_len={config.model.seq_len}')
    else:
      fix = (f'lower model.seq_len={config.model.seq_len}, model.num_layers='
             f'{config.model.num_layers} or model.hidden_dim={config.model.hidden_dim}')
  else:
    fix = (f'lower model.num_layers={config.model.num_layers}, model.hidden_dim='
           f'{config.model.hidden_dim}, model.ffn_dim={config.model.ffn_dim} or '
           f'model.vocab_size={config.model.vocab_size}, or split the parameters over more '
           f'devices (mesh.fsdp, mesh.tensor)')
  raise ConfigError(
      f'memory: this run needs at least {human_bytes(est.total)} per device '
      f'({human_bytes(est.state_bytes)} of parameters, gradients and AdamW moments, '
      f'{human_bytes(est.activation_bytes)} of activations at {est.device_batch:,} sequences per '
      f'device), more than the {human_bytes(limit)} a device has ({where}); {fix}.')
