"""The GPT of SPEC §3 against an independent float64 numpy forward, plus structural properties.

The numpy reference reads the model's parameters (randomised first, so that biases, norm scales
and guides all matter) and recomputes the whole forward from the SPEC's words: LayerNorm/RMSNorm,
fused QKV split q|k|v, grouped-query attention, RoPE rotate-half with base 10000, causal softmax
with scale 1/sqrt(head_dim), GELU (tanh) or SwiGLU, structured FFN factors, tied LM head.

Tolerance of the float32 model against float64: a few layers of width <= 128 accumulate relative
rounding of ~1e-6; 2e-5 of the logit scale leaves a margin and still fails on any real mistake.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from structffn_jax import config as config_lib
from structffn_jax import structured
from structffn_jax.model import GPT

ATOL_REL = 2e-5
STRUCTURES = {
    'dense': dict(method='dense', rank=0, blocks=1),
    'lowrank': dict(method='lowrank', rank=8, blocks=1),
    'blockdense': dict(method='blockdense', rank=16, blocks=2),
    'blockshuffle': dict(method='blockshuffle', rank=0, blocks=4),
}


def tiny(method='lowrank', **overrides) -> ml_collections.ConfigDict:
  """A validated tiny model config: GQA (4 q / 2 kv heads), attn_dim 48 != hidden_dim 32."""
  c = config_lib.base_config()
  m = c.model
  m.vocab_size, m.seq_len = 61, 12
  m.hidden_dim, m.ffn_dim, m.attn_dim = 32, 64, 48
  m.num_layers, m.num_heads, m.num_kv_heads = 3, 4, 2
  m.dtype = 'float32'
  m.ffn.update(STRUCTURES[method])
  for key, value in overrides.items():
    m[key] = value
  config_lib.validate(c)
  return m


def build(cfg, seed=0, **kw):
  return GPT(cfg, rngs=nnx.Rngs(seed), **kw)


def randomize(model, seed):
  """Replace every parameter by a random value of a sensible scale (never zeros or ones)."""
  rng = np.random.default_rng(seed)
  for path, v in nnx.iter_graph(model):
    if not isinstance(v, nnx.Param):
      continue
    shape = v.shape
    if path[-1] == 'scale':
      new = 1 + 0.2 * rng.standard_normal(shape)
    elif path[-1] == 'bias':
      new = 0.1 * rng.standard_normal(shape)
    else:
      new = rng.standard_normal(shape) / math.sqrt(shape[-1])
    v[...] = jnp.asarray(new, jnp.float32)


def tokens_for(cfg, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, cfg.vocab_size, (batch, cfg.seq_len)).astype(np.int32)


def param_dict(model):
  return {tuple(str(p) for p in path): np.asarray(v[...], np.float64)
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ----------------------------------------------------------------------------- numpy reference


def np_linear(get, method, blocks, x, alpha):
  """Structured layer from its factors (SPEC §1), plus the guide blend of SPEC §2."""
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

REFERENCE_CASES = {
    # layernorm, gelu, rope, biases, GQA 4/2, attn_dim 48 != hidden 32, first FFN dense
    'lowrank-base': dict(method='lowrank'),
    'blockdense-rmsnorm-swiglu': dict(method='blockdense', norm='rmsnorm', activation='swiglu'),
    'blockshuffle-nobias-absolute-allstructured': dict(
        method='blockshuffle', use_bias=False, position='absolute', first_layer_dense=False),
    'dense-one-layer': dict(method='dense', num_layers=1),
    'lowrank-mha-swiglu-allstructured-2layers': dict(
        method='lowrank', num_kv_heads=4, attn_dim=32, activation='swiglu',
        first_layer_dense=False, num_layers=2),
    'blockshuffle-gqa1-rmsnorm-absolute': dict(method='blockshuffle', num_kv_heads=1,
                                               norm='rmsnorm', position='absolute'),
}


@pytest.mark.parametrize('case', list(REFERENCE_CASES))
def test_forward_matches_numpy_reference(case):
  cfg = tiny(**REFERENCE_CASES[case])
  model = build(cfg, seed=1)
  randomize(model, seed=2)
  tokens = tokens_for(cfg)
  logits = model(jnp.asarray(tokens))
  assert logits.shape == (2, cfg.seq_len, cfg.vocab_size) and logits.dtype == jnp.float32
  ref = np_gpt(model, cfg, tokens)
  assert np.abs(ref).max() > 0.5  # a non-trivial signal
  assert_logits_close(logits, ref)


def test_forward_default_init_matches_reference():
  """The paper's initialisation, unperturbed (biases 0, norms 1) also matches."""
  cfg = tiny('blockdense')
  model = build(cfg, seed=3)
  tokens = tokens_for(cfg, seed=1)
  assert_logits_close(model(jnp.asarray(tokens)), np_gpt(model, cfg, tokens))


@pytest.mark.parametrize('case', ['blockshuffle-nobias-absolute-allstructured', 'lowrank-base'])
def test_structure_of_options(case):
  kw = REFERENCE_CASES[case]
  cfg = tiny(**kw)
  model = build(cfg)
  p = param_dict(model)
  ffn_first = type(model.first.ffn.fc1)
  if cfg.first_layer_dense:
    assert ffn_first is structured.Dense and type(model.first.ffn.fc2) is structured.Dense
  else:
    assert ffn_first is not structured.Dense
  assert type(model.stack.ffn.fc1).__name__.lower() == cfg.ffn.method
  assert type(model.stack.ffn.fc2).__name__.lower() == cfg.ffn.method
  has_bias = any(k[-1] == 'bias' for k in p)
  assert has_bias == cfg.use_bias
  assert (('pos_embedding',) in p) == (cfg.position == 'absolute')
  if cfg.position == 'absolute':
    assert p[('pos_embedding',)].shape == (cfg.seq_len, cfg.hidden_dim)
  head = cfg.attn_dim // cfg.num_heads
  assert p[('first', 'attn', 'qkv', 'kernel')].shape == (
      (cfg.num_heads + 2 * cfg.num_kv_heads) * head, cfg.hidden_dim)
  assert p[('first', 'attn', 'out', 'kernel')].shape == (cfg.hidden_dim, cfg.attn_dim)
  # The stack holds blocks 1..L-1 along a leading `layers` axis.
  for k, v in p.items():
    if k[0] == 'stack':
      first = p[('first',) + k[1:]] if ('first',) + k[1:] in p else None
      assert v.shape[0] == cfg.num_layers - 1, k
      if first is not None:
        assert v.shape[1:] == first.shape, k
  # Stacked layers are initialised independently.
  q = p[('stack', 'attn', 'qkv', 'kernel')]
  assert not np.allclose(q[0], q[1])


def test_one_layer_model_has_no_stack():
  cfg = tiny('lowrank', num_layers=1)
  model = build(cfg)
  assert model.stack is None
  assert not any(k[0] == 'stack' for k in param_dict(model))


def test_swiglu_fc1_is_twice_ffn():
  cfg = tiny('lowrank', activation='swiglu', first_layer_dense=True)
  model = build(cfg)
  assert model.first.ffn.fc1.kernel.shape == (2 * cfg.ffn_dim, cfg.hidden_dim)
  assert model.first.ffn.fc2.kernel.shape == (cfg.hidden_dim, cfg.ffn_dim)
  assert model.stack.ffn.fc1.u.shape == (2, 2 * cfg.ffn_dim, cfg.ffn.rank)


# ----------------------------------------------------------------------------- causality


@pytest.mark.parametrize('position', ['rope', 'absolute'])
@pytest.mark.parametrize('method', list(STRUCTURES))
def test_causal(method, position):
  cfg = tiny(method, position=position, num_layers=2)
  model = build(cfg, seed=4)
  randomize(model, seed=5)
  tokens = tokens_for(cfg, batch=1, seed=2)
  t0 = 5
  changed = tokens.copy()
  changed[0, t0] = (tokens[0, t0] + 7) % cfg.vocab_size
  logits = np.asarray(model(jnp.asarray(np.concatenate([tokens, changed]))), np.float64)
  scale = np.abs(logits).max()
  diff = np.abs(logits[0] - logits[1]).max(-1)  # per position
  assert np.all(diff[:t0] <= 1e-6 * scale), diff
  assert np.all(diff[t0:] > 1e-3 * scale), diff  # the change reaches every later position


# ----------------------------------------------------------------------------- self-guided


def test_guides_in_model():
  cfg = tiny('blockshuffle', num_layers=2)
  model = build(cfg, seed=6, guide=True, reduce_flop=True)
  p = param_dict(model)
  guides = [k for k in p if k[-1] == 'guide']
  # The first block's FFN is dense (no guide); every stacked fc1/fc2 has one, as (M, N).
  assert sorted(guides) == [('stack', 'ffn', 'fc1', 'guide'), ('stack', 'ffn', 'fc2', 'guide')]
  assert p[('stack', 'ffn', 'fc1', 'guide')].shape == (1, cfg.ffn_dim, cfg.hidden_dim)
  assert model.has_guide
  tokens = tokens_for(cfg, seed=3)
  # At init every guide is its layer's exact dense matrix: alpha does not change the output.
  base = np_gpt(model, cfg, tokens, alpha=0.0)
  assert_logits_close(model(jnp.asarray(tokens), alpha=0.8), base)
  randomize(model, seed=7)
  key = jax.random.key(0)
  for alpha in (0.0, 0.3, 1.0):
    ref = np_gpt(model, cfg, tokens, alpha=alpha)
    assert_logits_close(model(jnp.asarray(tokens), alpha=alpha), ref)
  # With reduce_flop draws: alpha 0 never takes the guide, alpha 1 always does.
  for alpha in (0.0, 1.0):
    ref = np_gpt(model, cfg, tokens, alpha=alpha)
    assert_logits_close(model(jnp.asarray(tokens), alpha=alpha, key=key), ref)
  model.drop_guides()
  assert not model.has_guide
  assert not any(k[-1] == 'guide' for k in param_dict(model))
  assert_logits_close(model(jnp.asarray(tokens)), np_gpt(model, cfg, tokens))


# ----------------------------------------------------------------------------- dtypes, remat


def test_bfloat16_compute_float32_params():
  cfg32 = tiny('lowrank')
  cfg16 = tiny('lowrank', dtype='bfloat16')
  m32, m16 = build(cfg32, seed=8), build(cfg16, seed=8)
  randomize(m32, seed=9)
  nnx.update(m16, nnx.state(m32, nnx.Param))
  for _, v in nnx.to_flat_state(nnx.state(m16, nnx.Param)):
    assert v.dtype == jnp.float32
  tokens = jnp.asarray(tokens_for(cfg32, seed=4))
  l32, l16 = np.asarray(m32(tokens), np.float64), m16(tokens)
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
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()


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


def test_remat_options_same_logits_and_grads():
  tokens = jnp.asarray(tokens_for(tiny(), seed=5))
  results = {}
  for remat in ('none', 'dots', 'full'):
    cfg = tiny('blockdense', remat=remat)
    model = build(cfg, seed=10)
    randomize(model, seed=11)
    graphdef, state = nnx.split(model)
    loss = lambda s: _loss(nnx.merge(graphdef, s), tokens)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(state).jaxpr
    found = _remat_eqns(jaxpr, [])
    if remat == 'none':
      assert not found
    else:
      assert found
      policies = {e.params.get('policy') is None for e in found}
      assert policies == ({True} if remat == 'full' else {False})
    grads = jax.grad(loss)(state)
    results[remat] = (np.asarray(model(tokens)), grads)
  ref_logits, ref_grads = results['none']
  for remat in ('dots', 'full'):
    logits, grads = results[remat]
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-6, atol=1e-6 * np.abs(ref_logits).max())
    for (path, g), (_, g0) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads)):
      g, g0 = np.asarray(g[...]), np.asarray(g0[...])
      assert np.abs(g0).max() > 0, path
      np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-5 * np.abs(g0).max(), err_msg=str(path))
