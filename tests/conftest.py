"""Shared pytest fixtures: the repository root (config paths resolve against it)."""

import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='session')
def repo_root() -> pathlib.Path:
  return REPO_ROOT
