"""Structured projections with a choice of implementation (design §2 layers, §8 speed).

One public function per layer kind, each `f(x, *factors, implementation='auto')` mapping
x (..., N) to (..., M) without bias, factors stored exactly as in `structured.py`, and
`blockshuffle_ffn`, a whole BlockShuffle FFN (fc1, bias, GELU, fc2, bias) as one op:

  implementation='xla'        block-leading batched matmuls (kernels/xla.py); every device.
  implementation='pallas'     Pallas kernels with a hand-written backward: the Triton lowering
                              (kernels/pallas_triton.py) compiled on GPUs, the Mosaic one
                              (kernels/pallas_tpu.py) compiled on TPUs, and the Triton kernels in
                              interpret mode elsewhere (slow, for tests). Shapes a kernel cannot
                              tile fall back to 'xla'. LowRank is two dense matmuls and has no
                              kernel: 'pallas' = 'xla'.
  implementation='reference'  the plain einsums of kernels/reference.py (tests, benchmarks).
  implementation='auto'       'pallas' where it was measured faster (`PALLAS_WINS`: device kind ->
                              ops, filled from `python -m structffn_jax.bench.kernels` on that
                              GPU or TPU) and the shape is supported; 'xla' everywhere else.

The platform is the default backend's, or the one `target_platform` sets while tracing for
`jax.export` to another platform (the lowering tests).

A pallas_call is not split by XLA's automatic sharding (Mosaic does not lower at all under a
multi-device jit): on a mesh, 'pallas' runs the kernels inside a shard_map over the batch axes
(`on_mesh`), each device on its own rows with the whole factors (gathered, as FSDP does anyway;
a tensor-parallel split of the factors is undone for the call).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax

from structffn_jax import sharding
from structffn_jax.kernels import reference, xla
from structffn_jax.schema import FFN_IMPLEMENTATIONS as IMPLEMENTATIONS
_ALL = IMPLEMENTATIONS + ('reference',)

# Device kinds (jax.Device.device_kind) on which the Pallas kernels beat the XLA path, per op.
# Empty until `bench.kernels` has been run on a GPU or TPU: no claim without a measurement.
PALLAS_WINS: dict[str, tuple[str, ...]] = {}


def _check(implementation):
  if implementation not in _ALL:
    raise ValueError(f'implementation={implementation!r} is unknown; use one of {_ALL}.')


_TARGET = contextvars.ContextVar('structffn_target_platform', default=None)
_PLATFORM_NAMES = {'cuda': 'gpu', 'rocm': 'gpu', 'gpu': 'gpu', 'tpu': 'tpu', 'cpu': 'cpu'}


def platform() -> str:
  """'gpu', 'tpu' or 'cpu': the platform the code being traced is for (the default backend
  unless `target_platform` says otherwise)."""
  return _TARGET.get() or _PLATFORM_NAMES.get(jax.default_backend(), jax.default_backend())


@contextlib.contextmanager
def target_platform(name: str):
  """Trace for platform `name` ('cuda', 'rocm', 'gpu', 'tpu' or 'cpu') instead of the default
  backend: the kernels and attention pick that platform's lowering, compiled rather than
  interpreted. For `jax.export(..., platforms=[name])` from another machine. The choice is made
  while tracing, and a jitted function's trace cache does not know of it: trace a fresh function
  for each platform."""
  if name not in _PLATFORM_NAMES:
    raise ValueError(f'target_platform: {name!r} is unknown; use one of {tuple(_PLATFORM_NAMES)}.')
  token = _TARGET.set(_PLATFORM_NAMES[name])
  try:
    yield
  finally:
    _TARGET.reset(token)


def _pallas_module(target: str):
  """The kernels for `target`: Mosaic on TPU, Triton elsewhere (interpreted off GPU)."""
  if target == 'tpu':
    from structffn_jax.kernels import pallas_tpu  # pylint: disable=g-import-not-at-top
    return pallas_tpu
  from structffn_jax.kernels import pallas_triton  # pylint: disable=g-import-not-at-top
  return pallas_triton


def _pallas_supports(target: str, op: str, x, factors) -> bool:
  shapes = (x.shape, *(f.shape for f in factors))
  if target == 'tpu':
    return _pallas_module(target).supports(op, *shapes, tpu=True)
  return _pallas_module(target).supports(op, *shapes, gpu=target == 'gpu')


def resolve(op: str, implementation: str, x, *factors) -> str:
  """The implementation that will run op on these shapes: 'xla', 'pallas' or 'reference'."""
  _check(implementation)
  if implementation in ('xla', 'reference'):
    return implementation
  if op == 'lowrank':
    return 'xla'
  target = platform()
  if implementation == 'auto' and (
      target not in ('gpu', 'tpu')
      or op not in PALLAS_WINS.get(jax.devices()[0].device_kind, ())):
    return 'xla'
  return 'pallas' if _pallas_supports(target, op, x, factors) else 'xla'


def on_mesh(fn, args, axes, out_axes):
  """fn(*args) run per device inside a `shard_map` when a (data, fsdp, tensor) mesh is set
  (`jax.set_mesh`), else fn(*args) as it is.

  A pallas_call cannot be split by XLA's automatic partitioning (Mosaic refuses to lower under
  a multi-device jit; Triton sees whole, gathered operands). axes: for each argument, the
  logical name of each dimension (None: whole on every device), mapped to mesh axes by the
  rules `sharding.constrain` reads; out_axes likewise for the result. A logical name whose mesh
  axes do not divide every dimension that carries it stays whole.
  """
  if not sharding.mesh_is_set():
    return fn(*args)
  in_specs, out_specs = sharding.per_device_specs([arg.shape for arg in args], axes, out_axes)
  return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


def _dispatch(op, x, factors, implementation):
  impl = resolve(op, implementation, x, *factors)
  if impl == 'reference':
    return getattr(reference, op)(x, *factors)
  if impl == 'pallas':
    target = platform()
    kernel = functools.partial(getattr(_pallas_module(target), op),
                               interpret=target not in ('gpu', 'tpu'))
    # Each device runs the kernels on its own rows (batch axes), with the whole factors.
    lead = ('batch',) + (None,) * (x.ndim - 2)
    return on_mesh(kernel, (x, *factors), [lead + (None,)] + [(None,) * f.ndim for f in factors],
                   lead + (None,))
  return getattr(xla, op)(x, *factors)


def lowrank(x, v, u, *, implementation: str = 'auto'):
  """y = U (V x): V (R, N), U (M, R)."""
  return _dispatch('lowrank', x, (v, u), implementation)


def blockdense(x, v, u, *, implementation: str = 'auto'):
  """Block-diagonal V (C, R/C, N/C) on the input chunks, block-major concat, then U (M, R)."""
  return _dispatch('blockdense', x, (v, u), implementation)


def blockshuffle(x, w1, w2, *, implementation: str = 'auto'):
  """Monarch: W1 (C, q, N/C), shuffle, W2 (C, M/C, q), interleaved output (design §2.4)."""
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
