"""convert: Hugging Face checkpoints written here against float64 numpy forwards of their
architectures, the guided step-0 equality, the three modes, a workdir as the source, and every
refusal (one line, nothing written)."""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import hf_reference as ref
from structffn_jax import convert, run as run_lib, sgt

TINY = 'configs/tiny.py:method=lowrank'
F32 = ('model.dtype=float32',)


def _logits(workdir, tokens):
  r = run_lib.load_run(workdir, mesh='1,1,1')
  alpha = None if r.meta.get('guides_dropped') else sgt.alpha_of(r.opt_state)
  return np.asarray(r.model(jnp.asarray(tokens, jnp.int32), alpha=alpha), np.float64), r


def _tokens(vocab=96, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (2, 16))


FAMILIES = {
    'llama': dict(),
    'llama3-rope-tied-gqa': dict(model_type='llama', tie_word_embeddings=True,
                                 rope_theta=500000.0, max_position_embeddings=256,
                                 rope_scaling={'rope_type': 'llama3', 'factor': 8.0,
                                               'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                                               'original_max_position_embeddings': 32}),
    'llama-linear-rope-biases': dict(model_type='llama', attention_bias=True, mlp_bias=True,
                                     rope_scaling={'type': 'linear', 'factor': 2.0}),
    'mistral': dict(),
    'qwen2': dict(),
    'starcoder2': dict(),
    'gpt2': dict(),
}


@pytest.mark.parametrize('name', list(FAMILIES))
def test_imported_dense_model_matches_the_reference(tmp_path, name):
  over = dict(FAMILIES[name])
  model_type = over.pop('model_type', name)
  src = ref.write_checkpoint(tmp_path, model_type, seed=len(name), tokenizer=True, **over)
  convert.convert(src, TINY, tmp_path / 'new', F32 + ('model.ffn.method=dense',), 'projection',
                  log=lambda _: None)
  tokens = _tokens()
  ours, r = _logits(tmp_path / 'new', tokens)
  want = ref.forward(src, tokens)
  assert np.abs(want).max() > 1.0  # a real signal, not near-zero logits
  np.testing.assert_allclose(ours, want, atol=2e-4 * np.abs(want).max(), rtol=0)
  assert r.config.data.tokenizer == str((tmp_path / 'new' / 'tokenizer.json').absolute())
  assert (tmp_path / 'new' / 'tokenizer.json').is_file()
  assert r.config.model.hf_family == model_type  # what export writes back


def test_sharded_bfloat16_checkpoint(tmp_path):
  src = ref.write_checkpoint(tmp_path, 'llama', seed=3, shards=3, dtype=ml_dtypes.bfloat16,
                             tokenizer=True)
  convert.convert(src, TINY, tmp_path / 'new', F32 + ('model.ffn.method=dense',), 'projection',
                  log=lambda _: None)
  tokens = _tokens()
  want = ref.forward(src, tokens)  # the bfloat16 values, exactly, in float64
  np.testing.assert_allclose(_logits(tmp_path / 'new', tokens)[0], want,
                             atol=2e-4 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize('method', ['lowrank', 'blockdense', 'blockshuffle'])
def test_guided_step0_logits_equal_the_dense_model_exactly(tmp_path, method):
  src = ref.write_checkpoint(tmp_path, 'llama', seed=5, tokenizer=True)
  spec = f'configs/tiny.py:method={method}'
  dense_cfg = F32 + ('model.ffn.method=dense', 'model.ffn.rank=0', 'model.ffn.blocks=1')
  convert.convert(src, spec, tmp_path / 'dense', dense_cfg, 'projection', log=lambda _: None)
  lines = []
  record = convert.convert(src, spec, tmp_path / 'guided', F32, 'guided', log=lines.append)
  tokens = _tokens(seed=1)
  dense, _ = _logits(tmp_path / 'dense', tokens)
  guided, r = _logits(tmp_path / 'guided', tokens)
  assert float(sgt.alpha_of(r.opt_state)) == 1.0 and r.model.has_guide
  np.testing.assert_array_equal(guided, dense)
  # One progress line per layer, each structured matrix at its optimum.
  assert sum(line.startswith('layer ') for line in lines) == 3
  for entry in record['layers'][1:]:
    for fc in ('fc1', 'fc2'):
      assert entry[fc]['relative_error'] == pytest.approx(entry[fc]['optimum'], rel=1e-4)
  # At α = 0 the guided model is the projection (the factors alone).
  convert.convert(src, spec, tmp_path / 'proj', F32, 'projection', log=lambda _: None)
  proj, rp = _logits(tmp_path / 'proj', tokens)
  assert not rp.model.has_guide
  at_zero = np.asarray(r.model(jnp.asarray(tokens, jnp.int32), alpha=0.0), np.float64)
  np.testing.assert_allclose(at_zero, proj, atol=1e-5, rtol=0)
  assert np.abs(proj - dense).max() > 1e-3  # the projection alone is not the dense model


def test_scratch_copies_all_but_the_structured_factors(tmp_path):
  src = ref.write_checkpoint(tmp_path, 'starcoder2', seed=6, tokenizer=True)
  convert.convert(src, TINY, tmp_path / 'proj', F32, 'projection', log=lambda _: None)
  record = convert.convert(src, TINY, tmp_path / 'scratch', F32, 'scratch', log=lambda _: None)
  assert 'relative_error' not in json.dumps(record['layers'])
  p = run_lib.load_run(tmp_path / 'proj', mesh='1,1,1').model
  s = run_lib.load_run(tmp_path / 'scratch', mesh='1,1,1').model
  np.testing.assert_array_equal(np.asarray(p.embedding[...]), np.asarray(s.embedding[...]))
  np.testing.assert_array_equal(np.asarray(p.stack.attn.qkv.kernel[...]),
                                np.asarray(s.stack.attn.qkv.kernel[...]))
  np.testing.assert_array_equal(np.asarray(p.first.ffn.fc1.kernel[...]),
                                np.asarray(s.first.ffn.fc1.kernel[...]))
  assert not np.allclose(np.asarray(p.stack.ffn.fc1.u[...]), np.asarray(s.stack.ffn.fc1.u[...]))


def test_a_workdir_is_a_source(tmp_path):
  """HF -> dense workdir A -> guided LowRank B: B at α = 1 computes A's logits exactly, and B's
  data section is A's (the same tokenizer and token rows)."""
  src = ref.write_checkpoint(tmp_path, 'gpt2', seed=7, tokenizer=True)
  convert.convert(src, TINY, tmp_path / 'a', F32 + ('model.ffn.method=dense',), 'projection',
                  log=lambda _: None)
  convert.convert(tmp_path / 'a', TINY, tmp_path / 'b', F32, 'guided', log=lambda _: None)
  tokens = _tokens(seed=2)
  a, ra = _logits(tmp_path / 'a', tokens)
  b, rb = _logits(tmp_path / 'b', tokens)
  np.testing.assert_array_equal(a, b)
  assert rb.config.data.tokenizer == ra.config.data.tokenizer
  assert rb.config.data.data_dir == str((tmp_path / 'a' / 'data').absolute())
  # A self-guided source counts as what it applies: B's α-blend, B -> C projection dense.
  convert.convert(tmp_path / 'b', TINY, tmp_path / 'c', F32 + ('model.ffn.method=dense',),
                  'projection', log=lambda _: None)
  np.testing.assert_allclose(_logits(tmp_path / 'c', tokens)[0], a, atol=1e-5, rtol=0)


def test_the_new_workdir_trains(tmp_path):
  """The converted workdir is a run the trainer resumes at step 0 and trains."""
  from structffn_jax import config as config_lib, train
  src = ref.write_checkpoint(tmp_path, 'llama', seed=8, tokenizer=True)
  new = tmp_path / 'new'
  convert.convert(src, TINY, new, F32 + ('train.tokens=2048', 'train.eval_tokens=256',
                                         'data.stdlib_max_bytes=200000'), 'guided',
                  log=lambda _: None)
  config = config_lib.load(str(new / 'config.py'))
  trainer = train.Trainer(config, new)
  assert trainer.step == 0 and trainer.guides
  result = trainer.run()
  assert np.isfinite(result['loss'] if 'loss' in result else result.get('train_loss', 0.0))
  assert max(int(p.name) for p in (new / 'checkpoints').iterdir() if p.name.isdigit()) > 0


# ----------------------------------------------------------------------------- refusals


def _refused(tmp_path, src, sets=(), spec=TINY, mode='guided'):
  new = tmp_path / 'new'
  with pytest.raises((ValueError, FileNotFoundError, FileExistsError)) as e:
    convert.convert(src, spec, new, sets, mode, log=lambda _: None)
  msg = str(e.value)
  assert '\n' not in msg
  assert not new.exists()
  return msg


@pytest.mark.parametrize('model_type,over,expect', [
    ('mistral', dict(sliding_window=32), 'sliding_window=32'),
    ('starcoder2', dict(sliding_window=16), 'sliding_window=16'),
    ('qwen2', dict(use_sliding_window=True, sliding_window=8), 'sliding_window=8'),
    ('llama', dict(num_local_experts=8), 'num_local_experts=8'),
    ('llama', dict(alibi=True), 'alibi=True'),
    ('llama', dict(model_type='falcon'), "model_type='falcon'"),
    ('llama', dict(hidden_act='gelu'), "hidden_act='gelu'"),
    ('llama', dict(rope_scaling={'rope_type': 'yarn', 'factor': 4.0}), "'yarn'"),
    ('llama', dict(attention_bias=True), 'attention_bias=True with mlp_bias=False'),
    ('gpt2', dict(scale_attn_by_inverse_layer_idx=True), 'scale_attn_by_inverse_layer_idx'),
])
def test_what_the_model_cannot_express_is_refused_by_field(tmp_path, model_type, over, expect):
  over = dict(over)
  renamed = over.pop('model_type', None)
  src = ref.write_checkpoint(tmp_path, model_type, tokenizer=True, **over)
  if renamed:
    c = json.loads((src / 'config.json').read_text())
    (src / 'config.json').write_text(json.dumps({**c, 'model_type': renamed}))
  assert expect in _refused(tmp_path, src, F32 + ('model.seq_len=64',))


def test_a_sliding_window_at_least_the_context_is_accepted(tmp_path):
  src = ref.write_checkpoint(tmp_path, 'mistral', tokenizer=True, sliding_window=64)
  msg = _refused(tmp_path, src, F32 + ('model.seq_len=128',))
  assert 'model.seq_len=64' in msg  # the fix is named
  convert.convert(src, TINY, tmp_path / 'ok', F32 + ('model.seq_len=64',), log=lambda _: None)


def test_missing_and_partial_shards(tmp_path):
  src = ref.write_checkpoint(tmp_path, 'llama', shards=2, tokenizer=True)
  shard = sorted(src.glob('model-*.safetensors'))[1]
  data = shard.read_bytes()
  shard.unlink()
  assert shard.name in _refused(tmp_path, src) and 'missing' in _refused(tmp_path, src)
  # A shard that lacks a tensor its index lists: a partial copy.
  from safetensors.numpy import load_file, save_file
  shard.write_bytes(data)
  tensors = load_file(str(shard))
  dropped = sorted(tensors)[0]
  save_file({k: v for k, v in tensors.items() if k != dropped}, str(shard))
  msg = _refused(tmp_path, src)
  assert dropped in msg and 'partial' in msg


def test_a_tensor_missing_from_a_single_file(tmp_path):
  from safetensors.numpy import load_file, save_file
  src = ref.write_checkpoint(tmp_path, 'qwen2', tokenizer=True)
  t = load_file(str(src / 'model.safetensors'))
  del t['model.layers.1.self_attn.k_proj.bias']
  save_file(t, str(src / 'model.safetensors'))
  assert 'model.layers.1.self_attn.k_proj.bias is missing' in _refused(tmp_path, src)


def test_unsupported_dtype_and_contradicting_shapes(tmp_path):
  from safetensors.numpy import load_file, save_file
  src = ref.write_checkpoint(tmp_path, 'llama', tokenizer=True)
  t = load_file(str(src / 'model.safetensors'))
  t['model.layers.0.mlp.up_proj.weight'] = t['model.layers.0.mlp.up_proj.weight'].astype(np.int8)
  save_file(t, str(src / 'model.safetensors'))
  msg = _refused(tmp_path, src)
  assert 'model.layers.0.mlp.up_proj.weight is I8' in msg and 'model.safetensors' in msg
  src2 = ref.write_checkpoint(tmp_path, 'llama', name='wrong-width', tokenizer=True)
  c = json.loads((src2 / 'config.json').read_text())
  c['intermediate_size'] = 160
  (src2 / 'config.json').write_text(json.dumps(c))
  msg = _refused(tmp_path, src2)
  assert 'has shape (128, 64) but config.json gives (160, 64)' in msg


def test_blocks_that_do_not_divide_the_width(tmp_path):
  src = ref.write_checkpoint(tmp_path, 'llama', tokenizer=True)
  msg = _refused(tmp_path, src, F32 + ('model.ffn.blocks=3',),
                 spec='configs/tiny.py:method=blockshuffle')
  assert 'model.ffn.blocks=3' in msg


def test_no_tokenizer_and_no_weights(tmp_path):
  src = ref.write_checkpoint(tmp_path, 'llama')
  assert 'data.tokenizer' in _refused(tmp_path, src)
  (src / 'model.safetensors').unlink()
  (src / 'pytorch_model.bin').write_bytes(b'')
  assert 'safe_serialization' in _refused(tmp_path, src)


def test_a_workdir_holding_a_run_is_refused_unless_overwrite(tmp_path):
  src = ref.write_checkpoint(tmp_path, 'llama', tokenizer=True)
  new = tmp_path / 'new'
  convert.convert(src, TINY, new, F32, 'projection', log=lambda _: None)
  before = (new / 'convert.json').read_text()
  with pytest.raises(FileExistsError) as e:
    convert.convert(src, TINY, new, F32, 'guided', log=lambda _: None)
  assert '--overwrite' in str(e.value) and (new / 'convert.json').read_text() == before
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'notes.txt').write_text('mine')
  with pytest.raises(FileExistsError):
    convert.convert(src, TINY, other, F32, 'guided', overwrite=True, log=lambda _: None)
  assert (other / 'notes.txt').read_text() == 'mine'
  convert.convert(src, TINY, new, F32, 'guided', overwrite=True, log=lambda _: None)
  assert json.loads((new / 'convert.json').read_text())['mode'] == 'guided'


def test_command_line(tmp_path, capsys):
  src = ref.write_checkpoint(tmp_path, 'gpt2', tokenizer=True)
  convert.main(['--from', str(src), '--config', 'configs/tiny.py:method=blockdense',
                '--workdir', str(tmp_path / 'new'), '--set', 'model.dtype=float32',
                '--mode', 'projection'])
  out = capsys.readouterr().out
  assert 'layer 3/3: fc1 blockdense rel. error' in out and 'structffn_jax.train' in out
  with pytest.raises(SystemExit) as e:
    convert.main(['--from', str(src), '--config', TINY, '--workdir', str(tmp_path / 'new')])
  assert 'already holds a run' in str(e.value)
