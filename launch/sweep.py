"""Turn a config's variants into one training command each: `python launch/sweep.py CONFIG ...`.

The variants are the config argument strings in the config module's `VARIANTS` list (if it has
one), crossed with every `--grid key=v1,v2,...` given (grid values override a variant's). Each
variant is loaded and validated here, so a bad one fails before anything is submitted; its run
name (`config.name`) names its workdir under --root.

  python launch/sweep.py configs/structured_ffn.py --grid model=s,m \\
      --grid method=lowrank,blockdense,blockshuffle --grid fraction=63,32
  python launch/sweep.py configs/tiny.py --grid method=dense,lowrank --launcher local --run
  python launch/sweep.py configs/structured_ffn.py --grid method=dense,lowrank \\
      --launcher slurm --set mesh.fsdp=8 --run          # one sbatch job per variant

Launchers: `plain` (python -m structffn_jax.train, one process: all local devices), `local`
(launch/local.sh with --processes N), `slurm` (sbatch launch/slurm.sbatch, one job per variant),
`slurm-array` (one sbatch array job, task i trains variant i: the script is written to
<root>/<config>.array.sbatch), `tpu` (launch/tpu_pod.sh train --tpu NAME --zone ZONE). Without
--run the commands are printed, one per line, ready for a shell or a job queue.

With --run (plain and local) the variants run one after another on this machine: a finished run
is skipped, an unfinished one resumes from its last checkpoint, a failed one (a diverged loss, a
crash) is recorded in <workdir>/sweep.json and the sweep goes on; --retry-failed runs those again.
Each run's output goes to <workdir>/train.log, and <workdir>/sweep.json keeps each attempt's
wall and CPU time. --record DIR copies every finished run's config, sweep.json and metrics
(gzipped, no checkpoints) to DIR/<run name>, a study's results to commit as they come; a run
already recorded there is skipped even when its workdir is gone. --summary prints one table of
every variant's status and final validation loss (alone, without --run, it only reads the
workdirs).
"""

from __future__ import annotations

import itertools
import pathlib
import shlex
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from structffn_jax import cli  # noqa: E402
from structffn_jax import config as config_lib  # noqa: E402
from structffn_jax import studies  # noqa: E402


def module_variants(config_path: str) -> list[str]:
  """The `VARIANTS` list of a config module ([''] when it has none: the defaults)."""
  return [str(v) for v in getattr(config_lib.config_module(config_path), 'VARIANTS', [''])]


def parse_arg(arg: str) -> dict[str, str]:
  return dict(item.split('=', 1) for item in filter(None, arg.split(',')))


def expand(variants: list[str], grid: list[str]) -> list[str]:
  """Every variant crossed with every combination of the grid, as 'k=v,k=v' strings."""
  axes = []
  for item in grid:
    key, sep, values = item.partition('=')
    if not sep or not values:
      raise config_lib.ConfigError(f'--grid {item!r}: expected key=v1,v2,...')
    axes.append([(key, v) for v in values.split(',') if v])
  out = []
  for base in variants:
    for combo in itertools.product(*axes):
      merged = {**parse_arg(base), **dict(combo)}
      arg = ','.join(f'{k}={v}' for k, v in merged.items())
      if arg not in out:
        out.append(arg)
  return out


def command(launcher: str, config_arg: str, workdir: str, sets: list[str], args) -> list[str]:
  train = ['--config', config_arg, '--workdir', workdir] + [a for s in sets for a in ('--set', s)]
  # Runs started here use this sweep's own interpreter (its venv, whatever PATH says); a SLURM
  # array's lines run on other nodes, under the job's environment.
  if launcher == 'plain':
    return [sys.executable, '-m', 'structffn_jax.train'] + train
  if launcher == 'slurm-array':
    return ['python', '-m', 'structffn_jax.train'] + train
  if launcher == 'local':
    return ['launch/local.sh', str(args.processes), sys.executable, '-m',
            'structffn_jax.train'] + train
  if launcher == 'slurm':
    name = pathlib.Path(workdir).name
    return ['sbatch', f'--job-name={name}', *args.sbatch, 'launch/slurm.sbatch', config_arg,
            workdir] + train[4:]
  if launcher == 'tpu':
    return ['launch/tpu_pod.sh', 'train', args.tpu or '$TPU_NAME', args.zone or '$ZONE',
            config_arg, workdir] + train[4:]
  raise ValueError(launcher)


def main(argv=None) -> int:
  parser = cli.parser(__doc__, 'launch/sweep.py')
  parser.add_argument('config', help='configs/<file>.py, whose VARIANTS list the runs')
  parser.add_argument('--grid', action='append', default=[], metavar='KEY=V1,V2',
                      help='cross the variants with these values of a config argument key; '
                           'repeatable')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='config override for every variant (or --config.FIELD=VALUE)')
  parser.add_argument('--root', default='runs', help='workdirs are <root>/<run name>')
  parser.add_argument('--launcher', default='plain',
                      choices=('plain', 'local', 'slurm', 'slurm-array', 'tpu'),
                      help='how each variant is started (see above)')
  parser.add_argument('--processes', type=int, default=2, help='local: processes per run')
  parser.add_argument('--sbatch', action='append', default=[], metavar='FLAG',
                      help='slurm: extra sbatch flag, e.g. --sbatch=--nodes=4')
  parser.add_argument('--tpu', default='', help='tpu: TPU VM name')
  parser.add_argument('--zone', default='', help='tpu: zone')
  parser.add_argument('--run', action='store_true',
                      help='run the commands (plain, local: one after another; slurm: submit)')
  parser.add_argument('--retry-failed', action='store_true',
                      help='with --run: train again the runs that failed or diverged before')
  parser.add_argument('--summary', action='store_true',
                      help='print a table of every variant: status, steps, final losses')
  parser.add_argument('--match', default='', metavar='TEXT',
                      help='only the variants whose config argument contains TEXT')
  parser.add_argument('--record', default='', metavar='DIR',
                      help='with --run: copy each finished run (config, sweep.json, metrics) to '
                           'DIR/<run name>, and skip the runs recorded there')
  args = cli.parse(parser, argv)

  try:
    variants = expand(module_variants(args.config), args.grid)
    if args.match:
      variants = [v for v in variants if args.match in v]
      if not variants:
        raise config_lib.ConfigError(f'--match {args.match!r}: no variant contains it')
    if variants == ['']:
      print(f'note: {args.config} defines no VARIANTS and no --grid was given: one run with its '
            'defaults', file=sys.stderr)
    runs, seen = [], {}
    for arg in variants:
      config_arg = f'{args.config}:{arg}' if arg else args.config
      config = config_lib.load(config_arg, tuple(args.set))  # validates the variant
      seen[config.name] = seen.get(config.name, 0) + 1  # same name twice: -2, -3, ...
      name = config.name + (f'-{seen[config.name]}' if seen[config.name] > 1 else '')
      workdir = pathlib.Path(args.root) / name
      runs.append((config, workdir, command(args.launcher, config_arg, str(workdir), args.set,
                                            args)))
  except (config_lib.ConfigError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2

  if args.launcher == 'slurm-array':
    script = write_array_script(args, [cmd for _, _, cmd in runs])
    print(f'{len(runs)} variants in {script}')
    if args.run:
      return subprocess.call(['sbatch', *args.sbatch, str(script)], cwd=REPO)
    return 0

  if not args.run:
    if not args.summary:
      for _, _, cmd in runs:
        print(shlex.join(cmd))
    else:
      print(studies.format_table(studies.summary_rows(runs)))
    return 0
  if args.launcher not in ('plain', 'local'):  # submitted, not run here
    for _, _, cmd in runs:
      print(shlex.join(cmd))
      rc = subprocess.call(cmd, cwd=REPO)
      if rc:
        print(f'error: exit status {rc}: {shlex.join(cmd)}', file=sys.stderr)
        return rc
    return 0

  failed = 0
  for i, (config, workdir, cmd) in enumerate(runs, 1):
    recorded = pathlib.Path(args.record) / workdir.name if args.record else None
    if recorded is not None and done(studies.run_status(config, recorded), args.retry_failed):
      print(f'[{i}/{len(runs)}] {config.name}: recorded in {recorded}; skipped', flush=True)
      continue
    status = studies.run_status(config, workdir)
    if done(status, args.retry_failed):
      print(f'[{i}/{len(runs)}] {config.name}: {status.describe()}; skipped', flush=True)
      if recorded is not None:
        studies.record_run(workdir, args.record)
      continue
    print(f'[{i}/{len(runs)}] {config.name}: {status.describe()}; {shlex.join(cmd)}', flush=True)
    rc, wall = studies.run_logged(cmd, workdir, cwd=REPO)
    status = studies.run_status(config, workdir)
    failed += status.state != 'finished'
    if recorded is not None and recordable(status):
      studies.record_run(workdir, args.record)
    print(f'[{i}/{len(runs)}] {config.name}: {status.describe()} (exit {rc}, '
          f'{studies.duration(wall)})', flush=True)
  if args.summary:
    print(studies.format_table(studies.summary_rows(runs)))
  return 1 if failed else 0


def recordable(status: studies.Status) -> bool:
  """Whether --record keeps this ended run: finished, or failed in training (diverged, say), both
  results. A run that failed before its first step (a missing package, a full disk) is not a
  result; it stays unrecorded, so that the next sweep runs it again."""
  return status.state == 'finished' or (status.state == 'failed' and status.step > 0)


def done(status: studies.Status, retry_failed: bool) -> bool:
  """Whether a sweep leaves the run alone: finished, or failed and not to be retried."""
  return status.state == 'finished' or (status.state == 'failed' and not retry_failed)


def write_array_script(args, commands: list[list[str]]) -> pathlib.Path:
  """A SLURM array script whose task i runs commands[i] (one node each; #SBATCH lines editable)."""
  root = pathlib.Path(args.root)
  root.mkdir(parents=True, exist_ok=True)
  script = root / f'{pathlib.Path(args.config).stem}.array.sbatch'
  table = '\n'.join(f'  {shlex.quote(shlex.join(cmd))}' for cmd in commands)
  script.write_text(f"""#!/usr/bin/env bash
# {len(commands)} variants of {args.config}; task i trains variant i. Re-submit to resume: a run
# that finished exits at once, an unfinished one resumes from its last checkpoint.
#SBATCH --job-name={pathlib.Path(args.config).stem}
#SBATCH --array=0-{len(commands) - 1}
#SBATCH --nodes=1
#SBATCH --gpus-per-node=1
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@600
#SBATCH --output=%x-%A_%a.out
set -euo pipefail
COMMANDS=(
{table}
)
cd {shlex.quote(str(REPO))}
source "${{VENV:-{REPO}/.venv}}/bin/activate"
eval "${{COMMANDS[$SLURM_ARRAY_TASK_ID]}}"
""")
  return script


if __name__ == '__main__':
  sys.exit(main())
