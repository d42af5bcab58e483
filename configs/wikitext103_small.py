r"""Small-scale study on WikiText-103 (docs/design.md §7): 4-layer, width-768 GPTs, 3000 steps.

The paper's observations: LowRank R=128 trained without self-guidance shows loss spikes or slow
convergence; self-guided training over the first half removes them. For the block layers the
orthogonal ('paper') initialisation beats a plain Gaussian.

Argument: `method=<dense|lowrank|blockdense|blockshuffle>,sgt=<0|1>,init=<paper|gaussian>,
scale=<paper|cpu>`. `scale=cpu` shrinks the model (width 256, 4 layers, context 128, rank 32) and the
run (300 steps of 16 sequences) so the same comparison runs on 2 CPU cores in minutes.

  # the paper's setting, WikiText-103 train from a local copy:
  python -m structffn_jax.train --config configs/wikitext103_small.py:method=lowrank,sgt=1 \
      --workdir runs/wt103-lowrank-sgt \
      --set data.train_paths=/path/to/wiki.train.tokens \
      --set data.valid_paths=/path/to/wiki.valid.tokens
  # on this repository's data (validation split trains, test split evaluates), CPU scale:
  python -m structffn_jax.train --config configs/wikitext103_small.py:method=lowrank,sgt=1,scale=cpu \
      --workdir runs/wt103-cpu-lowrank-sgt

Data defaults to ../shared/data/wikitext-103: wiki.valid.tokens as training text, wiki.test.tokens
for evaluation (no train split is shipped there).
"""

import pathlib

from structffn_jax import config as config_lib
from structffn_jax.configs import common

DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'wikitext-103'

SCALES = {
    'paper': dict(hidden_dim=768, ffn_dim=3072, num_heads=12, seq_len=1024, rank=128, bd_rank=256, steps=3000,
                  global_batch=64, vocab_size=16384, peak_lr=1e-3, eval_every=250),
    'cpu': dict(hidden_dim=256, ffn_dim=1024, num_heads=4, seq_len=128, rank=32, bd_rank=88, steps=300,
                global_batch=16, vocab_size=4096, peak_lr=2e-3, eval_every=50),
}


# The small-scale study, for `launch/sweep.py configs/wikitext103_small.py` (`--grid scale=cpu`
# for the CPU-sized version): LowRank with and without self-guidance, the init ablation.
VARIANTS = ['method=dense', 'method=lowrank,sgt=0', 'method=lowrank,sgt=1',
            'method=blockdense,init=paper', 'method=blockdense,init=gaussian',
            'method=blockshuffle,init=paper', 'method=blockshuffle,init=gaussian']


def get_config(arg=None):
  a = common.parse_arg(arg, method='lowrank', sgt=0, init='paper', scale='paper')
  s = common.choose('scale', a.scale, SCALES)
  c = config_lib.base_config()
  c.name = f'wt103-{a.scale}-{a.method}' + ('-sgt' if a.sgt else '') + \
      ('-gaussian' if a.init == 'gaussian' else '')
  m = c.model
  m.vocab_size = s['vocab_size']  # SentencePiece trained on the training text
  m.seq_len = s['seq_len']  # context
  m.hidden_dim, m.ffn_dim, m.attn_dim = s['hidden_dim'], s['ffn_dim'], s['hidden_dim']
  m.num_layers, m.num_heads, m.num_kv_heads = 4, s['num_heads'], s['num_heads']
  if a.scale == 'cpu':
    m.dtype = 'float32'  # CPU-friendly
  structures = {
      'dense': dict(method='dense', rank=0, blocks=1),
      'lowrank': dict(method='lowrank', rank=s['rank'], blocks=1),
      'blockdense': dict(method='blockdense', rank=s['bd_rank'], blocks=2),  # ~32% of dense
      'blockshuffle': dict(method='blockshuffle', rank=0, blocks=4),
  }
  m.ffn.update(common.choose('method', a.method, structures))
  m.ffn.init = common.choose('init', a.init, {'paper': 'paper', 'gaussian': 'gaussian'})
  c.sgt.enabled = bool(a.sgt)  # guide the first half (fixedstep, ratio 0.5)
  c.train.global_batch = s['global_batch']  # sequences per step
  c.train.tokens = s['steps'] * s['global_batch'] * s['seq_len']  # steps x batch x context
  c.train.peak_lr = s['peak_lr']  # peak learning rate
  c.train.eval_every = s['eval_every']  # validation interval
  c.train.eval_tokens = 128 * s['seq_len'] if a.scale == 'cpu' else 2e6  # validation tokens
  c.train.log_every = 10  # progress line interval
  c.train.ckpt_every = 500  # checkpoint interval
  c.data.source = 'text'  # WikiText layout
  c.data.train_paths = [str(DATA / 'wiki.valid.tokens')]  # training text
  c.data.valid_paths = [str(DATA / 'wiki.test.tokens')]  # evaluation text
  c.data.vocab_size = m.vocab_size  # tokenizer size = model vocabulary
  return c
