"""Tables, plots and verdicts of the CPU studies (configs/cpu_reproduction.py), from their runs.

  python launch/cpu_reproduction_report.py --record results/cpu_repro2/runs \\
      [--root /path/to/sweep/root] --out results/cpu_repro2

Each variant of the config is read from its record (launch/sweep.py --record) or, failing that,
its workdir under --root. A study whose runs are not all finished is reported with the finished
ones, says how many are missing, and its verdicts say "inconclusive" where seeds are missing.
Writes, per study, <out>/<study>.json (every run's numbers) and <out>/<study>.png, all verdicts in
<out>/verdicts.json, and the Markdown of <out>/report.md, which RESULTS.md quotes. The verdicts
come from structffn_jax/decisions.py, applying the rules stated in the config's docstring. Nothing
here trains; rerun it as runs finish. Exit status 1 when TUNED_LR disagrees with the probe.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from structffn_jax import accounting, decisions, scaling, studies  # noqa: E402
from structffn_jax import config as config_lib  # noqa: E402

CONFIG = REPO / 'configs' / 'cpu_reproduction.py'
# Table 1 of the paper (Transformer-xl, validation PPL) and Table 2 (Transformer-m).
PAPER_T1 = {('dense', 100): 12.46, ('lowrank', 63): 12.86, ('blockdense', 63): 12.97,
            ('blockshuffle', 63): 12.98, ('lowrank', 32): 13.55, ('blockdense', 32): 13.74,
            ('blockshuffle', 32): 13.81}
PAPER_T2 = {'dense': 18.29, 'gqa': 18.23, 'ours': 17.89}
BOOTSTRAP = 2000


def _plt():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _axes(ax, xlabel, ylabel, title=None, *, logx=False, legend_size=8):
  """The labels, grid and legend (when anything was drawn) every plot of the report shares."""
  if logx:
    ax.set_xscale('log')
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  if ax.lines:
    ax.legend(fontsize=legend_size)


def _save(fig, path):
  plt = _plt()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def label(method: str, fraction: int) -> str:
  return 'dense' if method == 'dense' else f'{method} {fraction}%'


def paper_gap(method: str, fraction: int) -> float | None:
  """The paper's Table 1 gap to dense in nats: ln(PPL) - ln(PPL dense)."""
  ppl = PAPER_T1.get((method, fraction))
  return None if ppl is None else math.log(ppl) - math.log(PAPER_T1[('dense', 100)])


# ----------------------------------------------------------------------------- reading runs


def run_dir(name: str, record: pathlib.Path | None, root: pathlib.Path | None) -> pathlib.Path:
  """The record of run `name` if one is there, else its workdir (which may not exist yet)."""
  if record is not None and (record / name / 'config.json').exists():
    return record / name
  return (root or record or pathlib.Path('.')) / name


def read_run(config, variant: dict, path: pathlib.Path) -> dict:
  """One run's numbers: plan, accounting, final and intermediate losses, spikes, times."""
  status = studies.run_status(config, path)
  recs = studies.records(path)
  steps, losses = studies.train_losses(recs)
  acc = accounting.account(config)
  valid = studies.final(recs) if status.state == 'finished' else None
  diverged = status.diverged or (valid is not None
                                 and valid > math.log(config.model.vocab_size) - 1)
  batch_tokens = config.train.global_batch * config.model.seq_len
  method = config.model.ffn.method
  fraction = 100 if method == 'dense' else int(variant.get('fraction', 32))
  return {
      'run': config.name, 'variant': variant, 'state': 'diverged' if diverged else status.state,
      'width': config.model.hidden_dim, 'method': method, 'fraction': fraction,
      'label': label(method, fraction), 'seed': config.train.seed, 'lr': config.train.peak_lr,
      'step': status.step, 'steps': status.total, 'guided_steps': acc.guided_steps,
      'warmup_steps': max(1, round(config.train.warmup_frac * acc.steps)),
      'params': acc.params_total, 'ffn_params': acc.params_ffn, 'tokens': acc.tokens,
      'train_flops': acc.train_flops,
      'ffn_flop_share': 2 * acc.params_ffn / acc.flops_per_token,
      'valid_loss': None if diverged else valid,
      'valid_curve': [[int(r['step']) * batch_tokens, float(r['valid_loss'])] for r in recs
                      if 'valid_loss' in r],
      'spikes': studies.count_spikes(losses) + diverged if len(losses) else None,
      'spike_steps': [int(steps[i]) for i in studies.spike_steps(losses)],
      'wall_s': studies.wall_seconds(path), 'cpu_s': studies.cpu_seconds(path), 'dir': str(path),
      '_curve': [[int(s), float(v)] for s, v in zip(steps, losses)],
  }


def load_runs(module, record, root) -> dict[str, list[dict]]:
  """{study: [run]} for every variant of the config, finished or not."""
  out: dict[str, list[dict]] = {}
  for variant in module.VARIANTS:
    config = module.get_config(variant)
    config_lib.validate(config)
    arg = studies_arg(variant)
    out.setdefault(arg['study'], []).append(
        read_run(config, arg, run_dir(config.name, record, root)))
  return out


def studies_arg(variant: str) -> dict:
  """A variant 'study=x,k=v,...' as a dict, numbers as numbers."""
  out = {}
  for item in variant.split(','):
    key, _, value = item.partition('=')
    try:
      out[key] = int(value)
    except ValueError:
      try:
        out[key] = float(value)
      except ValueError:
        out[key] = value
  return out


def _done(runs) -> list[dict]:
  return [r for r in runs if r['state'] == 'finished']


_json, _fmt, _md, _pm = (studies.report_json, studies.cell, studies.markdown_table,
                          studies.plus_minus)


def _verdict_row(claim: str, v: decisions.Verdict) -> list:
  return [claim, f'**{v.verdict}**', v.why]


def _verdict_table(rows) -> str:
  return _md(['claim', 'verdict', 'numbers'], rows)


def _missing(runs) -> str:
  left = [r['run'] for r in runs if r['state'] not in ('finished', 'diverged')]
  return (f'\n\n{len(left)} of {len(runs)} runs not finished yet: {", ".join(left[:12])}'
          + (' ...' if len(left) > 12 else '') + '.') if left else ''


def totals(runs) -> str:
  done = [r for r in runs if r['state'] in ('finished', 'diverged')]
  wall = sum(r['wall_s'] or 0 for r in done)
  cpu = sum(r['cpu_s'] or 0 for r in done)
  tokens = sum(r['tokens'] for r in done)
  return (f'{len(done)} of {len(runs)} runs done, {tokens / 1e6:.1f}M training tokens, '
          f'{wall / 60:.0f} min wall time, {cpu / 60:.0f} min CPU time')


def by_seed(runs, **match) -> dict[int, dict]:
  """{seed: run} of the finished runs whose fields equal `match`."""
  return {r['seed']: r for r in _done(runs) if all(r[k] == v for k, v in match.items())}


def gaps(a: dict[int, dict], b: dict[int, dict]) -> list[float]:
  """Paired gaps L(a, s) - L(b, s) over the seeds both have."""
  return [a[s]['valid_loss'] - b[s]['valid_loss'] for s in sorted(a) if s in b]


# ----------------------------------------------------------------------------- probe


def report_probe(module, runs, out) -> tuple[str, list[str], dict]:
  """The probe's table, each structure's best LR, and disagreements with TUNED_LR."""
  lrs = sorted({r['lr'] for r in runs})
  rows, problems, best = [], [], {}
  for method, fraction in module.STRUCTURES_MAIN:
    cell = {r['lr']: r for r in runs if (r['method'], r['fraction']) == (method, fraction)}
    # This structure's own grid: PROBE_LRS and the LRs its edge rule added.
    losses = {lr: r['valid_loss'] if r['state'] == 'finished'
              else (math.inf if r['state'] == 'diverged' else None) for lr, r in cell.items()}
    complete = bool(losses) and all(v is not None for v in losses.values())
    row = [label(method, fraction)] + [
        ('diverged' if losses.get(lr) == math.inf else losses.get(lr)) if lr in cell else ''
        for lr in lrs]
    if complete:
      lr, edge = decisions.best_lr(losses)
      best[(method, fraction)] = lr
      row += [f'{lr:g}' + (' (edge)' if edge else '')]
      tuned = module.TUNED_LR.get((method, fraction))
      if edge:
        problems.append(f'{label(method, fraction)}: the best probe LR {lr:g} is at the grid\'s '
                        'edge; extend PROBE_LRS past it')
      if tuned is not None and tuned != lr:
        problems.append(f'{label(method, fraction)}: TUNED_LR {tuned:g} is not the probe\'s '
                        f'best {lr:g}')
    else:
      row += ['-']
    rows.append(row)
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for method, fraction in module.STRUCTURES_MAIN:
    pts = sorted((r['lr'], r['valid_loss']) for r in _done(runs)
                 if (r['method'], r['fraction']) == (method, fraction))
    if pts:
      ax.plot(*zip(*pts), 'o-', label=label(method, fraction))
  _axes(ax, 'peak learning rate', 'final validation loss',
        f'LR probe, width {module.PROBE_WIDTH}, {module.PROBE_BUDGET:g} of the compute-optimal '
        'tokens', logx=True)
  _save(fig, out / 'probe.png')
  text = _md(['structure'] + [f'lr {lr:g}' for lr in lrs] + ['best'], rows)
  if problems:
    text += '\n\n' + '\n'.join(f'- **{p}**' for p in problems)
  (out / 'probe.json').write_text(_json({'runs': runs, 'best': {label(*k): v for k, v in
                                                                best.items()},
                                         'problems': problems}))
  return text + _missing(runs), problems, best


# ----------------------------------------------------------------------------- widths


def init_norms(module, seed: int = 1) -> list[dict]:
  """Frobenius norms at init of every structured FFN matrix (as its dense product) and of the
  dense init, per width and structure: the paper's fixed-std init against the width."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from structffn_jax import structured  # pylint: disable=import-outside-toplevel

  rows = []
  for width in module.WIDTHS:
    base = module.get_config(f'study=probe,method=dense,fraction=100,lr=1e-3')
    std = base.model.init_std
    for method, fraction in module.STRUCTURES_MAIN:
      ffn = module.structures(width)[(method, 100 if method == 'dense' else fraction)]
      norms = {}
      for name, (n, m) in (('fc1', (width, 4 * width)), ('fc2', (4 * width, width))):
        layer = structured.make_linear(method, n, m, rank=ffn['rank'], blocks=ffn['blocks'],
                                       init='paper', std=std, rngs=nnx.Rngs(params=seed))
        norms[name] = float(jnp.linalg.norm(layer.to_dense()))
      rows.append({'width': width, 'structure': label(method, fraction), **norms,
                   'dense_fc1': std * math.sqrt(4 * width * width),
                   'dense_fc2': std * math.sqrt(4 * width * width)})
  for r in rows:
    dense = next(d for d in rows if d['width'] == r['width'] and d['structure'] == 'dense')
    r['fc1_ratio'], r['fc2_ratio'] = r['fc1'] / dense['fc1'], r['fc2'] / dense['fc2']
  return rows


def report_widths(module, all_runs, out) -> str:
  """Per width: the dense model's parameters, tokens, FLOPs and the FFN's share of the FLOPs, and
  every structure's init norms."""
  rows = []
  for width in module.WIDTHS:
    c = module.get_config(f'study=probe,method=dense,fraction=100,lr=1e-3')
    c.model.update(hidden_dim=width, ffn_dim=4 * width, attn_dim=width,
                   num_heads=width // module.HEAD_DIM, num_kv_heads=width // module.HEAD_DIM)
    c.train.tokens = module.compute_optimal_tokens(width)
    acc = accounting.account(c)
    shares = sorted({(r['label'], round(r['ffn_flop_share'], 3)) for rs in all_runs.values()
                     for r in rs if r['width'] == width and r['variant'].get('study') in
                     ('table1', 'scaling')})
    rows.append([width, f'{acc.params_total:,}', f'{acc.tokens / 1e6:.2f}M',
                 f'{acc.tokens / acc.params_total:.1f}', f'{acc.train_flops:.3g}',
                 f'{2 * acc.params_ffn / acc.flops_per_token:.0%}',
                 ', '.join(f'{lab} {s:.0%}' for lab, s in shares if lab != 'dense')])
  norms = init_norms(module)
  norm_rows = [[r['width'], r['structure'], r['fc1'], r['fc2'], f'{r["fc1_ratio"]:.3f}',
                f'{r["fc2_ratio"]:.3f}'] for r in norms]
  (out / 'widths.json').write_text(_json({'init_norms': norms}))
  return ('### Budgets and the FFN\'s share of the forward FLOPs\n\n'
          + _md(['width', 'dense params', 'tokens', 'tokens/param', 'dense train FLOPs',
                 'FFN share (dense)', 'FFN share (structured)'], rows)
          + '\n\n### Initial FFN weight norms (Frobenius, of the dense product; seed 1)\n\n'
          + _md(['width', 'structure', '‖fc1‖', '‖fc2‖', 'fc1 / dense', 'fc2 / dense'],
                norm_rows))


# ----------------------------------------------------------------------------- Table 1


def _curve_gaps(a: dict[int, dict], b: dict[int, dict]):
  """(tokens, mean paired gap) at each evaluation both curves have, over the shared seeds."""
  seeds = [s for s in a if s in b]
  if not seeds:
    return [], []
  steps = [x for x, _ in a[seeds[0]]['valid_curve']]
  out = []
  for i, x in enumerate(steps):
    g = []
    for s in seeds:
      ca, cb = dict(map(tuple, a[s]['valid_curve'])), dict(map(tuple, b[s]['valid_curve']))
      if x in ca and x in cb:
        g.append(ca[x] - cb[x])
    out.append(float(np.mean(g)) if len(g) == len(seeds) else math.nan)
  keep = [i for i, v in enumerate(out) if math.isfinite(v)]
  return [steps[i] for i in keep], [out[i] for i in keep]


def report_table1(module, runs, out) -> tuple[str, list]:
  text, verdicts = [], []
  plt = _plt()
  widths = module.TABLE1_WIDTHS
  fig, axes = plt.subplots(1, len(widths), figsize=(6 * len(widths), 4), squeeze=False)
  for ax, width in zip(axes[0], widths):
    dense = by_seed(runs, width=width, method='dense')
    rows, claims = [], []
    for method, fraction in module.STRUCTURES_MAIN:
      these = by_seed(runs, width=width, method=method, fraction=fraction)
      mean, se = decisions.mean_se([r['valid_loss'] for r in these.values()])
      row = [label(method, fraction), len(these), f'{mean:.3f} ± {se:.3f}' if these else '-']
      if method != 'dense':
        g = gaps(these, dense)
        gm, gse = decisions.mean_se(g)
        v = decisions.paired(g, +1)
        claims.append((f'T1a w{width}: dense beats {label(method, fraction)}', v))
        xs, curve = _curve_gaps(these, dense)
        settled = decisions.settled_from(xs, curve)
        row += [_pm(gm, gse), f'{paper_gap(method, fraction):+.3f}',
                f'{settled / 1e6:.2f}M' if settled is not None else '-']
        if xs:
          ax.plot(np.array(xs) / 1e6, curve, 'o-', ms=3, label=label(method, fraction))
      else:
        row += ['', '', '']
      rows.append(row)
    lr32 = by_seed(runs, width=width, method='lowrank', fraction=32)
    lr63 = by_seed(runs, width=width, method='lowrank', fraction=63)
    claims.append((f'T1b w{width}: LowRank 63% closer to dense than 32%',
                   decisions.paired(gaps(lr32, lr63), +1)))
    s32 = {m: by_seed(runs, width=width, method=m, fraction=32)
           for m in ('lowrank', 'blockdense', 'blockshuffle')}
    for a, b in (('blockshuffle', 'lowrank'), ('blockshuffle', 'blockdense'),
                 ('blockdense', 'lowrank')):
      claims.append((f'T1c w{width}: {b} 32% ahead of {a} 32%',
                     decisions.paired(gaps(s32[a], s32[b]), +1)))
    verdicts += claims
    text += [f'### Width {width}: final validation loss over seeds, paired gap to dense', '',
             _md(['structure', 'seeds', 'loss (mean ± se)', 'gap to dense (mean ± se)',
                  "paper's gap (xl)", 'gap keeps its sign from'], rows), '',
             _verdict_table([_verdict_row(c, v) for c, v in claims]), '']
    ax.axhline(0, color='k', lw=0.8)
    _axes(ax, 'training tokens (M)', 'mean paired gap to dense (nats)',
          f'Table 1, width {width}: structure − dense along training')
  _save(fig, out / 'table1.png')
  (out / 'table1.json').write_text(_json({'runs': runs, 'verdicts': dict(verdicts)}))
  return '\n'.join(text) + _missing(runs), verdicts


# ----------------------------------------------------------------------------- Figure 1a


def _fit_b(points) -> dict[str, float]:
  return {g: f['b'] for g, f in scaling.fit(points, 'shared').items()}


def report_scaling(module, runs, out, resamples: int = BOOTSTRAP) -> tuple[str, list]:
  """Fit on the seed means; a bootstrap that draws each point's seed at random."""
  cells: dict[tuple, dict[int, dict]] = {}
  for r in _done(runs):
    if (r['method'], r['fraction']) in module.STRUCTURES_SCALING:
      cells.setdefault((r['label'], r['width']), {})[r['seed']] = r
  points = [{'group': g, 'flops': next(iter(c.values()))['train_flops'],
             'loss': float(np.mean([r['valid_loss'] for r in c.values()])), 'run': f'{g} w{w}',
             'seeds': len(c)} for (g, w), c in sorted(cells.items())]
  text, verdicts = [], []
  try:
    if not points:
      raise scaling.ScalingError('no finished runs')
    fits = scaling.fit(points, 'shared')
  except scaling.ScalingError as e:
    (out / 'scaling.json').write_text(_json({'runs': runs, 'points': points}))
    return f'No fit yet: {e}.' + _missing(runs), []
  rng = np.random.default_rng(0)
  boots = []
  for _ in range(resamples):
    sample = [dict(p, loss=float(c[rng.choice(sorted(c))]['valid_loss']))
              for p, c in zip(points, (cells[k] for k in sorted(cells)))]
    try:
      boots.append(_fit_b(sample))
    except (scaling.ScalingError, ValueError, RuntimeError):
      continue
  rows = []
  # The bootstrap's spread is the seeds': it needs every seed of every size of both curves.
  full = {g: all(len(cells.get((g, w), {})) == len(module.SEEDS) for w in module.WIDTHS)
          for g in fits}
  for g, f in fits.items():
    row = [g, f['points'], f['a'], f['b'], f['c'], f['rmse']]
    if g != 'dense' and 'dense' in fits:
      db = f['b'] - fits['dense']['b']
      if full[g] and full['dense']:
        v = decisions.bootstrap_difference(db, [b[g] - b['dense'] for b in boots], +1)
      else:
        v = decisions.Verdict(decisions.INCONCLUSIVE, decisions.BOOTSTRAP_RULE,
                              f'estimate {db:+.4f}; the bootstrap needs all {len(module.SEEDS)} '
                              f'seeds at all {len(module.WIDTHS)} widths of both curves', db)
      verdicts.append((f'F1: {g} steeper than dense (b - b_dense > 0)', v))
      row += [f'{db:+.3f} ± {v.se:.3f}' if v.se is not None else f'{db:+.3f}']
    else:
      row += ['']
    rows.append(row)
  widths = list(module.WIDTHS)  # the claim is about the smallest and the largest size
  by_width = {}  # paired gap to dense at every width, the numbers behind F1'
  for method, fraction in module.STRUCTURES_SCALING[1:]:
    g = label(method, fraction)
    by_width[g] = {}
    for w in widths:
      pair = gaps(cells.get((g, w), {}), cells.get(('dense', w), {}))
      if pair:
        by_width[g][w] = decisions.mean_se(pair)
  for method, fraction in module.STRUCTURES_SCALING[1:]:
    g = label(method, fraction)
    lo, hi = cells.get(('dense', widths[0]), {}), cells.get(('dense', widths[-1]), {})
    slo, shi = cells.get((g, widths[0]), {}), cells.get((g, widths[-1]), {})
    seeds = [s for s in module.SEEDS if all(s in c for c in (lo, hi, slo, shi))]
    narrowing = [(shi[s]['valid_loss'] - hi[s]['valid_loss'])
                 - (slo[s]['valid_loss'] - lo[s]['valid_loss']) for s in seeds]
    verdicts.append((f"F1': {g}'s gap to dense narrows from width {widths[0]} to {widths[-1]}",
                     decisions.paired(narrowing, -1)))
  scaling.plot(points, fits, out / 'scaling.png',
               'Figure 1a on CPU: seed-mean final loss vs training FLOPs, widths '
               + ', '.join(map(str, widths)))
  text += ['### Paired gap to dense at equal tokens, by width (mean ± se over seeds)', '',
           _md(['structure'] + [f'width {w}' for w in widths],
               [[g] + [_pm(*gw[w]) if w in gw else '-' for w in widths]
                for g, gw in by_width.items()]), '']
  text += ['### Fitted L = a·(C/1e12)^(-b) + c (one c for all; seed means)', '',
           _md(['structure', 'points', 'a', 'b', 'c', 'rmse', 'b − b_dense (± bootstrap se)'],
               rows), '', f'{len(boots)} of {resamples} bootstrap resamples fitted.', '']
  at_bound = sorted(g for g, f in fits.items() if f['c'] <= 1e-9)
  if at_bound:  # the fit's own lower bound: these points do not pin an irreducible loss
    text += [f'The shared irreducible loss c ended at its lower bound 0 ({", ".join(at_bound)}): '
             'these sizes do not pin it, and each b is then the slope of log L against log C.',
             '']
  text += [
           _verdict_table([_verdict_row(c, v) for c, v in verdicts])]
  (out / 'scaling.json').write_text(_json({'runs': runs, 'points': points, 'fits': fits,
                                           'bootstrap_fits': len(boots),
                                           'gap_by_width': {g: {str(w): {'mean': m, 'se': e}
                                                                for w, (m, e) in gw.items()}
                                                            for g, gw in by_width.items()},
                                           'verdicts': dict(verdicts)}))
  return '\n'.join(text) + _missing(runs), verdicts


# ----------------------------------------------------------------------------- Figure 3


def report_lr(module, runs, out) -> tuple[str, list]:
  variants = ('dense', 'lowrank', 'lowrank_sgt')  # the claims' arms
  lrs = sorted({r['lr'] for r in runs})
  cell = {(r['variant']['variant'], r['lr']): r for r in runs}
  # The diagnostic row added after the main runs (LowRank 63%): shown, in no claim.
  shown = variants + tuple(sorted({v for v, _ in cell} - set(variants)))
  rows = []
  for v in shown:
    row = [v]
    for lr in lrs:
      r = cell.get((v, lr))
      if r is None or r['state'] in ('new', 'partial'):
        row.append('-')
      elif r['state'] == 'diverged':
        row.append(f'diverged (step {r["step"]}) / {r["spikes"]}')
      else:
        row.append(f'{r["valid_loss"]:.3f} / {r["spikes"]}')
    rows.append(row)
  ended = [lr for lr in lrs if all((v, lr) in cell and cell[(v, lr)]['state'] in
                                   ('finished', 'diverged') for v in variants)]
  count = {v: {lr: cell[(v, lr)]['spikes'] for lr in ended} for v in variants}
  dense_diverged = {lr: cell[('dense', lr)]['state'] == 'diverged' for lr in ended}
  verdicts = []
  if len(ended) < len(module.LR_GRID):  # the rules count spikes over the whole grid
    why = f'{len(ended)} of the {len(module.LR_GRID)} LRs have all three runs ended'
    verdicts = [('F3a: LowRank 32% spikes more than dense',
                 decisions.Verdict(decisions.INCONCLUSIVE, decisions.SPIKES_MORE_RULE, why)),
                ('F3b: SGT removes LowRank\'s spikes',
                 decisions.Verdict(decisions.INCONCLUSIVE, decisions.SPIKES_REMOVED_RULE, why))]
  else:
    more = decisions.spikes_more(count['lowrank'], count['dense'], dense_diverged)
    trains = [lr for lr in ended if not dense_diverged[lr]]
    verdicts = [('F3a: LowRank 32% spikes more than dense', more),
                ('F3b: SGT removes LowRank\'s spikes',
                 decisions.spikes_removed(count['lowrank_sgt'], count['lowrank'], trains))]
  best = {}  # the probe's LRs came from a smaller width at a smaller budget: how far off were they
  for v in shown:
    done = [(cell[(v, lr)]['valid_loss'], lr) for lr in lrs
            if (v, lr) in cell and cell[(v, lr)]['state'] == 'finished']
    if done:
      loss, lr = min(done)
      best[v] = {'valid_loss': loss, 'lr': lr}
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for v in shown:
    xs = [lr for lr in lrs if (v, lr) in cell and cell[(v, lr)]['state'] == 'finished']
    axes[0].plot(xs, [cell[(v, lr)]['valid_loss'] for lr in xs], 'o-', label=v)
  _axes(axes[0], 'peak learning rate', 'final validation loss', logx=True, legend_size=10)
  top = [lr for lr in lrs if ('dense', lr) in cell and cell[('dense', lr)]['_curve']][-2:]
  for v in variants:
    for lr, style in zip(top, ('-', '--')):
      r = cell.get((v, lr))
      if r and r['_curve']:
        c = np.array(r['_curve'])
        axes[1].plot(c[:, 0], c[:, 1], style, lw=0.7, label=f'{v} lr {lr:g}')
  _axes(axes[1], 'step', 'training loss', 'training loss at the two highest learning rates run',
        legend_size=7)
  _save(fig, out / 'lr.png')
  (out / 'lr.json').write_text(_json({'runs': runs, 'verdicts': dict(verdicts), 'best': best,
                                      'curves': {r['run']: r['_curve'] for r in runs}}))
  text = ('### Final validation loss / spikes (a divergence counts one), by peak LR\n\n'
          + _md(['variant'] + [f'lr {lr:g}' for lr in lrs], rows))
  if verdicts:
    text += '\n\n' + _verdict_table([_verdict_row(c, v) for c, v in verdicts])
  if best:
    text += ('\n\nBest LR of this grid at the full budget (one seed), reported: '
             + '; '.join(f'{v} {b["valid_loss"]:.3f} at {b["lr"]:g}' for v, b in best.items()))
    if 'dense' in best:
      text += '; each at its best, minus dense: ' + ', '.join(
          f'{v} {b["valid_loss"] - best["dense"]["valid_loss"]:+.3f}'
          for v, b in best.items() if v != 'dense') + ' nats.'
  return text + _missing(runs), verdicts


# ----------------------------------------------------------------------------- SGT, Table 2


def _arm_rows(arms: dict[str, dict[int, dict]], ref: str) -> list[list]:
  rows = []
  for name, these in arms.items():
    if not these:
      rows.append([name] + ['-'] * 7)
      continue
    r = next(iter(these.values()))
    mean, se = decisions.mean_se([x['valid_loss'] for x in these.values()])
    g = gaps(these, arms[ref]) if name != ref else []
    rows.append([name, len(these), f'{r["steps"]} ({r["guided_steps"]}; warm-up '
                 f'{r["warmup_steps"]})', f'{r["params"]:,}', f'{r["tokens"] / 1e6:.2f}M',
                 f'{r["train_flops"]:.3g}', f'{mean:.3f} ± {se:.3f}',
                 _pm(*decisions.mean_se(g)) if g else ''])
  return rows


_ARM_HEADER = ['arm', 'seeds', 'steps (guided; warm-up)', 'params', 'tokens', 'train FLOPs',
               'loss (mean ± se)', f'gap to the reference']


def report_sgt(module, runs, table1_runs, out) -> tuple[str, list]:
  width = module.SGT_WIDTH
  arms = {'dense': by_seed(table1_runs, width=width, method='dense'),
          'plain': by_seed(table1_runs, width=width, method='lowrank', fraction=32)}
  for v in ('fixedstep', 'fixedflop', 'more_tokens'):
    arms[v] = {r['seed']: r for r in _done(runs) if r['variant']['variant'] == v}
  verdicts = [
      ('S1: fixedstep SGT beats plain LowRank at equal steps',
       decisions.paired(gaps(arms['plain'], arms['fixedstep']), +1)),
      ('S2: fixedflop SGT beats more tokens at equal FLOPs',
       decisions.paired(gaps(arms['more_tokens'], arms['fixedflop']), +1)),
  ]
  s3 = decisions.mean_se(gaps(arms['fixedflop'], arms['dense']))
  _flops_plot([r for a in arms.values() for s, r in a.items() if s == module.SEEDS[0]],
              out / 'sgt.png', f'SGT at equal FLOPs, width {width}, LowRank 32%, seed '
              f'{module.SEEDS[0]}')
  (out / 'sgt.json').write_text(_json({'runs': runs, 'verdicts': dict(verdicts),
                                       'fixedflop_minus_dense': s3}))
  return ('### Arms (reference: dense of the same seed)\n\n'
          + _md(_ARM_HEADER, _arm_rows(arms, 'dense')) + '\n\n'
          + _verdict_table([_verdict_row(c, v) for c, v in verdicts])
          + f'\n\nS3 (reported): fixedflop − dense at equal FLOPs {_pm(*s3)} nats.'
          + _missing(runs)), verdicts


def report_wide(module, runs, out) -> tuple[str, list]:
  arms = {v: {r['seed']: r for r in _done(runs) if r['variant']['variant'] == v}
          for v in ('dense', 'gqa', 'ours_same_tokens', 'ours')}
  verdicts = [('W1: ours beats dense at equal FLOPs',
               decisions.paired(gaps(arms['dense'], arms['ours']), +1))]
  model_part = decisions.mean_se(gaps(arms['dense'], arms['ours_same_tokens']))
  token_part = decisions.mean_se(gaps(arms['ours_same_tokens'], arms['ours']))
  _flops_plot([r for a in arms.values() for s, r in a.items() if s == module.SEEDS[0]],
              out / 'wide.png', f'Table 2 on CPU, width {module.WIDE_WIDTH}, seed '
              f'{module.SEEDS[0]}')
  (out / 'wide.json').write_text(_json({'runs': runs, 'verdicts': dict(verdicts),
                                        'gain_at_dense_tokens': model_part,
                                        'gain_from_extra_tokens': token_part}))
  paper = (f"The paper (Transformer-m): dense {PAPER_T2['dense']}, GQA {PAPER_T2['gqa']}, ours "
           f"{PAPER_T2['ours']} PPL: ours {math.log(PAPER_T2['dense'] / PAPER_T2['ours']):.3f} "
           'nats ahead of dense.')
  return ('### Arms (reference: dense of the same seed)\n\n'
          + _md(_ARM_HEADER, _arm_rows(arms, 'dense')) + '\n\n'
          + _verdict_table([_verdict_row(c, v) for c, v in verdicts])
          + f'\n\nW2 (reported): the gain L(dense) − L(ours) split into the model at dense\'s '
          f'tokens, {_pm(*model_part)}, and the extra tokens, {_pm(*token_part)} nats. '
          + paper + _missing(runs)), verdicts


def _flops_plot(runs, path, title):
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 4.3))
  for r in runs:
    if r['valid_curve']:
      c = np.array(r['valid_curve'], dtype=np.float64)
      per_token = r['train_flops'] / r['tokens']
      ax.plot(c[:, 0] * per_token, c[:, 1], 'o-', ms=3, label=r['run'])
  _axes(ax, 'training FLOPs (at each evaluation)', 'validation loss', title, legend_size=7)
  _save(fig, path)


def first_design_budget(path: str) -> list[dict]:
  """Per scaling run of the first design's config (`git show 89446f5:configs/
  cpu_reproduction.py`): tokens per parameter, and the head's and FFN's shares of the FLOPs."""
  old = config_lib.config_module(path)
  rows = []
  for variant in old.VARIANTS:
    if not variant.startswith('study=scaling') or 'seed=' in variant:
      continue
    c = old.get_config(variant)
    acc = accounting.account(c)
    rows.append({'run': c.name, 'tokens_per_param': acc.tokens / acc.params_total,
                 'head_flop_share': 2 * c.model.vocab_size * c.model.hidden_dim
                 / acc.flops_per_token,
                 'ffn_flop_share': 2 * acc.params_ffn / acc.flops_per_token,
                 'ffn_params': acc.params_ffn})
  return rows


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python launch/cpu_reproduction_report.py',
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog='\n'.join(__doc__.splitlines()[1:]))
  p.add_argument('--record', default='results/cpu_repro2/runs',
                 help='the runs recorded by launch/sweep.py --record')
  p.add_argument('--root', default='', help='the sweep root, for runs not recorded')
  p.add_argument('--out', default='results/cpu_repro2', help='folder of the JSON, PNG, tables')
  p.add_argument('--config', default=str(CONFIG), help='the studies\' config')
  p.add_argument('--bootstrap', type=int, default=BOOTSTRAP, help='resamples of the fit')
  p.add_argument('--first-design', default='', metavar='CONFIG',
                 help='only write <out>/first_design_budget.json from the first design\'s config')
  args = p.parse_args(argv)
  if args.first_design:
    rows = first_design_budget(args.first_design)
    path = pathlib.Path(args.out) / 'first_design_budget.json'
    path.write_text(_json(rows))
    print(f'wrote {path} ({len(rows)} runs)')
    return 0
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  module = config_lib.config_module(args.config)
  record = pathlib.Path(args.record) if args.record else None
  runs = load_runs(module, record, pathlib.Path(args.root) if args.root else None)
  probe_text, problems, _ = report_probe(module, runs.get('probe', []), out)
  sections = [('LR probe', probe_text, runs.get('probe', []))]
  verdicts = []
  if len(runs) > 1:
    t1 = runs.get('table1', [])
    shared = t1 + runs.get('scaling', [])
    for title, (body, vs), rs in (
        ('Table 1: dense against each structure at equal tokens',
         report_table1(module, t1, out), t1),
        ('Figure 1a: loss against training FLOPs, tokens growing with size',
         report_scaling(module, shared, out, args.bootstrap), shared),
        ('Figure 3: learning-rate sensitivity and spikes', report_lr(module, runs['lr'], out),
         runs['lr']),
        ('Tables 3, 4, 10: self-guided training', report_sgt(module, runs['sgt'], t1, out),
         runs['sgt']),
        ('Table 2: wide LowRank + GQA at equal FLOPs', report_wide(module, runs['wide'], out),
         runs['wide'])):
      sections.append((title, body, rs))
      verdicts += vs
  widths = report_widths(module, runs, out)
  every = [r for rs in runs.values() for r in rs]
  text = (f'All runs: {totals(every)}.\n\n' + widths + '\n\n'
          + '\n\n'.join(f'## {title}\n\n{totals(rs)}.\n\n{body}' for title, body, rs in sections))
  (out / 'report.md').write_text(text + '\n')
  (out / 'verdicts.json').write_text(_json({c: v for c, v in verdicts}))
  print(text)
  if problems:
    print('\n'.join(f'error: {p}' for p in problems), file=sys.stderr)
  return 1 if problems else 0


if __name__ == '__main__':
  sys.exit(main())
