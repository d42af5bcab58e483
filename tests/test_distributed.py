"""Two processes on 127.0.0.1 with `jax.distributed` train in lockstep, as one process would.

launch/local.sh starts the processes (this file run as a script), each with 2 simulated CPU
devices; together they form the mesh
(data, fsdp, tensor) = (2, 1, 2), so each process reads half of every batch and the tensor axis
stays inside a process. They train the tiny config through the self-guided hand-over, checkpoint
cooperatively, resume from that checkpoint in new trainers, and evaluate, the lm-eval harness too
(eval.lm_eval_tasks on a local task: every process evaluates, process 0 alone logs). Both must see
the same loss at every step and the same scores, equal to this (single-device) process's run of
the same config.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from structffn_jax import metrics, train  # noqa: E402
from tests import tiny_setup  # noqa: E402

# 6 steps of 8 x 64 tokens, guided for the first 2; the processes stop at STOP and resume.
RUN = ('train.tokens=3072', 'sgt.ratio=0.34', 'train.log_every=1', 'train.eval_every=0',
       'train.ckpt_every=1000', 'train.eval_tokens=512')
MESH = ('mesh.data=2', 'mesh.fsdp=1', 'mesh.tensor=2')
STOP = 3
RTOL = 1e-5  # float32 sums in another order over 6 steps


tiny = tiny_setup.run_config  # (*overrides, method='lowrank', sgt=1)
SCORE = 'lm_eval/tiny_rolling/bits_per_byte'


def lm_eval_task(folder: pathlib.Path) -> tuple[str, ...]:
  """A local rolling-loglikelihood task in `folder` (its own dataset cache: one per process, so
  that no two processes build the same cache at once), and the overrides that run it at the end."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from tests import test_lm_eval  # pylint: disable=import-outside-toplevel
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(3)
  test_lm_eval.write_task(folder, 'tiny_rolling',
                          [{'text': test_lm_eval.phrase(rng, n)} for n in (6, 25)],
                          ['output_type: loglikelihood_rolling', 'doc_to_text: ""',
                           'doc_to_target: "{{text}}"', 'metric_list:',
                           '  - metric: bits_per_byte'])
  return ('eval.lm_eval_tasks=tiny_rolling', f'eval.lm_eval_include_path={folder}',
          'eval.lm_eval_batch_size=2')


@pytest.mark.slow
def test_two_processes_train_in_lockstep_like_one(tmp_path, data_dir):
  workdir, logs = tmp_path / 'run', tmp_path / 'logs'
  env = dict(os.environ, PYTHONPATH=str(REPO), CPU_DEVICES='2', LOG_DIR=str(logs))
  env.pop('XLA_FLAGS', None)
  proc = subprocess.Popen(
      ['bash', str(REPO / 'launch' / 'local.sh'), '2', sys.executable, __file__, str(workdir),
       str(data_dir), str(tmp_path)],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
  try:
    # Meanwhile, the reference: one process, one device, uninterrupted.
    ref_dir = tmp_path / 'single'
    result = train.Trainer(tiny(*RUN, *lm_eval_task(tmp_path / 'tasks-single'),
                                f'data.data_dir={data_dir}'), ref_dir).run()
    reference = {r['step']: r['loss'] for r in metrics.read_metrics(ref_dir) if 'loss' in r}
    out0, err0 = proc.communicate(timeout=480)
  finally:
    if proc.poll() is None:
      proc.kill()
  out1 = (logs / 'process_1.log').read_text()
  assert proc.returncode == 0, f'{out0[-2000:]}\n{err0[-4000:]}\nprocess 1:\n{out1[-4000:]}'
  reports = [json.loads((tmp_path / f'p{i}.json').read_text()) for i in range(2)]

  for i, r in enumerate(reports):
    assert r['process'] == [i, 2] and r['devices'] == [4, 2]
    assert r['share'] == [i, 2], 'each process reads its half of every batch'
    assert r['resumed_at'] == STOP
  steps = sorted(reference)
  assert steps == list(range(1, 7))
  p0, p1 = ({int(k): v for k, v in r['losses'].items()} for r in reports)
  assert sorted(p0) == steps
  assert p0 == p1, 'the processes disagree on the loss'
  for s in steps:
    assert p0[s] == pytest.approx(reference[s], rel=RTOL), s
  assert reports[0]['valid_loss'] == reports[1]['valid_loss']
  assert reports[0]['valid_loss'] == pytest.approx(result['valid_loss'], rel=RTOL)
  assert reports[0]['score'] == reports[1]['score']
  assert reports[0]['score'] == pytest.approx(result[SCORE], rel=RTOL)
  scored = [r for r in metrics.read_metrics(workdir) if SCORE in r]
  assert [(r['step'], r[SCORE]) for r in scored] == [(6, reports[0]['score'])]
  # Process 0 alone reported: one record per step in metrics.jsonl, one progress line per step.
  logged = [r['step'] for r in metrics.read_metrics(workdir) if 'loss' in r]
  assert logged == steps
  assert 'step      6/6' in out0 and 'step ' not in out1


def driver(workdir: pathlib.Path, data_dir: str, out_dir: pathlib.Path) -> None:
  """One of the two processes: train to STOP, resume in a new trainer, finish, report."""
  from structffn_jax import distributed, sharding

  assert distributed.initialize(tiny(*RUN, *MESH).mesh.distributed)  # 'auto': the coordinator
  config = tiny(*RUN, *MESH, *lm_eval_task(out_dir / f'tasks-{jax.process_index()}'),
                f'data.data_dir={data_dir}')
  seen = {}

  class Recording(train.Hook):
    """Keeps every step's loss as this process fetched it (only process 0 writes metrics)."""

    def on_metrics(self, trainer, step, record):
      seen[step] = record['loss']

  first = train.Trainer(config, workdir, hooks=[Recording()])
  assert first.run(stop_at=STOP)['step'] == STOP
  second = train.Trainer(config, workdir, hooks=[Recording()])
  resumed_at = second.step
  result = second.run()
  share = sharding.process_share(second.batch_sharding, (config.train.global_batch, 1))
  (out_dir / f'p{jax.process_index()}.json').write_text(json.dumps({
      'process': [jax.process_index(), jax.process_count()],
      'devices': [jax.device_count(), jax.local_device_count()],
      'share': list(share), 'resumed_at': resumed_at, 'losses': seen,
      'valid_loss': result['valid_loss'], 'score': result[SCORE]}))


if __name__ == '__main__':
  driver(pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3]))
