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

import jax
import jax.numpy as jnp
from flax import nnx

from structffn_jax import cli, evaluate, structured
from structffn_jax.bench import common
from structffn_jax.model import DTYPES

DEFAULT_TOKENS = tuple(2 ** i for i in range(13))  # 1 .. 4096
OUT_FILE = 'premerge.json'


def ffn_layers(model_cfg) -> dict[str, structured.StructuredLinear]:
  """Stand-alone fc1 / fc2 of the model's structured FFN (random weights: only shapes matter)."""
  f = model_cfg.ffn
  if f.method == 'dense':
    return {}
  d, h = model_cfg.hidden_dim, model_cfg.ffn_dim
  fc1_out = 2 * h if model_cfg.activation == 'swiglu' else h
  common_kw = dict(rank=f.rank, blocks=f.blocks, use_bias=False, init='gaussian',
                   dtype=DTYPES[model_cfg.dtype], rngs=nnx.Rngs(0))
  return {'fc1': structured.make_linear(f.method, d, fc1_out, **common_kw),
          'fc2': structured.make_linear(f.method, h, d, **common_kw)}


def describe(layer) -> str:
  extra = ''.join(f', {k}={getattr(layer, k)}' for k in ('rank', 'blocks') if hasattr(layer, k))
  return f'{type(layer).__name__}({layer.in_features}->{layer.out_features}{extra})'


def time_forms(layer, tokens, *, iters: int = 10):
  """Median seconds of the merged and the structured form of `layer` at each token count."""
  merged_layer = nnx.clone(layer)
  merged_layer.merge(threshold=max(tokens))
  forms = {'merged': common.jitted_forward(merged_layer),
           'structured': common.jitted_forward(layer)}
  out = {'merged_s': [], 'structured_s': []}
  key = jax.random.key(0)
  for t in tokens:
    x = jax.random.normal(key, (t, layer.in_features), layer.dtype or jnp.float32)
    times = common.time_interleaved(
        {name: (fn, (state, x)) for name, (fn, state) in forms.items()}, iters=iters)
    out['merged_s'].append(times['merged'])
    out['structured_s'].append(times['structured'])
  return out


def crossover(tokens, merged_s, structured_s) -> int:
  """Largest token count up to which the merged form was faster at every measured count."""
  threshold = 0
  for t, m, s in zip(tokens, merged_s, structured_s):
    if m >= s:
      break
    threshold = t
  return threshold


def calibrate(model_cfg, tokens=DEFAULT_TOKENS, iters: int = 10) -> dict:
  """{'thresholds': {name: T}, 'layers': {name: timings}} for the model's structured FFN."""
  tokens = sorted(int(t) for t in tokens)
  result = {'thresholds': {}, 'layers': {}, 'dtype': model_cfg.dtype, 'tokens': tokens}
  for name, layer in ffn_layers(model_cfg).items():
    timing = time_forms(layer, tokens, iters=iters)
    threshold = crossover(tokens, timing['merged_s'], timing['structured_s'])
    result['thresholds'][name] = threshold
    result['layers'][name] = {'layer': describe(layer), 'threshold': threshold, **timing}
  return result


def print_result(result):
  rows = []
  for name, r in result['layers'].items():
    for t, m, s in zip(result['tokens'], r['merged_s'], r['structured_s']):
      rows.append({'layer': f'{name} {r["layer"]}', 'tokens': t, 'merged_us': m * 1e6,
                   'structured_us': s * 1e6, 'structured/merged': s / m,
                   'uses': 'merged' if t <= r['threshold'] else 'structured'})
  common.print_table(rows, ['layer', 'tokens', 'merged_us', 'structured_us',
                            'structured/merged', 'uses'])
  for name, t in result['thresholds'].items():
    print(f'{name}: merged for calls on <= {t} tokens')


def main(argv=None):
  parser = cli.parser(__doc__)
  parser.add_argument('--workdir', required=True, help='a training workdir (its config.json)')
  parser.add_argument('--tokens', default=','.join(map(str, DEFAULT_TOKENS)),
                      help='comma-separated token counts to time')
  parser.add_argument('--iters', type=int, default=10, help='timed calls per form and count')
  parser.add_argument('--out', default='', help=f'default <workdir>/{OUT_FILE}')
  args = parser.parse_args(argv)
  try:
    model_cfg = evaluate.load_config(args.workdir).model
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
  common.write_json(args.out or str(pathlib.Path(args.workdir) / OUT_FILE), result)


if __name__ == '__main__':
  main()
