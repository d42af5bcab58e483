"""Every attention implementation against float64 numpy and the XLA path, forward and gradient.

'pallas' runs here in the Pallas interpreter: the GPU (Triton) flash attention as the CPU
default, and the TPU (Mosaic) one under `target_platform('tpu')` with jax's TPU interpret mode.
cuDNN cannot run without a GPU: its lowering is tested in test_lowering.py, and a compiled check
runs on a GPU. Inputs are grouped-query (4 query heads, 2 kv heads), causal, random; outputs
are compared with an explicit float64 softmax over the causal mask, gradients with the XLA
path's. At the model level (RoPE, the fused QKV, the decode path) the logits must not depend
on the choice. On a mesh of 8 simulated devices (a subprocess) the fused paths run inside a
shard_map and must match the unsharded results.

Tolerance: float32 softmax sums over at most 128 keys: 2e-5 of the reference's scale.
"""

import contextlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from structffn_jax import attention  # noqa: E402
from structffn_jax.kernels import api  # noqa: E402

ATOL_REL = 2e-5
SCALE = 0.25


def _qkv(b, t, n, k, h, seed, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal(s), dtype) for s in ((b, t, n, h), (b, t, k, h),
                                                                (b, t, k, h))]


def _numpy_attention(q, k, v, scale):
  """Causal grouped-query softmax attention in float64: query head n reads kv head n // (N/K)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  s = np.einsum('btnh,bsnh->bnts', q, k) * scale
  t = q.shape[1]
  s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('bnts,bsnh->btnh', p, v)


def _value_and_grads(implementation, args, do):
  def loss(q, k, v):
    o = attention.attend(q, k, v, scale=SCALE, implementation=implementation)
    return jnp.vdot(o.astype(jnp.float32), do), o
  grads, o = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(*args)
  return [o, *grads]


def _close(got, want, what, atol_rel=ATOL_REL):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, what
  np.testing.assert_allclose(got, want, rtol=0, atol=atol_rel * np.abs(want).max(), err_msg=what)


def _target(platform):
  """The target platform, with jax's TPU interpret mode for the Mosaic kernels; 'cpu' runs the
  Triton kernel interpreted on any device."""
  stack = contextlib.ExitStack()
  stack.enter_context(api.target_platform(platform))
  if platform == 'tpu':
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    stack.enter_context(pltpu.force_tpu_interpret_mode())
  return stack


@pytest.mark.parametrize('platform,shape', [
    ('cpu', (2, 32, 4, 2, 16)),   # the Triton kernel, interpreted; 2 tiles of 16 in the backward
    ('tpu', (1, 128, 4, 2, 16)),  # the Mosaic kernel, TPU interpret mode: one 128 tile
])
def test_pallas_matches_numpy_and_xla(platform, shape):
  args = _qkv(*shape, seed=sum(shape))
  (do,) = _qkv(*shape, seed=1)[:1]
  want = _value_and_grads('xla', args, do)
  _close(want[0], _numpy_attention(*args, SCALE), 'xla vs numpy')
  with _target(platform):
    assert attention.resolve('pallas', args[0]) == 'pallas'
    got = _value_and_grads('pallas', args, do)
  _close(got[0], _numpy_attention(*args, SCALE), f'pallas ({platform}) vs numpy')
  for name, g, w in zip(('o', 'dq', 'dk', 'dv'), got, want):
    _close(g, w, f'pallas ({platform}) {name}')


def test_resolve_per_platform():
  q32 = jax.ShapeDtypeStruct((2, 256, 8, 64), jnp.float32)
  q16 = jax.ShapeDtypeStruct((2, 256, 8, 64), jnp.bfloat16)
  odd = jax.ShapeDtypeStruct((2, 48, 8, 64), jnp.bfloat16)
  assert attention.resolve('auto', q16, 'cpu') == 'xla'
  assert attention.resolve('auto', q16, 'tpu') == 'xla'  # until a TPU measurement says otherwise
  assert attention.resolve('auto', q16, 'gpu') == 'cudnn'
  assert attention.resolve('auto', q32, 'gpu') == 'xla'  # cuDNN takes half precision only
  assert attention.resolve('pallas', q16, 'tpu') == 'pallas'
  assert attention.resolve('pallas', odd, 'tpu') == 'xla'  # not a multiple of 128: no kernel
  assert attention.resolve('pallas', odd, 'gpu') == 'pallas'  # tiles of 16
  with pytest.raises(ValueError, match='needs a GPU'):
    attention.resolve('cudnn', q16, 'tpu')
  with pytest.raises(ValueError, match='unknown'):
    attention.resolve('flash', q16, 'gpu')


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN and Triton need a GPU')
@pytest.mark.parametrize('implementation', ['cudnn', 'pallas'])
def test_compiled_on_gpu(implementation):
  args = _qkv(2, 256, 8, 2, 64, seed=5, dtype=jnp.bfloat16)
  (do,) = _qkv(2, 256, 8, 2, 64, seed=6)[:1]
  want = _value_and_grads('xla', [a.astype(jnp.float32) for a in args], do)
  got = _value_and_grads(implementation, args, do)
  for name, g, w in zip(('o', 'dq', 'dk', 'dv'), got, want):
    _close(g, w, f'{implementation} {name}', atol_rel=3e-2)


@pytest.mark.skipif(jax.default_backend() != 'tpu', reason='compiled Mosaic kernels need a TPU')
def test_compiled_on_tpu():
  args = _qkv(2, 256, 8, 2, 64, seed=7, dtype=jnp.bfloat16)
  (do,) = _qkv(2, 256, 8, 2, 64, seed=8)[:1]
  want = _value_and_grads('xla', [a.astype(jnp.float32) for a in args], do)
  got = _value_and_grads('pallas', args, do)
  for name, g, w in zip(('o', 'dq', 'dk', 'dv'), got, want):
    _close(g, w, f'tpu pallas {name}', atol_rel=3e-2)


def test_model_logits_do_not_depend_on_the_choice():
  """RoPE, the fused QKV and grouped-query heads around attend; decode always on XLA."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from structffn_jax.model import GPT  # pylint: disable=g-import-not-at-top
  from tests import tiny_setup  # pylint: disable=g-import-not-at-top
  config = tiny_setup.run_config('model.seq_len=16', 'model.num_layers=2', 'model.ffn.init=gaussian',
                                 method='blockshuffle', sgt=0)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 512, (2, 16)), jnp.int32)
  logits, decoded = {}, {}
  for impl in ('xla', 'pallas'):  # the Triton kernel interpreted, on any device
    config.model.attention.implementation = impl
    model = GPT(config.model, rngs=nnx.Rngs(params=0))
    assert model.first.attn.implementation == impl
    with api.target_platform('cpu'):
      logits[impl] = np.asarray(jax.jit(lambda m, t: m(t))(model, tokens))
      decoded[impl] = np.asarray(jax.jit(lambda m, t: m.decode(t, m.init_cache(2, 16))[0])(
          model, tokens[:, :8]))
  _close(logits['pallas'], logits['xla'], 'model logits')
  np.testing.assert_array_equal(decoded['pallas'], decoded['xla'])  # the same XLA path
  _close(decoded['xla'], logits['xla'][:, :8], 'decode vs forward')


# ----------------------------------------------------------------------------- on a mesh


def _mesh_run(out_path):
  """Script mode (8 simulated devices): attention and the FFN kernels with 'pallas' on a
  (2, 2, 2) mesh against the same calls without a mesh; writes the largest differences."""
  from structffn_jax import kernels, sharding  # pylint: disable=g-import-not-at-top
  from structffn_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  mesh, rules = sharding.make_mesh(config), sharding.rules_of(config)
  args = _qkv(4, 32, 4, 2, 16, seed=11)
  (do,) = _qkv(4, 32, 4, 2, 16, seed=12)[:1]
  rng = np.random.default_rng(13)  # a BlockShuffle layer 32 -> 64, B = 4, on 4 x 16 tokens
  x = jnp.asarray(rng.standard_normal((4, 16, 32)), jnp.float32)
  w1 = jnp.asarray(rng.standard_normal((4, 8, 8)), jnp.float32)
  w2 = jnp.asarray(rng.standard_normal((4, 16, 8)), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((4, 16, 64)), jnp.float32)

  def ffn_grads(x, w1, w2):
    loss = lambda *a: jnp.vdot(kernels.blockshuffle(*a, implementation='pallas'), dy)
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, w1, w2)

  def attention_grads(q, k, v):
    return _value_and_grads('pallas', (q, k, v), do)

  plain = jax.jit(attention_grads)(*args), jax.jit(ffn_grads)(x, w1, w2)
  with sharding.use_mesh(mesh, rules):
    spec = sharding.batch_sharding(mesh, rules, 4)
    sharded_args = [jax.device_put(a, spec) for a in args]
    meshed = (jax.jit(attention_grads)(*sharded_args),
              jax.jit(ffn_grads)(jax.device_put(x, sharding.batch_sharding(mesh, rules, 3)),
                                 w1, w2))
    text = jax.jit(attention_grads).lower(*sharded_args).as_text()
  diffs = [float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
           for a, b in zip(jax.tree.leaves(meshed), jax.tree.leaves(plain))]
  pathlib.Path(out_path).write_text(json.dumps({'diffs': diffs,
                                                'shard_map': 'manual_computation' in text}))


@pytest.mark.slow
def test_fused_paths_on_a_mesh(tmp_path):
  out = tmp_path / 'mesh.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO),
             XLA_FLAGS='--xla_force_host_platform_device_count=8', NPROC='16')
  proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True,
                        text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  result = json.loads(out.read_text())
  assert result['shard_map']  # the kernels run per device, not on gathered operands
  assert max(result['diffs']) < ATOL_REL, result['diffs']


if __name__ == '__main__':
  _mesh_run(sys.argv[1])
