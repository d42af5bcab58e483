"""The one-shot GPU suite's dry run: every step on the CPU at toy sizes, one folder, one table.

Numbers are not asserted (toy sizes on a busy CPU); that each step ran, wrote its JSON under
the one folder, and reached the summary table with a target column is. The FLOP counter used by
the MFU cross-check is checked on its own against matmuls of known cost.
"""

import json

import jax
import jax.numpy as jnp
import pytest

from structffn_jax.bench import device_suite


def test_dry_run(tmp_path, capsys):
  out = tmp_path / 'suite'
  rc = device_suite.main(['--out', str(out), '--dry-run'])
  printed = capsys.readouterr().out
  assert rc == 0, printed
  assert 'jax[cuda12]' in printed  # what the GPU run needs beyond requirements.txt
  summary = json.loads((out / 'summary.json').read_text())
  steps = [s['step'] for s in summary['steps']]
  assert steps == ['env', 'tests', 'kernels', 'ffn', 'decode', 'train-s-dense',
                   'train-m-blockshuffle', 'mfu']
  assert all(s['status'] == 'ok' for s in summary['steps']), summary['steps']
  for name in ('env', 'kernels', 'ffn', 'decode', 'train-s-dense', 'train-m-blockshuffle', 'mfu'):
    assert (out / f'{name}.json').exists(), name
    assert (out / 'logs' / f'{name}.log').exists(), name
  assert (out / 'tests.xml').exists()
  assert '| step ' in printed and '| target ' in printed
  by_step = {r['step'] for r in summary['table'] if r['what'] != 'ran'}
  assert by_step >= {'tests', 'kernels', 'ffn', 'decode', 'train-s-dense', 'train-m-blockshuffle',
                     'mfu'}
  mfu = json.loads((out / 'mfu.json').read_text())['rows']
  assert {r['name'] for r in mfu} == {'tiny-dense', 'tiny-blockshuffle'}
  for r in mfu:  # the accounting's forward FLOPs are the model's matmuls, training is 3x
    assert r['forward_ratio'] == pytest.approx(1.0, abs=0.02)
    assert r['train_over_forward'] == pytest.approx(3.0, abs=0.05)


def test_no_gpu_is_an_error_that_installs_nothing(tmp_path, capsys):
  if jax.default_backend() == 'gpu':
    pytest.skip('a GPU is present')
  assert device_suite.env_step(str(tmp_path / 'env.json'), dry=False) == 1
  assert 'pip install -U "jax[cuda12]"' in capsys.readouterr().out


def test_matmul_flops_counts_scans_and_conds():
  a = jnp.zeros((8, 16))
  w = jnp.zeros((16, 4))

  def fn(a, w):
    def body(c, _):
      return c, a @ w  # 2·8·16·4 per step, 3 steps
    _, ys = jax.lax.scan(body, 0, None, length=3)
    big = jax.lax.cond(True, lambda: jnp.einsum('bij,bjk->bik', a[None], w[None]),
                       lambda: jnp.zeros((1, 8, 4)))  # the costlier branch: 2·8·16·4
    return ys, big

  assert device_suite.matmul_flops(jax.make_jaxpr(fn)(a, w)) == 4 * 2 * 8 * 16 * 4
