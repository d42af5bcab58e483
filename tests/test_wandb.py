"""Weights & Biases logging, offline (WANDB_MODE=offline): a tiny training run with
log.wandb set writes the same scalars at the same steps as its metrics.jsonl, read back from
W&B's own run file; without log.wandb nothing of W&B is created.

The run file is read with a small reader of its record framing (a LevelDB-style log of
protobuf `Record`s, wandb.proto): no W&B server, no network.
"""

import json
import struct

import pytest

wandb_pb = pytest.importorskip('wandb.proto.wandb_internal_pb2',
                               reason="wandb is not installed (pip install '.[wandb]')")

from structffn_jax import metrics, train  # noqa: E402
from tests import tiny_setup  # noqa: E402

BLOCK = 32 * 1024  # the log's block size; a record never straddles a block's 7-byte header


def read_records(path):
  """The protobuf Records of a .wandb file (header, then chunks: crc, length, type, data)."""
  data = path.read_bytes()
  assert data[:4] == b':W&B'
  pos, pending, records = 7, b'', []
  while pos + 7 <= len(data):
    left = BLOCK - pos % BLOCK
    if left < 7:  # block trailer
      pos += left
      continue
    _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
    if kind == 0 and length == 0:  # zero padding up to the block's end
      pos += left
      continue
    pending += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # FULL or LAST
      record = wandb_pb.Record()
      record.ParseFromString(pending)
      records.append(record)
      pending = b''
  return records


def test_training_logs_its_metrics_to_wandb_offline(tmp_path, data_dir, monkeypatch):
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  config = tiny_setup.run_config(
      'train.tokens=1536', 'train.eval_every=2', 'train.log_every=1', 'train.eval_tokens=256',
      'model.ffn.init=gaussian', f'data.data_dir={data_dir}', 'log.wandb=structffn-test', sgt=0)
  workdir = tmp_path / 'w'
  train.Trainer(config, workdir).run()

  run_id = (workdir / 'wandb_run_id').read_text().strip()
  [run_file] = workdir.glob(f'wandb/offline-run-*-{run_id}/run-{run_id}.wandb')
  records = read_records(run_file)
  [run] = [r.run for r in records if r.WhichOneof('record_type') == 'run']
  assert (run.run_id, run.project, run.display_name) == (run_id, 'structffn-test', config.name)
  logged = {}
  for r in records:
    if r.WhichOneof('record_type') == 'history':
      items = {i.key or '/'.join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
      logged.setdefault(items.pop('_step'), {}).update(items)
  expected = {}
  for record in metrics.read_metrics(workdir):
    expected.setdefault(record['step'], {}).update(
        {k: v for k, v in record.items() if k not in ('step', 'time') and
         isinstance(v, (int, float)) and not isinstance(v, bool)})
  assert sorted(logged) == sorted(expected) == [1, 2, 3]
  for step, values in expected.items():
    assert 'loss' in values or 'valid_loss' in values
    for key, value in values.items():
      assert logged[step][key] == pytest.approx(value, rel=1e-12), (step, key)
  assert 'valid_loss' in logged[2]


def test_off_unless_a_project_is_named(tmp_path):
  config = tiny_setup.run_config(sgt=0)
  assert config.log.wandb == ''
  reporter = metrics.Reporter(tmp_path, 10, config=config)
  reporter.write(1, {'loss': 1.0})
  reporter.close()
  assert reporter.wandb is None
  assert not (tmp_path / 'wandb').exists() and not (tmp_path / 'wandb_run_id').exists()
