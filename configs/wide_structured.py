r"""Table 2: wide and structured networks (LowRank FFN + grouped-query attention).

Argument: `model=<m|l>,variant=<dense|gqa|ours|ours_sgt>` and optionally
`data=<refinedweb|local>`: the paper's RefinedWeb recipe (LLaMA tokenizer, whose path must be set;
65B train / 0.7B validation tokens; rows of 1025), or the Python standard library to try it here
(see configs/structured_ffn.py and configs/README.md).

  python -m structffn_jax.info --config configs/wide_structured.py:model=m,variant=ours
  python -m structffn_jax.train --config configs/wide_structured.py:model=m,variant=ours \
      --set data.data_dir=/data/refinedweb-llama --workdir runs/wide-m-ours

Paper numbers (#params / training FLOPs / tokens / PPL / decode throughput tok/s at length 256):

  m  dense     335M  1.55e19   6.7B   18.29   30229
  m  GQA       335M            6.7B   18.23   84202
  m  ours      219M           10.6B   17.89   91147
  m  ours+SGT  219M            6.7B   18.04
  l  dense     729M  7.03e19  14.6B   14.29   23351
  l  GQA                      14.6B   14.40   64737
  l  ours      464M           23.4B   14.27   75930
  l  ours+SGT  464M           14.6B   14.40

Ours: m hidden 1024, ffn 4864, attn_dim 512, 8 q / 4 kv heads, LowRank R 512, 10.58B tokens;
l hidden 1536, ffn 7424, attn_dim 768, 12 q / 4 kv heads, R 768, 23.36B tokens. GQA baselines:
m kv 4, ffn 4864; l kv 2, ffn 7424, otherwise the dense size. Ours+SGT trains on the dense token
budget with fixed-FLOP self-guided training (ratio m 0.40, l 0.395).
"""

from structffn_jax import config as config_lib
from structffn_jax.configs import common

OURS = {
    'm': dict(ffn_dim=4864, attn_dim=512, num_heads=8, num_kv_heads=4, rank=512, tokens=10.58e9,
              sgt_ratio=0.40),
    'l': dict(ffn_dim=7424, attn_dim=768, num_heads=12, num_kv_heads=4, rank=768, tokens=23.36e9,
              sgt_ratio=0.395),
}
GQA = {'m': dict(num_kv_heads=4, ffn_dim=4864), 'l': dict(num_kv_heads=2, ffn_dim=7424)}


# The rows of Table 2, for `launch/sweep.py configs/wide_structured.py`.
VARIANTS = [f'model={m},variant={v}' for m in ('m', 'l') for v in ('dense', 'gqa', 'ours', 'ours_sgt')]


def get_config(arg=None):
  a = common.parse_arg(arg, model='m', variant='ours', data='refinedweb')
  common.choose('model', a.model, OURS)
  common.choose('variant', a.variant, dict.fromkeys(('dense', 'gqa', 'ours', 'ours_sgt')))
  size = common.SIZES[a.model]
  c = config_lib.base_config()
  m = c.model
  m.hidden_dim, m.ffn_dim = size['hidden_dim'], size['ffn_dim']
  m.num_layers, m.num_heads = size['num_layers'], size['num_heads']
  m.num_kv_heads, m.attn_dim = size['num_heads'], size['hidden_dim']
  c.train.tokens, c.train.peak_lr = size['tokens'], size['peak_lr']
  if a.variant == 'gqa':
    m.num_kv_heads, m.ffn_dim = GQA[a.model]['num_kv_heads'], GQA[a.model]['ffn_dim']
  elif a.variant in ('ours', 'ours_sgt'):
    o = OURS[a.model]
    m.ffn_dim, m.attn_dim = o['ffn_dim'], o['attn_dim']
    m.num_heads, m.num_kv_heads = o['num_heads'], o['num_kv_heads']
    m.ffn.update(method='lowrank', rank=o['rank'], blocks=1)
    if a.variant == 'ours':
      c.train.tokens = o['tokens']
    else:
      c.sgt.update(enabled=True, mode='fixedflop', ratio=o['sgt_ratio'], reduce_flop=True)
  common.apply_recipe(c.data, common.choose('data', a.data, common.DATA_RECIPES))
  c.data.vocab_size = m.vocab_size  # what data=local trains; the LLaMA tokenizer has 32000
  c.name = f'wide-{a.model}-{a.variant}' + ('' if a.data == 'refinedweb' else f'-{a.data}')
  return c
