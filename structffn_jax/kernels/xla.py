"""The XLA path: the structured projections laid out for fast batched matmuls, always available.

Activations are flattened to (T, N) and the block dimension is kept leading, (C, T, ·), so every
product is a batched matmul whose batch dimension comes first and whose contracted dimension is
the last of the activation: the form XLA's CPU and GPU matmul libraries take without copies.
(Letters of docs/design.md §1: T tokens, N inputs, M outputs, R rank, C blocks, and p, q, s the
widths inside a block.) The permutations of the layers become single copies between those
matmuls:

  LowRank       y = (x Vᵀ) Uᵀ
  BlockDense    x -> (C, T, p) ; h = x_i V_iᵀ ; (T, R) block-major ; y = h Uᵀ
  BlockShuffle  x -> (C, T, p) ; h = x_i W1_iᵀ ; shuffle -> (C, T, q) ; u = h' W2_jᵀ ;
                interleave -> (T, M)
  BlockShuffle FFN (`blockshuffle_ffn`): fc1, bias, GELU, fc2, bias in one op, the relayout
                between the layers done once and fused with the GELU

Each has a hand-written backward (`jax.custom_vjp`) built from the same well-laid-out matmuls in
reverse (de-interleave, un-shuffle, ...); autodiff of the plain einsums instead moves data
between token-major and block-major layouts in every step. Weight gradients (a sum over tokens)
are computed with the smaller of their two dimensions first, dW·ᵀ = aᵀ·d when a is the narrower
operand, then transposed (a small copy): on XLA:CPU a (4096, 256) result from two token-major
operands runs ~1.5x slower than its (256, 4096) transpose. The barrier keeps XLA from folding
the transpose back into the matmul.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from structffn_jax.kernels.layout import (common_dtype, deinterleave, from_blocks, interleave,
                                          to_blocks)

_BMM_NT = 'ctn,cmn->ctm'  # a (C, T, N) · w (C, M, N)ᵀ: a block's inputs to its outputs
_BMM_NN = 'ctm,cmn->ctn'  # a (C, T, M) · w (C, M, N): back from the outputs to the inputs


def _flat(fn):
  """Apply fn on x flattened to (T, N) and restore the leading dimensions."""
  def wrapped(x, *factors):
    y = fn(x.reshape(-1, x.shape[-1]), *factors)
    return y.reshape(*x.shape[:-1], y.shape[-1])
  return wrapped


# ----------------------------------------------------------------------------- LowRank


def _weight_grad(d, a):
  """sum_t d[.., t, m] a[.., t, n] -> (.., m, n), the narrower of m, n as the result's rows."""
  if d.shape[-1] <= a.shape[-1]:
    return jnp.einsum('...tm,...tn->...mn', d, a)
  return jnp.swapaxes(jax.lax.optimization_barrier(jnp.einsum('...tn,...tm->...nm', a, d)),
                      -1, -2)


def _with_vjp(forward, backward):
  """A custom_vjp op from forward(*args) -> (y, residuals) and backward(residuals, dy)."""
  op = jax.custom_vjp(lambda *args: forward(*args)[0])
  op.defvjp(forward, backward)
  return op


def _lr_forward(x, v, u):
  h = jnp.einsum('tn,rn->tr', x, v)
  return jnp.einsum('tr,mr->tm', h, u), (x, h, v, u)


def _lr_backward(res, dy):
  x, h, v, u = res
  dh = jnp.einsum('tm,mr->tr', dy, u)
  dx = jnp.einsum('tr,rn->tn', dh, v)
  return dx.astype(x.dtype), _weight_grad(dh, x).astype(v.dtype), \
      _weight_grad(dy, h).astype(u.dtype)


@_flat
def lowrank(x, v, u):
  return _lr_op(*common_dtype(x, v, u))


# ----------------------------------------------------------------------------- BlockDense


def _bd_forward(x, v, u):
  xb = to_blocks(x, v.shape[0])
  h = from_blocks(jnp.einsum(_BMM_NT, xb, v))  # (T, R) block-major
  return jnp.einsum('tr,mr->tm', h, u), (xb, h, v, u)


def _bd_backward(res, dy):
  xb, h, v, u = res
  dhb = to_blocks(jnp.einsum('tm,mr->tr', dy, u), v.shape[0])
  dx = from_blocks(jnp.einsum(_BMM_NN, dhb, v))
  return dx.astype(xb.dtype), _weight_grad(dhb, xb).astype(v.dtype), \
      _weight_grad(dy, h).astype(u.dtype)


@_flat
def blockdense(x, v, u):
  return _bd_op(*common_dtype(x, v, u))


# ----------------------------------------------------------------------------- BlockShuffle
# h (C_i, T, q) from the first stage; h' (C_j, T, q) with h'[j, :, a] = flat(h)[a·C + j].
# XLA:CPU moves these element-granular permutations (2-D transposes) faster than block-granular
# ones: permuting W1's rows so that the shuffle moves runs of q/C measured ~2x slower there.


def _shuffle(h):
  """(C_i, T, q) -> (C_j, T, q) through the token-major flat layout, element by element."""
  c, t, q = h.shape
  return from_blocks(h).reshape(t, q, c).transpose(2, 0, 1)


def _unshuffle(hp):
  c, t, q = hp.shape
  return to_blocks(hp.transpose(1, 2, 0).reshape(t, q * c), c)


def _bs_forward(x, w1, w2):
  xb = to_blocks(x, w1.shape[0])
  hp = _shuffle(jnp.einsum(_BMM_NT, xb, w1))
  return interleave(jnp.einsum(_BMM_NT, hp, w2)), (xb, hp, w1, w2)


def _bs_backward(res, dy):
  xb, hp, w1, w2 = res
  du = deinterleave(dy, w1.shape[0])
  dh = _unshuffle(jnp.einsum(_BMM_NN, du, w2))
  dx = from_blocks(jnp.einsum(_BMM_NN, dh, w1))
  return dx.astype(xb.dtype), _weight_grad(dh, xb).astype(w1.dtype), \
      _weight_grad(du, hp).astype(w2.dtype)


# ----------------------------------------------------------------------------- BlockShuffle FFN
# fc1 (BlockShuffle D -> F), bias, GELU (tanh), fc2 (BlockShuffle F -> D'), bias, as one op with
# one hand-written backward. fc1's bias and the GELU are applied in fc1's block layout (the bias
# permuted to match), and the GELU's forward and backward fuse with the single relayout from
# fc1's interleaved blocks to fc2's input chunks. Applied one by one, the layers instead move
# the (T, f) activation through four separate copies (interleave, chunk, and back) and run the
# GELU on a transposed read.


def _bias_blocks(bias, c):
  """(F,) in interleaved order -> (C, 1, F/C) in fc1's block layout: [j, a] = bias[a·C + j]."""
  return bias.reshape(-1, c).T[:, None, :]


def _gelu(h):
  return jax.nn.gelu(h, approximate=True)


def _ffn_forward(x, w1a, w2a, b1, w1b, w2b, b2):
  ca, cb = w1a.shape[0], w1b.shape[0]
  xb = to_blocks(x, ca)
  h1 = _shuffle(jnp.einsum(_BMM_NT, xb, w1a))                      # (C, T, q1)
  pre = jnp.einsum(_BMM_NT, h1, w2a) + _bias_blocks(b1, ca)        # (C, T, F/C), fc1's layout
  g = to_blocks(interleave(_gelu(pre)), cb)                        # (C', T, F/C'), fc2's chunks
  h2 = _shuffle(jnp.einsum(_BMM_NT, g, w1b))                       # (C', T, q2)
  y = interleave(jnp.einsum(_BMM_NT, h2, w2b)) + b2
  return y, (xb, h1, pre, g, h2, w1a, w2a, w1b, w2b)


def _ffn_backward(res, dy):
  xb, h1, pre, g, h2, w1a, w2a, w1b, w2b = res
  ca, cb = w1a.shape[0], w1b.shape[0]
  du2 = deinterleave(dy, cb)
  dh2 = _unshuffle(jnp.einsum(_BMM_NN, du2, w2b))
  dg = deinterleave(from_blocks(jnp.einsum(_BMM_NN, dh2, w1b)), ca)
  dpre = jax.vjp(_gelu, pre)[1](dg)[0]
  dh1 = _unshuffle(jnp.einsum(_BMM_NN, dpre, w2a))
  grads = (from_blocks(jnp.einsum(_BMM_NN, dh1, w1a)),             # x
           _weight_grad(dh1, xb), _weight_grad(dpre, h1),         # fc1's W1, W2
           dpre.sum(1).T.reshape(-1),                              # fc1's bias, interleaved
           _weight_grad(dh2, g), _weight_grad(du2, h2),            # fc2's W1, W2
           dy.sum(0))                                              # fc2's bias
  return tuple(d.astype(a.dtype) for d, a in zip(grads, (xb, w1a, w2a, pre, w1b, w2b, dy)))


_lr_op = _with_vjp(_lr_forward, _lr_backward)
_bd_op = _with_vjp(_bd_forward, _bd_backward)
_bs_op = _with_vjp(_bs_forward, _bs_backward)
_ffn_op = _with_vjp(_ffn_forward, _ffn_backward)


@_flat
def blockshuffle(x, w1, w2):
  return _bs_op(*common_dtype(x, w1, w2))


def blockshuffle_ffn(x, w1a, w2a, b1, w1b, w2b, b2):
  """fc2(GELU_tanh(fc1(x) + b1)) + b2 for two BlockShuffle layers (fc1 D -> F, fc2 F -> D')."""
  lead = x.shape[:-1]
  args = common_dtype(x.reshape(-1, x.shape[-1]), w1a, w2a, b1, w1b, w2b, b2)
  y = _ffn_op(*args)
  return y.reshape(*lead, y.shape[-1])
