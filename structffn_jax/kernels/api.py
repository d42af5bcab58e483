"""Structured projections with a choice of implementation (design §2 layers, §8 speed).

One public function per layer kind, each `f(x, *factors, implementation='auto')` mapping
x (..., N) to (..., M) without bias, factors stored exactly as in `structured.py`, and
`blockshuffle_ffn`, a whole BlockShuffle FFN (fc1, bias, GELU, fc2, bias) as one op:

  implementation='xla'        block-leading batched matmuls (kernels/xla.py); every device.
  implementation='pallas'     Pallas kernels (kernels/pallas_gpu.py) with a hand-written
                              backward; compiled for GPUs, run in interpret mode elsewhere (slow,
                              for tests). Shapes a kernel cannot tile fall back to 'xla'.
                              LowRank is two dense matmuls and has no kernel: 'pallas' = 'xla'.
  implementation='reference'  the plain einsums of kernels/reference.py (tests, benchmarks).
  implementation='auto'       'pallas' where it was measured faster (`PALLAS_WINS`: device kind ->
                              ops, filled from `python -m structffn_jax.bench.kernels` on that
                              device) and the shape is supported; 'xla' everywhere else.

A pallas_call is not split by XLA's automatic sharding: under a multi-device jit, 'pallas' sees
whole (gathered) operands, so keep 'xla' there unless the call sits inside a shard_map.
"""

from __future__ import annotations

import jax

from structffn_jax.kernels import reference, xla

IMPLEMENTATIONS = ('auto', 'xla', 'pallas')
_ALL = IMPLEMENTATIONS + ('reference',)

# Device kinds (jax.Device.device_kind) on which the Pallas kernels beat the XLA path, per op.
# Empty until `bench.kernels` has been run on a GPU: no claim without a measurement.
PALLAS_WINS: dict[str, tuple[str, ...]] = {}


def _check(implementation):
  if implementation not in _ALL:
    raise ValueError(f'implementation={implementation!r} is unknown; use one of {_ALL}.')


def _on_gpu() -> bool:
  return jax.default_backend() == 'gpu'


def resolve(op: str, implementation: str, x, *factors) -> str:
  """The implementation that will run op on these shapes: 'xla', 'pallas' or 'reference'."""
  _check(implementation)
  if implementation in ('xla', 'reference'):
    return implementation
  if op == 'lowrank':
    return 'xla'
  if implementation == 'auto' and (
      not _on_gpu() or op not in PALLAS_WINS.get(jax.devices()[0].device_kind, ())):
    return 'xla'
  from structffn_jax.kernels import pallas_gpu  # pylint: disable=g-import-not-at-top
  supported = pallas_gpu.supports(op, x.shape, *(f.shape for f in factors), gpu=_on_gpu())
  return 'pallas' if supported else 'xla'


def _dispatch(op, x, factors, implementation):
  impl = resolve(op, implementation, x, *factors)
  if impl == 'reference':
    return getattr(reference, op)(x, *factors)
  if impl == 'pallas':
    from structffn_jax.kernels import pallas_gpu  # pylint: disable=g-import-not-at-top
    return getattr(pallas_gpu, op)(x, *factors, interpret=not _on_gpu())
  return getattr(xla, op)(x, *factors)


def lowrank(x, v, u, *, implementation: str = 'auto'):
  """y = U (V x): V (R, N), U (M, R)."""
  return _dispatch('lowrank', x, (v, u), implementation)


def blockdense(x, v, u, *, implementation: str = 'auto'):
  """Block-diagonal V (B, R/B, N/B) on the input chunks, block-major concat, then U (M, R)."""
  return _dispatch('blockdense', x, (v, u), implementation)


def blockshuffle(x, w1, w2, *, implementation: str = 'auto'):
  """Monarch: W1 (B, q, N/B), shuffle, W2 (B, M/B, q), interleaved output (design §2.4)."""
  return _dispatch('blockshuffle', x, (w1, w2), implementation)


def blockshuffle_ffn(x, w1a, w2a, b1, w1b, w2b, b2, *, implementation: str = 'auto'):
  """fc2(GELU_tanh(fc1(x) + b1)) + b2 with fc1 = BlockShuffle(W1a, W2a), fc2 = (W1b, W2b).

  Where both layers resolve to 'xla', one op with one hand-written backward (kernels/xla.py):
  the relayout between the layers is done once and fused with the GELU. Otherwise the two
  layers run one by one with `implementation` ('reference': the plain einsums).
  """
  layers = [resolve('blockshuffle', implementation, x, w1a, w2a),
            resolve('blockshuffle', implementation, x, w1b, w2b)]
  if layers == ['xla', 'xla']:
    return xla.blockshuffle_ffn(x, w1a, w2a, b1, w1b, w2b, b2)
  h = blockshuffle(x, w1a, w2a, implementation=implementation) + b1
  h = jax.nn.gelu(h, approximate=True)
  return blockshuffle(h, w1b, w2b, implementation=implementation) + b2
