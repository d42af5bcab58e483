"""FFN latency versus width, the paper's Figure 4 (docs/design.md §8): dense vs three structures.

    python -m structffn_jax.bench.ffn                       # CPU default: widths 256..1024
    python -m structffn_jax.bench.ffn --preset gpu          # the paper's grid: widths
                                                            # 1024..6144, 30720 tokens, bf16
    python -m structffn_jax.bench.ffn --preset cpu-issue    # fp32, width 1024, 8192 tokens,
                                                            # fwd+bwd, incl. the einsum layout

With --einsum (always with cpu-issue) two more kinds of row: `einsum`, the plain einsums of
kernels/reference.py differentiated by JAX, and for BlockShuffle `layers`, fc1 and fc2 one by
one on the XLA path instead of the fused FFN op (structured.gelu_ffn).

The FFN is the model's own `model.FeedForward` (fc1 -> GELU tanh -> fc2, biases on), ffn = 4 ×
width, on `tokens` tokens, loss <y, dy> for a fixed random dy. Passes:
  fwd     the forward alone
  fwdbwd  a training step's work: the loss and its gradients with respect to every parameter
          and the input (`jax.jit(jax.value_and_grad)`)
  grad    `jax.jit(jax.grad)` of the same loss (--preset cpu-issue): the loss value is unused, so
          XLA drops fc2's last matmul, a large share of dense's work and a small one of a
          structured FFN's; speed-ups read lower than in a training step
The variants of a width are interleaved in one process so that load on a shared machine hits
them alike; medians.
The speed-up is dense time / variant time; the bound beside it is the FLOP ratio (dense weight
parameters / structured ones), which a structured FFN can approach but not beat.
63% / 32% settings follow design §6.3: LowRank R = d/2, d/4; BlockShuffle C = 2, 4; BlockDense
(C, R) = (4, 3d/4), (4, 3d/8) for widths divisible by 8 (m, xl), (2, 2d/3), (2, d/3) otherwise.
"""

from __future__ import annotations

import statistics
import sys

import jax
import jax.numpy as jnp

from structffn_jax import cli, hostmem, kernels, structured, timing
from structffn_jax import model as model_lib

PRESETS = {
    'cpu': dict(widths=(256, 512, 768, 1024), tokens=8192, dtype='float32', passes=('fwd',
                                                                                    'fwdbwd')),
    'gpu': dict(widths=(1024, 2048, 3072, 4096, 5120, 6144), tokens=30720, dtype='bfloat16',
                passes=('fwd', 'fwdbwd')),
    'cpu-issue': dict(widths=(1024,), tokens=8192, dtype='float32', passes=('grad', 'fwdbwd')),
}
FRACTIONS = ('63', '32')


def variants(preset: str, with_einsum: bool) -> list[tuple[str, str, str, str]]:
  """(name, method, fraction, implementation override or '') in table order."""
  out = [('dense', 'dense', '', '')]
  fractions = ('32',) if preset == 'cpu-issue' else FRACTIONS
  for method in ('lowrank', 'blockdense', 'blockshuffle'):
    for fraction in fractions:
      out.append((f'{method} {fraction}%', method, fraction, ''))
      if method == 'blockshuffle' and with_einsum:  # the two layers one by one, unfused
        out.append((f'{method} {fraction}% layers', method, fraction, 'layers'))
      if with_einsum:  # the einsums differentiated by JAX: the layout before kernels/xla.py
        out.append((f'{method} {fraction}% einsum', method, fraction, 'reference'))
  return out


def build_ffn(width: int, method: str, fraction: str, dtype: str, implementation: str,
              override: str = '', seed: int = 0):
  """The model's FeedForward at this width; `override` forces a kernels implementation, or
  'layers': BlockShuffle's fc1 and fc2 one by one instead of the fused FFN op."""
  s = timing.ffn_settings(method, width, fraction)
  ffn = timing.ffn_module(width, dict(method=method, **s), dtype, implementation=implementation,
                          seed=seed)
  if override == 'layers':
    ffn.fuse = False
  elif override:
    for layer in (ffn.fc1, ffn.fc2):
      layer.implementation = override
  weights = sum(structured.weight_params(method, n, m, rank=s['rank'], blocks=s['blocks'])
                for n, m in ((width, 4 * width), (4 * width, width)))
  return ffn, weights


def timed_functions(ffn, x, dy):
  """Jitted forward and forward+backward of the FFN (grads w.r.t. parameters and input)."""
  forward, params = timing.jitted_forward(ffn)

  def loss(params, x):
    return jnp.vdot(forward(params, x).astype(jnp.float32), dy)

  return dict(fwd=(forward, (params, x)),
              fwdbwd=(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (params, x)),
              grad=(jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x)))


def run(widths, tokens, dtype, passes, implementation, preset, warmup, iters, with_einsum):
  rows = []
  for width in widths:
    key_x, key_dy = jax.random.split(jax.random.key(width))
    x = jax.random.normal(key_x, (tokens, width), jnp.float32).astype(dtype)
    dy = jax.random.normal(key_dy, (tokens, width), jnp.float32)
    fns, meta = {}, {}
    for name, method, fraction, override in variants(preset, with_einsum):
      ffn, weights = build_ffn(width, method, fraction, dtype, implementation, override)
      for p, fn in timed_functions(ffn, x, dy).items():
        if p in passes:
          fns[(name, p)] = fn
      impl = implementation if override in ('', 'layers') else override
      if method != 'dense' and impl != 'reference':  # what 'auto' / 'pallas' resolve to here
        factors = [ffn.fc1.w1[...], ffn.fc1.w2[...]] if method == 'blockshuffle' \
            else [ffn.fc1.v[...], ffn.fc1.u[...]]
        impl = kernels.resolve(method, impl, x, *factors)
        if ffn.fuse and structured.fusable_gelu_ffn(ffn.fc1, ffn.fc2, x):
          impl += ' fused ffn'
      elif method == 'dense':
        impl = 'xla'
      meta[name] = dict(method=method, fraction=fraction, weights=weights,
                        implementation=impl, **timing.ffn_settings(method, width, fraction))
    samples = timing.time_interleaved_samples(fns, warmup=warmup, iters=iters)
    times = {k: statistics.median(v) for k, v in samples.items()}
    dense_weights = meta['dense']['weights']
    for name, m in meta.items():
      row = dict(width=width, ffn=4 * width, tokens=tokens, variant=name, **m,
                 flop_bound=dense_weights / m['weights'])
      for p in passes:
        row[f'{p}_ms'] = 1e3 * times[(name, p)]
        row[f'{p}_speedup'] = times[('dense', p)] / times[(name, p)]
        row[f'{p}_samples_ms'] = [1e3 * t for t in samples[(name, p)]]
      rows.append(row)
    print(f'width {width}: done', file=sys.stderr, flush=True)
  return rows


def plot(rows, passes, path):
  """Latency (top) and speed-up over dense (bottom) against width, one column per pass; the
  dotted lines in the speed-up panels are the FLOP bounds at 63% and 32%."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(2, len(passes), figsize=(6 * len(passes), 8), squeeze=False)
  names = list(dict.fromkeys(r['variant'] for r in rows))
  colors = {n: f'C{i}' for i, n in enumerate(names)}
  for col, p in enumerate(passes):
    for name in names:
      mine = [r for r in rows if r['variant'] == name]
      style = dict(marker='o', label=name, color=colors[name],
                   linestyle='--' if 'einsum' in name or 'layers' in name else '-')
      widths = [r['width'] for r in mine]
      axes[0, col].plot(widths, [r[f'{p}_ms'] for r in mine], **style)
      if name != 'dense':
        axes[1, col].plot(widths, [r[f'{p}_speedup'] for r in mine], **style)
    for bound in sorted({round(r['flop_bound'], 2) for r in rows if r['variant'] != 'dense'}):
      axes[1, col].axhline(bound, color='gray', linestyle=':', linewidth=1)
    axes[1, col].axhline(1.0, color='black', linewidth=0.8)
    axes[0, col].set(yscale='log', ylabel=f'{p} latency (ms)', title=f'FFN {p}')
    axes[1, col].set(ylabel=f'{p} speed-up over dense (dotted: FLOP bounds)',
                     xlabel='width (ffn = 4 × width)')
    for ax in axes[:, col]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f'wrote {path}')


def main(argv=None):
  parser = cli.parser(__doc__, 'structffn_jax.bench.ffn')
  parser.add_argument('--preset', choices=sorted(PRESETS),
                      default='gpu' if jax.default_backend() == 'gpu' else 'cpu',
                      help='widths, tokens, dtype and passes to measure (see above; default: '
                           'gpu on a GPU, else cpu)')
  parser.add_argument('--widths', type=lambda s: tuple(int(w) for w in s.split(',')),
                      help="comma-separated model widths instead of the preset's")
  parser.add_argument('--tokens', type=cli.integer(1),
                      help="tokens per call instead of the preset's")
  parser.add_argument('--dtype', choices=sorted(model_lib.DTYPES),
                      help="compute dtype instead of the preset's")
  parser.add_argument('--implementation', default='auto', choices=kernels.IMPLEMENTATIONS,
                      help='kernels for the structured layers (default: auto, the fastest '
                           'known for the device)')
  parser.add_argument('--einsum', action='store_true',
                      help='also time the plain einsums differentiated by JAX '
                           '(always on for --preset cpu-issue)')
  parser.add_argument('--warmup', type=cli.integer(0), default=2,
                      help='untimed calls per variant first')
  parser.add_argument('--iters', type=cli.integer(1), default=7,
                      help='timed calls per variant (median)')
  parser.add_argument('--out', help='JSON path (default bench_results/ffn_<backend>.json)')
  parser.add_argument('--plot', nargs='?', const='', help='also draw a PNG (default: next to '
                      'the JSON)')
  args = cli.parse(parser, argv)
  preset = PRESETS[args.preset]
  widths = args.widths or preset['widths']
  tokens = args.tokens or preset['tokens']
  dtype = args.dtype or preset['dtype']
  passes = preset['passes']
  with_einsum = args.einsum or args.preset == 'cpu-issue'
  rows = run(widths, tokens, dtype, passes, args.implementation, args.preset, args.warmup,
             args.iters, with_einsum)
  columns = ['width', 'variant', 'implementation']
  for p in passes:
    columns += [f'{p}_ms', f'{p}_speedup']
  columns.append('flop_bound')
  if jax.default_backend() == 'cpu':
    info = timing.device_info()
    print(f'# CPU ({info["cpu_count"]} cores, load average {info["loadavg"]}): interleaved '
          f'medians of {args.iters}; compare ratios, not absolute times, across machines.\n'
          f'# host allocator: {hostmem.status()}')
  timing.print_table(rows, columns)
  out = args.out or timing.default_out('ffn' if args.preset != 'cpu-issue' else 'ffn_cpu_issue')
  timing.write_json(out, dict(preset=args.preset, widths=list(widths), tokens=tokens,
                              dtype=dtype, passes=list(passes), warmup=args.warmup,
                              iters=args.iters, rows=rows))
  if args.plot is not None:
    plot(rows, passes, args.plot or out.rsplit('.', 1)[0] + '.png')


if __name__ == '__main__':
  main()
