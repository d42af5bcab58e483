"""Shared pytest fixtures: the repository root (config paths resolve against it), the tiny
config's prepared data, and one tiny trained run.

Tests marked `slow` (registered in pyproject.toml) start processes or train several runs; CI runs
them all (`-m "not slow"` leaves them out locally)."""

import os
import pathlib
import shutil
import sys
import tempfile

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so that a bare `pytest` finds structffn_jax too
  sys.path.insert(0, str(REPO_ROOT))

# One persistent XLA compilation cache for the session, this process and the processes the tests
# start (they inherit the environment). Most of the suite's CPU time is XLA compiling the same
# tiny models again: each new Trainer, and each `python -m structffn_jax.train` a test starts,
# jits its own functions, and the cache turns a repeated compilation (the same program for the
# same devices) into a read. A run starts with an empty cache, so no outcome depends on an
# earlier one; JAX_COMPILATION_CACHE_DIR set outside keeps (and reuses) a cache of one's own.
_SESSION_CACHE = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _SESSION_CACHE = tempfile.mkdtemp(prefix='structffn-jax-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _SESSION_CACHE
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  if _SESSION_CACHE is not None:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


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


@pytest.fixture(scope='session')
def trained_run(tmp_path_factory, data_dir):
  """A tiny LowRank run (configs/tiny.py on the shared data), trained for 2 steps, once per
  session. Read it; a test that writes into a run takes `trained_workdir`, a copy."""
  from structffn_jax import train  # pylint: disable=g-import-not-at-top
  from tests import tiny_setup  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('trained_run')
  config = tiny_setup.run_config(
      'train.tokens=1024', 'train.eval_every=0', 'train.log_every=1', 'train.eval_tokens=256',
      'model.ffn.init=gaussian', f'data.data_dir={data_dir}', sgt=0)
  train.Trainer(config, root / 'w').run()
  return root / 'w'


@pytest.fixture(scope='module')
def trained_workdir(trained_run, tmp_path_factory):
  """A copy of `trained_run` that one test module may write into (premerge.json, lm_eval/)."""
  workdir = tmp_path_factory.mktemp('run') / 'w'
  shutil.copytree(trained_run, workdir)
  return workdir
