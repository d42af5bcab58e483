"""Lowering for GPU (CUDA) and TPU from a CPU machine: every step and kernel builds for both.

`jax.export(..., platforms=[p])` traces and lowers to StableHLO for platform p without its
hardware, with `kernels.api.target_platform(p)` so that the kernels and attention take p's path
(compiled Pallas kernels, cuDNN attention), exactly as they would on that device:

  - the jitted train step (steps.make_train_step with the trainer's shardings: state as its
    parameters, batch over the batch axes), bfloat16, on a (data, fsdp, tensor) = (2, 2, 2) mesh
    of 8 simulated CPU devices, for dense and each structure with SGT off and on (reduce_flop),
    and once with the Pallas FFN kernels and Pallas attention at shapes they tile;
  - the KV-cache decode step (GPT.decode: prefill and one token), and the whole generation loop
    as decoding.generate jits it (while loop, top-k sampling);
  - every Pallas kernel with its backward (Triton for CUDA, Mosaic for TPU), and each attention
    implementation with its backward.

The mesh lowerings run in one subprocess (this file run as a script) with
XLA_FLAGS=--xla_force_host_platform_device_count=8, as in test_sharding.py; the pytest process
keeps its single CPU device and lowers the rest itself.

Checked in the lowered text:
  - with reduce_flop, every matmul on a guide's (F, D) / (D, F) weight (forward and backward)
    sits inside a conditional (`stablehlo.case`/`if`, or a function only called from one);
  - in a bfloat16 step no dot_general takes a float32 operand, except two by design: the LM
    head's backward, whose cotangent is the float32 loss's (operand width = vocabulary), and
    the XLA attention's score gradient, whose softmax is float32 (operand with two sequence
    dimensions; with cuDNN or Pallas attention those matmuls are inside the fused kernel);
  - the kernels lower to the expected number of Triton / Mosaic custom calls, and the Triton
    kernels leave no activation-sized transpose to XLA.

What cannot be lowered from CPU as it is, and how it is handled:
  - cuDNN attention: jax checks the installed cuDNN version while tracing, and a CPU-only jaxlib
    has no cuDNN ("cuDNN is not detected"). The lowering here stands in a version (9.8, Hopper)
    for that probe (`_cudnn_probe`); what is checked is that jax's cuDNN lowering accepts our
    shapes (grouped-query, causal). Where even that fails, the test is skipped with the reason.
  - Triton and cuDNN custom calls carry no serialization-compatibility guarantee, so their
    export needs `DisabledSafetyCheck.custom_call` for their names; Mosaic (`tpu_custom_call`)
    does not. No other part of either platform needs a stand-in.
"""

import contextlib
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jax import export  # noqa: E402

from structffn_jax.kernels import api, pallas_tpu, pallas_triton  # noqa: E402

PLATFORMS = ('cuda', 'tpu')
TRITON = '__gpu$xla.gpu.triton'
CUDNN = ('__cudnn$fmhaSoftmax', '__cudnn$fmhaSoftmaxBackward')
MESH = ('mesh.data=2', 'mesh.fsdp=2', 'mesh.tensor=2')
SEQ, VOCAB = 48, 512  # distinct from every width of the tiny model (64, 128, 256, 16, 32)
# The tiny config in bfloat16 on the mesh, two micro-batches of 4 sequences.
COMMON = MESH + ('model.dtype=bfloat16', f'model.seq_len={SEQ}', 'train.micro_batch=4')
GUIDED = ('sgt.reduce_flop=true', 'model.first_layer_dense=false')  # every FFN has a guide
# Pallas FFN kernels and Pallas attention, at shapes both lowerings tile: input chunks of 128
# (Mosaic's lanes) and a sequence of 128.
PALLAS = ('model.hidden_dim=256', 'model.ffn_dim=1024', 'model.attn_dim=256', 'model.ffn.blocks=2',
          'model.seq_len=128', 'model.num_layers=2', 'model.ffn.implementation=pallas',
          'model.attention.implementation=pallas')
STEPS = {
    'dense': ('dense', 0, COMMON),
    **{f'{m}-sgt{s}': (m, s, COMMON + (GUIDED if s else ()))
       for m in ('lowrank', 'blockdense', 'blockshuffle') for s in (0, 1)},
    'blockshuffle-pallas': ('blockshuffle', 0, MESH + ('model.dtype=bfloat16',
                                                      'train.micro_batch=4') + PALLAS),
}


@contextlib.contextmanager
def _cudnn_probe():
  """Stand in cuDNN 9.8 on a Hopper GPU for jax's trace-time checks when no cuDNN is installed."""
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=g-import-not-at-top
  if fa.cuda_versions is not None:
    yield
    return
  saved = fa.check_cudnn_version, fa.check_compute_capability
  fa.check_cudnn_version, fa.check_compute_capability = (lambda: 90800), (lambda c: True)
  try:
    yield
  finally:
    fa.check_cudnn_version, fa.check_compute_capability = saved


def _disabled_checks(platform):
  names = (TRITON, *CUDNN) if platform == 'cuda' else ()
  return [export.DisabledSafetyCheck.custom_call(n) for n in names]


def _export(fn, platform, *args):
  """StableHLO text of fn lowered for platform, with the kernels' path for it."""
  with api.target_platform(platform), _cudnn_probe():
    exported = export.export(fn, platforms=[platform],
                             disabled_checks=_disabled_checks(platform))(*args)
  return exported.mlir_module()


# ----------------------------------------------------------------------------- text checks


def _functions(text):
  """{name: body lines} of the module's functions."""
  funcs, name = {}, None
  for line in text.splitlines():
    header = re.match(r'  func\.func (?:public|private) @([\w$.]+)\(', line)
    if header:
      name = header.group(1)
      funcs[name] = []
    elif line == '  }':
      name = None
    elif name:
      funcs[name].append(line)
  return funcs


def _indent(line):
  return len(line) - len(line.lstrip())


def _ops(text):
  """[(function, line, in_conditional)] for every op line, and whether each function is reached
  from `main` other than through a conditional's branch."""
  ops, calls = [], []
  for func, lines in _functions(text).items():
    open_conds = []  # indentation of the conditionals whose regions enclose the line
    for line in lines:
      stripped = line.strip()
      if open_conds and _indent(line) == open_conds[-1] and stripped.startswith('})'):
        open_conds.pop()
        continue
      inside = bool(open_conds)
      ops.append((func, line, inside))
      for callee in re.findall(r'call @([\w$.]+)\(', line):
        calls.append((func, callee, inside))
      if re.search(r'"stablehlo\.(case|if)"', line) and stripped.endswith('({'):
        open_conds.append(_indent(line))
  always = {'main'}
  changed = True
  while changed:
    changed = False
    for caller, callee, inside in calls:
      if caller in always and not inside and callee not in always:
        always.add(callee)
        changed = True
  return [(f, line, inside or f not in always) for f, line, inside in ops]


def _dots(text):
  """[(operand types, result type, conditional)] of every dot_general."""
  out = []
  for _, line, conditional in _ops(text):
    if 'stablehlo.dot_general' not in line:
      continue
    sig = re.search(r': \((tensor<[^>]+>), (tensor<[^>]+>)\) -> (tensor<[^>]+>)', line)
    assert sig, line
    out.append((sig.group(1), sig.group(2), sig.group(3), conditional))
  return out


def _dims(tensor_type):
  """'tensor<4x64x512xf32>' -> ((4, 64, 512), 'f32')."""
  *dims, dtype = tensor_type[len('tensor<'):-1].split('x')
  return tuple(int(d) for d in dims), dtype


def _f32_dots_not_by_design(text, seq_len, vocab):
  """The dot_generals with a float32 operand, but for the two kinds float32 by design."""
  bad = []
  for a, b, result, _ in _dots(text):
    operands = [_dims(a), _dims(b)]
    if all(dtype != 'f32' for _, dtype in operands):
      continue
    if any(dims and dims[-1] == vocab for dims, _ in operands):
      continue  # the head's backward: d logits from the float32 loss
    if any(list(dims).count(seq_len) >= 2 for dims, _ in operands):
      continue  # XLA attention: the float32 softmax's score gradient
    bad.append(f'{a}, {b} -> {result}')
  return bad


# ----------------------------------------------------------------------------- train steps


def _lower_steps(out_dir):
  """Script mode: every STEPS entry for every platform into out_dir (text or the error)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from structffn_jax import optim, sharding, steps  # pylint: disable=g-import-not-at-top
  from structffn_jax import sgt as sgt_lib  # pylint: disable=g-import-not-at-top
  from structffn_jax.model import GPT  # pylint: disable=g-import-not-at-top
  from tests import tiny_setup  # pylint: disable=g-import-not-at-top

  out_dir = pathlib.Path(out_dir)
  for name, (method, sgt, overrides) in STEPS.items():
    config = tiny_setup.run_config(*overrides, method=method, sgt=sgt)
    mesh, rules = sharding.make_mesh(config), sharding.rules_of(config)
    counts = sgt_lib.step_counts(config)
    total, guided = counts.total, counts.guided
    tx = optim.make_optimizer(config, total, guided)
    new_model = lambda c=config: GPT(c.model, guide=c.sgt.enabled, reduce_flop=c.sgt.reduce_flop,
                                     rngs=nnx.Rngs(params=0))
    graphdef = nnx.split(nnx.eval_shape(new_model), nnx.Param)[0]
    abstract = jax.eval_shape(lambda f=new_model: steps.init_state(f(), tx)[1])
    state_sh = sharding.param_shardings(abstract, mesh, rules)
    rep = sharding.replicated(mesh)
    t = config.train
    batch = jax.ShapeDtypeStruct((t.global_batch, config.model.seq_len + 1), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    for platform in PLATFORMS:
      target = out_dir / f'{name}-{platform}'
      # A fresh step per platform: jit's trace cache does not know the target platform.
      step = jax.jit(steps.make_train_step(graphdef, tx, t.global_batch // (t.micro_batch or
                                                                            t.global_batch)),
                     in_shardings=(state_sh, sharding.batch_sharding(mesh, rules, 2), rep),
                     out_shardings=(state_sh, rep), donate_argnums=0)
      try:
        with sharding.use_mesh(mesh, rules):
          text = _export(step, platform, abstract, batch, key)
        target.with_suffix('.mlir').write_text(text)
      except Exception as e:  # pylint: disable=broad-except
        target.with_suffix('.error').write_text(f'{type(e).__name__}: {e}')
    print(name, 'lowered', flush=True)
  (out_dir / 'done.json').write_text(json.dumps(sorted(STEPS)))


@pytest.fixture(scope='module')
def lowered_steps(tmp_path_factory):
  out = tmp_path_factory.mktemp('lowered_steps')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO),
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True,
                        text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return out


def _step_text(lowered_steps, name, platform):
  error = lowered_steps / f'{name}-{platform}.error'
  if error.exists():
    pytest.fail(f'{name} does not lower for {platform}: {error.read_text()[:3000]}')
  return (lowered_steps / f'{name}-{platform}.mlir').read_text()


@pytest.mark.parametrize('platform', PLATFORMS)
@pytest.mark.parametrize('name', sorted(STEPS))
def test_train_step_lowers(lowered_steps, name, platform):
  text = _step_text(lowered_steps, name, platform)
  assert 'sdy.mesh' in text and '"data"=2, "fsdp"=2, "tensor"=2' in text  # sharded, 8 devices
  seq = 128 if name.endswith('pallas') else SEQ
  assert _f32_dots_not_by_design(text, seq, VOCAB) == []
  calls = set(re.findall(r'custom_call @([\w$.]+)', text))
  if platform == 'cuda' and not name.endswith('pallas'):
    assert set(CUDNN) <= calls  # 'auto' attention is cuDNN's fused kernel on GPU
  if name.endswith('pallas'):
    assert (TRITON if platform == 'cuda' else 'tpu_custom_call') in calls
  elif platform == 'tpu':
    assert 'tpu_custom_call' not in calls  # 'auto' stays on XLA on TPU: no measurement yet
  # The fused kernels (cuDNN, Pallas) run per device inside a shard_map, the rest is XLA's.
  fused = name.endswith('pallas') or platform == 'cuda'
  assert ('sdy.manual_computation' in text) == fused


@pytest.mark.parametrize('platform', PLATFORMS)
@pytest.mark.parametrize('method', ['lowrank', 'blockdense', 'blockshuffle'])
def test_reduce_flop_guide_matmuls_are_conditional(lowered_steps, method, platform):
  text = _step_text(lowered_steps, f'{method}-sgt1', platform)
  d, f = 64, 256  # configs/tiny.py: the guides are (F, D) for fc1 and (D, F) for fc2
  guide_types = {f'tensor<{f}x{d}xbf16>', f'tensor<{d}x{f}xbf16>'}
  guide_dots = [dot for dot in _dots(text) if guide_types & set(dot[:3])]
  assert len(guide_dots) >= 4, guide_dots  # forward and weight gradient of both layers
  unconditional = [dot[:3] for dot in guide_dots if not dot[3]]
  assert unconditional == [], unconditional
  # Without SGT there is no guide and no conditional.
  assert not re.search(r'"stablehlo\.(case|if)"', _step_text(lowered_steps, f'{method}-sgt0',
                                                               platform))


# ----------------------------------------------------------------------------- decode step


@pytest.mark.parametrize('platform', PLATFORMS)
def test_decode_step_lowers(platform):
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from structffn_jax.model import GPT  # pylint: disable=g-import-not-at-top
  from tests import tiny_setup  # pylint: disable=g-import-not-at-top
  config = tiny_setup.run_config('model.dtype=bfloat16', f'model.seq_len={SEQ}',
                                 method='blockshuffle', sgt=0)
  model = nnx.eval_shape(lambda: GPT(config.model, rngs=nnx.Rngs(params=0)))
  graphdef, params = nnx.split(model, nnx.Param)
  cache = jax.eval_shape(lambda: model.init_cache(2, SEQ))

  def decode(params, tokens_BT, cache, lengths_B):
    return nnx.merge(graphdef, params).decode(tokens_BT, cache, lengths_B=lengths_B,
                                              last_only=True)

  prompt = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  one = jax.ShapeDtypeStruct((2, 1), jnp.int32)
  lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
  for tokens in (prompt, one):  # prefill, then one token per step
    text = _export(jax.jit(decode), platform, params, tokens, cache, lengths)
    calls = set(re.findall(r'custom_call @([\w$.]+)', text))
    assert not calls & {TRITON, 'tpu_custom_call', *CUDNN}  # decoding stays on XLA
    bad = [f'{a}, {b} -> {r}' for a, b, r, _ in _dots(text)
           if 'f32' in (_dims(a)[1], _dims(b)[1])]
    assert bad == []  # not even the head: no loss, so no float32 cotangent


@pytest.mark.parametrize('platform', PLATFORMS)
def test_generation_loop_lowers(platform):
  """The whole generation (prefill, the while loop of decode steps, top-k sampling) as
  decoding.generate jits it."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from structffn_jax import decoding  # pylint: disable=g-import-not-at-top
  from structffn_jax.model import GPT  # pylint: disable=g-import-not-at-top
  from tests import tiny_setup  # pylint: disable=g-import-not-at-top
  config = tiny_setup.run_config('model.dtype=bfloat16', f'model.seq_len={SEQ}',
                                 method='lowrank', sgt=0)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: GPT(config.model, rngs=nnx.Rngs(0))),
                               nnx.Param)

  def generate(params, tokens_BP, lengths_B, key):
    return decoding._generate(nnx.merge(graphdef, params), tokens_BP, lengths_B, key, None,  # pylint: disable=protected-access
                              max_new_tokens=8, max_len=16, temperature=0.8, top_k=5, eos_id=2)

  text = _export(jax.jit(generate), platform, params, jax.ShapeDtypeStruct((2, 8), jnp.int32),
                 jax.ShapeDtypeStruct((2,), jnp.int32), jax.eval_shape(lambda: jax.random.key(0)))
  assert 'stablehlo.while' in text


# ----------------------------------------------------------------------------- kernels

# The paper's m size at 32%: fc1 and fc2 of BlockShuffle B=4 and BlockDense (4, 384), and an
# s-size BlockShuffle whose run length q/B = 48 is tiled by 16 (GPU only: its input chunks of
# 192 are not Mosaic-aligned, and the TPU path takes XLA there).
KERNEL_SHAPES = [
    ('blockshuffle', (4096, 1024), [(4, 256, 256), (4, 1024, 256)]),
    ('blockshuffle', (4096, 4096), [(4, 256, 1024), (4, 256, 256)]),
    ('blockshuffle', (4096, 768), [(4, 192, 192), (4, 768, 192)]),
    ('blockdense', (4096, 1024), [(4, 96, 256), (4096, 384)]),
    ('blockdense', (4096, 4096), [(4, 96, 1024), (1024, 384)]),
]


def _fwd_bwd(fn):
  def fwd_bwd(*args):
    *inputs, dy = args
    out, vjp = jax.vjp(fn, *inputs)
    return out, vjp(dy)
  return jax.jit(fwd_bwd)


@pytest.mark.parametrize('op,x_shape,factor_shapes', KERNEL_SHAPES,
                         ids=[f'{op}-N{xs[1]}' for op, xs, _ in KERNEL_SHAPES])
def test_triton_kernels_lower_for_cuda(op, x_shape, factor_shapes):
  """Forward and backward lower to Triton kernels for CUDA: no transpose pass between them."""
  assert pallas_triton.supports(op, x_shape, *factor_shapes, gpu=True)
  specs = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in [x_shape, *factor_shapes]]
  fn = getattr(pallas_triton, op)
  y = jax.eval_shape(fn, *specs)
  text = _export(_fwd_bwd(fn), 'cuda', *specs, jax.ShapeDtypeStruct(y.shape, jnp.bfloat16))
  assert text.count(TRITON) == {'blockshuffle': 6, 'blockdense': 3}[op]
  # The permutations live in the kernels' index maps: XLA transposes nothing activation-sized
  # (only the small weights, whose transposes the backward kernels read).
  largest_weight = max(np.prod(s) for s in factor_shapes)
  for dims in re.findall(r'stablehlo\.transpose.*-> tensor<([0-9x]+)x(?:bf16|f32)>', text):
    assert np.prod([int(d) for d in dims.split('x')]) <= largest_weight, dims


@pytest.mark.parametrize('op,x_shape,factor_shapes', KERNEL_SHAPES,
                         ids=[f'{op}-N{xs[1]}' for op, xs, _ in KERNEL_SHAPES])
def test_tpu_kernels_lower_for_tpu(op, x_shape, factor_shapes):
  """Forward and backward lower to Mosaic kernels where the shape is Mosaic-aligned; through
  the API the others take the XLA path (no kernel), and the kernels themselves refuse them."""
  specs = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in [x_shape, *factor_shapes]]
  dy = jax.ShapeDtypeStruct(jax.eval_shape(getattr(pallas_tpu, op), *specs).shape, jnp.bfloat16)
  api_fn = lambda *a: getattr(api, op)(*a, implementation='pallas')
  text = _export(_fwd_bwd(api_fn), 'tpu', *specs, dy)
  if pallas_tpu.supports(op, x_shape, *factor_shapes, tpu=True):
    assert text.count('stablehlo.custom_call @tpu_custom_call') == {'blockshuffle': 6,
                                                                     'blockdense': 3}[op]
  else:
    assert 'tpu_custom_call' not in text
    with pytest.raises(ValueError, match='divisible by 8 and 128'):
      _export(_fwd_bwd(getattr(pallas_tpu, op)), 'tpu', *specs, dy)


# ----------------------------------------------------------------------------- attention

Q = jax.ShapeDtypeStruct((2, 256, 8, 64), jnp.bfloat16)  # (B, T, N, H)
KV = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)  # grouped-query: 2 kv heads for 8


def _attention_fwd_bwd(implementation):
  from structffn_jax import attention  # pylint: disable=g-import-not-at-top
  return _fwd_bwd(lambda q, k, v: attention.attend(q, k, v, scale=0.125,
                                                   implementation=implementation))


@pytest.mark.parametrize('platform,implementation,calls', [
    ('cuda', 'pallas', {TRITON}),
    ('cuda', 'cudnn', set(CUDNN)),
    ('cuda', 'auto', set(CUDNN)),
    ('tpu', 'pallas', {'tpu_custom_call'}),
    ('tpu', 'auto', set()),
    ('tpu', 'xla', set()),
])
def test_attention_lowers(platform, implementation, calls):
  try:
    text = _export(_attention_fwd_bwd(implementation), platform, Q, KV, KV, Q)
  except RuntimeError as e:
    if 'cuDNN' in str(e):
      pytest.skip(f'cuDNN attention cannot be lowered from this machine: {e}')
    raise
  assert set(re.findall(r'custom_call @([\w$.]+)', text)) == calls
  if calls:  # the fused kernels leave no (T, T) score matmul to XLA
    assert not [d for d in _dots(text) if list(_dims(d[2])[0]).count(256) >= 2]


if __name__ == '__main__':
  _lower_steps(sys.argv[1])
