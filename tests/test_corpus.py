"""The embedded corpus (the stdlib source, optionally site-packages) and the CPU studies' rows:
deterministic, disjoint splits, no text twice, and disjoint row windows per study."""

import hashlib
import pathlib

import pytest

from structffn_jax import config as config_lib
from structffn_jax import plan as plan_lib
from structffn_jax.data import sources

REPO = pathlib.Path(__file__).resolve().parents[1]


def _keys(split, **kw):
  return [key for key, _ in sources.stdlib_files(split, 0, **kw)]


@pytest.mark.parametrize('site_packages', [False, True])
def test_whole_corpus_split_is_deterministic_disjoint_and_deduplicated(site_packages):
  splits = {s: _keys(s, site_packages=site_packages) for s in sources.SPLITS}
  assert splits == {s: _keys(s, site_packages=site_packages) for s in sources.SPLITS}
  sets = {s: set(keys) for s, keys in splits.items()}
  assert sum(map(len, sets.values())) == len(set.union(*sets.values()))  # disjoint
  assert all(sources.stdlib_split_of(k) == s for s, keys in sets.items() for k in keys)
  roots = sources.corpus_roots(site_packages)
  digests = [hashlib.sha256(sources._path_of(k, roots).read_bytes()).digest()
             for keys in splits.values() for k in keys]
  assert len(digests) == len(set(digests))  # no content twice, within or across splits
  total = sum(size for s in sources.SPLITS for _, size in sources.stdlib_files(s, 0, **{
      'site_packages': site_packages}))
  has_site = any(k.startswith(sources.SITE_PACKAGES + '/') for k in sets['train'])
  assert has_site == site_packages
  # The whole library, its test suites included (~31 MB on CPython 3.11); site-packages adds more.
  assert total > 15e6 and (not site_packages or total > 30e6)
  assert any(k.startswith('test/') for k in sets['train'])


def test_cap_and_library_only_sample():
  capped = sources.stdlib_files('train', 2_000_000, tests=False)
  assert 1.8e6 < sum(size for _, size in capped) <= 2e6
  assert not any(k.startswith(('test/', 'idle_test')) or '/test/' in k for k, _ in capped)
  assert {k for k, _ in capped} <= set(_keys('train', tests=False))
  docs = list(sources.stdlib_documents('valid', 300_000, tests=False))
  assert docs and docs == list(sources.stdlib_documents('valid', 300_000, tests=False))


def test_describe_records_roots_and_files():
  cfg = {'source': 'stdlib', 'stdlib_max_bytes': 0, 'stdlib_site_packages': True}
  desc = sources.describe(cfg, 'valid')
  assert set(desc['roots']) == {'stdlib', sources.SITE_PACKAGES}
  assert desc['file_list'] == _keys('valid', site_packages=True)
  assert desc['files'] == len(desc['file_list']) and desc['tests'] and desc['site_packages']
  assert sources.describe(cfg, 'valid') == desc


def test_quickstart_stays_quick():
  c = config_lib.load(f'{REPO}/configs/quickstart.py')
  assert c.data.stdlib_max_bytes == 8_000_000 and not c.data.stdlib_tests


def _batches(config) -> set[int]:
  plan = plan_lib.make_plan(config)
  return {plan.data_index(step) for step in range(plan.total_steps)}


def test_cpu_studies_pair_their_rows_and_read_none_twice():
  """Every run of the CPU studies reads no row twice (fixedflop's designed replay apart), and a
  seed fixes the rows: every structure of one width and seed reads the same batches, the paired
  design whose gaps the report compares."""
  module = config_lib.config_module(REPO / 'configs' / 'cpu_reproduction.py')
  tuned = dict.fromkeys(module.STRUCTURES_MAIN, 4e-3)  # any LRs: the rows do not depend on them
  module.TUNED_LR.update(tuned)
  try:
    variants = module._variants()  # pylint: disable=protected-access
    by_pair: dict[tuple, set] = {}
    for variant in variants:
      c = module.get_config(variant)
      config_lib.validate(c)
      plan = plan_lib.make_plan(c)
      batches = _batches(c)
      replayed = plan.total_steps - plan.base_steps
      assert len(batches) == plan.total_steps - replayed, c.name
      assert c.train.data_seed == c.train.seed and c.train.data_start == 0, c.name
      if 'more_tokens' in variant or 'variant=ours,' in variant:
        continue  # more tokens than dense by design: a superset of the same order
      by_pair.setdefault((c.model.hidden_dim, c.train.seed, c.train.tokens, 'probe' in c.name),
                         set()).add(frozenset(batches))
    assert len(variants) > 100
    assert all(len(sets) == 1 for sets in by_pair.values()), by_pair.keys()
  finally:
    for key in tuned:
      module.TUNED_LR.pop(key)