"""Layout helpers shared by the kernel backends (xla.py, pallas_triton.py, pallas_tpu.py).

Activations are flattened to tokens, (T, N); the block-leading layout is (C, T, N/C). W1 of a
BlockShuffle layer is (C, q, N/C) with q = min(N, M)/C (docs/design.md §2.4; the letters, §1).
"""

from __future__ import annotations

import jax.numpy as jnp


def to_blocks(x, c):
  """(T, C·p) -> (C, T, p)."""
  return x.reshape(x.shape[0], c, -1).transpose(1, 0, 2)


def from_blocks(xb):
  """(C, T, p) -> (T, C·p)."""
  c, t, p = xb.shape
  return xb.transpose(1, 0, 2).reshape(t, c * p)


def interleave(u):
  """(C, T, s) -> (T, s·C) with y[a·C + j] = u[j, a]: BlockShuffle's output order."""
  c, t, s = u.shape
  return u.transpose(1, 2, 0).reshape(t, s * c)


def deinterleave(y, c):
  """(T, s·C) -> (C, T, s), the inverse of `interleave`."""
  t, m = y.shape
  return y.reshape(t, m // c, c).transpose(2, 0, 1)


def common_dtype(*arrays):
  """The arrays cast to their common result dtype."""
  dtype = jnp.result_type(*arrays)
  return [a.astype(dtype) for a in arrays]


def permute_rows(w1):
  """W1 rows reordered from a·C + j to j·(q/C) + a (q a multiple of C): the Pallas kernels then
  move the shuffle's data in contiguous runs of q/C."""
  c, q, p = w1.shape
  return w1.reshape(c, q // c, c, p).transpose(0, 2, 1, 3).reshape(c, q, p)


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
