"""Hugging Face architectures this model expresses: one parameter-name table per family, read by
`export` (our weights under their names) and by `convert` (their checkpoint into our layers).

  fam = hf_families.family(config_json, where='SRC/config.json')  # or a one-line ValueError
  fields = hf_families.model_fields(fam, config_json, where)      # our model.* fields
  names = hf_families.expected(fam, cfg, max_positions)           # {HF tensor name: shape}
  ours = hf_families.read_layer(fam, get, i, cfg)                 # {our param path: array}

A family's table names, per block, our modules and theirs: the two norms, the attention's q, k, v
(or one fused c_attn) and output projections, the FFN's fc1 (Llama's gate and up are our fc1's two
halves, gate first) and fc2, and outside the blocks the embedding, the learned positions (GPT-2),
the final norm and an untied head. GPT-2 stores its projections as Conv1D, (in, out): they are
transposed on the way in.

What a family cannot carry into this model is refused from config.json alone, before any weight is
read, with the field and its value: a sliding window shorter than the context, mixture-of-experts
fields, ALiBi, an activation other than the family's, RoPE scalings other than linear and llama3,
partial rotary embeddings, biases on some projections but not on the others.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Family:
  """The names of one architecture's tensors (see the module docstring)."""
  model_type: str
  architecture: str           # the transformers class
  prefix: str                 # of every name inside the backbone
  block: str                  # a block's names start with prefix + block.format(i)
  norms: tuple                # ((ours, theirs), ...) per block
  qkv: tuple                  # (q, k, v) names, or one fused name
  out: str
  fc1: str | tuple            # one name, or (gate, up): our fc1's halves
  fc2: str
  embed: str = 'embed_tokens'
  positions: str | None = None
  final_norm: str = 'norm'
  head: str = 'lm_head.weight'
  conv1d: bool = False        # weights stored (in, out)
  layernorm: bool = False     # norms with a bias


_LLAMA_BLOCK = dict(prefix='model.', block='layers.{}.',
                    norms=(('norm1', 'input_layernorm'), ('norm2', 'post_attention_layernorm')),
                    qkv=('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'),
                    out='self_attn.o_proj')
FAMILIES = {
    'llama': Family('llama', 'LlamaForCausalLM', **_LLAMA_BLOCK,
                    fc1=('mlp.gate_proj', 'mlp.up_proj'), fc2='mlp.down_proj'),
    'mistral': Family('mistral', 'MistralForCausalLM', **_LLAMA_BLOCK,
                      fc1=('mlp.gate_proj', 'mlp.up_proj'), fc2='mlp.down_proj'),
    'qwen2': Family('qwen2', 'Qwen2ForCausalLM', **_LLAMA_BLOCK,
                    fc1=('mlp.gate_proj', 'mlp.up_proj'), fc2='mlp.down_proj'),
    'starcoder2': Family('starcoder2', 'Starcoder2ForCausalLM', **_LLAMA_BLOCK,
                         fc1='mlp.c_fc', fc2='mlp.c_proj', layernorm=True),
    'gpt2': Family('gpt2', 'GPT2LMHeadModel', prefix='transformer.', block='h.{}.',
                   norms=(('norm1', 'ln_1'), ('norm2', 'ln_2')), qkv=('attn.c_attn',),
                   out='attn.c_proj', fc1='mlp.c_fc', fc2='mlp.c_proj', embed='wte',
                   positions='wpe', final_norm='ln_f', conv1d=True, layernorm=True),
}
# The activations each family's forward may name, all the one our model computes.
_ACTIVATIONS = {'llama': ('silu',), 'mistral': ('silu',), 'qwen2': ('silu',),
                'starcoder2': ('gelu_pytorch_tanh', 'gelu_new'),
                'gpt2': ('gelu_new', 'gelu_pytorch_tanh')}


def _names(x):
  return x if isinstance(x, tuple) else (x,)


def family(hf: dict, where: str) -> Family:
  """The family of a config.json (a dict), or ValueError naming what this model cannot express."""
  model_type = hf.get('model_type')
  for field in ('num_local_experts', 'num_experts', 'n_routed_experts', 'moe_intermediate_size',
                'num_experts_per_tok'):
    if hf.get(field):
      raise ValueError(f'{where}: {field}={hf[field]!r}: a mixture-of-experts FFN; this model has '
                       'one dense FFN per block and cannot import it.')
  for field in ('alibi', 'use_alibi'):
    if hf.get(field) or (isinstance(hf.get('attn_config'), dict)
                         and hf['attn_config'].get(field)):
      raise ValueError(f'{where}: {field}=True: ALiBi attention biases; this model has RoPE or '
                       'learned positions and cannot import it.')
  if model_type not in FAMILIES:
    raise ValueError(f'{where}: model_type={model_type!r} is not supported; supported: '
                     f'{", ".join(FAMILIES)}.')
  if hf.get('quantization_config'):
    raise ValueError(f'{where}: quantization_config is set: a quantized checkpoint; convert a '
                     'float32, bfloat16 or float16 one.')
  return FAMILIES[model_type]


def _rope_fields(hf: dict, where: str) -> dict:
  """rope_base and the rope_scaling section from a config.json (transformers 4 and 5 spellings)."""
  params = hf.get('rope_parameters') or {}
  scaling = hf.get('rope_scaling') or {}
  theta = params.get('rope_theta', hf.get('rope_theta', 10000.0))
  kind = scaling.get('rope_type', scaling.get('type')) or params.get('rope_type', 'default')
  source = scaling if scaling else params
  if hf.get('partial_rotary_factor', 1.0) != 1.0:
    raise ValueError(f'{where}: partial_rotary_factor={hf["partial_rotary_factor"]}: RoPE over '
                     'part of the head; this model rotates the whole head.')
  out = {'rope_base': float(theta), 'rope_scaling': {'type': 'none'}}
  if kind == 'default':
    return out
  if kind == 'linear':
    out['rope_scaling'] = {'type': 'linear', 'factor': float(source['factor'])}
  elif kind == 'llama3':
    out['rope_scaling'] = {
        'type': 'llama3', 'factor': float(source['factor']),
        'low_freq_factor': float(source['low_freq_factor']),
        'high_freq_factor': float(source['high_freq_factor']),
        'original_len': int(source['original_max_position_embeddings'])}
  else:
    raise ValueError(f'{where}: rope_scaling type {kind!r} is not supported; this model has '
                     "RoPE scalings 'linear' and 'llama3'.")
  return out


def model_fields(fam: Family, hf: dict, where: str) -> dict:
  """Our model.* fields (architecture only) of a config.json of family `fam`; ValueError naming
  the field this model cannot express."""
  act_field = 'activation_function' if fam.model_type == 'gpt2' else 'hidden_act'
  act = hf.get(act_field, 'gelu_new' if fam.model_type == 'gpt2' else None)
  if act not in _ACTIVATIONS[fam.model_type]:
    raise ValueError(f'{where}: {act_field}={act!r}: this model computes '
                     f'{_ACTIVATIONS[fam.model_type][0]} for {fam.model_type}; other activations '
                     'are not supported.')
  if fam.model_type == 'gpt2':
    for field, ok in (('scale_attn_weights', True), ('scale_attn_by_inverse_layer_idx', False),
                      ('add_cross_attention', False)):
      if hf.get(field, ok) != ok:
        raise ValueError(f'{where}: {field}={hf[field]!r} is not supported (this model needs '
                         f'{ok}).')
    d, heads = hf['n_embd'], hf['n_head']
    return dict(vocab_size=hf['vocab_size'], hidden_dim=d, ffn_dim=hf.get('n_inner') or 4 * d,
                num_layers=hf['n_layer'], num_heads=heads, num_kv_heads=heads, attn_dim=d,
                norm='layernorm', norm_eps=float(hf.get('layer_norm_epsilon', 1e-5)),
                activation='gelu', use_bias=True, qkv_bias=False, position='absolute',
                tie_embeddings=True, max_positions=hf['n_positions'], sliding_window=None,
                rope_base=10000.0, rope_scaling={'type': 'none'})
  d, heads = hf['hidden_size'], hf['num_attention_heads']
  head_dim = hf.get('head_dim') or d // heads
  window = hf.get('sliding_window')
  if fam.model_type == 'qwen2' and not hf.get('use_sliding_window', False):
    window = None
  fields = dict(vocab_size=hf['vocab_size'], hidden_dim=d, ffn_dim=hf['intermediate_size'],
                num_layers=hf['num_hidden_layers'], num_heads=heads,
                num_kv_heads=hf.get('num_key_value_heads') or heads, attn_dim=heads * head_dim,
                position='rope', max_positions=hf.get('max_position_embeddings'),
                sliding_window=window, **_rope_fields(hf, where))
  if fam.model_type == 'starcoder2':
    fields.update(norm='layernorm', norm_eps=float(hf.get('norm_epsilon', 1e-5)),
                  activation='gelu', use_bias=bool(hf.get('use_bias', True)), qkv_bias=False,
                  tie_embeddings=bool(hf.get('tie_word_embeddings', True)))
    return fields
  attention_bias = bool(hf.get('attention_bias', False))
  mlp_bias = bool(hf.get('mlp_bias', False))
  if fam.model_type == 'qwen2':
    use_bias, qkv_bias = False, True
  elif attention_bias != mlp_bias:
    raise ValueError(f'{where}: attention_bias={attention_bias} with mlp_bias={mlp_bias}: this '
                     'model has biases on every projection or on none (or on q/k/v only).')
  else:
    use_bias, qkv_bias = attention_bias, False
  fields.update(norm='rmsnorm', norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
                activation='swiglu', use_bias=use_bias, qkv_bias=qkv_bias,
                tie_embeddings=bool(hf.get('tie_word_embeddings', False)))
  return fields


# ----------------------------------------------------------------------------- names and shapes


def block_names(fam: Family, i: int) -> dict:
  """{(our module, ...): their names} of block i, weights only (a bias is name .bias)."""
  p = fam.prefix + fam.block.format(i)
  out = {(ours, 'norm'): p + theirs for ours, theirs in fam.norms}
  out[('attn', 'qkv')] = tuple(p + n for n in fam.qkv)
  out[('attn', 'out')] = p + fam.out
  out[('ffn', 'fc1')] = tuple(p + n for n in _names(fam.fc1))
  out[('ffn', 'fc2')] = p + fam.fc2
  return out


def expected(fam: Family, cfg, max_positions: int | None = None) -> dict:
  """{their tensor name: its shape} of a model section `cfg` (ours) in family `fam`;
  max_positions: the rows of learned positions (GPT-2's n_positions)."""
  d, f, v = cfg.hidden_dim, cfg.ffn_dim, cfg.vocab_size
  e = cfg.attn_dim // cfg.num_heads
  q, k = cfg.num_heads * e, cfg.num_kv_heads * e
  qkv_bias = cfg.use_bias or cfg.qkv_bias
  t = (lambda s: s[::-1]) if fam.conv1d else (lambda s: s)
  shapes = {fam.prefix + fam.embed + '.weight': (v, d)}
  if fam.positions:
    shapes[fam.prefix + fam.positions + '.weight'] = (max_positions, d)
  for i in range(cfg.num_layers):
    names = block_names(fam, i)
    for ours, _ in fam.norms:
      shapes[names[(ours, 'norm')] + '.weight'] = (d,)
      if fam.layernorm:
        shapes[names[(ours, 'norm')] + '.bias'] = (d,)
    widths = (q + 2 * k,) if len(fam.qkv) == 1 else (q, k, k)
    for name, width in zip(names[('attn', 'qkv')], widths):
      shapes[name + '.weight'] = t((width, d))
      if qkv_bias:
        shapes[name + '.bias'] = (width,)
    shapes[names[('attn', 'out')] + '.weight'] = t((d, q))
    fc1 = names[('ffn', 'fc1')]
    for name in fc1:
      shapes[name + '.weight'] = t((f, d))
    shapes[names[('ffn', 'fc2')] + '.weight'] = t((d, f))
    if cfg.use_bias:
      shapes[names[('attn', 'out')] + '.bias'] = (d,)
      for name in fc1:
        shapes[name + '.bias'] = (f,)
      shapes[names[('ffn', 'fc2')] + '.bias'] = (d,)
  shapes[fam.prefix + fam.final_norm + '.weight'] = (d,)
  if fam.layernorm:
    shapes[fam.prefix + fam.final_norm + '.bias'] = (d,)
  if not cfg.tie_embeddings:
    shapes[fam.head] = (v, d)
  return shapes


def read_layer(fam: Family, get, i: int, cfg) -> dict:
  """Block i of a checkpoint as our parameters {(module, ..., leaf): float32 array}; `get(name)`
  returns their tensor (numpy, any float dtype) or None when absent."""
  names = block_names(fam, i)
  f32 = lambda a: np.asarray(a, np.float32)
  w = (lambda a: f32(a).T) if fam.conv1d else f32
  out = {}
  for ours, _ in fam.norms:
    name = names[(ours, 'norm')]
    out[(ours, 'scale')] = f32(get(name + '.weight'))
    bias = get(name + '.bias') if fam.layernorm else None
    if bias is not None and cfg.use_bias:
      out[(ours, 'bias')] = f32(bias)
    elif bias is not None and np.any(bias):
      raise ValueError(f'{name}.bias is not zero, but use_bias=False gives our LayerNorm no '
                       'bias; this checkpoint cannot be imported.')
  for module, leaf_names in ((('attn', 'qkv'), names[('attn', 'qkv')]),
                             (('attn', 'out'), (names[('attn', 'out')],)),
                             (('ffn', 'fc1'), names[('ffn', 'fc1')]),
                             (('ffn', 'fc2'), (names[('ffn', 'fc2')],))):
    out[module + ('kernel',)] = np.concatenate([w(get(n + '.weight')) for n in leaf_names])
    biases = [get(n + '.bias') for n in leaf_names]
    if all(b is not None for b in biases):
      out[module + ('bias',)] = np.concatenate([f32(b) for b in biases])
  return out


def read_outside(fam: Family, get, cfg) -> dict:
  """The embedding, learned positions (their first seq_len rows), final norm and head."""
  f32 = lambda a: np.asarray(a, np.float32)
  out = {('embedding',): f32(get(fam.prefix + fam.embed + '.weight')),
         ('final_norm', 'scale'): f32(get(fam.prefix + fam.final_norm + '.weight'))}
  if fam.layernorm and cfg.use_bias:
    out[('final_norm', 'bias')] = f32(get(fam.prefix + fam.final_norm + '.bias'))
  if fam.positions:
    out[('pos_embedding',)] = f32(get(fam.prefix + fam.positions + '.weight'))[:cfg.seq_len]
  if not cfg.tie_embeddings:
    out[('head',)] = f32(get(fam.head))
  return out
