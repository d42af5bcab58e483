"""Parameter and FLOP accounting, the paper's convention (docs/design.md §5), read off the model.

Counts come from the instantiated model's parameters, built abstractly with `nnx.eval_shape` (an
xl model costs no memory), so they cannot drift from what trains. Forward FLOPs per token:

  2 · (attention projection weights)   = Σ_layers 2·(2·attn·d + 2·(attn/heads)·kv_heads·d)
  + 4 · seq · attn · layers            (QKᵀ and AV)
  + 2 · (FFN weights, a guide included)
  + 2 · vocab · d                      (tied LM head)

Training FLOPs are 3 × forward × tokens. A self-guided guide is counted for the G guided steps
only, at its expected cost (`sgt.guide_cost`: half with `reduce_flop`).
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
from flax import nnx

from structffn_jax import sgt, structured
from structffn_jax.model import GPT


@dataclasses.dataclass(frozen=True)
class Accounting:
  params_total: int  # every parameter, guides excluded (the model that is kept)
  params_ffn: int  # FFN weights (biases excluded), guides excluded
  params_guide: int  # self-guided dense guides (0 without SGT)
  flops_per_token: int  # forward FLOPs per token of the structured model, guides excluded
  guide_flops_per_token: int  # extra forward FLOPs per token while a guide runs at α>0
  steps: int  # optimizer steps of the run (S, or S + G with fixedflop)
  guided_steps: int  # G (0 without SGT)
  tokens: float  # training tokens seen (S·batch·seq, or (S+G)·batch·seq)
  train_flops: float  # 3 × (forward of every training token, guides at expected cost)
  # The trainer's count of the run's `steps` whole steps, `flops_between(c, acc, 0, steps)`: what
  # metrics.jsonl reaches at the end. It equals train_flops when train.tokens is a whole number of
  # steps; otherwise train_flops is the paper's accounting of the budget as written.
  run_flops: float = 0.0

  def as_dict(self):
    return dataclasses.asdict(self)


def abstract_model(config: ml_collections.ConfigDict) -> GPT:
  """The model of `config` with ShapeDtypeStruct leaves: shapes only, no memory."""
  return nnx.eval_shape(lambda: GPT.from_config(config))


def _size(p) -> int:
  return int(np.prod(p.shape))


def account(config: ml_collections.ConfigDict, model: GPT | None = None) -> Accounting:
  m = config.model
  model = abstract_model(config) if model is None else model
  total = ffn = guide = attn_weights = 0
  for path, v in nnx.iter_graph(model):
    if not isinstance(v, nnx.Param):
      continue
    n = _size(v)
    if path[-1] == 'guide':
      guide += n
      continue
    total += n
    is_weight = path[-1] != 'bias' and not any('norm' in str(part) for part in path)
    if 'ffn' in path and is_weight:
      ffn += n
    elif 'attn' in path and is_weight:
      attn_weights += n
  flops = 2 * attn_weights + 4 * m.seq_len * m.attn_dim * m.num_layers + 2 * ffn \
      + 2 * m.vocab_size * m.hidden_dim
  counts = sgt.step_counts(config)
  steps, guided = counts.total, counts.guided
  # Tokens follow the configured budget (the paper's tables), scaled by the extra guided steps.
  tokens = config.train.tokens * steps / counts.base
  guide_tokens = config.train.tokens * guided / counts.base * sgt.guide_cost(config)
  train = 3.0 * (flops * tokens + 2 * guide * guide_tokens)
  acc = Accounting(params_total=total, params_ffn=ffn, params_guide=guide,
                   flops_per_token=flops, guide_flops_per_token=2 * guide, steps=steps,
                   guided_steps=guided, tokens=tokens, train_flops=train)
  return dataclasses.replace(acc, run_flops=flops_between(config, acc, 0, steps))


def tokens_per_step(config: ml_collections.ConfigDict) -> int:
  """The tokens of one optimizer step: train.global_batch x model.seq_len."""
  return config.train.global_batch * config.model.seq_len


def flops_between(config: ml_collections.ConfigDict, acc: Accounting, start: int,
                  stop: int) -> float:
  """Training FLOPs of optimizer steps [start, stop) of the run: 3 × forward × the tokens of
  those steps, a guide counted for the guided ones (step < G) at its expected cost. The trainer
  counts each step with it, and a run resumed at step s without a count of its own starts from
  `flops_between(c, acc, 0, s)` (`Trained.resumed`)."""
  tokens = tokens_per_step(config)
  guided = max(0, min(stop, acc.guided_steps) - max(start, 0))
  return 3.0 * tokens * (acc.flops_per_token * (stop - start) + acc.guide_flops_per_token
                         * sgt.guide_cost(config) * guided)


@dataclasses.dataclass(frozen=True)
class Trained:
  """What a run had trained by the end of optimizer step `step`: `tokens` and training `flops`
  (each checkpoint keeps both), from which the steps after it count on at the config's batch.

  A change of train.global_batch on resume keeps the step; the plan, the schedule and the data
  position are the new config's, in optimizer steps (its total: train.tokens / (global_batch x
  seq_len)), and each step from then on trains the new batch (README, "What survives what")."""
  step: int = 0
  tokens: int = 0
  flops: float = 0.0

  @classmethod
  def resumed(cls, config: ml_collections.ConfigDict, acc: Accounting, step: int,
              meta: dict) -> Trained:
    """At `step`, from a checkpoint's metadata `meta`; one saved before checkpoints kept the
    counts counts its steps at this config's batch ({}: a run that starts at step 0)."""
    return cls(step, int(meta.get('tokens_trained', step * tokens_per_step(config))),
               float(meta.get('train_flops', flops_between(config, acc, 0, step))))

  def tokens_at(self, config: ml_collections.ConfigDict, step: int) -> int:
    """Tokens trained by the end of optimizer step `step`."""
    return self.tokens + (step - self.step) * tokens_per_step(config)

  def flops_at(self, config: ml_collections.ConfigDict, acc: Accounting, step: int) -> float:
    """Training FLOPs by the end of optimizer step `step`."""
    return self.flops + flops_between(config, acc, self.step, step)


def describe_run(config: ml_collections.ConfigDict, acc: Accounting) -> str:
  """The trainer's first line about a run: parameters, steps, tokens, training FLOPs, SGT."""
  c, t = config, config.train
  return (f'{c.name}: {acc.params_total:,} params ({acc.params_ffn:,} FFN), '
          f'{acc.steps} steps x {t.global_batch} x {c.model.seq_len} tokens, '
          f'{acc.train_flops:.3e} training FLOPs'
          + (f', self-guided for {acc.guided_steps} steps ({c.sgt.mode}, {c.sgt.schedule}'
             f'{", reduce_flop" if c.sgt.reduce_flop else ""})' if c.sgt.enabled else ''))


def ffn_params_closed_form(config: ml_collections.ConfigDict) -> int:
  """FFN weight count from design §2's formulas; an independent check on `account`."""
  m, f = config.model, config.model.ffn
  fc1_out = 2 * m.ffn_dim if m.activation == 'swiglu' else m.ffn_dim
  kw = dict(rank=f.rank, blocks=f.blocks)
  per = (structured.weight_params(f.method, m.hidden_dim, fc1_out, **kw)
         + structured.weight_params(f.method, m.ffn_dim, m.hidden_dim, **kw))
  first = (m.hidden_dim * fc1_out + m.ffn_dim * m.hidden_dim) if m.first_layer_dense else per
  return first + per * (m.num_layers - 1)


def human(n: float) -> str:
  """1274e6 -> '1274M', 2.1e20 -> '2.10e20'."""
  if n >= 1e15:
    return f'{n:.2e}'
  for unit, scale in (('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if n >= scale:
      return f'{n / scale:.{0 if unit == "M" else 2}f}{unit}'
  return str(int(n)) if float(n).is_integer() else f'{n:.3g}'

