"""The structured factors nearest to a dense matrix, in Frobenius norm (docs/design.md §10.2).

  factors = projection.project('lowrank', w_MN, rank=R)           # {'u', 'v'}
  factors = projection.project('blockdense', w_MN, rank=R, blocks=C)  # {'v', 'u'}
  factors = projection.project('blockshuffle', w_MN, blocks=C)      # {'w1', 'w2'}
  err = projection.relative_error('lowrank', w_MN, factors)         # ‖W − D‖ / ‖W‖
  best = projection.optimal_error('lowrank', w_MN, rank=R)          # from the singular values
  factors, best = projection.nearest('lowrank', w_MN, rank=R)       # both from one SVD

Every method is a truncated SVD of independent pieces of W, and optimal by Eckart–Young:
  LowRank       W itself, rank R.
  BlockDense    each column block W[:, i·N/C:(i+1)·N/C] (its own slice of U and its own V_i),
                rank R/C.
  BlockShuffle  each (output group j, input block i) sub-block W[j::C, i·N/C:(i+1)·N/C]: the
                hidden units a·C + j = i·q + b that link block i of W1 to block j of W2 belong to
                exactly one such sub-block, which is the sum of their rank-1 products.
The singular values are split evenly between the two factors (√σ on each side): of all factor
pairs with the same product it has the least ‖U‖² + ‖V‖² (the penalty AdamW's decay shrinks), so
decay does not start by re-balancing the factors, both factors see the same per-parameter scale,
and it is the split of the LowRank "svd" initialisation the training recipe was tuned on.

Runs in float32 on the default device (the accelerator when there is one), one matrix at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from structffn_jax import structured


def _svd(a):
  u, s, vh = jnp.linalg.svd(jnp.asarray(a, jnp.float32), full_matrices=False)
  return u, s, vh


def check(method: str, n: int, m: int, *, rank: int = 0, blocks: int = 1, where: str = 'W'):
  """Raise ValueError (one line naming the field and the fix) when the structure cannot hold an
  (m, n) matrix: builds nothing."""
  def divisors(v):
    return [d for d in range(1, min(v, 64) + 1) if v % d == 0][-6:]

  if method == 'lowrank' and not 0 < rank <= min(n, m):
    raise ValueError(f'{where}: model.ffn.rank={rank} must be in [1, {min(n, m)}] for an '
                     f'{n}->{m} matrix; set --set model.ffn.rank=R with R <= {min(n, m)}.')
  if method in ('blockdense', 'blockshuffle'):
    for what, value in (('in_features', n),) + ((('out_features', m),) if method ==
                                                 'blockshuffle' else ((('rank', rank),))):
      if blocks <= 0 or value % blocks:
        raise ValueError(f'{where}: model.ffn.blocks={blocks} does not divide {what}={value}; '
                         f'set --set model.ffn.blocks=C with C one of {divisors(value)}.')
  if method == 'blockdense' and not (0 < rank <= m and rank // blocks <= n // blocks):
    raise ValueError(f'{where}: model.ffn.rank={rank} must be in [1, {min(n, m)}] for an '
                     f'{n}->{m} BlockDense matrix; lower model.ffn.rank.')


def _discarded(sv, kept):
  """Σ of the squared singular values past `kept` (per piece), float64 on the host."""
  sv = np.asarray(sv, np.float64)
  return float(np.sum(np.where(np.arange(sv.shape[-1]) >= np.asarray(kept)[..., None], sv ** 2,
                               0.0)))


def lowrank(w_MN, rank: int, *, tail: bool = False):
  """U (M, R) = U_R √S_R, V (R, N) = √S_R Vh_R: the rank-R truncated SVD. With `tail`, also the
  discarded squared singular values' sum (the optimum's squared error)."""
  u, s, vh = _svd(w_MN)
  root = jnp.sqrt(s[:rank])
  factors = {'u': u[:, :rank] * root[None, :], 'v': root[:, None] * vh[:rank]}
  return (factors, _discarded(s, rank)) if tail else factors


def blockdense(w_MN, rank: int, blocks: int, *, tail: bool = False):
  """V (C, R/C, N/C), U (M, R): a rank-R/C truncated SVD of each column block of W."""
  m, n = w_MN.shape
  c, r, p = blocks, rank // blocks, n // blocks
  u, s, vh = _svd(jnp.asarray(w_MN).reshape(m, c, p).transpose(1, 0, 2))  # (C, M, p) blocks
  root = jnp.sqrt(s[:, :r])                                         # (C, r)
  u_CMr = u[:, :, :r] * root[:, None, :]
  factors = {'v': root[:, :, None] * vh[:, :r], 'u': u_CMr.transpose(1, 0, 2).reshape(m, c * r)}
  return (factors, _discarded(s, np.full(c, r))) if tail else factors


def _shuffle_units(n: int, m: int, blocks: int):
  """For every hidden unit f of BlockShuffle (f = i·q + b = a·C + j): its first-stage block i and
  row b, second-stage block j and column a, and its rank k within sub-block (j, i)."""
  c = blocks
  q = min(n, m) // c
  f = np.arange(c * q)
  i, b, j, a = f // q, f % q, f % c, f // c
  first = i * q + (j - i * q) % c  # the smallest unit of sub-block (j, i)
  return i, b, j, a, (f - first) // c


def blockshuffle(w_MN, blocks: int, *, tail: bool = False):
  """W1 (C, q, N/C), W2 (C, M/C, q): per (output group j, input block i) sub-block of W, a
  truncated SVD of the rank that sub-block's hidden units give it."""
  m, n = w_MN.shape
  c, p, s = blocks, n // blocks, m // blocks
  q = min(n, m) // c
  # W[t·C + j, i·p + x] = sub[j, i][t, x]
  sub = jnp.asarray(w_MN).reshape(s, c, c, p).transpose(1, 2, 0, 3)  # (C_j, C_i, s, p)
  u, sv, vh = _svd(sub)
  i, b, j, a, k = _shuffle_units(n, m, blocks)
  root = jnp.sqrt(sv[j, i, k])                                      # (C·q,)
  w1 = jnp.zeros((c, q, p), jnp.float32).at[i, b].set(root[:, None] * vh[j, i, k])
  w2 = jnp.zeros((c, s, q), jnp.float32).at[j, :, a].set(u[j, i, :, k] * root[:, None])
  if not tail:
    return {'w1': w1, 'w2': w2}
  kept = np.zeros((c, c), int)
  np.add.at(kept, (j, i), 1)
  return {'w1': w1, 'w2': w2}, _discarded(sv, kept)


def project(method: str, w_MN, *, rank: int = 0, blocks: int = 1) -> dict:
  """The factors of `method` nearest to W (M, N) in Frobenius norm, by the layer's names."""
  m, n = w_MN.shape
  check(method, n, m, rank=rank, blocks=blocks)
  if method == 'lowrank':
    return lowrank(w_MN, rank)
  if method == 'blockdense':
    return blockdense(w_MN, rank, blocks)
  if method == 'blockshuffle':
    return blockshuffle(w_MN, blocks)
  raise ValueError(f'projection: model.ffn.method={method!r} has no factors; use one of '
                   f'{structured.METHODS[1:]}.')


def nearest(method: str, w_MN, *, rank: int = 0, blocks: int = 1) -> tuple[dict, float]:
  """(`project`'s factors, the optimal relative error from the same SVD's singular values)."""
  m, n = w_MN.shape
  check(method, n, m, rank=rank, blocks=blocks)
  w = jnp.asarray(w_MN, jnp.float32)
  norm2 = float(jnp.sum(w.astype(jnp.float32) ** 2))
  if method == 'lowrank':
    factors, tail = lowrank(w, rank, tail=True)
  elif method == 'blockdense':
    factors, tail = blockdense(w, rank, blocks, tail=True)
  elif method == 'blockshuffle':
    factors, tail = blockshuffle(w, blocks, tail=True)
  else:
    raise ValueError(f'projection: model.ffn.method={method!r} has no factors.')
  return factors, float(np.sqrt(tail / norm2))


def dense_of(method: str, factors: dict, n: int, m: int) -> jax.Array:
  """The (M, N) matrix the factors apply, by the layer's own `to_dense()`."""
  layer = _layer(method, factors, n, m)
  return layer.to_dense()


def _layer(method, factors, n, m):
  from flax import nnx
  rank = factors['u'].shape[1] if 'u' in factors else 0
  blocks = factors['v'].shape[0] if method == 'blockdense' else (
      factors['w1'].shape[0] if method == 'blockshuffle' else 1)
  layer = nnx.eval_shape(lambda: structured.make_linear(
      method, n, m, rank=rank, blocks=blocks, use_bias=False, rngs=nnx.Rngs(0)))
  for name, value in factors.items():
    getattr(layer, name).set_value(jnp.asarray(value, jnp.float32))
  return layer


def relative_error(method: str, w_MN, factors: dict) -> float:
  """‖W − D‖_F / ‖W‖_F, D the matrix the factors apply."""
  m, n = w_MN.shape
  w = jnp.asarray(w_MN, jnp.float32)
  return float(jnp.linalg.norm(w - dense_of(method, factors, n, m)) / jnp.linalg.norm(w))


def optimal_error(method: str, w_MN, *, rank: int = 0, blocks: int = 1) -> float:
  """The least ‖W − D‖_F / ‖W‖_F any factors of the structure reach: the discarded singular
  values of the pieces the structure approximates independently (float64, numpy)."""
  w = np.asarray(w_MN, np.float64)
  m, n = w.shape
  if method == 'lowrank':
    tail = np.linalg.svd(w, compute_uv=False)[rank:]
  elif method == 'blockdense':
    sv = np.linalg.svd(w.reshape(m, blocks, n // blocks).transpose(1, 0, 2), compute_uv=False)
    tail = sv[:, rank // blocks:]
  elif method == 'blockshuffle':
    c, p, s = blocks, n // blocks, m // blocks
    sv = np.linalg.svd(w.reshape(s, c, c, p).transpose(1, 2, 0, 3), compute_uv=False)
    i, _, j, _, _ = _shuffle_units(n, m, blocks)
    kept = np.zeros((c, c), int)
    np.add.at(kept, (j, i), 1)
    tail = np.concatenate([sv[jj, ii, kept[jj, ii]:] for jj in range(c) for ii in range(c)])
  else:
    raise ValueError(f'projection: model.ffn.method={method!r} has no factors.')
  return float(np.sqrt(np.sum(tail ** 2)) / np.linalg.norm(w))
