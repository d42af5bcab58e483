"""Hugging Face export: the directory's layout, a float64 numpy forward of the exported
architecture (Starcoder2 / Llama / Mistral / Qwen2, written from their definitions and reading
only the exported tensors by their transformers names) against our logits, the round trip back
into this project (identical logits from the factors; the merged dense form to float rounding),
a checkpoint of each family imported and exported back (its own tensors and config.json), and the
command.

No torch here: the check against `transformers` itself is done once by hand (BENCHMARKS.md).
"""

import json
import math
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

st = pytest.importorskip('safetensors.numpy', reason="safetensors is not installed "
                         "(pip install -e '.[export]')")

from structffn_jax import convert, export, run as run_lib, train  # noqa: E402
from structffn_jax.data.manifest import Manifest  # noqa: E402
from structffn_jax.model import GPT  # noqa: E402
from tests import hf_reference as ref, tiny_setup  # noqa: E402

SEQ_LEN = 16


random_model = tiny_setup.random_model


_forward = nnx.jit(lambda model, tokens: model(tokens))


def hf_forward(out_dir, tokens):
  """Logits (B, T, V) of the exported directory's transformers architecture, float64 numpy,
  from config.json and model.safetensors alone."""
  c = json.loads((out_dir / 'config.json').read_text())
  w = {k: v.astype(np.float64) for k, v in st.load_file(str(out_dir / 'model.safetensors')).items()}
  llama = c['model_type'].removeprefix('structffn_') != 'starcoder2'  # RMSNorm, SwiGLU
  eps = c['rms_norm_eps'] if llama else c['norm_epsilon']

  def norm(x, name):
    if llama:
      return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w[name + '.weight']
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w[name + '.weight'] + w[name + '.bias']

  def linear(x, name):
    y = x @ w[name + '.weight'].T
    return y + w[name + '.bias'] if name + '.bias' in w else y

  b, t = tokens.shape
  n, k, h = c['num_attention_heads'], c['num_key_value_heads'], c['head_dim']
  inv_freq = ref.rope_inv_freq(c, h)  # rope_theta and rope_scaling
  angles = np.arange(t)[:, None] * inv_freq[None]
  cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))
  rotate_half = lambda x: np.concatenate([-x[..., h // 2:], x[..., :h // 2]], -1)
  rope = lambda x: x * cos[:, None] + rotate_half(x) * sin[:, None]  # x: (B, T, heads, H)
  x = w['model.embed_tokens.weight'][tokens]
  causal = np.tril(np.ones((t, t), bool))
  for i in range(c['num_hidden_layers']):
    p = f'model.layers.{i}.'
    a = norm(x, p + 'input_layernorm')
    q = rope(linear(a, p + 'self_attn.q_proj').reshape(b, t, n, h))
    kk = rope(linear(a, p + 'self_attn.k_proj').reshape(b, t, k, h))
    v = linear(a, p + 'self_attn.v_proj').reshape(b, t, k, h)
    kk, v = np.repeat(kk, n // k, axis=2), np.repeat(v, n // k, axis=2)  # repeat_kv
    s = np.einsum('bqnh,bknh->bnqk', q, kk) / math.sqrt(h)
    s = np.where(causal, s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    o = np.einsum('bnqk,bknh->bqnh', s / s.sum(-1, keepdims=True), v).reshape(b, t, n * h)
    x = x + linear(o, p + 'self_attn.o_proj')
    m = norm(x, p + 'post_attention_layernorm')
    if 'structffn_layers' in c:  # a structured export: the FFN from its factors
      spec = c['structffn_layers'][i]
      u = structured_linear(m, spec['fc1'], w, p + 'mlp.fc1')
      if c['structffn_activation'] == 'swiglu':
        g, up = np.split(u, 2, axis=-1)
        f = structured_linear(g / (1 + np.exp(-g)) * up, spec['fc2'], w, p + 'mlp.fc2')
      else:
        gelu = 0.5 * u * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
        f = structured_linear(gelu, spec['fc2'], w, p + 'mlp.fc2')
    elif llama:
      g = linear(m, p + 'mlp.gate_proj')
      f = linear(g / (1 + np.exp(-g)) * linear(m, p + 'mlp.up_proj'), p + 'mlp.down_proj')
    else:
      u = linear(m, p + 'mlp.c_fc')
      gelu = 0.5 * u * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
      f = linear(gelu, p + 'mlp.c_proj')
    x = x + f
  return norm(x, 'model.norm') @ w.get('lm_head.weight', w['model.embed_tokens.weight']).T


def structured_linear(x, spec, w, name):
  """One projection of a structured export, float64, from the definitions in structured.py's
  docstrings (the BlockShuffle shuffle and interleave as explicit index maps)."""
  kind, lead = spec['kind'], x.shape[:-1]
  if kind == 'dense':
    y = x @ w[name + '.kernel'].T
  elif kind == 'lowrank':
    y = (x @ w[name + '.v'].T) @ w[name + '.u'].T
  elif kind == 'blockdense':
    v = w[name + '.v']
    c, r, p = v.shape
    h = np.concatenate([x[..., b * p:(b + 1) * p] @ v[b].T for b in range(c)], -1)
    y = h @ w[name + '.u'].T
  else:
    w1, w2 = w[name + '.w1'], w[name + '.w2']
    c, q, p = w1.shape
    s = w2.shape[1]
    flat = np.concatenate([x[..., b * p:(b + 1) * p] @ w1[b].T for b in range(c)], -1)
    y = np.zeros(lead + (c * s,))
    for j in range(c):
      u = flat[..., [a * c + j for a in range(q)]] @ w2[j].T  # block j reads flat(h)[a·C + j]
      y[..., [a * c + j for a in range(s)]] = u  # y[a·C + j] = u[j, a]
  return y + w[name + '.bias'] if name + '.bias' in w else y


CASES = {
    'dense': dict(method='dense'),
    'blockdense-mha': dict(method='blockdense', num_kv_heads=4, first_layer_dense=False),
    'blockshuffle': dict(method='blockshuffle'),
    'llama-lowrank': dict(method='lowrank', norm='rmsnorm', activation='swiglu'),
}


@pytest.mark.parametrize('case', list(CASES))
def test_export_layout_forward_and_round_trip(case, tmp_path):
  cfg = tiny_setup.model_config(seq_len=SEQ_LEN, **CASES[case])
  model = random_model(cfg, seed=1)
  tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, SEQ_LEN)).astype(np.int32)
  logits = np.asarray(_forward(model, jnp.asarray(tokens)))
  out = export.export_model(model, tmp_path / 'hf', eos_id=2, info={'name': case, 'step': 7})

  config = json.loads((out / 'config.json').read_text())
  llama = case.startswith('llama')
  assert config['architectures'] == ['LlamaForCausalLM' if llama else 'Starcoder2ForCausalLM']
  assert config['head_dim'] == 12 and config['hidden_size'] == 32  # attn_dim 48 != hidden 32
  assert config['tie_word_embeddings'] and config['structffn']['step'] == 7
  weights = st.load_file(str(out / 'model.safetensors'))
  assert 'lm_head.weight' not in weights and all(v.dtype == np.float32 for v in weights.values())
  fc1 = 'mlp.gate_proj' if llama else 'mlp.c_fc'
  assert weights[f'model.layers.2.{fc1}.weight'].shape == (cfg.ffn_dim, cfg.hidden_dim)
  assert weights['model.layers.0.self_attn.k_proj.weight'].shape == (
      cfg.num_kv_heads * 12, cfg.hidden_dim)
  assert len([k for k in weights if k.startswith('model.layers.1.')]) == 16  # with biases
  structured_model = cfg.ffn.method != 'dense'
  assert (out / 'structured.safetensors').is_file() == structured_model
  if structured_model:
    factors = st.load_file(str(out / 'structured.safetensors'))
    names = {'lowrank': {'u', 'v', 'bias'}, 'blockdense': {'u', 'v', 'bias'},
             'blockshuffle': {'w1', 'w2', 'bias'}}[cfg.ffn.method]
    assert {k.rsplit('.', 1)[1] for k in factors} == names
    first = 'model.layers.0.ffn.fc1.bias' in factors
    assert first == (not cfg.first_layer_dense)
    np.testing.assert_array_equal(factors['model.layers.2.ffn.fc2.bias'],
                                  np.asarray(model.stack.ffn.fc2.bias[...][1]))

  # The transformers architecture's forward on the exported tensors is our forward.
  reference = hf_forward(out, tokens)
  np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
  # Back into this project: identical parameters, identical logits.
  back = export.load(out)
  assert type(back.stack.ffn.fc1) is type(model.stack.ffn.fc1)
  np.testing.assert_array_equal(np.asarray(_forward(back, jnp.asarray(tokens))), logits)
  dense = export.load(out, structured_layers=False)
  np.testing.assert_allclose(np.asarray(_forward(dense, jnp.asarray(tokens))), logits,
                             rtol=1e-5, atol=1e-5 * np.abs(logits).max())


@pytest.mark.parametrize('case', ['blockdense-mha', 'blockshuffle', 'llama-lowrank'])
def test_structured_export_layout_and_forward(case, tmp_path):
  """--structured: a custom model type with auto_map to the shipped modeling file, each FFN
  projection as its own factors; the forward from config.json and those tensors alone (float64)
  is ours, and the directory reads back with identical logits."""
  cfg = tiny_setup.model_config(seq_len=SEQ_LEN, **CASES[case])
  model = random_model(cfg, seed=4)
  tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, SEQ_LEN)).astype(np.int32)
  logits = np.asarray(_forward(model, jnp.asarray(tokens)))
  out = export.export_model(model, tmp_path / 'hf', eos_id=2, structured=True)
  config = json.loads((out / 'config.json').read_text())
  name = 'Llama' if case.startswith('llama') else 'Starcoder2'
  assert config['architectures'] == [f'StructFFN{name}ForCausalLM']
  assert config['model_type'] == f'structffn_{name.lower()}'
  assert config['auto_map'] == {
      'AutoConfig': f'modeling_structffn.StructFFN{name}Config',
      'AutoModelForCausalLM': f'modeling_structffn.StructFFN{name}ForCausalLM'}
  assert (out / 'modeling_structffn.py').read_bytes() == (
      export.pathlib.Path(export.__file__).parent / 'hf_modeling' / 'modeling_structffn.py'
  ).read_bytes()
  assert not (out / 'structured.safetensors').exists()
  weights = st.load_file(str(out / 'model.safetensors'))
  assert not any(k.endswith(('c_fc.weight', 'gate_proj.weight', 'down_proj.weight'))
                 for k in weights)
  layers = config['structffn_layers']
  assert len(layers) == cfg.num_layers
  kind = {'blockdense-mha': 'blockdense', 'blockshuffle': 'blockshuffle',
          'llama-lowrank': 'lowrank'}[case]
  assert layers[0]['fc1']['kind'] == ('dense' if cfg.first_layer_dense else kind)
  assert layers[2]['fc1']['kind'] == layers[2]['fc2']['kind'] == kind
  fc1 = model.stack.ffn.fc1
  for factor in {'lowrank': ('u', 'v'), 'blockdense': ('u', 'v'),
                 'blockshuffle': ('w1', 'w2')}[kind] + ('bias',):
    np.testing.assert_array_equal(weights[f'model.layers.2.mlp.fc1.{factor}'],
                                  np.asarray(getattr(fc1, factor)[...][1]))
  reference = hf_forward(out, tokens)
  np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
  back = export.load(out)
  np.testing.assert_array_equal(np.asarray(_forward(back, jnp.asarray(tokens))), logits)
  with pytest.raises(ValueError, match='is a structured export'):
    export.load(out, structured_layers=False)


def test_refused_inputs(tmp_path):
  cfg = tiny_setup.model_config('dense', seq_len=SEQ_LEN, position='absolute')
  with pytest.raises(ValueError, match="model.position='absolute' has no transformers"):
    export.export_model(random_model(cfg), tmp_path, eos_id=2)
  model = random_model(tiny_setup.model_config('lowrank', seq_len=SEQ_LEN), seed=0)
  guided = nnx.eval_shape(lambda: GPT(model.cfg, guide=True, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match='still has self-guided guides'):
    export.tensors(guided)
  with pytest.raises(FileNotFoundError, match='not an exported model directory'):
    export.load(tmp_path)


HELD_OUT = ('Il était une fois, en 1996 :  naïve café — 東京 🙂\n\tdef f(x):\n    return x ** 2\n'
            '= = Reception = =\n  trailing  ')


def test_tokenizer_json_is_exported_for_the_fast_tokenizer_class(tmp_path):
  """A run on a Hugging Face tokenizer.json exports that file, less a post-processor that would
  add a BOS training never saw; BOS = EOS."""
  tokenizers = pytest.importorskip('tokenizers')
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(['the game was released in 1996 , and it sold well .'] * 20,
                          trainers.BpeTrainer(vocab_size=300, special_tokens=['<|endoftext|>',
                                                                              '<|begin_of_text|>'],
                                              show_progress=False,
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(tmp_path / 'plain.json'))
  tok.post_processor = processors.TemplateProcessing(
      single='<|begin_of_text|> $A', special_tokens=[('<|begin_of_text|>', 1)])
  tok.save(str(tmp_path / 'tokenizer.json'))
  assert tok.encode('the game').ids[0] == 1  # the source adds a BOS
  cfg = tiny_setup.model_config('dense', seq_len=SEQ_LEN)
  out = export.export_model(random_model(cfg), tmp_path / 'hf', eos_id=0,
                            tokenizer_path=tmp_path / 'plain.json')
  assert (out / 'tokenizer.json').read_bytes() == (tmp_path / 'plain.json').read_bytes()
  assert not (out / 'tokenizer.model').exists()
  out = export.export_model(random_model(cfg), tmp_path / 'hf', eos_id=0,
                            tokenizer_path=tmp_path / 'tokenizer.json')
  exported = tokenizers.Tokenizer.from_file(str(out / 'tokenizer.json'))
  text = 'the game was released in 1996'
  assert exported.encode(text).ids == tok.encode(text, add_special_tokens=False).ids
  config = json.loads((out / 'tokenizer_config.json').read_text())
  assert config['tokenizer_class'] == 'PreTrainedTokenizerFast'
  assert config['eos_token'] == config['bos_token'] == '<|endoftext|>'
  hf = json.loads((out / 'config.json').read_text())
  assert hf['bos_token_id'] == hf['eos_token_id'] == 0


def test_sentencepiece_tokenizer_json_encodes_as_the_run(data_dir, tmp_path):
  """A SentencePiece run gets a tokenizer.json of its own model: the same ids as SentencePiece
  on text the tokenizer never saw (byte fallback included), decoding back to the text."""
  tokenizers = pytest.importorskip('tokenizers')
  import inspect
  import json.encoder
  import sentencepiece as spm
  manifest = Manifest.load(data_dir)
  sp = spm.SentencePieceProcessor(model_file=str(manifest.tokenizer_path))
  cfg = tiny_setup.model_config('dense', seq_len=SEQ_LEN)
  out = export.export_model(random_model(cfg), tmp_path / 'hf', eos_id=manifest.eos_id,
                            tokenizer_path=manifest.tokenizer_path)
  tok = tokenizers.Tokenizer.from_file(str(out / 'tokenizer.json'))
  texts = [HELD_OUT, inspect.getsource(json.decoder), inspect.getsource(json.encoder), ' ', '']
  for text in texts:
    ids = sp.encode(text)
    assert tok.encode(text).ids == ids  # the default encode: no token added
    assert tok.decode(ids, skip_special_tokens=False) == text
  assert tok.get_vocab_size() == sp.get_piece_size()
  config = json.loads((out / 'tokenizer_config.json').read_text())
  assert config['bos_token'] == config['eos_token'] == sp.id_to_piece(manifest.eos_id)
  assert manifest.bos_id != manifest.eos_id  # the model file's own <s>, never used in training
  assert json.loads((out / 'config.json').read_text())['bos_token_id'] == manifest.eos_id


def test_unconvertible_sentencepiece_model_is_refused(tmp_path):
  """A SentencePiece model whose encoding a tokenizer.json would not reproduce (a dummy prefix)
  is refused with one line."""
  import sentencepiece as spm
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(['the game was released in 1996 , and it sold well .'] * 50),
      model_prefix=str(tmp_path / 'sp'), vocab_size=300, model_type='bpe', minloglevel=2,
      add_dummy_prefix=True, byte_fallback=True)
  cfg = tiny_setup.model_config('dense', seq_len=SEQ_LEN)
  with pytest.raises(ValueError, match='would encode differently from the SentencePiece model'):
    export.export_model(random_model(cfg), tmp_path / 'hf', eos_id=2,
                        tokenizer_path=tmp_path / 'sp.model')


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory, data_dir):
  """A tiny BlockShuffle run, trained for 2 steps."""
  root = tmp_path_factory.mktemp('run')
  config = tiny_setup.run_config(
      'train.tokens=1024', 'train.eval_every=0', 'train.log_every=1', 'train.eval_tokens=256',
      'model.ffn.init=gaussian', f'data.data_dir={data_dir}', method='blockshuffle', sgt=0)
  train.Trainer(config, root / 'w').run()
  return root / 'w'


def test_command(trained_workdir, data_dir, tmp_path, capsys):
  out = tmp_path / 'hf'
  export.main(['--workdir', str(trained_workdir), '--out', str(out)])
  assert 'Starcoder2ForCausalLM of tiny-blockshuffle step 2' in capsys.readouterr().out
  assert sorted(p.name for p in out.iterdir()) == [
      'config.json', 'model.safetensors', 'special_tokens_map.json', 'structured.safetensors',
      'tokenizer.json', 'tokenizer.model', 'tokenizer_config.json']
  manifest = Manifest.load(data_dir)
  assert (out / 'tokenizer.model').read_bytes() == manifest.tokenizer_path.read_bytes()
  config = json.loads((out / 'config.json').read_text())
  assert config['eos_token_id'] == manifest.eos_id
  assert config['structffn']['layers']['stack'] == {'fc1': 'BlockShuffle', 'fc2': 'BlockShuffle'}
  tokenizer_config = json.loads((out / 'tokenizer_config.json').read_text())
  assert tokenizer_config['eos_token'] == tokenizer_config['bos_token'] == '</s>'
  assert config['bos_token_id'] == manifest.eos_id
  back = export.load(out, dtype='float32')
  tokens = jnp.asarray(np.arange(12, dtype=np.int32)[None] % 50)
  from structffn_jax import generate
  _, model, _, _ = generate.load(trained_workdir, merge_threshold=0)
  np.testing.assert_array_equal(np.asarray(_forward(back, tokens)),
                                np.asarray(_forward(model, tokens)))
  export.main(['--workdir', str(trained_workdir), '--out', str(tmp_path / 'hf_s'), '--structured'])
  assert 'StructFFNStarcoder2ForCausalLM of tiny-blockshuffle' in capsys.readouterr().out
  assert (tmp_path / 'hf_s' / 'modeling_structffn.py').is_file()
  np.testing.assert_array_equal(np.asarray(_forward(export.load(tmp_path / 'hf_s'), tokens)),
                                np.asarray(_forward(model, tokens)))
  # Bad inputs: one-line errors.
  with pytest.raises(SystemExit, match='config.json not found'):
    export.main(['--workdir', str(tmp_path), '--out', str(tmp_path / 'x')])
  empty = tmp_path / 'empty'
  empty.mkdir()
  shutil.copy(trained_workdir / 'config.json', empty / 'config.json')
  with pytest.raises(SystemExit, match='holds no checkpoint yet'):
    export.main(['--workdir', str(empty), '--out', str(tmp_path / 'y')])


# ----------------------------------------------------------------------------- imported models

# Checkpoints of each family (tests/hf_reference.py overrides), imported and exported back.
IMPORTED = {
    'llama': dict(rms_norm_eps=1e-5),
    'llama3-rope-tied': dict(model_type='llama', tie_word_embeddings=True, rope_theta=500000.0,
                             max_position_embeddings=256,
                             rope_scaling={'rope_type': 'llama3', 'factor': 8.0,
                                           'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                                           'original_max_position_embeddings': 32}),
    'llama-linear-rope-biases': dict(model_type='llama', attention_bias=True, mlp_bias=True,
                                     rope_scaling={'type': 'linear', 'factor': 2.0}),
    'mistral': dict(num_key_value_heads=1),
    'qwen2': dict(rope_theta=1000000.0, rms_norm_eps=1e-5),
    'qwen2-tied-linear-rope': dict(model_type='qwen2', tie_word_embeddings=True,
                                   rope_scaling={'rope_type': 'linear', 'factor': 4.0}),
    'starcoder2-untied': dict(model_type='starcoder2', tie_word_embeddings=False),
}
# The config.json fields that decide the forward (and the tensors' names and shapes).
FIELDS = ('architectures', 'model_type', 'vocab_size', 'hidden_size', 'intermediate_size',
          'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads', 'head_dim',
          'max_position_embeddings', 'rope_theta', 'tie_word_embeddings', 'hidden_act',
          'rms_norm_eps', 'norm_epsilon', 'attention_bias', 'mlp_bias', 'use_bias',
          'use_sliding_window')


def _scaling(c):
  """config.json's RoPE scaling as {kind, parameters...}, whichever spelling it uses."""
  rs = dict(c.get('rope_scaling') or {'rope_type': 'default'})
  rs['rope_type'] = rs.pop('type', rs.get('rope_type'))
  return rs


def _import(tmp_path, name, method):
  over = dict(IMPORTED[name])
  model_type = over.pop('model_type', name)
  src = ref.write_checkpoint(tmp_path, model_type, seed=len(name), tokenizer=True, **over)
  source = json.loads((src / 'config.json').read_text())
  sets = ('model.dtype=float32', f'model.ffn.method={method}',
          f'model.seq_len={source["max_position_embeddings"]}')
  convert.convert(src, 'configs/tiny.py:method=lowrank', tmp_path / 'run', sets, 'projection',
                  log=lambda _: None)
  return src, source, tmp_path / 'run'


def _run_logits(workdir, tokens):
  model = run_lib.load_run(workdir, mesh='1,1,1').model
  return np.asarray(_forward(model, jnp.asarray(tokens, jnp.int32)), np.float64)


@pytest.mark.parametrize('name', list(IMPORTED))
def test_an_imported_dense_model_exports_as_its_own_checkpoint(name, tmp_path, capsys):
  """HF checkpoint -> convert (dense) -> export: the source's tensors bit for bit under its own
  names, its config.json's fields, its tokenizer; the exported directory's float64 forward
  (tests/hf_reference.py) is our model's."""
  src, source, run = _import(tmp_path, name, 'dense')
  out = tmp_path / 'hf'
  export.main(['--workdir', str(run), '--out', str(out)])  # converted, not trained: no data yet
  assert f'{source["architectures"][0]} of ' in capsys.readouterr().out
  theirs = st.load_file(str(src / 'model.safetensors'))
  ours = st.load_file(str(out / 'model.safetensors'))
  assert sorted(ours) == sorted(theirs)
  for key, value in theirs.items():
    assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
    np.testing.assert_array_equal(ours[key], value, err_msg=key)
  config = json.loads((out / 'config.json').read_text())
  for field in FIELDS:
    if field in source:  # absent: off (Mistral has no attention_bias or mlp_bias)
      assert config.get(field, False) == source[field], field
  assert _scaling(config) == _scaling(source)
  params = config['rope_parameters']  # transformers 5's spelling, the same
  assert params.pop('rope_theta') == source['rope_theta']
  assert params == _scaling(source)
  assert not config.get('sliding_window')
  assert config['structffn']['model']['hf_family'] == source['model_type']
  # The tokenizer: the source's file, its EOS declared.
  assert (out / 'tokenizer.json').read_bytes() == (src / 'tokenizer.json').read_bytes()
  tokenizer_config = json.loads((out / 'tokenizer_config.json').read_text())
  assert tokenizer_config['eos_token'] == '<eos>' and config['eos_token_id'] == 1
  tokens = np.random.default_rng(3).integers(0, source['vocab_size'], (2, 24))
  want = ref.forward(out, tokens)
  np.testing.assert_array_equal(want, ref.forward(src, tokens))
  got = _run_logits(run, tokens)
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  back = export.load(out)  # and back into this project
  np.testing.assert_array_equal(
      np.asarray(_forward(back, jnp.asarray(tokens, jnp.int32)), np.float64), got)


@pytest.mark.parametrize('name', ['llama3-rope-tied', 'llama-linear-rope-biases', 'mistral',
                                  'qwen2'])
def test_an_imported_structured_model_exports_structured(name, tmp_path):
  """HF checkpoint -> convert (LowRank projection) -> export --structured: the family's own
  tensors outside the FFN, bit for bit, each FFN projection as the run's factors, the family's
  config.json fields, and the float64 forward of the directory (its factors) is our model's."""
  src, source, run = _import(tmp_path, name, 'lowrank')
  out = export.export_run(run, tmp_path / 'hf', structured=True)
  config = json.loads((out / 'config.json').read_text())
  arch = source['architectures'][0]
  assert config['architectures'] == ['StructFFN' + arch]
  assert config['model_type'] == 'structffn_' + source['model_type']
  assert config['auto_map']['AutoModelForCausalLM'] == 'modeling_structffn.StructFFN' + arch
  for field in FIELDS[2:]:
    if field in source:
      assert config.get(field, False) == source[field], field
  assert _scaling(config) == _scaling(source)
  theirs = st.load_file(str(src / 'model.safetensors'))
  ours = st.load_file(str(out / 'model.safetensors'))
  assert sorted(k for k in ours if '.mlp.' not in k) == sorted(
      k for k in theirs if '.mlp.' not in k)
  for key in theirs:
    if '.mlp.' not in key:
      np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
  model = run_lib.load_run(run, mesh='1,1,1').model
  np.testing.assert_array_equal(ours['model.layers.2.mlp.fc1.u'],
                                np.asarray(model.stack.ffn.fc1.u[...][1]))
  assert 'model.layers.0.mlp.fc1.kernel' in ours  # the dense first block
  tokens = np.random.default_rng(4).integers(0, source['vocab_size'], (2, 24))
  want = hf_forward(out, tokens)
  got = _run_logits(run, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  np.testing.assert_array_equal(
      np.asarray(_forward(export.load(out), jnp.asarray(tokens, jnp.int32)), np.float64), got)


@pytest.mark.parametrize('overrides,expect', [
    (dict(hf_family='mistral', use_bias=True), 'model.use_bias=True cannot be written as '
     'MistralForCausalLM'),
    (dict(hf_family='llama', qkv_bias=True), 'model.qkv_bias=True cannot be written as '
     'LlamaForCausalLM'),
    (dict(hf_family='qwen2', use_bias=True), 'model.use_bias=True cannot be written as '
     'Qwen2ForCausalLM'),
    (dict(qkv_bias=True, use_bias=False, norm='layernorm', activation='gelu'),
     'model.qkv_bias=True cannot be written as Starcoder2ForCausalLM'),
    (dict(hf_family='llama', norm='layernorm', activation='swiglu'),
     "model.norm='layernorm' cannot be written as LlamaForCausalLM"),
    (dict(hf_family='gpt2'), "model.hf_family='gpt2'"),
])
def test_what_a_family_cannot_express_is_refused_by_field(overrides, expect, tmp_path):
  """One line naming the field and its value, before anything is written."""
  cfg = tiny_setup.model_config('lowrank', seq_len=SEQ_LEN, norm='rmsnorm', activation='swiglu',
                                use_bias=False)
  cfg.update(overrides)
  model = random_model(cfg, seed=0)
  for structured_export in (False, True):
    with pytest.raises(ValueError) as e:
      export.export_model(model, tmp_path / 'hf', eos_id=2, structured=structured_export)
    assert expect in str(e.value) and '\n' not in str(e.value)
    assert not (tmp_path / 'hf').exists()


def test_a_model_of_no_family_exports_by_its_layers(tmp_path):
  """Without model.hf_family: q/k/v-only biases with RMSNorm and SwiGLU are Qwen2, an untied
  head is written as lm_head.weight; the float64 forward of the directory is ours."""
  cfg = tiny_setup.model_config('dense', seq_len=SEQ_LEN, norm='rmsnorm', activation='swiglu',
                                use_bias=False, qkv_bias=True, tie_embeddings=False)
  model = random_model(cfg, seed=2)
  out = export.export_model(model, tmp_path / 'hf', eos_id=2)
  config = json.loads((out / 'config.json').read_text())
  assert config['architectures'] == ['Qwen2ForCausalLM'] and not config['tie_word_embeddings']
  weights = st.load_file(str(out / 'model.safetensors'))
  np.testing.assert_array_equal(weights['lm_head.weight'], np.asarray(model.head[...]))
  assert 'model.layers.1.self_attn.v_proj.bias' in weights
  assert 'model.layers.1.self_attn.o_proj.bias' not in weights
  tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, SEQ_LEN))
  want = ref.forward(out, tokens)
  np.testing.assert_allclose(np.asarray(_forward(model, jnp.asarray(tokens, jnp.int32))), want,
                             rtol=1e-4, atol=1e-4 * np.abs(want).max())
