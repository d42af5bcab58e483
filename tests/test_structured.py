"""Structured linear layers (docs/design.md §2) and self-guided training inside a layer (§3).

Every layer is checked against an independent float64 numpy construction from its stored factors
(explicit loops that follow the design's words), against its own `to_dense()`, and against closed
forms for shapes and parameter counts. Tolerances are float32 ones: a float32 layer accumulates
at most a few dozen products per output, so its relative error is ~1e-6; 1e-5 relative to the
output scale leaves a margin of 10 and still catches any wrong index (errors of order 1).
"""

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from structffn_jax import structured

RTOL = 1e-5
ATOL_REL = 1e-5  # absolute tolerance as a fraction of the reference's largest entry

# (method, in N, out M, rank R, blocks B): N < M, N > M and N = M, B in {1, 2, 4}.
CASES = [
    ('dense', 12, 20, 0, 1),
    ('dense', 20, 12, 0, 1),
    ('dense', 16, 16, 0, 1),
    ('lowrank', 8, 24, 3, 1),
    ('lowrank', 24, 8, 5, 1),
    ('lowrank', 16, 16, 16, 1),
    ('blockdense', 8, 24, 4, 2),
    ('blockdense', 32, 16, 8, 4),
    ('blockdense', 16, 16, 8, 1),
    ('blockdense', 12, 20, 12, 4),
    ('blockshuffle', 8, 24, 0, 2),
    ('blockshuffle', 32, 16, 0, 4),
    ('blockshuffle', 16, 16, 0, 1),
    ('blockshuffle', 16, 16, 0, 4),
    ('blockshuffle', 12, 36, 0, 4),
    ('blockshuffle', 36, 12, 0, 2),
]
CASE_IDS = [f'{m}-N{n}-M{o}-R{r}-B{b}' for m, n, o, r, b in CASES]
STRUCTURED_CASES = [c for c in CASES if c[0] != 'dense']
STRUCTURED_IDS = [i for c, i in zip(CASES, CASE_IDS) if c[0] != 'dense']


def make(method, n, m, r, b, seed=0, init='gaussian', **kw):
  """The layer, really initialised. Gaussian unless a test is about the paper's init (each new
  shape of the paper's SVD-based init costs a CPU compilation of seconds)."""
  return structured.make_linear(method, n, m, rank=r, blocks=b, init=init,
                                rngs=nnx.Rngs(seed), **kw)


def make_random(method, n, m, r, b, seed=0, **kw):
  """The layer's structure with every parameter (factors, bias, guide) drawn by numpy.

  Built abstractly (nnx.eval_shape) and filled: tests of what a layer computes need its
  structure, not its initialisers, and skipping those saves a compilation per shape.
  """
  layer = nnx.eval_shape(lambda: make(method, n, m, r, b, **kw))
  rng = np.random.default_rng(zlib.crc32(f'{method}{n}{m}{r}{b}{seed}'.encode()))
  for _, v in nnx.iter_graph(layer):
    if isinstance(v, nnx.Variable):
      v.set_value(jnp.asarray(rng.standard_normal(v.shape) / math.sqrt(v.shape[-1]),
                              jnp.float32))
  return layer


def f64(p):
  return np.asarray(p[...], np.float64)


def factors(layer, method):
  if method == 'dense':
    return {'kernel': f64(layer.kernel)}
  if method in ('lowrank', 'blockdense'):
    return {'v': f64(layer.v), 'u': f64(layer.u)}
  return {'w1': f64(layer.w1), 'w2': f64(layer.w2)}


def ref_apply_vector(method, fac, x, blocks):
  """One input vector x (N,) -> y (M,), written from design §2 with explicit loops, float64."""
  n = x.shape[0]
  if method == 'dense':
    w = fac['kernel']
    return np.array([sum(w[i, j] * x[j] for j in range(n)) for i in range(w.shape[0])])
  if method == 'lowrank':
    return fac['u'] @ (fac['v'] @ x)
  if method == 'blockdense':
    v, u = fac['v'], fac['u']
    p = n // blocks
    h = []
    for i in range(blocks):  # chunk i times V_b[i], concatenated block-major
      h.extend(v[i] @ x[i * p:(i + 1) * p])
    return u @ np.array(h)
  # BlockShuffle, k = l = B.
  w1, w2 = fac['w1'], fac['w2']
  k = l = blocks
  p = n // k
  q = w1.shape[1]
  s = w2.shape[1]
  h = [w1[i] @ x[i * p:(i + 1) * p] for i in range(k)]  # h[i] = W1[i] x[i] -> (k, q)
  flat = [h[i][c] for i in range(k) for c in range(q)]  # flatten block-major, length k*q
  r = k * q // l
  view = [[flat[a * l + b] for b in range(l)] for a in range(r)]  # (r, l) row-major
  h2 = [[view[a][j] for a in range(r)] for j in range(l)]  # transpose to (l, r)
  u = [w2[j] @ np.array(h2[j]) for j in range(l)]  # u[j] = W2[j] h'[j] -> (l, s)
  y = np.zeros(l * s)
  for j in range(l):
    for t in range(s):
      y[t * l + j] = u[j][t]  # interleaved output
  return y


def ref_apply(method, fac, x, blocks):
  flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
  out = np.stack([ref_apply_vector(method, fac, v, blocks) for v in flat])
  return out.reshape(*x.shape[:-1], -1)


def block_diag(blocks):
  rows = sum(b.shape[0] for b in blocks)
  cols = sum(b.shape[1] for b in blocks)
  out = np.zeros((rows, cols))
  r = c = 0
  for b in blocks:
    out[r:r + b.shape[0], c:c + b.shape[1]] = b
    r, c = r + b.shape[0], c + b.shape[1]
  return out


def close(actual, desired, rtol=RTOL, atol_rel=ATOL_REL):
  desired = np.asarray(desired, np.float64)
  np.testing.assert_allclose(np.asarray(actual, np.float64), desired, rtol=rtol,
                             atol=atol_rel * np.abs(desired).max())


# ----------------------------------------------------------------------------- forward

# One compiled program per layer structure: outputs for two leading shapes, and to_dense().
_apply = nnx.jit(lambda layer, xa, xb: (layer(xa), layer(xb), layer.to_dense()))


@pytest.mark.parametrize('method,n,m,r,b', CASES, ids=CASE_IDS)
def test_forward_matches_numpy_reference_and_to_dense(method, n, m, r, b):
  layer = make_random(method, n, m, r, b, seed=1)
  fac = factors(layer, method)
  bias = f64(layer.bias)
  rng = np.random.default_rng(zlib.crc32(f'{method}{n}{m}{r}{b}'.encode()))
  xa = rng.standard_normal((5, n)).astype(np.float32)
  xb = rng.standard_normal((2, 3, n)).astype(np.float32)
  ya, yb, dense = _apply(layer, jnp.asarray(xa), jnp.asarray(xb))
  dense = np.asarray(dense, np.float64)
  assert dense.shape == (m, n)
  # to_dense() against the reference applied to unit vectors (column j = layer(e_j)).
  close(dense, ref_apply(method, fac, np.eye(n), b).T)
  for x, y in ((xa, ya), (xb, yb)):
    assert y.shape == x.shape[:-1] + (m,) and y.dtype == jnp.float32
    close(y, ref_apply(method, fac, x, b) + bias)  # explicit loops from design §2
    close(y, x.astype(np.float64) @ dense.T + bias)  # the layer applies its to_dense()


@pytest.mark.parametrize('n,m,b', [(8, 24, 2), (32, 16, 4), (16, 16, 1), (16, 16, 4),
                                   (12, 36, 4), (36, 12, 2)])
def test_blockshuffle_to_dense_is_permuted_monarch_product(n, m, b):
  layer = make_random('blockshuffle', n, m, 0, b, seed=3)
  w1, w2 = f64(layer.w1), f64(layer.w2)
  q, s = min(n, m) // b, m // b
  # Shuffle: second-stage block j, position a reads flat(h)[a*B + j].
  perm = np.zeros((b * q, b * q))
  for j in range(b):
    for a in range(q):
      perm[j * q + a, a * b + j] = 1
  # Interleave: y[t*B + j] = (block-major output)[j*s + t].
  perm_out = np.zeros((m, m))
  for j in range(b):
    for t in range(s):
      perm_out[t * b + j, j * s + t] = 1
  ref = perm_out @ block_diag(list(w2)) @ perm @ block_diag(list(w1))
  close(_apply(layer, jnp.ones((1, n)), jnp.ones((1, n)))[2], ref)
  if b > 1:  # the permutations matter: without them the matrix is a different one
    assert np.abs(block_diag(list(w2)) @ block_diag(list(w1)) - ref).max() > 0.1 * np.abs(ref).max()


def test_eager_matches_jit():
  layer = make_random('blockshuffle', 32, 16, 0, 4, seed=4)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 32)), jnp.float32)
  y, _, dense = _apply(layer, x, x)
  close(layer(x), y)
  close(layer.to_dense(), dense)


def test_wrong_input_width_raises():
  layer = make_random('lowrank', 16, 8, 4, 1)
  with pytest.raises(ValueError, match='in_features=16'):
    layer(jnp.ones((2, 15)))


# ----------------------------------------------------------------------------- shapes, counts


def closed_form_params(method, n, m, r, b):
  return {'dense': n * m, 'lowrank': r * (n + m), 'blockdense': r * (m + n // b),
          'blockshuffle': min(n, m) * (n + m) // b}[method]


def expected_shapes(method, n, m, r, b):
  if method == 'dense':
    return {'kernel': (m, n)}
  if method == 'lowrank':
    return {'v': (r, n), 'u': (m, r)}
  if method == 'blockdense':
    return {'v': (b, r // b, n // b), 'u': (m, r)}
  if n < m:
    return {'w1': (b, n // b, n // b), 'w2': (b, m // b, n // b)}
  return {'w1': (b, m // b, n // b), 'w2': (b, m // b, m // b)}


def param_leaves(layer):
  return {str(path[-1]): v for path, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))}


@pytest.mark.parametrize('use_bias', [True, False])
@pytest.mark.parametrize('method,n,m,r,b', CASES, ids=CASE_IDS)
def test_factor_shapes_and_param_counts(method, n, m, r, b, use_bias):
  layer = nnx.eval_shape(lambda: make(method, n, m, r, b, use_bias=use_bias))
  leaves = param_leaves(layer)
  shapes = expected_shapes(method, n, m, r, b)
  assert {k: tuple(v.shape) for k, v in leaves.items() if k != 'bias'} == shapes
  assert all(v.dtype == jnp.float32 for v in leaves.values())
  closed = closed_form_params(method, n, m, r, b)
  assert sum(math.prod(s) for s in shapes.values()) == closed  # design §2's table is consistent
  assert layer.num_weight_params() == closed
  assert structured.weight_params(method, n, m, rank=r, blocks=b) == closed
  total = sum(math.prod(v.shape) for v in leaves.values())
  if use_bias:
    assert leaves['bias'].shape == (m,)
    assert total == closed + m
  else:
    assert 'bias' not in leaves and layer.bias is None
    assert total == closed
  with_guide = nnx.eval_shape(lambda: make(method, n, m, r, b, use_bias=use_bias,
                                           guide=method != 'dense'))
  if method != 'dense':
    assert param_leaves(with_guide)['guide'].shape == (m, n)
    assert with_guide.num_weight_params() == closed + m * n


@pytest.mark.parametrize('method,n,m,r,b', [CASES[4], CASES[7], CASES[11]],
                         ids=[CASE_IDS[4], CASE_IDS[7], CASE_IDS[11]])
def test_no_bias_has_no_offset(method, n, m, r, b):
  layer = make_random(method, n, m, r, b, use_bias=False, seed=5)
  x = np.random.default_rng(1).standard_normal((4, n)).astype(np.float32)
  y = np.asarray(layer(jnp.asarray(x)), np.float64)
  close(y, ref_apply(method, factors(layer, method), x, b))
  # Linear with no offset: f(2x - x') = 2 f(x) - f(x').
  close(layer(jnp.asarray(2 * x[:2] - x[2:])), 2 * y[:2] - y[2:], atol_rel=1e-5)


# ----------------------------------------------------------------------------- initialisation

STD = 0.02


def assert_std(values, std=STD):
  """Sample mean and std of n iid N(0, std^2) draws within 5 standard errors."""
  v = np.asarray(values, np.float64).ravel()
  n = v.size
  assert abs(v.mean()) < 5 * std / math.sqrt(n), (v.mean(), n)
  assert abs(v.std() - std) < 5 * std / math.sqrt(2 * n), (v.std(), n)


def svals(w):
  return np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)


@pytest.mark.parametrize('method,rank,blocks', [('dense', 0, 1), ('lowrank', 96, 1),
                                                ('blockdense', 96, 4), ('blockshuffle', 0, 4)])
def test_gaussian_init_std_and_not_orthogonal(method, rank, blocks):
  n, m = 256, 384
  layer = make(method, n, m, rank, blocks, seed=6, guide=method != 'dense')
  if method != 'dense':  # the self-guided guide starts as the layer's exact dense matrix
    close(layer.guide[...], ref_apply(method, factors(layer, method), np.eye(n), blocks).T)
  for name, w in factors(layer, method).items():
    assert_std(w)
    mats = w.reshape(-1, *w.shape[-2:])
    sv = np.concatenate([svals(a) for a in mats])
    assert sv.max() / sv.min() > 2, name  # a Gaussian matrix is far from orthogonal
  np.testing.assert_array_equal(np.asarray(layer.bias[...]), 0)
  if method == 'lowrank':  # not the svd init: V V^T is far from diagonal
    gram = f64(layer.v) @ f64(layer.v).T
    off = gram - np.diag(np.diag(gram))
    assert np.abs(off).max() > 0.05 * np.diag(gram).max()


def test_dense_init_and_std_option():
  assert_std(make('dense', 256, 384, 0, 1, seed=7, init='paper').kernel[...])
  assert_std(make('dense', 256, 384, 0, 1, seed=13, std=0.1).kernel[...], 0.1)


# Block shapes shared between the two block layers: each SVD shape compiles once.
@pytest.mark.parametrize('n,m,b', [(32, 64, 2), (64, 32, 2)])
def test_blockshuffle_paper_init_orthogonal(n, m, b):
  layer = make('blockshuffle', n, m, 0, b, seed=8, init='paper')
  for w in (f64(layer.w1), f64(layer.w2)):
    for block in w:
      np.testing.assert_allclose(svals(block), 1.0, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(layer.bias[...]), 0)


@pytest.mark.parametrize('n,m,r,b', [(32, 64, 32, 2), (64, 32, 32, 2)])
def test_blockdense_paper_init_orthogonal(n, m, r, b):
  layer = make('blockdense', n, m, r, b, seed=9, init='paper')
  for block in f64(layer.v):
    np.testing.assert_allclose(svals(block), 1.0, atol=1e-5)
  np.testing.assert_allclose(svals(layer.u[...]), 1.0, atol=1e-5)  # the dense U too
  np.testing.assert_array_equal(np.asarray(layer.bias[...]), 0)


# LowRank shapes: (in, out, rank); the svd of the (out, in) draw compiles once per shape.
LOWRANK_SVD = [(48, 80, 12), (80, 48, 20)]


@pytest.mark.parametrize('n,m,r', LOWRANK_SVD)
def test_lowrank_paper_init_is_balanced_svd(n, m, r):
  layer = make('lowrank', n, m, r, 1, seed=10, init='paper')
  v, u = f64(layer.v), f64(layer.u)
  gram_v, gram_u = v @ v.T, u.T @ u  # V = sqrt(S) Vh, U = U sqrt(S): both diag(S)
  s = np.diag(gram_v)
  scale = s.max()
  np.testing.assert_allclose(gram_v, np.diag(s), atol=1e-5 * scale)
  np.testing.assert_allclose(gram_u, np.diag(s), atol=1e-5 * scale)
  assert np.all(np.diff(s) <= 1e-6 * scale) and s.min() > 0  # descending, positive
  # S are the top singular values of U V (which is rank r).
  np.testing.assert_allclose(svals(u @ v)[:r], s, rtol=1e-4)
  # Top singular value of an (m, n) N(0, std^2) matrix is about std (sqrt(m) + sqrt(n)).
  edge = STD * (math.sqrt(m) + math.sqrt(n))
  assert 0.85 * edge < s[0] < 1.15 * edge
  np.testing.assert_array_equal(np.asarray(layer.bias[...]), 0)


@pytest.mark.parametrize('n,m,r', LOWRANK_SVD)
def test_lowrank_paper_init_is_truncation_of_a_gaussian_draw(n, m, r):
  """Full-rank 'svd' init reproduces the Gaussian draw; rank r is its best rank-r truncation."""
  full = make('lowrank', n, m, min(n, m), 1, seed=11, init='paper')
  draw = f64(full.u) @ f64(full.v)
  assert_std(draw)
  uu, ss, vh = np.linalg.svd(draw, full_matrices=False)
  truncated = (uu[:, :r] * ss[:r]) @ vh[:r]
  low = make('lowrank', n, m, r, 1, seed=11, init='paper')
  # Subspace error of a float32 SVD is ~ eps * |A| / gap(s_r, s_r+1).
  tol = 50 * 1.2e-7 * ss[0] / (ss[r - 1] - ss[r]) * np.abs(truncated).max()
  np.testing.assert_allclose(f64(low.u) @ f64(low.v), truncated, atol=max(tol, 1e-7))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize('method,n,m,r,b,match', [
    ('blockshuffle', 10, 16, 0, 4, r'BlockShuffle.*in_features=10.*blocks=4'),
    ('blockshuffle', 16, 18, 0, 4, r'BlockShuffle.*out_features=18.*blocks=4'),
    ('blockshuffle', 16, 16, 0, 0, r'BlockShuffle.*blocks=0'),
    ('blockdense', 10, 16, 4, 4, r'BlockDense.*in_features=10.*blocks=4'),
    ('blockdense', 16, 16, 6, 4, r'BlockDense.*rank=6.*blocks=4'),
    ('blockdense', 16, 8, 12, 2, r'BlockDense.*rank=12.*out_features=8'),
    ('blockdense', 8, 32, 16, 2, r'BlockDense.*rank'),
    ('lowrank', 16, 8, 0, 1, r'LowRank.*rank=0.*\[1, 8\]'),
    ('lowrank', 16, 8, 9, 1, r'LowRank.*rank=9.*\[1, 8\]'),
    ('lowrank', 8, 16, 9, 1, r'LowRank.*rank=9.*\[1, 8\]'),
])
def test_bad_sizes_raise_naming_layer_and_sizes(method, n, m, r, b, match):
  with pytest.raises(ValueError, match=match):
    make(method, n, m, r, b)


def test_unknown_method_and_init_raise():
  with pytest.raises(ValueError, match=r"method='butterfly'.*dense, lowrank"):
    make('butterfly', 8, 8, 2, 1)
  with pytest.raises(ValueError, match=r"LowRank: init='ortho'.*paper"):
    make('lowrank', 8, 8, 2, 1, init='ortho')
  with pytest.raises(ValueError, match=r"BlockShuffle: init='xavier'"):
    make('blockshuffle', 8, 8, 0, 2, init='xavier')
  with pytest.raises(ValueError, match='Dense'):
    make('dense', 8, 8, 0, 1, guide=True)


# ----------------------------------------------------------------------------- self-guided


def guided(method, n, m, r, b, seed, reduce_flop=False):
  """A guided layer whose guide and bias are random: the guide differs from the structure."""
  layer = make_random(method, n, m, r, b, seed=seed, guide=True, reduce_flop=reduce_flop)
  return layer, f64(layer.guide), f64(layer.bias)


GUIDE_INIT = [1, 8]  # N > M (test_gaussian_init_std_and_not_orthogonal has N < M)


@pytest.mark.parametrize('method,n,m,r,b', [STRUCTURED_CASES[i] for i in GUIDE_INIT],
                         ids=[STRUCTURED_IDS[i] for i in GUIDE_INIT])
def test_guide_initialised_to_exact_dense(method, n, m, r, b):
  layer = make(method, n, m, r, b, seed=14, guide=True)
  assert layer.guide.shape == (m, n)
  close(layer.guide[...], ref_apply(method, factors(layer, method), np.eye(n), b).T)
  assert layer.num_weight_params() == closed_form_params(method, n, m, r, b) + m * n
  # At init the guided output equals the structured one for every alpha.
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, n)), jnp.float32)
  outs = _guide_apply(layer, x)
  np.testing.assert_allclose(np.asarray(layer.guide[...]), np.asarray(outs[-1]),
                             rtol=1e-6, atol=1e-7)
  plain = ref_apply(method, factors(layer, method), np.asarray(x), b)
  for y in outs[:-1]:
    close(y, plain)


_guide_apply = nnx.jit(lambda layer, x: (layer(x, alpha=0.0), layer(x, alpha=0.4),
                                         layer(x, alpha=1.0), layer.to_dense()))


@pytest.mark.parametrize('method,n,m,r,b', [STRUCTURED_CASES[i] for i in (0, 4, 8, 11)],
                         ids=[STRUCTURED_IDS[i] for i in (0, 4, 8, 11)])
def test_guide_mixing(method, n, m, r, b):
  layer, g, bias = guided(method, n, m, r, b, seed=15)
  x = np.random.default_rng(2).standard_normal((2, 3, n)).astype(np.float32)
  xs = x.astype(np.float64)
  struct = ref_apply(method, factors(layer, method), x, b)
  dense = xs @ g.T
  assert np.abs(dense - struct).max() > 0.1 * np.abs(dense).max()  # branches distinguishable
  close(layer(jnp.asarray(x), alpha=1.0), dense + bias)
  close(layer(jnp.asarray(x), alpha=0.0), struct + bias)
  close(layer(jnp.asarray(x), alpha=0.3), 0.3 * dense + 0.7 * struct + bias)
  close(layer(jnp.asarray(x), alpha=jnp.float32(0.3)), 0.3 * dense + 0.7 * struct + bias)
  with pytest.raises(ValueError, match='alpha'):
    layer(jnp.asarray(x))


def test_guide_gradients_flow_to_guide_and_factors():
  layer, g, _ = guided('lowrank', 8, 12, 3, 1, seed=16)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 8)), jnp.float32)
  grads = nnx.grad(lambda l: jnp.sum(l(x, alpha=0.3) ** 2))(layer)
  gy = 2 * np.asarray(layer(x, alpha=0.3), np.float64)  # dL/dy
  close(grads.guide[...], 0.3 * gy.T @ np.asarray(x, np.float64))
  assert np.abs(np.asarray(grads.v[...])).max() > 0


def _branch_sampler(layer, x):
  """keys, alpha -> the layer's output for each key (one compilation for every alpha)."""
  graphdef, state = nnx.split(layer)
  call = lambda k, a: nnx.merge(graphdef, state)(x, alpha=a, key=k)
  fn = jax.jit(jax.vmap(call, in_axes=(0, None)))
  return lambda keys, alpha: np.asarray(fn(keys, jnp.float32(alpha)), np.float64)


@pytest.mark.parametrize('method,n,m,r,b', [STRUCTURED_CASES[0], STRUCTURED_CASES[10]],
                         ids=[STRUCTURED_IDS[0], STRUCTURED_IDS[10]])
def test_reduce_flop_branch_frequency_and_outputs(method, n, m, r, b):
  layer, g, bias = guided(method, n, m, r, b, seed=17, reduce_flop=True)
  x = np.random.default_rng(4).standard_normal((3, n)).astype(np.float32)
  struct = ref_apply(method, factors(layer, method), x, b) + bias
  dense = x.astype(np.float64) @ g.T + bias
  draws = 2000
  keys = jax.random.split(jax.random.key(123), draws)
  sample = _branch_sampler(layer, jnp.asarray(x))
  for alpha in (0.3, 0.75):
    mixed = alpha * dense + (1 - alpha) * struct  # both carry the bias once
    out = sample(keys, alpha)
    scale = np.abs(mixed).max()
    d_mixed = np.abs(out - mixed).max(axis=(1, 2)) / scale
    d_struct = np.abs(out - struct).max(axis=(1, 2)) / scale
    gap = np.abs(mixed - struct).max() / scale
    assert gap > 0.1
    # Every call is exactly one of the two closed forms (skipped: U(Vx) + b, not (1-a) U(Vx)).
    assert np.all(np.minimum(d_mixed, d_struct) < 2e-5)
    took_guide = d_mixed < d_struct
    frac = took_guide.mean()
    sigma = math.sqrt(alpha * (1 - alpha) / draws)
    assert abs(frac - alpha) < 5 * sigma, (alpha, frac)
  # alpha = 0 never runs the guide, alpha = 1 always does.
  for alpha, ref in ((0.0, struct), (1.0, dense)):
    out = sample(keys, alpha)
    close(out, np.broadcast_to(ref, out.shape))
  # Without a key (evaluation) no draw is made: the full blend is computed.
  close(layer(jnp.asarray(x), alpha=0.3), 0.3 * dense + 0.7 * struct)


def _dot_operand_shapes(jaxpr, inside_cond=False, found=None):
  """Shapes of dot_general operands, split by whether they sit inside a `cond` branch."""
  found = found if found is not None else {'outer': [], 'cond': []}
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      where = 'cond' if inside_cond else 'outer'
      found[where].extend(tuple(v.aval.shape) for v in eqn.invars)
    for value in eqn.params.values():
      subs = value if isinstance(value, (tuple, list)) else (value,)
      for sub in subs:
        inner = getattr(sub, 'jaxpr', sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          _dot_operand_shapes(inner, inside_cond or eqn.primitive.name == 'cond', found)
  return found


def _cond_branches(jaxpr):
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'cond':
      out.append([b.jaxpr for b in eqn.params['branches']])
    for value in eqn.params.values():
      subs = value if isinstance(value, (tuple, list)) else (value,)
      for sub in subs:
        inner = getattr(sub, 'jaxpr', sub)
        if isinstance(inner, jax.extend.core.Jaxpr) and eqn.primitive.name != 'cond':
          out.extend(_cond_branches(inner))
  return out


@pytest.mark.parametrize('method,n,m,r,b', [STRUCTURED_CASES[0], STRUCTURED_CASES[5],
                                            STRUCTURED_CASES[9]],
                         ids=[STRUCTURED_IDS[0], STRUCTURED_IDS[5], STRUCTURED_IDS[9]])
def test_reduce_flop_guide_matmul_only_inside_cond(method, n, m, r, b):
  guide_shape = (m, n)
  x = jnp.ones((3, n), jnp.float32) * 0.5
  key = jax.random.key(0)
  shapes = expected_shapes(method, n, m, r, b)
  assert guide_shape not in shapes.values()  # so a (M, N) operand can only be the guide

  # Without reduce_flop the guide matmul is unconditional: the detector sees it outside a cond.
  plain = make_random(method, n, m, r, b, guide=True)
  found = _dot_operand_shapes(jax.make_jaxpr(lambda x: plain(x, alpha=0.3))(x).jaxpr)
  assert guide_shape in found['outer'] and not found['cond']

  layer = make_random(method, n, m, r, b, guide=True, reduce_flop=True)
  jaxpr = jax.make_jaxpr(lambda x, k: layer(x, alpha=0.3, key=k))(x, key).jaxpr
  found = _dot_operand_shapes(jaxpr)
  assert guide_shape not in found['outer']
  assert guide_shape in found['cond']
  (branches,) = _cond_branches(jaxpr)
  with_guide = [guide_shape in _dot_operand_shapes(br)['outer'] for br in branches]
  assert sorted(with_guide) == [False, True]  # one branch skips the guide matmul entirely


@pytest.mark.parametrize('method,n,m,r,b', [STRUCTURED_CASES[1], STRUCTURED_CASES[6]],
                         ids=[STRUCTURED_IDS[1], STRUCTURED_IDS[6]])
def test_drop_guide(method, n, m, r, b):
  layer, _, bias = guided(method, n, m, r, b, seed=18)
  layer.drop_guide()
  assert layer.guide is None
  assert 'guide' not in param_leaves(layer)
  assert layer.num_weight_params() == closed_form_params(method, n, m, r, b)
  x = np.random.default_rng(5).standard_normal((4, n)).astype(np.float32)
  close(layer(jnp.asarray(x)), ref_apply(method, factors(layer, method), x, b) + bias)
