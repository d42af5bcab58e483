"""Plain-jnp reference of the three structured projections: the einsums that follow design §2 word
for word, differentiated by JAX. Every other backend is tested against these.

All functions map x (..., N) to (..., M) without bias; factors are stored as in structured.py.
This is also the "einsum baseline" layout that `bench.ffn --preset cpu-issue` compares against.
"""

from __future__ import annotations

import jax.numpy as jnp


def lowrank(x, v, u):
  """y = U (V x); V (R, N), U (M, R)."""
  h = jnp.einsum('...n,rn->...r', x, v)
  return jnp.einsum('...r,mr->...m', h, u)


def blockdense(x, v, u):
  """V (B, R/B, N/B) on the B input chunks, results concatenated block-major, then U (M, R)."""
  b, r, p = v.shape
  h = jnp.einsum('...bp,brp->...br', x.reshape(*x.shape[:-1], b, p), v)
  return jnp.einsum('...r,mr->...m', h.reshape(*x.shape[:-1], b * r), u)


def blockshuffle(x, w1, w2):
  """W1 (B, q, N/B) per chunk, shuffle flat(h)[t·B + j] -> block j, W2 (B, M/B, q), interleave."""
  b, q, p = w1.shape
  lead = x.shape[:-1]
  h = jnp.einsum('...bp,bqp->...bq', x.reshape(*lead, b, p), w1)
  h = h.reshape(*lead, q, b)  # flat index i·q + c viewed as (t, j) with t·B + j
  y = jnp.einsum('...tj,jst->...sj', h, w2)
  return y.reshape(*lead, b * w2.shape[1])  # y[s·B + j] = u[j, s]
