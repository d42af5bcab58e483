"""Every backend of kernels/api.py against the plain-einsum reference, forward and gradient.

Backends: 'xla' (block-leading batched matmuls, BlockShuffle with a hand-written backward),
'pallas' (the GPU kernels of pallas_triton.py, run here by the Pallas interpreter) and the TPU
kernels of pallas_tpu.py (also interpreted). Each case draws fresh random inputs and a random
output cotangent and compares y and the gradients with respect to x and every factor. Shapes
cover N < M, N > M, B in {1, 2, 4}, leading batch dimensions, shapes drawn at random, and, for
the kernels, tile sizes shrunk so that every loop runs over several tiles and the weight
gradients over several token splits (or token tiles). The TPU kernels' outputs and input
gradients are also checked against float64 numpy with the layer's explicit dense matrix.
Lowering for CUDA and TPU (no device needed) is in test_lowering.py.

Tolerance: float32, sums of at most a few hundred products: 2e-5 of the reference's scale.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from structffn_jax import config as config_lib
from structffn_jax import kernels, structured
from structffn_jax.kernels import api, pallas_tpu, pallas_triton, reference

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


def _specs(shapes):
  """float32 ShapeDtypeStructs: x and the list of factors."""
  x, *factors = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  return x, factors


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
  # On a GPU or TPU the tiny tiles are unsupported: 'xla' runs there.
  x_spec, factor_specs = _specs([x_shape, *factor_shapes])
  if implementation == 'pallas' and (
      op == 'lowrank' or not api._pallas_supports(api.platform(), op, x_spec, factor_specs)):
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


@pytest.mark.skipif(jax.default_backend() != 'tpu', reason='compiled kernels need a TPU')
@pytest.mark.parametrize('op,x_shape,factor_shapes', [
    ('blockshuffle', (512, 256), [(2, 128, 128), (2, 512, 128)]),
    ('blockshuffle', (512, 1024), [(4, 64, 256), (4, 64, 64)]),
    ('blockdense', (512, 256), [(2, 64, 128), (1024, 128)]),
    ('blockdense', (512, 1024), [(4, 32, 256), (256, 128)]),
])
def test_compiled_kernels_on_tpu(op, x_shape, factor_shapes):
  args = _arrays([x_shape, *factor_shapes], 13, jnp.bfloat16)
  assert kernels.resolve(op, 'pallas', *args) == 'pallas'
  (dy,) = _arrays([jax.eval_shape(getattr(reference, op), *args).shape], 14)
  want = _value_and_grads(getattr(reference, op), [a.astype(jnp.float32) for a in args], dy)
  got = _value_and_grads(lambda *a: getattr(kernels, op)(*a, implementation='pallas'), args, dy)
  for g, w in zip(got, want):
    _close(g, w, atol_rel=3e-2, what=f'{op} compiled on TPU')


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


# ----------------------------------------------------------------------------- TPU kernels


@pytest.fixture
def small_tpu_tiles(monkeypatch):
  """TPU kernel tiles of 4 tokens (8 in the forward) and 4 output columns: several of each."""
  for name, value in (('TILE_T', 8), ('TILE_T_GRAD', 4), ('TILE_S', 4)):
    monkeypatch.setattr(pallas_tpu, name, value)


def _random_case(op, seed):
  """(x shape, factor shapes) drawn at random: B in {1, 2, 4}, N < M or N > M, 3..36 tokens."""
  rng = np.random.default_rng(seed)
  b = int(rng.choice([1, 2, 4]))
  lead = (int(rng.integers(1, 4)), int(rng.integers(3, 13)))
  if op == 'blockshuffle':  # q = min(N, M)/B, a multiple of B
    small, large = b * int(rng.integers(1, 4)), b * int(rng.integers(4, 7))
    p, s = (small, large) if rng.random() < 0.5 else (large, small)
    q = min(p, s)
    return (*lead, b * p), [(b, q, p), (b, s, q)]
  r, p, m = (int(d) for d in rng.integers(1, 9, size=3))
  return (*lead, b * p), [(b, r, p), (m + 4, b * r)]


TPU_CASES = [c for c in CASES if c[0] != 'lowrank' and c is not CASES[3]] + [
    (op, *_random_case(op, seed)) for op in ('blockshuffle', 'blockdense') for seed in (1, 2)]


def _dense64(op, factors):
  """The layer's (M, N) matrix in float64 numpy, from its factors (the identity's image)."""
  n = factors[0].shape[0] * factors[0].shape[2]
  eye = np.eye(n, dtype=np.float64)
  if op == 'blockshuffle':
    w1, w2 = (np.asarray(f, np.float64) for f in factors)
    b, q, p = w1.shape
    h = np.einsum('nbp,bqp->nbq', eye.reshape(n, b, p), w1).reshape(n, q, b)
    y = np.einsum('ntj,jst->nsj', h, w2).reshape(n, -1)
  else:
    v, u = (np.asarray(f, np.float64) for f in factors)
    b, r, p = v.shape
    y = np.einsum('nbp,brp->nbr', eye.reshape(n, b, p), v).reshape(n, b * r) @ u.T
  return y.T


@pytest.mark.parametrize('op,x_shape,factor_shapes', TPU_CASES,
                         ids=[f'{op}-x{"x".join(map(str, xs))}-' + '-'.join('x'.join(map(str, f))
                                                                          for f in fs)
                              for op, xs, fs in TPU_CASES])
def test_tpu_kernels_match_reference(op, x_shape, factor_shapes, small_tpu_tiles):
  seed = zlib.crc32(f'tpu{op}{x_shape}{factor_shapes}'.encode())
  args = _arrays([x_shape, *factor_shapes], seed)
  assert pallas_tpu.supports(op, x_shape, *factor_shapes, tpu=False)
  fn = lambda *a: getattr(pallas_tpu, op)(*a, interpret=True)
  ref = getattr(reference, op)
  (dy,) = _arrays([jax.eval_shape(ref, *args).shape], seed + 1)
  got, want = _value_and_grads(fn, args, dy), _value_and_grads(ref, args, dy)
  for name, g, w in zip(['y', 'dx'] + [f'd{i}' for i in range(len(factor_shapes))], got, want):
    _close(g, w, what=f'{op} tpu {name}')
  # Independent of reference.py: y = x Wᵀ and dx = dy W with W the explicit dense matrix.
  w64 = _dense64(op, args[1:])
  x64 = np.asarray(args[0], np.float64).reshape(-1, w64.shape[1])
  dy64 = np.asarray(dy, np.float64).reshape(-1, w64.shape[0])
  _close(got[0].reshape(-1, w64.shape[0]), x64 @ w64.T, what=f'{op} tpu y vs dense')
  _close(got[1].reshape(-1, w64.shape[1]), dy64 @ w64, what=f'{op} tpu dx vs dense')


def test_tpu_supports_only_mosaic_aligned_shapes():
  # The paper's m size at 32%: every block's last dimensions are whole or multiples of 128.
  assert pallas_tpu.supports('blockshuffle', (4096, 1024), (4, 256, 256), (4, 1024, 256),
                             tpu=True)
  assert pallas_tpu.supports('blockdense', (4096, 1024), (4, 96, 256), (4096, 384), tpu=True)
  # s size: input chunks of 768/4 = 192 columns are not lane-aligned, so 'xla' runs there.
  assert not pallas_tpu.supports('blockshuffle', (4096, 768), (4, 192, 192), (4, 768, 192),
                                 tpu=True)
  assert not pallas_tpu.supports('blockshuffle', (4096, 1024), (4, 6, 256), (4, 1024, 6),
                                 tpu=True)  # q % B != 0
  with api.target_platform('tpu'):
    x, factors = _specs([(4096, 768), (4, 192, 192), (4, 768, 192)])
    assert kernels.resolve('blockshuffle', 'pallas', x, *factors) == 'xla'
    x, factors = _specs([(4096, 1024), (4, 256, 256), (4, 1024, 256)])
    assert kernels.resolve('blockshuffle', 'pallas', x, *factors) == 'pallas'
    assert kernels.resolve('blockshuffle', 'auto', x, *factors) == 'xla'  # no TPU measurement
