"""Starcoder2 / Llama / Mistral / Qwen2 with the FFN of structffn_jax: its structured layers run as factors.

Shipped next to the weights by `python -m structffn_jax.export --structured` and loaded with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`. Everything but the FFN is
the transformers architecture itself (attention, norms, RoPE, the head, the KV cache,
`generate`); each block's MLP is replaced by `StructFFNMLP`: fc1 -> GELU(tanh), or SwiGLU on fc1's
two halves (gate, up), -> fc2, each projection one of

  dense         kernel (M, N)                                y = kernel x
  lowrank       v (R, N), u (M, R)                           y = u (v x)
  blockdense    v (C, R/C, N/C), u (M, R)                    h_c = v_c x_c, y = u concat(h)
  blockshuffle  w1 (C, q, N/C), w2 (C, M/C, q)               h_c = w1_c x_c; block j of the
                second stage reads flat(h)[a·C + j] at its position a; y[a·C + j] = (w2_j h'_j)[a]

plus a bias (M,) when the model has biases, as `config.structffn_layers` lists per layer. The
parameter names are `model.layers.<i>.mlp.fc1.<name>`; the tensors are the run's own factors.
This file imports only torch and transformers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Starcoder2Config, Starcoder2ForCausalLM)


class StructuredLinear(nn.Module):
  """One projection of the FFN, `spec` = {'kind', 'in', 'out', 'rank'?, 'blocks'?}."""

  def __init__(self, spec: dict, bias: bool):
    super().__init__()
    self.kind = spec['kind']
    n, m = int(spec['in']), int(spec['out'])
    shapes = {
        'dense': lambda: {'kernel': (m, n)},
        'lowrank': lambda: {'v': (spec['rank'], n), 'u': (m, spec['rank'])},
        'blockdense': lambda: {'v': (spec['blocks'], spec['rank'] // spec['blocks'],
                                     n // spec['blocks']), 'u': (m, spec['rank'])},
        'blockshuffle': lambda: {'w1': (spec['blocks'], min(n, m) // spec['blocks'],
                                        n // spec['blocks']),
                                 'w2': (spec['blocks'], m // spec['blocks'],
                                        min(n, m) // spec['blocks'])},
    }
    if self.kind not in shapes:
      raise ValueError(f'structffn_layers: kind {self.kind!r} is not one of {sorted(shapes)}')
    for name, shape in shapes[self.kind]().items():
      self.register_parameter(name, nn.Parameter(torch.zeros(*map(int, shape))))
    self.bias = nn.Parameter(torch.zeros(m)) if bias else None

  def forward(self, x):
    lead = x.shape[:-1]
    if self.kind == 'dense':
      y = x @ self.kernel.T
    elif self.kind == 'lowrank':
      y = (x @ self.v.T) @ self.u.T
    elif self.kind == 'blockdense':
      c, r, p = self.v.shape
      h = torch.einsum('...cp,crp->...cr', x.reshape(*lead, c, p), self.v)
      y = h.reshape(*lead, c * r) @ self.u.T
    else:
      c, q, p = self.w1.shape
      h = torch.einsum('...cp,cqp->...cq', x.reshape(*lead, c, p), self.w1)
      h = h.reshape(*lead, q, c)  # [a, j] = flat(h)[a·C + j]
      y = torch.einsum('...qj,jsq->...sj', h, self.w2).reshape(*lead, c * self.w2.shape[1])
    return y if self.bias is None else y + self.bias


class StructFFNMLP(nn.Module):
  """fc1 -> GELU(tanh) or SwiGLU(gate, up = fc1's halves) -> fc2."""

  def __init__(self, config, spec: dict):
    super().__init__()
    bias = bool(config.structffn_bias)
    self.fc1 = StructuredLinear(spec['fc1'], bias)
    self.fc2 = StructuredLinear(spec['fc2'], bias)
    self.swiglu = config.structffn_activation == 'swiglu'

  def forward(self, x):
    h = self.fc1(x)
    if self.swiglu:
      gate, up = h.chunk(2, dim=-1)
      h = nn.functional.silu(gate) * up
    else:
      h = nn.functional.gelu(h, approximate='tanh')
    return self.fc2(h)


class _StructFFNConfig:
  """The structured FFN's fields, read from config.json before the architecture's own."""

  def __init__(self, structffn_layers=None, structffn_activation='swiglu', structffn_bias=False,
               **kwargs):
    self.structffn_layers = list(structffn_layers or [])
    self.structffn_activation, self.structffn_bias = structffn_activation, structffn_bias
    super().__init__(**kwargs)


class StructFFNStarcoder2Config(_StructFFNConfig, Starcoder2Config):
  model_type = 'structffn_starcoder2'


class StructFFNLlamaConfig(_StructFFNConfig, LlamaConfig):
  model_type = 'structffn_llama'


class StructFFNMistralConfig(_StructFFNConfig, MistralConfig):
  model_type = 'structffn_mistral'


class StructFFNQwen2Config(_StructFFNConfig, Qwen2Config):
  model_type = 'structffn_qwen2'


def _with_structured_mlp(model, config):
  if len(config.structffn_layers) != len(model.model.layers):
    raise ValueError(f'structffn_layers lists {len(config.structffn_layers)} layers; the model '
                     f'has num_hidden_layers={len(model.model.layers)}.')
  for layer, spec in zip(model.model.layers, config.structffn_layers):
    layer.mlp = StructFFNMLP(config, spec)


class StructFFNStarcoder2ForCausalLM(Starcoder2ForCausalLM):
  config_class = StructFFNStarcoder2Config

  def __init__(self, config):
    super().__init__(config)
    _with_structured_mlp(self, config)


class StructFFNLlamaForCausalLM(LlamaForCausalLM):
  config_class = StructFFNLlamaConfig

  def __init__(self, config):
    super().__init__(config)
    _with_structured_mlp(self, config)


class StructFFNMistralForCausalLM(MistralForCausalLM):
  config_class = StructFFNMistralConfig

  def __init__(self, config):
    super().__init__(config)
    _with_structured_mlp(self, config)


class StructFFNQwen2ForCausalLM(Qwen2ForCausalLM):
  config_class = StructFFNQwen2Config

  def __init__(self, config):
    super().__init__(config)
    _with_structured_mlp(self, config)
