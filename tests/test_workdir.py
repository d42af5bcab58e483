"""The workdir: two trainers on one workdir (the lock and its takeover), a first start that
failed, a changed config accepted or refused, `--allow-change`, and an older config.json."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from structffn_jax import metrics, train
from structffn_jax import workdir as workdir_lib
from tests import tiny_setup

REPO = pathlib.Path(__file__).resolve().parents[1]
tiny = tiny_setup.checkpointed_run  # (data_dir, *overrides, sgt=1)


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
  bad = tiny_setup.run_config(*tiny_setup.CHECKPOINTED_RUN, f'data.data_dir={tmp_path / "data"}', 'data.source=text',
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


def test_evaluation_during_training_may_change_on_resume(tmp_path):
  """eval.* says what is measured along the way, not what is trained: a resume may add, drop
  or retime the lm-eval tasks without --allow-change, while a trained field is still refused."""
  workdir = tmp_path / 'w'
  config = tiny_setup.run_config()
  workdir.mkdir()
  (workdir / 'config.json').write_text(config.to_json_best_effort())
  (workdir / 'checkpoints' / '5').mkdir(parents=True)
  defaults = {k: config.eval[k] for k in config.eval}
  config.eval.update(lm_eval_tasks='arc_easy,piqa', lm_eval_every=50, lm_eval_limit=0.5,
                     lm_eval_batch_size=4, lm_eval_include_path=str(tmp_path / 'tasks'))
  assert all(config.eval[k] != v for k, v in defaults.items())
  assert workdir_lib.check_workdir_config(workdir, config) == {}
  config.train.peak_lr *= 2
  with pytest.raises(ValueError, match=r'train.peak_lr'):
    workdir_lib.check_workdir_config(workdir, config)


def _other_data(data_dir, target, what):
  """A copy of `data_dir` with another tokenizer ('tokenizer') or other train rows ('rows')."""
  import shutil  # pylint: disable=import-outside-toplevel
  from structffn_jax.data import manifest as manifest_lib  # pylint: disable=import-outside-toplevel
  shutil.copytree(data_dir, target)
  path = target / manifest_lib.MANIFEST_NAME
  m = json.loads(path.read_text())
  if what == 'tokenizer':
    tok = target / m['tokenizer_file']
    tok.write_bytes(tok.read_bytes() + b'\0')
    m['tokenizer_sha256'] = manifest_lib.sha256_file(tok)
  else:
    m['splits']['train']['shards'][0]['sha256'] = '0' * 64
  path.write_text(json.dumps(m))
  return target


def test_other_data_on_resume_is_refused_unless_allowed_and_then_recorded(tmp_path, data_dir):
  workdir = tmp_path / 'w'
  train.Trainer(tiny(data_dir, 'train.tokens=1024', sgt=0), workdir).run()
  identity = json.loads((workdir / workdir_lib.DATA_IDENTITY).read_text())
  # The same data elsewhere: data.data_dir may change freely.
  same = tmp_path / 'same'
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.copytree(data_dir, same)
  train.Trainer(tiny(same, 'train.tokens=1024', sgt=0), workdir).close()
  assert not (workdir / workdir_lib.HISTORY).exists()
  for what, field in (('tokenizer', 'data.tokenizer_sha256'), ('rows', 'data.train_sha256')):
    other = _other_data(data_dir, tmp_path / what, what)
    before = (workdir / 'config.json').read_text()
    with pytest.raises(ValueError, match=f'trained on other data.*{field}.*--allow-change'):
      train.Trainer(tiny(other, 'train.tokens=1024', sgt=0), workdir)
    assert (workdir / 'config.json').read_text() == before
    assert not (workdir / 'lock').exists()
  trainer = train.Trainer(tiny(other, 'train.tokens=1024', sgt=0), workdir,
                          allow_change=('data.train_sha256',))
  trainer.close()
  history = [json.loads(l) for l in (workdir / workdir_lib.HISTORY).read_text().splitlines()]
  assert history[-1]['step'] == 2
  assert history[-1]['changes'] == {
      'data.train_sha256': [identity['data.train_sha256'],
                            json.loads((workdir / workdir_lib.DATA_IDENTITY).read_text())[
                                'data.train_sha256']]}
  assert identity != json.loads((workdir / workdir_lib.DATA_IDENTITY).read_text())


def test_a_first_start_on_too_little_text_leaves_nothing_that_blocks_the_fixed_command(
    tmp_path, data_dir):
  """No text, then too little for one row: each first start fails with its reason and leaves no
  metrics.jsonl, tb/ or config.json; its unfinished preparation in <workdir>/data is replaced by
  the next start with other settings, which trains."""
  workdir = tmp_path / 'w'
  empty, short = tmp_path / 'empty.txt', tmp_path / 'short.txt'
  empty.write_text('')
  short.write_text(' = A = \n\n a few words .\n')
  train_text, _ = tiny_setup.text_files()

  def config(path):
    return tiny_setup.run_config(*tiny_setup.CHECKPOINTED_RUN, 'train.tokens=1024',
                                 f'data.tokenizer={data_dir / "tokenizer.model"}',
                                 f'data.train_paths={path}', sgt=0)

  for path, tokens in ((empty, 0), (short, None)):
    with pytest.raises(ValueError, match=f"split 'train' has {tokens or ''}.*tokens, fewer than"):
      train.Trainer(config(path), workdir)
    left = sorted(p.name for p in workdir.iterdir())
    assert left == ['data'], left
  trainer = train.Trainer(config(train_text), workdir)
  trainer.run()
  assert workdir_lib.saved_steps(workdir) == [2]
  assert json.loads((workdir / 'config.json').read_text())['data']['train_paths'] == [train_text]
