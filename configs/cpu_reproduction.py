r"""The paper's findings on 2 CPU cores, second design: compute-optimal budgets, tuned learning
rates, paired seeds, and a decision rule per claim fixed before any run.

Every rule below was written before the runs; `launch/cpu_reproduction_report.py` applies them
to the runs' numbers (the prose of RESULTS.md decides nothing).

Model and data (all studies)
  4-layer GPTs of width d in WIDTHS, FFN 4d, head width 16, context 64, float32, tied head;
  a 512-piece SentencePiece vocabulary trained on the embedded corpus (the Python standard
  library, tests included: 16.1M train tokens, 255k validation tokens), so that the FFN carries
  the largest share of the FLOPs (the report prints that share per width). Batch 64 x 64 tokens,
  AdamW with the paper's recipe (10% warm-up, cosine to 0.1 x peak, weight decay 0.1, clip 1.0).
  The first block's FFN stays dense (the paper's recipe).

Budget: compute-optimal. A width's runs read TOKENS_PER_PARAM = 20 tokens per parameter of the
  dense model of that width (every parameter, the tied embedding included), rounded down to whole
  batches; every structure at that width reads the same rows, in the same order, for a seed.

Seeds: SEEDS = (1, 2, 3). A seed sets both the init and the row order (`train.data_seed`), so
  structure and dense of one seed read identical rows: the quantity compared is the paired gap
  g_s = L(structure, s) - L(dense, s), both evaluated on the same EVAL_ROWS validation rows.

Learning rates: a probe per structure (study=probe) at PROBE_WIDTH, a quarter of the
  compute-optimal budget, seed 1, at PROBE_LRS. Each structure's main runs use the probe's best
  LR (lowest final validation loss), recorded in TUNED_LR; the report refuses a TUNED_LR that is
  not the probe's argmin. The LR study (Figure 3) sweeps LRs at the full budget independently.
  If a probe's best LR is at an edge of PROBE_LRS, the grid grows by a factor 2 past that edge
  until the best is inside it.

Decision rule (paired claims). For a claim that predicts sign p (+1 or -1) of a paired gap:
  with n >= 3 seeds, mean m and standard error se = sd / sqrt(n),
    reproduced      if sign(g_s) = p for every seed and p*m > 3*se;
    not reproduced  if sign(g_s) = -p for every seed and -p*m > 3*se;
    inconclusive    otherwise (the gap is within noise, or the seeds disagree).
  "Not reproduced" thus means the opposite effect was measured, not that the effect was out of
  reach.

The studies (argument `study=...`):

  probe     LR probe: `method=<dense|lowrank|blockdense|blockshuffle>,fraction=<32|63>,lr=X`.
  table1    Table 1 at TABLE1_WIDTHS: `width=W,method=...,fraction=32|63,seed=S` for dense,
            LowRank/BlockDense/BlockShuffle at 32% and LowRank at 63%. Claims, per width:
              T1a dense best: g = L(structure) - L(dense) > 0, per structure;
              T1b 63% closer: L(LowRank 32%) - L(LowRank 63%) > 0;
              T1c ordering at 32%: L(BlockShuffle) - L(LowRank) > 0,
                  L(BlockShuffle) - L(BlockDense) > 0, L(BlockDense) - L(LowRank) > 0
                  (the paper: 13.55 / 13.74 / 13.81 PPL).
            The report also gives the mean paired gap along training (8 evaluations per run)
            and the first evaluation after which its sign no longer changes.
  scaling   Figure 1a: dense and the three 32% structures at every width of WIDTHS, each
            compute-optimal for its width (tokens grow with size), 3 seeds (table1's runs are
            reused at its widths). Fit L = a (C/1e12)^-b + c per structure, one c shared, and a
            bootstrap over seeds (B = 2000 resamples, each point's seed drawn at random).
              F1 structured curves are steeper: db = b(structure) - b(dense) > 0. Rule: the
                 bootstrap's se of db; reproduced if db > 3 se, not reproduced if db < -3 se,
                 otherwise inconclusive (per structure).
              F1' the gap narrows with size: the paired gap at the largest width minus the
                 gap at the smallest width < 0, with the paired rule above (per structure).
  lr        Figure 3 at LR_WIDTH: `variant=<dense|lowrank|lowrank_sgt>,lr=X` at LR_GRID,
            full budget, seed 1. LowRank 32%; SGT fixedstep over the first half. A spike: a
            step whose loss exceeds the minimum of the 8 steps before it by > 0.5 nats
            (studies.count_spikes); a diverged run counts one more spike.
              F3a LowRank spikes more: over the LRs at which dense does not diverge,
                  reproduced if LowRank's spikes total >= dense's + 2 and LowRank has at
                  least as many as dense at every LR; not reproduced if LowRank's total
                  <= dense's; inconclusive otherwise.
              F3b SGT removes them: needs LowRank's total >= 2 (otherwise inconclusive:
                  nothing to remove); reproduced if SGT's total <= LowRank's total / 2 and
                  SGT has at most LowRank's count at every LR; not reproduced if SGT's
                  total >= LowRank's; inconclusive otherwise.
            Added after the main runs, with no claim: `variant=lowrank63` (LowRank 63%) at
            LR_CHECK. The main runs showed the probe's LRs (smallest width, quarter budget)
            below the full-budget optimum at this width; this row says how much of T1b's
            outcome (63% against 32%) the LRs explain. Reported as measured, one seed.
  sgt       Tables 3, 4, 10 at SGT_WIDTH, LowRank 32%, 3 seeds, its tuned LR:
            `variant=<fixedstep|fixedflop|more_tokens>,seed=S`; plain LowRank and dense are
            table1's (or scaling's) runs of the same width and seed. fixedstep: guided over
            the first half of the same steps; fixedflop: reduce_flop, G/S chosen so that the
            run costs dense training's FLOPs, G + S steps; more_tokens: plain LowRank on the
            tokens that cost dense's FLOPs. The guided phase lasts at least 2x the warm-up.
              S1 fixedstep helps at equal steps: L(plain) - L(fixedstep) > 0;
              S2 SGT beats more tokens at equal FLOPs: L(more_tokens) - L(fixedflop) > 0;
              S3 (reported, no claim) L(fixedflop) - L(dense) at equal FLOPs.
  wide      Table 2 at WIDE_WIDTH, head width 16, 3 seeds:
            `variant=<dense|gqa|ours_same_tokens|ours>,seed=S`. gqa: half the kv heads and the
            FFN widened 1.1875x; ours: LowRank (R = d/2) FFN widened 1.1875x, half the attention
            width, GQA, on the tokens that cost dense's FLOPs; ours_same_tokens: the same model
            on dense's tokens, which splits the gain into the model's part and the tokens' part.
              W1 ours beats dense at equal FLOPs: L(dense) - L(ours) > 0;
              W2 (reported) the gain's split: L(dense) - L(ours_same_tokens) and
                 L(ours_same_tokens) - L(ours).

Initial weight norms: the report records, per width and structure, the Frobenius norm of every
structured FFN matrix at init (as its dense product) beside the dense init's, and the ratio.

  python launch/sweep.py configs/cpu_reproduction.py --match study=probe --run --root R
  python launch/sweep.py configs/cpu_reproduction.py --run --summary --root R --record DIR
  python launch/cpu_reproduction_report.py --root R --record DIR --out results/cpu_repro2

RESULTS.md gives each study's command, wall and CPU time, tokens, tables and verdicts.
"""

from structffn_jax import accounting
from structffn_jax import config as config_lib
from structffn_jax.configs import common

DATA_DIR = 'runs/cpu_repro2/data'  # shared by every run (tokenized once)
VOCAB = 512
SEQ_LEN = 64
BATCH = 64
LAYERS = 4
HEAD_DIM = 16
TOKENS_PER_PARAM = 20
EVAL_ROWS = 512  # validation rows per evaluation (32,768 tokens; the same rows for every run)
EVALS_PER_RUN = 8

WIDTHS = (16, 32, 48, 64)  # Figure 1a's sizes
TABLE1_WIDTHS = (48, 64)
PROBE_WIDTH = 48
LR_WIDTH = 48
SGT_WIDTH = 48
WIDE_WIDTH = 64
SEEDS = (1, 2, 3)
PROBE_LRS = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)
# LRs added by the edge rule (the best of PROBE_LRS at the grid's top edge), per structure.
PROBE_EXTENDED = {('lowrank', 32): (3.2e-2,), ('blockshuffle', 32): (3.2e-2,)}
PROBE_BUDGET = 0.25  # of the compute-optimal tokens
LR_GRID = (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2)  # extended x2 while dense still trains
LR_CHECK = (8e-3, 1.6e-2, 3.2e-2, 6.4e-2)  # LowRank 63% at the full budget (a diagnostic)
# Each structure's best probe LR, {(method, fraction): lr}; filled in from the probe's results
# (launch/cpu_reproduction_report.py checks that each is the probe's argmin).
TUNED_LR: dict = {('dense', 100): 8e-3, ('lowrank', 32): 1.6e-2, ('blockdense', 32): 8e-3,
                  ('blockshuffle', 32): 1.6e-2, ('lowrank', 63): 8e-3}

_BATCH_TOKENS = BATCH * SEQ_LEN
STRUCTURES_MAIN = (('dense', 100), ('lowrank', 32), ('blockdense', 32), ('blockshuffle', 32),
                   ('lowrank', 63))
STRUCTURES_SCALING = STRUCTURES_MAIN[:4]


def structures(width: int) -> dict:
  """{(method, fraction): model.ffn fields} at `width` (FFN 4d): LowRank R = d/2 | d/4,
  BlockShuffle B = 2 | 4, BlockDense B = 2 with R = 2 * round(d / 6) (the paper's B = 2
  setting, R = d/3 for 32%, rounded to a whole number per block; its share is 29-35%)."""
  return {
      ('dense', 100): dict(method='dense', rank=0, blocks=1),
      ('lowrank', 63): dict(method='lowrank', rank=width // 2, blocks=1),
      ('lowrank', 32): dict(method='lowrank', rank=width // 4, blocks=1),
      ('blockshuffle', 63): dict(method='blockshuffle', rank=0, blocks=2),
      ('blockshuffle', 32): dict(method='blockshuffle', rank=0, blocks=4),
      ('blockdense', 32): dict(method='blockdense', rank=2 * round(width / 6), blocks=2),
  }


def _model(c, width: int):
  m = c.model
  m.vocab_size = VOCAB
  m.seq_len = SEQ_LEN
  m.hidden_dim, m.ffn_dim, m.attn_dim = width, 4 * width, width
  m.num_layers = LAYERS
  m.num_heads = m.num_kv_heads = width // HEAD_DIM
  m.dtype = 'float32'  # CPU
  m.ffn.implementation = 'xla'


def compute_optimal_tokens(width: int) -> int:
  """TOKENS_PER_PARAM x the parameters of the dense model of `width`, in whole batches."""
  c = config_lib.base_config()
  _model(c, width)
  params = accounting.account(c).params_total
  return TOKENS_PER_PARAM * params // _BATCH_TOKENS * _BATCH_TOKENS


def _train(c, tokens: int, seed: int, lr: float):
  t = c.train
  t.tokens = tokens
  t.global_batch = BATCH
  t.peak_lr = lr
  t.seed = seed  # init and reduce_flop draws
  t.data_seed = seed  # the row order: one per seed, shared by every structure of that seed
  t.data_start = 0
  steps = max(1, int(tokens // _BATCH_TOKENS))
  t.eval_every = max(steps // EVALS_PER_RUN, 1)
  t.eval_tokens = EVAL_ROWS * SEQ_LEN
  t.log_every = 25  # the progress line; metrics.jsonl holds every step's loss
  t.ckpt_every = max(steps // 4, 25)
  t.keep_ckpts = 1
  c.data.source = 'stdlib'  # the embedded corpus, whole
  c.data.vocab_size = VOCAB
  c.data.data_dir = DATA_DIR


def tuned_lr(method: str, fraction: int) -> float:
  key = (method, 100 if method == 'dense' else fraction)
  if key not in TUNED_LR:
    raise config_lib.ConfigError(
        f'study: no tuned learning rate for {key[0]} {key[1]}% yet; run the probe first '
        '(launch/sweep.py configs/cpu_reproduction.py --match study=probe --run) and fill '
        'TUNED_LR in configs/cpu_reproduction.py with its best LRs')
  return TUNED_LR[key]


def _dense_flops_per_token(config) -> int:
  """Forward FLOPs per token of `config`'s model with a dense FFN (the paper's accounting)."""
  dense = config.copy_and_resolve_references()
  dense.model.ffn.update(method='dense', rank=0, blocks=1)
  dense.sgt.enabled = False
  return accounting.account(dense).flops_per_token


def sgt_ratio_matching_dense(config) -> float:
  """The fixedflop ratio G/S at which a reduce_flop self-guided run costs what dense training
  costs: S x F_dense = S x F_struct + G x (F_struct + ½ F_guide), with F per token."""
  guided = config.copy_and_resolve_references()
  guided.sgt.update(enabled=True, reduce_flop=True)
  acc = accounting.account(guided)
  return (_dense_flops_per_token(config) - acc.flops_per_token) / (
      acc.flops_per_token + 0.5 * acc.guide_flops_per_token)


def _tokens_at_flops(tokens: float, flops_per_token: float, target_per_token: float) -> int:
  """The whole-batch token count that spends `tokens x target_per_token` FLOPs."""
  return round(tokens * target_per_token / flops_per_token / _BATCH_TOKENS) * _BATCH_TOKENS


def _structured_run(width: int, method: str, fraction: int, seed: int, tokens: int, lr: float):
  c = config_lib.base_config()
  _model(c, width)
  fraction = 100 if method == 'dense' else fraction
  c.model.ffn.update(common.choose('method,fraction', (method, fraction), structures(width)))
  _train(c, tokens, seed, lr)
  return c, fraction


def _check_guided_phase(c):
  """The guided phase must outlast the warm-up by a clear margin (at least 2x)."""
  acc = accounting.account(c)
  warmup = max(1, round(c.train.warmup_frac * acc.steps))
  if acc.guided_steps < 2 * warmup:
    raise config_lib.ConfigError(f'{c.name}: {acc.guided_steps} guided steps end within 2x '
                                 f'the {warmup}-step warm-up; lengthen sgt.ratio')


def get_config(arg=None):
  a = common.parse_arg(arg, study='table1', width=48, method='dense', fraction=32, seed=1,
                       variant='', lr=0.0)
  common.choose('study', a.study, dict.fromkeys(('probe', 'table1', 'scaling', 'lr', 'sgt',
                                                 'wide')))
  if a.study == 'probe':
    lr = a.lr or PROBE_LRS[0]
    tokens = int(PROBE_BUDGET * compute_optimal_tokens(PROBE_WIDTH)) // _BATCH_TOKENS \
        * _BATCH_TOKENS
    c, fraction = _structured_run(PROBE_WIDTH, a.method, a.fraction, 1, tokens, lr)
    c.name = f'probe-{a.method}' + (f'-{fraction}' if a.method != 'dense' else '') + f'-lr{lr:g}'
    return c
  if a.study in ('table1', 'scaling'):
    widths = TABLE1_WIDTHS if a.study == 'table1' else WIDTHS
    common.choose('width', a.width, dict.fromkeys(widths))
    common.choose('seed', a.seed, dict.fromkeys(SEEDS))
    c, fraction = _structured_run(a.width, a.method, a.fraction, a.seed,
                                  compute_optimal_tokens(a.width), 0.0)
    c.train.peak_lr = a.lr or tuned_lr(a.method, fraction)
    # One name for one run: table1 and scaling share their runs at the common widths.
    c.name = f'w{a.width}-{a.method}' + (f'-{fraction}' if a.method != 'dense' else '') \
        + f'-seed{a.seed}'
    return c
  if a.study == 'lr':
    variant = a.variant or 'dense'
    common.choose('variant', variant, dict.fromkeys(('dense', 'lowrank', 'lowrank_sgt',
                                                     'lowrank63')))
    lr = a.lr or LR_GRID[0]
    method = 'dense' if variant == 'dense' else 'lowrank'
    fraction = 63 if variant == 'lowrank63' else 32
    c, _ = _structured_run(LR_WIDTH, method, fraction, 1, compute_optimal_tokens(LR_WIDTH), lr)
    c.sgt.update(enabled=variant == 'lowrank_sgt', mode='fixedstep', ratio=0.5)
    c.name = f'lr-{variant}-lr{lr:g}'
    if c.sgt.enabled:
      _check_guided_phase(c)
    return c
  if a.study == 'sgt':
    common.choose('seed', a.seed, dict.fromkeys(SEEDS))
    variant = a.variant or 'fixedstep'
    common.choose('variant', variant, dict.fromkeys(('fixedstep', 'fixedflop',
                                                     'more_tokens')))
    tokens = compute_optimal_tokens(SGT_WIDTH)
    c, _ = _structured_run(SGT_WIDTH, 'lowrank', 32, a.seed, tokens, tuned_lr('lowrank', 32))
    if variant == 'fixedstep':
      c.sgt.update(enabled=True, mode='fixedstep', ratio=0.5)
    elif variant == 'fixedflop':
      c.sgt.update(enabled=True, mode='fixedflop', ratio=round(sgt_ratio_matching_dense(c), 3),
                   reduce_flop=True)
    else:  # dense training's FLOPs spent on more tokens instead
      c.train.tokens = _tokens_at_flops(tokens, accounting.account(c).flops_per_token,
                                        _dense_flops_per_token(c))
    c.name = f'sgt-w{SGT_WIDTH}-lowrank-32-{variant}-seed{a.seed}'
    if c.sgt.enabled:
      _check_guided_phase(c)
    return c
  # wide
  common.choose('seed', a.seed, dict.fromkeys(SEEDS))
  variant = a.variant or 'dense'
  common.choose('variant', variant, dict.fromkeys(('dense', 'gqa', 'ours_same_tokens',
                                                   'ours')))
  width = WIDE_WIDTH
  tokens = compute_optimal_tokens(width)
  # gqa trains with dense's LR, ours with LowRank 63%'s (its rank is d/2, as ours' is).
  lr = tuned_lr('dense', 100) if variant in ('dense', 'gqa') else tuned_lr('lowrank', 63)
  c, _ = _structured_run(width, 'dense', 100, a.seed, tokens, lr)
  m = c.model
  wide_ffn = round(4 * width * 4864 / 4096 / 16) * 16  # Table 2's FFN widening, 1.1875x
  if variant == 'gqa':
    m.num_kv_heads, m.ffn_dim = m.num_heads // 2, wide_ffn
  elif variant != 'dense':
    m.ffn_dim, m.attn_dim = wide_ffn, width // 2
    m.num_heads = m.attn_dim // HEAD_DIM
    m.num_kv_heads = m.num_heads // 2
    m.ffn.update(method='lowrank', rank=width // 2, blocks=1)
    if variant == 'ours':
      dense = get_config(f'study=wide,variant=dense,seed={a.seed}')
      c.train.tokens = _tokens_at_flops(tokens, accounting.account(c).flops_per_token,
                                        accounting.account(dense).flops_per_token)
  c.name = f'wide-w{width}-{variant}-seed{a.seed}'
  return c


def _variants() -> list[str]:
  probe = [f'study=probe,method={m},fraction={f},lr={lr:g}' for m, f in STRUCTURES_MAIN
           for lr in PROBE_LRS + PROBE_EXTENDED.get((m, f), ())]
  if len(TUNED_LR) < len(STRUCTURES_MAIN):
    return probe  # the main runs need the probe's learning rates

  def runs(study, width, structures, seed):
    return [f'study={study},width={width},method={m},fraction={f},seed={seed}'
            for m, f in structures]

  main = []
  for seed in SEEDS:  # cheapest evidence first: every study's first seed, then the others
    main += [r for w in WIDTHS if w not in TABLE1_WIDTHS
             for r in runs('scaling', w, STRUCTURES_SCALING, seed)]
    main += runs('table1', TABLE1_WIDTHS[0], STRUCTURES_MAIN, seed)
    main += [f'study=sgt,variant={v},seed={seed}' for v in ('fixedstep', 'fixedflop',
                                                             'more_tokens')]
    if seed == SEEDS[0]:
      main += [f'study=lr,variant={v},lr={lr:g}' for lr in LR_GRID
               for v in ('dense', 'lowrank', 'lowrank_sgt')]
    main += runs('table1', TABLE1_WIDTHS[1], STRUCTURES_MAIN, seed)
    main += [f'study=wide,variant={v},seed={seed}' for v in ('dense', 'gqa', 'ours_same_tokens',
                                                              'ours')]
  check = [f'study=lr,variant=lowrank63,lr={lr:g}' for lr in LR_CHECK]  # after the main runs
  return probe + main + check


VARIANTS = _variants()
