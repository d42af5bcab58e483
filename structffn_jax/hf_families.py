"""Hugging Face architectures this model expresses: one parameter-name table per family, read by
`export` (our weights under their names) and by `convert` (their checkpoint into our layers).

  fam = hf_families.family(config_json, where='SRC/config.json')  # or a one-line ValueError
  fields = hf_families.model_fields(fam, config_json, where)      # our model.* fields
  names = hf_families.expected(fam, cfg, max_positions)           # {HF tensor name: shape}
  ours = hf_families.read_layer(fam, get, i, cfg)                 # {our param path: array}
  theirs = hf_families.write_layer(fam, ours, i, cfg)             # the way back (export)
  hf = hf_families.config_fields(fam, cfg)                        # config.json's architecture
  hf_families.check_fields(fam, cfg, hf)                          # or a one-line ValueError

A family's table names, per block, our modules and theirs: the two norms, the attention's q, k, v
(or one fused c_attn) and output projections, the FFN's fc1 (Llama's gate and up are our fc1's two
halves, gate first) and fc2, and outside the blocks the embedding, the learned positions (GPT-2),
the final norm and an untied head. GPT-2 stores its projections as Conv1D, (in, out): they are
transposed on the way in.

Both directions read the same table: `write_layer` / `write_outside` are `read_layer` /
`read_outside` run backwards (the same names, widths and transposes), and `config_fields` writes
the fields `model_fields` reads; the export checks that reading them back gives its model
(`check_fields`) and that the tensors it wrote are `expected`'s.

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
  qkv_bias: bool = False      # q/k/v biases always present (Qwen2)
  # config.json: the activation's field and the values it may take (the first is written), the
  # norm epsilon's field, the fields that switch biases on (all of them equal use_bias), and
  # fields written as they are.
  act_field: str = 'hidden_act'
  activations: tuple = ('silu',)
  eps_field: str = 'rms_norm_eps'
  bias_fields: tuple = ()
  extra: tuple = ()


_LLAMA_BLOCK = dict(prefix='model.', block='layers.{}.',
                    norms=(('norm1', 'input_layernorm'), ('norm2', 'post_attention_layernorm')),
                    qkv=('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'),
                    out='self_attn.o_proj')
_SWIGLU = dict(fc1=('mlp.gate_proj', 'mlp.up_proj'), fc2='mlp.down_proj')
FAMILIES = {
    'llama': Family('llama', 'LlamaForCausalLM', **_LLAMA_BLOCK, **_SWIGLU,
                    bias_fields=('attention_bias', 'mlp_bias'), extra=(('pretraining_tp', 1),)),
    'mistral': Family('mistral', 'MistralForCausalLM', **_LLAMA_BLOCK, **_SWIGLU,
                      extra=(('sliding_window', None),)),
    'qwen2': Family('qwen2', 'Qwen2ForCausalLM', **_LLAMA_BLOCK, **_SWIGLU, qkv_bias=True,
                    extra=(('use_sliding_window', False), ('sliding_window', None))),
    'starcoder2': Family('starcoder2', 'Starcoder2ForCausalLM', **_LLAMA_BLOCK,
                         fc1='mlp.c_fc', fc2='mlp.c_proj', layernorm=True,
                         activations=('gelu_pytorch_tanh', 'gelu_new'), eps_field='norm_epsilon',
                         bias_fields=('use_bias',),
                         extra=(('sliding_window', None), ('residual_dropout', 0.0),
                                ('embedding_dropout', 0.0))),
    'gpt2': Family('gpt2', 'GPT2LMHeadModel', prefix='transformer.', block='h.{}.',
                   norms=(('norm1', 'ln_1'), ('norm2', 'ln_2')), qkv=('attn.c_attn',),
                   out='attn.c_proj', fc1='mlp.c_fc', fc2='mlp.c_proj', embed='wte',
                   positions='wpe', final_norm='ln_f', conv1d=True, layernorm=True,
                   act_field='activation_function', activations=('gelu_new', 'gelu_pytorch_tanh'),
                   eps_field='layer_norm_epsilon'),
}


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
  act = hf.get(fam.act_field, 'gelu_new' if fam.model_type == 'gpt2' else None)
  if act not in fam.activations:
    raise ValueError(f'{where}: {fam.act_field}={act!r}: this model computes '
                     f'{fam.activations[0]} for {fam.model_type}; other activations are not '
                     'supported.')
  if fam.model_type == 'gpt2':
    for field, ok in (('scale_attn_weights', True), ('scale_attn_by_inverse_layer_idx', False),
                      ('add_cross_attention', False)):
      if hf.get(field, ok) != ok:
        raise ValueError(f'{where}: {field}={hf[field]!r} is not supported (this model needs '
                         f'{ok}).')
    d, heads = hf['n_embd'], hf['n_head']
    return dict(vocab_size=hf['vocab_size'], hidden_dim=d, ffn_dim=hf.get('n_inner') or 4 * d,
                num_layers=hf['n_layer'], num_heads=heads, num_kv_heads=heads, attn_dim=d,
                norm='layernorm', norm_eps=float(hf.get(fam.eps_field, 1e-5)),
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
    fields.update(norm='layernorm', norm_eps=float(hf.get(fam.eps_field, 1e-5)),
                  activation='gelu', use_bias=bool(hf.get('use_bias', True)), qkv_bias=False,
                  tie_embeddings=bool(hf.get('tie_word_embeddings', True)))
    return fields
  attention_bias = bool(hf.get('attention_bias', False))
  mlp_bias = bool(hf.get('mlp_bias', False))
  if fam.qkv_bias:
    use_bias, qkv_bias = False, True
  elif attention_bias != mlp_bias:
    raise ValueError(f'{where}: attention_bias={attention_bias} with mlp_bias={mlp_bias}: this '
                     'model has biases on every projection or on none (or on q/k/v only).')
  else:
    use_bias, qkv_bias = attention_bias, False
  fields.update(norm='rmsnorm', norm_eps=float(hf.get(fam.eps_field, 1e-6)),
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
  qkv_bias = fam.qkv_bias or cfg.use_bias or cfg.qkv_bias
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


def read_layer(fam: Family, get, i: int, cfg, ffn: bool = True) -> dict:
  """Block i of a checkpoint as our parameters {(module, ..., leaf): float32 array}; `get(name)`
  returns their tensor (numpy, any float dtype) or None when absent; ffn=False: without the
  FFN's projections."""
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
    if module[0] == 'ffn' and not ffn:
      continue
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


# ----------------------------------------------------------------------------- the way out


def _plain(scaling) -> dict:
  """A model.rope_scaling section as a dict ({'type': 'none'} when absent)."""
  if scaling is None:
    return {'type': 'none'}
  return scaling.to_dict() if hasattr(scaling, 'to_dict') else dict(scaling)


def config_fields(fam: Family, cfg) -> dict:
  """The architecture fields of family `fam`'s config.json for a model section `cfg` (ours):
  what `model_fields` reads back as `cfg`, where the family can express it (`check_fields`)."""
  if fam.positions:
    raise ValueError(f'export: model.hf_family={fam.model_type!r}: {fam.architecture} is not '
                     'written by the export (RoPE families only); set model.hf_family to one '
                     'of them, or to the empty string.')
  scaling = _plain(cfg.get('rope_scaling'))
  kind = scaling.get('type', 'none')
  theta = float(cfg.rope_base)
  params = {'rope_type': 'default' if kind == 'none' else kind}
  if kind == 'linear':
    params['factor'] = float(scaling['factor'])
  elif kind == 'llama3':
    params.update(factor=float(scaling['factor']),
                  low_freq_factor=float(scaling['low_freq_factor']),
                  high_freq_factor=float(scaling['high_freq_factor']),
                  original_max_position_embeddings=int(scaling['original_len']))
  out = {
      'architectures': [fam.architecture], 'model_type': fam.model_type,
      'vocab_size': cfg.vocab_size, 'hidden_size': cfg.hidden_dim,
      'intermediate_size': cfg.ffn_dim, 'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads, 'num_key_value_heads': cfg.num_kv_heads,
      'head_dim': cfg.attn_dim // cfg.num_heads, 'max_position_embeddings': cfg.seq_len,
      'rope_theta': theta,
      # transformers 4 reads rope_scaling (None: unscaled), 5 rope_parameters
      'rope_scaling': None if kind == 'none' else params,
      'rope_parameters': {**params, 'rope_theta': theta},
      'tie_word_embeddings': bool(cfg.get('tie_embeddings', True)),
      fam.act_field: fam.activations[0], fam.eps_field: float(cfg.norm_eps),
  }
  out.update({field: bool(cfg.use_bias) for field in fam.bias_fields})
  out.update(dict(fam.extra))
  return out


def check_fields(fam: Family, cfg, hf: dict):
  """ValueError naming the first model.* field of `cfg` that config.json `hf` (of family `fam`)
  does not carry: the import's reading of `hf` must give `cfg` back."""
  back = model_fields(fam, hf, where=f'export: {fam.architecture}')
  back.pop('max_positions')
  if back.pop('sliding_window'):
    raise ValueError(f'export: {fam.architecture} with a sliding window is not written.')
  for field, theirs in back.items():
    ours = cfg.get(field)
    if field == 'rope_scaling':
      ours = _plain(ours)
      ours = {k: ours[k] for k in theirs} if ours.get('type') == theirs['type'] else ours
    if ours != theirs:
      raise ValueError(f'export: model.{field}={ours!r} cannot be written as '
                       f'{fam.architecture}, whose config.json would give {theirs!r}; export a '
                       'model without it.')


def write_layer(fam: Family, ours: dict, i: int, cfg, ffn: bool = True) -> dict:
  """The inverse of `read_layer`: block i's parameters {(module, ..., leaf): array} (the FFN
  kernels as the dense (out, in) matrices they apply) as {their tensor name: float32 array};
  a LayerNorm without a bias, and Qwen2's q/k/v without biases, get zero ones (their modules
  always have them). ffn=False: without the FFN's projections."""
  names = block_names(fam, i)
  f32 = lambda a: np.ascontiguousarray(np.asarray(a, np.float32))
  w = (lambda a: f32(np.asarray(a).T)) if fam.conv1d else f32
  out = {}
  for mine, _ in fam.norms:
    name = names[(mine, 'norm')]
    out[name + '.weight'] = f32(ours[(mine, 'scale')])
    if fam.layernorm:
      out[name + '.bias'] = f32(ours.get((mine, 'bias'), np.zeros(cfg.hidden_dim)))
  e = cfg.attn_dim // cfg.num_heads
  q, k = cfg.num_heads * e, cfg.num_kv_heads * e
  modules = [(('attn', 'qkv'), names[('attn', 'qkv')],
              (q + 2 * k,) if len(fam.qkv) == 1 else (q, k, k), fam.qkv_bias),
             (('attn', 'out'), (names[('attn', 'out')],), (cfg.hidden_dim,), False)]
  if ffn:
    fc1 = names[('ffn', 'fc1')]
    modules += [(('ffn', 'fc1'), fc1, (cfg.ffn_dim,) * len(fc1), False),
                (('ffn', 'fc2'), (names[('ffn', 'fc2')],), (cfg.hidden_dim,), False)]
  for module, leaf_names, widths, zero_bias in modules:
    cuts = np.cumsum(widths)[:-1]
    kernel, bias = ours[module + ('kernel',)], ours.get(module + ('bias',))
    if bias is None and zero_bias:
      bias = np.zeros(sum(widths), np.float32)
    for j, name in enumerate(leaf_names):
      out[name + '.weight'] = w(np.split(np.asarray(kernel), cuts)[j])
      if bias is not None:
        out[name + '.bias'] = f32(np.split(np.asarray(bias), cuts)[j])
  return out


def write_outside(fam: Family, ours: dict, cfg) -> dict:
  """The inverse of `read_outside`: the embedding, final norm and untied head by their names."""
  f32 = lambda a: np.ascontiguousarray(np.asarray(a, np.float32))
  out = {fam.prefix + fam.embed + '.weight': f32(ours[('embedding',)]),
         fam.prefix + fam.final_norm + '.weight': f32(ours[('final_norm', 'scale')])}
  if fam.layernorm:
    out[fam.prefix + fam.final_norm + '.bias'] = f32(
        ours.get(('final_norm', 'bias'), np.zeros(cfg.hidden_dim)))
  if not cfg.get('tie_embeddings', True):
    out[fam.head] = f32(ours[('head',)])
  return out
