"""Layout helpers shared by the kernel backends (xla.py, pallas_triton.py, pallas_tpu.py).

Activations are flattened to tokens, (T, N); the block-leading layout is (B, T, N/B). W1 of a
BlockShuffle layer is (B, q, N/B) with q = min(N, M)/B (docs/design.md §2.4).
"""

from __future__ import annotations

import jax.numpy as jnp


def to_blocks(x, b):
  """(T, B·p) -> (B, T, p)."""
  return x.reshape(x.shape[0], b, -1).transpose(1, 0, 2)


def from_blocks(xb):
  """(B, T, p) -> (T, B·p)."""
  b, t, p = xb.shape
  return xb.transpose(1, 0, 2).reshape(t, b * p)


def interleave(u):
  """(B, T, s) -> (T, s·B) with y[s·B + j] = u[j, s]: BlockShuffle's output order."""
  b, t, s = u.shape
  return u.transpose(1, 2, 0).reshape(t, s * b)


def deinterleave(y, b):
  """(T, s·B) -> (B, T, s), the inverse of `interleave`."""
  t, m = y.shape
  return y.reshape(t, m // b, b).transpose(2, 0, 1)


def common_dtype(*arrays):
  """The arrays cast to their common result dtype."""
  dtype = jnp.result_type(*arrays)
  return [a.astype(dtype) for a in arrays]


def permute_rows(w1):
  """W1 rows reordered from c·B + j to j·(q/B) + c (q a multiple of B): the Pallas kernels then
  move the shuffle's data in contiguous runs of q/B."""
  b, q, p = w1.shape
  return w1.reshape(b, q // b, b, p).transpose(0, 2, 1, 3).reshape(b, q, p)


def pow2_tile(n: int, pref: int) -> int:
  """The largest power of two <= pref that divides n (1 if n is odd)."""
  t = 1 << (min(n, pref).bit_length() - 1)
  while n % t:
    t //= 2
  return t


def tile(n: int, pref: int, interpret: bool) -> int:
  """A kernel's tile for a dimension of size n: `pow2_tile(n, pref)`, except that in interpret
  mode a dimension no larger than pref is taken whole (any size works there)."""
  if interpret and n <= pref:
    return n
  return pow2_tile(n, pref)
