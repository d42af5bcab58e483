"""Faults around the training path beyond checkpoints and the workdir (test_checkpoint.py,
test_workdir.py): a killed writer of metrics.jsonl, a plot of a run without records, a preempted
run. Each ends in a one-line error or a resumed run, never a traceback."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from structffn_jax import evaluation, metrics, plot, train
from structffn_jax import workdir as workdir_lib
from tests import tiny_setup

REPO = pathlib.Path(__file__).resolve().parents[1]
tiny = tiny_setup.checkpointed_run  # (data_dir, *overrides, sgt=1)


def losses(workdir):
  return {r['step']: r['loss'] for r in metrics.read_metrics(workdir) if 'loss' in r}


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


# ----------------------------------------------------------------------------- the final evaluation


def test_a_failed_final_evaluation_keeps_the_last_steps_checkpoint(tmp_path, data_dir,
                                                                    monkeypatch):
  """6 steps, a checkpoint every 4: step 6 is saved only at the end. The final save comes before
  the final evaluation, so an evaluation that fails cannot lose the finished run."""
  def broken(*args, **kwargs):
    raise RuntimeError('the validation rows cannot be read')

  monkeypatch.setattr(evaluation, 'mean_loss', broken)
  workdir = tmp_path / 'w'
  with pytest.raises(RuntimeError, match='validation rows'):
    train.Trainer(tiny(data_dir, 'train.ckpt_every=4', sgt=0), workdir).run()
  assert workdir_lib.saved_steps(workdir) == [4, 6]
  assert max(losses(workdir)) == 6


def test_hand_edited_metrics_lines_of_the_wrong_type_are_skipped(tmp_path, capsys):
  """`{"step": "61"}` made the plot fail with a TypeError traceback (sorting str with int)."""
  workdir = tmp_path / 'w'
  workdir.mkdir()
  write_records(workdir / 'metrics.jsonl', 3, torn=False)
  with open(workdir / 'metrics.jsonl', 'a') as f:
    f.write('{"step": "61", "loss": 4.0}\n{"step": 62, "loss": "low"}\n{"step": 63}\n')
  records = metrics.read_metrics(workdir)
  assert [r['step'] for r in records] == [1, 2, 3, 63]
  err = capsys.readouterr().err
  assert err.count('\n') == 1
  assert ("skipped 2 metrics line(s) of the wrong type (line 4: step='61' is not an integer; "
          "line 5: loss='low' is not a number); fix or delete them") in err
  out = tmp_path / 'loss.png'
  plot.main([str(workdir), '--out', str(out)])
  assert out.stat().st_size > 0


# ----------------------------------------------------------------------------- values too big


@pytest.mark.slow
@pytest.mark.parametrize('override, words', [
    ('train.tokens=inf', 'error: train.tokens=inf: must be a finite number'),
    ('train.eval_tokens=inf', 'error: train.eval_tokens=inf: must be a finite number'),
    ('train.seed=1e30', 'error: train.seed=1000000000000000019884624838656: too large'),
    ('train.global_batch=1e12', 'error: memory: this run needs at least'),
    ('model.num_layers=1e9', 'error: memory: this run needs at least'),
], ids=['tokens-inf', 'eval-tokens-inf', 'seed', 'global-batch', 'num-layers'])
def test_the_train_command_refuses_what_cannot_be_held_in_one_line(tmp_path, data_dir, override,
                                                                   words):
  """Each ended in a traceback (OverflowError, MemoryError, out of memory), some after
  config.json was written or after every step had been trained."""
  workdir = tmp_path / 'w'
  cmd = [sys.executable, '-m', 'structffn_jax.train', '--config', f'{REPO}/configs/tiny.py',
         '--workdir', str(workdir), '--set', f'data.data_dir={data_dir}',
         '--set', 'train.tokens=30720', '--set', 'train.ckpt_every=10', '--set',
         'train.log_every=5', '--set', 'train.eval_every=0', '--set', override]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
  assert proc.returncode == 1
  assert proc.stderr.strip().startswith(words) and proc.stderr.strip().count('\n') == 0, \
      proc.stderr
  assert not (workdir / 'config.json').exists()


# ----------------------------------------------------------------------------- a full disk


class FullDisk:
  """The disk under the workdir's writers (metrics.jsonl, TensorBoard, config.json, the history,
  the lock), filled on demand. A file opened through it keeps what is written in a buffer of its
  own, passed on to the real file at a flush (a line-buffered one at each newline) and at close.
  Once `full`, a flush or close with bytes to pass on raises ENOSPC and keeps them buffered,
  as a real buffered file does; `fail_on` adds the first call of that kind ('write': every
  write; 'close': a close even with nothing buffered, as a network file system reports it)."""

  def __init__(self, fail_on='flush', only=None):
    self.full, self.fail_on, self.only = False, fail_on, only
    self.files = []

  def open(self, path, mode='r', buffering=-1, **kw):
    if 'r' in mode or (self.only and self.only not in str(path)):
      return open(path, mode, buffering, **kw)
    f = _DiskFile(self, open(path, mode, **kw), buffering == 1)
    self.files.append(f)
    return f


class _DiskFile:

  def __init__(self, disk, real, line_buffered):
    self.disk, self.real, self.line_buffered = disk, real, line_buffered
    self.buffer, self.closed = [], False

  def _full(self):
    import errno  # pylint: disable=import-outside-toplevel
    return OSError(errno.ENOSPC, 'No space left on device', getattr(self.real, 'name', None))

  def write(self, data):
    if self.disk.full and self.disk.fail_on == 'write':
      raise self._full()
    self.buffer.append(data)
    if self.line_buffered and '\n' in data:
      self.flush()
    return len(data)

  def flush(self):
    if self.buffer and self.disk.full:
      raise self._full()
    for data in self.buffer:
      self.real.write(data)
    self.buffer = []
    self.real.flush()

  def close(self):
    if self.closed:
      return
    try:
      if self.disk.full and self.disk.fail_on == 'close':
        raise self._full()
      self.flush()
    finally:
      self.closed = True
      self.real.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


@pytest.fixture
def full_disk(monkeypatch):
  """Make a `FullDisk` the disk of every writer of the workdir: `full_disk(fail_on, only)`."""
  from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel

  def make(fail_on='flush', only=None):
    disk = FullDisk(fail_on, only)
    monkeypatch.setattr(metrics, 'open', disk.open, raising=False)
    monkeypatch.setattr(workdir_lib, 'open', disk.open, raising=False)
    monkeypatch.setattr(record_writer, 'open_file', lambda path: disk.open(path, 'wb'))
    return disk
  return make


class FillTheDisk(train.Hook):
  """Another writer fills the disk after step `at` (its checkpoint saved), or at the end."""

  def __init__(self, disk, at=None):
    self.disk, self.at = disk, at

  def after_step(self, trainer, m):
    if trainer.step == self.at:
      self.disk.full = True

  def end(self, trainer):
    self.disk.full = True


@pytest.mark.parametrize('only,fail_on', [('metrics.jsonl', 'flush'), ('metrics.jsonl', 'write'),
                                          ('tfevents', 'flush'), (None, 'flush')],
                         ids=['jsonl-buffered', 'jsonl-write', 'tb-buffered', 'every-writer'])
def test_a_disk_filled_during_training_reports_the_first_error_and_releases_the_lock(
    tmp_path, data_dir, full_disk, only, fail_on, capfd):
  """The disk fills after step 4 (checkpoint 4 saved): the next record fails, and closing the
  writers that still hold it (buffered) fails again; the first error is the one raised, in one
  line naming the last good checkpoint, and the lock is released."""
  workdir = tmp_path / 'w'
  disk = full_disk(fail_on, only)
  trainer = train.Trainer(tiny(data_dir, sgt=0), workdir, hooks=[FillTheDisk(disk, at=4)])
  with pytest.raises(train.checkpoint.CheckpointError) as e:
    trainer.run()
  message = str(e.value)
  assert '\n' not in message and 'no space left on device' in message, message
  assert (only or 'metrics.jsonl') in message
  assert f'The last good checkpoint: step 4 ({workdir.absolute() / "checkpoints" / "4"})' \
      in message
  assert workdir_lib.saved_steps(workdir) == [2, 4]
  assert not (workdir / 'lock').exists()
  assert all(f.closed for f in disk.files)
  assert 'Traceback' not in capfd.readouterr().err
  assert max(losses(workdir)) <= 5  # the record that failed (written to the writers before)


@pytest.mark.parametrize('only', ['metrics.jsonl', 'tfevents'])
def test_a_disk_full_at_the_last_close_is_one_line_and_the_lock_is_released(
    tmp_path, data_dir, full_disk, only):
  workdir = tmp_path / 'w'
  disk = full_disk('close', only)
  trainer = train.Trainer(tiny(data_dir, 'train.tokens=1024', sgt=0), workdir,
                          hooks=[FillTheDisk(disk)])
  with pytest.raises(train.checkpoint.CheckpointError) as e:
    trainer.run()
  message = str(e.value)
  assert '\n' not in message and only in message
  assert 'The last good checkpoint: step 2 (' in message
  assert not (workdir / 'lock').exists()
  assert all(f.closed for f in disk.files)


def test_every_writer_is_closed_when_one_fails_and_the_first_error_wins(tmp_path):
  import errno  # pylint: disable=import-outside-toplevel

  class Run:  # a W&B run whose finish finds the disk full
    finished = False

    def log(self, scalars, step):
      pass

    def finish(self):
      self.finished = True
      raise OSError(errno.ENOSPC, 'No space left on device')

  report = metrics.Reporter(tmp_path, 10)
  report.write(1, {'loss': 1.0})
  wandb = metrics.WandbWriter.__new__(metrics.WandbWriter)
  wandb.run = run = Run()
  report.wandb = wandb
  with pytest.raises(OSError, match='No space left'):
    report.close()
  assert run.finished and report.jsonl is None and report.tb is None
  assert metrics.read_metrics(tmp_path)[-1]['loss'] == 1.0
  report.close()  # twice: nothing left to close


def test_a_full_disk_leaves_the_config_the_history_and_the_lock_as_they_were(
    tmp_path, full_disk):
  workdir = tmp_path / 'w'
  workdir.mkdir()
  config = tiny_setup.run_config(sgt=0)
  workdir_lib.write_workdir_config(workdir, config, {'train.peak_lr': (1.0, 2.0)}, 4, 'x')
  before = {p.name: p.read_bytes() for p in workdir.iterdir()}
  disk = full_disk('close')
  disk.full = True
  config.train.peak_lr = 3.0
  with pytest.raises(OSError, match='No space left'):
    workdir_lib.write_workdir_config(workdir, config, {'train.peak_lr': (2.0, 3.0)}, 6, 'y')
  assert {p.name: p.read_bytes() for p in workdir.iterdir()} == before
  disk.only = workdir_lib.HISTORY  # config.json fits, the history does not
  with pytest.raises(OSError, match='No space left'):
    workdir_lib.write_workdir_config(workdir, config, {'train.peak_lr': (2.0, 3.0)}, 6, 'y')
  assert (workdir / workdir_lib.HISTORY).read_bytes() == before[workdir_lib.HISTORY]
  disk.only = None
  with pytest.raises(OSError, match='No space left'):
    workdir_lib.WorkdirLock.acquire(workdir)
  assert sorted(p.name for p in workdir.iterdir()) == sorted(before)
