"""Structured linear layers: drop-in replacements for a dense `y = x W^T + b`.

Four parametrizations of an (out=M, in=N) map, with factors stored exactly as the paper's code
stores them (docs/design.md §2; the letters: N inputs, M outputs, R rank, C blocks, §1):

  Dense            W (M, N)                                              N·M params
  LowRank(R)       V (R, N), U (M, R);  y = U (V x)                      R·(N+M)
  BlockDense(C,R)  V (C, R/C, N/C) block-diagonal, then dense U (M, R)   R·(M + N/C)
  BlockShuffle(C)  W1 (C, q, N/C), shuffle, W2 (C, M/C, q), q=min(N,M)/C  min(N,M)·(N+M)/C

Every layer offers `to_dense()`, the exact (M, N) matrix it applies, permutations included.

Self-guided training (design §3) lives here too: a layer built with `guide=True` owns a
dense guide `W` initialised to its own `to_dense()` and outputs `α·Wx + (1−α)·structured(x) + b`.
With `reduce_flop=True` each call draws u ~ U[0, 1) and, when u ≥ α, takes a `lax.cond` branch
that never computes the guide matmul and returns `structured(x) + b`.

Pre-merge (design §8, inference): `merge(threshold)` keeps `to_dense()` as a `Merged` variable next
to the factors; a call on at most `threshold` tokens (static at trace time) applies it as one
dense matmul, a larger call the factors. `structffn_jax.premerge` calibrates the threshold.

`gelu_ffn(fc1, fc2, x)` runs two BlockShuffle layers with the GELU between them as one op (the
model's FeedForward takes it where `fusable_gelu_ffn` says it applies; kernels/xla.py).

Parameters name their dimensions with logical axes (embed, mlp, rank, blocks, ...) in their
`axes` metadata (`logical`), so that a sharding rules table can place them on a device mesh
(structffn_jax/sharding.py) and `nnx.vmap` can add a stacked layer axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from structffn_jax import kernels
from structffn_jax.schema import INITS, METHODS

DEFAULT_STD = 0.02


# ----------------------------------------------------------------------------- initialisers


def _gaussian(key, shape, std):
  return std * jax.random.normal(key, shape, jnp.float32)


def _svd_lowrank(key, m, n, r, std):
  """LowRank "svd" init: rank-r truncation of a dense N(0, std²) draw, √S split evenly."""
  u, s, vh = jnp.linalg.svd(_gaussian(key, (m, n), std), full_matrices=False)
  root = jnp.sqrt(s[:r])
  return u[:, :r] * root[None, :], root[:, None] * vh[:r]  # U (M, R), V (R, N)


def _orthogonalize(w):
  """Replace each trailing 2-D matrix by U·Vh of its own SVD (all singular values 1)."""
  u, _, vh = jnp.linalg.svd(w, full_matrices=False)
  return u @ vh


def _check_divides(layer, what, value, divisor, divisor_name):
  if divisor <= 0 or value % divisor:
    options = [d for d in range(1, min(value, 64) + 1) if value % d == 0]
    raise ValueError(
        f'{layer}: {what}={value} is not divisible by {divisor_name}={divisor}; '
        f'choose {divisor_name} from the divisors of {value} (e.g. {options[-6:]}).')


# ----------------------------------------------------------------------------- base class


def logical(*axes) -> dict:
  """The metadata of a Param whose dimensions have the logical names `axes` (None: unnamed).

  The names go to sharding.param_shardings through `config.mesh.rules`; the model's `nnx.vmap`
  inserts the stacked `layers` axis into them (its transform_metadata names this key).
  """
  return {'axes': tuple(axes)}


class Merged(nnx.Variable):
  """A structured layer's merged dense (M, N) matrix, kept for small calls: never trained."""


class StructuredLinear(nnx.Module):
  """Shared machinery: bias, compute dtype, optional self-guided dense guide.

  Subclasses implement `_structured(x)` (no bias, compute dtype) and `to_dense()`.
  """

  in_features: int
  out_features: int

  def _finish_init(self, *, use_bias, guide, reduce_flop, dtype, param_dtype, in_axis, out_axis,
                   rngs):
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.reduce_flop = reduce_flop
    self.bias = nnx.data(nnx.Param(jnp.zeros((self.out_features,), param_dtype),
                                   **logical(out_axis)) if use_bias else None)
    self.guide = nnx.data(None)
    if guide:
      self.guide = nnx.Param(self.to_dense().astype(param_dtype), **logical(out_axis, in_axis))
    self.merged = nnx.data(None)  # pre-merge (see `merge`): the dense matrix, inference only
    self.merge_threshold = 0  # static: calls on at most this many tokens use `merged`

  # The structured path, without bias, in the compute dtype. Shape (..., N) -> (..., M).
  def _structured(self, x):
    raise NotImplementedError

  def to_dense(self) -> jax.Array:
    """The exact (out_features, in_features) matrix this layer applies (guide excluded)."""
    raise NotImplementedError

  def _cast(self, p):
    return p[...].astype(self.dtype) if self.dtype is not None else p[...]

  def _input(self, x):
    """x checked against in_features and cast to the compute dtype."""
    if x.shape[-1] != self.in_features:
      raise ValueError(f'{type(self).__name__}: input has {x.shape[-1]} features, '
                       f'expected in_features={self.in_features}.')
    return x.astype(self.dtype) if self.dtype is not None else x

  def drop_guide(self):
    """Remove the guide once self-guided training has handed over (α = 0 from then on)."""
    self.guide = nnx.data(None)

  def merge(self, threshold: int, dense=None):
    """Pre-merge (design §8): keep `to_dense()` as well; calls on ≤ threshold tokens apply it.

    The token count of a call is the product of x's leading dimensions, static at trace time,
    so each traced call contains exactly one of the two paths. `dense`: the matrix to keep when
    the caller computed it (stacked layers merge per layer under vmap). Inference only.
    """
    if self.guide is not None:
      raise ValueError(f'{type(self).__name__}: cannot pre-merge while the self-guided guide '
                       'exists; merge after the hand-over (drop_guide()).')
    dense = self.to_dense() if dense is None else dense
    self.merged = nnx.data(Merged(jnp.asarray(dense, self.param_dtype)))
    self.merge_threshold = int(threshold)

  def unmerge(self):
    """Forget the merged matrix: every call takes the structured path again."""
    self.merged = nnx.data(None)
    self.merge_threshold = 0

  def _apply(self, x):
    """x @ W^T without bias: the merged matrix for small calls when pre-merged, else structured."""
    tokens = int(np.prod(x.shape[:-1]))
    if self.merged is not None and tokens <= self.merge_threshold:
      return jnp.einsum('...n,mn->...m', x, self._cast(self.merged))
    return self._structured(x)

  def __call__(self, x, *, alpha=None, key=None):
    """Apply the layer to x of shape (..., in_features).

    alpha: guide weight α in [0, 1] (scalar). Required when the layer has a guide.
    key: PRNG key for the reduce_flop draw. Without one (evaluation) the full blend is computed.
    """
    x = self._input(x)
    if self.guide is None:
      y = self._apply(x)
    else:
      if alpha is None:
        raise ValueError(f'{type(self).__name__} has a self-guided guide: pass alpha=.')
      alpha = jnp.asarray(alpha, jnp.float32)
      w = self._cast(self.guide)

      def mixed(x):
        a = alpha.astype(x.dtype)
        return a * jnp.einsum('...n,mn->...m', x, w) + (1 - a) * self._structured(x)

      if self.reduce_flop and key is not None:
        u = jax.random.uniform(key, ())
        y = jax.lax.cond(u < alpha, mixed, self._structured, x)
      else:
        y = mixed(x)
    if self.bias is not None:
      y = y + self._cast(self.bias)
    return y

  def num_weight_params(self) -> int:
    """Weight parameters (biases excluded), the guide included when present."""
    leaves = jax.tree.leaves(nnx.state(self, nnx.Param))
    n = sum(int(np.prod(p.shape)) for p in leaves)
    return n - (self.out_features if self.bias is not None else 0)


# ----------------------------------------------------------------------------- layers


class Dense(StructuredLinear):
  """Plain dense layer, W stored (M, N)."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               init: str = 'paper', std: float = DEFAULT_STD, dtype=None,
               param_dtype=jnp.float32, in_axis='embed', out_axis='mlp', guide: bool = False,
               reduce_flop: bool = False, rngs: nnx.Rngs):
    del init  # Dense has only the Gaussian init.
    if guide:
      raise ValueError('Dense: a dense layer has no structured factors to guide (guide=False).')
    self.in_features, self.out_features = in_features, out_features
    self.kernel = nnx.Param(_gaussian(rngs.params(), (out_features, in_features), std)
                            .astype(param_dtype), **logical(out_axis, in_axis))
    self._finish_init(use_bias=use_bias, guide=False, reduce_flop=False, dtype=dtype,
                      param_dtype=param_dtype, in_axis=in_axis, out_axis=out_axis, rngs=rngs)

  def _structured(self, x):
    return jnp.einsum('...n,mn->...m', x, self._cast(self.kernel))

  def to_dense(self):
    return self.kernel[...]


class LowRank(StructuredLinear):
  """y = U (V x), V (R, N), U (M, R). Init "svd" (paper) or plain Gaussian."""

  def __init__(self, in_features: int, out_features: int, rank: int, *, use_bias: bool = True,
               init: str = 'paper', std: float = DEFAULT_STD, dtype=None,
               param_dtype=jnp.float32, in_axis='embed', out_axis='mlp', guide: bool = False,
               reduce_flop: bool = False, implementation: str = 'auto',
               rngs: nnx.Rngs):
    if not 0 < rank <= min(in_features, out_features):
      raise ValueError(
          f'LowRank: rank={rank} must be in [1, min(in_features, out_features)] = '
          f'[1, {min(in_features, out_features)}] for a {in_features}->{out_features} layer.')
    _check_init('LowRank', init)
    self.in_features, self.out_features, self.rank = in_features, out_features, rank
    key = rngs.params()
    if init == 'paper':
      u, v = _svd_lowrank(key, out_features, in_features, rank, std)
    else:
      ku, kv = jax.random.split(key)
      u = _gaussian(ku, (out_features, rank), std)
      v = _gaussian(kv, (rank, in_features), std)
    self.v = nnx.Param(v.astype(param_dtype), **logical('rank', in_axis))
    self.u = nnx.Param(u.astype(param_dtype), **logical(out_axis, 'rank'))
    self.implementation = _check_implementation('LowRank', implementation)
    self._finish_init(use_bias=use_bias, guide=guide, reduce_flop=reduce_flop, dtype=dtype,
                      param_dtype=param_dtype, in_axis=in_axis, out_axis=out_axis, rngs=rngs)

  def _structured(self, x):
    return kernels.lowrank(x, self._cast(self.v), self._cast(self.u),
                           implementation=self.implementation)

  def to_dense(self):
    return self.u[...] @ self.v[...]


class BlockDense(StructuredLinear):
  """Block-diagonal V (C, R/C, N/C) on the C input chunks, block-major concat, then dense U."""

  def __init__(self, in_features: int, out_features: int, rank: int, blocks: int, *,
               use_bias: bool = True, init: str = 'paper', std: float = DEFAULT_STD, dtype=None,
               param_dtype=jnp.float32, in_axis='embed', out_axis='mlp', guide: bool = False,
               reduce_flop: bool = False, implementation: str = 'auto',
               rngs: nnx.Rngs):
    _check_divides('BlockDense', 'in_features', in_features, blocks, 'blocks')
    _check_divides('BlockDense', 'rank', rank, blocks, 'blocks')
    if not 0 < rank <= out_features:
      raise ValueError(f'BlockDense: rank={rank} must be in [1, out_features={out_features}].')
    if rank // blocks > in_features // blocks:
      raise ValueError(f'BlockDense: rank/blocks={rank // blocks} exceeds in_features/blocks='
                       f'{in_features // blocks}; lower rank to at most {in_features}.')
    _check_init('BlockDense', init)
    self.in_features, self.out_features = in_features, out_features
    self.rank, self.blocks = rank, blocks
    kv, ku = jax.random.split(rngs.params())
    v = _gaussian(kv, (blocks, rank // blocks, in_features // blocks), std)
    u = _gaussian(ku, (out_features, rank), std)
    if init == 'paper':
      v, u = _orthogonalize(v), _orthogonalize(u)
    self.v = nnx.Param(v.astype(param_dtype), **logical('blocks', None, None))
    self.u = nnx.Param(u.astype(param_dtype), **logical(out_axis, 'rank'))
    self.implementation = _check_implementation('BlockDense', implementation)
    self._finish_init(use_bias=use_bias, guide=guide, reduce_flop=reduce_flop, dtype=dtype,
                      param_dtype=param_dtype, in_axis=in_axis, out_axis=out_axis, rngs=rngs)

  def _structured(self, x):
    # Kernel choice and layouts (block dimension leading, batched matmuls): kernels/api.py.
    return kernels.blockdense(x, self._cast(self.v), self._cast(self.u),
                              implementation=self.implementation)

  def to_dense(self):
    return self.u[...] @ jax.scipy.linalg.block_diag(*self.v[...])


class BlockShuffle(StructuredLinear):
  """Monarch-style: block-diagonal W1, a fixed shuffle, block-diagonal W2, interleaved output.

  With C blocks in both stages, p = N/C, q = min(N, M)/C, s = M/C:
    h[i] = W1[i] x[i]                        (C, q)   x split into C chunks of p
    h'[j, a] = flat(h)[a·C + j]              (C, q)   the shuffle: view (q, C), transpose
    u[j] = W2[j] h'[j]                       (C, s)
    y[a·C + j] = u[j, a]                     (M,)     interleaved output
  The default XLA layout keeps the block dimension first and moves data once for the shuffle and
  once for the interleave (see structffn_jax/kernels/xla.py); `to_dense()` spells both out.
  """

  def __init__(self, in_features: int, out_features: int, blocks: int, *, use_bias: bool = True,
               init: str = 'paper', std: float = DEFAULT_STD, dtype=None,
               param_dtype=jnp.float32, in_axis='embed', out_axis='mlp', guide: bool = False,
               reduce_flop: bool = False, implementation: str = 'auto',
               rngs: nnx.Rngs):
    _check_divides('BlockShuffle', 'in_features', in_features, blocks, 'blocks')
    _check_divides('BlockShuffle', 'out_features', out_features, blocks, 'blocks')
    _check_init('BlockShuffle', init)
    self.in_features, self.out_features, self.blocks = in_features, out_features, blocks
    p, s = in_features // blocks, out_features // blocks
    q = min(in_features, out_features) // blocks
    k1, k2 = jax.random.split(rngs.params())
    w1 = _gaussian(k1, (blocks, q, p), std)
    w2 = _gaussian(k2, (blocks, s, q), std)
    if init == 'paper':
      w1, w2 = _orthogonalize(w1), _orthogonalize(w2)
    self.w1 = nnx.Param(w1.astype(param_dtype), **logical('blocks', None, None))
    self.w2 = nnx.Param(w2.astype(param_dtype), **logical('blocks', None, None))
    self.implementation = _check_implementation('BlockShuffle', implementation)
    self._finish_init(use_bias=use_bias, guide=guide, reduce_flop=reduce_flop, dtype=dtype,
                      param_dtype=param_dtype, in_axis=in_axis, out_axis=out_axis, rngs=rngs)

  def _structured(self, x):
    # The einsum that follows the docstring word for word is kernels/reference.py; the default
    # path keeps blocks leading and has a hand-written backward (kernels/xla.py, kernels/api.py).
    return kernels.blockshuffle(x, self._cast(self.w1), self._cast(self.w2),
                                implementation=self.implementation)

  def to_dense(self):
    c = self.blocks
    q = self.w1.shape[1]
    first = jax.scipy.linalg.block_diag(*self.w1[...])   # (C·q, N)
    second = jax.scipy.linalg.block_diag(*self.w2[...])  # (M, C·q), block-major in and out
    # Shuffle: block j of the second stage reads flat(h)[a·C + j] at its position a.
    shuffle = np.arange(c * q).reshape(q, c).T.reshape(-1)
    # Interleave: output position a·C + j holds block-major entry j·(M/C) + a.
    s = self.out_features // c
    interleave = np.arange(c * s).reshape(c, s).T.reshape(-1)
    return second[interleave] @ first[shuffle]


def fusable_gelu_ffn(fc1, fc2, x) -> bool:
  """Whether `gelu_ffn(fc1, fc2, x)` can run fc1, GELU and fc2 as one op: both BlockShuffle
  layers without a guide, neither pre-merged for this many tokens, both on the XLA path."""
  if not (isinstance(fc1, BlockShuffle) and isinstance(fc2, BlockShuffle)):
    return False
  tokens = int(np.prod(x.shape[:-1]))
  for layer in (fc1, fc2):
    if layer.guide is not None or (layer.merged is not None and tokens <= layer.merge_threshold):
      return False
    if kernels.resolve('blockshuffle', layer.implementation, x, layer.w1, layer.w2) != 'xla':
      return False
  return fc1.dtype == fc2.dtype and fc1.out_features == fc2.in_features


def gelu_ffn(fc1, fc2, x):
  """fc2(GELU_tanh(fc1(x))), biases included, as one op (see `fusable_gelu_ffn`)."""
  x = fc1._input(x)  # pylint: disable=protected-access
  dtype = x.dtype

  def bias(layer):
    if layer.bias is None:
      return jnp.zeros((layer.out_features,), dtype)
    return layer._cast(layer.bias)  # pylint: disable=protected-access

  return kernels.blockshuffle_ffn(
      x, fc1._cast(fc1.w1), fc1._cast(fc1.w2), bias(fc1),  # pylint: disable=protected-access
      fc2._cast(fc2.w1), fc2._cast(fc2.w2), bias(fc2),  # pylint: disable=protected-access
      implementation='xla')


def _check_implementation(layer, implementation):
  if implementation not in kernels.IMPLEMENTATIONS:
    raise ValueError(f'{layer}: implementation={implementation!r} is unknown; use one of '
                     f'{kernels.IMPLEMENTATIONS}.')
  return implementation


def _check_init(layer, init):
  if init not in INITS:
    raise ValueError(f'{layer}: init={init!r} is unknown; use one of {INITS} '
                     "('paper' = svd for LowRank, orthogonal blocks for the block layers).")


# ----------------------------------------------------------------------------- factory


def make_linear(method: str, in_features: int, out_features: int, *, rank: int = 0,
                blocks: int = 1, **kwargs) -> StructuredLinear:
  """Build the layer named by `method` (one of METHODS) with the given rank / block count."""
  if method == 'dense':
    kwargs.pop('implementation', None)  # one dense matmul: nothing to choose
    return Dense(in_features, out_features, **kwargs)
  if method == 'lowrank':
    return LowRank(in_features, out_features, rank, **kwargs)
  if method == 'blockdense':
    return BlockDense(in_features, out_features, rank, blocks, **kwargs)
  if method == 'blockshuffle':
    return BlockShuffle(in_features, out_features, blocks, **kwargs)
  raise ValueError(f'ffn.method={method!r} is unknown; allowed: {", ".join(METHODS)}.')


def weight_params(method: str, n: int, m: int, *, rank: int = 0, blocks: int = 1) -> int:
  """Closed-form weight parameter count (= MACs per token) of design §2, for checks and docs."""
  if method == 'dense':
    return n * m
  if method == 'lowrank':
    return rank * (n + m)
  if method == 'blockdense':
    return rank * (m + n // blocks)
  if method == 'blockshuffle':
    return min(n, m) * (n + m) // blocks
  raise ValueError(f'ffn.method={method!r} is unknown; allowed: {", ".join(METHODS)}.')
