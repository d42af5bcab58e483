"""Tables, plots and verdict inputs of the CPU studies (configs/cpu_reproduction.py), from their runs.

  python launch/cpu_reproduction_report.py --root runs/cpu_repro --out results/cpu_repro \\
      [--decode results/cpu_repro/wide_decode.json]

Reads every variant's workdir under --root (a study whose runs are not all finished is reported
with the finished ones, and says how many are missing) and writes, per study, <out>/<study>.json
(every run's numbers), <out>/<study>.png and the Markdown tables of <out>/report.md, which
RESULTS.md quotes. Nothing here trains; rerun it as runs finish.

Definitions: a *spike* is a step whose training loss exceeds the mean of the up to 32 steps
before it (from step 4 on) by more than 0.5 nats (consecutive such steps count once;
structffn_jax/studies.py); a run
*diverged* when it stopped on a non-finite loss, or ended with a validation loss above the
uniform-guess loss ln(vocab) - 1.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from structffn_jax import accounting, scaling, studies  # noqa: E402
from structffn_jax import config as config_lib  # noqa: E402

CONFIG = REPO / 'configs' / 'cpu_reproduction.py'


def _plt():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def load_runs(root: pathlib.Path) -> dict[str, list[dict]]:
  """{study: [run dict]} for every variant of the config, finished or not."""
  module = config_lib.config_module(CONFIG)
  out: dict[str, list[dict]] = {}
  for variant in module.VARIANTS:
    config = config_lib.load(f'{CONFIG}:{variant}')
    arg = config_lib.parse_arg(variant, study='', width=0, method='dense', fraction=32, seed=1005,
                               variant='', lr=0.0)
    workdir = root / config.name
    status = studies.run_status(config, workdir)
    recs = studies.records(workdir)
    steps, losses = studies.train_losses(recs)
    acc = accounting.account(config)
    valid = studies.final(recs)
    diverged = status.diverged or (status.state == 'finished' and valid is not None
                                   and valid > math.log(config.model.vocab_size) - 1)
    out.setdefault(arg.study, []).append({
        'run': config.name, 'arg': dict(arg), 'state': 'diverged' if diverged else status.state,
        'step': status.step, 'steps': status.total, 'guided_steps': acc.guided_steps,
        'group': scaling.group_label(config), 'params': acc.params_total,
        'ffn_params': acc.params_ffn, 'tokens': acc.tokens, 'train_flops': acc.train_flops,
        'valid_loss': valid, 'spikes': studies.count_spikes(losses) if len(losses) else None,
        'wall_s': studies.wall_seconds(workdir), 'workdir': str(workdir),
        'curve': [[int(s), float(v)] for s, v in zip(steps, losses)],
        'valid_curve': [[int(r['step']), float(r['valid_loss'])] for r in recs
                        if 'valid_loss' in r],
    })
  return out


def _json(obj) -> str:
  return json.dumps(obj, indent=1, default=lambda o: o.item() if hasattr(o, 'item') else str(o))


def _fmt(v, digits=3):
  if v is None:
    return '-'
  if isinstance(v, float):
    return f'{v:.{digits}f}'
  return str(v)


def _md(header: list[str], rows: list[list]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(_fmt(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def _missing(runs) -> str:
  left = [r['run'] for r in runs if r['state'] not in ('finished', 'diverged')]
  return f'\n\n{len(left)} of {len(runs)} runs not finished: {", ".join(left)}.' if left else ''


def _totals(runs) -> str:
  done = [r for r in runs if r['state'] in ('finished', 'diverged')]
  wall = sum(r['wall_s'] or 0 for r in done)
  tokens = sum(r['tokens'] for r in done)
  return (f'{len(done)} runs, {tokens / 1e6:.1f}M training tokens, {wall / 60:.0f} min of wall '
          'time on 2 shared CPU cores')


# ------------------------------------------------------------------------------------- scaling


def report_scaling(runs, out: pathlib.Path) -> str:
  main = [r for r in runs if r['arg']['seed'] == 1005 and r['state'] == 'finished']
  widths = sorted({r['arg']['width'] for r in main})
  groups = sorted({r['group'] for r in main}, key=lambda g: (g != 'dense', g))
  loss = {(r['arg']['width'], r['group']): r['valid_loss'] for r in main}
  rows = []
  for g in groups:
    row = [g]
    for w in widths:
      v, d = loss.get((w, g)), loss.get((w, 'dense'))
      row.append(f'{v:.3f} ({v - d:+.3f})' if v is not None and d is not None else _fmt(v))
    rows.append(row)
  text = ['### Final validation loss by width (difference to dense of the same width)', '',
          _md(['structure'] + [f'width {w}' for w in widths], rows)]
  # Seeds: the spread between two seeds (other init and other rows) at the smallest width.
  pairs = []
  for r in runs:
    if r['arg']['seed'] != 1005 and r['state'] == 'finished':
      base = loss.get((r['arg']['width'], r['group']))
      if base is not None:
        pairs.append([r['group'], r['arg']['width'], base, r['valid_loss'],
                      r['valid_loss'] - base])
  if pairs:
    spread = max(abs(p[-1]) for p in pairs)
    text += ['', '### Seed noise (seed 1005 vs seed 2: other init, other rows)', '',
             _md(['structure', 'width', 'seed 1005', 'seed 2', 'difference'], pairs), '',
             f'Largest seed difference: {spread:.3f} nats.']
  # The paper's orderings, width by width.
  checks = []
  for w in widths:
    at = {g: loss[(w, g)] for g in groups if (w, g) in loss}
    if 'dense' not in at or len(at) < 2:
      continue
    structured = {g: v for g, v in at.items() if g != 'dense'}
    by_fraction = {}
    for g, v in structured.items():
      method, frac = g.split()
      by_fraction.setdefault(int(frac[:-1]) > 45, {})[method] = v
    ahead = all(min(m.get('lowrank', 9e9), m.get('blockdense', 9e9)) < m.get('blockshuffle', -1)
                for m in by_fraction.values())
    closer = all(by_fraction.get(True, {}).get(m, 9e9) < by_fraction.get(False, {}).get(m, -1)
                 for m in ('lowrank', 'blockdense', 'blockshuffle'))
    gap32 = np.mean([v - at['dense'] for v in by_fraction.get(False, {}).values()] or [np.nan])
    if len(structured) < 6:  # the orderings need every structure of the width
      continue
    checks.append([w, 'yes' if at['dense'] <= min(structured.values()) else 'no',
                   'yes' if ahead else 'no', 'yes' if closer else 'no', f'{gap32:+.3f}'])
  if checks:
    text += ['', "### The paper's orderings", '',
             _md(['width', 'dense best', 'LowRank/BlockDense ahead of BlockShuffle',
                  '63% closer to dense than 32%', 'mean 32% gap to dense'], checks)]
  points = [{'group': r['group'], 'flops': r['train_flops'], 'loss': r['valid_loss'],
             'run': r['run']} for r in main]
  fits = None
  try:
    fits = scaling.fit(points, 'shared')
  except scaling.ScalingError as e:
    text += ['', f'No fit: {e}.']
  if fits:
    scaling.plot(points, fits, out / 'scaling.png',
                 'CPU Figure 1a: final loss vs training FLOPs, widths ' +
                 ', '.join(map(str, widths)))
    text += ['', '### Fitted L = a·(C/1e12)^(-b) + c (one c for all)', '',
             _md(['structure', 'runs', 'a', 'b', 'c', 'rmse'],
                 [[g, f['points'], f['a'], f['b'], f['c'], f['rmse']] for g, f in fits.items()])]
  (out / 'scaling.json').write_text(_json({'runs': runs, 'fits': fits}))
  return '\n'.join(text) + _missing(runs)


# ------------------------------------------------------------------------------------------ lr


def report_lr(runs, out: pathlib.Path) -> str:
  variants = ['dense', 'lowrank', 'lowrank_sgt']
  lrs = sorted({r['arg']['lr'] for r in runs})
  cell = {(r['arg']['variant'] or 'dense', r['arg']['lr']): r for r in runs}
  rows = []
  for v in variants:
    row = [v]
    for lr in lrs:
      r = cell.get((v, lr))
      if r is None or r['state'] in ('new', 'partial'):
        row.append('-')
      elif r['state'] == 'diverged':
        row.append(f'diverged (step {r["step"]})')
      else:
        row.append(f'{r["valid_loss"]:.3f} / {r["spikes"]}')
    rows.append(row)
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for v in variants:
    xs = [lr for lr in lrs if (v, lr) in cell and cell[(v, lr)]['state'] == 'finished']
    axes[0].plot(xs, [cell[(v, lr)]['valid_loss'] for lr in xs], 'o-', label=v)
  axes[0].set_xscale('log')
  axes[0].set_xticks(lrs, [f'{lr:g}' for lr in lrs])
  axes[0].minorticks_off()
  axes[0].set_xlabel('peak learning rate')
  axes[0].set_ylabel('final validation loss')
  axes[0].legend()
  axes[0].grid(alpha=0.3)
  top = [lr for lr in lrs if any((v, lr) in cell for v in variants)][-2:]
  for v in variants:
    for lr, style in zip(top, ('-', '--')):
      r = cell.get((v, lr))
      if r and r['curve']:
        c = np.array(r['curve'])
        axes[1].plot(c[:, 0], c[:, 1], style, lw=0.8, label=f'{v} lr {lr:g}')
  axes[1].set_xlabel('step')
  axes[1].set_ylabel('training loss')
  axes[1].set_title('training loss at the two highest learning rates')
  if axes[1].lines:
    axes[1].legend(fontsize=7)
  axes[1].grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out / 'lr.png', dpi=120)
  plt.close(fig)
  (out / 'lr.json').write_text(_json({'runs': runs}))
  return ('### Final validation loss / spikes, by peak learning rate\n\n'
          + _md(['variant'] + [f'lr {lr:g}' for lr in lrs], rows) + _missing(runs))


# ----------------------------------------------------------------------------------------- sgt


def _flops_plot(runs, path, title):
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 4.3))
  for r in runs:
    if r['valid_curve']:
      c = np.array(r['valid_curve'], dtype=np.float64)
      ax.plot(c[:, 0] / r['steps'] * r['train_flops'], c[:, 1], 'o-', ms=3, label=r['run'])
  ax.set_xlabel('training FLOPs (at each evaluation)')
  ax.set_ylabel('validation loss')
  ax.set_title(title)
  if ax.lines:
    ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def report_table(runs, out: pathlib.Path, study: str, title: str, extra=None) -> str:
  done = [r for r in runs if r['state'] == 'finished']
  ref = next((r['valid_loss'] for r in done if r['arg']['variant'] in ('plain', 'dense', '')
              and r['arg']['method'] == 'dense'), None)
  rows = []
  for r in runs:
    rows.append([r['run'], r['state'], f'{r["steps"]} ({r["guided_steps"]})',
                 f'{r["params"] / 1e6:.2f}M', f'{r["tokens"] / 1e6:.2f}M',
                 f'{r["train_flops"]:.3g}', r['valid_loss'],
                 f'{r["valid_loss"] - ref:+.3f}' if ref is not None and r['valid_loss'] else '-'] +
                ([extra.get(r['run'], '-')] if extra is not None else []))
  _flops_plot(done, out / f'{study}.png', title)
  (out / f'{study}.json').write_text(_json({'runs': runs, 'extra': extra}))
  header = ['run', 'state', 'steps (guided)', 'params', 'tokens', 'train FLOPs', 'valid loss',
            'vs dense'] + (['decode tok/s'] if extra is not None else [])
  return _md(header, rows) + _missing(runs)


def decode_throughput(path: pathlib.Path | None) -> dict | None:
  """{run name: best decode tokens/s} from a `bench.decode --part table2 --config ...` JSON."""
  if path is None or not path.is_file():
    return None
  rows = json.loads(path.read_text())['table2']
  return {r['variant']: f'{r["tokens_per_s"]:,.0f}' for r in rows if r['batch'] == 'best'}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python launch/cpu_reproduction_report.py',
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog='\n'.join(__doc__.splitlines()[1:]))
  p.add_argument('--root', default='runs/cpu_repro', help='the sweep root of the studies')
  p.add_argument('--out', default='results/cpu_repro', help='folder of the JSON, PNG and tables')
  p.add_argument('--decode', default='', help='bench.decode JSON of the wide study (optional)')
  args = p.parse_args(argv)
  root, out = pathlib.Path(args.root), pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  runs = load_runs(root)
  sections = [
      ('Study 1: Table 1 / Figure 1a in miniature', report_scaling(runs['scaling'], out),
       runs['scaling']),
      ('Study 2: Figure 3 in miniature (learning-rate sensitivity)', report_lr(runs['lr'], out),
       runs['lr']),
      ('Study 3: Tables 3, 4 and 10 in miniature (self-guided training at equal FLOPs)',
       report_table(runs['sgt'], out, 'sgt', 'CPU SGT study, width 64, 32%'), runs['sgt']),
      ('Study 4: Table 2 in miniature (wide LowRank + GQA at equal FLOPs)',
       report_table(runs['wide'], out, 'wide', 'CPU wide & structured study, width 128',
                    decode_throughput(pathlib.Path(args.decode) if args.decode else None)),
       runs['wide']),
  ]
  text = '\n\n'.join(f'## {title}\n\n{_totals(rs)}.\n\n{body}' for title, body, rs in sections)
  (out / 'report.md').write_text(text + '\n')
  print(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
