"""Small random Hugging Face checkpoints written here, and float64 numpy forwards of their
architectures read straight from the tensors by their Hugging Face names (tests only).

  path = write_checkpoint(tmp, 'llama', seed=0, **overrides)   # config.json + safetensors
  logits = forward(path, tokens_BT)                            # float64 (B, T, V)
  inv_freq = rope_inv_freq(config_json, head_dim)              # RoPE, scaled as config.json says
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
from safetensors.numpy import save_file

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def hf_config(model_type: str, **overrides) -> dict:
  """A config.json of `model_type`, small; `overrides` set or (None) delete fields."""
  if model_type == 'gpt2':
    c = dict(model_type='gpt2', architectures=['GPT2LMHeadModel'], vocab_size=96, n_embd=64,
             n_layer=3, n_head=4, n_positions=128, n_inner=None, layer_norm_epsilon=1e-5,
             activation_function='gelu_new', tie_word_embeddings=True)
  else:
    c = dict(BASE, model_type=model_type, head_dim=16, rope_theta=10000.0)
    if model_type in ('llama', 'mistral'):
      c.update(architectures=[model_type.capitalize() + 'ForCausalLM'], hidden_act='silu',
               rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
               mlp_bias=False)
      if model_type == 'mistral':
        c.update(sliding_window=None)
    elif model_type == 'qwen2':
      c.update(architectures=['Qwen2ForCausalLM'], hidden_act='silu', rms_norm_eps=1e-6,
               tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096)
    elif model_type == 'starcoder2':
      c.update(architectures=['Starcoder2ForCausalLM'], hidden_act='gelu_pytorch_tanh',
               norm_epsilon=1e-5, use_bias=True, tie_word_embeddings=True, sliding_window=None)
  for k, v in overrides.items():
    if v is None:
      c.pop(k, None)
    else:
      c[k] = v
  return c


def random_tensors(c: dict, seed: int, std: float = 0.15) -> dict:
  """Every tensor of config `c` by its Hugging Face name, float32, random (norms around 1)."""
  rng = np.random.default_rng(seed)
  w = lambda *shape: (std * rng.standard_normal(shape)).astype(np.float32)
  norm = lambda d: (1 + 0.2 * rng.standard_normal(d)).astype(np.float32)
  t = {}
  if c['model_type'] == 'gpt2':
    d, f = c['n_embd'], c['n_inner'] or 4 * c['n_embd']
    t['transformer.wte.weight'] = w(c['vocab_size'], d)
    t['transformer.wpe.weight'] = w(c['n_positions'], d)
    for i in range(c['n_layer']):
      p = f'transformer.h.{i}.'
      for ln in ('ln_1', 'ln_2'):
        t[p + ln + '.weight'], t[p + ln + '.bias'] = norm(d), w(d)
      t[p + 'attn.c_attn.weight'], t[p + 'attn.c_attn.bias'] = w(d, 3 * d), w(3 * d)
      t[p + 'attn.c_proj.weight'], t[p + 'attn.c_proj.bias'] = w(d, d), w(d)
      t[p + 'mlp.c_fc.weight'], t[p + 'mlp.c_fc.bias'] = w(d, f), w(f)
      t[p + 'mlp.c_proj.weight'], t[p + 'mlp.c_proj.bias'] = w(f, d), w(d)
    t['transformer.ln_f.weight'], t['transformer.ln_f.bias'] = norm(d), w(d)
    return t
  mt = c['model_type']
  d, f, v = c['hidden_size'], c['intermediate_size'], c['vocab_size']
  h, k = c['num_attention_heads'], c['num_key_value_heads']
  e = c.get('head_dim') or d // h
  qkv_bias = mt == 'qwen2' or c.get('attention_bias') or (mt == 'starcoder2' and c['use_bias'])
  all_bias = (mt == 'starcoder2' and c['use_bias']) or (c.get('attention_bias')
                                                        and c.get('mlp_bias'))
  t['model.embed_tokens.weight'] = w(v, d)
  for i in range(c['num_hidden_layers']):
    p = f'model.layers.{i}.'
    for ln in ('input_layernorm', 'post_attention_layernorm'):
      t[p + ln + '.weight'] = norm(d)
      if mt == 'starcoder2':
        t[p + ln + '.bias'] = w(d)
    for name, width in (('q_proj', h * e), ('k_proj', k * e), ('v_proj', k * e)):
      t[p + f'self_attn.{name}.weight'] = w(width, d)
      if qkv_bias:
        t[p + f'self_attn.{name}.bias'] = w(width)
    t[p + 'self_attn.o_proj.weight'] = w(d, h * e)
    if all_bias:
      t[p + 'self_attn.o_proj.bias'] = w(d)
    mlp = ((('c_fc', f, d), ('c_proj', d, f)) if mt == 'starcoder2' else
           (('gate_proj', f, d), ('up_proj', f, d), ('down_proj', d, f)))
    for name, out, inp in mlp:
      t[p + f'mlp.{name}.weight'] = w(out, inp)
      if all_bias:
        t[p + f'mlp.{name}.bias'] = w(out)
  t['model.norm.weight'] = norm(d)
  if mt == 'starcoder2':
    t['model.norm.bias'] = w(d)
  if not c.get('tie_word_embeddings'):
    t['lm_head.weight'] = w(v, d)
  return t


def write_checkpoint(root, model_type: str, *, seed: int = 0, shards: int = 1, dtype=None,
                     tokenizer: bool = False, name: str | None = None, **overrides) -> pathlib.Path:
  """A Hugging Face model directory under `root`: config.json and random safetensors weights
  (`shards` files with an index when > 1; `dtype`: e.g. ml_dtypes.bfloat16)."""
  path = pathlib.Path(root) / (name or f'{model_type}-{seed}')
  path.mkdir(parents=True)
  c = hf_config(model_type, **overrides)
  (path / 'config.json').write_text(json.dumps(c, indent=1))
  t = random_tensors(c, seed)
  if dtype is not None:
    t = {n: a.astype(dtype) for n, a in t.items()}
  names = list(t)
  if shards == 1:
    save_file(t, str(path / 'model.safetensors'), metadata={'format': 'pt'})
  else:
    weight_map = {}
    for s, part in enumerate(np.array_split(np.arange(len(names)), shards)):
      file = f'model-{s + 1:05d}-of-{shards:05d}.safetensors'
      save_file({names[j]: t[names[j]] for j in part}, str(path / file),
                metadata={'format': 'pt'})
      weight_map.update({names[j]: file for j in part})
    (path / 'model.safetensors.index.json').write_text(
        json.dumps({'metadata': {}, 'weight_map': weight_map}))
  if tokenizer:
    write_tokenizer(path / 'tokenizer.json', c['vocab_size'])
  return path


def write_tokenizer(file, vocab_size: int):
  """A word-level tokenizer.json of `vocab_size` entries (the tokenizers package)."""
  import tokenizers
  from tokenizers import models, pre_tokenizers
  vocab = {'<unk>': 0, '<eos>': 1}
  vocab.update({f'w{i}': i for i in range(2, vocab_size)})
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(file))


# ----------------------------------------------------------------------------- float64 forwards


def _load(path):
  from safetensors import safe_open
  path = pathlib.Path(path)
  files = sorted(path.glob('*.safetensors'))
  t = {}
  for f in files:
    with safe_open(str(f), framework='numpy') as h:
      for n in h.keys():
        t[n] = np.asarray(h.get_tensor(n), np.float64)
  return t


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _ln(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def rope_inv_freq(c, e):
  """RoPE inverse frequencies, with the rope_scaling of config.json (linear, llama3)."""
  inv = 1.0 / c.get('rope_theta', 10000.0) ** (np.arange(0, e, 2, dtype=np.float64) / e)
  rs = c.get('rope_scaling') or {}
  kind = rs.get('rope_type', rs.get('type'))
  if kind == 'linear':
    return inv / rs['factor']
  if kind == 'llama3':
    out = []
    old, lo, hi, fac = (rs['original_max_position_embeddings'], rs['low_freq_factor'],
                        rs['high_freq_factor'], rs['factor'])
    for f in inv:
      wavelen = 2 * math.pi / f
      if wavelen < old / hi:
        out.append(f)
      elif wavelen > old / lo:
        out.append(f / fac)
      else:
        smooth = (old / wavelen - lo) / (hi - lo)
        out.append((1 - smooth) * f / fac + smooth * f)
    return np.array(out)
  return inv


def _rope(x_BTHE, inv):
  t = x_BTHE.shape[1]
  ang = np.arange(t)[:, None] * inv[None, :]           # (T, E/2)
  emb = np.concatenate([ang, ang], -1)                  # HF: cat(freqs, freqs)
  cos, sin = np.cos(emb)[None, :, None], np.sin(emb)[None, :, None]
  half = x_BTHE.shape[-1] // 2
  rot = np.concatenate([-x_BTHE[..., half:], x_BTHE[..., :half]], -1)  # rotate_half
  return x_BTHE * cos + rot * sin


def _attend(q_BTHE, k_BTKE, v_BTKE):
  h, k = q_BTHE.shape[2], k_BTKE.shape[2]
  k_BTHE = np.repeat(k_BTKE, h // k, axis=2)  # repeat_kv
  v_BTHE = np.repeat(v_BTKE, h // k, axis=2)
  s = np.einsum('bqhe,bkhe->bhqk', q_BTHE, k_BTHE) / math.sqrt(q_BTHE.shape[-1])
  t = s.shape[-1]
  s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhe->bqhe', p, v_BTHE)


def forward(path, tokens_BT) -> np.ndarray:
  """float64 logits (B, T, V) of the checkpoint at `path`, by its architecture's definition."""
  path = pathlib.Path(path)
  c = json.loads((path / 'config.json').read_text())
  t = _load(path)
  b, n = tokens_BT.shape
  lin = lambda x, name: x @ t[name + '.weight'].T + (t[name + '.bias'] if name + '.bias' in t
                                                      else 0)
  if c['model_type'] == 'gpt2':
    d, h = c['n_embd'], c['n_head']
    eps = c['layer_norm_epsilon']
    g = lambda n_: t.get('transformer.' + n_, t.get(n_))
    conv = lambda x, name: x @ g(name + '.weight') + g(name + '.bias')
    x = g('wte.weight')[tokens_BT] + g('wpe.weight')[np.arange(n)][None]
    for i in range(c['n_layer']):
      p = f'h.{i}.'
      a = _ln(x, g(p + 'ln_1.weight'), g(p + 'ln_1.bias'), eps)
      q, k_, v = np.split(conv(a, p + 'attn.c_attn'), 3, -1)
      shape = (b, n, h, d // h)
      o = _attend(q.reshape(shape), k_.reshape(shape), v.reshape(shape)).reshape(b, n, d)
      x = x + conv(o, p + 'attn.c_proj')
      a = _ln(x, g(p + 'ln_2.weight'), g(p + 'ln_2.bias'), eps)
      x = x + conv(_gelu_tanh(conv(a, p + 'mlp.c_fc')), p + 'mlp.c_proj')
    x = _ln(x, g('ln_f.weight'), g('ln_f.bias'), eps)
    return x @ g('wte.weight').T
  mt = c['model_type']
  d, h = c['hidden_size'], c['num_attention_heads']
  kv = c.get('num_key_value_heads') or h
  e = c.get('head_dim') or d // h
  if mt == 'starcoder2':
    eps = c['norm_epsilon']
    norm = lambda x, name: _ln(x, t[name + '.weight'], t[name + '.bias'], eps)
  else:
    eps = c['rms_norm_eps']
    norm = lambda x, name: _rms(x, t[name + '.weight'], eps)
  inv = rope_inv_freq(c, e)
  x = t['model.embed_tokens.weight'][tokens_BT]
  for i in range(c['num_hidden_layers']):
    p = f'model.layers.{i}.'
    a = norm(x, p + 'input_layernorm')
    q = _rope(lin(a, p + 'self_attn.q_proj').reshape(b, n, h, e), inv)
    k_ = _rope(lin(a, p + 'self_attn.k_proj').reshape(b, n, kv, e), inv)
    v = lin(a, p + 'self_attn.v_proj').reshape(b, n, kv, e)
    x = x + lin(_attend(q, k_, v).reshape(b, n, h * e), p + 'self_attn.o_proj')
    a = norm(x, p + 'post_attention_layernorm')
    if mt == 'starcoder2':
      m = lin(_gelu_tanh(lin(a, p + 'mlp.c_fc')), p + 'mlp.c_proj')
    else:
      gate = lin(a, p + 'mlp.gate_proj')
      m = lin(gate / (1 + np.exp(-gate)) * lin(a, p + 'mlp.up_proj'), p + 'mlp.down_proj')
    x = x + m
  x = norm(x, 'model.norm')
  head = t.get('lm_head.weight', t['model.embed_tokens.weight'])
  return x @ head.T
