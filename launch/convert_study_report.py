"""Tables, plots and verdicts of the convert study (configs/convert_study.py), from its runs.

  python launch/convert_study_report.py [--root R] [--record DIR] --out results/convert_study
  python launch/convert_study_report.py --root R --out results/convert_study --step0

Each run of the config's PLAN is read from DIR/<run name> when --record is given (the records of
launch/convert_study.py --record: config.json, sweep.json, metrics.jsonl.gz, convert.json,
convert_sweep.json), else from its workdir R/<run name>. A run not finished is shown as missing,
and every claim that needs it is inconclusive with the reason. Writes <out>/report.md,
<out>/convert_study.json (every number the report prints), <out>/loss.png (validation loss against
the tokens of continued training, one panel per structure and fraction) and <out>/step0.png.
The verdicts come from structffn_jax/decisions.py, applying the rules C1-C6 of the config's
docstring. Nothing here trains; rerun it as runs finish.

Step 0: the trainer evaluates first at step train.eval_every, and convert.json holds the
projection's errors, not a loss, so no record of a run holds its step-0 loss. `--step0` measures
it: each converted run's step-0 state is made again from the finished source (the conversion
launch/convert_study.py ran: the nearest factors of the same checkpoint, scratch's init from the
same train.seed), in a temporary directory, and evaluated on the rows every evaluation of the
study reads (train.eval_tokens of the validation split). The losses go to <out>/step0.json, which
later reports read; a run measured there is not measured again. It needs the source's workdir
(--root) and the study's prepared data (--data, default R/data).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from structffn_jax import decisions, sgt, studies  # noqa: E402
from structffn_jax import config as config_lib  # noqa: E402

CONFIG = REPO / 'configs' / 'convert_study.py'
STEP0_FILE = 'step0.json'
STEP0_TOL = 1e-4  # C3: guided's step-0 loss equals the source's to this
WITHIN_NATS = 0.05  # C5: "within 0.05 nats" when mean + 3 se < this
MIN_SEEDS = 2
SHOWN = ('guided', 'projection', 'scratch', 'dense')  # 'dense': the dense source continued
SHOWN_LABEL = {'guided': 'guided', 'projection': 'projection', 'scratch': 'scratch',
               'dense': 'dense continued'}
COLORS = {'guided': 'tab:blue', 'projection': 'tab:orange', 'scratch': 'tab:green',
          'dense': 'black'}
C3_RULE = 'C3a and C3b both reproduced; not reproduced if either is not; otherwise inconclusive'


def _plt():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def label(method: str, fraction: int) -> str:
  return 'dense' if method == 'dense' else f'{method} {fraction}%'


def parse_arg(arg: str) -> dict:
  """A PLAN argument 'method=x,mode=y,...' as a dict, numbers as numbers."""
  out = {}
  for item in arg.split(','):
    key, _, value = item.partition('=')
    out[key] = int(value) if value.lstrip('-').isdigit() else value
  return out


def role(arg: dict) -> str:
  """source | long | dense (the source continued) | guided | projection | scratch."""
  if arg['method'] == 'dense' and arg['mode'] == 'projection':
    return 'dense'
  return arg['mode']


# ----------------------------------------------------------------------------- reading runs


def _read_json(path: pathlib.Path):
  return json.loads(path.read_text()) if path.exists() else None


def conversion_errors(record: dict | None) -> dict | None:
  """Mean relative Frobenius error of the projection and its optimum over the structured layers'
  matrices of a convert.json (None: no record, or no projected matrix, as for scratch)."""
  if not record:
    return None
  errors, optima = [], []
  for layer in record.get('layers', []):
    for fc in ('fc1', 'fc2'):
      if isinstance(layer.get(fc), dict):
        errors.append(float(layer[fc]['relative_error']))
        optima.append(float(layer[fc]['optimum']))
  if not errors:
    return None
  return {'relative_error': sum(errors) / len(errors), 'optimum': sum(optima) / len(optima),
          'matrices': len(errors), 'seconds': record.get('seconds')}


def read_run(config, arg: str, path: pathlib.Path) -> dict:
  """One run's numbers: where it stands, its evaluations, its conversion, its times."""
  a = parse_arg(arg)
  status = studies.run_status(config, path)
  recs = studies.records(path)
  curve = {}
  for r in recs:
    if 'valid_loss' in r:
      curve[int(r['step'])] = float(r['valid_loss'])
  state = status.state
  if status.diverged or (state == 'finished' and not all(math.isfinite(v) for v in
                                                         curve.values())):
    state = 'diverged'
  counts = sgt.step_counts(config)
  every = config.train.eval_every
  batch_tokens = config.train.global_batch * config.model.seq_len
  train_wall, train_cpu = studies.wall_seconds(path), studies.cpu_seconds(path)
  # the conversion's exit, wall and CPU time: in a record, or beside a workdir (convert_study.py)
  conv = (_read_json(path / 'convert_sweep.json')
          or _read_json(path.parent / f'.{path.name}.convert' / studies.SWEEP_FILE) or {})
  fraction = 100 if a['method'] == 'dense' else int(a.get('fraction', 32))
  return {
      'run': config.name, 'arg': arg, 'method': a['method'], 'fraction': fraction,
      'structure': label(a['method'], fraction), 'mode': a['mode'], 'role': role(a),
      'seed': int(a['seed']), 'state': state, 'status': status.describe(),
      'step': status.step, 'steps': counts.total, 'guided_steps': counts.guided,
      # C3's hand-over: the first evaluation at or after the step α reaches 0 (steps/2)
      'half_step': min(counts.total, math.ceil(math.ceil(counts.total / 2) / every) * every),
      'batch_tokens': batch_tokens, 'tokens': counts.total * batch_tokens,
      'eval_every': every, 'eval_tokens': config.train.eval_tokens,
      'valid_curve': [[s, v] for s, v in sorted(curve.items())],
      'valid_loss': curve.get(counts.total) if state == 'finished' else None,
      'conversion': conversion_errors(_read_json(path / 'convert.json')),
      'train_wall_s': train_wall, 'train_cpu_s': train_cpu,
      'convert_wall_s': conv.get('wall_s'), 'convert_cpu_s': conv.get('cpu_s'),
      'wall_s': (train_wall or 0.0) + (conv.get('wall_s') or 0.0),
      'cpu_s': (train_cpu or 0.0) + (conv.get('cpu_s') or 0.0), 'dir': str(path),
  }


def load_runs(module, record: pathlib.Path | None, root: pathlib.Path | None,
              size: str = 'cpu') -> list[dict]:
  """Every run of the PLAN, in its order, finished or not: from record/<name> when a record
  folder is given, else root/<name>."""
  runs = []
  for arg in module.VARIANTS:
    arg = f'{arg},size={size}'
    config = module.get_config(arg)
    config_lib.validate(config)
    base = record if record is not None else root
    runs.append(read_run(config, arg, base / config.name))
  return runs


def read_step0(out: pathlib.Path) -> dict:
  """{run name: {'loss', 'tokens', 'source', 'source_step'}} measured so far (<out>/step0.json)."""
  return (_read_json(out / STEP0_FILE) or {}).get('losses', {})


def measure_step0(module, root: pathlib.Path, data_dir: pathlib.Path, out: pathlib.Path,
                  size: str = 'cpu', log=print) -> dict:
  """The step-0 loss of every converted run not yet in <out>/step0.json (see the docstring)."""
  from structffn_jax import conversion, evaluate  # pylint: disable=import-outside-toplevel
  plan = [(f'{arg},size={size}', converted) for arg, converted in module.PLAN]
  source_config = module.get_config(plan[0][0])
  source = root / source_config.name
  status = studies.run_status(source_config, source)
  if status.state != 'finished':
    raise ValueError(f'--step0: the source {source} is {status.describe()}; measure step 0 once '
                     'it has finished (--root: the study\'s workdirs).')
  if not data_dir.is_dir():
    raise ValueError(f'--data {data_dir}: no prepared data there; give the study\'s data folder '
                     '(<root>/data).')
  losses = read_step0(out)
  for arg, converted in plan:
    config = module.get_config(arg)
    if not converted or config.name in losses:
      continue
    with tempfile.TemporaryDirectory() as tmp:
      new = pathlib.Path(tmp) / config.name
      conversion.convert(str(source), f'{CONFIG}:{arg}', new, (f'data.data_dir={data_dir}',),
                         parse_arg(arg)['mode'], log=lambda _: None)
      r = evaluate.evaluate(new, 'valid', max_tokens=config.train.eval_tokens)
    losses[config.name] = {'loss': float(r['loss']), 'tokens': float(r['tokens']),
                           'source': str(source), 'source_step': status.step}
    log(f'step 0 of {config.name}: valid_loss {r["loss"]:.4f} over {r["tokens"]:,.0f} tokens')
    (out / STEP0_FILE).write_text(json.dumps({'losses': losses}, indent=1) + '\n')
  return losses


# ----------------------------------------------------------------------------- numbers


def loss_at(run: dict | None, t: int | str, step0: dict) -> tuple[float | None, str]:
  """(L(run, t), '') or (None, why not). t: 0, a step, or 'end'."""
  if run is None:
    return None, 'not in the plan'
  if t == 0:
    entry = step0.get(run['run'])
    if entry is None:
      return None, f'{run["run"]}: no step-0 loss measured (--step0)'
    return float(entry['loss']), ''
  if run['state'] != 'finished':
    return None, f'{run["run"]}: {run["state"] if run["state"] == "new" else run["status"]}'
  step = run['steps'] if t == 'end' else t
  v = dict((s, x) for s, x in run['valid_curve']).get(step)
  if v is None:
    return None, f'{run["run"]}: no evaluation at step {step}'
  return v, ''


class Study:
  """The runs indexed by (structure, shown mode, seed), with the step-0 losses."""

  def __init__(self, module, runs: list[dict], step0: dict):
    self.module, self.runs, self.step0 = module, runs, step0
    self.seeds = list(module.SEEDS)
    self.by = {}
    for r in runs:
      self.by[(r['method'], r['fraction'], r['role'], r['seed'])] = r
    self.source = next((r for r in runs if r['role'] == 'source'), None)
    self.long = next((r for r in runs if r['role'] == 'long'), None)
    guided = [r for r in runs if r['role'] == 'guided']
    self.steps = guided[0]['steps'] if guided else None
    self.half = guided[0]['half_step'] if guided else None

  def run(self, method, fraction, mode, seed):
    if mode == 'dense':
      return self.by.get(('dense', 100, 'dense', seed))
    return self.by.get((method, fraction, mode, seed))

  def point(self, t):
    return {'0': 0, 'half': self.half, 'end': 'end'}[t]

  def values(self, method, fraction, mode, t) -> tuple[dict, list[str]]:
    """({seed: L(mode, t)}, the reasons of the seeds without one)."""
    vals, why = {}, []
    for s in self.seeds:
      v, reason = loss_at(self.run(method, fraction, mode, s), self.point(t), self.step0)
      if v is None:
        why.append(reason)
      else:
        vals[s] = v
    return vals, why

  def gaps(self, method, fraction, a, b, t) -> tuple[list[float], list[str]]:
    """Paired L(a, t) - L(b, t) over the seeds both have, and why any seed is missing."""
    va, wa = self.values(method, fraction, a, t)
    vb, wb = self.values(method, fraction, b, t)
    return [va[s] - vb[s] for s in self.seeds if s in va and s in vb], wa + wb

  def source_loss(self) -> float | None:
    v, _ = loss_at(self.source, 'end', self.step0)
    return v


def _paired(gaps, why, sign=1) -> decisions.Verdict:
  v = decisions.paired(gaps, sign, min_seeds=MIN_SEEDS)
  if v.verdict == decisions.INCONCLUSIVE and why:
    v = dataclasses.replace(v, why=f'{v.why}: ' + '; '.join(why))
  return v


def _both(a: decisions.Verdict, b: decisions.Verdict) -> decisions.Verdict:
  if decisions.NOT_REPRODUCED in (a.verdict, b.verdict):
    verdict = decisions.NOT_REPRODUCED
  elif a.verdict == b.verdict == decisions.REPRODUCED:
    verdict = decisions.REPRODUCED
  else:
    verdict = decisions.INCONCLUSIVE
  return decisions.Verdict(verdict, C3_RULE, f'C3a {a.verdict}, C3b {b.verdict}', n=min(a.n, b.n))


CLAIMS = {
    'C1': 'the projection starts far ahead of scratch: L(scratch, 0) − L(projection, 0) > 0',
    'C2': 'it stays ahead at equal steps: L(scratch, steps) − L(projection, steps) > 0',
    'C3a': 'guided loses less at the hand-over: L(projection, steps/2) − L(guided, steps/2) > 0',
    'C3b': f'guided\'s step-0 loss equals the source\'s to {STEP0_TOL:g}',
    'C3': 'C3 = C3a and C3b',
    'C4': 'guided ends ahead of projection: L(projection, steps) − L(guided, steps) > 0',
}


def verdicts(study: Study, method: str, fraction: int) -> dict[str, decisions.Verdict]:
  out = {'C1': _paired(*study.gaps(method, fraction, 'scratch', 'projection', '0')),
         'C2': _paired(*study.gaps(method, fraction, 'scratch', 'projection', 'end'))}
  out['C3a'] = _paired(*study.gaps(method, fraction, 'projection', 'guided', 'half'))
  guided0, why = study.values(method, fraction, 'guided', '0')
  c3b = decisions.matches(list(guided0.values()), study.source_loss(), STEP0_TOL,
                          min_seeds=MIN_SEEDS)
  if c3b.verdict == decisions.INCONCLUSIVE:
    reasons = why + ([] if study.source_loss() is not None else
                     [f'the source {study.source["run"] if study.source else ""}: '
                      f'{study.source["status"] if study.source else "not in the plan"}'])
    if reasons:
      c3b = dataclasses.replace(c3b, why=f'{c3b.why}: ' + '; '.join(reasons))
  out['C3b'] = c3b
  out['C3'] = _both(out['C3a'], c3b)
  out['C4'] = _paired(*study.gaps(method, fraction, 'projection', 'guided', 'end'))
  return out


def gap_to_dense(study: Study, method: str, fraction: int) -> dict:
  """C5: per seed, min over guided, projection of L(mode, steps) minus L(dense continued, steps);
  mean ± se over seeds; within WITHIN_NATS when mean + 3 se < WITHIN_NATS."""
  guided, w1 = study.values(method, fraction, 'guided', 'end')
  proj, w2 = study.values(method, fraction, 'projection', 'end')
  dense, w3 = study.values(method, fraction, 'dense', 'end')
  per_seed, best = {}, {}
  for s in study.seeds:
    if s in guided and s in proj and s in dense:
      mode = 'guided' if guided[s] <= proj[s] else 'projection'
      per_seed[s] = min(guided[s], proj[s]) - dense[s]
      best[s] = mode
  mean, se = decisions.mean_se(list(per_seed.values()))
  within = None
  if len(per_seed) >= MIN_SEEDS and math.isfinite(se):
    within = mean + decisions.SE_MARGIN * se < WITHIN_NATS
  return {'gaps': per_seed, 'best_mode': best, 'mean': mean if per_seed else None,
          'se': se if len(per_seed) > 1 else None, 'n': len(per_seed), 'within': within,
          'missing': [] if len(per_seed) >= MIN_SEEDS else w1 + w2 + w3}


def conversion_from_scratch(study: Study) -> dict:
  """C6 (one seed): L(long, source_steps + steps) of LowRank against the converted LowRank runs
  at `steps`, of the long run's seed and structure."""
  long = study.long
  if long is None:
    return {'long': None, 'modes': {}, 'missing': ['no long run in the plan']}
  v, why = loss_at(long, 'end', study.step0)
  modes, missing = {}, [why] if why else []
  for mode in ('guided', 'projection', 'scratch'):
    m, w = loss_at(study.run(long['method'], long['fraction'], mode, long['seed']), 'end',
                   study.step0)
    if m is None:
      missing.append(w)
    else:
      modes[mode] = {'loss': m, 'long_minus_mode': None if v is None else v - m}
  return {'run': long['run'], 'structure': long['structure'], 'seed': long['seed'],
          'long_steps': long['steps'], 'long': v, 'modes': modes, 'missing': missing}


def structure_table(study: Study, method: str, fraction: int) -> dict:
  """{mode: {t: {'mean', 'n', 'values'}}} and {gap: {t: {'mean', 'se', 'n', 'values'}}}."""
  losses, gaps = {}, {}
  for mode in SHOWN:
    losses[mode] = {}
    for t in ('0', 'half', 'end'):
      vals, _ = study.values(method, fraction, mode, t)
      mean, _ = decisions.mean_se(list(vals.values()))
      losses[mode][t] = {'mean': mean if vals else None, 'n': len(vals), 'values': vals}
  for a, b in (('scratch', 'projection'), ('projection', 'guided'), ('guided', 'dense'),
               ('projection', 'dense')):
    name = f'{SHOWN_LABEL[a]} − {SHOWN_LABEL[b]}'
    gaps[name] = {}
    for t in ('0', 'half', 'end'):
      g, _ = study.gaps(method, fraction, a, b, t)
      mean, se = decisions.mean_se(g)
      gaps[name][t] = {'mean': mean if g else None, 'se': se if len(g) > 1 else None,
                       'n': len(g), 'values': g}
  return {'losses': losses, 'gaps': gaps}


def conversion_row(study: Study, method: str, fraction: int) -> dict:
  """The projection's mean relative error and optimum (from any seed's guided or projection
  convert.json: the same source, the same factors) and each mode's step-0 loss."""
  err = None
  for mode in ('projection', 'guided'):
    for s in study.seeds:
      r = study.run(method, fraction, mode, s)
      if r is not None and r['conversion']:
        err = err or r['conversion']
  step0 = {}
  for mode in SHOWN:
    vals, _ = study.values(method, fraction, mode, '0')
    step0[mode] = decisions.mean_se(list(vals.values()))[0] if vals else None
  return {'conversion': err, 'step0': step0}


# ----------------------------------------------------------------------------- formatting


_json, _fmt, _md, _pm = (studies.report_json, studies.cell, studies.markdown_table,
                          studies.plus_minus)


def _mean_n(cell, digits=3):
  if cell['mean'] is None:
    return '-'
  return f'{cell["mean"]:.{digits}f}' + (f' ({cell["n"]})' if cell['n'] < MIN_SEEDS else '')


def _done(runs) -> list[dict]:
  return [r for r in runs if r['state'] in ('finished', 'diverged')]


def header(study: Study) -> dict:
  done = _done(study.runs)
  return {'runs': len(study.runs), 'done': len(done),
          'tokens': sum(r['tokens'] for r in done),
          'wall_s': sum(r['wall_s'] for r in done), 'cpu_s': sum(r['cpu_s'] for r in done),
          'convert_wall_s': sum(r['convert_wall_s'] or 0.0 for r in done),
          'source_loss': study.source_loss(),
          'source_step': study.source['steps'] if study.source else None}


def header_line(h: dict) -> str:
  source = (f"the source's final validation loss {h['source_loss']:.4f} (step "
            f"{h['source_step']})" if h['source_loss'] is not None
            else "the source has not finished")
  return (f"{h['done']} of {h['runs']} runs done, {h['tokens'] / 1e6:.1f}M training tokens, "
          f"{h['wall_s'] / 60:.0f} min wall time, {h['cpu_s'] / 60:.0f} min CPU time (training "
          f"and conversion; the conversions {h['convert_wall_s'] / 60:.1f} min wall); {source}.")


def step0_note(study: Study, step0_info: dict) -> str:
  every = next((r['eval_every'] for r in study.runs if r['role'] == 'guided'), None)
  where = (f"The trainer evaluates first at step train.eval_every ({every}), and convert.json "
           "holds the projection's errors, not a loss: no record holds a run's step-0 loss.")
  if not study.step0:
    return (where + ' It is not measured yet: run this report with --step0 (and --root) once the '
            'source has finished; until then C1 and C3b are inconclusive.')
  n = sum(1 for r in study.runs if r['run'] in study.step0)
  tokens = next(iter(study.step0.values())).get('tokens')
  return (where + f' Step 0 here is measured by this report (--step0, {n} runs, '
          f'{STEP0_FILE}): each converted run\'s step-0 state made again from the source\'s '
          f'final checkpoint (step {step0_info.get("source_step", "?")}) and evaluated on the '
          f'rows of every evaluation ({tokens:,.0f} validation tokens).')


def _step0_source_step(step0: dict):
  steps = {e.get('source_step') for e in step0.values()}
  return steps.pop() if len(steps) == 1 else sorted(steps, key=str)


# ----------------------------------------------------------------------------- plots


def plot_loss(study: Study, path: pathlib.Path) -> None:
  """Validation loss against the tokens of continued training, one panel per structure and
  fraction: every shown mode, both seeds (solid: the first, dashed: the second); the hand-over
  point steps/2 marked."""
  plt = _plt()
  fractions = list(study.module.FRACTIONS)
  methods = list(dict.fromkeys(m for m, _ in study.module.STRUCTURES))
  fig, axes = plt.subplots(len(fractions), len(methods), figsize=(4.2 * len(methods),
                                                                  3.4 * len(fractions)),
                           squeeze=False)
  styles = ['-', '--', ':', '-.']
  clipped = False
  for i, fraction in enumerate(fractions):
    for j, method in enumerate(methods):
      ax = axes[i][j]
      shown, scratch0 = [], []
      for mode in SHOWN:
        for k, s in enumerate(study.seeds):
          r = study.run(method, fraction, mode, s)
          if r is None:
            continue
          pts = [(step * r['batch_tokens'] / 1e6, v) for step, v in r['valid_curve']]
          shown += [v for _, v in pts]
          v0, _ = loss_at(r, 0, study.step0)
          if v0 is not None:
            pts = [(0, v0)] + pts
            (scratch0 if mode == 'scratch' else shown).append(v0)
          if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, styles[k % len(styles)], color=COLORS[mode], lw=1.0, marker='o',
                    ms=2.5, label=f'{SHOWN_LABEL[mode]} seed {s}')
      if study.half is not None:
        batch = next((r['batch_tokens'] for r in study.runs), 1)
        ax.axvline(study.half * batch / 1e6, color='gray', ls=':', lw=1.0,
                   label='hand-over (steps/2)')
      source = study.source_loss()
      if source is not None:
        ax.axhline(source, color='gray', lw=0.6, alpha=0.6)
      if shown:  # a scratch step 0 far above the rest would flatten it: then off the top
        lo, hi = min(shown + scratch0), max(shown + scratch0)
        if scratch0 and max(scratch0) > max(shown) + 0.5:
          hi, clipped = max(shown), True
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.05 * (hi - lo + 1e-3))
      ax.set_title(label(method, fraction), fontsize=10)
      ax.set_xlabel('tokens of continued training (M)')
      ax.set_ylabel('validation loss')
      ax.grid(alpha=0.3)
      if ax.lines and i == 0 and j == 0:
        ax.legend(fontsize=6)
  fig.suptitle('Continued training from the dense source (gray line: its final loss'
               + ("; scratch's step 0 off the top" if clipped else '') + ')', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_step0(study: Study, rows: dict, path: pathlib.Path) -> None:
  """Each structure's step-0 loss by mode (seed means), the source's final loss as a line."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(8, 3.8))
  names = list(rows)
  width = 0.8 / 3
  for k, mode in enumerate(('guided', 'projection', 'scratch')):
    ys = [rows[n]['step0'][mode] for n in names]
    xs = [i + (k - 1) * width for i, y in enumerate(ys) if y is not None]
    ax.bar(xs, [y for y in ys if y is not None], width, color=COLORS[mode],
           label=SHOWN_LABEL[mode])
  if study.source_loss() is not None:
    ax.axhline(study.source_loss(), color='black', lw=0.8, label='the source (final)')
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels(names, fontsize=8)
  ax.set_ylabel('validation loss at step 0')
  ax.grid(alpha=0.3, axis='y')
  if ax.patches or ax.lines:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------------------- report


def report(module, runs: list[dict], step0: dict, out: pathlib.Path,
           step0_info: dict | None = None) -> tuple[str, dict]:
  """The Markdown of report.md and the JSON of convert_study.json; writes both and the plots."""
  study = Study(module, runs, step0)
  h = header(study)
  half, steps = study.half, study.steps
  parts = {}
  text = [f'{header_line(h)}', '']
  # Conversion
  conv_rows, conv = [], {}
  for method, fraction in module.STRUCTURES:
    c = conversion_row(study, method, fraction)
    conv[label(method, fraction)] = c
    e = c['conversion'] or {}
    conv_rows.append([label(method, fraction), e.get('relative_error'), e.get('optimum'),
                      None if not e else f"{e['relative_error'] - e['optimum']:+.1e}"]
                     + [c['step0'][m] for m in SHOWN])
  step0_info = {'source_step': _step0_source_step(step0) if step0 else None, **(step0_info or {})}
  text += ['## Conversion', '',
           'The projection\'s relative Frobenius error ‖W − Ŵ‖/‖W‖, mean over the structured '
           'layers\' fc1 and fc2 (convert.json), against the optimum the structure allows; the '
           'validation loss at step 0 by mode (mean over seeds).', '',
           _md(['structure', 'rel. error', 'optimum', 'error − optimum']
               + [f'L(0) {SHOWN_LABEL[m]}' for m in SHOWN], conv_rows), '',
           step0_note(study, step0_info), '']
  parts['conversion'] = conv
  # Per structure
  tables, all_verdicts = {}, {}
  text += ['## Loss by mode', '',
           f'Validation loss at step 0, at steps/2 = {half} (the end of the guided phase) and at '
           f'the end ({steps} steps), mean over the seeds {", ".join(map(str, study.seeds))} (a '
           'count in brackets: fewer seeds); gaps paired by seed, mean ± se.', '']
  for method, fraction in module.STRUCTURES:
    name = label(method, fraction)
    t = structure_table(study, method, fraction)
    tables[name] = t
    rows = [[SHOWN_LABEL[m]] + [_mean_n(t['losses'][m][p]) for p in ('0', 'half', 'end')]
            for m in SHOWN]
    rows += [[g] + [_pm(c['mean'], c['se']) for c in (cells['0'], cells['half'], cells['end'])]
             for g, cells in t['gaps'].items()]
    text += [f'### {name}', '', _md(['', 'step 0', f'step {half}', f'step {steps}'], rows), '']
    all_verdicts[name] = verdicts(study, method, fraction)
  parts['tables'] = tables
  # Verdicts
  vrows = []
  for name, vs in all_verdicts.items():
    for claim, v in vs.items():
      vrows.append([f'{claim} {name}', f'**{v.verdict}**', v.why, v.rule])
  text += ['## Verdicts C1-C4', '',
           'The claims (configs/convert_study.py): ' + '; '.join(
               f'{c} {t}' for c, t in CLAIMS.items()) + '.', '',
           _md(['claim', 'verdict', 'numbers', 'rule'], vrows), '']
  parts['verdicts'] = all_verdicts
  # C5, C6
  c5 = {label(m, f): gap_to_dense(study, m, f) for m, f in module.STRUCTURES}
  c5_rows = []
  for name, c in c5.items():
    within = {True: 'yes', False: 'no', None: 'inconclusive'}[c['within']]
    c5_rows.append([name, _pm(c['mean'], c['se']), c['n'],
                    ', '.join(f'{s} {m}' for s, m in c['best_mode'].items()) or '-', within,
                    '; '.join(c['missing']) or ''])
  text += ['## C5 (reported): the gap to dense that remains', '',
           f'Per seed, min over guided, projection of L(mode, {steps}) minus L(dense continued, '
           f'{steps}); mean ± se over seeds; "within {WITHIN_NATS:g} nats" when mean + 3 se < '
           f'{WITHIN_NATS:g}.', '',
           _md(['structure', 'gap (mean ± se)', 'seeds', 'the lower mode by seed',
                f'within {WITHIN_NATS:g} nats', 'missing'], c5_rows), '']
  parts['c5'] = c5
  c6 = conversion_from_scratch(study)
  parts['c6'] = c6
  if c6['long'] is not None:
    line = (f"L(long, {c6['long_steps']}) of {c6['structure']} (seed {c6['seed']}, from scratch "
            f"for source_steps + steps) {c6['long']:.4f}; minus the converted runs' L(mode, "
            f"{steps}): " + (', '.join(f"{m} {x['long_minus_mode']:+.4f} ({x['loss']:.4f})"
                                     for m, x in c6['modes'].items()) or '-'))
  else:
    line = 'not yet'
  if c6['missing']:
    line += ' (missing: ' + '; '.join(c6['missing']) + ')'
  text += ['## C6 (reported, one seed): the conversion buys the source\'s training', '',
           line + '. A positive difference: the converted run ends lower than the structure '
           'trained from scratch on as many steps.', '']
  missing = [r['run'] for r in runs if r['state'] not in ('finished', 'diverged')]
  if missing:
    text += [f'{len(missing)} of {len(runs)} runs not finished yet: '
             + ', '.join(missing[:12]) + (' ...' if len(missing) > 12 else '') + '.', '']
  out.mkdir(parents=True, exist_ok=True)
  plot_loss(study, out / 'loss.png')
  plot_step0(study, conv, out / 'step0.png')
  numbers = {'header': h, 'half_step': half, 'steps': steps,
             'step0': {'how': 'measured (--step0)' if step0 else 'not measured',
                       'source_step': step0_info['source_step'], 'losses': step0},
             **parts, 'runs': runs}
  body = '\n'.join(text).rstrip() + '\n'
  (out / 'report.md').write_text(body)
  (out / 'convert_study.json').write_text(_json(numbers) + '\n')
  return body, numbers


# ----------------------------------------------------------------------------- main


def _folder(flag: str, value: str, what: str) -> pathlib.Path:
  path = pathlib.Path(value)
  if not path.is_dir():
    raise SystemExit(f'error: {flag} {value}: no such directory; give {what}.')
  return path


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python launch/convert_study_report.py',
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog='\n'.join(__doc__.splitlines()[1:]))
  p.add_argument('--root', default='runs/convert_study', help='the study\'s workdirs, '
                 '<root>/<run name> (read when --record is not given; the source for --step0)')
  p.add_argument('--record', default='', metavar='DIR',
                 help='the records of launch/convert_study.py --record, DIR/<run name>')
  p.add_argument('--out', default='results/convert_study', help='folder of the report')
  p.add_argument('--size', default='cpu', help="the config's size: cpu | s")
  p.add_argument('--step0', action='store_true',
                 help='measure the step-0 loss of every converted run not yet in '
                 '<out>/step0.json (needs the finished source under --root)')
  p.add_argument('--data', default='', metavar='DIR',
                 help='the study\'s prepared data, for --step0 (default <root>/data)')
  args = p.parse_args(argv)
  module = config_lib.config_module(CONFIG)
  if args.size not in module.SCALES:
    raise SystemExit(f'error: --size {args.size}: not a size of {CONFIG.name}; give one of '
                     f'{", ".join(module.SCALES)}.')
  record = _folder('--record', args.record, 'the folder launch/convert_study.py --record wrote '
                   '(results/convert_study/runs)') if args.record else None
  root = None
  if record is None or args.step0:
    root = _folder('--root', args.root, 'the study\'s workdirs (launch/convert_study.py '
                   '--root), or --record DIR for its records')
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.step0:
    data = _folder('--data', args.data, 'the study\'s prepared data folder') if args.data \
        else root / 'data'
    try:
      measure_step0(module, root.resolve(), data.resolve(), out, args.size)
    except ValueError as e:
      raise SystemExit(f'error: {e}') from None
  runs = load_runs(module, record, root, args.size)
  text, _ = report(module, runs, read_step0(out), out)
  print(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
