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

from structffn_jax import metrics, plot, train
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

  monkeypatch.setattr(train.evaluation, 'mean_loss', broken)
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
