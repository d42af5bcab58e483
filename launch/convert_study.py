"""Run `configs/convert_study.py` end to end, resumably: `python launch/convert_study.py --root R`.

In the config's PLAN order: the dense source is trained; each converted run is made by
`python -m structffn_jax.convert --from <the source> ...` (once: a workdir that holds a config.json
is not converted again) and then trained from its own config.py; the `long` reference is trained
from scratch. A finished run is skipped, an interrupted one resumes where its last checkpoint
left it (exactly), and a failed one is reported and left alone (`--retry-failed` runs it again).
Every run's output goes to <workdir>/train.log, its exit status, wall and CPU time to
<workdir>/sweep.json; with `--record DIR` each ended run is copied (config, sweep.json, metrics,
convert.json) to DIR/<run name>, and a run recorded there is skipped. All runs share one
prepared data directory, <root>/data.

  python launch/convert_study.py --root runs/convert_study --record results/convert_study/runs
  python launch/convert_study.py --root runs/convert_study --summary   # where each run stands
"""

from __future__ import annotations

import pathlib
import shlex
import shutil
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from structffn_jax import cli  # pylint: disable=g-import-not-at-top
from structffn_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from structffn_jax import studies  # pylint: disable=g-import-not-at-top

CONFIG = 'configs/convert_study.py'


def plan(module, root: pathlib.Path, size: str) -> list[dict]:
  """Each run of the study: its argument, config, workdir and the commands that make it."""
  data = ['--set', f'data.data_dir={root / "data"}']
  source = None
  runs = []
  for arg, converted in module.PLAN:
    arg = f'{arg},size={size}'
    config = config_lib.load(f'{CONFIG}:{arg}', (f'data.data_dir={root / "data"}',))
    workdir = root / config.name
    if config.name.endswith('-source-seed1005') and source is None:
      source = workdir
    steps = []
    if converted:
      mode = dict(kv.split('=') for kv in arg.split(','))['mode']
      steps.append([sys.executable, '-m', 'structffn_jax.convert', '--from', str(source),
                    '--config', f'{CONFIG}:{arg}', '--mode', mode, '--workdir', str(workdir),
                    *data])
      train = [sys.executable, '-m', 'structffn_jax.train', '--config',
               str(workdir / 'config.py'), '--workdir', str(workdir)]
    else:
      train = [sys.executable, '-m', 'structffn_jax.train', '--config', f'{CONFIG}:{arg}',
               '--workdir', str(workdir), *data]
    runs.append({'arg': arg, 'config': config, 'workdir': workdir, 'convert': steps,
                 'train': train})
  return runs


def record(workdir: pathlib.Path, record_dir: str) -> None:
  dest = studies.record_run(workdir, record_dir)
  if (workdir / 'convert.json').exists():
    shutil.copyfile(workdir / 'convert.json', dest / 'convert.json')
  conversion = _convert_log(workdir) / studies.SWEEP_FILE  # the conversion's exit, wall, CPU
  if conversion.exists():
    shutil.copyfile(conversion, dest / 'convert_sweep.json')


def _convert_log(workdir: pathlib.Path) -> pathlib.Path:
  return workdir.parent / f'.{workdir.name}.convert'


def main(argv=None) -> int:
  parser = cli.parser(__doc__, 'launch/convert_study.py')
  parser.add_argument('--root', default='runs/convert_study', help='workdirs are <root>/<name>')
  parser.add_argument('--size', default='cpu', help="the config's size: cpu | s")
  parser.add_argument('--record', default='', metavar='DIR',
                      help='copy each ended run to DIR/<run name>; skip the runs recorded there')
  parser.add_argument('--match', default='', metavar='TEXT',
                      help='only the runs whose config argument contains TEXT')
  parser.add_argument('--retry-failed', action='store_true', help='run failed runs again')
  parser.add_argument('--summary', action='store_true', help='print where each run stands, only')
  args = cli.parse(parser, argv)
  root = pathlib.Path(args.root).resolve()
  try:
    module = config_lib.config_module(REPO / CONFIG)
    runs = plan(module, root, args.size)
  except config_lib.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.match:
    runs = [r for r in runs if args.match in r['arg']]
  if args.summary:
    print(studies.format_table(studies.summary_rows([(r['config'], r['workdir'], None)
                                                     for r in runs])))
    return 0
  failed = 0
  for i, r in enumerate(runs, 1):
    name, workdir = r['config'].name, r['workdir']
    recorded = pathlib.Path(args.record) / name if args.record else None
    tag = f'[{i}/{len(runs)}] {name}'
    if recorded is not None and (recorded / 'config.json').exists() and \
        studies.run_status(r['config'], recorded).state == 'finished':
      print(f'{tag}: recorded in {recorded}; skipped', flush=True)
      continue
    status = studies.run_status(r['config'], workdir)
    if status.state == 'finished' or (status.state == 'failed' and not args.retry_failed):
      print(f'{tag}: {status.describe()}; skipped', flush=True)
      if recorded is not None and status.state == 'finished':
        record(workdir, args.record)
      continue
    wall = 0.0
    rc = 0
    if r['convert'] and not (workdir / 'config.json').exists():
      print(f'{tag}: converting; {shlex.join(r["convert"][0])}', flush=True)
      log_dir = _convert_log(workdir)
      rc, wall = studies.run_logged(r['convert'][0], log_dir, cwd=REPO)
      if rc:
        print(f'{tag}: the conversion failed (exit {rc}); see {log_dir / studies.LOG_FILE}',
              flush=True)
        failed += 1
        continue
    print(f'{tag}: {status.describe()}; {shlex.join(r["train"])}', flush=True)
    rc, train_wall = studies.run_logged(r['train'], workdir, cwd=REPO)
    status = studies.run_status(r['config'], workdir)
    failed += status.state != 'finished'
    if recorded is not None and (status.state == 'finished' or
                                 (status.state == 'failed' and status.step > 0)):
      record(workdir, args.record)
    print(f'{tag}: {status.describe()} (exit {rc}, {studies.duration(wall + train_wall)})',
          flush=True)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
