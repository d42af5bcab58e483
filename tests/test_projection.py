"""Projection onto each structure against brute-force optima, closed forms and float64 numpy.

The reference dense maps are built here in numpy from the layouts' definitions (design §2), the
brute-force optimum by L-BFGS over the factors from several random starts (scipy).
"""

import numpy as np
import pytest
import scipy.optimize

from structffn_jax import projection


def _matrix(rng, m, n):
  """A random matrix with a spread spectrum (a harder target than i.i.d. noise)."""
  a = rng.standard_normal((m, n))
  u, _, vh = np.linalg.svd(a, full_matrices=False)
  s = np.exp(-np.arange(min(m, n)) / 3.0) + 0.05 * rng.random(min(m, n))
  return (u * s) @ vh + 0.1 * rng.standard_normal((m, n))


def _block_diag(blocks):
  c, r, p = blocks.shape
  out = np.zeros((c * r, c * p))
  for i in range(c):
    out[i * r:(i + 1) * r, i * p:(i + 1) * p] = blocks[i]
  return out


def _shuffle_perms(n, m, c):
  """P_s (flat h -> h') and P_o (block-major u -> y) of BlockShuffle, from the definitions
  h'[j, a] = flat(h)[a·C + j] and y[t·C + j] = u[j, t]."""
  q, s = min(n, m) // c, m // c
  p_s = np.zeros((c * q, c * q))
  for j in range(c):
    for a in range(q):
      p_s[j * q + a, a * c + j] = 1
  p_o = np.zeros((m, c * s))
  for j in range(c):
    for t in range(s):
      p_o[t * c + j, j * s + t] = 1
  return p_s, p_o


def _shuffle_apply(w1, w2, x_N):
  """BlockShuffle on one input vector, step by step as the layout defines it."""
  c, q, p = w1.shape
  s = w2.shape[1]
  h = np.stack([w1[i] @ x_N[i * p:(i + 1) * p] for i in range(c)]).reshape(-1)
  hp = np.array([[h[a * c + j] for a in range(q)] for j in range(c)])
  u = np.stack([w2[j] @ hp[j] for j in range(c)])
  y = np.zeros(c * s)
  for j in range(c):
    for t in range(s):
      y[t * c + j] = u[j, t]
  return y


# ----------------------------------------------------------------------------- brute force


def _brute(method, w, shapes, restarts=4, seed=0):
  """The least ‖W − D‖_F / ‖W‖_F that L-BFGS finds over the factors, from `restarts` starts."""
  m, n = w.shape
  sizes = [int(np.prod(sh)) for sh in shapes]
  if method == 'blockshuffle':
    p_s, p_o = _shuffle_perms(n, m, shapes[0][0])

  def unpack(theta):
    a = theta[:sizes[0]].reshape(shapes[0])
    return a, theta[sizes[0]:].reshape(shapes[1])

  def loss(theta):
    a, b = unpack(theta)
    if method == 'lowrank':  # a = U (M, R), b = V (R, N)
      e = a @ b - w
      ga, gb = 2 * e @ b.T, 2 * a.T @ e
    elif method == 'blockdense':  # a = U (M, R), b = V (C, r, p)
      bv = _block_diag(b)
      e = a @ bv - w
      ga, g = 2 * e @ bv.T, 2 * a.T @ e
      r, p = b.shape[1:]
      gb = np.stack([g[i * r:(i + 1) * r, i * p:(i + 1) * p] for i in range(b.shape[0])])
    else:  # a = W1 (C, q, p), b = W2 (C, s, q)
      b1, b2 = _block_diag(a), _block_diag(b)
      e = p_o @ b2 @ p_s @ b1 - w
      g1 = 2 * (p_o @ b2 @ p_s).T @ e
      g2 = 2 * p_o.T @ e @ (p_s @ b1).T
      c, q, p = a.shape
      s = b.shape[1]
      ga = np.stack([g1[i * q:(i + 1) * q, i * p:(i + 1) * p] for i in range(c)])
      gb = np.stack([g2[i * s:(i + 1) * s, i * q:(i + 1) * q] for i in range(c)])
    return float(np.sum(e ** 2)), np.concatenate([ga.ravel(), gb.ravel()])

  rng = np.random.default_rng(seed)
  best = np.inf
  for _ in range(restarts):
    theta = 0.3 * rng.standard_normal(sum(sizes))
    res = scipy.optimize.minimize(loss, theta, jac=True, method='L-BFGS-B',
                                  options=dict(maxiter=20000, maxfun=40000, ftol=1e-15,
                                               gtol=1e-11))
    best = min(best, np.sqrt(res.fun) / np.linalg.norm(w))
  return best


def _assert_optimal(method, w, factors, shapes, closed_form):
  """Projection error = the closed form, and no brute-force start gets below it."""
  err = projection.relative_error(method, w, factors)
  assert err == pytest.approx(closed_form, rel=1e-4, abs=1e-6)
  again, best = projection.nearest(method, w, **_args(method, shapes))  # one SVD, both answers
  assert best == pytest.approx(closed_form, rel=1e-4, abs=1e-6)
  for name, value in again.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(factors[name]))
  assert projection.optimal_error(method, w, **_args(method, shapes)) == pytest.approx(
      closed_form, rel=1e-9, abs=1e-12)
  brute = _brute(method, w, shapes)
  assert brute >= err - 1e-5, (brute, err)  # nothing beats the projection
  assert brute == pytest.approx(err, rel=1e-3, abs=1e-5)  # and the optimum is reachable


def _args(method, shapes):
  if method == 'lowrank':
    return dict(rank=shapes[0][1])
  if method == 'blockdense':
    return dict(rank=shapes[1][0] * shapes[1][1], blocks=shapes[1][0])
  return dict(blocks=shapes[0][0])


# ----------------------------------------------------------------------------- LowRank


@pytest.mark.parametrize('m,n,r', [(10, 14, 3), (16, 8, 5)])
def test_lowrank_is_the_eckart_young_optimum(m, n, r):
  w = _matrix(np.random.default_rng(m * n + r), m, n)
  f = projection.project('lowrank', w, rank=r)
  assert f['u'].shape == (m, r) and f['v'].shape == (r, n)
  s = np.linalg.svd(w, compute_uv=False)
  closed = np.sqrt(np.sum(s[r:] ** 2)) / np.linalg.norm(w)
  _assert_optimal('lowrank', w, f, [(m, r), (r, n)], closed)


def test_lowrank_split_is_balanced_and_least_decay():
  rng = np.random.default_rng(1)
  w = _matrix(rng, 12, 20)
  f = projection.project('lowrank', w, rank=4)
  u, v = np.asarray(f['u'], np.float64), np.asarray(f['v'], np.float64)
  s = np.linalg.svd(w, compute_uv=False)[:4]
  np.testing.assert_allclose(u.T @ u, np.diag(s), atol=1e-5)
  np.testing.assert_allclose(v @ v.T, np.diag(s), atol=1e-5)
  penalty = np.sum(u ** 2) + np.sum(v ** 2)
  assert penalty == pytest.approx(2 * s.sum(), rel=1e-5)  # 2·‖UV‖_*: the least possible
  for _ in range(20):  # any other split of the same product pays more decay
    g = rng.standard_normal((4, 4)) + 2 * np.eye(4)
    assert np.sum((u @ g) ** 2) + np.sum((np.linalg.solve(g, v)) ** 2) > penalty


# ----------------------------------------------------------------------------- BlockDense


@pytest.mark.parametrize('m,n,c,r', [(12, 16, 2, 4), (10, 12, 3, 6), (8, 12, 4, 4)])
def test_blockdense_is_the_per_block_optimum(m, n, c, r):
  w = _matrix(np.random.default_rng(m + n + c + r), m, n)
  f = projection.project('blockdense', w, rank=r, blocks=c)
  assert f['v'].shape == (c, r // c, n // c) and f['u'].shape == (m, r)
  # Independent reference: the product in numpy, and each column block's own singular values.
  d = np.asarray(f['u'], np.float64) @ _block_diag(np.asarray(f['v'], np.float64))
  p = n // c
  tails = [np.linalg.svd(w[:, i * p:(i + 1) * p], compute_uv=False)[r // c:] for i in range(c)]
  closed = np.sqrt(sum(np.sum(t ** 2) for t in tails)) / np.linalg.norm(w)
  assert np.linalg.norm(w - d) / np.linalg.norm(w) == pytest.approx(closed, rel=1e-4, abs=1e-6)
  _assert_optimal('blockdense', w, f, [(m, r), (c, r // c, p)], closed)


def test_blockdense_split_is_balanced_per_block():
  w = _matrix(np.random.default_rng(2), 12, 16)
  f = projection.project('blockdense', w, rank=6, blocks=2)
  u, v = np.asarray(f['u'], np.float64), np.asarray(f['v'], np.float64)
  for i in range(2):
    ui = u[:, i * 3:(i + 1) * 3]
    np.testing.assert_allclose(ui.T @ ui, v[i] @ v[i].T, atol=1e-5)
    s = np.linalg.svd(w[:, i * 8:(i + 1) * 8], compute_uv=False)[:3]
    np.testing.assert_allclose(np.diag(v[i] @ v[i].T), s, rtol=1e-5)


# ----------------------------------------------------------------------------- BlockShuffle


@pytest.mark.parametrize('n,m,c', [(8, 16, 2), (16, 8, 2), (12, 12, 3), (24, 12, 4), (8, 24, 4)])
def test_blockshuffle_is_the_per_subblock_optimum(n, m, c):
  """(24, 12, 4) and (8, 24, 4): q = 3 and 2 hidden units per block, fewer than the C = 4 output
  groups, so the sub-blocks get unequal ranks (2 or 1, 1 or 0)."""
  w = _matrix(np.random.default_rng(n * m + c), m, n)
  f = projection.project('blockshuffle', w, blocks=c)
  q, p, s = min(n, m) // c, n // c, m // c
  w1, w2 = np.asarray(f['w1'], np.float64), np.asarray(f['w2'], np.float64)
  assert w1.shape == (c, q, p) and w2.shape == (c, s, q)
  # Independent reference: the layout applied step by step to every basis vector.
  d = np.stack([_shuffle_apply(w1, w2, e) for e in np.eye(n)], axis=1)
  p_s, p_o = _shuffle_perms(n, m, c)
  np.testing.assert_allclose(d, p_o @ _block_diag(w2) @ p_s @ _block_diag(w1), atol=1e-12)
  err = np.linalg.norm(w - d) / np.linalg.norm(w)
  assert projection.relative_error('blockshuffle', w, f) == pytest.approx(err, rel=1e-5)
  _assert_optimal('blockshuffle', w, f, [(c, q, p), (c, s, q)],
                  projection.optimal_error('blockshuffle', w, blocks=c))


@pytest.mark.parametrize('method,args', [('lowrank', dict(rank=3)),
                                         ('blockdense', dict(rank=4, blocks=2)),
                                         ('blockshuffle', dict(blocks=2)),
                                         ('blockshuffle', dict(blocks=4))])
def test_a_matrix_of_the_structure_is_recovered(method, args):
  """W = the dense map of random factors: the projection gives it back (error at float32)."""
  rng = np.random.default_rng(3)
  n, m = 16, 24
  if method == 'lowrank':
    w = rng.standard_normal((m, 3)) @ rng.standard_normal((3, n))
  elif method == 'blockdense':
    w = rng.standard_normal((m, 4)) @ _block_diag(rng.standard_normal((2, 2, n // 2)))
  else:
    c = args['blocks']
    q = min(n, m) // c
    w1, w2 = rng.standard_normal((c, q, n // c)), rng.standard_normal((c, m // c, q))
    w = np.stack([_shuffle_apply(w1, w2, e) for e in np.eye(n)], axis=1)
  f = projection.project(method, w, **args)
  assert projection.relative_error(method, w, f) < 2e-6
  assert projection.optimal_error(method, w, **args) < 1e-12


def test_blockshuffle_split_is_balanced_per_unit():
  w = _matrix(np.random.default_rng(4), 16, 8)
  f = projection.project('blockshuffle', w, blocks=2)
  w1, w2 = np.asarray(f['w1'], np.float64), np.asarray(f['w2'], np.float64)
  rows = np.linalg.norm(w1, axis=2)   # (C, q): unit (i, b)
  cols = np.linalg.norm(w2, axis=1)   # (C, q): unit (j, a)
  q = w1.shape[1]
  for f_ in range(2 * q):  # unit f = i·q + b = a·C + j
    assert rows[f_ // q, f_ % q] == pytest.approx(cols[f_ % 2, f_ // 2], rel=1e-5)


@pytest.mark.parametrize('method,args,field', [
    ('blockshuffle', dict(blocks=3), 'model.ffn.blocks=3 does not divide in_features=16'),
    ('blockdense', dict(rank=6, blocks=4), 'model.ffn.blocks=4 does not divide rank=6'),
    ('lowrank', dict(rank=40), 'model.ffn.rank=40 must be in [1, 16]')])
def test_a_structure_that_does_not_fit_is_one_line(method, args, field):
  with pytest.raises(ValueError) as e:
    projection.project(method, np.ones((24, 16)), **args)
  assert field in str(e.value) and '\n' not in str(e.value) and '--set' in str(e.value)
