"""A split smaller than its data.valid_tokens cap is said in the run's first lines, with the
fix; one that fills its cap (to whole rows) is not."""

from structffn_jax.data import prepare as prepare_lib
from structffn_jax.data.manifest import Manifest
from tests import tiny_setup


def test_short_valid_split_is_a_warning_in_the_runs_first_lines(tmp_path):
  config = tiny_setup.run_config(f'data.data_dir={tmp_path / "data"}', 'data.valid_tokens=5000000')
  lines = []
  manifest = prepare_lib.prepare_for_run(config, tmp_path / 'w', log=lines.append)
  got = manifest.splits['valid']['tokens']
  assert 0 < got < 5_000_000
  warning = [line for line in lines if line.startswith('warning: data.valid_tokens=5,000,000')]
  assert warning == [f'warning: data.valid_tokens=5,000,000 asked, the data holds {got:,} valid '
                     f'tokens ({100 * got / 5e6:.0f}%): add text to the valid inputs, or set '
                     f'data.valid_tokens={got} to ask for what there is.']
  # Asking for what there is (rounded down to whole rows) is quiet.
  row = manifest.seq_len + 1
  config.data.valid_tokens = got + row - 1
  from structffn_jax.data import shortfall
  assert shortfall.messages(config.data, Manifest.load(tmp_path / 'data')) == []
