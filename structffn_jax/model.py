"""The paper's Transformer: a GPT with structured feedforward layers (docs/design.md §4).

Pre-norm blocks, fused QKV, grouped-query attention with an attention width independent of the
model width, RoPE (rotate-half) or learned absolute positions, causal softmax attention, an FFN
whose fc1/fc2 use the configured structure (the first block's FFN stays dense by default), a final
norm and an LM head tied to the token embedding (or untied, `model.tie_embeddings`). Imported
models add q/k/v-only biases (`model.qkv_bias`) and RoPE frequency scaling (`model.rope_scaling`).

Blocks 1..L-1 are identical in structure, so they are stored stacked (leading `layers` axis) and
applied with one `lax.scan`: the model compiles once however deep it is. Parameters are float32;
activations and matmuls run in `model.dtype` (bfloat16 by default).

Inference: `init_cache` + `decode` run prefill and incremental decoding over a KV cache of static
shape, each row at its own length (structffn_jax/decoding.py drives them); `premerge` gives the
structured FFN layers their merged dense matrices for calls on few tokens.

Shapes in names, one letter per axis (docs/design.md §1): B batch, T tokens, S cache slots,
L layers, D model width, F FFN width, H query heads, K kv heads, E head width, V vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from structffn_jax import attention as attention_lib
from structffn_jax import sharding, structured

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


ROPE_SCALINGS = ('none', 'linear', 'llama3')


def rope_frequencies(e: int, base: float, scaling=None):
  """The E/2 inverse frequencies of RoPE over a head of width e, float32; `scaling` (the
  model.rope_scaling section) divides them by its factor ('linear') or, 'llama3', divides the
  long wavelengths, keeps the short ones and blends the band between (Llama 3.1)."""
  inv_freq = base ** (-jnp.arange(0, e // 2, dtype=jnp.float32) * 2 / e)
  scaling = ml_collections.ConfigDict(dict(scaling or {'type': 'none'}))
  kind = scaling.type
  if kind == 'none':
    return inv_freq
  if kind == 'linear':
    return inv_freq / scaling.factor
  if kind != 'llama3':
    raise ValueError(f'model.rope_scaling.type={kind!r} is not supported; use one of '
                     f'{ROPE_SCALINGS}.')
  low = scaling.original_len / scaling.low_freq_factor  # wavelengths above: scaled
  high = scaling.original_len / scaling.high_freq_factor  # wavelengths below: kept
  wavelen = 2 * jnp.pi / inv_freq
  scaled = jnp.where(wavelen > low, inv_freq / scaling.factor, inv_freq)
  smooth = (scaling.original_len / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high) & (wavelen <= low)
  return jnp.where(medium, blended, scaled)


def rope(x_BTHE, positions_BT, base: float, scaling=None):
  """Rotary position embedding, rotate-half convention, computed in float32 (queries (B, T, H, E)
  or keys (B, T, K, E)); `scaling`: see `rope_frequencies`."""
  e = x_BTHE.shape[-1]
  inv_freq = rope_frequencies(e, base, scaling)
  angles = positions_BT[..., None].astype(jnp.float32) * inv_freq  # (B, T, E/2)
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x_BTHE.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHE.dtype)


def _norm(cfg, dtype, rngs):
  """LayerNorm or RMSNorm over D; scale and offset stay whole on every device (unnamed axis)."""
  d = cfg.hidden_dim
  unnamed = structured.logical(None)
  if cfg.norm == 'layernorm':
    return nnx.LayerNorm(d, epsilon=cfg.norm_eps, use_bias=cfg.use_bias, dtype=dtype,
                         param_dtype=jnp.float32, scale_metadata=unnamed, bias_metadata=unnamed,
                         rngs=rngs)
  return nnx.RMSNorm(d, epsilon=cfg.norm_eps, dtype=dtype, param_dtype=jnp.float32,
                     scale_metadata=unnamed, rngs=rngs)


class KVCache(NamedTuple):
  """Keys and values of every layer for incremental decoding (`GPT.decode`), static in shape.

  Slot s of row b holds the key/value of that row's token at position s; `lengths[b]` tokens are
  filled, so row b's next token goes to slot lengths[b]. Layer 0 is the first block, 1.. the stack.
  """
  k: jax.Array  # (L, B, S, K, E), compute dtype
  v: jax.Array  # (L, B, S, K, E)
  lengths: jax.Array  # (B,) int32


class Attention(nnx.Module):
  """Causal grouped-query self-attention with a fused QKV projection.

  The softmax attention runs with `model.attention.implementation` (structffn_jax/attention.py);
  the KV-cache `decode` always takes the XLA path.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, dtype, rngs: nnx.Rngs):
    self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
    self.implementation = cfg.attention.implementation
    self.head_dim = cfg.attn_dim // cfg.num_heads
    self.position, self.rope_base = cfg.position, cfg.rope_base
    scaling = cfg.get('rope_scaling')
    self.rope_scaling = None  # static: the section's items, hashable
    if scaling is not None and scaling.type != 'none':
      self.rope_scaling = tuple(sorted(scaling.items()))
      rope_frequencies(2, 1.0, self.rope_scaling)  # an unknown type fails here, not in a trace
    qkv_width = (cfg.num_heads + 2 * cfg.num_kv_heads) * self.head_dim
    common = dict(use_bias=cfg.use_bias, std=cfg.init_std, dtype=dtype, rngs=rngs)
    qkv_bias = cfg.use_bias or cfg.get('qkv_bias', False)
    self.qkv = structured.Dense(cfg.hidden_dim, qkv_width, in_axis='embed', out_axis='qkv',
                                **{**common, 'use_bias': qkv_bias})
    self.out = structured.Dense(cfg.attn_dim, cfg.hidden_dim, in_axis='heads', out_axis='embed',
                                **common)

  def _project(self, x_BTD, positions_BT):
    """Queries, keys and values of x, RoPE applied."""
    b, t, _ = x_BTD.shape
    h, k, e = self.num_heads, self.num_kv_heads, self.head_dim
    qkv = self.qkv(x_BTD)
    q_BTHE = qkv[..., :h * e].reshape(b, t, h, e)
    k_BTKE = qkv[..., h * e:(h + k) * e].reshape(b, t, k, e)
    v_BTKE = qkv[..., (h + k) * e:].reshape(b, t, k, e)
    if self.position == 'rope':
      q_BTHE = rope(q_BTHE, positions_BT, self.rope_base, self.rope_scaling)
      k_BTKE = rope(k_BTKE, positions_BT, self.rope_base, self.rope_scaling)
    return q_BTHE, k_BTKE, v_BTKE

  def __call__(self, x_BTD, positions_BT):
    b, t, _ = x_BTD.shape
    q_BTHE, k_BTKE, v_BTKE = self._project(x_BTD, positions_BT)
    o_BTHE = attention_lib.attend(q_BTHE, k_BTKE, v_BTKE, scale=self.head_dim ** -0.5,
                                  implementation=self.implementation)
    return self.out(o_BTHE.reshape(b, t, -1))

  def decode(self, x_BTD, positions_BT, cache: KVCache, layer):
    """Attention of x (at positions_BT, per row) over the cache of `layer`, after writing x's
    keys and values into it at those positions. Returns (output, updated cache)."""
    b, t, _ = x_BTD.shape
    q_BTHE, k_BTKE, v_BTKE = self._project(x_BTD, positions_BT)
    rows_B1 = jnp.arange(b)[:, None]
    k_LBSKE = cache.k.at[layer, rows_B1, positions_BT].set(k_BTKE.astype(cache.k.dtype))
    v_LBSKE = cache.v.at[layer, rows_B1, positions_BT].set(v_BTKE.astype(cache.v.dtype))
    # Slot s of a row holds its token at position s: a query sees the slots up to its own.
    slots_S = jnp.arange(k_LBSKE.shape[2])
    mask_B1TS = (slots_S <= positions_BT[:, :, None])[:, None]
    o_BTHE = jax.nn.dot_product_attention(q_BTHE, k_LBSKE[layer].astype(q_BTHE.dtype),
                                          v_LBSKE[layer].astype(q_BTHE.dtype), mask=mask_B1TS,
                                          scale=self.head_dim ** -0.5, implementation='xla')
    return self.out(o_BTHE.reshape(b, t, -1)), cache._replace(k=k_LBSKE, v=v_LBSKE)


class FeedForward(nnx.Module):
  """fc1 -> GELU(tanh) or SwiGLU -> fc2, each projection built by `structured.make_linear`.

  Two BlockShuffle layers with GELU run as one fused op (`structured.gelu_ffn`) whenever neither
  has a guide or a pre-merged path for the call; set `fuse = False` to run them one by one.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, method: str, dtype, *, guide: bool,
               reduce_flop: bool, rngs: nnx.Rngs):
    self.activation = cfg.activation
    d, f = cfg.hidden_dim, cfg.ffn_dim
    fc1_out = 2 * f if cfg.activation == 'swiglu' else f
    common = dict(rank=cfg.ffn.rank, blocks=cfg.ffn.blocks, use_bias=cfg.use_bias,
                  init=cfg.ffn.init, std=cfg.init_std, dtype=dtype, rngs=rngs)
    if method != 'dense':
      common.update(guide=guide, reduce_flop=reduce_flop,
                    implementation=cfg.ffn.implementation)
    self.fc1 = structured.make_linear(method, d, fc1_out, in_axis='embed', out_axis='mlp',
                                      **common)
    self.fc2 = structured.make_linear(method, f, d, in_axis='mlp', out_axis='embed', **common)
    # BlockShuffle + GELU: fc1, GELU and fc2 as one op where it applies (structured.gelu_ffn).
    self.fuse = True

  def __call__(self, x_BTD, alpha=None, key=None):
    if (self.fuse and self.activation == 'gelu'
        and structured.fusable_gelu_ffn(self.fc1, self.fc2, x_BTD)):
      return structured.gelu_ffn(self.fc1, self.fc2, x_BTD)
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

  def decode(self, x_BTD, positions_BT, cache, layer, alpha=None):
    """The block on new tokens, attending over (and extending) the cache of `layer`."""
    a_BTD, cache = self.attn.decode(self.norm1(x_BTD), positions_BT, cache, layer)
    x_BTD = x_BTD + a_BTD
    return x_BTD + self.ffn(self.norm2(x_BTD), alpha), cache


class GPT(nnx.Module):
  """Decoder-only LM. `cfg` is the `model` section of a config (see structffn_jax/config.py).

  guide / reduce_flop: build the self-guided dense guides (design §3) in every structured layer.
  A run's model is built from its whole config with `GPT.from_config`.
  """

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, *, guides: bool = True,
                  seed: int = 0) -> 'GPT':
    """The GPT of a run's `config` (its model and sgt sections), initialised from `seed`. With
    SGT its guides are present, or dropped when `guides` is False (after the hand-over).
    Everything that builds a run's model builds it here: training, restoring, the accounting
    and the benchmarks."""
    model = cls(config.model, guide=config.sgt.enabled, reduce_flop=config.sgt.reduce_flop,
                rngs=nnx.Rngs(params=seed))
    if config.sgt.enabled and not guides:
      model.drop_guides()
    return model

  def __init__(self, cfg: ml_collections.ConfigDict, *, guide: bool = False,
               reduce_flop: bool = False, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = DTYPES[cfg.dtype]
    self.embedding = nnx.Param(
        cfg.init_std * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_dim)),
        **structured.logical('vocab', 'embed'))
    self.pos_embedding = nnx.data(None)
    if cfg.position == 'absolute':
      self.pos_embedding = nnx.Param(
          cfg.init_std * jax.random.normal(rngs.params(), (cfg.seq_len, cfg.hidden_dim)),
          **structured.logical(None, 'embed'))
    method = cfg.ffn.method
    first_method = 'dense' if cfg.first_layer_dense else method
    self.first = Block(cfg, first_method, self.dtype, guide=guide, reduce_flop=reduce_flop,
                       rngs=rngs)
    self.num_stacked = cfg.num_layers - 1
    self.stack = nnx.data(None)
    if self.num_stacked:
      # nnx.vmap adds the leading `layers` axis to every parameter's logical axes (`axes`).
      @nnx.split_rngs(splits=self.num_stacked)
      @nnx.vmap(in_axes=0, out_axes=0,
                transform_metadata={nnx.PARTITION_NAME: 'layers', 'axes': 'layers'})
      def make_stack(rngs):
        return Block(cfg, method, self.dtype, guide=guide, reduce_flop=reduce_flop, rngs=rngs)
      self.stack = make_stack(rngs)
    self.final_norm = _norm(cfg, self.dtype, rngs)
    self.head = nnx.data(None)  # the LM head: the embedding itself unless untied
    if not cfg.get('tie_embeddings', True):
      self.head = nnx.Param(
          cfg.init_std * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_dim)),
          **structured.logical('vocab', 'embed'))

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
    x_BTD = self._embed(tokens_BT, positions_BT)
    keys = [None] * self.cfg.num_layers
    if key is not None:
      keys = jax.random.split(key, self.cfg.num_layers)
    x_BTD = self.first(x_BTD, positions_BT, alpha, keys[0])
    if self.stack is not None:
      graphdef, state = nnx.split(self.stack)

      def body(x, layer):
        state_l, key_l = layer
        x = nnx.merge(graphdef, state_l)(x, positions_BT, alpha, key_l)
        return sharding.constrain(x, ('batch', None, None)), None

      if self.cfg.remat == 'full':
        body = jax.checkpoint(body)
      elif self.cfg.remat == 'dots':
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
      x_BTD, _ = jax.lax.scan(body, x_BTD, (state, None if key is None else keys[1:]))
    return self._logits(x_BTD)

  def _embed(self, tokens_BT, positions_BT):
    """Token (and absolute position) embeddings in the compute dtype."""
    # On a mesh (no-op without jax.set_mesh): look up in the gathered table, shard over the batch.
    x_BTD = jnp.take(sharding.constrain(self.embedding[...], (None, None)), tokens_BT, axis=0)
    x_BTD = sharding.constrain(x_BTD.astype(self.dtype), ('batch', None, None))
    if self.pos_embedding is not None:
      x_BTD = x_BTD + jnp.take(self.pos_embedding[...], positions_BT, axis=0).astype(self.dtype)
    return x_BTD

  def _logits(self, x_BTD):
    """Final norm and the head (tied: the embedding): float32 logits (B, T, V)."""
    head = self.embedding if self.head is None else self.head
    return jnp.einsum('btd,vd->btv', self.final_norm(x_BTD),
                      head[...].astype(self.dtype), preferred_element_type=jnp.float32)

  # --------------------------------------------------------------------------- inference

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty KV cache for `batch` rows of up to `max_len` positions (compute dtype default)."""
    c = self.cfg
    if c.position == 'absolute' and max_len > c.seq_len:
      raise ValueError(f'init_cache: max_len={max_len} exceeds model.seq_len={c.seq_len}, the '
                       'number of learned absolute positions.')
    shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.attn_dim // c.num_heads)
    zeros = jnp.zeros(shape, dtype or self.dtype)
    return KVCache(zeros, zeros, jnp.zeros((batch,), jnp.int32))

  def decode(self, tokens_BT, cache: KVCache, *, lengths_B=None, alpha=None, last_only=False):
    """Logits of new tokens that continue each row of `cache`, and the extended cache.

    Row b's tokens take positions cache.lengths[b] + 0..T-1. lengths_B: how many of the T tokens
    of each row are real (right padding after them; default all T); the cache advances by that
    much, and padding slots are overwritten by the row's next tokens before anyone attends them.
    last_only: return only each row's logits at its last real token, (B, V), not (B, T, V).
    Matches `__call__` over the whole sequence to float rounding; the guide runs in full (no
    reduce_flop draws) when the model still has guides.
    """
    b, t = tokens_BT.shape
    lengths_B = jnp.full((b,), t, jnp.int32) if lengths_B is None else lengths_B
    positions_BT = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)
    x_BTD = self._embed(tokens_BT, positions_BT)
    x_BTD, cache = self.first.decode(x_BTD, positions_BT, cache, 0, alpha)
    if self.stack is not None:
      graphdef, state = nnx.split(self.stack)

      def body(carry, layer):
        x, cache = carry
        state_l, index = layer
        return nnx.merge(graphdef, state_l).decode(x, positions_BT, cache, index, alpha), None

      layers = jnp.arange(1, self.cfg.num_layers)
      (x_BTD, cache), _ = jax.lax.scan(body, (x_BTD, cache), (state, layers))
    if last_only:
      x_BTD = jnp.take_along_axis(x_BTD, (lengths_B - 1)[:, None, None], axis=1)
    logits = self._logits(x_BTD)
    cache = cache._replace(lengths=cache.lengths + lengths_B.astype(jnp.int32))
    return (logits[:, 0] if last_only else logits), cache

  def premerge(self, threshold):
    """Pre-merge: give every structured FFN layer its merged dense matrix as well (design §8).

    threshold: an int, or {'fc1': int, 'fc2': int}; a call on at most that many tokens applies
    the merged matrix, a larger one the structured factors. Dense layers are left as they are.
    Inference only: refused while self-guided guides exist.
    """
    if self.has_guide:
      raise ValueError('premerge: the model still has self-guided guides; merge after the '
                       'hand-over (drop_guides()).')
    for block, stacked in ((self.first, False), (self.stack, True)):
      if block is None:
        continue
      for name in ('fc1', 'fc2'):
        layer = getattr(block.ffn, name)
        if isinstance(layer, structured.Dense):
          continue
        limit = int(threshold[name] if isinstance(threshold, dict) else threshold)
        dense = None
        if stacked:  # factors carry a leading `layers` axis: merge each layer on its own
          graphdef, state = nnx.split(layer)
          dense = jax.vmap(lambda s: nnx.merge(graphdef, s).to_dense())(state)
        layer.merge(limit, dense)
