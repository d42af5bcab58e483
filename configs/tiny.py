"""A tiny GPT for tests and smoke runs: seconds on a CPU, every code path of the big ones.

Argument: `method=<dense|lowrank|blockdense|blockshuffle>` and optionally `sgt=<0|1>`.

  python -m structffn_jax.info --config configs/tiny.py:method=blockshuffle
"""

from structffn_jax import config as config_lib
from structffn_jax.configs import common

STRUCTURES = common.ffn_structures(rank=16, blockdense=(2, 32), blockshuffle_blocks=2)


def get_config(arg=None):
  a = common.parse_arg(arg, method='lowrank', sgt=0)
  c = config_lib.base_config()
  c.name = f'tiny-{a.method}'
  m = c.model
  m.vocab_size = 512  # small SentencePiece vocabulary
  m.seq_len = 64
  m.hidden_dim, m.ffn_dim, m.attn_dim = 64, 256, 64
  m.num_layers, m.num_heads, m.num_kv_heads = 3, 4, 2
  m.dtype = 'float32'
  m.ffn.update(common.choose('method', a.method, STRUCTURES))
  c.sgt.enabled = bool(a.sgt)
  c.train.tokens = 64 * 8 * 40  # 40 steps of 8 sequences
  c.train.global_batch = 8
  c.train.peak_lr = 3e-3
  c.train.eval_tokens = 64 * 32
  c.train.eval_every = 20
  c.train.log_every = 10
  c.train.ckpt_every = 20
  c.data.vocab_size = m.vocab_size
  c.data.source = 'stdlib'  # the embedded default corpus: on every machine, no download
  c.data.stdlib_max_bytes = 1_000_000  # about 1 MB of source per split
  c.data.stdlib_tests = False  # the library proper, without its test suites
  return c
