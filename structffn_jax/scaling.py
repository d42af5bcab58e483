"""Fit loss against training FLOPs per method: `python -m structffn_jax.scaling RUN_DIR... --out F.png`.

Each run contributes one point: its final validation loss L and its training FLOPs C (the paper's
accounting, docs/design.md §5). Runs are grouped by FFN structure (method and its share of the
dense FFN's parameters, e.g. "lowrank 32%"), and every group gets the curve

    L(C) = a · (C / C0)^(-b) + c,     C0 = 1e12 FLOPs,

fitted by least squares with scipy. With `--offset shared` (the default) every group shares one
irreducible loss c, so that each group needs only 2 points beyond the shared one and the
exponents b are compared against one floor; `--offset per-group` fits a c per group (3 points
per group at least). Writes a JSON file (the fitted a, b, c per group and every point) and a PNG
of the points with their curves, and prints the table.

Runs that have not finished, and runs on different data (another tokenizer, sequence length or
validation split), are refused with a message naming them.

  python -m structffn_jax.scaling runs/cpu_repro/scaling-w* --out results/cpu_repro/scaling.png
"""

from __future__ import annotations

import json
import pathlib
import sys

import ml_collections
import numpy as np

from structffn_jax import accounting, cli, studies
from structffn_jax.data import manifest as manifest_lib

C0 = 1e12


class ScalingError(ValueError):
  """Runs that cannot be fitted together; the message names them and the fix."""


def group_label(config) -> str:
  """'dense', or the FFN method with its weights' share of a dense FFN's in one structured block
  (the first block's dense FFN left out, as the paper names its 63% and 32% models):
  'lowrank 31%'."""
  method = config.model.ffn.method
  if method == 'dense':
    return 'dense'
  one = ml_collections.ConfigDict(config.to_dict())
  one.model.update(num_layers=1, first_layer_dense=False)
  dense = ml_collections.ConfigDict(one.to_dict())
  dense.model.ffn.update(method='dense', rank=0, blocks=1)
  share = accounting.ffn_params_closed_form(one) / accounting.ffn_params_closed_form(dense)
  return f'{method} {int(100 * share + 0.5)}%'


def _dataset(config, workdir: pathlib.Path) -> dict:
  """What a validation loss depends on: tokenizer, context, validation rows."""
  data_dir = manifest_lib.resolve_data_dir(config.data, workdir)  # relative: to where it ran
  try:
    manifest = manifest_lib.Manifest.load(data_dir)
  except (OSError, ValueError) as e:
    raise ScalingError(f'{workdir}: its data directory {data_dir} cannot be read ({e}); '
                       'prepare the data or leave the run out') from None
  valid = manifest.splits.get('valid', {})
  return {'tokenizer_sha256': manifest.tokenizer_sha256, 'seq_len': manifest.seq_len,
          'valid_rows': valid.get('rows'), 'valid_source': valid.get('source')}


def load_points(workdirs) -> list[dict]:
  """One point per finished run: {'run', 'group', 'flops', 'loss', 'tokens', 'workdir'}."""
  points, datasets = [], {}
  for workdir in map(pathlib.Path, workdirs):
    path = workdir / 'config.json'
    if not path.is_file():
      raise ScalingError(f'{workdir}: no config.json; is it a training workdir?')
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    status = studies.run_status(config, workdir)
    if status.state != 'finished':
      raise ScalingError(f'{workdir}: not finished ({status.describe()}); run its training '
                         'command again to finish it, or leave it out')
    datasets[str(workdir)] = _dataset(config, workdir)
    recs = studies.records(workdir)
    acc = accounting.account(config)
    points.append({'run': config.name, 'group': group_label(config), 'flops': acc.train_flops,
                   'loss': float(studies.final(recs)), 'tokens': acc.tokens,
                   'workdir': str(workdir)})
  kinds = {json.dumps(d, sort_keys=True): run for run, d in datasets.items()}
  if len(kinds) > 1:
    first, *others = kinds.values()
    raise ScalingError(f'the runs mix datasets: {first} and {others[0]} differ in tokenizer, '
                       'context or validation split; fit runs of one dataset at a time')
  if not points:
    raise ScalingError('no runs given')
  return points


def _curve(c, a, b, offset):
  return a * (c / C0) ** (-b) + offset


def fit(points: list[dict], offset: str = 'shared') -> dict:
  """Least-squares fit of L = a·(C/C0)^(-b) + c per group (see the module docstring)."""
  from scipy import optimize  # pylint: disable=import-outside-toplevel

  groups = sorted({p['group'] for p in points}, key=lambda g: (g != 'dense', g))
  data = {g: (np.array([p['flops'] for p in points if p['group'] == g], dtype=np.float64),
              np.array([p['loss'] for p in points if p['group'] == g], dtype=np.float64))
          for g in groups}
  floor = min(float(loss.min()) for _, loss in data.values())
  need = 2 if offset == 'shared' else 3
  short = [f'{g} ({len(data[g][0])})' for g in groups if len(data[g][0]) < need]
  if short or (offset == 'shared' and len(points) < 2 * len(groups) + 1):
    raise ScalingError(f'too few runs to fit with --offset {offset}: each group needs {need} '
                       f'runs at different FLOPs; short: {", ".join(short) or "all"}')
  if offset == 'per-group':
    out = {}
    for g in groups:
      flops, loss = data[g]
      (a, b, c), _ = optimize.curve_fit(
          _curve, flops, loss, p0=(loss.max() - 0.9 * loss.min(), 0.3, 0.9 * loss.min()),
          bounds=([0, 0, 0], [np.inf, 3, loss.min()]), maxfev=20000)
      out[g] = {'a': float(a), 'b': float(b), 'c': float(c)}
  else:
    def residuals(theta):
      return np.concatenate([_curve(data[g][0], theta[2 * i], theta[2 * i + 1], theta[-1])
                             - data[g][1] for i, g in enumerate(groups)])
    theta0 = np.array([v for g in groups for v in (data[g][1].max() - 0.9 * floor, 0.3)]
                      + [0.9 * floor])
    lower = np.array([0.0, 0.0] * len(groups) + [0.0])
    upper = np.array([np.inf, 3.0] * len(groups) + [floor])
    result = optimize.least_squares(residuals, theta0, bounds=(lower, upper))
    theta = result.x
    out = {g: {'a': float(theta[2 * i]), 'b': float(theta[2 * i + 1]), 'c': float(theta[-1])}
           for i, g in enumerate(groups)}
  for g in groups:
    flops, loss = data[g]
    pred = _curve(flops, out[g]['a'], out[g]['b'], out[g]['c'])
    out[g]['rmse'] = float(np.sqrt(np.mean((pred - loss) ** 2)))
    out[g]['points'] = len(flops)
  return out


def plot(points, fits, out: pathlib.Path, title: str = '') -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(7, 4.6))
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for i, (group, f) in enumerate(fits.items()):
    color = colors[i % len(colors)]
    style = '--' if '63%' in group else (':' if '32%' in group else '-')
    xs = np.array([p['flops'] for p in points if p['group'] == group])
    ys = np.array([p['loss'] for p in points if p['group'] == group])
    grid = np.geomspace(xs.min() / 1.3, xs.max() * 1.3, 100)
    ax.plot(grid, _curve(grid, f['a'], f['b'], f['c']), style, color=color, lw=1.2,
            label=f'{group}: b={f["b"]:.2f}')
    ax.plot(xs, ys, 'o', color=color, ms=4)
  ax.set_xscale('log')
  ax.set_xlabel('training FLOPs')
  ax.set_ylabel('final validation loss (nats)')
  ax.set_title(title or 'loss vs training FLOPs, L = a·(C/1e12)^(-b) + c')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=130)
  plt.close(fig)


def main(argv=None) -> int:
  parser = cli.parser(__doc__, 'structffn_jax.scaling')
  parser.add_argument('workdirs', nargs='+', metavar='RUN_DIR', help='finished training workdirs')
  parser.add_argument('--out', required=True, help='PNG of the points and fitted curves')
  parser.add_argument('--json', default='', help='fit results (default: --out with .json)')
  parser.add_argument('--offset', choices=('shared', 'per-group'), default='shared',
                      help='one irreducible loss c for every group, or one per group')
  parser.add_argument('--title', default='', help='plot title')
  args = parser.parse_args(argv)
  try:
    points = load_points(args.workdirs)
    fits = fit(points, args.offset)
  except ScalingError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  out = pathlib.Path(args.out)
  plot(points, fits, out, args.title)
  json_path = pathlib.Path(args.json) if args.json else out.with_suffix('.json')
  json_path.write_text(json.dumps({'curve': 'L = a*(C/1e12)^(-b) + c', 'offset': args.offset,
                                   'fits': fits, 'points': points}, indent=1))
  rows = [{'group': g, 'runs': f['points'], 'a': f['a'], 'b': f['b'], 'c': f['c'],
           'rmse': f['rmse']} for g, f in fits.items()]
  print(studies.format_table(rows))
  print(f'wrote {out} and {json_path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
