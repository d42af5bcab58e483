"""Parameter and FLOP accounting (docs/design.md §5) against the paper's tables and closed forms.

Closed forms here are written from the design notes' words, independently of the library: §2's
parameter formulas per layer, the attention/norm/bias bookkeeping of a pre-norm GPT, and §5's
FLOPs per token. The paper's numbers are reproduced to the digits the paper prints.
"""

import json
import subprocess
import sys

import pytest

from structffn_jax import accounting
from structffn_jax import config as config_lib

SIZES = ('s', 'm', 'l', 'xl')
METHODS = ('dense', 'lowrank', 'blockdense', 'blockshuffle')


def load(repo_root, spec, overrides=()):
  path, _, arg = spec.partition(':')
  return config_lib.load(f'{repo_root / path}:{arg}', tuple(overrides))


def table_config(repo_root, size, method, fraction=32, **extra):
  arg = f'model={size},method={method},fraction={fraction}'
  arg += ''.join(f',{k}={v}' for k, v in extra.items())
  return load(repo_root, f'configs/structured_ffn.py:{arg}')


# ----------------------------------------------------------------------------- closed forms


def layer_params(method, n, m, rank, blocks):
  """design §2's table: weight parameters of an n -> m layer."""
  return {'dense': n * m, 'lowrank': rank * (n + m), 'blockdense': rank * (m + n // blocks),
          'blockshuffle': min(n, m) * (n + m) // blocks}[method]


def ffn_weights(m):
  fc1_out = 2 * m.ffn_dim if m.activation == 'swiglu' else m.ffn_dim
  f = m.ffn
  per = (layer_params(f.method, m.hidden_dim, fc1_out, f.rank, f.blocks)
         + layer_params(f.method, m.ffn_dim, m.hidden_dim, f.rank, f.blocks))
  first = m.hidden_dim * fc1_out + m.ffn_dim * m.hidden_dim if m.first_layer_dense else per
  return first + (m.num_layers - 1) * per


def guide_params(m):
  """Dense (M, N) guides of every structured fc1/fc2 (the first block's FFN is dense)."""
  fc1_out = 2 * m.ffn_dim if m.activation == 'swiglu' else m.ffn_dim
  structured_layers = m.num_layers - (1 if m.first_layer_dense else 0)
  return structured_layers * (m.hidden_dim * fc1_out + m.ffn_dim * m.hidden_dim)


def total_params(m):
  d, head = m.hidden_dim, m.attn_dim // m.num_heads
  qkv_width = (m.num_heads + 2 * m.num_kv_heads) * head
  b = 1 if m.use_bias else 0
  attn = d * qkv_width + m.attn_dim * d + b * (qkv_width + d)
  fc1_out = 2 * m.ffn_dim if m.activation == 'swiglu' else m.ffn_dim
  ffn_bias = b * (fc1_out + d)
  norm = d * (2 if m.norm == 'layernorm' and m.use_bias else 1)
  embeddings = m.vocab_size * d + (m.seq_len * d if m.position == 'absolute' else 0)
  return embeddings + m.num_layers * (attn + ffn_bias + 2 * norm) + norm + ffn_weights(m)


def forward_flops(m):
  """§5.2: per layer 2(2 attn d + 2 (attn/heads) kv d + 2 seq attn), 2 x FFN weights, head."""
  head = m.attn_dim // m.num_heads
  per_layer = 2 * (2 * m.attn_dim * m.hidden_dim + 2 * head * m.num_kv_heads * m.hidden_dim
                   + 2 * m.seq_len * m.attn_dim)
  return m.num_layers * per_layer + 2 * ffn_weights(m) + 2 * m.vocab_size * m.hidden_dim


def sig3(x):
  return float(f'{x:.2e}')


# ----------------------------------------------------------------------------- Table 1

TABLE1 = [  # method, fraction, model size (M), FFN size (M), training FLOPs
    ('dense', 63, 1274, 805, 2.10e20),
    ('lowrank', 63, 985, 516, 1.66e20),
    ('blockdense', 63, 955, 486, 1.61e20),
    ('blockshuffle', 63, 985, 516, 1.66e20),
    ('lowrank', 32, 744, 275, 1.29e20),
    ('blockdense', 32, 728, 260, 1.27e20),
    ('blockshuffle', 32, 744, 275, 1.29e20),
]


@pytest.mark.parametrize('method,fraction,size_m,ffn_m,flops', TABLE1,
                         ids=[f'{r[0]}{r[1]}' for r in TABLE1])
def test_table1_xl(repo_root, method, fraction, size_m, ffn_m, flops):
  config = table_config(repo_root, 'xl', method, fraction)
  acc = accounting.account(config)
  assert round(acc.params_total / 1e6) == size_m
  assert round(acc.params_ffn / 1e6) == ffn_m
  assert sig3(acc.train_flops) == flops
  assert acc.params_guide == 0 and acc.guided_steps == 0
  assert acc.tokens == 25.5e9
  assert acc.steps == round(25.5e9 / (512 * 1024))
  # And exactly the closed forms behind those rounded numbers.
  m = config.model
  assert acc.params_total == total_params(m)
  assert acc.params_ffn == ffn_weights(m)
  assert acc.flops_per_token == forward_flops(m)
  assert acc.train_flops == pytest.approx(3 * forward_flops(m) * 25.5e9, rel=1e-12)


# ----------------------------------------------------------------------------- Table 2

TABLE2 = [  # size, variant, params (M), training FLOPs (None: not printed in the paper)
    ('m', 'dense', 335, 1.55e19),
    ('m', 'gqa', 335, None),
    ('m', 'ours', 219, None),
    ('m', 'ours_sgt', 219, None),
    ('l', 'dense', 729, 7.03e19),
    ('l', 'ours', 464, None),
    ('l', 'ours_sgt', 464, None),
]


@pytest.mark.parametrize('size,variant,params_m,flops', TABLE2,
                         ids=[f'{r[0]}-{r[1]}' for r in TABLE2])
def test_table2_wide_structured(repo_root, size, variant, params_m, flops):
  config = load(repo_root, f'configs/wide_structured.py:model={size},variant={variant}')
  acc = accounting.account(config)
  assert round(acc.params_total / 1e6) == params_m
  if flops is not None:
    assert sig3(acc.train_flops) == flops
  m = config.model
  assert acc.params_total == total_params(m)
  assert acc.flops_per_token == forward_flops(m)
  if variant == 'ours_sgt':  # same FLOPs as dense training, within 1%
    dense = accounting.account(load(repo_root, f'configs/wide_structured.py:model={size},'
                                               'variant=dense'))
    assert acc.train_flops == pytest.approx(dense.train_flops, rel=0.01)
    assert acc.params_guide == guide_params(m)


# ----------------------------------------------------------------------------- closed forms, grid


@pytest.mark.parametrize('size', SIZES)
def test_ffn_params_closed_form_grid(repo_root, size):
  for method in METHODS:
    for fraction in (63, 32):
      config = table_config(repo_root, size, method, fraction)
      acc = accounting.account(config)
      expected = ffn_weights(config.model)
      assert acc.params_ffn == expected, (size, method, fraction)
      assert accounting.ffn_params_closed_form(config) == expected, (size, method, fraction)
      assert acc.params_total == total_params(config.model), (size, method, fraction)
      assert acc.flops_per_token == forward_flops(config.model), (size, method, fraction)


@pytest.mark.parametrize('overrides', [
    ('model.activation=swiglu',),
    ('model.first_layer_dense=false',),
    ('model.use_bias=false', 'model.norm=rmsnorm'),
    ('model.position=absolute', 'model.num_kv_heads=4', 'model.attn_dim=512',
     'model.num_heads=8'),
    ('model.num_layers=1',),
], ids=['swiglu', 'all-structured', 'nobias-rmsnorm', 'absolute-gqa', 'one-layer'])
@pytest.mark.parametrize('method', ['lowrank', 'blockdense', 'blockshuffle'])
def test_closed_forms_with_options(repo_root, method, overrides):
  config = load(repo_root, f'configs/structured_ffn.py:model=s,method={method},fraction=63',
                overrides)
  acc = accounting.account(config)
  m = config.model
  assert acc.params_ffn == ffn_weights(m) == accounting.ffn_params_closed_form(config)
  assert acc.params_total == total_params(m)
  assert acc.flops_per_token == forward_flops(m)


# ----------------------------------------------------------------------------- self-guided


@pytest.mark.parametrize('size', SIZES)
def test_fixedflop_matches_dense_flops(repo_root, size):
  dense = accounting.account(table_config(repo_root, size, 'dense'))
  for method in ('lowrank', 'blockdense', 'blockshuffle'):
    acc = accounting.account(table_config(repo_root, size, method, 32, sgt='fixedflop'))
    assert acc.train_flops == pytest.approx(dense.train_flops, rel=0.01), method
    # Without SGT the structured model is far cheaper: the extra steps are what close the gap.
    plain = accounting.account(table_config(repo_root, size, method, 32))
    assert plain.train_flops < 0.8 * dense.train_flops


@pytest.mark.parametrize('mode,reduce_flop', [('fixedflop', 1), ('fixedstep', 0),
                                              ('fixedflop', 0), ('fixedstep', 1)])
def test_sgt_accounting_closed_form(repo_root, mode, reduce_flop):
  config = table_config(repo_root, 'm', 'blockdense', 32, sgt=mode, reduce_flop=reduce_flop)
  acc = accounting.account(config)
  m, t = config.model, config.train
  assert config.sgt.reduce_flop == bool(reduce_flop)
  base = round(t.tokens / (t.global_batch * m.seq_len))
  ratio = 0.5 if mode == 'fixedstep' else 0.40  # design §3.6: BlockDense m
  assert config.sgt.ratio == ratio
  guided = round(ratio * base)
  steps = base + guided if mode == 'fixedflop' else base
  assert (acc.steps, acc.guided_steps) == (steps, guided)
  assert acc.params_guide == guide_params(m)
  assert acc.guide_flops_per_token == 2 * guide_params(m)
  assert acc.params_total == total_params(m)  # the guide is not part of the kept model
  tokens = t.tokens * steps / base
  guide_tokens = t.tokens * guided / base * (0.5 if reduce_flop else 1.0)
  assert acc.tokens == pytest.approx(tokens, rel=1e-12)
  expected = 3 * (forward_flops(m) * tokens + 2 * guide_params(m) * guide_tokens)
  assert acc.train_flops == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize('mode,reduce_flop', [('fixedflop', 1), ('fixedstep', 0)])
def test_flops_between_two_steps_closed_form(repo_root, mode, reduce_flop):
  """The trainer's count (`flops_between`) against the closed form of design §5.3 with the
  forward FLOPs counted here, step by step and over ranges across the hand-over; and, for a
  budget of whole steps, the run's total against `account`'s."""
  config = table_config(repo_root, 'm', 'blockdense', 32, sgt=mode, reduce_flop=reduce_flop)
  m, t = config.model, config.train
  t.tokens = float(40 * t.global_batch * m.seq_len)  # S = 40 whole steps
  acc = accounting.account(config)
  tokens = t.global_batch * m.seq_len
  guided = acc.guided_steps
  cost = 0.5 if reduce_flop else 1.0

  def closed(start, stop):
    g = len([s for s in range(start, stop) if s < guided])
    return 3 * tokens * (forward_flops(m) * (stop - start) + 2 * guide_params(m) * cost * g)

  for start, stop in ((0, 1), (guided - 1, guided), (guided, guided + 1), (0, guided + 3),
                      (5, acc.steps), (0, acc.steps)):
    assert accounting.flops_between(config, acc, start, stop) == pytest.approx(
        closed(start, stop), rel=1e-12), (start, stop)
  steps = sum(accounting.flops_between(config, acc, s, s + 1) for s in range(acc.steps))
  assert steps == pytest.approx(accounting.flops_between(config, acc, 0, acc.steps), rel=1e-12)
  assert accounting.flops_between(config, acc, 0, acc.steps) == pytest.approx(acc.train_flops,
                                                                              rel=1e-12)
  assert acc.run_flops == accounting.flops_between(config, acc, 0, acc.steps)


def test_run_flops_count_whole_steps_where_the_budget_is_not_one(repo_root):
  """A budget of 40.3 steps: the paper's accounting (`train_flops`) counts the tokens as
  written, the run's count (`run_flops`, what metrics.jsonl reaches) the 40 steps it trains; info
  prints both."""
  spec = 'configs/wide_structured.py:model=m,variant=ours_sgt'
  config = load(repo_root, spec, ())
  m, t = config.model, config.train
  tokens_per_step = t.global_batch * m.seq_len
  t.tokens = 40.3 * tokens_per_step
  acc = accounting.account(config)
  base = 40
  guided = round(config.sgt.ratio * base)
  assert (acc.steps, acc.guided_steps) == (base + guided if config.sgt.mode == 'fixedflop'
                                           else base, guided)
  per_token = 3 * forward_flops(m)
  guide = 3 * 2 * guide_params(m) * (0.5 if config.sgt.reduce_flop else 1.0)
  assert acc.run_flops == pytest.approx(
      tokens_per_step * (per_token * acc.steps + guide * guided), rel=1e-12)
  assert acc.train_flops == pytest.approx(acc.run_flops * 40.3 / 40, rel=1e-12)
  proc = run_info(repo_root, '--config', spec, '--set', f'train.tokens={t.tokens!r}')
  assert proc.returncode == 0, proc.stderr
  assert f'run FLOPs {acc.run_flops:.3e}'.split() == next(
      line for line in proc.stdout.splitlines() if line.startswith('run FLOPs')).split()[:3]
  whole = run_info(repo_root, '--config', spec, '--set', f'train.tokens={40 * tokens_per_step}')
  assert whole.returncode == 0 and 'run FLOPs' not in whole.stdout


# ----------------------------------------------------------------------------- info CLI


def run_info(repo_root, *args):
  return subprocess.run([sys.executable, '-m', 'structffn_jax.info', *args], cwd=repo_root,
                        capture_output=True, text=True, timeout=120)


def test_info_cli_json_matches_account(repo_root):
  spec = 'configs/wide_structured.py:model=m,variant=ours_sgt'
  overrides = ('model.ffn.rank=256',)
  proc = run_info(repo_root, '--config', spec, '--set', overrides[0], '--json')
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout)
  acc = accounting.account(load(repo_root, spec, overrides)).as_dict()
  for key in ('params_total', 'params_ffn', 'flops_per_token', 'train_flops'):
    assert out[key] == acc[key], key
  assert {k: out[k] for k in acc} == acc
  assert out['params_guide'] > 0


def test_info_cli_table(repo_root):
  proc = run_info(repo_root, '--config',
                  'configs/structured_ffn.py:model=xl,method=blockdense,fraction=32')
  assert proc.returncode == 0, proc.stderr
  assert '(728M)' in proc.stdout and '(260M)' in proc.stdout and '1.268e+20' in proc.stdout
  assert 'BlockDense B=4 R=768' in proc.stdout
