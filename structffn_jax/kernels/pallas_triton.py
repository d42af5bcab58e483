"""Pallas kernels for BlockShuffle and BlockDense on GPUs (Triton lowering), with hand-written
backward passes. The TPU (Mosaic) counterparts are in pallas_tpu.py.

On a GPU the XLA path spends a full read and write of an activation on every permutation
(x into blocks, the shuffle, the interleave, and their mirror images in the backward). Here the
permutations live in the kernels' block index maps instead: each kernel reads its operand tiles
straight from the token-major arrays and writes its result tile straight to where the next step
wants it, so no transpose or copy pass runs between the matmuls.

Two kernel bodies do all the work, each a tiled matmul accumulating in float32:
  _nt_kernel  o = a · wᵀ, looping over the contracted dimension (activations times a block)
  _tn_kernel  o = dᵀ · a, looping over tokens (a weight gradient; tokens split over programs
              into float32 partial sums that XLA adds)
and the BlockSpecs below make them the stages of the two layers (letters of docs/design.md §1:
C blocks, i and j block indices, a a position inside a block):

  BlockShuffle (q = min(N, M)/C, r = q/C, W1's rows permuted as in layout.permute_rows)
    forward   h' [j, T, i·r:(i+1)·r] = x[:, i-chunk] · W1p[i, j·r:(j+1)·r]ᵀ   (stage 1 + shuffle)
              y[:, a·C + j]          = h'[j] · W2[j]ᵀ                     (stage 2 + interleave)
    backward  dh~[i, T, j·r:(j+1)·r] = dy[:, j::C] · W2[j][:, i·r:(i+1)·r]
              dx[:, i-chunk]         = dh~[i] · W1p[i]
              dW2[j] = dy[:, j::C]ᵀ · h'[j] ;  dW1p[i] = dh~[i]ᵀ · x[:, i-chunk]
  BlockDense (r' = R/C)
    forward   h[:, i·r':(i+1)·r'] = x[:, i-chunk] · V[i]ᵀ (block-major, in place); y = h Uᵀ (XLA)
    backward  dh = dy U, dU = dyᵀ h (XLA); dx[:, i-chunk] = dh[:, i-block] · V[i];
              dV[i] = dh[:, i-block]ᵀ · x[:, i-chunk]

The kernels are generic Pallas (`pl.pallas_call` with BlockSpecs, `lax.dot_general`, loops over
`pl.ds` slices) lowered through the Triton backend on GPU, and run unchanged with
`interpret=True` on CPU for the tests. On GPU every tile is a power of two of at least 16 (the
Triton dot's constraint); `supports` says which shapes qualify, the others take the XLA path.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from structffn_jax.kernels.layout import common_dtype, permute_rows
from structffn_jax.kernels.layout import tile as _tile

try:  # The Triton lowering's parameters; absent from some builds.
  from jax.experimental.pallas import triton as _triton
except ImportError:  # pragma: no cover
  _triton = None

_SQ = pl.squeezed  # a block dimension of size 1 that the kernel does not see
_F32 = jnp.float32

# Preferred tile sizes (GPU). Tokens per program, output columns (M), contracted slice (N), and
# tokens per step of a weight-gradient loop. Untuned: no GPU measurement exists yet
# (BENCHMARKS.md).
TILE_T, TILE_N, TILE_K, TILE_T_GRAD = 64, 64, 64, 64
MAX_TOKEN_SPLITS = 16  # programs a weight gradient's token sum is split over


class _Mode(NamedTuple):
  interpret: bool  # run the kernels in the Pallas interpreter (CPU tests)


def _gpu_tile_ok(n: int, pref: int) -> bool:
  return _tile(n, pref, False) >= 16


def supports(op: str, x_shape, *factor_shapes, gpu: bool) -> bool:
  """Whether the kernels take op on these shapes (on GPU: Triton-sized tiles throughout)."""
  tokens = math.prod(x_shape[:-1])
  if op == 'blockshuffle':
    (b, q, p), (_, s, _) = factor_shapes
    if q % b:  # the shuffle must move whole runs of r = q/C (b: the block count C)
      return False
    dims = (q // b, p, q, s)
  elif op == 'blockdense':
    (b, r, p), _ = factor_shapes
    dims = (r, p)
  else:
    return False
  if not gpu:
    return tokens > 0
  return _gpu_tile_ok(tokens, TILE_T) and all(_gpu_tile_ok(d, TILE_N) for d in dims)


def _compiler_params(mode):
  # Named explicitly: a pallas_call without parameters goes to Mosaic GPU when the flag
  # jax_pallas_use_mosaic_gpu is on, and Mosaic GPU has no generic dot_general.
  if mode.interpret or _triton is None:
    return None
  return _triton.CompilerParams(num_warps=4, num_stages=3)


# ----------------------------------------------------------------------------- kernel bodies


def _nt_kernel(a_ref, w_ref, o_ref, *, tk):
  """o = a · wᵀ: a (tT, N), w (tM, N), o (tT, tM); the contracted N in slices of tk."""
  def step(k, acc):
    at = pl.ds(pl.multiple_of(k * tk, tk), tk)
    return acc + lax.dot_general(a_ref[:, at], w_ref[:, at], (((1,), (1,)), ((), ())),
                                 preferred_element_type=_F32)
  acc = lax.fori_loop(0, a_ref.shape[-1] // tk, step, jnp.zeros(o_ref.shape, _F32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _tn_kernel(d_ref, a_ref, o_ref, *, tt):
  """o = dᵀ · a: d (T', tN), a (T', tK), o (tN, tK) float32; tokens in slices of tt."""
  def step(t, acc):
    at = pl.ds(pl.multiple_of(t * tt, tt), tt)
    return acc + lax.dot_general(d_ref[at, :], a_ref[at, :], (((0,), (0,)), ((), ())),
                                 preferred_element_type=_F32)
  o_ref[...] = lax.fori_loop(0, d_ref.shape[0] // tt, step, jnp.zeros(o_ref.shape, _F32))


def _nt(name, mode, grid, a, a_spec, w, w_spec, out_shape, out_spec, k):
  kernel = functools.partial(_nt_kernel, tk=_tile(k, TILE_K, mode.interpret))
  return pl.pallas_call(kernel, grid=grid, in_specs=[a_spec, w_spec], out_specs=out_spec,
                        out_shape=jax.ShapeDtypeStruct(out_shape, a.dtype), name=name,
                        interpret=mode.interpret, compiler_params=_compiler_params(mode))(a, w)


def _tn(name, mode, grid, d, d_spec, a, a_spec, out_shape, out_spec, tokens_per_split):
  kernel = functools.partial(_tn_kernel, tt=_tile(tokens_per_split, TILE_T_GRAD, mode.interpret))
  return pl.pallas_call(kernel, grid=grid, in_specs=[d_spec, a_spec], out_specs=out_spec,
                        out_shape=jax.ShapeDtypeStruct(out_shape, _F32), name=name,
                        interpret=mode.interpret, compiler_params=_compiler_params(mode))(d, a)


def _token_splits(tokens: int, mode: _Mode) -> int:
  """How many programs share a weight gradient's sum over tokens (float32 partials)."""
  tt = _tile(tokens, TILE_T_GRAD, mode.interpret)
  splits = min(MAX_TOKEN_SPLITS, tokens // tt)
  while splits > 1 and tokens % (splits * tt):
    splits -= 1
  return max(splits, 1)


def _kernel_op(forward, backward):
  """A custom_vjp op (x, a, b, mode) from forward(x, a, b, mode) -> (y, h) and
  backward(mode, (x, h, a, b), dy) -> (dx, da, db); `mode` is static."""
  def fwd_rule(x, a, b, mode):
    y, h = forward(x, a, b, mode)
    return y, (x, h, a, b)

  op = jax.custom_vjp(lambda x, a, b, mode: forward(x, a, b, mode)[0], nondiff_argnums=(3,))
  op.defvjp(fwd_rule, backward)
  return op


def _flat(fn):
  def wrapped(x, *factors, interpret=False):
    y = fn(x.reshape(-1, x.shape[-1]), *factors, _Mode(bool(interpret)))
    return y.reshape(*x.shape[:-1], y.shape[-1])
  return wrapped


# ----------------------------------------------------------------------------- BlockShuffle


def _bs_forward(x, w1p, w2, mode):
  (t, _), (b, q, p), (_, s, _) = x.shape, w1p.shape, w2.shape
  r = q // b
  tt, tr, ts = (_tile(d, pref, mode.interpret) for d, pref in ((t, TILE_T), (r, TILE_N),
                                                              (s, TILE_N)))
  # Stage 1 + shuffle: block i's rows j·r.. go to h'[j, :, i·r..].
  hp = _nt('blockshuffle_stage1', mode, (t // tt, b, b, r // tr),
           x.reshape(t, b, p), pl.BlockSpec((tt, _SQ, p), lambda ti, i, j, c: (ti, i, 0)),
           w1p.reshape(b, b, r, p),
           pl.BlockSpec((_SQ, _SQ, tr, p), lambda ti, i, j, c: (i, j, c, 0)),
           (b, t, b, r), pl.BlockSpec((_SQ, tt, _SQ, tr), lambda ti, i, j, c: (j, ti, i, c)),
           k=p).reshape(b, t, q)
  # Stage 2 + interleave: block j's output column a goes to y[:, a·C + j].
  y = _nt('blockshuffle_stage2', mode, (t // tt, b, s // ts),
          hp, pl.BlockSpec((_SQ, tt, q), lambda ti, j, c: (j, ti, 0)),
          w2, pl.BlockSpec((_SQ, ts, q), lambda ti, j, c: (j, c, 0)),
          (t, s, b), pl.BlockSpec((tt, ts, _SQ), lambda ti, j, c: (ti, c, j)),
          k=q).reshape(t, s * b)
  return y, hp


def _bs_backward(mode, res, dy):
  x, hp, w1p, w2 = res
  (t, n), (b, q, p), (_, s, _) = x.shape, w1p.shape, w2.shape
  r = q // b
  tile = lambda d, pref: _tile(d, pref, mode.interpret)
  tt, tr, tp, ts, tq = tile(t, TILE_T), tile(r, TILE_N), tile(p, TILE_N), tile(s, TILE_N), \
      tile(q, TILE_N)
  dy3 = dy.astype(x.dtype).reshape(t, s, b)  # du[j] = dy3[:, :, j]
  w2t = jnp.swapaxes(w2, 1, 2)  # (C, q, s): the weights are small, their transposes cheap
  # dh~[i, :, j·r..] = du[j] · W2[j][:, i·r..]: un-shuffles while it multiplies.
  dh = _nt('blockshuffle_dstage2', mode, (t // tt, b, b, r // tr),
           dy3, pl.BlockSpec((tt, s, _SQ), lambda ti, j, i, c: (ti, 0, j)),
           w2t.reshape(b, b, r, s),
           pl.BlockSpec((_SQ, _SQ, tr, s), lambda ti, j, i, c: (j, i, c, 0)),
           (b, t, b, r), pl.BlockSpec((_SQ, tt, _SQ, tr), lambda ti, j, i, c: (i, ti, j, c)),
           k=s).reshape(b, t, q)
  dx = _nt('blockshuffle_dstage1', mode, (t // tt, b, p // tp),
           dh, pl.BlockSpec((_SQ, tt, q), lambda ti, i, c: (i, ti, 0)),
           jnp.swapaxes(w1p, 1, 2), pl.BlockSpec((_SQ, tp, q), lambda ti, i, c: (i, c, 0)),
           (t, b, p), pl.BlockSpec((tt, _SQ, tp), lambda ti, i, c: (ti, i, c)),
           k=q).reshape(t, n)
  splits = _token_splits(t, mode)
  tc = t // splits
  dw2 = _tn('blockshuffle_dw2', mode, (splits, b, s // ts, q // tq),
            dy3, pl.BlockSpec((tc, ts, _SQ), lambda c, j, u, v: (c, u, j)),
            hp, pl.BlockSpec((_SQ, tc, tq), lambda c, j, u, v: (j, c, v)),
            (splits, b, s, q), pl.BlockSpec((_SQ, _SQ, ts, tq), lambda c, j, u, v: (c, j, u, v)),
            tc).sum(0)
  dw1p = _tn('blockshuffle_dw1', mode, (splits, b, q // tq, p // tp),
             dh, pl.BlockSpec((_SQ, tc, tq), lambda c, i, u, v: (i, c, u)),
             x.reshape(t, b, p), pl.BlockSpec((tc, _SQ, tp), lambda c, i, u, v: (c, i, v)),
             (splits, b, q, p), pl.BlockSpec((_SQ, _SQ, tq, tp), lambda c, i, u, v: (c, i, u, v)),
             tc).sum(0)
  return dx, dw1p.astype(w1p.dtype), dw2.astype(w2.dtype)


_bs_op = _kernel_op(_bs_forward, _bs_backward)


@_flat
def blockshuffle(x, w1, w2, mode):
  """BlockShuffle x (T, N) -> (T, M); W1 (C, q, N/C), W2 (C, M/C, q); q a multiple of C."""
  x, w1, w2 = common_dtype(x, w1, w2)
  return _bs_op(x, permute_rows(w1), w2, mode)


# ----------------------------------------------------------------------------- BlockDense


def _bd_stage(x, v, mode):
  """h (T, R) block-major: h[:, i·r..] = x[:, i-chunk] · V[i]ᵀ, written in place."""
  (t, _), (b, r, p) = x.shape, v.shape
  tt, tr = _tile(t, TILE_T, mode.interpret), _tile(r, TILE_N, mode.interpret)
  return _nt('blockdense_stage1', mode, (t // tt, b, r // tr),
             x.reshape(t, b, p), pl.BlockSpec((tt, _SQ, p), lambda ti, i, c: (ti, i, 0)),
             v, pl.BlockSpec((_SQ, tr, p), lambda ti, i, c: (i, c, 0)),
             (t, b, r), pl.BlockSpec((tt, _SQ, tr), lambda ti, i, c: (ti, i, c)),
             k=p).reshape(t, b * r)


def _bd_forward(x, v, u, mode):
  h = _bd_stage(x, v, mode)
  return jnp.einsum('tr,mr->tm', h, u), h


def _bd_backward(mode, res, dy):
  x, h, v, u = res
  (t, n), (b, r, p) = x.shape, v.shape
  dy = dy.astype(x.dtype)
  du = jnp.einsum('tm,tr->mr', dy, h).astype(u.dtype)
  dh = jnp.einsum('tm,mr->tr', dy, u).reshape(t, b, r)
  tile = lambda d, pref: _tile(d, pref, mode.interpret)
  tt, tp, tr = tile(t, TILE_T), tile(p, TILE_N), tile(r, TILE_N)
  dx = _nt('blockdense_dstage1', mode, (t // tt, b, p // tp),
           dh, pl.BlockSpec((tt, _SQ, r), lambda ti, i, c: (ti, i, 0)),
           jnp.swapaxes(v, 1, 2), pl.BlockSpec((_SQ, tp, r), lambda ti, i, c: (i, c, 0)),
           (t, b, p), pl.BlockSpec((tt, _SQ, tp), lambda ti, i, c: (ti, i, c)),
           k=r).reshape(t, n)
  splits = _token_splits(t, mode)
  tc = t // splits
  dv = _tn('blockdense_dv', mode, (splits, b, r // tr, p // tp),
           dh, pl.BlockSpec((tc, _SQ, tr), lambda c, i, a, e: (c, i, a)),
           x.reshape(t, b, p), pl.BlockSpec((tc, _SQ, tp), lambda c, i, a, e: (c, i, e)),
           (splits, b, r, p), pl.BlockSpec((_SQ, _SQ, tr, tp), lambda c, i, a, e: (c, i, a, e)),
           tc).sum(0)
  return dx, dv.astype(v.dtype), du


_bd_op = _kernel_op(_bd_forward, _bd_backward)


@_flat
def blockdense(x, v, u, mode):
  """BlockDense x (T, N) -> (T, M); V (C, R/C, N/C), U (M, R)."""
  x, v, u = common_dtype(x, v, u)
  return _bd_op(x, v, u, mode)
