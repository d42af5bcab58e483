"""Each Pallas kernel against the XLA path (and the plain einsums) on the FFN's projections.

    python -m structffn_jax.bench.kernels                  # GPU/TPU: the paper's shapes, bf16
    python -m structffn_jax.bench.kernels --widths 1024    # one width

For BlockShuffle and BlockDense at 63% and 32% (design §6.3 settings, as in bench/ffn.py), fc1
(d -> 4d) and fc2 (4d -> d), the op alone is timed forward and forward+backward (gradients with
respect to x and the factors), 'pallas' / 'xla' / 'reference' interleaved in one process, and
checked against the reference (largest difference relative to the reference's largest entry).
The last lines say which ops to list in `kernels.api.PALLAS_WINS` for this device: those whose
kernels beat the XLA path on every shape, forward and backward. GPUs run the Triton kernels
(kernels/pallas_triton.py), TPUs the Mosaic ones (kernels/pallas_tpu.py).

On CPU the kernels run in the Pallas interpreter: the timings say nothing about speed (the
table says so) and the default is a small correctness-and-plumbing pass.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from structffn_jax import cli, kernels, timing

OPS = ('blockshuffle', 'blockdense')
IMPLS = ('pallas', 'xla', 'reference')


def factor_shapes(op: str, n: int, m: int, rank: int, blocks: int):
  if op == 'blockshuffle':
    q = min(n, m) // blocks
    return [(blocks, q, n // blocks), (blocks, m // blocks, q)]
  return [(blocks, rank // blocks, n // blocks), (m, rank)]


def cases(widths, fractions, ops=OPS, layers=('fc1', 'fc2')):
  for width in widths:
    for op in ops:
      for fraction in fractions:
        s = timing.ffn_settings(op, width, fraction)
        for layer, (n, m) in (('fc1', (width, 4 * width)), ('fc2', (4 * width, width))):
          if layer not in layers:
            continue
          yield dict(op=op, width=width, fraction=fraction, layer=layer, n=n, m=m,
                     shapes=factor_shapes(op, n, m, s['rank'], s['blocks']), **s)


def functions(op, impl, x, factors, dy):
  fn = lambda x, *f: getattr(kernels, op)(x, *f, implementation=impl)
  loss = lambda x, *f: jnp.vdot(fn(x, *f).astype(jnp.float32), dy)
  argnums = tuple(range(1 + len(factors)))
  return dict(fwd=(jax.jit(fn), (x, *factors)),
              fwdbwd=(jax.jit(jax.value_and_grad(loss, argnums)), (x, *factors)))


def max_rel_err(got, want):
  leaves = zip(jax.tree.leaves(got), jax.tree.leaves(want))
  return max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))) /
                   (float(jnp.max(jnp.abs(w.astype(jnp.float32)))) or 1.0)) for g, w in leaves)


def main(argv=None):
  on_gpu = kernels.api.platform() in ('gpu', 'tpu')  # an accelerator: the kernels compiled
  parser = cli.parser(__doc__, 'structffn_jax.bench.kernels')
  parser.add_argument('--widths', type=lambda s: tuple(int(w) for w in s.split(',')),
                      default=(1024, 2048, 4096, 6144) if on_gpu else (64,),
                      help='comma-separated model widths (ffn = 4 x width)')
  parser.add_argument('--tokens', type=cli.integer(1), default=30720 if on_gpu else 256,
                      help='tokens per call')
  parser.add_argument('--dtype', default='bfloat16' if on_gpu else 'float32',
                      choices=('float32', 'bfloat16'), help='compute dtype')
  parser.add_argument('--fractions', default='63,32',
                      help='parameter fractions of the dense FFN to measure: 63, 32 or both')
  parser.add_argument('--ops', default=','.join(OPS), help='ops to measure: a subset of '
                      + ','.join(OPS))
  parser.add_argument('--layers', default='fc1,fc2', help='layers to measure: fc1, fc2 or both')
  parser.add_argument('--warmup', type=cli.integer(0), default=2,
                      help='untimed calls per variant first')
  parser.add_argument('--iters', type=cli.integer(1), default=10 if on_gpu else 3,
                      help='timed calls per variant (median)')
  parser.add_argument('--out', help='JSON path (default bench_results/kernels_<backend>.json)')
  args = cli.parse(parser, argv)
  dtype = jnp.dtype(args.dtype)
  rows = []
  for case in cases(args.widths, args.fractions.split(','), tuple(args.ops.split(',')),
                    tuple(args.layers.split(','))):
    op, shapes = case['op'], case['shapes']
    keys = jax.random.split(jax.random.key(case['n'] * 7 + case['m']), 2 + len(shapes))
    x = jax.random.normal(keys[0], (args.tokens, case['n']), jnp.float32).astype(dtype)
    dy = jax.random.normal(keys[1], (args.tokens, case['m']), jnp.float32)
    factors = [(0.02 * jax.random.normal(k, s, jnp.float32)).astype(dtype)
               for k, s in zip(keys[2:], shapes)]
    runs = {impl: kernels.resolve(op, impl, x, *factors) for impl in IMPLS}
    fns = {}
    for impl in IMPLS:
      for p, fn in functions(op, impl, x, factors, dy).items():
        fns[(impl, p)] = fn
    results = {k: fn(*a) for k, (fn, a) in fns.items()}
    times = timing.time_interleaved(fns, warmup=args.warmup, iters=args.iters)
    row = dict(case, shapes=[list(s) for s in shapes], tokens=args.tokens, dtype=args.dtype,
               pallas_runs=runs['pallas'])
    for p in ('fwd', 'fwdbwd'):
      for impl in IMPLS:
        row[f'{p}_{impl}_ms'] = 1e3 * times[(impl, p)]
        if impl != 'reference':
          row[f'{p}_{impl}_err'] = max_rel_err(results[(impl, p)], results[('reference', p)])
      row[f'{p}_pallas_vs_xla'] = times[('xla', p)] / times[('pallas', p)]
    rows.append(row)
    print(f"{op} {case['layer']} width {case['width']} {case['fraction']}%: done",
          file=sys.stderr, flush=True)
  if not on_gpu:
    print('# NOTE: no GPU or TPU. The Pallas kernels ran in the Pallas interpreter on CPU: the '
          'timings below are NOT a speed measurement (only the error columns mean something). '
          'Run this on a GPU or TPU for the comparison.')
  columns = ['op', 'layer', 'width', 'fraction', 'pallas_runs']
  for p in ('fwd', 'fwdbwd'):
    columns += [f'{p}_pallas_ms', f'{p}_xla_ms', f'{p}_reference_ms', f'{p}_pallas_vs_xla',
                f'{p}_pallas_err']
  timing.print_table(rows, columns)
  wins = [op for op in args.ops.split(',')
          if all(r['pallas_runs'] == 'pallas' and r['fwd_pallas_vs_xla'] > 1 and
                 r['fwdbwd_pallas_vs_xla'] > 1 for r in rows if r['op'] == op)]
  kind = timing.device_info()['device']
  if on_gpu:
    print(f'kernels.api.PALLAS_WINS entry for this device: {{{kind!r}: {tuple(wins)!r}}}')
  worst = max(max(r['fwd_pallas_err'], r['fwdbwd_pallas_err']) for r in rows)
  print(f'largest Pallas error relative to the reference: {worst:.2e}')
  timing.write_json(args.out or timing.default_out('kernels'),
                    dict(tokens=args.tokens, dtype=args.dtype, widths=list(args.widths),
                         iters=args.iters, interpret=not on_gpu, pallas_wins=wins, rows=rows))
  if np.isnan(worst) or worst > (2e-2 if dtype == jnp.bfloat16 else 1e-4):
    sys.exit('Pallas results differ from the reference.')


if __name__ == '__main__':
  main()
