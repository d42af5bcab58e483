"""Shared pytest fixtures: the repository root (config paths resolve against it), the tiny
config's prepared data, and one tiny trained run.

Tests marked `slow` (registered in pyproject.toml) start processes or train several runs; CI runs
them all (`-m "not slow"` leaves them out locally), and their files start first."""

import os
import pathlib
import shutil
import sys
import tempfile

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so that a bare `pytest` finds structffn_jax too
  sys.path.insert(0, str(REPO_ROOT))

# One persistent XLA compilation cache per test process, shared with the processes its tests
# start (they inherit the environment). Most of the suite's CPU time is XLA compiling the same
# tiny models again: each new Trainer, and each `python -m structffn_jax.train` a test starts,
# jits its own functions, and the cache turns a repeated compilation (the same program for the
# same devices) into a read. A session starts with an empty cache, so no outcome depends on an
# earlier one; JAX_COMPILATION_CACHE_DIR set outside keeps (and reuses) a cache of one's own.
# Under pytest-xdist (`-n`) each worker has its own directory below the session's: JAX writes a
# cache entry in place, so two workers compiling the same program at once could read each other's
# half-written entry (JAX would then compile again and warn).
_CACHE_ROOT = 'STRUCTFFN_JAX_TEST_CACHE'  # the session's cache, set by the process that made it
_SESSION_CACHE = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _SESSION_CACHE = tempfile.mkdtemp(prefix='structffn-jax-cache-')
  os.environ[_CACHE_ROOT] = os.environ['JAX_COMPILATION_CACHE_DIR'] = _SESSION_CACHE
elif os.environ.get(_CACHE_ROOT) == os.environ['JAX_COMPILATION_CACHE_DIR'] and (
    'PYTEST_XDIST_WORKER' in os.environ):  # a worker of a session that made its cache
  os.environ['JAX_COMPILATION_CACHE_DIR'] = os.path.join(os.environ[_CACHE_ROOT],
                                                         os.environ['PYTEST_XDIST_WORKER'])
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  if _SESSION_CACHE is not None:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  """Files with a `slow` test first, the rest after, each in collection order. pytest-xdist
  (`-n`, with pyproject.toml's `--dist loadfile --no-loadscope-reorder`) hands each worker the
  next whole file in this order, so the long files start early and the short ones fill the end
  (by default it would order files by their number of tests, and the soak test's file of two
  long tests would start last)."""
  slow = {item.nodeid.split('::')[0] for item in items if item.get_closest_marker('slow')}
  items.sort(key=lambda item: item.nodeid.split('::')[0] not in slow)


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
