"""The GPT (docs/design.md §4) against an independent float64 numpy forward, plus structure.

The numpy reference reads the model's parameters (randomised first, so that biases, norm scales
and guides all matter) and recomputes the whole forward from the design's words: LayerNorm/RMSNorm,
fused QKV split q|k|v, grouped-query attention, RoPE rotate-half with base 10000, causal softmax
with scale 1/sqrt(head_dim), GELU (tanh) or SwiGLU, structured FFN factors, tied LM head.

Tolerance of the float32 model against float64: a few layers of width <= 128 accumulate relative
rounding of ~1e-6; 2e-5 of the logit scale leaves a margin and still fails on any real mistake.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from structffn_jax import structured
from structffn_jax.model import GPT
from tests import tiny_setup

ATOL_REL = 2e-5
tiny = tiny_setup.model_config  # (method, init='gaussian', **model overrides)


def build(cfg, seed=0, **kw):
  return GPT(cfg, rngs=nnx.Rngs(seed), **kw)


def randomize(model, seed):
  """Replace every parameter by a random value of a sensible scale (never zeros or ones)."""
  rng = np.random.default_rng(seed)
  for path, v in nnx.iter_graph(model):
    if not isinstance(v, nnx.Variable):
      continue
    assert isinstance(v, nnx.Param), path  # the model holds parameters only
    shape = v.shape
    if path[-1] == 'scale':
      new = 1 + 0.2 * rng.standard_normal(shape)
    elif path[-1] == 'bias':
      new = 0.1 * rng.standard_normal(shape)
    else:
      new = rng.standard_normal(shape) / math.sqrt(shape[-1])
    v.set_value(jnp.asarray(new, jnp.float32))
  return model


def build_random(cfg, seed, **kw):
  """The model's structure with random parameters, without running its initialisers.

  Built abstractly (nnx.eval_shape) and filled from numpy: on a CPU every initialiser shape
  costs a compilation, and a forward test needs the structure, not the initial values.
  """
  return randomize(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0), **kw)), seed)


def tokens_for(cfg, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, cfg.vocab_size, (batch, cfg.seq_len)).astype(np.int32)


def param_dict(model):
  return {tuple(str(p) for p in path): np.asarray(v[...], np.float64)
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ----------------------------------------------------------------------------- numpy reference


def np_linear(get, method, blocks, x, alpha):
  """Structured layer from its factors (design §2), plus the guide blend of design §3.1."""
  if method == 'dense':
    y = x @ get('kernel').T
  elif method == 'lowrank':
    y = (x @ get('v').T) @ get('u').T
  elif method == 'blockdense':
    v = get('v')
    xs = x.reshape(*x.shape[:-1], blocks, -1)
    h = np.einsum('...bp,brp->...br', xs, v).reshape(*x.shape[:-1], -1)
    y = h @ get('u').T
  else:
    w1, w2 = get('w1'), get('w2')
    xs = x.reshape(*x.shape[:-1], blocks, -1)
    h = np.einsum('...bp,bqp->...bq', xs, w1)  # (..., B, q)
    flat = h.reshape(*x.shape[:-1], -1)
    h2 = np.swapaxes(flat.reshape(*x.shape[:-1], -1, blocks), -1, -2)  # (r,l) -> (l,r)
    u = np.einsum('...jq,jsq->...js', h2, w2)  # (..., l, s)
    y = np.swapaxes(u, -1, -2).reshape(*x.shape[:-1], -1)  # y[t*l + j] = u[j, t]
  guide = get('guide', None)
  if guide is not None:
    y = alpha * (x @ guide.T) + (1 - alpha) * y
  bias = get('bias', None)
  return y if bias is None else y + bias


def np_norm(cfg, get, x):
  if cfg.norm == 'layernorm':
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + cfg.norm_eps) * get('scale')
    return y + get('bias') if cfg.use_bias else y
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * get('scale')


def np_rope(x, base):  # x (B, T, heads, H), positions 0..T-1
  t, h = x.shape[1], x.shape[-1]
  inv_freq = base ** (-np.arange(h // 2) * 2.0 / h)
  ang = np.arange(t)[:, None] * inv_freq[None, :]  # (T, H/2)
  cos, sin = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
  x1, x2 = x[..., :h // 2], x[..., h // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def np_gpt(model, cfg, tokens, alpha=None):
  p = param_dict(model)

  def getter(layer, *prefix):
    def get(name, *default):
      if layer == 0:
        key = ('first',) + prefix + (name,)
        return p[key] if key in p or not default else default[0]
      key = ('stack',) + prefix + (name,)
      return p[key][layer - 1] if key in p or not default else default[0]
    return get

  b, t = tokens.shape
  emb = p[('embedding',)]
  x = emb[tokens]
  if cfg.position == 'absolute':
    x = x + p[('pos_embedding',)][np.arange(t)][None]
  n, k = cfg.num_heads, cfg.num_kv_heads
  h = cfg.attn_dim // n
  mask = np.tril(np.ones((t, t), bool))
  for layer in range(cfg.num_layers):
    # Attention.
    a = np_norm(cfg, getter(layer, 'norm1'), x)
    qkv = np_linear(getter(layer, 'attn', 'qkv'), 'dense', 1, a, alpha)
    q = qkv[..., :n * h].reshape(b, t, n, h)
    kk = qkv[..., n * h:(n + k) * h].reshape(b, t, k, h)
    v = qkv[..., (n + k) * h:].reshape(b, t, k, h)
    assert qkv.shape[-1] == (n + 2 * k) * h
    if cfg.position == 'rope':
      q, kk = np_rope(q, cfg.rope_base), np_rope(kk, cfg.rope_base)
    o = np.zeros((b, t, n, h))
    for head in range(n):
      g = head // (n // k)  # query head -> its kv group
      s = np.einsum('bih,bjh->bij', q[:, :, head], kk[:, :, g]) / math.sqrt(h)
      s = np.where(mask, s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      o[:, :, head] = np.einsum('bij,bjh->bih', w, v[:, :, g])
    x = x + np_linear(getter(layer, 'attn', 'out'), 'dense', 1, o.reshape(b, t, n * h), alpha)
    # FFN.
    method = 'dense' if layer == 0 and cfg.first_layer_dense else cfg.ffn.method
    f = np_norm(cfg, getter(layer, 'norm2'), x)
    f = np_linear(getter(layer, 'ffn', 'fc1'), method, cfg.ffn.blocks, f, alpha)
    if cfg.activation == 'swiglu':
      gate, up = f[..., :cfg.ffn_dim], f[..., cfg.ffn_dim:]
      f = gate / (1 + np.exp(-gate)) * up
    else:
      f = 0.5 * f * (1 + np.tanh(math.sqrt(2 / math.pi) * (f + 0.044715 * f ** 3)))
    x = x + np_linear(getter(layer, 'ffn', 'fc2'), method, cfg.ffn.blocks, f, alpha)
  x = np_norm(cfg, lambda name: p[('final_norm', name)], x)
  return x @ emb.T


def assert_logits_close(actual, desired, atol_rel=ATOL_REL):
  actual = np.asarray(actual, np.float64)
  np.testing.assert_allclose(actual, desired, rtol=atol_rel,
                             atol=atol_rel * np.abs(desired).max())


# ----------------------------------------------------------------------------- reference forward

# One jitted forward for every test: it compiles once per model structure.
_forward = nnx.jit(lambda model, tokens, alpha=None, key=None: model(tokens, alpha=alpha, key=key))

# Every method with both position options; the other options spread over the eight. The base
# (no overrides) is layernorm, gelu, rope, biases, GQA 4 q / 2 kv heads, attn_dim 48 != hidden 32,
# first FFN dense, 3 layers.
REFERENCE_CASES = {
    'dense-rope-1layer-swiglu': dict(method='dense', num_layers=1, activation='swiglu'),
    'dense-absolute-nobias-rmsnorm': dict(method='dense', position='absolute', use_bias=False,
                                          norm='rmsnorm'),
    'lowrank-rope-paperinit': dict(method='lowrank', init='paper'),
    'lowrank-absolute-mha-swiglu-allstructured': dict(
        method='lowrank', position='absolute', num_kv_heads=4, attn_dim=32, activation='swiglu',
        first_layer_dense=False),
    'blockdense-rope-rmsnorm-swiglu': dict(method='blockdense', norm='rmsnorm',
                                           activation='swiglu'),
    'blockdense-absolute-kv1-allstructured': dict(method='blockdense', position='absolute',
                                                  num_kv_heads=1, first_layer_dense=False),
    'blockshuffle-rope-nobias-allstructured': dict(method='blockshuffle', use_bias=False,
                                                   first_layer_dense=False),
    'blockshuffle-absolute-rmsnorm-kv1': dict(method='blockshuffle', position='absolute',
                                              norm='rmsnorm', num_kv_heads=1),
}


@pytest.mark.parametrize('case', list(REFERENCE_CASES))
def test_forward_matches_numpy_reference_and_is_causal(case):
  cfg = tiny(**REFERENCE_CASES[case])
  # Every parameter random, so that biases, scales and every factor entry matter.
  model = build_random(cfg, seed=2)
  tokens = tokens_for(cfg, batch=1)
  t0 = 5
  changed = tokens.copy()
  changed[0, t0] = (tokens[0, t0] + 7) % cfg.vocab_size
  batch = np.concatenate([tokens, changed])
  logits = _forward(model, jnp.asarray(batch))
  assert logits.shape == (2, cfg.seq_len, cfg.vocab_size) and logits.dtype == jnp.float32
  ref = np_gpt(model, cfg, batch)
  assert np.abs(ref).max() > 0.5  # a non-trivial signal
  assert_logits_close(logits, ref)
  # Causality: changing token t0 changes no logit before t0 and every one from t0 on.
  logits = np.asarray(logits, np.float64)
  scale = np.abs(logits).max()
  diff = np.abs(logits[0] - logits[1]).max(-1)
  assert np.all(diff[:t0] <= 1e-6 * scale), diff
  assert np.all(diff[t0:] > 1e-3 * scale), diff


def test_paper_init_model():
  """The real initialisers, unperturbed: forward, init statistics, independent layers."""
  cfg = tiny(**REFERENCE_CASES['lowrank-rope-paperinit'])
  model = build(cfg, seed=1)
  tokens = tokens_for(cfg, seed=6)
  assert_logits_close(_forward(model, jnp.asarray(tokens)), np_gpt(model, cfg, tokens))
  p = param_dict(model)
  for k, v in p.items():
    if k[-1] == 'bias':
      np.testing.assert_array_equal(v, 0)
    elif k[-1] == 'scale':
      np.testing.assert_array_equal(v, 1)
  # Gaussian N(0, 0.02^2) weights: sample std within 5 standard errors.
  for k in (('embedding',), ('stack', 'attn', 'qkv', 'kernel'), ('first', 'ffn', 'fc1', 'kernel')):
    n = p[k].size
    assert abs(p[k].std() - cfg.init_std) < 5 * cfg.init_std / math.sqrt(2 * n), k
  # Stacked layers are initialised independently.
  q = p[('stack', 'attn', 'qkv', 'kernel')]
  assert not np.allclose(q[0], q[1], atol=1e-3)
  # Every stacked LowRank layer has the paper's svd init: V V^T = U^T U = diag(S).
  for fc in ('fc1', 'fc2'):
    for v, u in zip(p[('stack', 'ffn', fc, 'v')], p[('stack', 'ffn', fc, 'u')]):
      s = np.diag(v @ v.T)
      np.testing.assert_allclose(v @ v.T, np.diag(s), atol=1e-5 * s.max())
      np.testing.assert_allclose(u.T @ u, np.diag(s), atol=1e-5 * s.max())


def abstract(cfg, **kw):
  return nnx.eval_shape(lambda: build(cfg, **kw))


def param_shapes(model):
  return {tuple(str(p) for p in path): tuple(v.shape)
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize('case', list(REFERENCE_CASES))
def test_structure_of_options(case):
  cfg = tiny(**REFERENCE_CASES[case])
  model = abstract(cfg)
  p = param_shapes(model)
  if cfg.first_layer_dense:
    assert type(model.first.ffn.fc1) is structured.Dense
    assert type(model.first.ffn.fc2) is structured.Dense
  else:
    assert type(model.first.ffn.fc1).__name__.lower() == cfg.ffn.method
    assert type(model.first.ffn.fc2).__name__.lower() == cfg.ffn.method
  assert any(k[-1] == 'bias' for k in p) == cfg.use_bias  # no bias anywhere without use_bias
  assert any(k[-1] == 'bias' and 'norm' in k[-2] for k in p) == (
      cfg.use_bias and cfg.norm == 'layernorm')
  assert (('pos_embedding',) in p) == (cfg.position == 'absolute')
  if cfg.position == 'absolute':
    assert p[('pos_embedding',)] == (cfg.seq_len, cfg.hidden_dim)
  assert p[('embedding',)] == (cfg.vocab_size, cfg.hidden_dim)
  head = cfg.attn_dim // cfg.num_heads
  assert p[('first', 'attn', 'qkv', 'kernel')] == (
      (cfg.num_heads + 2 * cfg.num_kv_heads) * head, cfg.hidden_dim)
  assert p[('first', 'attn', 'out', 'kernel')] == (cfg.hidden_dim, cfg.attn_dim)
  fc1_out = 2 * cfg.ffn_dim if cfg.activation == 'swiglu' else cfg.ffn_dim
  if cfg.first_layer_dense:
    assert p[('first', 'ffn', 'fc1', 'kernel')] == (fc1_out, cfg.hidden_dim)
    assert p[('first', 'ffn', 'fc2', 'kernel')] == (cfg.hidden_dim, cfg.ffn_dim)
  if cfg.num_layers == 1:
    assert model.stack is None
    assert not any(k[0] == 'stack' for k in p)
    return
  assert type(model.stack.ffn.fc1).__name__.lower() == cfg.ffn.method
  assert type(model.stack.ffn.fc2).__name__.lower() == cfg.ffn.method
  # The stack holds blocks 1..L-1 along a leading `layers` axis.
  stacked = [k for k in p if k[0] == 'stack']
  assert stacked
  for k in stacked:
    assert p[k][0] == cfg.num_layers - 1, k
    twin = ('first',) + k[1:]
    if twin in p and (k[1] != 'ffn' or not cfg.first_layer_dense):
      assert p[k][1:] == p[twin], k
  if cfg.ffn.method == 'lowrank':
    assert p[('stack', 'ffn', 'fc1', 'u')] == (cfg.num_layers - 1, fc1_out, cfg.ffn.rank)


# ----------------------------------------------------------------------------- self-guided


def test_guides_in_model():
  cfg = tiny(**REFERENCE_CASES['lowrank-rope-paperinit'])  # shapes shared with test_paper_init
  model = build(cfg, seed=6, guide=True, reduce_flop=True)
  p = param_dict(model)
  guides = [k for k in p if k[-1] == 'guide']
  # The first block's FFN is dense (no guide); every stacked fc1/fc2 has one, as (M, N).
  assert sorted(guides) == [('stack', 'ffn', 'fc1', 'guide'), ('stack', 'ffn', 'fc2', 'guide')]
  assert p[('stack', 'ffn', 'fc1', 'guide')].shape == (2, cfg.ffn_dim, cfg.hidden_dim)
  assert model.has_guide
  tokens = tokens_for(cfg, seed=3)
  # At init every guide is its layer's exact dense matrix: alpha does not change the output.
  base = np_gpt(model, cfg, tokens, alpha=0.0)
  assert_logits_close(_forward(model, jnp.asarray(tokens), 0.8), base)
  randomize(model, seed=7)
  key = jax.random.key(0)
  for alpha in (0.0, 0.3, 1.0):
    ref = np_gpt(model, cfg, tokens, alpha=alpha)
    assert_logits_close(_forward(model, jnp.asarray(tokens), alpha), ref)
  # With reduce_flop draws: alpha 0 never takes the guide, alpha 1 always does.
  for alpha in (0.0, 1.0):
    ref = np_gpt(model, cfg, tokens, alpha=alpha)
    assert_logits_close(_forward(model, jnp.asarray(tokens), alpha, key), ref)
  model.drop_guides()
  assert not model.has_guide
  assert not any(k[-1] == 'guide' for k in param_dict(model))
  assert_logits_close(_forward(model, jnp.asarray(tokens)), np_gpt(model, cfg, tokens))


# ----------------------------------------------------------------------------- dtypes, remat


def test_bfloat16_compute_float32_params():
  cfg32 = tiny(**REFERENCE_CASES['lowrank-rope-paperinit'])  # its forward is compiled already
  cfg16 = tiny(**REFERENCE_CASES['lowrank-rope-paperinit'], dtype='bfloat16')
  for _, v in nnx.to_flat_state(nnx.state(nnx.eval_shape(lambda: build(cfg16)), nnx.Param)):
    assert v.dtype == jnp.float32  # bf16 compute keeps float32 parameters
  m32, m16 = build_random(cfg32, seed=9), build_random(cfg16, seed=9)
  tokens = jnp.asarray(tokens_for(cfg32, seed=4))
  l32, l16 = np.asarray(_forward(m32, tokens), np.float64), _forward(m16, tokens)
  assert l16.dtype == jnp.float32
  l16 = np.asarray(l16, np.float64)
  # bf16 keeps 8 mantissa bits (unit roundoff 2^-9 ~ 2e-3); a few layers of rounding give a
  # relative error of order 1e-2. It must be visibly non-zero: the compute really is bf16.
  rel = np.linalg.norm(l16 - l32) / np.linalg.norm(l32)
  assert 1e-4 < rel < 3e-2, rel
  # Predictions barely change: the top-1 token agrees almost everywhere.
  assert (l16.argmax(-1) == l32.argmax(-1)).mean() > 0.9


def _loss(model, tokens):
  logits = model(tokens[:, :-1])
  logp = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean(), logits


def _remat_eqns(jaxpr, found):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('remat', 'remat2', 'checkpoint'):
      found.append(eqn)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, 'jaxpr', sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          _remat_eqns(inner, found)
  return found


# Compiler options for the three gradient programs: without LLVM's optimisation passes each
# compiles in a quarter of the time on a CPU. All three get the same options, and what is compared
# is what remat does to the program (recomputation), which these passes do not touch.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def test_remat_options_same_logits_and_grads():
  tokens = jnp.asarray(tokens_for(tiny(), seed=5))
  results = {}
  for remat in ('none', 'dots', 'full'):
    cfg = tiny('lowrank', remat=remat)
    model = build_random(cfg, seed=11)
    graphdef, state = nnx.split(model)
    grad_fn = jax.grad(lambda s: _loss(nnx.merge(graphdef, s), tokens), has_aux=True)
    traced = jax.jit(grad_fn).trace(state)
    jaxpr = traced.jaxpr.jaxpr
    found = _remat_eqns(jaxpr, [])
    if remat == 'none':
      assert not found
    else:
      assert found
      policies = {e.params.get('policy') is None for e in found}
      assert policies == ({True} if remat == 'full' else {False})
    compiled = traced.lower().compile(compiler_options=FAST_COMPILE)
    grads, logits = compiled(state)
    results[remat] = (np.asarray(logits), grads)
  ref_logits, ref_grads = results['none']
  for remat in ('dots', 'full'):
    logits, grads = results[remat]
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-6, atol=1e-6 * np.abs(ref_logits).max())
    for (path, g), (_, g0) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads)):
      g, g0 = np.asarray(g[...]), np.asarray(g0[...])
      assert np.abs(g0).max() > 0, path
      np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-5 * np.abs(g0).max(), err_msg=str(path))
