r"""What starting from a dense model buys (docs/design.md §10): one dense source, converted to each
structure at 32% and 63% with each hand-over mode, then trained on one continued-training budget.

Argument: `method=<dense|lowrank|blockdense|blockshuffle>,fraction=<32|63>,
mode=<source|guided|projection|scratch|long>,seed=<1005|1006>,size=<cpu|s>`.
  source      the dense model, trained from scratch for `source_steps` (seed 1005 only).
  guided      converted: the nearest factors with the source's W as the self-guided guide,
              SGT over the first half of `steps` (at step 0 the function is the source's).
  projection  converted: the nearest factors alone.
  scratch     the structure's random init, the source's attention, embeddings and norms.
  long        the structure trained from scratch for source_steps + steps (no conversion).
  `method=dense,mode=projection` is the dense source continued on the same rows and schedule
  as every converted run: the reference for "the gap to dense that remains".
Structures of width d (FFN 4d): LowRank R = d/4 | d/2; BlockDense B = 2 with R = 2 round(d/6) |
2 round(d/3); BlockShuffle B = 4 | 2. The first block's FFN stays dense. A 512-piece vocabulary
so that the FFN carries most of the FLOPs (cpu: 59% of the dense model's forward FLOPs).
Rows and seeds: one shuffled row order (train.data_seed = 1005) for every run. The source reads
its first source_steps batches; a continued run of seed 1005 reads the next `steps` batches, and
of seed 1006 the `steps` after those, so no continued run sees the source's rows and the two seeds
read disjoint rows, the same for every structure and mode. train.seed (1005 | 1006) sets
scratch's init too.

  python launch/convert_study.py --root runs/convert_study --record results/convert_study/runs
  python launch/convert_study_report.py --root runs/convert_study --out results/convert_study

Decision rules, fixed before the runs (`structffn_jax/decisions.py`; the paired rule over the
2 seeds: reproduced when both seeds' gaps have the claimed sign and the mean exceeds 3 standard
errors, not reproduced when the opposite holds by the same margin, otherwise inconclusive).
Per structure (method, fraction), L(mode, t) the validation loss at step t:
  C1 the projection starts far ahead of scratch: L(scratch, 0) - L(projection, 0) > 0.
  C2 it stays ahead at equal steps: L(scratch, steps) - L(projection, steps) > 0.
  C3 guided loses less at the hand-over: L(projection, steps/2) - L(guided, steps/2) > 0, the
     first evaluation after α reaches 0; and guided's step-0 loss equals the source's to 1e-4.
  C4 guided ends ahead of projection: L(projection, steps) - L(guided, steps) > 0.
  C5 (reported) the gap to dense that remains: min over guided, projection of L(mode, steps)
     minus L(dense continued, steps), mean ± se; "within 0.05 nats" when mean + 3 se < 0.05.
  C6 (reported, one seed) the conversion buys the source's training: L(long, source_steps +
     steps) of LowRank against the converted LowRank runs at `steps`.
"""

from structffn_jax import config as config_lib
from structffn_jax.configs import common

SCALES = {
    'cpu': dict(hidden_dim=256, ffn_dim=1024, num_heads=4, num_layers=4, seq_len=128,
                global_batch=16, source_steps=1200, steps=300, peak_lr=2e-3, vocab_size=512),
    's': dict(hidden_dim=768, ffn_dim=3072, num_heads=12, num_layers=12, seq_len=1024,
              global_batch=64, source_steps=6000, steps=1500, peak_lr=6e-4, vocab_size=32000),
}
MODES = ('source', 'guided', 'projection', 'scratch', 'long')
SEEDS = (1005, 1006)
FRACTIONS = (32, 63)
STRUCTURES = tuple((m, f) for f in FRACTIONS for m in ('lowrank', 'blockdense', 'blockshuffle'))
CONVERT_MODES = ('guided', 'projection', 'scratch')
EVALS = 10  # evaluations per continued run: steps/2, the end of the guided phase, is one of them


def structures(width: int) -> dict:
  """{(method, fraction): model.ffn fields} at `width` (FFN 4·width)."""
  return {
      ('dense', 100): dict(method='dense', rank=0, blocks=1),
      ('lowrank', 32): dict(method='lowrank', rank=width // 4, blocks=1),
      ('lowrank', 63): dict(method='lowrank', rank=width // 2, blocks=1),
      ('blockdense', 32): dict(method='blockdense', rank=2 * round(width / 6), blocks=2),
      ('blockdense', 63): dict(method='blockdense', rank=2 * round(width / 3), blocks=2),
      ('blockshuffle', 32): dict(method='blockshuffle', rank=0, blocks=4),
      ('blockshuffle', 63): dict(method='blockshuffle', rank=0, blocks=2),
  }


def run_name(method: str, fraction: int, mode: str, seed: int, size: str = 'cpu') -> str:
  structure = 'dense' if method == 'dense' else f'{method}{fraction}'
  return f'convert-{size}-{structure}-{mode}-seed{seed}'


# For the runner (launch/convert_study.py), in order: the source, then each seed's converted runs
# (dense continued first), then the long reference. Each entry: (argument, needs conversion).
def _plan() -> list[tuple[str, bool]]:
  plan = [('method=dense,mode=source,seed=1005', False)]
  for seed in SEEDS:
    plan.append((f'method=dense,fraction=100,mode=projection,seed={seed}', True))
    plan += [(f'method={m},fraction={f},mode={h},seed={seed}', True)
             for m, f in STRUCTURES for h in CONVERT_MODES]
  plan.append(('method=lowrank,fraction=32,mode=long,seed=1005', False))
  return plan


PLAN = _plan()
VARIANTS = [arg for arg, _ in PLAN]


def get_config(arg=None):
  a = common.parse_arg(arg, method='lowrank', fraction=32, mode='guided', size='cpu',
                       seed=1005, sgt=0)
  s = common.choose('size', a.size, SCALES)
  common.choose('mode', a.mode, {m: m for m in MODES})
  common.choose('seed', a.seed, {x: x for x in SEEDS})
  fraction = 100 if a.method == 'dense' else a.fraction
  c = config_lib.base_config()
  c.name = run_name(a.method, fraction, a.mode, a.seed, a.size)
  m = c.model
  d = s['hidden_dim']
  m.vocab_size, m.seq_len = s['vocab_size'], s['seq_len']
  m.hidden_dim, m.ffn_dim, m.attn_dim = d, s['ffn_dim'], d
  m.num_layers, m.num_heads, m.num_kv_heads = s['num_layers'], s['num_heads'], s['num_heads']
  if a.size == 'cpu':
    m.dtype = 'float32'
    m.ffn.implementation = 'xla'
  m.ffn.update(common.choose('method,fraction', (a.method, fraction), structures(d)))
  steps = s['source_steps'] if a.mode == 'source' else s['steps']
  if a.mode == 'long':
    steps = s['source_steps'] + s['steps']
  c.train.tokens = steps * s['global_batch'] * s['seq_len']
  c.train.global_batch = s['global_batch']
  c.train.peak_lr = s['peak_lr']
  c.train.seed = a.seed
  c.train.data_seed = SEEDS[0]
  if a.mode not in ('source', 'long'):  # past the source's rows; the seeds' rows disjoint
    c.train.data_start = s['source_steps'] + SEEDS.index(a.seed) * s['steps']
  c.train.eval_tokens = 64 * s['seq_len'] * 8
  c.train.eval_every = max(steps // EVALS, 1)
  c.train.ckpt_every = max(steps // 4, 1)
  c.sgt.enabled = a.mode == 'guided' or bool(a.sgt)
  c.sgt.ratio = 0.5
  c.data.vocab_size = m.vocab_size
  c.data.source = 'stdlib'
  return c
