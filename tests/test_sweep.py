"""launch/sweep.py: variants become one command per run for every launcher (a bad one fails before
any is printed); on one machine, finished runs are skipped, an interrupted run resumes from its
checkpoint, a diverging run is recorded and the sweep goes on; the summary reads the workdirs."""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

CONFIG = '''
from structffn_jax import config as config_lib
from structffn_jax.configs import common

VARIANTS = ['method=dense', 'method=lowrank', 'method=dense,lr=1e9']


def get_config(arg=None):
  a = common.parse_arg(arg, method='dense', lr=3e-3)
  c = config_lib.base_config()
  c.name = f'sweep-{a.method}' + ('-diverge' if a.lr > 1 else '')
  c.model.update(vocab_size=512, seq_len=32, hidden_dim=32, ffn_dim=64, attn_dim=32,
                 num_layers=2, num_heads=2, num_kv_heads=2, dtype='float32')
  c.model.ffn.update(common.ffn_structures(rank=8, blockdense=(2, 8),
                                           blockshuffle_blocks=2)[a.method])
  c.train.update(tokens=12 * 4 * 32, global_batch=4, peak_lr=a.lr, warmup_frac=0.0,
                 eval_every=0, eval_tokens=8 * 32, log_every=2, ckpt_every=4)
  c.data.update(source='stdlib', stdlib_max_bytes=150_000, stdlib_tests=False, vocab_size=512,
                data_dir=DATA_DIR)
  return c
'''


def _sweep(config, root, *extra):
  return subprocess.run([sys.executable, str(REPO / 'launch' / 'sweep.py'), str(config),
                         '--root', str(root), *extra], capture_output=True, text=True,
                        cwd=REPO, timeout=600)


@pytest.mark.slow
def test_sweep_skips_finished_resumes_interrupted_and_records_divergence(tmp_path):
  from structffn_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from structffn_jax import train  # pylint: disable=import-outside-toplevel

  config = tmp_path / 'sweep_config.py'
  config.write_text(f'DATA_DIR = {str(tmp_path / "data")!r}\n' + CONFIG)
  root = tmp_path / 'runs'
  # The lowrank run is interrupted after 4 of its 12 steps (as by a kill after a checkpoint).
  lowrank = config_lib.load(f'{config}:method=lowrank')
  result = train.Trainer(lowrank, root / 'sweep-lowrank').run(stop_at=4)
  assert result['step'] == 4 and 'stopped' in result

  first = _sweep(config, root, '--run', '--summary')
  out = first.stdout
  assert first.returncode == 1, out + first.stderr  # one run diverged
  assert 'sweep-dense: new (0/12 steps)' in out and 'sweep-dense: finished (12/12 steps)' in out
  assert 'sweep-lowrank: partial (4/12 steps)' in out
  assert 'resumed from' in (root / 'sweep-lowrank' / 'train.log').read_text()
  steps = [json.loads(line)['step'] for line in
           (root / 'sweep-lowrank' / 'metrics.jsonl').read_text().splitlines()]
  assert steps[:4] == [1, 2, 3, 4] and steps[-1] == 12
  diverged = json.loads((root / 'sweep-dense-diverge' / 'sweep.json').read_text())
  assert diverged['exit'] != 0 and 'non-finite' in diverged['error']
  assert 'sweep-dense-diverge: diverged at step' in out

  second = _sweep(config, root, '--run', '--summary')
  assert second.returncode == 0, second.stdout + second.stderr
  for name in ('sweep-dense', 'sweep-lowrank'):
    assert f'{name}: finished (12/12 steps); skipped' in second.stdout
  assert 'sweep-dense-diverge: diverged at step' in second.stdout and 'skipped' in second.stdout
  table = second.stdout.splitlines()[-4:]
  assert table[0].split()[:3] == ['run', 'status', 'steps']
  assert [row.split()[1] for row in table[1:]] == ['finished', 'finished', 'diverged']
  # The summary's FLOPs are the trainer's count, the resumed run's included: 12 whole steps.
  from structffn_jax import accounting, studies  # pylint: disable=import-outside-toplevel
  for method in ('dense', 'lowrank'):
    run = config_lib.load(f'{config}:method={method}')
    [row] = studies.summary_rows([(run, root / f'sweep-{method}')])
    last = [r for r in studies.records(root / f'sweep-{method}') if 'train_flops' in r][-1]
    assert row['train_flops'] == last['train_flops'], method
    assert row['train_flops'] == pytest.approx(accounting.account(run).run_flops, rel=1e-9)

  # --record copies each ended run (no checkpoints); with the workdirs gone, the records count.
  record = tmp_path / 'record'
  third = _sweep(config, root, '--run', '--record', str(record))
  assert third.returncode == 0, third.stdout + third.stderr
  for name in ('sweep-dense', 'sweep-lowrank', 'sweep-dense-diverge'):
    assert sorted(p.name for p in (record / name).iterdir()) == [
        'config.json', 'metrics.jsonl.gz', 'sweep.json'], name
  assert json.loads((record / 'sweep-dense' / 'sweep.json').read_text())['cpu_s'] > 0
  shutil.rmtree(root)
  fourth = _sweep(config, root, '--run', '--record', str(record))
  assert fourth.returncode == 0 and fourth.stdout.count('recorded in') == 3, fourth.stdout
  assert not (root / 'sweep-dense').exists()  # nothing trained again

  listing = _sweep(config, root)  # without --run: the commands, one per line
  assert listing.returncode == 0 and listing.stdout.count('structffn_jax.train') == 3


def test_runs_use_this_interpreter_and_start_up_failures_stay_unrecorded():
  sys.path.insert(0, str(REPO / 'launch'))
  try:
    import sweep  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.remove(str(REPO / 'launch'))
  from structffn_jax import studies  # pylint: disable=import-outside-toplevel
  cmd = sweep.command('plain', 'c.py', 'runs/x', ['train.tokens=8'], None)
  # The sweep's own interpreter, not whichever `python` PATH finds first (which may lack JAX).
  assert cmd[:3] == [sys.executable, '-m', 'structffn_jax.train'], cmd
  assert cmd[3:] == ['--config', 'c.py', '--workdir', 'runs/x', '--set', 'train.tokens=8']
  assert sweep.command('slurm-array', 'c.py', 'runs/x', [], None)[0] == 'python'
  assert sweep.recordable(studies.Status('finished', 12, 12))
  assert sweep.recordable(studies.Status('failed', 5, 12, 'non-finite loss'))
  assert not sweep.recordable(studies.Status('failed', 0, 12, "No module named 'jax'"))
  assert not sweep.recordable(studies.Status('partial', 4, 12))


def test_sweep_turns_variants_into_commands():
  out = subprocess.run(
      [sys.executable, 'launch/sweep.py', 'configs/tiny.py', '--grid', 'method=dense,lowrank',
       '--grid', 'sgt=0,1', '--set', 'mesh.fsdp=2', '--launcher', 'slurm', '--root', '/r'],
      capture_output=True, text=True, cwd=REPO, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines()[:2] == [
      'sbatch --job-name=tiny-dense launch/slurm.sbatch configs/tiny.py:method=dense,sgt=0 '
      '/r/tiny-dense --set mesh.fsdp=2',
      'sbatch --job-name=tiny-dense-2 launch/slurm.sbatch configs/tiny.py:method=dense,sgt=1 '
      '/r/tiny-dense-2 --set mesh.fsdp=2']
  assert len(out.stdout.splitlines()) == 4
  bad = subprocess.run(
      [sys.executable, 'launch/sweep.py', 'configs/tiny.py', '--grid', 'method=dense,bogus'],
      capture_output=True, text=True, cwd=REPO, timeout=120)
  assert bad.returncode == 2 and "error: method='bogus' is not allowed" in bad.stderr
  assert bad.stdout == ''  # nothing printed (or run) before every variant is valid


def test_paper_configs_sweep_their_table_rows():
  def sweep(*args):
    out = subprocess.run([sys.executable, 'launch/sweep.py', *args], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    return [line.rsplit(' --workdir ', 1)[1] for line in out.stdout.splitlines()]
  assert sweep('configs/structured_ffn.py') == [
      'runs/xl-dense', 'runs/xl-lowrank63', 'runs/xl-blockdense63', 'runs/xl-blockshuffle63',
      'runs/xl-lowrank32', 'runs/xl-blockdense32', 'runs/xl-blockshuffle32']
  assert sweep('configs/structured_ffn.py', '--grid', 'method=lowrank,blockdense,blockshuffle',
               '--grid', 'fraction=32', '--grid', 'sgt=fixedflop') == [
      f'runs/xl-{m}32-sgt-fixedflop' for m in ('lowrank', 'blockdense', 'blockshuffle')]
  assert len(set(sweep('configs/wide_structured.py'))) == 8
  assert len(set(sweep('configs/wikitext103_small.py', '--grid', 'scale=cpu'))) == 7
