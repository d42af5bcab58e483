"""The notebooks' setup cell (the same in every notebook): outside a checkout it stops with one
error naming REPO_URL and installs nothing; in an unpacked sdist (structffn_jax/ beside
configs/) it finds the tree; its pip command keeps an installed jax."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def setup_cell() -> str:
  cells = []
  for path in sorted((REPO / 'colab').glob('*.ipynb')):
    nb = json.loads(path.read_text())
    cells.append(''.join(nb['cells'][1]['source']))
  assert cells and all(c == cells[0] for c in cells), 'the setup cells differ between notebooks'
  assert "REPO_URL = ''" in cells[0]
  return cells[0]


def run_cell(cwd, source):
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  return subprocess.run([sys.executable, '-c', source], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300)


def test_outside_a_checkout_the_error_names_the_field(tmp_path):
  done = run_cell(tmp_path, setup_cell())
  assert done.returncode != 0
  assert 'RuntimeError: Setup: this notebook is not inside a checkout' in done.stderr
  assert 'set REPO_URL in this cell' in done.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing cloned or written


def test_an_unpacked_sdist_is_found(tmp_path):
  tree = tmp_path / 'structffn_jax-0.1.0'
  (tree / 'colab').mkdir(parents=True)
  for name in ('structffn_jax', 'configs'):
    (tree / name).symlink_to(REPO / name)
  source = setup_cell().replace("import jax\nprint(", "import jax\nprint('root', root); print(")
  # importable from the tree itself (as after a pip install of the sdist): nothing is installed
  done = run_cell(tree / 'colab', 'import sys; sys.path.insert(0, %r)\n' % str(tree) + source)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f'root {tree}' in done.stdout


def test_pip_command_keeps_the_installed_jax():
  tree = ast.parse(setup_cell())
  fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == 'pip_install_args')
  scope = {}
  exec('import importlib.metadata, pathlib, tempfile\n' + ast.unparse(fn), scope)  # noqa: S102
  args, pins = scope['pip_install_args'](REPO)
  import importlib.metadata
  jax_version = importlib.metadata.version('jax')
  assert f'jax=={jax_version}' in pins
  assert args[:4] == ['install', '-q', '-e', str(REPO)] and args[4] == '-c'
  assert f'jax=={jax_version}' in pathlib.Path(args[5]).read_text().split()

