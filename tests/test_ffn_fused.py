"""The fused BlockShuffle FFN (fc1, bias, GELU, fc2, bias as one op) against independent references.

Forward and the gradients with respect to x and both biases are compared with float64 numpy
built from each layer's explicit dense matrix (`to_dense()`, permutations included) and the
closed-form derivative of the tanh GELU; the factor gradients with the plain einsums of
kernels/reference.py differentiated by JAX. Shapes cover N < M and N > M inside the FFN,
different block counts for fc1 and fc2, and leading batch dimensions. Then the model's
FeedForward: it takes the fused op exactly where it applies, with the same results as the
layers one by one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from structffn_jax import config as config_lib
from structffn_jax import kernels, structured
from structffn_jax.model import DTYPES, FeedForward

C = np.sqrt(2 / np.pi)


def _gelu64(z):
  return 0.5 * z * (1 + np.tanh(C * (z + 0.044715 * z**3)))


def _dgelu64(z):
  t = np.tanh(C * (z + 0.044715 * z**3))
  return 0.5 * (1 + t) + 0.5 * z * (1 - t**2) * C * (1 + 3 * 0.044715 * z**2)


def _layers(d, f, b1, b2, seed, dtype=None):
  rngs = nnx.Rngs(seed)
  fc1 = structured.BlockShuffle(d, f, b1, init='gaussian', std=0.2, dtype=dtype, rngs=rngs)
  fc2 = structured.BlockShuffle(f, d, b2, init='gaussian', std=0.2, dtype=dtype, rngs=rngs)
  rng = np.random.default_rng(seed)
  for layer in (fc1, fc2):
    layer.bias[...] = jnp.asarray(rng.standard_normal(layer.out_features), jnp.float32)
  return fc1, fc2


def _close(got, want, rel, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, what
  np.testing.assert_allclose(got, want, rtol=0, atol=rel * np.abs(want).max(), err_msg=what)


# (d, f, blocks of fc1, blocks of fc2, leading dims of x)
CASES = [(16, 64, 4, 4, (2, 5)), (24, 96, 2, 2, (7,)), (32, 128, 4, 2, (3, 4)),
         (12, 36, 3, 3, (5,)), (64, 256, 4, 4, (33,))]


@pytest.mark.parametrize('d,f,b1,b2,lead', CASES,
                         ids=[f'd{c[0]}-f{c[1]}-B{c[2]}{c[3]}' for c in CASES])
def test_fused_ffn_matches_float64_dense_and_reference_grads(d, f, b1, b2, lead):
  fc1, fc2 = _layers(d, f, b1, b2, seed=d + f + b2)
  rng = np.random.default_rng(d * f)
  x = rng.standard_normal((*lead, d))
  dy = rng.standard_normal((*lead, d))
  assert structured.fusable_gelu_ffn(fc1, fc2, jnp.asarray(x, jnp.float32))

  params = [fc1.w1[...], fc1.w2[...], fc1.bias[...], fc2.w1[...], fc2.w2[...], fc2.bias[...]]

  def value_and_grads(implementation):
    def loss(x, *p):
      y = kernels.blockshuffle_ffn(x, *p, implementation=implementation)
      return jnp.vdot(y, jnp.asarray(dy, jnp.float32)), y
    fn = jax.jit(jax.grad(loss, argnums=tuple(range(7)), has_aux=True))
    grads, y = fn(jnp.asarray(x, jnp.float32), *params)
    return y, grads

  y, grads = value_and_grads('xla')

  # float64 numpy from the explicit dense matrices.
  w1 = np.asarray(fc1.to_dense(), np.float64)
  w2 = np.asarray(fc2.to_dense(), np.float64)
  c1, c2 = (np.asarray(l.bias[...], np.float64) for l in (fc1, fc2))
  xf, dyf = x.reshape(-1, d), dy.reshape(-1, d)
  pre = xf @ w1.T + c1
  want_y = _gelu64(pre) @ w2.T + c2
  dpre = (dyf @ w2) * _dgelu64(pre)
  _close(y.reshape(-1, d), want_y, 2e-5, 'y')
  _close(grads[0].reshape(-1, d), dpre @ w1, 2e-5, 'dx')
  _close(grads[3], dpre.sum(0), 2e-5, 'fc1 bias')
  _close(grads[6], dyf.sum(0), 2e-5, 'fc2 bias')

  # Factor gradients: the plain einsums differentiated by JAX.
  _, want = value_and_grads('reference')
  for name, g, w in zip(('fc1.w1', 'fc1.w2', 'fc2.w1', 'fc2.w2'),
                        (grads[1], grads[2], grads[4], grads[5]),
                        (want[1], want[2], want[4], want[5])):
    _close(g, w, 2e-5, name)


def test_fused_ffn_bfloat16():
  fc1, fc2 = _layers(32, 128, 4, 4, seed=1, dtype=jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((16, 32)), jnp.float32)
  got = structured.gelu_ffn(fc1, fc2, x)
  assert got.dtype == jnp.bfloat16
  w1 = np.asarray(fc1.to_dense(), np.float64)
  w2 = np.asarray(fc2.to_dense(), np.float64)
  c1, c2 = (np.asarray(l.bias[...], np.float64) for l in (fc1, fc2))
  want = _gelu64(np.asarray(x, np.float64) @ w1.T + c1) @ w2.T + c2
  _close(got, want, 3e-2, 'bfloat16 fused FFN')


def _feedforward(activation='gelu', method='blockshuffle', guide=False, implementation='auto'):
  cfg = config_lib.base_config().model
  cfg.hidden_dim, cfg.ffn_dim, cfg.activation = 32, 128, activation
  cfg.ffn.method, cfg.ffn.blocks, cfg.ffn.rank, cfg.ffn.init = method, 4, 8, 'gaussian'
  cfg.ffn.implementation = implementation
  return FeedForward(cfg, method, DTYPES['float32'], guide=guide, reduce_flop=False,
                     rngs=nnx.Rngs(0))


def test_feedforward_fuses_exactly_where_it_applies():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 8, 32)), jnp.float32)
  fusable = lambda ffn: structured.fusable_gelu_ffn(ffn.fc1, ffn.fc2, x)
  assert fusable(_feedforward())
  assert not fusable(_feedforward(guide=True))             # the blend needs each layer's output
  assert not fusable(_feedforward(implementation='pallas'))  # the Pallas kernels, layer by layer
  einsums = _feedforward()
  einsums.fc2.implementation = 'reference'
  assert not fusable(einsums)
  assert not fusable(_feedforward(method='lowrank'))
  merged = _feedforward()
  for layer in (merged.fc1, merged.fc2):
    layer.merge(threshold=16)
  assert not fusable(merged)                               # 16 tokens: the merged matrices
  assert structured.fusable_gelu_ffn(merged.fc1, merged.fc2, jnp.concatenate([x, x], 1))

  # The model's FeedForward: fused and one-by-one agree, forward and gradients.
  ffn = _feedforward()
  graphdef, params = nnx.split(ffn)

  def loss(params, x, fuse):
    model = nnx.merge(graphdef, params)
    model.fuse = fuse
    return jnp.sum(jnp.sin(model(x)))

  fused = jax.grad(loss, argnums=(0, 1))(params, x, True)
  layers = jax.grad(loss, argnums=(0, 1))(params, x, False)
  for got, want in zip(jax.tree.leaves(fused), jax.tree.leaves(layers)):
    _close(got, want, 2e-5, 'fused vs layers')


def test_swiglu_is_never_fused():
  ffn = _feedforward(activation='swiglu')
  x = jnp.ones((4, 32))
  jaxpr = str(jax.make_jaxpr(lambda x: ffn(x))(x))
  assert jaxpr.count('custom_vjp_call') == 2  # fc1 and fc2 on their own
  jaxpr = str(jax.make_jaxpr(lambda x: _feedforward()(x))(x))
  assert jaxpr.count('custom_vjp_call') == 1  # one fused op
