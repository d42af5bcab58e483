r"""What starting from a dense model buys (docs/design.md §10): a dense source, converted to each
structure with each hand-over mode, then trained on a short continued-training budget.

Argument: `method=<dense|lowrank|blockdense|blockshuffle>,mode=<source|guided|projection|scratch>,
size=<cpu|s>`. `mode=source` is the dense model itself, trained from scratch for `source_steps`;
the other modes are the converted runs, each trained for `steps` more (SGT over the first half in
`guided`; `scratch` keeps `sgt` off unless `sgt=1`). The 32% structures of the width: LowRank
R = d/4, BlockDense B = 2 with R ≈ d/3 (`bd_rank`), BlockShuffle B = 4; the first block dense.
Seeds: train.seed 1005 everywhere.

  # 0. the dense source (cpu: width 256, 4 layers, context 128, 1200 steps of 16 sequences)
  python -m structffn_jax.train --config configs/convert_study.py:method=dense,mode=source \
      --workdir runs/convert-source
  # 1. each variant: convert, then train
  for m in lowrank blockdense blockshuffle; do for h in guided projection scratch; do
    python -m structffn_jax.convert --from runs/convert-source \
        --config configs/convert_study.py:method=$m,mode=$h --mode $h \
        --workdir runs/convert-$m-$h
    python -m structffn_jax.train --config runs/convert-$m-$h/config.py \
        --workdir runs/convert-$m-$h
  done; done
  # 2. the reference: the same structure trained from scratch for source_steps + steps
  python -m structffn_jax.train --config configs/convert_study.py:method=lowrank,mode=long \
      --workdir runs/convert-lowrank-long

Measure for each run: validation loss at step 0 (the converted function), at steps/4 and at the
end, wall time, tokens (metrics.jsonl, `python -m structffn_jax.evaluate`). Decision rules
(write them in RESULTS.md with the numbers):
  - guided is worth it when its step-0 loss equals the source's (to float rounding: it must) and
    its final loss is below projection's by more than the seed noise (two seeds, 1005 and 1006).
  - projection beats scratch when its final loss is lower at equal steps; the gap at step
    steps/4 says how much of the source survives the projection.
  - a converted run "buys" the source's training when it ends at or below the `long` run (the
    structure trained from scratch on source_steps + steps) with `steps` steps only.
  - a structure is recommended for conversion when guided or projection ends within 0.05 nats
    of the dense source trained `steps` further (the `mode=source` run resumed).
"""

from structffn_jax import config as config_lib

SCALES = {
    'cpu': dict(hidden_dim=256, ffn_dim=1024, num_heads=4, num_layers=4, seq_len=128,
                global_batch=16, source_steps=1200, steps=300, peak_lr=2e-3, vocab_size=4096,
                bd_rank=88),
    's': dict(hidden_dim=768, ffn_dim=3072, num_heads=12, num_layers=12, seq_len=1024,
              global_batch=64, source_steps=6000, steps=1500, peak_lr=6e-4, vocab_size=32000,
              bd_rank=256),
}
MODES = ('source', 'guided', 'projection', 'scratch', 'long')

# For `launch/sweep.py`: the converted runs (each needs `convert` first, see above).
VARIANTS = [f'method={m},mode={h}' for m in ('lowrank', 'blockdense', 'blockshuffle')
            for h in ('guided', 'projection', 'scratch')]


def get_config(arg=None):
  a = config_lib.parse_arg(arg, method='lowrank', mode='guided', size='cpu', sgt=0)
  s = config_lib.choose('size', a.size, SCALES)
  config_lib.choose('mode', a.mode, {m: m for m in MODES})
  c = config_lib.base_config()
  c.name = f'convert-{a.size}-{a.method}-{a.mode}'
  m = c.model
  d = s['hidden_dim']
  m.vocab_size, m.seq_len = s['vocab_size'], s['seq_len']
  m.hidden_dim, m.ffn_dim, m.attn_dim = d, s['ffn_dim'], d
  m.num_layers, m.num_heads, m.num_kv_heads = s['num_layers'], s['num_heads'], s['num_heads']
  if a.size == 'cpu':
    m.dtype = 'float32'
  structures = config_lib.ffn_structures(rank=d // 4, blockdense=(2, s['bd_rank']),
                                         blockshuffle_blocks=4)
  m.ffn.update(config_lib.choose('method', a.method, structures))
  steps = s['source_steps'] if a.mode == 'source' else s['steps']
  if a.mode == 'long':
    steps = s['source_steps'] + s['steps']
  c.train.tokens = steps * s['global_batch'] * s['seq_len']
  c.train.global_batch = s['global_batch']
  c.train.peak_lr = s['peak_lr']
  c.train.eval_tokens = 64 * s['seq_len'] * 8
  c.train.eval_every = max(steps // 8, 1)
  c.train.ckpt_every = max(steps // 4, 1)
  c.sgt.enabled = a.mode == 'guided' or bool(a.sgt)
  c.sgt.ratio = 0.5
  c.data.vocab_size = m.vocab_size
  c.data.source = 'stdlib'
  return c
