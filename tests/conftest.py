"""Shared pytest fixtures: the repository root (config paths resolve against it) and the tiny
config's prepared data."""

import pathlib
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so that a bare `pytest` finds structffn_jax too
  sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope='session')
def repo_root() -> pathlib.Path:
  return REPO_ROOT


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """configs/tiny.py's data (tokenizer and token rows) prepared once, read by every tiny run."""
  from structffn_jax.data import prepare as prepare_lib  # pylint: disable=g-import-not-at-top
  from tests import tiny_setup  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp('tiny_data')
  prepare_lib.prepare(tiny_setup.run_config().data, d, 64, model_vocab_size=512)
  return d
