"""Overlay the loss curves of runs: `python -m structffn_jax.plot RUN_DIR... [--x flops] [--out F.png]`.

Reads each workdir's metrics.jsonl and draws training loss (thin) and validation loss (markers)
against steps, tokens or training FLOPs (the paper's scaling plots use FLOPs).
"""

from __future__ import annotations

import json
import pathlib
import sys

from structffn_jax import cli, metrics

X_AXES = {'steps': ('step', 'optimizer step'), 'tokens': ('tokens', 'training tokens'),
          'flops': ('train_flops', 'training FLOPs (paper accounting)')}


def load_curves(workdir) -> dict:
  """{'name', 'train': [(step, tokens, flops, loss)], 'valid': [...]} from a workdir."""
  workdir = pathlib.Path(workdir)
  records = metrics.read_metrics(workdir)
  by_step = {}
  for r in records:  # a resumed run may repeat steps: the latest record wins
    by_step.setdefault(r['step'], {}).update(r)
  rows = [by_step[s] for s in sorted(by_step)]
  name = workdir.name
  config = workdir / 'config.json'
  try:
    name = json.loads(config.read_text()).get('name', name)
  except (OSError, ValueError, AttributeError):
    pass  # no (readable) config.json: the directory names the run
  per_step = {r['step']: r for r in rows if 'loss' in r}

  def x_values(r):
    ref = per_step.get(r['step'], r)
    return {'step': r['step'], 'tokens': ref.get('tokens'), 'train_flops': ref.get('train_flops')}

  train = [{**x_values(r), 'loss': r['loss']} for r in rows if 'loss' in r]
  valid = [{**x_values(r), 'loss': r['valid_loss']} for r in rows if 'valid_loss' in r]
  return {'name': name, 'train': train, 'valid': valid}


def plot(workdirs, out, x='steps', title=None, smooth=1):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  key, label = X_AXES[x]
  runs = []
  for w in workdirs:  # every run must have a curve before anything is drawn
    curves = load_curves(w)
    if not any(p[key] is not None for p in curves['train'] + curves['valid']):
      raise ValueError(f'{w}: no training records with {key!r} in metrics.jsonl yet; nothing '
                       f'to plot (train first, or leave this workdir out).')
    runs.append(curves)
  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
  for i, curves in enumerate(runs):
    color = f'C{i}'
    tr = [p for p in curves['train'] if p[key] is not None]
    ys = [p['loss'] for p in tr]
    if smooth > 1:
      ys = [sum(ys[max(0, j - smooth + 1):j + 1]) / len(ys[max(0, j - smooth + 1):j + 1])
            for j in range(len(ys))]
    ax.plot([p[key] for p in tr], ys, color=color, lw=1, alpha=0.7,
            label=f'{curves["name"]} (train)')
    va = [p for p in curves['valid'] if p[key] is not None]
    if va:
      ax.plot([p[key] for p in va], [p['loss'] for p in va], 'o-', color=color, ms=4, lw=1.5,
              label=f'{curves["name"]} (valid)')
  ax.set_xlabel(label)
  ax.set_ylabel('cross-entropy (nats/token)')
  if x == 'flops':
    ax.set_xscale('log')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  if title:
    ax.set_title(title)
  fig.tight_layout()
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out)
  plt.close(fig)
  return out


def main(argv=None):
  parser = cli.parser(__doc__, 'structffn_jax.plot')
  parser.add_argument('workdirs', nargs='+', help='training workdirs, one curve each')
  parser.add_argument('--x', choices=sorted(X_AXES), default='steps',
                      help='the horizontal axis (default: steps)')
  parser.add_argument('--out', default='loss.png', help='the PNG to write (default: loss.png)')
  parser.add_argument('--title', default=None, help='a title above the plot')
  parser.add_argument('--smooth', type=cli.integer(1), default=1,
                      help='moving average of the training loss over this many records')
  args = cli.parse(parser, argv)
  try:
    out = plot(args.workdirs, args.out, args.x, args.title, args.smooth)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
