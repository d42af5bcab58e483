"""Quickstart: a small LowRank GPT trained on the embedded default corpus, on 2 CPU cores.

The corpus is the running Python's own standard library source (present on every machine, no
network), split deterministically into train / validation / test files. About 1.5 minutes on 2 idle
CPU cores; the validation loss falls from 9.0 (uniform over 8192 tokens) to about 3.4.

  python -m structffn_jax.train --config configs/quickstart.py --workdir runs/quickstart

Argument (optional): `method=<dense|lowrank|blockdense|blockshuffle>,sgt=<0|1>`; on a GPU add
`--set model.dtype=bfloat16`.
"""

from structffn_jax import config as config_lib
from structffn_jax.configs import common

# 32% of the dense FFN's parameters
STRUCTURES = common.ffn_structures(rank=64, blockdense=(2, 64), blockshuffle_blocks=4)


def get_config(arg=None):
  a = common.parse_arg(arg, method='lowrank', sgt=0)
  c = config_lib.base_config()
  c.name = f'quickstart-{a.method}' + ('-sgt' if a.sgt else '')
  m = c.model
  m.vocab_size = 8192  # SentencePiece vocabulary trained on the corpus
  m.seq_len = 128  # context
  m.hidden_dim, m.ffn_dim, m.attn_dim = 256, 1024, 256  # width, FFN width, attention width
  m.num_layers, m.num_heads, m.num_kv_heads = 4, 4, 4  # blocks, query heads, kv heads
  m.dtype = 'float32'  # CPU-friendly; bfloat16 on accelerators
  m.ffn.update(common.choose('method', a.method, STRUCTURES))
  c.sgt.enabled = bool(a.sgt)  # self-guided over the first half (fixedstep)
  c.train.tokens = 300 * 16 * 128  # 300 steps of 16 sequences
  c.train.global_batch = 16  # sequences per step
  c.train.peak_lr = 2e-3  # small models take a larger learning rate
  c.train.eval_every = 50  # validation every 50 steps
  c.train.eval_tokens = 64 * 128  # 64 validation sequences
  c.train.log_every = 10  # progress line every 10 steps
  c.train.ckpt_every = 100  # checkpoint every 100 steps
  c.data.source = 'stdlib'  # the embedded default corpus
  c.data.stdlib_max_bytes = 8_000_000  # an 8 MB sample per split keeps tokenizing quick
  c.data.stdlib_tests = False  # the library proper, without its test suites
  c.data.vocab_size = m.vocab_size  # tokenizer size = model vocabulary
  return c
