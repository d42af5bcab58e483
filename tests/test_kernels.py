"""Every backend of kernels/api.py against the plain-einsum reference, forward and gradient.

Backends: 'xla' (block-leading batched matmuls, BlockShuffle with a hand-written backward) and
'pallas' (the GPU kernels, run here by the Pallas interpreter). Each case draws fresh random
inputs and a random output cotangent and compares y and the gradients with respect to x and
every factor. Shapes cover N < M, N > M, B in {1, 2, 4}, leading batch dimensions and, for the
kernels, tile sizes shrunk so that every loop runs over several tiles and the weight gradients
over several token splits. A last test lowers the kernels for a CUDA GPU (Triton IR, no GPU
needed), at the paper's shapes, so that a kernel that would not build on GPU fails here.

Tolerance: float32, sums of at most a few hundred products: 2e-5 of the reference's scale.
"""

import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from structffn_jax import config as config_lib
from structffn_jax import kernels, structured
from structffn_jax.kernels import pallas_triton, reference

ATOL_REL = 2e-5

# (op, x shape, factor shapes). BlockShuffle: W1 (B, q, N/B), W2 (B, M/B, q), q = min(N, M)/B.
# BlockDense: V (B, R/B, N/B), U (M, R). LowRank: V (R, N), U (M, R).
CASES = [
    ('blockshuffle', (2, 8, 16), [(4, 4, 4), (4, 12, 4)]),    # N < M, B 4
    ('blockshuffle', (24, 48), [(2, 8, 24), (2, 8, 8)]),      # N > M, B 2
    ('blockshuffle', (16, 32), [(1, 32, 32), (1, 32, 32)]),   # B 1
    ('blockshuffle', (3, 5, 12), [(4, 3, 3), (4, 9, 3)]),     # q % B != 0: xla only
    ('blockdense', (2, 8, 32), [(4, 4, 8), (16, 16)]),        # N > M, B 4
    ('blockdense', (24, 16), [(2, 8, 8), (40, 16)]),          # N < M, B 2
    ('blockdense', (16, 24), [(1, 12, 24), (8, 12)]),         # B 1
    ('lowrank', (2, 8, 24), [(8, 24), (40, 8)]),
    ('lowrank', (16, 40), [(8, 40), (24, 8)]),
]
IDS = [f'{op}-x{"x".join(map(str, xs))}-' + '-'.join('x'.join(map(str, f)) for f in fs)
       for op, xs, fs in CASES]


def _arrays(shapes, seed, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def _value_and_grads(fn, args, dy):
  """y and the gradients of <y, dy> with respect to every argument, in one jitted call."""
  def loss(*a):
    y = fn(*a)
    return jnp.vdot(y.astype(jnp.float32), dy), y
  grads, y = jax.jit(jax.grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
  return [y, *grads]


def _close(got, want, atol_rel=ATOL_REL, what=''):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, what
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=0, atol=atol_rel * scale, err_msg=what)


@pytest.fixture
def small_tiles(monkeypatch):
  """Kernel tiles of 4 (8 tokens): several tiles per loop and several token splits."""
  for name, value in (('TILE_T', 8), ('TILE_N', 4), ('TILE_K', 4), ('TILE_T_GRAD', 4)):
    monkeypatch.setattr(pallas_triton, name, value)


@pytest.mark.parametrize('implementation', ['xla', 'pallas'])
@pytest.mark.parametrize('op,x_shape,factor_shapes', CASES, ids=IDS)
def test_backend_matches_reference(op, x_shape, factor_shapes, implementation, small_tiles):
  seed = zlib.crc32(f'{op}{x_shape}{implementation}'.encode())
  args = _arrays([x_shape, *factor_shapes], seed)
  expected_impl = implementation
  on_gpu = jax.default_backend() == 'gpu'  # there the tiny tiles are unsupported: 'xla' runs
  if implementation == 'pallas' and not pallas_triton.supports(op, x_shape, *factor_shapes,
                                                            gpu=on_gpu):
    expected_impl = 'xla'  # lowrank, or a BlockShuffle whose shuffle is not whole runs
  assert kernels.resolve(op, implementation, *args) == expected_impl
  fn = lambda *a: getattr(kernels, op)(*a, implementation=implementation)
  ref = getattr(reference, op)
  y_shape = jax.eval_shape(ref, *args).shape
  (dy,) = _arrays([y_shape], seed + 1)
  got, want = _value_and_grads(fn, args, dy), _value_and_grads(ref, args, dy)
  for name, g, w in zip(['y', 'dx'] + [f'd{i}' for i in range(len(factor_shapes))], got, want):
    _close(g, w, what=f'{op} {implementation} {name}')


@pytest.mark.parametrize('op,x_shape,factor_shapes', [CASES[0], CASES[4]], ids=[IDS[0], IDS[4]])
def test_bfloat16(op, x_shape, factor_shapes):
  args = _arrays([x_shape, *factor_shapes], 7, jnp.bfloat16)
  (dy,) = _arrays([jax.eval_shape(getattr(reference, op), *args).shape], 8)
  want = _value_and_grads(getattr(reference, op), [a.astype(jnp.float32) for a in args], dy)
  for implementation in ('xla', 'pallas'):
    fn = lambda *a, impl=implementation: getattr(kernels, op)(*a, implementation=impl)
    got = _value_and_grads(fn, args, dy)
    assert [g.dtype for g in got] == [jnp.bfloat16] * len(got)
    for g, w in zip(got, want):
      _close(g, w, atol_rel=3e-2, what=f'{op} {implementation} bfloat16')


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='compiled kernels need a GPU')
@pytest.mark.parametrize('op,x_shape,factor_shapes', [
    ('blockshuffle', (512, 256), [(4, 64, 64), (4, 256, 64)]),
    ('blockshuffle', (512, 1024), [(4, 64, 256), (4, 64, 64)]),
    ('blockdense', (512, 256), [(4, 32, 64), (1024, 128)]),
    ('blockdense', (512, 1024), [(4, 32, 256), (256, 128)]),
])
def test_compiled_kernels_on_gpu(op, x_shape, factor_shapes):
  args = _arrays([x_shape, *factor_shapes], 11, jnp.bfloat16)
  assert kernels.resolve(op, 'pallas', *args) == 'pallas'
  (dy,) = _arrays([jax.eval_shape(getattr(reference, op), *args).shape], 12)
  want = _value_and_grads(getattr(reference, op), [a.astype(jnp.float32) for a in args], dy)
  got = _value_and_grads(lambda *a: getattr(kernels, op)(*a, implementation='pallas'), args, dy)
  for g, w in zip(got, want):
    _close(g, w, atol_rel=3e-2, what=f'{op} compiled')


def test_auto_is_xla_off_gpu_and_names_are_checked():
  args = _arrays([(8, 16), (4, 4, 4), (4, 12, 4)], 0)
  if jax.default_backend() != 'gpu':
    assert kernels.resolve('blockshuffle', 'auto', *args) == 'xla'
  assert kernels.resolve('blockshuffle', 'reference', *args) == 'reference'
  with pytest.raises(ValueError, match='implementation'):
    kernels.blockshuffle(*args, implementation='triton')


@pytest.mark.parametrize('method,rank,blocks', [('blockshuffle', 0, 4), ('blockdense', 16, 4),
                                                ('lowrank', 8, 1)])
def test_layers_agree_across_implementations(method, rank, blocks):
  x = _arrays([(2, 8, 32)], 3)[0]
  outs = []
  for implementation in ('xla', 'pallas', 'auto'):
    layer = structured.make_linear(method, 32, 48, rank=rank, blocks=blocks, init='gaussian',
                                   implementation=implementation, rngs=nnx.Rngs(0))
    assert layer.implementation == implementation
    outs.append(layer(x))
  dense = np.asarray(layer.to_dense(), np.float64)
  want = np.asarray(x, np.float64) @ dense.T + np.asarray(layer.bias[...], np.float64)
  for y in outs:
    _close(y, want)
  with pytest.raises(ValueError, match='implementation'):
    structured.make_linear(method, 32, 48, rank=rank, blocks=blocks, implementation='cuda',
                           rngs=nnx.Rngs(0))
  assert isinstance(structured.make_linear('dense', 8, 8, implementation='xla',
                                           rngs=nnx.Rngs(0)), structured.Dense)


def test_config_field():
  c = config_lib.base_config()
  assert c.model.ffn.implementation == 'auto'
  c.model.ffn.implementation = 'cuda'
  with pytest.raises(config_lib.ConfigError, match='implementation'):
    config_lib.validate(c)


# The paper's m size at 32% (design §6.3): fc1 and fc2 of BlockShuffle B=4 and BlockDense (4, 384),
# and an s-size BlockShuffle whose run length q/B = 48 is tiled by 16.
GPU_SHAPES = [
    ('blockshuffle', (4096, 1024), [(4, 256, 256), (4, 1024, 256)]),
    ('blockshuffle', (4096, 4096), [(4, 256, 1024), (4, 256, 256)]),
    ('blockshuffle', (4096, 768), [(4, 192, 192), (4, 768, 192)]),
    ('blockdense', (4096, 1024), [(4, 96, 256), (4096, 384)]),
    ('blockdense', (4096, 4096), [(4, 96, 1024), (1024, 384)]),
]


@pytest.mark.parametrize('op,x_shape,factor_shapes', GPU_SHAPES,
                         ids=[f'{op}-N{xs[1]}' for op, xs, _ in GPU_SHAPES])
def test_kernels_lower_for_gpu(op, x_shape, factor_shapes):
  """Forward and backward lower to Triton kernels for CUDA: no transpose pass between them."""
  from jax import export  # pylint: disable=g-import-not-at-top
  assert pallas_triton.supports(op, x_shape, *factor_shapes, gpu=True)
  specs = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in [x_shape, *factor_shapes]]
  fn = getattr(pallas_triton, op)
  y = jax.eval_shape(fn, *specs)

  def fwd_bwd(*args):
    *inputs, dy = args
    out, vjp = jax.vjp(fn, *inputs)
    return out, vjp(dy)

  triton = '__gpu$xla.gpu.triton'
  exported = export.export(jax.jit(fwd_bwd), platforms=['cuda'],
                           disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)])(
                               *specs, jax.ShapeDtypeStruct(y.shape, jnp.bfloat16))
  text = exported.mlir_module()
  assert text.count(triton) == {'blockshuffle': 6, 'blockdense': 3}[op]
  # The permutations live in the kernels' index maps: XLA transposes nothing activation-sized
  # (only the small weights, whose transposes the backward kernels read).
  largest_weight = max(np.prod(s) for s in factor_shapes)
  for dims in re.findall(r'stablehlo\.transpose.*-> tensor<([0-9x]+)x(?:bf16|f32)>', text):
    assert np.prod([int(d) for d in dims.split('x')]) <= largest_weight, dims
