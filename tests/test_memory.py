"""The memory check before a run is built (structffn_jax/memory.py): a config that cannot fit is
refused in one line, before the workdir is written; every ordinary config passes."""

import pytest

from structffn_jax import accounting, memory, train
from structffn_jax.errors import ConfigError
from tests import tiny_setup


@pytest.mark.parametrize('method', sorted(tiny_setup.STRUCTURES))
@pytest.mark.parametrize('sgt', [0, 1])
def test_the_parameter_count_is_a_lower_bound_of_the_models(method, sgt):
  config = tiny_setup.run_config(method=method, sgt=sgt)
  params, guides = memory.param_counts(config)
  acc = accounting.account(config)
  assert acc.params_ffn < params <= acc.params_total  # biases and norms are left out
  assert guides == acc.params_guide


@pytest.mark.parametrize('override, words', [
    ('train.global_batch=1000000000000', 'lower train.global_batch=1000000000000'),
    ('model.num_layers=1000000000', 'lower model.num_layers=1000000000'),
    ('model.hidden_dim=4000000', 'lower model.num_layers=3, model.hidden_dim=4000000'),
    ('train.eval_batch=1000000000000', 'lower train.eval_batch=1000000000000'),
], ids=['global-batch', 'num-layers', 'hidden-dim', 'eval-batch'])
def test_a_run_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, data_dir,
                                                                     override, words):
  """These ended in an OverflowError, a MemoryError or an out-of-memory error from XLA."""
  config = tiny_setup.checkpointed_run(data_dir, override, sgt=0)
  workdir = tmp_path / 'w'
  with pytest.raises(ConfigError) as info:
    train.Trainer(config, workdir)
  message = str(info.value)
  assert message.startswith('memory: this run needs at least ') and words in message
  assert '\n' not in message
  assert not workdir.exists()


class _Device:
  platform, device_kind, process_index = 'gpu', 'test GPU', 0

  def __init__(self, limit):
    self.limit = limit

  def memory_stats(self):
    return {'bytes_limit': self.limit} if self.limit else None


def test_an_accelerator_is_checked_against_its_bytes_limit():
  config = tiny_setup.run_config(sgt=0)
  mesh = {'data': 1, 'fsdp': 1, 'tensor': 1}
  need = memory.estimate(config, mesh).total
  memory.check(config, mesh, [_Device(need)])  # fits exactly
  memory.check(config, mesh, [_Device(None)])  # no memory_stats: nothing to check against
  with pytest.raises(ConfigError, match=r'a device has \(the bytes_limit of a test GPU\)'):
    memory.check(config, mesh, [_Device(need - 1)])
  # Sharded over 4 devices, a quarter of the state and of the batch is each one's.
  split = memory.estimate(config, {'data': 1, 'fsdp': 4, 'tensor': 1})
  assert split.device_batch == 2 and split.total < need
