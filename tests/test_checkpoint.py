"""Checkpoints under faults: a damaged one falls back to an older one and is kept, none readable
stops with one line and moves nothing, a signal during a restore stops and moves nothing, a
reader skips a damaged one, a save's finalisation time is recorded, a full disk stops the run at
the failed save, and a non-finite loss sets aside the checkpoints that reproduce it."""

import json
import math
import pathlib
import shutil
import subprocess

import numpy as np
import pytest

from structffn_jax import checkpoint, evaluate, metrics, train
from structffn_jax import workdir as workdir_lib
from tests import tiny_setup

REPO = pathlib.Path(__file__).resolve().parents[1]
tiny = tiny_setup.checkpointed_run  # (data_dir, *overrides, sgt=1)


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


@pytest.mark.parametrize('link', ['context', 'cause'])
def test_a_signal_during_a_restore_stops_and_moves_nothing(trained, tmp_path, link):
  """A KeyboardInterrupt (Ctrl-C, or SIGTERM in the trainer's start-up) that lands in Orbax's
  reads can come out as a plain Exception raised while handling it or from it. The interrupt
  goes on: the checkpoint being read is not taken for unreadable, moved aside and replaced by an
  older one (which would also swallow the signal and train on)."""
  workdir = copy_run(trained, tmp_path)
  ckpt = checkpoint.Checkpointer(workdir, keep=3, cleanup=True, log=lambda line: None)
  asked = []

  def target(meta):  # called inside the restore, as Orbax's reads are
    asked.append(meta['step'])
    try:
      raise KeyboardInterrupt('SIGTERM')
    except KeyboardInterrupt as interrupt:
      if link == 'cause':
        raise RuntimeError('a read cut short') from interrupt
      raise RuntimeError('a read cut short')  # pylint: disable=raise-missing-from

  with pytest.raises(KeyboardInterrupt, match='SIGTERM'):
    ckpt.restore_newest(target)
  ckpt.close(quiet=True)
  assert asked == [6]  # no older checkpoint was tried
  assert steps_on_disk(workdir) == ['2', '4', '6']


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


@pytest.mark.parametrize('peak_lr, advised', [(3e-3, '0.0003'), (math.inf, '0.0006'),
                                              (math.nan, '0.0006'), (1e-323, '0.0006')],
                         ids=['finite', 'inf', 'nan', 'underflow'])
def test_non_finite_loss_advice_is_always_a_finite_learning_rate(tmp_path, peak_lr, advised):
  """A tenth of an inf peak_lr was advised as `--set train.peak_lr=inf`."""
  ckpt = checkpoint.Checkpointer(tmp_path / 'w', 2)
  try:
    message = ckpt.set_aside_non_finite(1, math.nan, peak_lr)
  finally:
    ckpt.close()
  assert f'--set train.peak_lr={advised} --allow-change train.peak_lr' in message
