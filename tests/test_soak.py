"""Soak: a training run killed at random 20 times (kill -9 and SIGTERM, during start-up, between
steps and during saves), resumed each time, ends bitwise equal to an uninterrupted run, with no
unfinished or lost checkpoint. It guards every change to the loop and the checkpointer.

Bounded in time: each attempt has a deadline, and the kill schedule is drawn from a fixed seed.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from structffn_jax import checkpoint, metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 240  # 240 steps of 8 x 64 tokens, self-guided for the first half (a hand-over at 120)
KILLS = 20
ATTEMPT_S = 300


def _cmd(workdir, data_dir):
  sets = [f'data.data_dir={data_dir}', f'train.tokens={STEPS * 8 * 64}', 'train.log_every=1',
          'train.eval_every=0', 'train.ckpt_every=7', 'train.keep_ckpts=2',
          'train.eval_tokens=512']
  return [sys.executable, '-m', 'structffn_jax.train', '--config',
          f'{REPO}/configs/tiny.py:method=lowrank,sgt', '--workdir', str(workdir)] + \
      [a for s in sets for a in ('--set', s)]


def _losses(workdir) -> dict[int, float]:
  return {r['step']: r['loss'] for r in metrics.read_metrics(workdir) if 'loss' in r}


def _attempt(cmd, kill_at_step: int | None, sig, startup_delay: float | None):
  """Run `cmd` until it reaches `kill_at_step` (or `startup_delay` seconds, before its first
  step), then send `sig`; None for both: run to the end. Returns (exit code, output)."""
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=REPO, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
  out, start = [], time.time()
  try:
    if startup_delay is not None:
      time.sleep(startup_delay)
      proc.send_signal(sig)
    else:
      for line in proc.stdout:
        out.append(line)
        if time.time() - start > ATTEMPT_S:
          break
        if kill_at_step is not None and line.startswith('step ') and '/' in line:
          step = int(line.split()[1].split('/')[0])
          if step >= kill_at_step:
            proc.send_signal(sig)
            break
    rest, _ = proc.communicate(timeout=ATTEMPT_S)
    out.append(rest)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return proc.returncode, ''.join(out)


def _check_checkpoints(workdir):
  names = sorted(p.name for p in (workdir / 'checkpoints').iterdir())
  unfinished = [n for n in names if not n.isdigit()]
  assert not unfinished, f'unfinished or set-aside checkpoint directories: {unfinished}'
  return checkpoint.saved_steps(workdir)


@pytest.mark.slow
def test_random_kills_resume_bitwise_equal(tmp_path, data_dir):
  reference = tmp_path / 'reference'
  rc, out = _attempt(_cmd(reference, data_dir), None, None, None)
  assert rc == 0, out[-3000:]
  expected = _losses(reference)
  assert sorted(expected) == list(range(1, STEPS + 1))

  workdir = tmp_path / 'killed'
  cmd = _cmd(workdir, data_dir)
  rng = np.random.default_rng(20)
  reached, newest, log = 0, 0, []
  for i in range(KILLS):
    sig = signal.SIGKILL if i % 2 == 0 else signal.SIGTERM
    if i % 5 == 4:  # during start-up: importing, preparing, restoring, compiling
      rc, out = _attempt(cmd, None, sig, startup_delay=float(rng.uniform(0.5, 6.0)))
    else:
      target = min(STEPS - 1, reached + int(rng.integers(3, 2 * STEPS // KILLS)))
      rc, out = _attempt(cmd, target, sig, None)
    log.append((i, sig.name, rc))
    assert 'Traceback' not in out, out[-3000:]
    if sig == signal.SIGTERM and rc not in (None, -signal.SIGTERM):
      assert rc in (75, 130, 0), (log, out[-2000:])  # saved and exited, or had finished
    if (workdir / 'metrics.jsonl').exists():
      reached = max(_losses(workdir), default=0)
    if (workdir / 'checkpoints').exists():  # a kill -9 mid-save may leave a temporary directory,
      saved = checkpoint.saved_steps(workdir)  # which the next start removes; none is lost
      assert max(saved, default=0) >= newest, (log, saved, newest)
      newest = max(saved, default=0)
    if (workdir / 'lock').exists() and sig == signal.SIGTERM:
      pytest.fail(f'attempt {i}: SIGTERM left the lock behind: {out[-2000:]}')
  rc, out = _attempt(cmd, None, None, None)  # the last resume runs to the end
  assert rc == 0, (log, out[-3000:])
  got = _losses(workdir)
  assert sorted(got) == sorted(expected)
  diff = [s for s in expected if got[s] != expected[s]]
  assert not diff, f'steps whose loss differs from the uninterrupted run: {diff[:10]} ({log})'
  assert STEPS in _check_checkpoints(workdir)


def _prepare_cmd(out, tokenizer=None):
  cmd = [sys.executable, '-m', 'structffn_jax.data.prepare', '--out', str(out), '--seq-len', '64',
         '--source', 'stdlib', '--stdlib-max-bytes', '3000000', '--vocab-size', '512',
         '--shard-tokens', '20000', '--set', 'data.stdlib_tests=false']
  return cmd + (['--tokenizer', str(tokenizer)] if tokenizer else [])


def _shards(out: pathlib.Path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(out.glob('*.bin'))}


@pytest.mark.slow
def test_prepare_killed_at_random_resumes_to_identical_shards(tmp_path):
  """kill -9 at random while tokenizing into shards (the tokenizer given, as a job of a
  multi-host preparation has it), then the same command until it finishes: the shards and the
  manifest's checksums are those of an uninterrupted preparation."""
  reference = tmp_path / 'reference'
  done = subprocess.run(_prepare_cmd(reference), capture_output=True, text=True, cwd=REPO,
                        timeout=ATTEMPT_S)
  assert done.returncode == 0, done.stderr[-3000:]
  tokenizer = next(reference.glob('tokenizer*.model'))
  given = tmp_path / 'given'
  done = subprocess.run(_prepare_cmd(given, tokenizer), capture_output=True, text=True,
                        cwd=REPO, timeout=ATTEMPT_S)
  assert done.returncode == 0, done.stderr[-3000:]
  expected = _shards(given)
  assert len(expected) >= 10  # many pieces, so that kills land between and inside them

  out = tmp_path / 'killed'
  rng = np.random.default_rng(7)
  kills = 0
  for _ in range(12):
    proc = subprocess.Popen(_prepare_cmd(out, tokenizer), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
      proc.wait(timeout=float(rng.uniform(2.0, 8.0)))
    except subprocess.TimeoutExpired:
      proc.kill()
      kills += 1
    _, err = proc.communicate(timeout=ATTEMPT_S)
    assert 'Traceback' not in err, err[-3000:]
    if proc.returncode == 0:
      break
  final = subprocess.run(_prepare_cmd(out, tokenizer), capture_output=True, text=True, cwd=REPO,
                         timeout=ATTEMPT_S)
  assert final.returncode == 0, final.stderr[-3000:]
  assert kills >= 3, 'the preparation finished before it could be killed: lower the delays'
  assert _shards(out) == expected
  assert not list(out.rglob('*.tmp*')), 'a temporary file was left behind'
