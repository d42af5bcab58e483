"""Pallas kernels for BlockShuffle and BlockDense on TPUs (Mosaic lowering), hand-written backward.

The GPU kernels (pallas_triton.py) move every permutation into their index maps with blocks
such as (tokens, 1, run): Mosaic TPU only takes blocks whose last two dimensions are multiples of
(8, 128) or whole, so the layouts here keep every block's minor dimension whole instead:

  BlockShuffle (q = min(N, M)/C, r = q/C, W1's rows permuted as in layout.permute_rows, viewed
  as W1p4 (C_i, C_j, r, p); W2 viewed as W2r (C_j, C_i, s, r) with W2r[j, i] = W2[j][:, i·r..])
    stage 1 + shuffle   h4[j, i] = x[:, i-chunk] · W1p4[i, j]ᵀ          (T, r), grid (T, i, j)
                        (the shuffle: h'[j][:, i·r + a] = h4[j, i][:, a], written in place)
    stage 2             u[j] = Σ_i h4[j, i] · W2r[j, i]ᵀ                (T, s), grid (T, j, s)
    interleave          y[:, a·C + j] = u[j][:, a]                     (XLA, one copy)
    backward            dh4[j, i] = du[j] · W2r[j, i] ;  dx[:, i-chunk] = Σ_j dh4[j, i] · W1p4[i, j]
                        dW2r[j, i] = Σ_t du[j]ᵀ h4[j, i] ;  dW1p4[i, j] = Σ_t dh4[j, i]ᵀ x[:, i-chunk]
  BlockDense
    stage 1             h3[i] = x[:, i-chunk] · V[i]ᵀ  (C, T, r); y = Σ_i h3[i] · U[:, i-block]ᵀ (XLA)
    backward            dx[:, i-chunk] = dh3[i] · V[i] ;  dV[i] = Σ_t dh3[i]ᵀ x[:, i-chunk]

Each kernel body is one matmul of whole blocks on the MXU accumulating in float32 (the stage-2
and dx kernels sum over the C blocks in a static loop; letters of docs/design.md §1). Weight
gradients sum over token tiles on the innermost ("arbitrary") grid axis into a float32 output
block that stays in VMEM.

The kernels are wrapped in `jax.custom_vjp` ops over the reshaped weights; the weight views and
the interleave are plain XLA reshapes/transposes, differentiated by JAX. On a TPU a shape
qualifies when its token tile is a multiple of 8 and every input chunk N/C is a multiple of 128
(or C = 1); `supports` says which, the others take the XLA path. With `interpret=True` the
kernels run in the Pallas interpreter on any device (tests), at any shape.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from structffn_jax.kernels import layout
from structffn_jax.kernels.layout import common_dtype, interleave, permute_rows

_SQ = pl.squeezed
_F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # a (T, N) · w (M, N)ᵀ
_NN = (((1,), (0,)), ((), ()))  # a (T, M) · w (M, N)
_TN = (((0,), (0,)), ((), ()))  # d (T, M)ᵀ · a (T, N)

# Tokens per program (forward, input gradient) and per step of a weight-gradient sum, and output
# columns of stage 2. Untuned: no TPU measurement exists yet.
TILE_T, TILE_T_GRAD, TILE_S = 256, 512, 512
LANES, SUBLANES = 128, 8  # Mosaic's (8, 128) tiling of a block's last two dimensions


class _Mode(NamedTuple):
  interpret: bool  # run the kernels in the Pallas interpreter (CPU tests)


def _tile(n: int, pref: int) -> int:
  """A dimension's tile: whole up to pref (Mosaic takes whole dimensions), else the largest
  power of two <= pref dividing it."""
  return layout.tile(n, pref, interpret=True)


def _lane_ok(n: int, whole: int) -> bool:
  return n == whole or n % LANES == 0


def _sublane_ok(n: int, whole: int) -> bool:
  return n == whole or n % SUBLANES == 0


def supports(op: str, x_shape, *factor_shapes, tpu: bool) -> bool:
  """Whether the kernels take op on these shapes (on TPU: Mosaic-aligned blocks throughout)."""
  tokens = math.prod(x_shape[:-1])
  n = x_shape[-1]
  if op == 'blockshuffle':
    (b, q, p), (_, s, _) = factor_shapes
    if q % b:  # the shuffle moves whole runs of r = q/C (b: the block count C)
      return False
    lanes = _lane_ok(p, n) and _lane_ok(_tile(s, TILE_S), s)
  elif op == 'blockdense':
    (b, _, p), _ = factor_shapes
    lanes = _lane_ok(p, n)
  else:
    return False
  if not tpu:
    return tokens > 0
  t_ok = all(_sublane_ok(_tile(tokens, pref), tokens) for pref in (TILE_T, TILE_T_GRAD))
  return lanes and t_ok


def _params(mode, semantics):
  if mode.interpret:
    return None
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _call(name, mode, kernel, grid, in_specs, out_spec, out_shape, dtype, semantics, *args):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_spec,
      out_shape=jax.ShapeDtypeStruct(out_shape, dtype), name=name,
      interpret=mode.interpret,
      compiler_params=_params(mode, semantics))(*args)


# ----------------------------------------------------------------------------- kernel bodies


def _mm_kernel(a_ref, w_ref, o_ref, *, dims):
  """o = a ·(dims) w for whole 2-D blocks, float32 accumulation."""
  o_ref[...] = lax.dot_general(a_ref[...], w_ref[...], dims,
                               preferred_element_type=_F32).astype(o_ref.dtype)


def _sum_kernel(a_ref, w_ref, o_ref, *, dims):
  """o = Σ_k a[k] ·(dims) w[k] over the leading block dimension (a static loop)."""
  acc = jnp.zeros(o_ref.shape, _F32)
  for k in range(a_ref.shape[0]):
    acc += lax.dot_general(a_ref[k], w_ref[k], dims, preferred_element_type=_F32)
  o_ref[...] = acc.astype(o_ref.dtype)


def _grad_kernel(d_ref, a_ref, o_ref):
  """o += dᵀ · a over the innermost grid axis (token tiles); o float32, zeroed on the first."""
  @pl.when(pl.program_id(2) == 0)
  def _():
    o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
  o_ref[...] += lax.dot_general(d_ref[...], a_ref[...], _TN, preferred_element_type=_F32)


_PAR3 = ('parallel', 'parallel', 'parallel')
_GRAD = ('parallel', 'parallel', 'arbitrary')


# ----------------------------------------------------------------------------- BlockShuffle


def _bs_stage1(x, w1p4, mode):
  """h4 (C_j, C_i, T, r): h4[j, i] = x[:, i-chunk] · W1p4[i, j]ᵀ (stage 1 and the shuffle)."""
  (t, _), (b, _, r, p) = x.shape, w1p4.shape
  tt = _tile(t, TILE_T)
  return _call('blockshuffle_tpu_stage1', mode, functools.partial(_mm_kernel, dims=_NT),
               (t // tt, b, b),
               [pl.BlockSpec((tt, p), lambda ti, i, j: (ti, i)),
                pl.BlockSpec((_SQ, _SQ, r, p), lambda ti, i, j: (i, j, 0, 0))],
               pl.BlockSpec((_SQ, _SQ, tt, r), lambda ti, i, j: (j, i, ti, 0)),
               (b, b, t, r), x.dtype, _PAR3, x, w1p4)


def _bs_stage2(h4, w2r, mode):
  """u (C_j, T, s): u[j] = Σ_i h4[j, i] · W2r[j, i]ᵀ."""
  (b, _, t, r), s = h4.shape, w2r.shape[2]
  tt, ts = _tile(t, TILE_T), _tile(s, TILE_S)
  return _call('blockshuffle_tpu_stage2', mode, functools.partial(_sum_kernel, dims=_NT),
               (t // tt, b, s // ts),
               [pl.BlockSpec((_SQ, b, tt, r), lambda ti, j, c: (j, 0, ti, 0)),
                pl.BlockSpec((_SQ, b, ts, r), lambda ti, j, c: (j, 0, c, 0))],
               pl.BlockSpec((_SQ, tt, ts), lambda ti, j, c: (j, ti, c)),
               (b, t, s), h4.dtype, _PAR3, h4, w2r)


def _bs_forward(x, w1p4, w2r, mode):
  return _bs_stage2(_bs_stage1(x, w1p4, mode), w2r, mode)


def _bs_fwd_rule(x, w1p4, w2r, mode):
  h4 = _bs_stage1(x, w1p4, mode)
  return _bs_stage2(h4, w2r, mode), (x, h4, w1p4, w2r)


def _bs_backward(mode, res, du):
  x, h4, w1p4, w2r = res
  (t, n), (b, _, r, p), s = x.shape, w1p4.shape, w2r.shape[2]
  du = du.astype(x.dtype)
  tt = _tile(t, TILE_T)
  tg = _tile(t, TILE_T_GRAD)
  # dh4[j, i] = du[j] · W2r[j, i]: un-shuffles while it multiplies.
  dh4 = _call('blockshuffle_tpu_dstage2', mode, functools.partial(_mm_kernel, dims=_NN),
              (t // tt, b, b),
              [pl.BlockSpec((_SQ, tt, s), lambda ti, j, i: (j, ti, 0)),
               pl.BlockSpec((_SQ, _SQ, s, r), lambda ti, j, i: (j, i, 0, 0))],
              pl.BlockSpec((_SQ, _SQ, tt, r), lambda ti, j, i: (j, i, ti, 0)),
              (b, b, t, r), x.dtype, _PAR3, du, w2r)
  # dx[:, i-chunk] = Σ_j dh4[j, i] · W1p4[i, j].
  dx = _call('blockshuffle_tpu_dstage1', mode, functools.partial(_sum_kernel, dims=_NN),
             (t // tt, b),
             [pl.BlockSpec((b, _SQ, tt, r), lambda ti, i: (0, i, ti, 0)),
              pl.BlockSpec((_SQ, b, r, p), lambda ti, i: (i, 0, 0, 0))],
             pl.BlockSpec((tt, p), lambda ti, i: (ti, i)),
             (t, n), x.dtype, ('parallel', 'parallel'), dh4, w1p4)
  dw2r = _call('blockshuffle_tpu_dw2', mode, _grad_kernel, (b, b, t // tg),
               [pl.BlockSpec((_SQ, tg, s), lambda j, i, c: (j, c, 0)),
                pl.BlockSpec((_SQ, _SQ, tg, r), lambda j, i, c: (j, i, c, 0))],
               pl.BlockSpec((_SQ, _SQ, s, r), lambda j, i, c: (j, i, 0, 0)),
               (b, b, s, r), _F32, _GRAD, du, h4)
  dw1p4 = _call('blockshuffle_tpu_dw1', mode, _grad_kernel, (b, b, t // tg),
                [pl.BlockSpec((_SQ, _SQ, tg, r), lambda i, j, c: (j, i, c, 0)),
                 pl.BlockSpec((tg, p), lambda i, j, c: (c, i))],
                pl.BlockSpec((_SQ, _SQ, r, p), lambda i, j, c: (i, j, 0, 0)),
                (b, b, r, p), _F32, _GRAD, dh4, x)
  return dx, dw1p4.astype(w1p4.dtype), dw2r.astype(w2r.dtype)


_bs_op = jax.custom_vjp(_bs_forward, nondiff_argnums=(3,))
_bs_op.defvjp(_bs_fwd_rule, _bs_backward)


def _flat(fn):
  def wrapped(x, *factors, interpret=False):
    y = fn(x.reshape(-1, x.shape[-1]), *factors, _Mode(bool(interpret)))
    return y.reshape(*x.shape[:-1], y.shape[-1])
  return wrapped


@_flat
def blockshuffle(x, w1, w2, mode):
  """BlockShuffle x (T, N) -> (T, M); W1 (C, q, N/C), W2 (C, M/C, q); q a multiple of C."""
  x, w1, w2 = common_dtype(x, w1, w2)
  (b, q, p), s = w1.shape, w2.shape[1]
  r = q // b
  w1p4 = permute_rows(w1).reshape(b, b, r, p)
  w2r = w2.reshape(b, s, b, r).transpose(0, 2, 1, 3)  # W2r[j, i] = W2[j][:, i·r..]
  return interleave(_bs_op(x, w1p4, w2r, mode))


# ----------------------------------------------------------------------------- BlockDense


def _bd_forward(x, v, mode):
  """h3 (C, T, r): h3[i] = x[:, i-chunk] · V[i]ᵀ."""
  (t, _), (b, r, p) = x.shape, v.shape
  tt = _tile(t, TILE_T)
  return _call('blockdense_tpu_stage1', mode, functools.partial(_mm_kernel, dims=_NT),
               (t // tt, b),
               [pl.BlockSpec((tt, p), lambda ti, i: (ti, i)),
                pl.BlockSpec((_SQ, r, p), lambda ti, i: (i, 0, 0))],
               pl.BlockSpec((_SQ, tt, r), lambda ti, i: (i, ti, 0)),
               (b, t, r), x.dtype, ('parallel', 'parallel'), x, v)


def _bd_fwd_rule(x, v, mode):
  return _bd_forward(x, v, mode), (x, v)


def _bd_backward(mode, res, dh3):
  x, v = res
  (t, n), (b, r, p) = x.shape, v.shape
  dh3 = dh3.astype(x.dtype)
  tt = _tile(t, TILE_T)
  tg = _tile(t, TILE_T_GRAD)
  dx = _call('blockdense_tpu_dstage1', mode, functools.partial(_mm_kernel, dims=_NN),
             (t // tt, b),
             [pl.BlockSpec((_SQ, tt, r), lambda ti, i: (i, ti, 0)),
              pl.BlockSpec((_SQ, r, p), lambda ti, i: (i, 0, 0))],
             pl.BlockSpec((tt, p), lambda ti, i: (ti, i)),
             (t, n), x.dtype, ('parallel', 'parallel'), dh3, v)
  dv = _call('blockdense_tpu_dv', mode, _grad_kernel, (b, 1, t // tg),
             [pl.BlockSpec((_SQ, tg, r), lambda i, z, c: (i, c, 0)),
              pl.BlockSpec((tg, p), lambda i, z, c: (c, i))],
             pl.BlockSpec((_SQ, r, p), lambda i, z, c: (i, 0, 0)),
             (b, r, p), _F32, _GRAD, dh3, x)
  return dx, dv.astype(v.dtype)


_bd_op = jax.custom_vjp(_bd_forward, nondiff_argnums=(2,))
_bd_op.defvjp(_bd_fwd_rule, _bd_backward)


@_flat
def blockdense(x, v, u, mode):
  """BlockDense x (T, N) -> (T, M); V (C, R/C, N/C), U (M, R)."""
  x, v, u = common_dtype(x, v, u)
  b, r, _ = v.shape
  h3 = _bd_op(x, v, mode)
  return jnp.einsum('ctr,mcr->tm', h3, u.reshape(u.shape[0], b, r))

