"""Decoding speed: the paper's Figure 5 (FFN latency at small token counts) and Table 2 throughput.

  python -m structffn_jax.bench.decode --part ffn      [--widths 1536,2048] [--tokens 1,2,...]
  python -m structffn_jax.bench.decode --part table2   [--model m] [--batches 64,128,256]
  python -m structffn_jax.bench.decode                 (both; --plot to draw them)

ffn: forward latency of one FFN block (fc1 -> GELU -> fc2, ffn = 4 x width, the model's own
`FeedForward`) on a batch of T tokens at sequence length 1, for dense, the 63% and 32%
structured layers (LowRank, BlockDense, BlockShuffle) and their pre-merged form. Every variant of
a (width, T) cell is timed interleaved in one process. The pre-merged column is what a layer
pre-merged at the crossover found here runs (merged matrix up to it, factors above it).

table2: best decode tokens/s at generation length 256 over batch sizes, for Table 2's wide &
structured models (configs/wide_structured.py: dense, GQA, ours = LowRank FFN + GQA, and ours
pre-merged with a threshold calibrated on this device), random weights, parameters in the
compute dtype, one prompt token, no EOS stop; at each batch size the variants run interleaved.
--scale s shrinks widths and depth by s so the CPU finishes in minutes; the output says so, and
its numbers are then not the paper's models. `--config FILE:ARG` (repeatable) times those configs'
models instead, each named by its run name (e.g. the CPU study of configs/cpu_reproduction.py).

Paper (A100, bf16): Figure 5 below ~16 tokens structured loses to dense; Table 2 decode
throughput m: dense 30229, GQA 84202, ours 91147; l: dense 23351, GQA 64737, ours 75930.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from structffn_jax import calibration, cli, decoding, timing
from structffn_jax import config as config_lib
from structffn_jax.model import DTYPES, GPT

REPO = pathlib.Path(__file__).resolve().parents[2]
TABLE2_VARIANTS = ('dense', 'gqa', 'ours', 'ours+premerge')
PAPER_TABLE2 = {'m': {'dense': 30229, 'gqa': 84202, 'ours': 91147},
                'l': {'dense': 23351, 'gqa': 64737, 'ours': 75930}}


def ffn_variants(width: int) -> dict[str, dict]:
  """FFN structures at 63% and 32% of the dense FFN's parameters, for ffn = 4 x width."""
  def even(x, b):
    return max(b, int(x) // b * b)
  return {
      'dense': dict(method='dense', rank=0, blocks=1),
      'lowrank-63': dict(method='lowrank', rank=width // 2, blocks=1),
      'lowrank-32': dict(method='lowrank', rank=width // 4, blocks=1),
      # BlockDense(B=2, R): R·(5d + 5d/B) weights = 63% / 32% of 8d² at R = 2d/3 / d/3.
      'blockdense-63': dict(method='blockdense', rank=even(2 * width / 3, 2), blocks=2),
      'blockdense-32': dict(method='blockdense', rank=even(width / 3, 2), blocks=2),
      'blockshuffle-63': dict(method='blockshuffle', rank=0, blocks=2),
      'blockshuffle-32': dict(method='blockshuffle', rank=0, blocks=4),
  }


def bench_ffn(widths, tokens, dtype, iters):
  rows = []
  for width in widths:
    variants = ffn_variants(width)
    fns, merged_fns = {}, {}
    for name, structure in variants.items():
      ffn = timing.ffn_module(width, structure, dtype)
      fns[name] = timing.jitted_forward(ffn)
      if structure['method'] != 'dense':
        merged = nnx.clone(ffn)
        merged.fc1.merge(max(tokens))
        merged.fc2.merge(max(tokens))
        merged_fns[name] = timing.jitted_forward(merged)
    cells = {}
    for t in tokens:
      x = jax.random.normal(jax.random.key(t), (t, 1, width), DTYPES[dtype])
      todo = {name: (fn, (state, x)) for name, (fn, state) in fns.items()}
      todo.update({f'{name}/merged': (fn, (state, x)) for name, (fn, state) in merged_fns.items()})
      cells[t] = timing.time_interleaved(todo, iters=iters)
    for name in variants:
      merged = [cells[t].get(f'{name}/merged', cells[t][name]) for t in tokens]
      threshold = calibration.crossover(tokens, merged, [cells[t][name] for t in tokens])
      for t, m in zip(tokens, merged):
        dense, own = cells[t]['dense'], cells[t][name]
        pre = m if t <= threshold else own
        rows.append({'width': width, 'ffn': name, 'tokens': t, 'dense_us': dense * 1e6,
                     'structured_us': own * 1e6, 'merged_us': m * 1e6,
                     'premerged_us': pre * 1e6, 'speedup': dense / own,
                     'premerged_speedup': dense / pre, 'crossover': threshold})
      print(f'width {width} {name}: done', file=sys.stderr, flush=True)
  return rows


# ----------------------------------------------------------------------------- Table 2


def table2_config(model: str, variant: str, scale: float, dtype: str):
  c = config_lib.load(f'{REPO}/configs/wide_structured.py:model={model},variant={variant}')
  m = c.model
  m.dtype = dtype
  m.ffn.init = 'gaussian'
  if scale != 1:
    m.num_layers = max(2, round(m.num_layers * scale))
    m.hidden_dim = max(64, round(m.hidden_dim * scale / 64) * 64)
    m.ffn_dim = max(64, round(m.ffn_dim * scale / 64) * 64)
    step = 2 * m.num_heads
    m.attn_dim = max(step, round(m.attn_dim * scale / step) * step)
    if m.ffn.rank:
      m.ffn.rank = max(16, round(m.ffn.rank * scale / 16) * 16)
  config_lib.validate(c)
  return m


def cast_params(model):
  """Store every floating-point parameter in the compute dtype (inference: half the reads)."""
  for _, v in nnx.iter_graph(model):
    if isinstance(v, nnx.Variable) and jnp.issubdtype(v.dtype, jnp.floating):
      v.set_value(v[...].astype(model.dtype))
  return model


def bench_table2(model_size, variants, batches, gen_len, prompt_len, scale, dtype, iters,
                 configs=None):
  """Every variant built first, then each batch size timed with the variants interleaved.
  `configs`: {variant: model section} to time instead of Table 2's models."""
  models, notes = {}, {}
  for variant in variants:
    premerged = variant == 'ours+premerge'
    cfg = configs[variant] if configs else \
        table2_config(model_size, 'ours' if premerged else variant, scale, dtype)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    notes[variant] = ''
    if premerged:
      cal = calibration.calibrate(cfg, tokens=batches, iters=max(3, iters))
      if any(cal['thresholds'].values()):
        model.premerge(cal['thresholds'])
      notes[variant] = f'thresholds {cal["thresholds"]}'
    models[variant] = cast_params(model)
  rows, best = [], dict.fromkeys(variants, 0.0)
  for batch in batches:
    prompts = np.random.default_rng(batch).integers(
        3, 1000, (batch, prompt_len)).tolist()
    fns = {v: (lambda m=m: decoding.generate(m, prompts, gen_len, eos_id=None), ())
           for v, m in models.items()}
    try:
      times = timing.time_interleaved(fns, warmup=1, iters=iters)
    except jax.errors.JaxRuntimeError as e:  # out of memory: larger batches will not fit
      print(f'batch {batch}: {str(e).splitlines()[0][:160]}', file=sys.stderr)
      break
    for variant, seconds in times.items():
      tps = batch * gen_len / seconds
      best[variant] = max(best[variant], tps)
      rows.append({'model': model_size, 'variant': variant, 'batch': batch,
                   'tokens_per_s': tps, 'seconds': seconds, 'note': notes[variant]})
    print(f'batch {batch}: ' + ', '.join(f'{v} {batch * gen_len / t:,.0f} tok/s'
                                         for v, t in times.items()), file=sys.stderr, flush=True)
  for variant in variants:
    paper = PAPER_TABLE2.get(model_size, {}).get(variant.split('+')[0], '') if scale == 1 \
        and not configs else 'n/a (scaled)'
    rows.append({'model': model_size, 'variant': variant, 'batch': 'best',
                 'tokens_per_s': best[variant], 'paper_tokens_per_s': paper,
                 'note': notes[variant]})
  return rows


# ----------------------------------------------------------------------------- plots


def plot(ffn_rows, table2_rows, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  widths = sorted({r['width'] for r in ffn_rows})
  panels = len(widths) + bool(table2_rows)
  fig, axes = plt.subplots(1, max(panels, 1), figsize=(5 * max(panels, 1), 4), squeeze=False)
  for ax, width in zip(axes[0], widths):
    for name in dict.fromkeys(r['ffn'] for r in ffn_rows):
      rs = [r for r in ffn_rows if r['width'] == width and r['ffn'] == name]
      key = 'dense_us' if name == 'dense' else 'premerged_us'
      ax.plot([r['tokens'] for r in rs], [r[key] for r in rs], marker='o', ms=3,
              label=name + ('' if name == 'dense' else ' (pre-merged)'))
    ax.set(xscale='log', yscale='log', xlabel='tokens (sequence length 1)',
           ylabel='FFN latency (µs)', title=f'width {width}')
    ax.legend(fontsize=7)
  if table2_rows:
    ax = axes[0][-1]
    for variant in dict.fromkeys(r['variant'] for r in table2_rows):
      rs = [r for r in table2_rows if r['variant'] == variant and r['batch'] != 'best']
      ax.plot([r['batch'] for r in rs], [r['tokens_per_s'] for r in rs], marker='o', label=variant)
    ax.set(xscale='log', xlabel='batch', ylabel='decode tokens/s', title='Table 2 throughput')
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f'wrote {path}')


def _ints(text):
  return [int(v) for v in text.split(',') if v]


def main(argv=None):
  gpu = jax.default_backend() != 'cpu'
  parser = cli.parser(__doc__, 'structffn_jax.bench.decode')
  parser.add_argument('--part', choices=('ffn', 'table2', 'all'), default='all',
                      help='what to measure (see above; default: all)')
  parser.add_argument('--dtype', default='bfloat16' if gpu else 'float32', choices=sorted(DTYPES),
                      help='compute dtype (default: bfloat16 on a GPU, else float32)')
  parser.add_argument('--iters', type=cli.integer(1), default=20 if gpu else 5,
                      help='timed calls per variant (median)')
  parser.add_argument('--widths', default='1536,2048,3072,4096,5120,6144' if gpu else '512,1024',
                      help='ffn: comma-separated model widths')
  parser.add_argument('--tokens', default=','.join(str(2 ** i) for i in range(13)) if gpu
                      else '1,4,16,64,256,1024', help='ffn: comma-separated tokens per call')
  parser.add_argument('--model', default='m', choices=sorted(PAPER_TABLE2),
                      help='table2: model size')
  parser.add_argument('--variants', default=','.join(TABLE2_VARIANTS),
                      help=f'table2: comma-separated variants among {", ".join(TABLE2_VARIANTS)}')
  parser.add_argument('--batches', default='32,64,128,256,512' if gpu else '1,8,32',
                      help='table2: comma-separated batch sizes; the best one counts')
  parser.add_argument('--gen-len', type=cli.integer(1), default=256,
                      help='table2: tokens generated per row')
  parser.add_argument('--prompt-len', type=cli.integer(1), default=1,
                      help='table2: prompt tokens per row')
  parser.add_argument('--scale', type=cli.real(0, above=True), default=1.0 if gpu else 0.25,
                      help="table2: shrink widths and depth by this factor (default: 0.25 on a "
                           "CPU, where the models are then smaller than the paper's)")
  parser.add_argument('--config', action='append', default=[], metavar='FILE:ARG',
                      help="table2: time this config's model instead of Table 2's (repeatable)")
  parser.add_argument('--out', default=timing.default_out('decode'), help='JSON path')
  parser.add_argument('--plot', nargs='?', const='', default=None, metavar='PNG',
                      help='also draw the results (default: the JSON path with .png)')
  args = cli.parse(parser, argv)
  unknown = sorted(set(args.variants.split(',')) - set(TABLE2_VARIANTS))
  if unknown:
    parser.error(f'--variants: unknown {", ".join(unknown)}; use {", ".join(TABLE2_VARIANTS)}')
  ffn_rows, table2_rows = [], []
  if args.part in ('ffn', 'all'):
    ffn_rows = bench_ffn(_ints(args.widths), _ints(args.tokens), args.dtype, args.iters)
    print(f'\nFFN forward latency at sequence length 1 ({args.dtype}, '
          f'{jax.devices()[0].device_kind}):')
    timing.print_table(ffn_rows, ['width', 'ffn', 'tokens', 'dense_us', 'structured_us',
                                  'merged_us', 'premerged_us', 'speedup', 'premerged_speedup',
                                  'crossover'])
  if args.part in ('table2', 'all'):
    if args.scale != 1:
      print(f'\nNOTE: --scale {args.scale}: widths and depth shrunk; these are NOT the paper\'s '
            'Table 2 models and the numbers are not comparable to its throughput.')
    configs = None
    if args.config:
      configs = {}
      for spec in args.config:
        c = config_lib.load(spec)
        c.model.dtype = args.dtype
        configs[c.name] = c.model
    table2_rows = bench_table2('config' if configs else args.model,
                               list(configs) if configs else args.variants.split(','),
                               _ints(args.batches), args.gen_len, args.prompt_len, args.scale,
                               args.dtype, args.iters, configs)
    print(f'\nTable 2 decode throughput, generation length {args.gen_len}, model {args.model}'
          f' (scale {args.scale}, {args.dtype}, {jax.devices()[0].device_kind}):')
    timing.print_table(table2_rows, ['model', 'variant', 'batch', 'tokens_per_s', 'seconds',
                                     'paper_tokens_per_s', 'note'])
  timing.write_json(args.out, {'args': vars(args), 'ffn': ffn_rows, 'table2': table2_rows})
  if args.plot is not None:
    plot(ffn_rows, table2_rows, args.plot or str(pathlib.Path(args.out).with_suffix('.png')))


if __name__ == '__main__':
  main()
