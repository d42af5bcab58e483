"""The GPU measurements in one command, within 8 minutes: kernels, FFN, decode, training, MFU.

    python -m structffn_jax.bench.device_suite --out bench_results/h100      # on one GPU
    python -m structffn_jax.bench.device_suite --out /tmp/suite --dry-run   # CPU, toy sizes

Steps, each a subprocess with its own time limit (the suite's budget, 480 s by default, is
shared out in order and a step that overruns is stopped and reported, never waited for):

  env      the device, jax and what the GPU run needs beyond requirements.txt (below)
  tests    the kernel and attention tests compiled on the device (`-k compiled`)
  kernels  `bench.kernels` at widths 1024 and 4096, 32%: each Pallas kernel against the XLA
           path, and the PALLAS_WINS entry they imply
  ffn      `bench.ffn --preset gpu` at widths 1536 and 5120 (Figure 4, fwd and fwd+bwd)
  decode   `bench.decode --part ffn`, width 2048, 1..4096 tokens (Figure 5, pre-merge crossover)
  train-<size>-<method>
           `bench.train` for Transformer-s and -m, dense and the three 32% structures, one
           config per step (5 timed steps after the compile)
  mfu      the MFU cross-check: the matmul FLOPs of each trained step counted from its jaxpr
           (every dot_general, times the scan lengths around it; the XLA attention path) against
           the paper's accounting (`accounting.flops_per_token`, training = 3 x forward), and
           the MFU of the measured step time under both counts

Everything lands in --out: one JSON per step (<step>.json, the benchmark's own record), the
step's log (logs/<step>.log), and summary.json with the table printed at the end: each number
beside its target from BENCHMARKS.md ("GPU (H100): commands and targets") and ok / MISS / FAIL.

Needs, beyond requirements.txt, on the GPU machine: a CUDA build of jax (`pip install -U
"jax[cuda12]"`: the CUDA plugin with cuDNN, which the 'cudnn' attention and the Triton
lowering of the Pallas kernels use). The suite installs nothing: `env` checks that the default
backend is a GPU and stops with the command to run if not. --dry-run runs every step on the CPU
at toy sizes (tiny configs instead of -s/-m, one iteration): it checks the plumbing only.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

from structffn_jax import cli

REPO = pathlib.Path(__file__).resolve().parents[2]
NEEDS = ('jax[cuda12]  (pip install -U "jax[cuda12]": CUDA plugin, cuDNN, Triton lowering)',)
STRUCTURES = ('dense', 'lowrank', 'blockdense', 'blockshuffle')

# Targets (BENCHMARKS.md, GPU section; the paper's A100 numbers where it has them).
MFU_TARGET = 0.45  # dense Transformer-m training step
FFN_TARGETS = {  # forward speed-up over dense, from width 1536 up (BlockShuffle: at 5120)
    'lowrank 63%': 1.4, 'lowrank 32%': 2.5, 'blockdense 63%': 1.4, 'blockdense 32%': 2.5,
    'blockshuffle 63%': 1.1, 'blockshuffle 32%': 2.0}
CROSSOVER_TARGET = 1  # pre-merge pays above 1 token (the paper: structured loses below ~16)
FLOP_AGREEMENT = 0.05  # accounting vs counted matmul FLOPs: within 5%


def _train_configs(size: str, dry: bool) -> list[str]:
  if dry:  # toy stand-ins: the tiny model, dense for -s and a structure for -m
    return [f'{REPO}/configs/tiny.py:method={"dense" if size == "s" else "blockshuffle"}']
  return [f'{REPO}/configs/structured_ffn.py:model={size},method={m},fraction=32'
          for m in STRUCTURES]


def plan(out: pathlib.Path, dry: bool) -> list[tuple[str, list[str], int]]:
  """[(step, command, share of the budget in s at the default 480)]."""
  py = [sys.executable, '-m']
  if dry:
    sizes = dict(kernels=['--widths', '32', '--tokens', '16', '--fractions', '32', '--iters', '1',
                          '--warmup', '1', '--ops', 'blockshuffle', '--layers', 'fc1'],
                 ffn=['--widths', '32', '--tokens', '16', '--dtype', 'float32', '--iters', '1',
                      '--warmup', '1'],
                 decode=['--widths', '32', '--tokens', '1,8', '--iters', '1'],
                 train=['--steps', '1', '--set', 'model.ffn.init=gaussian',
                        '--set', 'model.num_layers=2', '--set', 'model.seq_len=32'])
  else:
    sizes = dict(kernels=['--widths', '1024,4096', '--fractions', '32', '--tokens', '8192',
                          '--iters', '5', '--warmup', '1'],
                 ffn=['--widths', '1536,5120', '--iters', '5', '--warmup', '1'],
                 decode=['--widths', '2048', '--tokens', '1,4,16,64,256,1024,4096',
                         '--iters', '10'],
                 train=['--steps', '5'])
  steps = [
      ('env', py + ['structffn_jax.bench.device_suite', '--env', str(out / 'env.json')]
       + (['--dry-run'] if dry else []), 20),
      ('tests', py + ['pytest', f'{REPO}/tests/test_kernels.py', f'{REPO}/tests/test_attention.py',
                      '-q', '-k', 'compiled', f'--junitxml={out / "tests.xml"}'], 45),
      ('kernels', py + ['structffn_jax.bench.kernels', *sizes['kernels'],
                        '--out', str(out / 'kernels.json')], 60),
      ('ffn', py + ['structffn_jax.bench.ffn', '--preset', 'gpu', *sizes['ffn'],
                    '--out', str(out / 'ffn.json')], 70),
      ('decode', py + ['structffn_jax.bench.decode', '--part', 'ffn', *sizes['decode'],
                       '--out', str(out / 'decode.json')], 50),
  ]
  # One step per config: a config that runs out of time costs only its own row.
  train_jsons = []
  for size, batch, share in (('s', 32, 22), ('m', 16, 30)):
    for config in _train_configs(size, dry):
      name = f'train-{size}-{config.split("method=")[1].split(",")[0]}'
      train_jsons.append(str(out / f'{name}.json'))
      steps.append((name, py + ['structffn_jax.bench.train', '--config', config,
                                '--global-batch', str(8 if dry else batch), *sizes['train'],
                                '--out', train_jsons[-1]], share))
  steps.append(('mfu', py + ['structffn_jax.bench.device_suite', '--mfu', *train_jsons,
                             '--mfu-out', str(out / 'mfu.json')], 25))
  return steps


def run_steps(out: pathlib.Path, dry: bool, budget_s: float) -> list[dict]:
  """Every step within the budget; [{step, rc, seconds, status}]."""
  (out / 'logs').mkdir(parents=True, exist_ok=True)
  steps = plan(out, dry)
  scale = budget_s / sum(share for _, _, share in steps)
  start = time.monotonic()
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(REPO)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
  if dry:  # the CPU, and XLA's quickest compiles: the dry run checks plumbing, not speed
    env['JAX_PLATFORMS'] = 'cpu'
    env['XLA_FLAGS'] = ' '.join([env.get('XLA_FLAGS', ''), '--xla_backend_optimization_level=0',
                                 '--xla_llvm_disable_expensive_passes=true']).strip()
  results = []
  for name, command, share in steps:
    left = budget_s - (time.monotonic() - start)
    # A step may use its own share plus whatever earlier steps left over.
    limit = left - scale * sum(s for n, _, s in steps[len(results) + 1:])
    limit = max(min(left, limit), 0)
    log = out / 'logs' / f'{name}.log'
    if limit < 5:
      results.append(dict(step=name, rc=None, seconds=0.0, status='skipped (no time left)'))
      continue
    print(f'[{time.monotonic() - start:5.0f}s] {name} (limit {limit:.0f}s): '
          f'{" ".join(command[1:])}', flush=True)
    t0 = time.monotonic()
    # The MFU cross-check only traces (no device work): on the CPU, leaving the GPU alone.
    step_env = dict(env, JAX_PLATFORMS='cpu') if name == 'mfu' else env
    with open(log, 'w') as f:
      try:
        proc = subprocess.run(command, cwd=REPO, env=step_env, stdout=f,
                              stderr=subprocess.STDOUT, timeout=limit, check=False)
        rc, status = proc.returncode, 'ok' if proc.returncode == 0 else 'FAIL'
      except subprocess.TimeoutExpired:
        rc, status = None, f'TIMEOUT after {limit:.0f}s'
    results.append(dict(step=name, rc=rc, seconds=time.monotonic() - t0, status=status))
    if name == 'env' and status != 'ok':
      print(log.read_text(), flush=True)
      break  # no device, nothing else can run
  return results


# ----------------------------------------------------------------------------- env and mfu


def env_step(path: str, dry: bool) -> int:
  """Record the device and software; fail (printing what to install) without a GPU."""
  import jax  # pylint: disable=g-import-not-at-top
  backend = jax.default_backend()
  record = {'backend': backend, 'devices': [d.device_kind for d in jax.devices()],
            'jax': jax.__version__, 'needs_beyond_requirements': list(NEEDS), 'dry_run': dry}
  try:
    smi = subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,driver_version',
                          '--format=csv,noheader'], capture_output=True, text=True, timeout=20,
                         check=False)
    record['nvidia_smi'] = smi.stdout.strip()
  except (OSError, subprocess.TimeoutExpired):
    record['nvidia_smi'] = 'unavailable'
  pathlib.Path(path).write_text(json.dumps(record, indent=1))
  print(json.dumps(record, indent=1))
  if backend != 'gpu' and not dry:
    print(f'error: the default jax backend is {backend!r}, not a GPU. This suite installs '
          f'nothing; on the GPU machine run:\n  pip install -U "jax[cuda12]"\nthen check with '
          f'python -c "import jax; print(jax.devices())".')
    return 1
  return 0


def matmul_flops(closed_jaxpr) -> float:
  """FLOPs of every dot_general in a jaxpr (2·M·N·K), times the trip counts of the scans
  around it; of a conditional's branches the costliest; a while loop's body counted once."""
  from jax.extend import core  # pylint: disable=g-import-not-at-top

  def sub_jaxprs(params):
    for value in params.values():
      for v in (value if isinstance(value, (tuple, list)) else (value,)):
        if isinstance(v, core.ClosedJaxpr):
          yield v.jaxpr
        elif isinstance(v, core.Jaxpr):
          yield v

  def count(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name == 'dot_general':
        (contract, batch) = eqn.params['dimension_numbers']
        lhs, rhs = (v.aval.shape for v in eqn.invars)
        free_rhs = [d for i, d in enumerate(rhs) if i not in contract[1] and i not in batch[1]]
        total += 2.0 * float(_prod(lhs)) * float(_prod(free_rhs))
      elif name == 'cond':
        total += max(count(b.jaxpr) for b in eqn.params['branches'])
      elif name == 'scan':
        total += eqn.params['length'] * count(eqn.params['jaxpr'].jaxpr)
      else:
        total += sum(count(j) for j in sub_jaxprs(eqn.params))
    return total

  return count(closed_jaxpr.jaxpr)


def _prod(xs):
  out = 1
  for x in xs:
    out *= int(x)
  return out


def counted_step_flops(spec: str, global_batch: int) -> dict:
  """Forward and training-step matmul FLOPs per token of a config, from its jaxprs."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from structffn_jax import accounting, optim, sgt, steps  # pylint: disable=g-import-not-at-top
  from structffn_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from structffn_jax.model import GPT  # pylint: disable=g-import-not-at-top
  config = config_lib.load(spec, ('model.attention.implementation=xla',
                                  'model.ffn.implementation=xla'))
  t, m = config.train, config.model
  t.global_batch, t.micro_batch = global_batch, 0
  acc = accounting.account(config)
  new_model = lambda: GPT.from_config(config)
  model = nnx.eval_shape(new_model)
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = jax.ShapeDtypeStruct((global_batch, m.seq_len + 1), jnp.int32)
  forward = jax.make_jaxpr(lambda p, b: nnx.merge(graphdef, p)(b[:, :-1]))(params, tokens)
  counts = sgt.step_counts(config)
  total, guided = counts.total, counts.guided
  tx = optim.make_optimizer(config, total, guided)
  state = jax.eval_shape(lambda: steps.init_state(new_model(), tx)[1])
  key = jax.eval_shape(lambda: jax.random.key(0))
  train = jax.make_jaxpr(steps.make_train_step(graphdef, tx, 1))(state, tokens, key)
  n = global_batch * m.seq_len
  return {'accounting_forward_per_token': acc.flops_per_token,
          'counted_forward_per_token': matmul_flops(forward) / n,
          'counted_train_per_token': matmul_flops(train) / n}


def mfu_step(train_jsons: list[str], out: str) -> int:
  """The MFU cross-check of every row of the bench.train records."""
  rows = []
  for path in train_jsons:
    if not pathlib.Path(path).exists():
      print(f'{path}: missing (its train step did not finish)')
      continue
    record = json.loads(pathlib.Path(path).read_text())
    peak = record.get('peak_flops')
    for r in record['rows']:
      batch = int(str(r['batch']).split('x')[0])
      counted = counted_step_flops(r['config'], batch)
      tokens_per_s = r['tokens_per_s']
      row = {'name': r['name'], **counted,
             'forward_ratio': counted['counted_forward_per_token'] /
                              counted['accounting_forward_per_token'],
             'train_over_forward': counted['counted_train_per_token'] /
                                   counted['counted_forward_per_token'],
             'mfu_accounting': r['mfu'],
             'mfu_counted': (counted['counted_train_per_token'] * tokens_per_s / peak
                             if peak else 'n/a')}
      rows.append(row)
      print(json.dumps(row), flush=True)
  pathlib.Path(out).write_text(json.dumps({'rows': rows}, indent=1))
  return 0 if rows else 1


# ----------------------------------------------------------------------------- summary


def _load(path: pathlib.Path):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _verdict(value, target, higher=True):
  if not isinstance(value, (int, float)):
    return 'n/a'
  return 'ok' if (value >= target if higher else value <= target) else 'MISS'


def summarize(out: pathlib.Path, results: list[dict], dry: bool) -> list[dict]:
  """One row per number: step, what, value, target, verdict."""
  table = [dict(step=r['step'], what='ran', value=f'{r["seconds"]:.0f}s', target='',
                verdict=r['status']) for r in results]
  add = lambda step, what, value, target, verdict: table.append(
      dict(step=step, what=what, value=value, target=target, verdict=verdict))
  tests = out / 'tests.xml'
  if tests.exists():
    text = tests.read_text()
    counts = {k: int(_attr(text, k)) for k in ('tests', 'failures', 'errors', 'skipped')}
    add('tests', 'compiled kernel/attention tests', f'{counts["tests"] - counts["skipped"]} run, '
        f'{counts["failures"] + counts["errors"]} failed, {counts["skipped"]} skipped',
        'all pass', 'ok' if counts['failures'] + counts['errors'] == 0 else 'FAIL')
  kernels = _load(out / 'kernels.json')
  if kernels:
    worst = max(max(r['fwd_pallas_err'], r['fwdbwd_pallas_err']) for r in kernels['rows'])
    limit = 2e-2 if kernels.get('dtype') == 'bfloat16' else 1e-4
    add('kernels', 'largest Pallas error vs reference', f'{worst:.1e}', f'<= {limit:g}',
        _verdict(worst, limit, higher=False))
    for op in sorted({r['op'] for r in kernels['rows']}):
      ratios = [r['fwdbwd_pallas_vs_xla'] for r in kernels['rows'] if r['op'] == op]
      add('kernels', f'{op} pallas/xla speed-up (fwd+bwd, min..max)',
          f'{min(ratios):.2f}..{max(ratios):.2f}', '> 1 to enter PALLAS_WINS',
          'in PALLAS_WINS' if op in kernels.get('pallas_wins', ()) else 'xla stays')
  ffn = _load(out / 'ffn.json')
  if ffn:
    for r in ffn['rows']:
      target = FFN_TARGETS.get(r['variant'])
      if target is None or (r['variant'].startswith('blockshuffle') and r['width'] < 5120):
        continue
      add('ffn', f'{r["variant"]} fwd speed-up, width {r["width"]}', f'{r["fwd_speedup"]:.2f}x',
          f'~{target}x (paper)', _verdict(r['fwd_speedup'], 0.9 * target))
  decode = _load(out / 'decode.json')
  if decode:
    crossover = {}
    for r in decode['ffn']:
      if r['ffn'] != 'dense':
        crossover[r['ffn']] = r['crossover']
    for name, c in sorted(crossover.items()):
      add('decode', f'{name} pre-merge crossover (tokens)', str(c), f'> {CROSSOVER_TARGET} '
          '(paper ~16)', _verdict(c, CROSSOVER_TARGET + 1e-9))
  for result in results:
    if not result['step'].startswith('train-'):
      continue
    train = _load(out / f'{result["step"]}.json')
    for r in (train or {}).get('rows', []):
      mfu = r['mfu']
      dense_m = result['step'] == 'train-m-dense'
      add(result['step'], f'{r["name"]} tokens/s, MFU',
          f'{r["tokens_per_s"]:.0f}, ' + (f'{100 * mfu:.1f}%' if isinstance(mfu, float)
                                          else 'n/a'),
          f'MFU >= {100 * MFU_TARGET:.0f}%' if dense_m else '',
          _verdict(mfu, MFU_TARGET) if dense_m else '')
  mfu = _load(out / 'mfu.json')
  for r in (mfu or {}).get('rows', []):
    add('mfu', f'{r["name"]} counted / accounted forward FLOPs', f'{r["forward_ratio"]:.3f}',
        f'1 +- {FLOP_AGREEMENT}', 'ok' if abs(r['forward_ratio'] - 1) <= FLOP_AGREEMENT
        else 'MISS')
    add('mfu', f'{r["name"]} train / forward FLOPs; MFU counted vs accounted',
        f'{r["train_over_forward"]:.2f}; ' + ', '.join(
            f'{100 * v:.1f}%' if isinstance(v, float) else str(v)
            for v in (r['mfu_counted'], r['mfu_accounting'])), '3.0 (the convention)', '')
  if dry:  # toy sizes on a CPU: the numbers are plumbing, not measurements
    for row in table[len(results):]:
      if row['verdict'] in ('ok', 'MISS', 'n/a'):
        row['verdict'] = f'({row["verdict"]}, dry run)'
  summary = {'dry_run': dry, 'steps': results, 'table': table,
             'needs_beyond_requirements': list(NEEDS)}
  (out / 'summary.json').write_text(json.dumps(summary, indent=1))
  return table


def _attr(xml_text: str, name: str) -> str:
  import re  # pylint: disable=g-import-not-at-top
  found = re.search(rf'<testsuite[^>]* {name}="(\d+)"', xml_text)
  return found.group(1) if found else '0'


def print_table(table: list[dict]):
  columns = ['step', 'what', 'value', 'target', 'verdict']
  widths = [max([len(c)] + [len(str(r[c])) for r in table]) for c in columns]
  line = lambda vals: '| ' + ' | '.join(str(v).ljust(w) for v, w in zip(vals, widths)) + ' |'
  print(line(columns))
  print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
  for r in table:
    print(line([r[c] for c in columns]))


def main(argv=None) -> int:
  parser = cli.parser(__doc__, 'structffn_jax.bench.device_suite')
  parser.add_argument('--out', help='folder for every JSON, the logs and summary.json')
  parser.add_argument('--dry-run', action='store_true',
                      help='every step on the CPU at toy sizes (plumbing check)')
  parser.add_argument('--budget-s', type=cli.real(0, above=True), default=480.0,
                      help='total time limit')
  parser.add_argument('--env', metavar='JSON', help=argparse.SUPPRESS)  # the env step
  parser.add_argument('--mfu', nargs='+', metavar='TRAIN_JSON', help=argparse.SUPPRESS)
  parser.add_argument('--mfu-out', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.env:
    return env_step(args.env, args.dry_run)
  if args.mfu:
    return mfu_step(args.mfu, args.mfu_out)
  if not args.out:
    parser.error('--out DIR is required')
  out = pathlib.Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  print('Needs beyond requirements.txt: ' + '; '.join(NEEDS) + ('  [dry run: CPU, toy sizes]'
                                                              if args.dry_run else ''))
  start = time.monotonic()
  results = run_steps(out, args.dry_run, args.budget_s)
  table = summarize(out, results, args.dry_run)
  print(f'\nDevice suite{" (dry run: CPU, toy sizes; numbers mean nothing)" if args.dry_run else ""}'
        f' in {time.monotonic() - start:.0f}s; everything under {out}:')
  print_table(table)
  return 0 if all(r['status'] == 'ok' for r in results) else 1


if __name__ == '__main__':
  sys.exit(main())
