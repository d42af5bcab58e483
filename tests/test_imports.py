"""Commands stand on the library, never the other way round: no module imports a command.

A command is a module run as `python -m structffn_jax.X` (it has a `__main__` guard), and the
benchmark package `structffn_jax.bench`. What commands share lives in library modules (run.py,
decoding.py, calibration.py, evaluation.py, plan.py, timing.py), so a command can change or go
without breaking another. The test reads every module's imports, those inside functions too.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'structffn_jax'
# Library modules that also have a command line of their own: others may import them.
LIBRARY_WITH_MAIN = {'structffn_jax.data.prepare', 'structffn_jax.export', 'structffn_jax.lm_eval'}


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def has_main_guard(tree) -> bool:
  return any(isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
             and isinstance(node.test.left, ast.Name) and node.test.left.id == '__name__'
             for node in tree.body)


def is_command(name: str) -> bool:
  if name == 'structffn_jax.bench' or name.startswith('structffn_jax.bench.'):
    return True
  return name not in LIBRARY_WITH_MAIN and has_main_guard(ast.parse(MODULES[name].read_text()))


def imported_modules(name: str) -> set[str]:
  """Every structffn_jax module that module `name` imports (`from pkg import mod` as pkg.mod)."""
  path = MODULES[name]
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative import
        anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(anchor + ([base] if base else []))
      out.add(base)
      out.update(f'{base}.{a.name}' for a in node.names if f'{base}.{a.name}' in MODULES)
  return {m for m in out if m in MODULES}


COMMANDS = sorted(n for n in MODULES if is_command(n))


def test_the_commands_are_found():
  for name in ('train', 'evaluate', 'generate', 'premerge', 'info', 'plot', 'traces',
               'bench.ffn', 'bench.decode', 'bench.train', 'bench.kernels'):
    assert f'structffn_jax.{name}' in COMMANDS
  for name in ('structured', 'model', 'config', 'run', 'decoding', 'calibration', 'timing',
               'plan', 'evaluation', 'data.prepare'):
    assert f'structffn_jax.{name}' not in COMMANDS


@pytest.mark.parametrize('name', sorted(MODULES))
def test_no_module_imports_a_command(name):
  bad = sorted(m for m in imported_modules(name) if m in COMMANDS and m != name)
  assert not bad, (f'{name} imports the command module(s) {bad}; move what it needs into a '
                   'library module and import that instead.')


def test_the_config_loads_no_jax():
  """The schema and its checks are a leaf: a config file, `info` and the data preparation read
  them without loading JAX (a fresh interpreter, so no other test's imports count)."""
  code = ('import sys, structffn_jax.config; '
          "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax')); "
          'assert not loaded, loaded')
  subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True)


def test_the_config_files_load_no_jax_and_find_their_common_module_from_anywhere(tmp_path):
  """The presets (configs/common.py) import as `structffn_jax.configs.common`, from a directory
  outside the checkout too, and a config file read there by its `configs/` path is the installed
  copy; neither loads JAX."""
  code = ('import sys; from structffn_jax import config; '
          'from structffn_jax.configs import common; '
          "c = config.load('configs/structured_ffn.py:model=xl,method=lowrank,fraction=63'); "
          "assert c.model.hidden_dim == common.SIZES['xl']['hidden_dim'] == 2048, c.model; "
          "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax')); "
          'assert not loaded, loaded')
  subprocess.run([sys.executable, '-c', code], cwd=tmp_path, check=True)


def _design_module_map() -> str:
  text = (REPO / 'docs' / 'design.md').read_text()
  start = text.index('## 9. The modules')
  end = text.find('\n## ', start + 1)
  return text[start:end if end > 0 else None]


def test_the_module_map_in_the_design_notes_names_files_that_exist():
  """Every `x.py` in docs/design.md §9 is a file of the package, and every library module of the
  package (commands and benchmarks aside) has its line there."""
  import re  # pylint: disable=g-import-not-at-top
  section = _design_module_map()
  named = set(re.findall(r'`((?:[a-z_]+/)?[a-z_]+\.py)`', section)) - {'tests/test_imports.py'}
  assert named, 'no module named in design.md §9'
  missing = sorted(n for n in named if not (PACKAGE / n).is_file())
  assert not missing, f'docs/design.md §9 names {missing}, which do not exist under {PACKAGE}'
  on_disk = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob('*.py')
             if p.name != '__init__.py' and p.parts[-2] != 'bench'}
  unnamed = sorted(on_disk - named)
  assert not unnamed, f'docs/design.md §9 does not say what {unnamed} owns'
