"""Print a config's parameter count, FLOPs per token and training FLOPs (the paper's accounting).

  python -m structffn_jax.info --config configs/structured_ffn.py:model=xl,method=lowrank,fraction=63
  python -m structffn_jax.info --config configs/wide_structured.py:model=m,variant=ours --json

The model is built abstractly (`nnx.eval_shape`), so even xl costs no memory.
"""

from __future__ import annotations

import json
import sys

from structffn_jax import accounting, cli
from structffn_jax import config as config_lib


def table(config, acc: accounting.Accounting) -> str:
  m = config.model
  f = m.ffn
  structure = {'dense': 'dense', 'lowrank': f'LowRank R={f.rank}',
               'blockdense': f'BlockDense B={f.blocks} R={f.rank}',
               'blockshuffle': f'BlockShuffle B={f.blocks}'}[f.method]
  rows = [
      ('config', config.name),
      ('model', f'd={m.hidden_dim} ffn={m.ffn_dim} layers={m.num_layers} heads={m.num_heads}/'
                f'{m.num_kv_heads} attn={m.attn_dim} vocab={m.vocab_size} seq={m.seq_len}'),
      ('FFN structure', structure + (' (first block dense)' if m.first_layer_dense else '')),
      ('params total', f'{acc.params_total:,} ({accounting.human(acc.params_total)})'),
      ('params FFN', f'{acc.params_ffn:,} ({accounting.human(acc.params_ffn)})'),
      ('forward FLOPs/token', f'{acc.flops_per_token:,} ({acc.flops_per_token:.3e})'),
      ('steps', f'{acc.steps:,} x {config.train.global_batch} x {m.seq_len} tokens'),
      ('tokens', f'{acc.tokens:.4g}'),
      ('training FLOPs', f'{acc.train_flops:.3e}'),
  ]
  if abs(acc.run_flops - acc.train_flops) > 1e-9 * acc.train_flops:
    rows.append(('run FLOPs', f'{acc.run_flops:.3e} (the {acc.steps:,} whole steps the trainer '
                              f'counts; train.tokens is not a whole number of steps)'))
  if acc.params_guide:
    rows[5:5] = [('params guide (SGT)', f'{acc.params_guide:,} for {acc.guided_steps} steps, '
                                        f'{config.sgt.mode}, reduce_flop={config.sgt.reduce_flop}')]
  width = max(len(k) for k, _ in rows)
  return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)


def main(argv=None):
  parser = cli.parser(__doc__, 'structffn_jax.info')
  cli.add_config_flags(parser)
  parser.add_argument('--json', action='store_true',
                      help='print one JSON object instead of a table')
  args = cli.parse(parser, argv)
  try:
    config = config_lib.load(args.config, tuple(args.set))
  except config_lib.ConfigError as e:
    sys.exit(f'error: {e}')
  acc = accounting.account(config)
  if args.json:
    print(json.dumps({'config': config.name, **acc.as_dict()}))
  else:
    print(table(config, acc))


if __name__ == '__main__':
  main()
