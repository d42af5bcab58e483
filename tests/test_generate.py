"""Decoding and pre-merge: KV-cache decoding against the full forward, generation against an
argmax rollout of full forwards, batches against single prompts, pre-merged layers against a
float64 numpy reference, the per-call path switch, and the generate / premerge commands.

Parameters are randomised (never the near-uniform init) so that logits have a real spread and a
wrong position, mask or cache slot changes them visibly. Float32 throughout; the model forward
itself is checked against float64 numpy in test_model.py.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from structffn_jax import generate, premerge, structured
from structffn_jax.data import manifest as manifest_lib
from tests import tiny_setup

REPO = tiny_setup.REPO
RTOL = 2e-5  # of the logit scale: float32 rounding over a few layers of width <= 64


def tiny(method='lowrank', **overrides):
  return tiny_setup.model_config(method, seq_len=16, **overrides)


build = tiny_setup.random_model


def assert_close(actual, desired, rtol=RTOL):
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  assert np.abs(desired).max() > 0.5  # a real signal
  np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * np.abs(desired).max())


_forward = nnx.jit(lambda model, tokens: model(tokens))


# ----------------------------------------------------------------------------- KV cache


@nnx.jit
def _decode_in_pieces(model, prefill_BP, lengths_B, chunk_BC, steps_BS):
  """Prefill (rows of different lengths), a chunk of C tokens if C > 0, S single-token steps."""
  cache = model.init_cache(prefill_BP.shape[0], model.cfg.seq_len)
  last_BV, cache = model.decode(prefill_BP, cache, lengths_B=lengths_B, last_only=True)
  chunk_BCV = None
  if chunk_BC.shape[1]:  # (one more program to compile: only some cases)
    chunk_BCV, cache = model.decode(chunk_BC, cache)

  def step(cache, token_B):
    logits_B1V, cache = model.decode(token_B[:, None], cache)
    return cache, logits_B1V[:, 0]

  cache, steps_SBV = jax.lax.scan(step, cache, steps_BS.T)
  return last_BV, chunk_BCV, steps_SBV.transpose(1, 0, 2), cache.lengths


DECODE_CASES = {  # every FFN method; rope and absolute positions; GQA everywhere, MHA once
    'dense-absolute': dict(method='dense', position='absolute'),
    'lowrank-rope': dict(method='lowrank'),
    'blockdense-absolute-mha-swiglu': dict(method='blockdense', position='absolute',
                                           num_kv_heads=4, activation='swiglu',
                                           first_layer_dense=False),
    'blockshuffle-rope-rmsnorm-kv1': dict(method='blockshuffle', norm='rmsnorm', num_kv_heads=1),
}
CHUNKED = ('lowrank-rope', 'blockdense-absolute-mha-swiglu')  # a multi-token step mid-sequence


@pytest.mark.parametrize('case', list(DECODE_CASES))
def test_kv_cache_decoding_matches_full_forward(case):
  cfg = tiny(**DECODE_CASES[case])
  model = build(cfg, seed=1)
  rng = np.random.default_rng(2)
  tokens = rng.integers(0, cfg.vocab_size, (2, cfg.seq_len)).astype(np.int32)
  full = np.asarray(_forward(model, jnp.asarray(tokens)))
  # Row 0 prefills 5 tokens, row 1 only 3: its last two prefill slots hold padding that must
  # never be seen (it is overwritten by the row's own next tokens).
  lengths = np.array([5, 3], np.int32)
  prefill = tokens[:, :5].copy()
  prefill[1, 3:] = (tokens[1, 3:5] + 11) % cfg.vocab_size
  c = 3 if case in CHUNKED else 0
  chunk = np.stack([tokens[b, n:n + c] for b, n in enumerate(lengths)])
  steps = np.stack([tokens[b, n + c:n + c + 8] for b, n in enumerate(lengths)])
  last, chunk_logits, step_logits, final_lengths = _decode_in_pieces(
      model, jnp.asarray(prefill), jnp.asarray(lengths), jnp.asarray(chunk), jnp.asarray(steps))
  assert final_lengths.tolist() == [5 + c + 8, 3 + c + 8]
  for b, n in enumerate(lengths):
    assert_close(last[b], full[b, n - 1])
    if c:
      assert_close(chunk_logits[b], full[b, n:n + c])
    assert_close(step_logits[b], full[b, n + c:n + c + 8])


def test_cache_of_absolute_positions_is_bounded():
  model = build(tiny('dense', position='absolute'))
  with pytest.raises(ValueError, match='exceeds model.seq_len=16'):
    model.init_cache(1, 17)
  with pytest.raises(ValueError, match='exceeds the 16 learned positions'):
    generate.generate(model, [[1] * 10], 8)


# ----------------------------------------------------------------------------- generation


def test_generation_is_argmax_rollout_batched_or_not_and_stops_at_eos():
  cfg = tiny('lowrank')
  model = build(cfg, seed=3)
  rng = np.random.default_rng(4)
  prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (3, 7, 1)]
  new = 6
  # Reference: repeated full forwards, each over the whole sequence so far (right-padded to a
  # fixed length, which causality makes irrelevant), appending the argmax.
  rollouts = []
  for p in prompts:
    seq = list(p)
    for _ in range(new):
      buf = np.zeros((1, cfg.seq_len), np.int32)
      buf[0, :len(seq)] = seq
      seq.append(int(np.argmax(_forward(model, jnp.asarray(buf))[0, len(seq) - 1])))
    rollouts.append(seq[len(p):])
  assert len({tuple(r) for r in rollouts}) == 3 and len(set(sum(rollouts, []))) > 8
  # EOS: the third token of the first rollout; every row stops before its first occurrence
  # (row 0 after two tokens while the others go on).
  eos = rollouts[0][2]
  expected = [r[:r.index(eos)] if eos in r else r for r in rollouts]
  assert expected[0] == rollouts[0][:2]
  assert generate.generate(model, prompts, new, eos_id=eos) == expected
  assert [generate.generate(model, [p], new, eos_id=eos)[0] for p in prompts] == expected


def test_sampling_follows_tempered_top_k_softmax():
  logits = jnp.asarray([[1.0, 3.0, 0.5, 2.5, -1.0, 2.0]])
  keys = jax.random.split(jax.random.key(0), 4000)
  draw = jax.jit(jax.vmap(lambda k, t, top: generate.sample(logits, k, t, top)[0],
                          in_axes=(0, None, None)), static_argnums=(1, 2))
  counts = np.bincount(np.asarray(draw(keys, 0.7, 3)), minlength=6) / len(keys)
  z = np.exp(np.array([3.0, 2.5, 2.0]) / 0.7)
  expected = np.zeros(6)
  expected[[1, 3, 5]] = z / z.sum()
  np.testing.assert_allclose(counts, expected, atol=0.03)
  z = np.exp(np.asarray(logits[0], np.float64) / 2.0)
  np.testing.assert_allclose(np.bincount(np.asarray(draw(keys, 2.0, 0)), minlength=6) / 4000,
                             z / z.sum(), atol=0.03)
  assert set(np.asarray(draw(keys, 5.0, 1)).tolist()) == {1}
  assert int(generate.sample(logits, keys[0], 0.0, 0)[0]) == 1


# ----------------------------------------------------------------------------- pre-merge


def np_structured(layer, x):
  """float64 numpy y = x W^T + b from the layer's factors, written from design §2."""
  get = lambda name: np.asarray(getattr(layer, name)[...], np.float64)
  lead = x.shape[:-1]
  if isinstance(layer, structured.LowRank):
    y = (x @ get('v').T) @ get('u').T
  elif isinstance(layer, structured.BlockDense):
    h = np.einsum('...bp,brp->...br', x.reshape(*lead, layer.blocks, -1), get('v'))
    y = h.reshape(*lead, -1) @ get('u').T
  else:  # BlockShuffle, element by element from its definition
    w1, w2 = get('w1'), get('w2')
    k = layer.blocks
    xs = x.reshape(*lead, k, -1)
    flat = np.einsum('...bp,bqp->...bq', xs, w1).reshape(*lead, -1)  # block-major, length k·q
    second_in = np.stack([flat[..., j::k] for j in range(k)], axis=-2)  # block j: j, j+k, ...
    u = np.einsum('...jq,jsq->...js', second_in, w2)  # (..., k, s)
    y = np.zeros((*lead, layer.out_features))
    for j in range(k):
      y[..., j::k] = u[..., j, :]  # y[t·k + j] = u[j, t]
  return y + get('bias')


def _dot_count(fn, *args):
  """dot_general equations in the jaxpr of fn, nested jaxprs (scan bodies) included."""
  def count(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      n += eqn.primitive.name == 'dot_general'
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          inner = getattr(sub, 'jaxpr', sub)
          if isinstance(inner, jax.extend.core.Jaxpr):
            n += count(inner)
    return n
  return count(jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr)  # a fresh trace every time


def _model_dots(fn, model):
  graphdef, state = nnx.split(model)
  return _dot_count(lambda s: fn(nnx.merge(graphdef, s)), state)


@pytest.mark.parametrize('method,n,m', [('lowrank', 32, 64), ('blockdense', 64, 32),
                                         ('blockshuffle', 32, 64), ('blockshuffle', 64, 32)])
def test_merged_layer_matches_numpy_and_switches_by_token_count(method, n, m):
  kw = dict(rank=16, blocks=4) if method != 'blockshuffle' else dict(blocks=4)
  layer = structured.make_linear(method, n, m, init='gaussian', rngs=nnx.Rngs(5), **kw)
  rng = np.random.default_rng(6)
  for _, v in nnx.iter_graph(layer):
    if isinstance(v, nnx.Param):
      v[...] = jnp.asarray(rng.standard_normal(v.shape) / math.sqrt(v.shape[-1]), jnp.float32)
  x = rng.standard_normal((2, 3, n))  # 6 tokens
  ref = np_structured(layer, x)
  structured_out = layer(jnp.asarray(x, jnp.float32))
  dots_structured = _dot_count(layer, jnp.asarray(x, jnp.float32))
  assert dots_structured == 2
  layer.merge(threshold=6)
  assert layer.merged.shape == (m, n)
  np.testing.assert_allclose(np.asarray(layer.merged[...]),
                             np.asarray(layer.to_dense()), rtol=0, atol=0)
  merged_out = layer(jnp.asarray(x, jnp.float32))
  for out in (structured_out, merged_out):
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=1e-5,
                               atol=1e-5 * np.abs(ref).max())
  # 6 tokens <= 6: one dense matmul; 7 tokens > 6: the structured factors again.
  assert _dot_count(layer, jnp.asarray(x, jnp.float32)) == 1
  assert _dot_count(layer, jnp.ones((7, n))) == dots_structured
  assert _dot_count(layer, jnp.ones((1, 1, n))) == 1
  layer.unmerge()
  assert layer.merged is None and _dot_count(layer, jnp.ones((1, n))) == dots_structured


def test_merge_is_refused_while_a_guide_exists():
  layer = structured.LowRank(32, 64, 8, guide=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='drop_guide'):
    layer.merge(16)
  model = build(tiny('lowrank'), guide=True)
  with pytest.raises(ValueError, match='drop_guides'):
    model.premerge(16)
  model.drop_guides()
  model.premerge(16)
  assert model.stack.ffn.fc1.merged is not None


def test_premerged_model_logits_and_path_per_call():
  cfg = tiny('blockshuffle', first_layer_dense=False)
  model = build(cfg, seed=7)
  tokens = jnp.asarray(np.random.default_rng(8).integers(0, cfg.vocab_size, (2, cfg.seq_len)),
                       jnp.int32)
  reference = np.asarray(_forward(model, tokens))
  one = lambda m: m.decode(tokens[:1, :1], m.init_cache(1, cfg.seq_len))[0]
  many = lambda m: m.decode(tokens, m.init_cache(2, cfg.seq_len))[0]
  dots = {'one': _model_dots(one, model), 'many': _model_dots(many, model)}
  fcs = 4 if not cfg.first_layer_dense else 2  # structured fc1 + fc2 traced (first block, scan)
  model.premerge({'fc1': 2 * cfg.seq_len, 'fc2': 2 * cfg.seq_len})  # every call merged
  assert_close(_forward(model, tokens), reference)
  assert _model_dots(one, model) == dots['one'] - fcs
  model.premerge(1)  # only one-token calls merged
  assert _model_dots(one, model) == dots['one'] - fcs
  assert _model_dots(many, model) == dots['many']
  # The stacked layers hold one merged matrix per layer, each its own layer's to_dense().
  stack = model.stack.ffn.fc2
  graphdef, state = nnx.split(stack)
  for i in range(cfg.num_layers - 1):
    layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
    np.testing.assert_allclose(np.asarray(stack.merged[...][i]), np.asarray(layer.to_dense()),
                               rtol=1e-6, atol=1e-7)


def test_crossover_is_the_last_count_where_merged_always_won():
  tokens = [1, 2, 4, 8, 16]
  assert premerge.crossover(tokens, [1, 1, 1, 5, 5], [2, 2, 2, 2, 9]) == 4
  assert premerge.crossover(tokens, [3, 1, 1, 1, 1], [2, 2, 2, 2, 2]) == 0
  assert premerge.crossover(tokens, [1] * 5, [2] * 5) == 16


# ----------------------------------------------------------------------------- commands


def test_premerge_and_generate_commands(trained_workdir, capsys):
  premerge.main(['--workdir', str(trained_workdir), '--tokens', '1,64', '--iters', '2'])
  record = json.loads((trained_workdir / 'premerge.json').read_text())
  assert set(record['thresholds']) == {'fc1', 'fc2'}
  assert all(t in (0, 1, 64) for t in record['thresholds'].values())
  assert record['layers']['fc1']['layer'] == 'LowRank(64->256, rank=16)'
  assert record['device'] == jax.devices()[0].device_kind
  capsys.readouterr()
  args = ['--workdir', str(trained_workdir), '--prompt', 'The game', '--prompt',
          'In 1996 , the', '--max-new-tokens', '8', '--no-stop-at-eos']
  generate.main(args)
  out, err = capsys.readouterr()
  merged = any(record['thresholds'].values())
  assert f'pre-merge {"on" if merged else "off"}' in err
  lines = out.splitlines()
  assert lines[0] == "--- 'The game'" and lines[1].startswith('The game')
  assert lines[2] == "--- 'In 1996 , the'" and lines[3].startswith('In 1996 , the')
  assert len(lines[1]) > len('The game')
  generate.main(args + ['--merge-threshold', '4096'])
  out_merged, err = capsys.readouterr()
  assert 'pre-merge on' in err and out_merged == out
  data_dir = json.loads((trained_workdir / 'config.json').read_text())['data']['data_dir']
  sp_path = manifest_lib.Manifest.load(data_dir).tokenizer_path
  assert sp_path.is_file()
  with pytest.raises(SystemExit, match='error: no prompt'):
    generate.main(['--workdir', str(trained_workdir)])
  with pytest.raises(SystemExit, match='config.json not found'):
    generate.main(['--workdir', str(trained_workdir.parent), '--prompt', 'x'])
  generate.main(args + ['--mesh', '1,1,1'])  # the run's own mesh, named
  assert capsys.readouterr().out == out
  with pytest.raises(SystemExit, match='= 4 devices, but this run has 1'):
    generate.main(args + ['--mesh', '2,2,1'])
