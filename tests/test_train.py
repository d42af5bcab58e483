"""The trainer: exact resume across the hand-over, the guides dropped, the learning-rate schedule,
bad runs and the command (the self-guided rules themselves: test_sgt.py)."""

import json
import pathlib
import subprocess
import sys

import jax
import pytest

from structffn_jax import metrics, optim, sgt, train
from tests import tiny_setup

REPO = pathlib.Path(__file__).resolve().parents[1]


tiny = tiny_setup.run_config  # (*overrides, method='lowrank', sgt=1)


def run_losses(workdir):
  """step -> loss from metrics.jsonl (the latest record of a step wins)."""
  return {r['step']: r['loss'] for r in metrics.read_metrics(workdir) if 'loss' in r}


def run_flops(workdir):
  """step -> training FLOPs so far, from metrics.jsonl."""
  return {r['step']: r['train_flops'] for r in metrics.read_metrics(workdir) if 'loss' in r}


# 24 steps of 8 sequences; guided for the first 12 (fixedstep, ratio 0.5).
RUN = ('train.tokens=12288', 'train.log_every=1', 'train.eval_every=0', 'train.ckpt_every=1000',
       'train.eval_tokens=512')


@pytest.mark.slow
def test_resume_is_exact_across_the_handover(tmp_path, data_dir):
  overrides = RUN + (f'data.data_dir={data_dir}', 'sgt.reduce_flop=true')
  full = train.Trainer(tiny(*overrides), tmp_path / 'full')
  full.run()
  reference = run_losses(tmp_path / 'full')
  assert sorted(reference) == list(range(1, 25))
  for stop in (5, 17):  # before and after the hand-over at step 12
    workdir = tmp_path / f'stop{stop}'
    out = train.Trainer(tiny(*overrides), workdir).run(stop_at=stop)
    assert out == {'step': stop, 'stopped': f'stop_at={stop}'}
    resumed = train.Trainer(tiny(*overrides), workdir)
    assert resumed.step == stop
    assert resumed.guides == (stop < 12)
    resumed.run()
    losses = run_losses(workdir)
    assert losses == reference, f'resumed at {stop}: losses differ from the uninterrupted run'
    assert run_flops(workdir) == pytest.approx(run_flops(tmp_path / 'full'), rel=1e-12)


def test_guides_and_their_optimizer_state_are_dropped(tmp_path, data_dir):
  seen = {}

  class Recording(train.Hook):
    """A hook of the loop: every step's record as it is fetched."""

    def on_metrics(self, trainer, step, record):
      seen[step] = record['loss']

  trainer = train.Trainer(tiny(*RUN, f'data.data_dir={data_dir}', 'train.tokens=3072'),
                          tmp_path / 'w', hooks=[Recording()])
  assert trainer.plan.guided_steps == 3
  n_before = len(jax.tree.leaves(trainer.state))
  trainer.run()
  leaves = jax.tree_util.tree_flatten_with_path(trainer.state)[0]
  assert not any('guide' in jax.tree_util.keystr(p) for p, _ in leaves)
  # fc1 and fc2 of 2 stacked blocks each lose 1 param + 2 Adam moments.
  assert n_before - len(leaves) == 2 * 3
  assert sgt.alpha_of(trainer.state['opt_state']) == 0.0
  assert seen == run_losses(tmp_path / 'w')


def test_lr_schedule_warmup_then_cosine_to_a_tenth():
  c = tiny()
  lr = optim.lr_schedule(c.train, 100)
  peak = c.train.peak_lr
  assert float(lr(0)) == 0.0
  assert float(lr(5)) == pytest.approx(peak * 5 / 10, rel=1e-6)
  assert float(lr(10)) == pytest.approx(peak, rel=1e-6)
  mid = 10 + 45
  assert float(lr(mid)) == pytest.approx(0.1 * peak + 0.9 * peak * 0.5, rel=1e-5)
  assert float(lr(100)) == pytest.approx(0.1 * peak, rel=1e-6)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, data_dir):
  overrides = RUN + (f'data.data_dir={data_dir}', 'train.ckpt_every=2', 'train.peak_lr=1e30',
                     'train.warmup_frac=0.0001', 'train.grad_clip=1e30')
  trainer = train.Trainer(tiny(*overrides, sgt=0), tmp_path / 'w')
  with pytest.raises(train.NonFiniteLoss, match='non-finite loss') as e:
    trainer.run()
  saved = sorted(int(p.name) for p in (tmp_path / 'w' / 'checkpoints').iterdir()
                 if p.name.isdigit())
  bad_step = int(str(e.value).split('at step ')[1].split(';')[0])
  assert all(s < bad_step for s in saved)


def test_workdir_of_another_config_is_refused(tmp_path, data_dir):
  workdir = tmp_path / 'w'
  train.Trainer(tiny(*RUN, f'data.data_dir={data_dir}', 'train.tokens=1024'), workdir).run()
  before = (workdir / 'config.json').read_text()
  with pytest.raises(ValueError, match='holds a run of another config.*model.ffn.rank'):
    train.Trainer(tiny(*RUN, f'data.data_dir={data_dir}', 'train.tokens=1024',
                       'model.ffn.rank=8'), workdir)
  assert (workdir / 'config.json').read_text() == before


@pytest.mark.slow
def test_cli_trains_profiles_and_evaluates(tmp_path, data_dir):
  workdir = tmp_path / 'w'
  cmd = [sys.executable, '-m', 'structffn_jax.train', '--config',
         f'{REPO}/configs/tiny.py:method=blockshuffle', '--workdir', str(workdir),
         '--profile', '2:2', '--set', f'data.data_dir={data_dir}', '--set', 'train.tokens=3072',
         '--set', 'train.log_every=2']
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
  assert out.returncode == 0, out.stderr
  assert 'step      6/6' in out.stdout and 'valid_loss' in out.stdout
  traces = list((workdir / 'profile').rglob('*.xplane.pb'))
  assert traces, 'no XLA trace written'
  records = metrics.read_metrics(workdir)
  assert any('valid_ppl' in r for r in records)
  assert list((workdir / 'tb').iterdir())
  ev = subprocess.run([sys.executable, '-m', 'structffn_jax.evaluate', '--workdir', str(workdir),
                       '--max-tokens', '2048'],  # the tiny config's train.eval_tokens
                      capture_output=True, text=True, cwd=REPO, timeout=300)
  assert ev.returncode == 0, ev.stderr
  assert 'valid: loss' in ev.stdout
  result = json.loads((workdir / 'eval.jsonl').read_text().splitlines()[-1])
  final = [r for r in records if 'valid_loss' in r][-1]
  assert result['loss'] == pytest.approx(final['valid_loss'], rel=1e-6)
  bad = subprocess.run([sys.executable, '-m', 'structffn_jax.train', '--config',
                        f'{REPO}/configs/tiny.py:method=lowrank', '--workdir', str(workdir)],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
  assert bad.returncode != 0 and 'error:' in bad.stderr and 'Traceback' not in bad.stderr


def test_a_batch_change_on_resume_counts_the_tokens_trained_and_the_end_says_so(
    tmp_path, data_dir, capsys):
  """2 steps of 8 x 64 tokens, then --allow-change train.global_batch to 4 (8 steps of the new
  plan): the step and the schedule go on from step 2, the tokens and FLOPs from what was
  trained. Then a batch whose plan ends before step 8: one line, nothing trained."""
  base = (*RUN[1:], 'train.ckpt_every=2', f'data.data_dir={data_dir}')
  workdir = tmp_path / 'w'
  first = train.Trainer(tiny(*base, 'train.tokens=1024', sgt=0), workdir)
  first.run()
  records = {r['step']: r for r in metrics.read_metrics(workdir) if 'loss' in r}
  assert records[2]['tokens'] == 1024
  small = tiny(*base, 'train.tokens=2048', 'train.global_batch=4', sgt=0)
  changed = ('train.global_batch', 'train.tokens')
  resumed = train.Trainer(small, workdir, allow_change=changed)
  assert resumed.step == 2 and resumed.plan.total_steps == 8
  resumed.run()
  records = {r['step']: r for r in metrics.read_metrics(workdir) if 'loss' in r}
  assert [records[s]['tokens'] for s in range(3, 9)] == [1024 + 256 * k for k in range(1, 7)]
  step_flops = records[2]['train_flops'] / 2 / 2  # a step of half the batch
  assert records[3]['train_flops'] == pytest.approx(records[2]['train_flops'] + step_flops)
  assert records[8]['train_flops'] == pytest.approx(records[2]['train_flops'] + 6 * step_flops)
  capsys.readouterr()
  big = tiny(*base, 'train.tokens=2048', 'train.global_batch=16', sgt=0)
  result = train.Trainer(big, workdir, allow_change=changed).run()
  out = capsys.readouterr().out
  assert result['step'] == 8
  [line] = [l for l in out.splitlines() if 'past the end' in l]
  assert line.startswith("step 8: past the end of this config's 2 steps") and '2,560 tokens' in line
  assert max(r['step'] for r in metrics.read_metrics(workdir) if 'loss' in r) == 8
