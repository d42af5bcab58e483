"""Packaging: requirements.txt is derived from pyproject.toml (this checkout, editable, with the
extras the tests use), every extra the README's commands name exists, and the installed versions
meet the declared lower bounds. Whether the lower bounds resolve together is .ci/run's step
`pip install --dry-run` over `python tests/test_packaging.py` (the bounds as == pins).
"""

import importlib.metadata
import pathlib
import re
import sys

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip('tomllib', reason='Python 3.11+ reads pyproject.toml')
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def project() -> dict:
  return tomllib.loads((REPO_ROOT / 'pyproject.toml').read_text())['project']


def minimums() -> list[str]:
  """Every declared dependency (core and the test extra's) pinned to its lower bound."""
  p = project()
  pins = {}
  for spec in p['dependencies'] + [r for extra in p['optional-dependencies'].values()
                                   for r in extra]:
    req = Requirement(spec)
    lows = [s.version for s in req.specifier if s.operator == '>=']
    if req.name != p['name'] and lows:
      pins[req.name] = f'{req.name}=={lows[0]}'
  for skipped in ('tensorboard', 'xprof'):  # the profile extra: not resolved in CI
    pins.pop(skipped, None)
  return sorted(pins.values())


def test_requirements_txt_is_the_editable_checkout_with_the_test_extra():
  lines = [line.split('#')[0].strip()
           for line in (REPO_ROOT / 'requirements.txt').read_text().splitlines()]
  assert [line for line in lines if line] == ['-e .[test]']
  extras = project()['optional-dependencies']
  test = [Requirement(r) for r in extras['test']]
  own = [r for r in test if r.name == project()['name']]
  assert own and set(own[0].extras) == {'hf', 'eval', 'export', 'wandb'}


def test_readme_install_commands_name_existing_extras():
  readme = (REPO_ROOT / 'README.md').read_text()
  named = set()
  for group in re.findall(r"pip install -e '?\.\[([a-z,]+)\]", readme):
    named.update(group.split(','))
  assert 'test' in named or 'eval' in named, 'README: no `pip install -e .[...]` command'
  assert named <= set(project()['optional-dependencies'])


def test_every_dependency_has_a_lower_bound_that_the_installed_version_meets():
  p = project()
  for spec in p['dependencies'] + p['optional-dependencies']['test']:
    req = Requirement(spec)
    if req.name == p['name']:
      continue
    assert any(s.operator == '>=' for s in req.specifier), f'{spec}: no lower bound'
    try:
      installed = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
      pytest.fail(f'{req.name} is declared but not installed')
    assert req.specifier.contains(Version(installed), prereleases=True), (spec, installed)


def test_jax_bound_is_what_the_flax_bound_needs():
  """flax's own requirement on jax (from the installed flax's metadata, when it is the declared
  minimum) is within our jax bound: a lower jax would never be installable."""
  deps = {Requirement(s).name: Requirement(s) for s in project()['dependencies']}
  flax_min = [s.version for s in deps['flax'].specifier if s.operator == '>='][0]
  if importlib.metadata.version('flax') != flax_min:
    pytest.skip(f'flax {importlib.metadata.version("flax")} installed, not the minimum {flax_min}')
  needs = [Requirement(r) for r in importlib.metadata.requires('flax') if 'extra' not in r]
  jax_needs = [r for r in needs if r.name == 'jax'][0]
  jax_min = [s.version for s in deps['jax'].specifier if s.operator == '>='][0]
  assert jax_needs.specifier.contains(jax_min), (str(jax_needs), jax_min)


if __name__ == '__main__':
  sys.stdout.write('\n'.join(minimums()) + '\n')


def test_the_package_list_names_every_package_and_maps_the_configs():
  """pyproject.toml lists the packages by hand (the configs directory installs as
  structffn_jax.configs, which `packages.find` cannot express): every directory of the package
  with an `__init__.py` is in the list, and nothing else is."""
  setup = tomllib.loads((REPO_ROOT / 'pyproject.toml').read_text())['tool']['setuptools']
  on_disk = {'.'.join(p.parent.relative_to(REPO_ROOT).parts)
             for p in (REPO_ROOT / 'structffn_jax').rglob('__init__.py')}
  assert set(setup['packages']) == on_disk | {'structffn_jax.configs'}
  assert setup['package-dir'] == {'structffn_jax.configs': 'configs'}
  assert (REPO_ROOT / 'configs' / '__init__.py').is_file()
