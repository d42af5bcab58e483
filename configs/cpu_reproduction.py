r"""The paper's findings in miniature, on 2 CPU cores: four studies over 4-layer GPTs of width 64-128.

Every run reads the embedded corpus (the whole standard library's `.py` text, ~11M tokens at
vocabulary 4096, context 128) from one shared data directory, `runs/cpu_repro/data`. No run reads
a row twice, and the studies read disjoint rows: each study starts at its own batch offset
(`train.data_start`) of the one shuffled order, and every run of one study and width sees the
same rows. Runs are float32, batch 32 x 128 tokens, AdamW with the paper's recipe (10% warm-up,
cosine to 0.1 x peak, weight decay 0.1, clip 1.0); nothing was tuned to agree with the paper.

Argument: `study=<scaling|lr|sgt|wide>` plus the study's own keys:

  scaling  Table 1 / Figure 1a: `width=<64|96|128>,method=<dense|lowrank|blockdense|
           blockshuffle>,fraction=<63|32>,seed=N`, 128 steps (0.5M tokens) at every width.
  lr       Figure 3: `variant=<dense|lowrank|lowrank_sgt>,lr=X` at width 64, 32% LowRank,
           SGT fixedstep over the first half.
  sgt      Tables 3, 4, 10: `method=<lowrank|blockshuffle>,variant=<plain|fixedstep|fixedflop|
           more_tokens>` at width 64, 32%. `fixedflop` uses reduce_flop and the ratio that
           matches dense training FLOPs (`sgt_ratio_matching_dense`); `more_tokens` is plain
           structured training with the extra tokens that reach the same FLOPs; `variant=dense`
           is the reference.
  wide     Table 2: `variant=<dense|gqa|ours>` at width 128: ours = wider LowRank FFN + GQA with
           half the attention width, trained on the tokens that match dense training FLOPs.

  python launch/sweep.py configs/cpu_reproduction.py --grid study=scaling --run --summary
  python -m structffn_jax.scaling runs/cpu_repro/scaling-* --out results/cpu_repro/scaling.png

RESULTS.md gives each study's command, wall time, tokens, table and verdict.
"""

from structffn_jax import accounting
from structffn_jax import config as config_lib

DATA_DIR = 'runs/cpu_repro/data'  # shared by every run of every study (tokenized once)
SEQ_LEN = 128
BATCH = 32
# Tokens of one scaling run per width (every method of a width sees the same rows).
TOKENS = {64: 524_288, 96: 524_288, 128: 524_288}
# The width of the lr, sgt and wide studies, and their token budgets.
STUDY_WIDTH = {'lr': 64, 'sgt': 64, 'wide': 128}
STUDY_TOKENS = {'lr': 524_288, 'sgt': 524_288, 'wide': 524_288}
# Rows are read in one fixed shuffled order; each study owns a window of it (in batches of
# BATCH x SEQ_LEN tokens), so the studies' rows never overlap. tests/test_cpu_reproduction.py
# checks that every variant stays inside its study's window.
_BATCH_TOKENS = BATCH * SEQ_LEN
WINDOWS = {'scaling': 256, 'scaling_reseed': 128, 'lr': 128, 'sgt': 256, 'wide': 256}
DATA_START = {study: sum(list(WINDOWS.values())[:i]) for i, study in enumerate(WINDOWS)}
PEAK_LR = 2e-3
LRS = (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)


def structures(width: int) -> dict:
  """{(method, fraction): model.ffn fields} at `width` (ffn = 4 x width), the paper's recipe:
  LowRank R = d/2 | d/4, BlockShuffle B = 2 | 4, BlockDense B = 4 with R = 3d/4 | 3d/8."""
  out = {('dense', 100): dict(method='dense', rank=0, blocks=1)}
  for fraction, rank, blocks, bd_rank in ((63, width // 2, 2, 3 * width // 4),
                                          (32, width // 4, 4, 3 * width // 8)):
    out[('lowrank', fraction)] = dict(method='lowrank', rank=rank, blocks=1)
    out[('blockshuffle', fraction)] = dict(method='blockshuffle', rank=0, blocks=blocks)
    out[('blockdense', fraction)] = dict(method='blockdense', rank=bd_rank, blocks=4)
  return out


def _scaling(width: int, seed: int = 1005, fractions=(63, 32)) -> list[str]:
  tail = '' if seed == 1005 else f',seed={seed}'
  return [f'study=scaling,width={width},method=dense{tail}'] + [
      f'study=scaling,width={width},method={m},fraction={f}{tail}'
      for f in fractions for m in ('lowrank', 'blockdense', 'blockshuffle')]


# In the order a sweep runs them, cheapest evidence first: the smallest width (a second seed for
# dense and the 32% models), the lr study, the middle width, the sgt and wide studies (GQA's
# baseline last), and the largest width, its 63% models last of all.
VARIANTS = (
    _scaling(64) + _scaling(64, seed=2, fractions=(32,))
    + [f'study=lr,variant={v},lr={lr:g}' for lr in LRS for v in ('dense', 'lowrank', 'lowrank_sgt')]
    + _scaling(96)
    + ['study=sgt,method=dense,variant=plain']
    + [f'study=sgt,method={m},variant={v}' for m in ('lowrank', 'blockshuffle')
       for v in ('plain', 'fixedstep', 'fixedflop', 'more_tokens')]
    + [f'study=wide,variant={v}' for v in ('dense', 'ours', 'gqa')]
    + _scaling(128, fractions=(32, 63))
)


def _model(c, width: int):
  m = c.model
  m.vocab_size = 4096  # SentencePiece vocabulary trained on the corpus
  m.seq_len = SEQ_LEN  # context
  m.hidden_dim, m.ffn_dim, m.attn_dim = width, 4 * width, width  # width, FFN width, attention
  m.num_layers = 4  # blocks
  m.num_heads = m.num_kv_heads = width // 32  # head width 32
  m.dtype = 'float32'  # CPU
  m.ffn.implementation = 'xla'


def _train(c, study: str, tokens: float, seed: int = 1005, lr: float = PEAK_LR):
  t = c.train
  t.tokens = tokens  # baseline token budget S x batch x context
  t.global_batch = BATCH  # sequences per step
  t.peak_lr = lr  # peak learning rate
  t.seed = seed  # init and reduce_flop draws
  t.data_seed = 1005  # one row order for every run; studies take disjoint windows of it
  t.data_start = DATA_START[study]  # this study's first batch of the shared row order
  steps = int(tokens // _BATCH_TOKENS)
  t.eval_every = max(steps // 4, 1)  # 4 validation points per run
  t.eval_tokens = 512 * SEQ_LEN  # 512 of the 1,165 validation rows
  t.log_every = 8  # loss every 8 steps: the spike counter's resolution
  t.ckpt_every = 64  # resumable at most 64 steps back
  t.keep_ckpts = 1
  c.data.source = 'stdlib'  # the embedded corpus, whole
  c.data.vocab_size = c.model.vocab_size
  c.data.data_dir = DATA_DIR


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


def get_config(arg=None):
  a = config_lib.parse_arg(arg, study='scaling', width=128, method='dense', fraction=32, seed=1005,
                           variant='', lr=PEAK_LR)
  config_lib.choose('study', a.study, dict.fromkeys(('scaling', *STUDY_WIDTH)))
  c = config_lib.base_config()
  if a.study == 'scaling':
    config_lib.choose('width', a.width, TOKENS)
    _model(c, a.width)
    fraction = 100 if a.method == 'dense' else a.fraction
    c.model.ffn.update(config_lib.choose('method,fraction', (a.method, fraction),
                                         structures(a.width)))
    # Another seed also reads other rows (its own window): the spread is init and data noise.
    _train(c, 'scaling' if a.seed == 1005 else 'scaling_reseed', TOKENS[a.width], seed=a.seed)
    if a.seed != 1005 and TOKENS[a.width] > WINDOWS['scaling_reseed'] * _BATCH_TOKENS:
      raise config_lib.ConfigError(f'seed={a.seed}: other seeds run at width 64 only (their row '
                                   'window holds 128 batches)')
    c.name = f'scaling-w{a.width}-{a.method}' + (f'-{fraction}' if a.method != 'dense' else '') \
        + (f'-seed{a.seed}' if a.seed != 1005 else '')
    return c
  width = STUDY_WIDTH[a.study]
  _model(c, width)
  _train(c, a.study, STUDY_TOKENS[a.study], lr=a.lr)
  if a.study == 'lr':
    variant = a.variant or 'dense'
    config_lib.choose('variant', variant, dict.fromkeys(('dense', 'lowrank', 'lowrank_sgt')))
    if variant != 'dense':
      c.model.ffn.update(structures(width)[('lowrank', 32)])
    c.sgt.enabled = variant == 'lowrank_sgt'  # fixedstep, first half
    c.name = f'lr-{variant}-lr{a.lr:g}'
    return c
  if a.study == 'sgt':
    config_lib.choose('method', a.method, dict.fromkeys(('dense', 'lowrank', 'blockshuffle')))
    variant = a.variant or 'plain'
    config_lib.choose('variant', variant,
                      dict.fromkeys(('plain', 'fixedstep', 'fixedflop', 'more_tokens')))
    if a.method != 'dense':
      c.model.ffn.update(structures(width)[(a.method, 32)])
      ratio = sgt_ratio_matching_dense(c)
      if variant == 'fixedstep':
        c.sgt.update(enabled=True, mode='fixedstep', ratio=0.5)
      elif variant == 'fixedflop':
        c.sgt.update(enabled=True, mode='fixedflop', ratio=round(ratio, 3), reduce_flop=True)
      elif variant == 'more_tokens':  # dense training's FLOPs spent on more tokens instead
        c.train.tokens = _tokens_at_flops(STUDY_TOKENS['sgt'], accounting.account(c).flops_per_token,
                                          _dense_flops_per_token(c))
    c.name = f'sgt-{a.method}-{variant}'
    return c
  # wide
  variant = a.variant or 'dense'
  config_lib.choose('variant', variant, dict.fromkeys(('dense', 'gqa', 'ours')))
  m = c.model
  wide_ffn = round(4 * width * 4864 / 4096 / 32) * 32  # Table 2's FFN widening, 1.1875x
  if variant == 'gqa':
    m.num_kv_heads, m.ffn_dim = m.num_heads // 2, wide_ffn
  elif variant == 'ours':
    m.ffn_dim, m.attn_dim = wide_ffn, width // 2
    m.num_heads, m.num_kv_heads = width // 64, width // 128
    m.ffn.update(method='lowrank', rank=width // 2, blocks=1)
    dense = get_config('study=wide,variant=dense')
    c.train.tokens = _tokens_at_flops(STUDY_TOKENS['wide'], accounting.account(c).flops_per_token,
                                      accounting.account(dense).flops_per_token)
  c.name = f'wide-{variant}'
  return c
