"""Calibrate pre-merge on this device: `python -m structffn_jax.premerge --workdir DIR`.

A structured layer is cheaper than its dense equivalent in FLOPs, but on few tokens (decoding)
its two skinny matmuls lose to one dense matmul (docs/design.md §8). Pre-merge keeps the merged
matrix too and picks per call by the number of tokens. This command times, for each structured
FFN layer shape of the run's model (fc1, fc2) in the model's compute dtype, the merged matmul
against the structured one over token counts 1..4096, and writes the crossover to
<workdir>/premerge.json:

  {"thresholds": {"fc1": T1, "fc2": T2}, "layers": {...timings...}, "device": ..., ...}

T is the largest measured token count up to which the merged form was faster at every measured
count (0: the structured form always won). `structffn_jax.generate` applies it; a model can also
be pre-merged directly with `GPT.premerge({'fc1': T1, 'fc2': T2})`.
"""

from __future__ import annotations

import pathlib
import sys

from structffn_jax import cli, timing
from structffn_jax.calibration import DEFAULT_TOKENS, FILE, calibrate
from structffn_jax.calibration import crossover  # noqa: F401 (the crossover rule, public here too)
from structffn_jax.run import load_config



def print_result(result):
  rows = []
  for name, r in result['layers'].items():
    for t, m, s in zip(result['tokens'], r['merged_s'], r['structured_s']):
      rows.append({'layer': f'{name} {r["layer"]}', 'tokens': t, 'merged_us': m * 1e6,
                   'structured_us': s * 1e6, 'structured/merged': s / m,
                   'uses': 'merged' if t <= r['threshold'] else 'structured'})
  timing.print_table(rows, ['layer', 'tokens', 'merged_us', 'structured_us',
                            'structured/merged', 'uses'])
  for name, t in result['thresholds'].items():
    print(f'{name}: merged for calls on <= {t} tokens')


def main(argv=None):
  parser = cli.parser(__doc__, 'structffn_jax.premerge')
  parser.add_argument('--workdir', required=True, help='a training workdir (its config.json)')
  parser.add_argument('--tokens', default=','.join(map(str, DEFAULT_TOKENS)),
                      help='comma-separated token counts to time')
  parser.add_argument('--iters', type=cli.integer(1), default=10,
                      help='timed calls per form and count')
  parser.add_argument('--out', default='', help=f'where to write the result (default: '
                      f'<workdir>/{FILE}, where generate finds it)')
  args = cli.parse(parser, argv)
  try:
    model_cfg = load_config(args.workdir).model
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  try:
    tokens = [int(t) for t in args.tokens.split(',') if t]
  except ValueError:
    sys.exit(f'error: --tokens {args.tokens!r}: expected comma-separated integers.')
  result = calibrate(model_cfg, tokens, args.iters)
  if not result['layers']:
    print(f'model.ffn.method={model_cfg.ffn.method!r}: no structured layer, nothing to merge.')
  else:
    print_result(result)
  timing.write_json(args.out or str(pathlib.Path(args.workdir) / FILE), result)


if __name__ == '__main__':
  main()
