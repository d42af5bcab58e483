"""Shared pytest fixtures: the repository root (config paths resolve against it)."""

import pathlib
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so that a bare `pytest` finds structffn_jax too
  sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope='session')
def repo_root() -> pathlib.Path:
  return REPO_ROOT
