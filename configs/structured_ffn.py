r"""Table 1 and its appendix grid: Transformer-s/m/l/xl with dense or structured FFNs.

Argument: `model=<s|m|l|xl>,method=<dense|lowrank|blockdense|blockshuffle>,fraction=<63|32>`
and optionally `sgt=<none|fixedstep|fixedflop>` (self-guided training, docs/design.md §3) and
`reduce_flop=<0|1>` (default: on for fixedflop, where it makes the ratios below match dense FLOPs to
within 0.5%; off for fixedstep), and `data=<refinedweb|local>`.

Data (`data=refinedweb`, the default): the paper's recipe, RefinedWeb tokenized with the LLaMA
SentencePiece model (set its path, or preparing stops with an error), 65B train tokens and 0.7B
validation tokens carved from it by document hash, rows of 1025 tokens. `data=local` trains a
tokenizer on the Python standard library instead, to try a config on this machine.

  python -m structffn_jax.data.prepare --config configs/structured_ffn.py:model=xl \
      --set data.tokenizer=/models/llama/tokenizer.model --out /data/refinedweb-llama
  python -m structffn_jax.info  --config configs/structured_ffn.py:model=xl,method=lowrank,fraction=32
  python -m structffn_jax.train --config configs/structured_ffn.py:model=xl,method=lowrank,fraction=32 \
      --set data.data_dir=/data/refinedweb-llama --workdir runs/xl-lowrank32

Table 1 (Transformer-xl, 25.5B tokens; paper numbers):

  method                 model size  FFN size  training FLOPs  PPL
  dense                  1274M       805M      2.10e20         12.46
  63% LowRank R1024      985M        516M      1.66e20         12.86
  63% BlockDense B4 R1536 955M       486M      1.61e20         12.97
  63% BlockShuffle B2    985M        516M      1.66e20         12.98
  32% LowRank R512       744M        275M      1.29e20         13.55
  32% BlockDense B4 R768 728M        260M      1.27e20         13.74
  32% BlockShuffle B4    744M        275M      1.29e20         13.81

Structures per size (63% / 32%): LowRank R = d/2 / d/4; BlockShuffle C = 2 / 4; BlockDense (C, R) =
s (2,512)/(2,256), m (4,768)/(4,384), l (2,1024)/(2,512), xl (4,1536)/(4,768).
Self-guided (32% models): `fixedstep` guides the first half of the same steps; `fixedflop` adds G =
ratio·S steps (ratios below) that replay the guided phase's data and match dense training FLOPs.
"""

from structffn_jax import config as config_lib
from structffn_jax.configs import common

BLOCKDENSE = {  # (blocks, rank) at the 63% and 32% fractions
    's': {63: (2, 512), 32: (2, 256)},
    'm': {63: (4, 768), 32: (4, 384)},
    'l': {63: (2, 1024), 32: (2, 512)},
    'xl': {63: (4, 1536), 32: (4, 768)},
}
FIXEDFLOP_RATIO = {  # G / S that matches dense training FLOPs (docs/design.md §3.6), 32% models
    'lowrank': {'s': 0.30, 'm': 0.38, 'l': 0.41, 'xl': 0.43},
    'blockshuffle': {'s': 0.30, 'm': 0.38, 'l': 0.41, 'xl': 0.43},
    'blockdense': {'s': 0.30, 'm': 0.40, 'l': 0.41, 'xl': 0.45},
}


# The rows of Table 1, for `launch/sweep.py configs/structured_ffn.py`. Add `--grid model=s,m,l`
# for the appendix grid; `--grid method=lowrank,blockdense,blockshuffle --grid fraction=32
# --grid sgt=fixedflop` turns the rows into the self-guided table's (duplicates are dropped).
VARIANTS = ['model=xl,method=dense'] + [
    f'model=xl,method={method},fraction={fraction}'
    for fraction in (63, 32) for method in ('lowrank', 'blockdense', 'blockshuffle')]


def structure(method: str, size: str, fraction: int, hidden_dim: int) -> dict:
  """The FFN fields (method, rank, blocks) of a table row."""
  common.choose('fraction', fraction, {63: None, 32: None})
  if method == 'dense':
    return dict(method='dense', rank=0, blocks=1)
  if method == 'lowrank':
    return dict(method='lowrank', rank=hidden_dim // (2 if fraction == 63 else 4), blocks=1)
  if method == 'blockshuffle':
    return dict(method='blockshuffle', rank=0, blocks=2 if fraction == 63 else 4)
  if method == 'blockdense':
    blocks, rank = BLOCKDENSE[size][fraction]
    return dict(method='blockdense', rank=rank, blocks=blocks)
  common.choose('method', method, dict.fromkeys(('dense', 'lowrank', 'blockdense',
                                                 'blockshuffle')))


def get_config(arg=None):
  a = common.parse_arg(arg, model='s', method='dense', fraction=32, sgt='none',
                       reduce_flop='auto', data='refinedweb')
  size = common.choose('model', a.model, common.SIZES)
  c = config_lib.base_config()
  m = c.model
  m.hidden_dim, m.ffn_dim = size['hidden_dim'], size['ffn_dim']
  m.num_layers, m.num_heads = size['num_layers'], size['num_heads']
  m.num_kv_heads, m.attn_dim = size['num_heads'], size['hidden_dim']
  m.ffn.update(structure(a.method, a.model, a.fraction, m.hidden_dim))
  c.train.tokens = size['tokens']
  c.train.peak_lr = size['peak_lr']
  common.choose('sgt', a.sgt, dict.fromkeys(('none', 'fixedstep', 'fixedflop')))
  if a.sgt != 'none':
    if a.method == 'dense':
      raise config_lib.ConfigError('sgt: self-guided training needs a structured method '
                                   '(lowrank, blockdense or blockshuffle), not dense.')
    c.sgt.enabled = True
    c.sgt.mode = a.sgt
    c.sgt.ratio = 0.5 if a.sgt == 'fixedstep' else FIXEDFLOP_RATIO[a.method][a.model]
    c.sgt.reduce_flop = (a.sgt == 'fixedflop' if a.reduce_flop == 'auto'
                         else common.choose('reduce_flop', a.reduce_flop, {'0': False, '1': True}))
  common.apply_recipe(c.data, common.choose('data', a.data, common.DATA_RECIPES))
  c.data.vocab_size = m.vocab_size  # what data=local trains; the LLaMA tokenizer has 32000
  suffix = '' if a.method == 'dense' else f'{a.fraction}'
  c.name = f'{a.model}-{a.method}{suffix}' + ('' if a.sgt == 'none' else f'-sgt-{a.sgt}') + \
      ('' if a.data == 'refinedweb' else f'-{a.data}')
  return c
