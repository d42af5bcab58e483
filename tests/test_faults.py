"""Faults and bad input around the training path: a damaged checkpoint, a full disk, two trainers
on one workdir, a run that diverged, a first start that failed, a killed writer of
metrics.jsonl, a preempted run. Each ends in a one-line error or a resumed run, never a
traceback; what was on disk before stays there."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from structffn_jax import checkpoint, evaluate, metrics, plot, train
from structffn_jax import workdir as workdir_lib
from tests import tiny_setup

REPO = pathlib.Path(__file__).resolve().parents[1]

# 6 steps of 8 sequences, a checkpoint every 2; self-guided for the first 3 (hand-over at 3), so
# checkpoint 2 still has its guides and 4 and 6 do not.
RUN = ('train.tokens=3072', 'train.log_every=1', 'train.eval_every=0', 'train.ckpt_every=2',
       'train.eval_tokens=512')


def tiny(data_dir, *overrides, sgt=1):
  return tiny_setup.run_config(*RUN, f'data.data_dir={data_dir}', *overrides, sgt=sgt)


def losses(workdir):
  return {r['step']: r['loss'] for r in metrics.read_metrics(workdir) if 'loss' in r}


def steps_on_disk(workdir):
  return sorted(p.name for p in (pathlib.Path(workdir) / 'checkpoints').iterdir())


@pytest.fixture(scope='module')
def trained(tmp_path_factory, data_dir):
  """A finished 6-step self-guided run with checkpoints 2, 4, 6: (workdir, its losses)."""
  workdir = tmp_path_factory.mktemp('trained') / 'w'
  train.Trainer(tiny(data_dir), workdir).run()
  return workdir, losses(workdir)


def copy_run(trained, tmp_path):
  workdir = tmp_path / 'w'
  shutil.copytree(trained[0], workdir)
  return workdir


def garble_arrays(step_dir: pathlib.Path):
  """Overwrite the head of every array data file of a checkpoint (what a bad disk leaves)."""
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd']
  assert files
  for f in files:
    data = bytearray(f.read_bytes())
    data[:64] = b'\x5a' * min(64, len(data))
    f.write_bytes(bytes(data))


def garble_meta(step_dir: pathlib.Path):
  (step_dir / 'meta' / 'metadata').write_text('{"step": 4, "guides_')


# ----------------------------------------------------------------------------- checkpoints


def test_damaged_checkpoints_fall_back_to_an_older_one_and_are_kept(trained, tmp_path, data_dir,
                                                                    capsys):
  workdir = copy_run(trained, tmp_path)
  garble_arrays(workdir / 'checkpoints' / '6')
  garble_meta(workdir / 'checkpoints' / '4')
  capsys.readouterr()
  trainer = train.Trainer(tiny(data_dir), workdir)
  out = capsys.readouterr()
  # Step 2 was saved before the hand-over: its metadata brings the guides back.
  assert trainer.step == 2 and trainer.guides
  assert 'Traceback' not in out.err and 'Exception ignored' not in out.err, out.err
  for step in (6, 4):
    line = next(l for l in out.out.splitlines() if l.startswith(f'checkpoint step {step} at '))
    assert str(workdir / 'checkpoints' / str(step)) in line and 'cannot be restored (' in line
  assert 'resumed from' in out.out and 'at step 2' in out.out
  names = steps_on_disk(workdir)
  assert '2' in names and '4' not in names and '6' not in names
  assert any(n.startswith('6.corrupt-') for n in names), names
  assert any(n.startswith('4.corrupt-') for n in names), names
  trainer.run()  # saves 4 and 6 anew, and trains exactly as the first time
  assert losses(workdir) == trained[1]
  assert {'4', '6'} <= set(steps_on_disk(workdir))


def test_no_readable_checkpoint_stops_with_one_line_and_moves_nothing(trained, tmp_path, data_dir):
  workdir = copy_run(trained, tmp_path)
  for step in ('2', '4', '6'):
    garble_meta(workdir / 'checkpoints' / step)
  before = steps_on_disk(workdir)
  with pytest.raises(checkpoint.CheckpointError) as e:
    train.Trainer(tiny(data_dir), workdir)
  message = str(e.value)
  assert '\n' not in message
  assert 'no checkpoint in' in message and 'step 6:' in message and 'step 2:' in message
  assert 'nothing was moved' in message
  assert steps_on_disk(workdir) == before
  assert not (workdir / 'lock').exists(), 'the lock is released after a failed start'


def test_evaluate_skips_a_damaged_newest_checkpoint_and_moves_nothing(trained, tmp_path,
                                                                     capsys):
  workdir = copy_run(trained, tmp_path)
  garble_arrays(workdir / 'checkpoints' / '6')
  result = evaluate.evaluate(workdir, max_tokens=512)
  assert result['step'] == 4
  err = capsys.readouterr().err
  assert 'checkpoint step 6 at' in err and 'skipped the unreadable checkpoint step 6' in err
  assert steps_on_disk(workdir) == ['2', '4', '6'], 'a reader moves nothing'
  empty = tmp_path / 'empty'
  shutil.copytree(workdir, empty, ignore=shutil.ignore_patterns('checkpoints'))
  with pytest.raises(SystemExit, match='error: .*holds no checkpoint yet'):
    evaluate.main(['--workdir', str(empty)])
  assert not (empty / 'checkpoints').exists(), 'a reader creates nothing'


def test_finalisation_time_is_recorded(trained):
  records = [r for r in metrics.read_metrics(trained[0]) if 'ckpt_step' in r]
  assert sorted(r['ckpt_step'] for r in records) == [2, 4, 6]
  for r in records:
    assert r['ckpt_final_s'] >= 0 and r['step'] >= r['ckpt_step']
    assert r['ckpt_lag_steps'] == r['step'] - r['ckpt_step']


@pytest.fixture
def small_disk(tmp_path):
  """A 4 MiB tmpfs (two tiny checkpoints fit, a third does not); skipped unless it mounts."""
  mount = tmp_path / 'disk'
  mount.mkdir()
  proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', str(mount)],
                        capture_output=True, text=True)
  if proc.returncode:
    pytest.skip(f'cannot mount a tmpfs here (needs root): {proc.stderr.strip()}')
  try:
    yield mount
  finally:
    subprocess.run(['umount', '-l', str(mount)], check=False)


def test_full_disk_stops_at_the_failed_save_and_keeps_the_last_checkpoint(small_disk, data_dir,
                                                                         capfd):
  workdir = small_disk / 'w'
  config = tiny(data_dir, 'train.tokens=6144', sgt=0)  # 12 steps: checkpoints 2, 4, 6, ...
  with pytest.raises(checkpoint.CheckpointError) as e:
    train.Trainer(config, workdir).run()
  message = str(e.value)
  out = capfd.readouterr()
  assert 'Task exception was never retrieved' not in out.err and 'Traceback' not in out.err, \
      out.err[-3000:]
  good = workdir_lib.saved_steps(workdir)
  assert good, 'a checkpoint was written before the disk filled'
  assert '\n' not in message
  assert str(workdir) in message and 'free of 4.0 MiB' in message
  assert 'no space left on device' in message
  assert f'The last good checkpoint: step {good[-1]} ({workdir / "checkpoints" / str(good[-1])})' \
      in message
  logged = losses(workdir)
  assert max(logged) <= good[-1] + config.train.ckpt_every + 2, 'stopped soon after the failure'
  # More space, the same command: the last good checkpoint restores, the failed save's leftovers
  # are cleaned up.
  subprocess.run(['mount', '-o', 'remount,size=64m', str(small_disk)], check=True)
  trainer = train.Trainer(config, workdir)
  assert trainer.step == good[-1]
  assert workdir_lib.saved_steps(workdir) == good
  assert not any('orbax-checkpoint-tmp' in n for n in steps_on_disk(workdir))
  trainer.close()


# ----------------------------------------------------------------------------- the workdir lock


@pytest.mark.slow
def test_a_second_trainer_is_refused_naming_the_holder(tmp_path, data_dir):
  workdir = tmp_path / 'w'
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import pathlib, sys, time\n'
       'from structffn_jax import workdir\n'
       'workdir.WorkdirLock.acquire(pathlib.Path(sys.argv[1]))\n'
       'print("locked", flush=True)\ntime.sleep(120)\n', str(workdir)],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(workdir_lib.WorkdirLocked) as e:
      train.Trainer(tiny(data_dir), workdir)
    message = str(e.value)
    assert f'pid {holder.pid} on host {socket.gethostname()}' in message
    assert '\n' not in message
    assert not (workdir / 'config.json').exists() and not (workdir / 'metrics.jsonl').exists()
    cli = subprocess.run([sys.executable, '-m', 'structffn_jax.train', '--config',
                          f'{REPO}/configs/tiny.py:method=lowrank', '--workdir', str(workdir),
                          '--set', f'data.data_dir={data_dir}'],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert cli.returncode == 1 and 'Traceback' not in cli.stderr
    assert cli.stderr.strip().splitlines()[-1] == f'error: {message}', cli.stderr
  finally:
    holder.kill()
    holder.wait()


def test_a_stale_lock_is_taken_over(tmp_path, data_dir, capsys):
  workdir = tmp_path / 'w'
  workdir.mkdir()
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  (workdir / 'lock').write_text(json.dumps({'pid': dead.pid, 'host': socket.gethostname(),
                                            'since': '2026-01-01T00:00:00+00:00'}))
  trainer = train.Trainer(tiny(data_dir, 'train.tokens=1024'), workdir)
  assert f'took over the stale lock of pid {dead.pid}' in capsys.readouterr().out
  holder = json.loads((workdir / 'lock').read_text())
  assert holder['pid'] == os.getpid()
  with pytest.raises(workdir_lib.WorkdirLocked, match='another Trainer of this process'):
    train.Trainer(tiny(data_dir, 'train.tokens=1024'), workdir)
  trainer.close()  # what run() does at its end
  assert not (workdir / 'lock').exists(), 'released'
  # A lock from another host: its pid cannot be checked from here. Refused while its holder
  # touches it, taken over once it has not for STALE_AFTER_S (a job requeued after a node died).
  lock = workdir / 'lock'
  lock.write_text(json.dumps({'pid': 1, 'host': 'elsewhere'}))
  with pytest.raises(workdir_lib.WorkdirLocked, match='pid 1 on host elsewhere.*remove'):
    train.Trainer(tiny(data_dir, 'train.tokens=1024'), workdir)
  old = time.time() - workdir_lib.WorkdirLock.STALE_AFTER_S - 5
  os.utime(lock, (old, old))
  trainer = train.Trainer(tiny(data_dir, 'train.tokens=1024'), workdir)
  assert 'took over the stale lock of pid 1 on host elsewhere (not touched for' in \
      capsys.readouterr().out
  trainer.close()


# ----------------------------------------------------------------------------- config and workdir


def test_a_failed_first_start_does_not_block_the_fixed_command(tmp_path, data_dir):
  workdir = tmp_path / 'w'
  missing = tmp_path / 'no-such-file.txt'
  bad = tiny_setup.run_config(*RUN, f'data.data_dir={tmp_path / "data"}', 'data.source=text',
                              f'data.train_paths={missing}', sgt=0)
  with pytest.raises(FileNotFoundError, match='no-such-file'):
    train.Trainer(bad, workdir)
  assert not (workdir / 'config.json').exists()
  assert not (workdir / 'lock').exists()
  trainer = train.Trainer(tiny(data_dir, 'train.tokens=1024', sgt=0), workdir)
  assert json.loads((workdir / 'config.json').read_text())['data']['data_dir'] == str(data_dir)
  trainer.close()


def test_a_changed_config_is_accepted_while_no_checkpoint_exists(tmp_path, data_dir):
  workdir = tmp_path / 'w'
  diverging = ('train.peak_lr=1e30', 'train.warmup_frac=0.0001', 'train.grad_clip=1e30',
               'train.ckpt_every=1000', 'train.tokens=2048')
  with pytest.raises(train.NonFiniteLoss) as e:
    train.Trainer(tiny(data_dir, *diverging, sgt=0), workdir).run()
  message = str(e.value)
  assert 'None' not in message and 'No good checkpoint was saved' in message
  assert '--allow-change train.peak_lr' in message
  fixed = tiny(data_dir, *diverging[1:], sgt=0)  # the default peak_lr, no --allow-change
  trainer = train.Trainer(fixed, workdir)
  assert trainer.step == 0
  trainer.close()
  assert json.loads((workdir / 'config.json').read_text())['train']['peak_lr'] == \
      fixed.train.peak_lr
  history = [json.loads(l) for l in (workdir / workdir_lib.HISTORY).read_text().splitlines()]
  assert history[-1]['step'] == 0 and 'no checkpoint yet' in history[-1]['reason']
  assert history[-1]['changes']['train.peak_lr'] == [1e30, fixed.train.peak_lr]


def test_non_finite_loss_advice_resumes_from_the_last_good_checkpoint(tmp_path, data_dir):
  """lr 0 for step 1 (warm-up), 1e30 from step 2: the loss of step 3 is NaN, so checkpoint 2
  (whose parameters gave it) is set aside; the advised command resumes from checkpoint 1."""
  workdir = tmp_path / 'w'
  diverging = ('train.peak_lr=1e30', 'train.warmup_frac=0.0001', 'train.grad_clip=1e30',
               'train.ckpt_every=1', 'train.tokens=2048')
  with pytest.raises(train.NonFiniteLoss) as e:
    train.Trainer(tiny(data_dir, *diverging, sgt=0), workdir).run()
  message = str(e.value)
  assert 'at step 3;' in message and '\n' not in message
  assert 'The last good checkpoint is step 1' in message
  assert 'Checkpoint step 2, whose parameters gave that loss, was moved aside' in message
  names = steps_on_disk(workdir)
  assert '1' in names and '2' not in names and any(n.startswith('2.nonfinite-') for n in names)
  advice = message.split('--set ')[1].split(' ')[0]  # train.peak_lr=1e+29
  field, value = advice.split('=')
  assert field == 'train.peak_lr'
  lowered = tiny(data_dir, 'train.peak_lr=3e-3', *diverging[1:], sgt=0)
  with pytest.raises(ValueError, match='train.peak_lr.*--allow-change'):
    train.Trainer(lowered, workdir)  # refused without the flag
  trainer = train.Trainer(lowered, workdir, allow_change=('train.peak_lr',))
  assert trainer.step == 1
  trainer.run()
  resumed = losses(workdir)
  assert sorted(resumed) == [1, 2, 3, 4] and all(np.isfinite(v) for v in resumed.values())
  history = [json.loads(l) for l in (workdir / workdir_lib.HISTORY).read_text().splitlines()]
  assert history[-1]['step'] == 1 and history[-1]['changes'] == {'train.peak_lr': [1e30, 3e-3]}
  assert json.loads((workdir / 'config.json').read_text())['train']['peak_lr'] == 3e-3
  assert float(value) < 1e30


def test_allow_change_refuses_fields_that_shape_the_state():
  with pytest.raises(train.config_lib.ConfigError, match='model.hidden_dim.*new --workdir'):
    workdir_lib.check_allow_change(['model.hidden_dim'])
  with pytest.raises(train.config_lib.ConfigError, match="train.nope: no such config field"):
    workdir_lib.check_allow_change(['train.nope'])
  assert workdir_lib.check_allow_change(['train.peak_lr']) == ('train.peak_lr',)


def test_an_older_config_json_without_new_fields_still_resumes(tmp_path):
  """A field added to the schema after a run started counts as its default, not a change."""
  workdir = tmp_path / 'w'
  config = tiny_setup.run_config()
  workdir.mkdir()
  saved = json.loads(config.to_json_best_effort())
  del saved['train']['data_start']
  (workdir / 'config.json').write_text(json.dumps(saved))
  (workdir / 'checkpoints' / '5').mkdir(parents=True)
  assert workdir_lib.check_workdir_config(workdir, config) == {}
  config.train.data_start = 3
  with pytest.raises(ValueError, match=r'train.data_start: 0 -> 3'):
    workdir_lib.check_workdir_config(workdir, config)


# ----------------------------------------------------------------------------- metrics and plots


def write_records(path, n, torn=True):
  lines = [json.dumps({'step': s, 'time': 0.0, 'loss': 5.0 - s / 10, 'tokens': 512 * s,
                       'train_flops': 1e9 * s}) for s in range(1, n + 1)]
  path.write_text('\n'.join(lines) + '\n' + ('{"step": 9, "lo' if torn else ''))


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path, capsys):
  workdir = tmp_path / 'w'
  workdir.mkdir()
  write_records(workdir / 'metrics.jsonl', 3)
  records = metrics.read_metrics(workdir)
  assert [r['step'] for r in records] == [1, 2, 3]
  assert 'warning:' in capsys.readouterr().err
  # A resumed run appends on a new line: its records survive the torn one.
  report = metrics.Reporter(workdir, 10)
  report.write(4, {'loss': 4.5})
  report.close()
  assert [r['step'] for r in metrics.read_metrics(workdir)] == [1, 2, 3, 4]
  assert 'skipped 1 incomplete metrics line(s) (line 4' in capsys.readouterr().err
  out = tmp_path / 'loss.png'
  plot.main([str(workdir), '--out', str(out)])
  assert out.stat().st_size > 0
  captured = capsys.readouterr()
  assert 'warning:' in captured.err and f'wrote {out}' in captured.out


@pytest.mark.parametrize('content', ['', '{"step": 1, "lo'], ids=['empty', 'torn-only'])
def test_plot_of_a_run_without_records_is_refused(tmp_path, content, capsys):
  workdir = tmp_path / 'w'
  workdir.mkdir()
  (workdir / 'metrics.jsonl').write_text(content)
  out = tmp_path / 'loss.png'
  with pytest.raises(SystemExit) as e:
    plot.main([str(workdir), '--out', str(out)])
  assert str(e.value).startswith(f'error: {workdir}: no training records')
  assert not out.exists()


# ----------------------------------------------------------------------------- preemption


@pytest.mark.slow
def test_sigterm_saves_waits_for_the_checkpoint_and_exits_75(tmp_path, data_dir):
  workdir = tmp_path / 'w'
  cmd = [sys.executable, '-m', 'structffn_jax.train', '--config',
         f'{REPO}/configs/tiny.py:method=lowrank', '--workdir', str(workdir),
         '--set', f'data.data_dir={data_dir}', '--set', 'train.tokens=1e6',
         '--set', 'train.log_every=1', '--set', 'train.eval_every=0',
         '--set', 'train.ckpt_every=1000']
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=REPO)
  lines = []
  try:
    deadline = time.time() + 300
    for line in proc.stdout:
      lines.append(line)
      if line.startswith('step      3/') or time.time() > deadline:
        break
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  out = ''.join(lines) + rest
  assert proc.returncode == train.EXIT_PREEMPTED == 75, out[-2000:] + err[-3000:]
  assert 'Traceback' not in err
  stopped = next(l for l in out.splitlines() if l.startswith('SIGTERM: checkpoint saved at step'))
  step = int(stopped.split('at step ')[1].split(';')[0])
  assert f'checkpoint step {step} final after' in out  # waited for, before exiting
  assert workdir_lib.saved_steps(workdir) == [step]
  assert not (workdir / 'lock').exists()
