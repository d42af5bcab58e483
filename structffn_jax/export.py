"""Export a trained run as a Hugging Face model directory, and read such a directory back.

  pip install -e '.[export]'
  python -m structffn_jax.export --workdir runs/quickstart --out hf/quickstart

DIR gets:
  config.json             a `transformers` config (below), plus "structffn": this project's model
                          section, the run's name and step, and which FFN layers are structured
  model.safetensors       every weight under the architecture's names, float32; a structured FFN
                          layer as its merged dense matrix (its exact `to_dense()`)
  structured.safetensors  the structured layers' own factors (u, v / w1, w2, bias), as trained
                          (only when the model has structured layers)
  tokenizer.json          the run's tokenizer for `tokenizers` / AutoTokenizer alone (a SentencePiece
                          run's converted, same ids; hf_tokenizer.py); tokenizer.model beside it
                          for a SentencePiece run
  tokenizer_config.json   PreTrainedTokenizerFast; BOS = EOS = the end-of-document token, which
                          preceded every training document (no token is added to an encoding)

The architecture is an existing `transformers` one whose forward is this model's:
  - layernorm + GELU(tanh) + RoPE (the paper's model): Starcoder2. Pre-LN blocks with LayerNorm,
    biases on every projection (`use_bias`), RoPE rotate-half over the whole head, grouped-query
    attention with its own head_dim, an fc1 -> gelu_pytorch_tanh -> fc2 MLP and the head tied to
    the embedding. GPT-NeoX would need its parallel residual off and unties the head; Phi and
    StableLM apply RoPE to part of the head; Qwen2 and Llama use RMSNorm and a gated MLP.
  - rmsnorm + SwiGLU + RoPE: Llama (attention_bias and mlp_bias = use_bias, tied head).
Other combinations (learned absolute positions, layernorm with SwiGLU, rmsnorm with GELU) have no
exact counterpart and are refused. Our fused QKV projection is split into q_proj, k_proj and
v_proj, head-major as our reshape reads it. config.json gives `head_dim` (attn_dim / num_heads),
which transformers reads for both architectures (checked with 5.24; a version that ignores it
loads only models with attn_dim == hidden_dim).

--structured writes the FFN as it was trained instead, so that transformers runs the factors
(the paper's FFN speed-up) rather than merged matrices:
  config.json             model_type structffn_starcoder2 / structffn_llama, with auto_map to
                          the shipped file, structffn_layers (per layer: fc1/fc2 kind and shape)
  model.safetensors       the architecture's tensors, each FFN projection as its own parameters
                          (model.layers.<i>.mlp.fc1.u, .v, .bias / .w1, .w2 / .kernel)
  modeling_structffn.py   structffn_jax/hf_modeling/: the transformers architecture with its MLP
                          replaced (torch and transformers only)
loaded with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True). A serving engine
needs more: vLLM and TGI accept no trust_remote_code modeling file for their optimized paths;
each would need the model registered in the engine (vLLM: a plugin model class whose MLP runs
the structured projections, ideally with fused kernels, and the weight loader's name mapping;
TGI: a custom model in its server code). Until then, serve the merged export.

`load(DIR)` builds this project's GPT from such a directory: the structured layers from their
factors (identical parameters, identical logits), or with structured=False every FFN dense from
the merged matrices.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from structffn_jax import cli, hf_families, structured
from structffn_jax.model import GPT

WEIGHTS = 'model.safetensors'
FACTORS = 'structured.safetensors'
# Our layer names -> the architecture's, per block, from the families' shared name table.
_NORMS = hf_families.FAMILIES['llama'].norms
assert _NORMS == hf_families.FAMILIES['starcoder2'].norms
_FFN = {arch: {'fc1': hf_families.FAMILIES[arch].fc1, 'fc2': hf_families.FAMILIES[arch].fc2}
        for arch in ('starcoder2', 'llama')}


def _safetensors():
  try:
    from safetensors import numpy as st
  except ImportError as e:
    raise ImportError(f"export needs the safetensors package ({e}): pip install -e '.[export]'.")
  return st


def architecture(cfg) -> str:
  """'starcoder2' or 'llama': the transformers architecture whose forward is this model's."""
  scaling = (cfg.get('rope_scaling') or {}).get('type', 'none')
  unwritten = [f'{field}={value!r}' for field, value, default in (
      ('model.tie_embeddings', cfg.get('tie_embeddings', True), True),
      ('model.qkv_bias', cfg.get('qkv_bias', False), False),
      ('model.rope_scaling.type', scaling, 'none')) if value != default]
  if unwritten:  # features an imported model may have, which the export does not write yet
    raise ValueError(f'export: {", ".join(unwritten)} is not written by the export yet (it '
                     'writes a tied head, biases on all or no projections, and unscaled RoPE); '
                     'export a model without it.')
  key = (cfg.norm, cfg.activation, cfg.position)
  if key == ('layernorm', 'gelu', 'rope'):
    return 'starcoder2'
  if key == ('rmsnorm', 'swiglu', 'rope'):
    return 'llama'
  raise ValueError(f'export: model.norm={cfg.norm!r}, model.activation={cfg.activation!r}, '
                   f'model.position={cfg.position!r} has no transformers architecture with the '
                   "same forward; export supports layernorm+gelu+rope (Starcoder2) and "
                   'rmsnorm+swiglu+rope (Llama).')


def hf_config(cfg, eos_id: int, bos_id: int) -> dict:
  """The transformers config.json of a model section `cfg`."""
  arch = architecture(cfg)
  head_dim = cfg.attn_dim // cfg.num_heads
  common = {
      'vocab_size': cfg.vocab_size, 'hidden_size': cfg.hidden_dim,
      'intermediate_size': cfg.ffn_dim, 'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads, 'num_key_value_heads': cfg.num_kv_heads,
      'head_dim': head_dim, 'max_position_embeddings': cfg.seq_len,
      'rope_theta': float(cfg.rope_base),
      'rope_parameters': {'rope_type': 'default', 'rope_theta': float(cfg.rope_base)},
      'initializer_range': cfg.init_std, 'tie_word_embeddings': True, 'attention_dropout': 0.0,
      'eos_token_id': int(eos_id), 'bos_token_id': int(bos_id if bos_id >= 0 else eos_id),
      'torch_dtype': 'float32', 'dtype': 'float32', 'use_cache': True,
  }
  if arch == 'starcoder2':
    return {'architectures': ['Starcoder2ForCausalLM'], 'model_type': 'starcoder2', **common,
            'hidden_act': 'gelu_pytorch_tanh', 'norm_epsilon': cfg.norm_eps,
            'use_bias': bool(cfg.use_bias), 'sliding_window': None, 'residual_dropout': 0.0,
            'embedding_dropout': 0.0}
  return {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', **common,
          'hidden_act': 'silu', 'rms_norm_eps': cfg.norm_eps,
          'attention_bias': bool(cfg.use_bias), 'mlp_bias': bool(cfg.use_bias),
          'pretraining_tp': 1}


def _blocks(model):
  """Per layer: {our module path: its Param arrays (numpy)} and the FFN layer objects, the
  stacked layers sliced out of the scan's leading axis."""
  first = nnx.to_pure_dict(nnx.state(model.first, nnx.Param))
  out = [(first, {n: getattr(model.first.ffn, n) for n in ('fc1', 'fc2')}, None)]
  if model.stack is not None:
    stack = nnx.to_pure_dict(nnx.state(model.stack, nnx.Param))
    for i in range(model.num_stacked):
      out.append((jax.tree.map(lambda a, i=i: a[i], stack),
                  {n: getattr(model.stack.ffn, n) for n in ('fc1', 'fc2')}, i))
  return out


def _dense(layer, index):
  """The (out, in) matrix a layer applies; of layer `index` of a stacked layer."""
  if isinstance(layer, structured.Dense):
    w = layer.kernel[...]
    return np.asarray(w if index is None else w[index], np.float32)
  if index is None:
    return np.asarray(layer.to_dense(), np.float32)
  graphdef, state = nnx.split(layer)
  return np.asarray(nnx.merge(graphdef, jax.tree.map(lambda a: a[index], state)).to_dense(),
                    np.float32)


def tensors(model) -> tuple[dict, dict]:
  """(architecture tensors, structured factors) of `model`, numpy float32, by HF name."""
  cfg = model.cfg
  if model.has_guide:
    raise ValueError('export: the model still has self-guided guides; export after the '
                     'hand-over (the guides are dropped once alpha reaches 0).')
  arch = architecture(cfg)
  f32 = lambda a: np.ascontiguousarray(np.asarray(a, np.float32))
  weights = {'model.embed_tokens.weight': f32(model.embedding[...])}
  factors = {}
  n, k = cfg.num_heads, cfg.num_kv_heads
  h = cfg.attn_dim // cfg.num_heads
  for layer, (params, ffn, index) in enumerate(_blocks(model)):
    p = f'model.layers.{layer}.'
    for ours, theirs in _NORMS:
      weights[p + theirs + '.weight'] = f32(params[ours]['scale'])
      if arch == 'starcoder2':  # torch LayerNorm always has a bias
        weights[p + theirs + '.bias'] = f32(params[ours].get('bias', np.zeros(cfg.hidden_dim)))
    qkv = params['attn']['qkv']
    cuts = {'q_proj': (0, n * h), 'k_proj': (n * h, (n + k) * h), 'v_proj': ((n + k) * h, None)}
    for name, (lo, hi) in cuts.items():
      weights[p + f'self_attn.{name}.weight'] = f32(qkv['kernel'][lo:hi])
      if 'bias' in qkv:
        weights[p + f'self_attn.{name}.bias'] = f32(qkv['bias'][lo:hi])
    weights[p + 'self_attn.o_proj.weight'] = f32(params['attn']['out']['kernel'])
    if 'bias' in params['attn']['out']:
      weights[p + 'self_attn.o_proj.bias'] = f32(params['attn']['out']['bias'])
    for fc in ('fc1', 'fc2'):
      w, b = _dense(ffn[fc], index), params['ffn'][fc].get('bias')
      names = _FFN[arch][fc]
      if isinstance(names, tuple):  # Llama's gate and up: our fc1's two halves
        parts = zip(names, np.split(w, 2), np.split(b, 2) if b is not None else (None, None))
      else:
        parts = [(names, w, b)]
      for name, w_part, b_part in parts:
        weights[p + name + '.weight'] = f32(w_part)
        if b_part is not None:
          weights[p + name + '.bias'] = f32(b_part)
      if not isinstance(ffn[fc], structured.Dense):
        for factor, value in params['ffn'][fc].items():
          factors[p + f'ffn.{fc}.{factor}'] = f32(value)
  weights['model.norm.weight'] = f32(model.final_norm.scale[...])
  if arch == 'starcoder2':
    bias = getattr(model.final_norm, 'bias', None)
    weights['model.norm.bias'] = f32(bias[...] if bias is not None else np.zeros(cfg.hidden_dim))
  return weights, factors


def _structured_layers(model) -> dict:
  """{'fc1': class name, 'fc2': ...} of the first block and of the stacked ones."""
  kinds = {}
  for where, block in (('first', model.first), ('stack', model.stack)):
    if block is not None:
      kinds[where] = {fc: type(getattr(block.ffn, fc)).__name__ for fc in ('fc1', 'fc2')}
  return kinds


MODELING = 'modeling_structffn.py'  # structffn_jax/hf_modeling/, shipped by a structured export
_KINDS = {'Dense': 'dense', 'LowRank': 'lowrank', 'BlockDense': 'blockdense',
          'BlockShuffle': 'blockshuffle'}


def structured_tensors(model) -> tuple[dict, list]:
  """(tensors, FFN layer specs) of a structured export: the architecture's tensors less the
  merged FFN matrices, each FFN projection as its own parameters (kernel / u, v / w1, w2; bias)
  under model.layers.<i>.mlp.fc1.<name>, and per layer {'fc1': {'kind', 'in', 'out', 'rank'?,
  'blocks'?}, 'fc2': ...} for hf_modeling/modeling_structffn.py."""
  weights, _ = tensors(model)
  weights = {k: v for k, v in weights.items() if '.mlp.' not in k}
  specs = []
  for layer, (params, ffn, _) in enumerate(_blocks(model)):
    spec = {}
    for fc in ('fc1', 'fc2'):
      obj = ffn[fc]
      spec[fc] = {'kind': _KINDS[type(obj).__name__], 'in': int(obj.in_features),
                  'out': int(obj.out_features)}
      spec[fc].update({a: int(getattr(obj, a)) for a in ('rank', 'blocks') if hasattr(obj, a)})
      for name, value in params['ffn'][fc].items():
        weights[f'model.layers.{layer}.mlp.{fc}.{name}'] = np.ascontiguousarray(
            np.asarray(value, np.float32))
    specs.append(spec)
  return weights, specs


def structured_config(cfg, eos_id: int, specs: list) -> dict:
  """config.json of a structured export: the architecture's, as a custom model type whose
  classes (auto_map) are in the shipped modeling_structffn.py."""
  config = hf_config(cfg, eos_id, eos_id)
  name = {'starcoder2': 'Starcoder2', 'llama': 'Llama'}[architecture(cfg)]
  module = MODELING[:-len('.py')]
  config.update({
      'architectures': [f'StructFFN{name}ForCausalLM'],
      'model_type': f'structffn_{config["model_type"]}',
      'auto_map': {'AutoConfig': f'{module}.StructFFN{name}Config',
                   'AutoModelForCausalLM': f'{module}.StructFFN{name}ForCausalLM'},
      'structffn_layers': specs, 'structffn_bias': bool(cfg.use_bias),
      'structffn_activation': 'swiglu' if cfg.activation == 'swiglu' else 'gelu'})
  return config


def _write_tokenizer(tokenizer_path, out: pathlib.Path, eos_id: int, seq_len: int):
  """tokenizer.json (hf_tokenizer: the encoding training used, no token added), the run's
  SentencePiece tokenizer.model where it has one, and a tokenizer_config.json whose BOS is the
  EOS: the token before every training document, so that a harness that puts the BOS before a
  text (lm-eval's prefix token) gives the model what training gave it."""
  import tokenizers

  from structffn_jax import hf_tokenizer
  tokenizer_path = pathlib.Path(tokenizer_path)
  for stale in ('tokenizer.json', 'tokenizer.model'):  # of an earlier export into `out`
    (out / stale).unlink(missing_ok=True)
  hf_tokenizer.write(tokenizer_path, out / 'tokenizer.json')
  if tokenizer_path.suffix != '.json':
    shutil.copyfile(tokenizer_path, out / 'tokenizer.model')
  eos = tokenizers.Tokenizer.from_file(str(out / 'tokenizer.json')).id_to_token(eos_id)
  special = {'bos_token': eos, 'eos_token': eos}
  config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'add_bos_token': False,
            'add_eos_token': False, 'add_prefix_space': False,
            'clean_up_tokenization_spaces': False, 'model_max_length': seq_len, **special}
  (out / 'tokenizer_config.json').write_text(json.dumps(config, indent=1) + '\n')
  (out / 'special_tokens_map.json').write_text(json.dumps(special, indent=1) + '\n')


def export_model(model, out, *, eos_id: int, tokenizer_path=None,
                 info: dict | None = None, structured: bool = False) -> pathlib.Path:
  """Write `model` (a GPT without guides) as a Hugging Face directory `out`; returns it.

  eos_id: the token that ends (and so precedes) every training document; it is declared as both
  the EOS and the BOS, since no other token ever started a text in training.
  """
  st = _safetensors()
  out = pathlib.Path(out)
  if structured:
    (weights, specs), factors = structured_tensors(model), {}
  else:
    weights, factors = tensors(model)
  out.mkdir(parents=True, exist_ok=True)
  meta = {'format': 'pt'}  # what transformers expects of a safetensors file
  st.save_file(weights, str(out / WEIGHTS), metadata=meta)
  for stale in (FACTORS, MODELING):
    (out / stale).unlink(missing_ok=True)
  if factors:
    st.save_file(factors, str(out / FACTORS), metadata=meta)
  if structured:
    config = structured_config(model.cfg, eos_id, specs)
    shutil.copyfile(pathlib.Path(__file__).parent / 'hf_modeling' / MODELING, out / MODELING)
  else:
    config = hf_config(model.cfg, eos_id, eos_id)
  config['structffn'] = {**(info or {}), 'model': model.cfg.to_dict(),
                         'layers': _structured_layers(model),
                         'factors': FACTORS if factors else None,
                         'format': 'structured' if structured else 'merged'}
  (out / 'config.json').write_text(json.dumps(config, indent=1) + '\n')
  if tokenizer_path is not None:
    _write_tokenizer(tokenizer_path, out, eos_id, model.cfg.seq_len)
  return out


def export_run(workdir, out, mesh: str | None = None, structured: bool = False) -> pathlib.Path:
  """Export the newest checkpoint of a training workdir (see the module docstring)."""
  from structffn_jax import decoding

  config, model, alpha, manifest = decoding.load(workdir, merge_threshold=0, mesh=mesh)
  if alpha is not None:
    raise ValueError(f'export: the run is still self-guided (alpha={float(alpha):.3f}); export '
                     'a checkpoint from after the hand-over.')
  model.drop_guides()
  from structffn_jax import checkpoint
  ckpt = checkpoint.Checkpointer(pathlib.Path(workdir), keep=config.train.keep_ckpts)
  step = ckpt.latest_step()
  ckpt.close()
  info = {'name': config.name, 'step': int(step), 'workdir': str(pathlib.Path(workdir).resolve())}
  return export_model(model, out, eos_id=manifest.eos_id, tokenizer_path=manifest.tokenizer_path,
                      info=info, structured=structured)


# ----------------------------------------------------------------------------- reading back


def load(path, *, structured_layers: bool = True, dtype: str | None = None) -> GPT:
  """This project's GPT from an exported directory.

  structured_layers: the FFN layers as exported, from their factors (identical parameters); with
  False every FFN is a dense layer holding the merged matrix (the transformers model's weights).
  dtype: the compute dtype (default: the exported model section's).
  """
  st = _safetensors()
  path = pathlib.Path(path)
  if not (path / 'config.json').is_file() or not (path / WEIGHTS).is_file():
    raise FileNotFoundError(f'{path}: no config.json and {WEIGHTS}; not an exported model '
                            'directory (python -m structffn_jax.export --workdir RUN --out DIR).')
  config = json.loads((path / 'config.json').read_text())
  if 'structffn' not in config:
    raise ValueError(f'{path / "config.json"} has no "structffn" section: it was not written by '
                     'structffn_jax.export.')
  cfg = ml_collections.ConfigDict(config['structffn']['model'])
  if dtype:
    cfg.dtype = dtype
  fmt = config['structffn'].get('format', 'merged')
  if fmt == 'structured' and not structured_layers:
    raise ValueError(f'{path} is a structured export (--structured): it holds no merged FFN '
                     'matrices; load it with structured_layers=True.')
  if not structured_layers:
    cfg.ffn.method = 'dense'
  arch = architecture(cfg)
  weights = st.load_file(str(path / WEIGHTS))
  factors = {}
  if structured_layers and config['structffn'].get('factors'):
    factors = st.load_file(str(path / config['structffn']['factors']))
  model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
  per_layer = []
  for layer in range(cfg.num_layers):
    p = f'model.layers.{layer}.'
    ours = {}
    for mine, theirs in _NORMS:
      ours[(mine, 'scale')] = weights[p + theirs + '.weight']
      ours[(mine, 'bias')] = weights.get(p + theirs + '.bias')
    qkv = [weights[p + f'self_attn.{n}_proj.weight'] for n in 'qkv']
    ours[('attn', 'qkv', 'kernel')] = np.concatenate(qkv)
    if p + 'self_attn.q_proj.bias' in weights:
      ours[('attn', 'qkv', 'bias')] = np.concatenate(
          [weights[p + f'self_attn.{n}_proj.bias'] for n in 'qkv'])
    ours[('attn', 'out', 'kernel')] = weights[p + 'self_attn.o_proj.weight']
    ours[('attn', 'out', 'bias')] = weights.get(p + 'self_attn.o_proj.bias')
    for fc in ('fc1', 'fc2'):
      if fmt == 'structured':  # the layer's own parameters, under mlp.<fc>.<name>
        prefix = p + f'mlp.{fc}.'
        ours.update({('ffn', fc, k[len(prefix):]): v for k, v in weights.items()
                     if k.startswith(prefix)})
        continue
      names = _FFN[arch][fc]
      names = names if isinstance(names, tuple) else (names,)
      ours[('ffn', fc, 'kernel')] = np.concatenate([weights[p + n + '.weight'] for n in names])
      if p + names[0] + '.bias' in weights:
        ours[('ffn', fc, 'bias')] = np.concatenate([weights[p + n + '.bias'] for n in names])
      prefix = p + f'ffn.{fc}.'
      for name, value in factors.items():
        if name.startswith(prefix):
          ours[('ffn', fc, name[len(prefix):])] = value
    per_layer.append(ours)
  found = {('embedding',): weights['model.embed_tokens.weight'],
           ('final_norm', 'scale'): weights['model.norm.weight'],
           ('final_norm', 'bias'): weights.get('model.norm.bias')}
  for block_path, variable in nnx.iter_graph(model):
    if not isinstance(variable, nnx.Param):
      continue
    block_path = tuple(str(x) for x in block_path)
    if block_path[0] == 'first':
      value = per_layer[0].get(block_path[1:])
    elif block_path[0] == 'stack':
      parts = [per_layer[i].get(block_path[1:]) for i in range(1, cfg.num_layers)]
      value = None if any(v is None for v in parts) else np.stack(parts)
    else:
      value = found.get(block_path)
    if value is None or tuple(value.shape) != tuple(variable.shape):
      raise ValueError(f'{path}: no tensor of shape {tuple(variable.shape)} for '
                       f'{"/".join(block_path)} in the exported files.')
    variable.set_value(jnp.asarray(value, jnp.float32))
  return model


def verify(out, *, seq: int = 64, batch: int = 2, seed: int = 0) -> dict:
  """Load the exported directory `out` with transformers (torch, float32) and compare its logits
  with this project's model read back from `out` (float32 compute) on random tokens; also its
  tokenizer's encoding of a sample text with ours. Needs torch and transformers, which this
  project does not install: a check to run by hand."""
  try:
    import torch
    import transformers
  except ImportError as e:
    raise ImportError(f'--verify needs torch and transformers ({e}); install them in a separate '
                      'environment (CPU torch is enough).') from None
  model = load(out, dtype='float32')
  seq = min(seq, model.cfg.seq_len)
  tokens = np.random.default_rng(seed).integers(0, model.cfg.vocab_size, (batch, seq))
  ours = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens, jnp.int32)),
                    np.float64)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, trust_remote_code=(pathlib.Path(out) / MODELING).is_file()).eval()
  with torch.no_grad():
    theirs = hf(torch.tensor(tokens, dtype=torch.long)).logits.double().numpy()
  result = {'architecture': type(hf).__name__, 'tokens': list(tokens.shape),
            'max_abs_logit': float(np.abs(ours).max()),
            'max_abs_diff': float(np.abs(ours - theirs).max()),
            'transformers': transformers.__version__, 'torch': torch.__version__}
  out = pathlib.Path(out)
  if (out / 'tokenizer.json').is_file():
    from structffn_jax.data import tokenizer as tokenizer_lib
    text = 'The game was released in 1996 , and it sold  well .\n= = Reception = =\n'
    mine = out / 'tokenizer.model' if (out / 'tokenizer.model').is_file() else \
        out / 'tokenizer.json'
    tok = transformers.AutoTokenizer.from_pretrained(
        out, trust_remote_code=(out / MODELING).is_file())
    result['tokenizer'] = type(tok).__name__
    result['tokenizer_equal'] = (tok.encode(text) == tokenizer_lib.load(mine).encode(text))
    result['bos_is_eos'] = tok.bos_token_id == tok.eos_token_id == hf.config.eos_token_id
  return result


def main(argv=None):
  parser = cli.parser(__doc__)
  parser.add_argument('--workdir', required=True, help='a training workdir')
  parser.add_argument('--out', required=True, help='the Hugging Face directory to write')
  parser.add_argument('--mesh', default=None, metavar='D,F,T',
                      help="mesh sizes (data, fsdp, tensor) to restore onto, e.g. 1,1,1")
  parser.add_argument('--structured', action='store_true',
                      help='FFN as its factors, a custom architecture (trust_remote_code)')
  parser.add_argument('--verify', action='store_true',
                      help='then compare logits with transformers (needs torch; by hand)')
  args = parser.parse_args(argv)
  try:
    out = export_run(args.workdir, args.out, args.mesh, structured=args.structured)
    config = json.loads((out / 'config.json').read_text())
    files = sorted(p.name for p in out.iterdir())
    print(f'{config["architectures"][0]} of {config["structffn"]["name"]} step '
          f'{config["structffn"]["step"]} -> {out}: {", ".join(files)}')
    if args.verify:
      print(json.dumps(verify(out)))
  except (FileNotFoundError, ValueError, ImportError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  main()
