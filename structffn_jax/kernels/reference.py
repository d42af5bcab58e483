"""Plain-jnp reference of the three structured projections: the einsums that follow design §2 word
for word, differentiated by JAX. Every other backend is tested against these.

All functions map x (..., N) to (..., M) without bias; factors are stored as in structured.py
(letters of docs/design.md §1: R rank, C blocks; r = R/C, p, q, s the widths inside a block).
This is also the "einsum baseline" layout that `bench.ffn --preset cpu-issue` compares against.
"""

from __future__ import annotations

import jax.numpy as jnp


def lowrank(x, v, u):
  """y = U (V x); V (R, N), U (M, R)."""
  h = jnp.einsum('...n,rn->...r', x, v)
  return jnp.einsum('...r,mr->...m', h, u)


def blockdense(x, v, u):
  """V (C, R/C, N/C) on the C input chunks, results concatenated block-major, then U (M, R)."""
  c, r, p = v.shape
  h = jnp.einsum('...cp,crp->...cr', x.reshape(*x.shape[:-1], c, p), v)
  return jnp.einsum('...r,mr->...m', h.reshape(*x.shape[:-1], c * r), u)


def blockshuffle(x, w1, w2):
  """W1 (C, q, N/C) per chunk, shuffle flat(h)[a·C + j] -> block j, W2 (C, M/C, q), interleave."""
  c, q, p = w1.shape
  lead = x.shape[:-1]
  h = jnp.einsum('...cp,cqp->...cq', x.reshape(*lead, c, p), w1)
  h = h.reshape(*lead, q, c)  # flat(h) viewed as (q, C): [a, j] = flat(h)[a·C + j]
  y = jnp.einsum('...qj,jsq->...sj', h, w2)
  return y.reshape(*lead, c * w2.shape[1])  # y[a·C + j] = u[j, a]
