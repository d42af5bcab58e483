"""The paper's Transformer: a GPT with structured feedforward layers (SPEC §3).

Pre-norm blocks, fused QKV, grouped-query attention with an attention width independent of the
model width, RoPE (rotate-half) or learned absolute positions, causal softmax attention, an FFN
whose fc1/fc2 use the configured structure (the first block's FFN stays dense by default), a final
norm and an LM head tied to the token embedding.

Blocks 1..L-1 are identical in structure, so they are stored stacked (leading `layers` axis) and
applied with one `lax.scan`: the model compiles once however deep it is. Parameters are float32;
activations and matmuls run in `model.dtype` (bfloat16 by default).

Shapes in names: B batch, T sequence, D model width, F FFN width, N query heads, K kv heads,
H head width, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from structffn_jax import structured

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def rope(x_BTNH, positions_BT, base: float):
  """Rotary position embedding, rotate-half convention, computed in float32."""
  h = x_BTNH.shape[-1]
  inv_freq = base ** (-jnp.arange(0, h // 2, dtype=jnp.float32) * 2 / h)
  angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq
  cos = jnp.cos(angles_BTh)[:, :, None, :]
  sin = jnp.sin(angles_BTh)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


def _norm(cfg, dtype, rngs):
  d = cfg.hidden_dim
  if cfg.norm == 'layernorm':
    return nnx.LayerNorm(d, epsilon=cfg.norm_eps, use_bias=cfg.use_bias, dtype=dtype,
                         param_dtype=jnp.float32, rngs=rngs)
  return nnx.RMSNorm(d, epsilon=cfg.norm_eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class Attention(nnx.Module):
  """Causal grouped-query self-attention with a fused QKV projection."""

  def __init__(self, cfg: ml_collections.ConfigDict, dtype, rngs: nnx.Rngs):
    self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
    self.head_dim = cfg.attn_dim // cfg.num_heads
    self.position, self.rope_base = cfg.position, cfg.rope_base
    qkv_width = (cfg.num_heads + 2 * cfg.num_kv_heads) * self.head_dim
    common = dict(use_bias=cfg.use_bias, std=cfg.init_std, dtype=dtype, rngs=rngs)
    self.qkv = structured.Dense(cfg.hidden_dim, qkv_width, in_axis='embed', out_axis='qkv',
                                **common)
    self.out = structured.Dense(cfg.attn_dim, cfg.hidden_dim, in_axis='heads', out_axis='embed',
                                **common)

  def __call__(self, x_BTD, positions_BT):
    b, t, _ = x_BTD.shape
    n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
    qkv = self.qkv(x_BTD)
    q_BTNH = qkv[..., :n * h].reshape(b, t, n, h)
    k_BTKH = qkv[..., n * h:(n + k) * h].reshape(b, t, k, h)
    v_BTKH = qkv[..., (n + k) * h:].reshape(b, t, k, h)
    if self.position == 'rope':
      q_BTNH = rope(q_BTNH, positions_BT, self.rope_base)
      k_BTKH = rope(k_BTKH, positions_BT, self.rope_base)
    o_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True,
                                          scale=h ** -0.5)
    return self.out(o_BTNH.reshape(b, t, n * h))


class FeedForward(nnx.Module):
  """fc1 -> GELU(tanh) or SwiGLU -> fc2, each projection built by `structured.make_linear`."""

  def __init__(self, cfg: ml_collections.ConfigDict, method: str, dtype, *, guide: bool,
               reduce_flop: bool, rngs: nnx.Rngs):
    self.activation = cfg.activation
    d, f = cfg.hidden_dim, cfg.ffn_dim
    fc1_out = 2 * f if cfg.activation == 'swiglu' else f
    common = dict(rank=cfg.ffn.rank, blocks=cfg.ffn.blocks, use_bias=cfg.use_bias,
                  init=cfg.ffn.init, std=cfg.init_std, dtype=dtype, rngs=rngs)
    if method != 'dense':
      common.update(guide=guide, reduce_flop=reduce_flop)
    self.fc1 = structured.make_linear(method, d, fc1_out, in_axis='embed', out_axis='mlp',
                                      **common)
    self.fc2 = structured.make_linear(method, f, d, in_axis='mlp', out_axis='embed', **common)

  def __call__(self, x_BTD, alpha=None, key=None):
    k1 = k2 = None
    if key is not None:
      k1, k2 = jax.random.split(key)
    h = self.fc1(x_BTD, alpha=alpha, key=k1)
    if self.activation == 'swiglu':
      gate, up = jnp.split(h, 2, axis=-1)
      h = jax.nn.silu(gate) * up
    else:
      h = jax.nn.gelu(h, approximate=True)
    return self.fc2(h, alpha=alpha, key=k2)


class Block(nnx.Module):
  """Pre-norm Transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

  def __init__(self, cfg, method, dtype, *, guide, reduce_flop, rngs):
    self.norm1 = _norm(cfg, dtype, rngs)
    self.attn = Attention(cfg, dtype, rngs)
    self.norm2 = _norm(cfg, dtype, rngs)
    self.ffn = FeedForward(cfg, method, dtype, guide=guide, reduce_flop=reduce_flop, rngs=rngs)

  def __call__(self, x_BTD, positions_BT, alpha=None, key=None):
    x_BTD = x_BTD + self.attn(self.norm1(x_BTD), positions_BT)
    return x_BTD + self.ffn(self.norm2(x_BTD), alpha, key)


class GPT(nnx.Module):
  """Decoder-only LM. `cfg` is the `model` section of a config (see structffn_jax/config.py).

  guide / reduce_flop: build the self-guided dense guides (SPEC §2) in every structured layer.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, guide: bool = False,
               reduce_flop: bool = False, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = DTYPES[cfg.dtype]
    self.embedding = nnx.Param(
        cfg.init_std * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_dim)),
        axes=('vocab', 'embed'))
    self.pos_embedding = nnx.data(None)
    if cfg.position == 'absolute':
      self.pos_embedding = nnx.Param(
          cfg.init_std * jax.random.normal(rngs.params(), (cfg.seq_len, cfg.hidden_dim)),
          axes=(None, 'embed'))
    method = cfg.ffn.method
    first_method = 'dense' if cfg.first_layer_dense else method
    self.first = Block(cfg, first_method, self.dtype, guide=guide, reduce_flop=reduce_flop,
                       rngs=rngs)
    self.num_stacked = cfg.num_layers - 1
    self.stack = nnx.data(None)
    if self.num_stacked:
      @nnx.split_rngs(splits=self.num_stacked)
      @nnx.vmap(in_axes=0, out_axes=0)
      def make_stack(rngs):
        return Block(cfg, method, self.dtype, guide=guide, reduce_flop=reduce_flop, rngs=rngs)
      self.stack = make_stack(rngs)
      for _, p in nnx.iter_graph(self.stack):
        if isinstance(p, nnx.Variable):
          p.set_metadata('axes', ('layers',) + tuple(p.get_metadata().get('axes') or
                                                      (None,) * (p.ndim - 1)))
    self.final_norm = _norm(cfg, self.dtype, rngs)

  @property
  def has_guide(self) -> bool:
    return any(isinstance(m, structured.StructuredLinear) and m.guide is not None
               for _, m in nnx.iter_graph(self))

  def drop_guides(self):
    """Remove every self-guided guide (after the hand-over): parameters and compute are gone."""
    for _, m in nnx.iter_graph(self):
      if isinstance(m, structured.StructuredLinear):
        m.drop_guide()

  def __call__(self, tokens_BT, *, alpha=None, key=None, positions_BT=None):
    """Logits (B, T, V) in float32 for int tokens (B, T).

    alpha: self-guided weight α (scalar), needed when the model has guides.
    key: PRNG key for the per-layer reduce_flop draws.
    """
    b, t = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
    emb_VD = self.embedding[...]
    x_BTD = jnp.take(emb_VD, tokens_BT, axis=0).astype(self.dtype)
    if self.pos_embedding is not None:
      x_BTD = x_BTD + jnp.take(self.pos_embedding[...], positions_BT, axis=0).astype(self.dtype)
    keys = [None] * self.cfg.num_layers
    if key is not None:
      keys = jax.random.split(key, self.cfg.num_layers)
    x_BTD = self.first(x_BTD, positions_BT, alpha, keys[0])
    if self.stack is not None:
      graphdef, state = nnx.split(self.stack)

      def body(x, layer):
        state_l, key_l = layer
        return nnx.merge(graphdef, state_l)(x, positions_BT, alpha, key_l), None

      if self.cfg.remat == 'full':
        body = jax.checkpoint(body)
      elif self.cfg.remat == 'dots':
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
      x_BTD, _ = jax.lax.scan(body, x_BTD, (state, None if key is None else keys[1:]))
    x_BTD = self.final_norm(x_BTD)
    return jnp.einsum('btd,vd->btv', x_BTD, emb_VD.astype(self.dtype),
                      preferred_element_type=jnp.float32)
