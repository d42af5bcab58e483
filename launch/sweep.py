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
(launch/local.sh with --processes N), `slurm` (sbatch launch/slurm.sbatch), `tpu` (launch/
tpu_pod.sh train --tpu NAME --zone ZONE). Without --run the commands are printed, one per line,
ready for a shell or a job queue; with --run they are run one after another (slurm: submitted).
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import shlex
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from structffn_jax import config as config_lib  # noqa: E402


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
  if launcher == 'plain':
    return ['python', '-m', 'structffn_jax.train'] + train
  if launcher == 'local':
    return ['launch/local.sh', str(args.processes), 'python', '-m',
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
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog='\n'.join(__doc__.splitlines()[1:]))
  parser.add_argument('config', help='configs/<file>.py')
  parser.add_argument('--grid', action='append', default=[], metavar='KEY=V1,V2')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='config override for every variant')
  parser.add_argument('--root', default='runs', help='workdirs are <root>/<run name>')
  parser.add_argument('--launcher', default='plain', choices=('plain', 'local', 'slurm', 'tpu'))
  parser.add_argument('--processes', type=int, default=2, help='local: processes per run')
  parser.add_argument('--sbatch', action='append', default=[], metavar='FLAG',
                      help='slurm: extra sbatch flag, e.g. --sbatch=--nodes=4')
  parser.add_argument('--tpu', default='', help='tpu: TPU VM name')
  parser.add_argument('--zone', default='', help='tpu: zone')
  parser.add_argument('--run', action='store_true', help='run (or submit) the commands')
  args = parser.parse_args(argv)

  try:
    variants = expand(module_variants(args.config), args.grid)
    if variants == ['']:
      print(f'note: {args.config} defines no VARIANTS and no --grid was given: one run with its '
            'defaults', file=sys.stderr)
    commands, seen = [], {}
    for arg in variants:
      config_arg = f'{args.config}:{arg}' if arg else args.config
      config = config_lib.load(config_arg, tuple(args.set))  # validates the variant
      seen[config.name] = seen.get(config.name, 0) + 1  # same name twice: -2, -3, ...
      name = config.name + (f'-{seen[config.name]}' if seen[config.name] > 1 else '')
      workdir = str(pathlib.Path(args.root) / name)
      commands.append(command(args.launcher, config_arg, workdir, args.set, args))
  except (config_lib.ConfigError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2

  for cmd in commands:
    print(shlex.join(cmd))
    if args.run:
      rc = subprocess.call(cmd, cwd=REPO)
      if rc:
        print(f'error: exit status {rc}: {shlex.join(cmd)}', file=sys.stderr)
        return rc
  return 0


if __name__ == '__main__':
  sys.exit(main())
