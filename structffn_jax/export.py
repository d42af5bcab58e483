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

The architecture is an existing `transformers` one whose forward is this model's, written
through the family's parameter-name table (structffn_jax/hf_families.py, the one `convert` reads
a checkpoint with):
  - a model imported from a Hugging Face checkpoint (`model.hf_family`): its own family, Llama,
    Mistral, Qwen2 or Starcoder2, with what the import carried: an untied head (lm_head.weight),
    q/k/v biases, rope_theta and rope_scaling (linear, llama3; written as rope_scaling and as
    transformers 5's rope_parameters), the kv heads, the norm epsilon, the activation. A dense
    export of an unchanged import holds the source's tensors bit for bit.
  - otherwise, layernorm + GELU(tanh) + RoPE (the paper's model): Starcoder2. Pre-LN blocks with
    LayerNorm, biases on every projection (`use_bias`), RoPE rotate-half over the whole head,
    grouped-query attention with its own head_dim, an fc1 -> gelu_pytorch_tanh -> fc2 MLP.
    GPT-NeoX would need its parallel residual off; Phi and StableLM apply RoPE to part of the
    head. rmsnorm + SwiGLU + RoPE: Llama (attention_bias and mlp_bias = use_bias), or Qwen2 with
    biases on q/k/v only (`qkv_bias`).
The family's config.json is read back as the import reads it, and a model.* field it would not
give back is refused in one line naming the field and its value, before anything is written
(Mistral and Qwen2 with biases on every projection, Llama and Starcoder2 with q/k/v-only biases,
a family whose norm or activation is not the model's). Learned absolute positions (GPT-2),
layernorm with SwiGLU and rmsnorm with GELU are refused too. Our fused QKV projection is split
into q_proj, k_proj and v_proj, head-major as our reshape reads it. config.json gives
`head_dim` (attn_dim / num_heads), which transformers reads for these architectures (checked
with 5.24; a version that ignores it loads only models with attn_dim == hidden_dim);
max_position_embeddings is the run's model.seq_len.

A run converted from a checkpoint and not trained yet (no prepared data) exports with its
data.tokenizer (the source's tokenizer.json) and the EOS preparation would append.

--structured writes the FFN as it was trained instead, so that transformers runs the factors
(the paper's FFN speed-up) rather than merged matrices:
  config.json             model_type structffn_<family> (starcoder2, llama, mistral, qwen2),
                          with auto_map to
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
import numpy as np
from flax import nnx

from structffn_jax import cli, hf_families, schema, structured
from structffn_jax.model import GPT

WEIGHTS = 'model.safetensors'
FACTORS = 'structured.safetensors'


def _safetensors():
  try:
    from safetensors import numpy as st
  except ImportError as e:
    raise ImportError(f"export needs the safetensors package ({e}): pip install -e '.[export]'.")
  return st


def architecture(cfg) -> str:
  """The transformers family whose forward is this model's (hf_families.FAMILIES): the one an
  imported model came from (model.hf_family), else Starcoder2 for layernorm + gelu + rope and
  Llama (Qwen2 with q/k/v-only biases) for rmsnorm + swiglu + rope. A model section the family's
  config.json cannot carry is refused naming the field (`hf_families.check_fields`)."""
  name = cfg.get('hf_family') or ''
  if cfg.position != 'rope':
    raise ValueError(f'export: model.position={cfg.position!r} has no transformers architecture '
                     'written by the export; it writes RoPE models as Starcoder2, Llama, '
                     'Mistral or Qwen2.')
  if not name:
    key = (cfg.norm, cfg.activation)
    if key == ('layernorm', 'gelu'):
      name = 'starcoder2'
    elif key == ('rmsnorm', 'swiglu'):
      name = 'qwen2' if cfg.get('qkv_bias') and not cfg.use_bias else 'llama'
    else:
      raise ValueError(f'export: model.norm={cfg.norm!r}, model.activation={cfg.activation!r}, '
                       f'model.position={cfg.position!r} has no transformers architecture with '
                       'the same forward; export supports layernorm+gelu+rope (Starcoder2) and '
                       'rmsnorm+swiglu+rope (Llama, Mistral, Qwen2).')
  fam = hf_families.FAMILIES[name]
  hf_families.check_fields(fam, cfg, hf_families.config_fields(fam, cfg))
  return name


def hf_config(cfg, eos_id: int, bos_id: int) -> dict:
  """The transformers config.json of a model section `cfg`."""
  fam = hf_families.FAMILIES[architecture(cfg)]
  return {**hf_families.config_fields(fam, cfg),
          'initializer_range': cfg.init_std, 'attention_dropout': 0.0,
          'eos_token_id': int(eos_id), 'bos_token_id': int(bos_id if bos_id >= 0 else eos_id),
          'torch_dtype': 'float32', 'dtype': 'float32', 'use_cache': True}


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


def _ours(params: dict) -> dict:
  """A nested {module: {leaf: array}} as {(module, ..., leaf): array}."""
  out = {}
  for key, value in params.items():
    if isinstance(value, dict):
      out.update({(key,) + k: v for k, v in _ours(value).items()})
    else:
      out[(key,)] = value
  return out


def tensors(model, ffn: bool = True) -> tuple[dict, dict]:
  """(architecture tensors, structured factors) of `model`, numpy float32, by HF name, written
  through the family's name table (hf_families.write_layer); ffn=False: without the FFN."""
  cfg = model.cfg
  if model.has_guide:
    raise ValueError('export: the model still has self-guided guides; export after the '
                     'hand-over (the guides are dropped once alpha reaches 0).')
  fam = hf_families.FAMILIES[architecture(cfg)]
  f32 = lambda a: np.ascontiguousarray(np.asarray(a, np.float32))
  weights, factors = {}, {}
  for layer, (params, ffn_layers, index) in enumerate(_blocks(model)):
    ours = {k: v for k, v in _ours(params).items() if k[0] != 'ffn' or k[-1] == 'bias'}
    for fc in ('fc1', 'fc2'):
      if ffn:
        ours[('ffn', fc, 'kernel')] = _dense(ffn_layers[fc], index)
      if not isinstance(ffn_layers[fc], structured.Dense):
        for factor, value in params['ffn'][fc].items():
          factors[fam.prefix + fam.block.format(layer) + f'ffn.{fc}.{factor}'] = f32(value)
    weights.update(hf_families.write_layer(fam, ours, layer, cfg, ffn=ffn))
  outside = {('embedding',): model.embedding[...], ('final_norm', 'scale'):
             model.final_norm.scale[...]}
  if getattr(model.final_norm, 'bias', None) is not None:
    outside[('final_norm', 'bias')] = model.final_norm.bias[...]
  if model.head is not None:
    outside[('head',)] = model.head[...]
  weights.update(hf_families.write_outside(fam, outside, cfg))
  if ffn:  # every tensor of the architecture, no other, each of its shape
    want = hf_families.expected(fam, cfg)
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if got != {k: tuple(v) for k, v in want.items()}:
      extra = sorted(set(got) ^ set(want)) or [k for k in got if got[k] != tuple(want[k])]
      raise ValueError(f'export: the {fam.architecture} tensors written disagree with its '
                       f'names and shapes at {extra[0]}.')
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
  weights, _ = tensors(model, ffn=False)
  fam = hf_families.FAMILIES[architecture(model.cfg)]
  specs = []
  for layer, (params, ffn, _) in enumerate(_blocks(model)):
    spec = {}
    for fc in ('fc1', 'fc2'):
      obj = ffn[fc]
      spec[fc] = {'kind': _KINDS[type(obj).__name__], 'in': int(obj.in_features),
                  'out': int(obj.out_features)}
      spec[fc].update({a: int(getattr(obj, a)) for a in ('rank', 'blocks') if hasattr(obj, a)})
      for name, value in params['ffn'][fc].items():
        weights[fam.prefix + fam.block.format(layer) + f'mlp.{fc}.{name}'] = (
            np.ascontiguousarray(np.asarray(value, np.float32)))
    specs.append(spec)
  return weights, specs


def structured_config(cfg, eos_id: int, specs: list) -> dict:
  """config.json of a structured export: the architecture's, as a custom model type whose
  classes (auto_map) are in the shipped modeling_structffn.py."""
  config = hf_config(cfg, eos_id, eos_id)
  name = config['architectures'][0][:-len('ForCausalLM')]  # Llama, Mistral, Qwen2, Starcoder2
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


def _run_tokens(config, workdir) -> tuple[int, pathlib.Path]:
  """(eos_id, tokenizer file) of a run: its prepared data's manifest, or, before the data is
  prepared (a converted run not trained yet), the data.tokenizer it will prepare with and the
  EOS that preparation appends (data.eos_token, or the tokenizer's usual one)."""
  from structffn_jax.data import manifest as manifest_lib
  from structffn_jax.data import tokenizer as tokenizer_lib
  data_dir = manifest_lib.resolve_data_dir(config.data, workdir)
  tokenizer = config.data.tokenizer
  if not (data_dir / manifest_lib.MANIFEST_NAME).is_file() and tokenizer \
      and tokenizer != manifest_lib.REQUIRED and pathlib.Path(tokenizer).is_file():
    tok = tokenizer_lib.load(tokenizer, eos_token=config.data.eos_token)
    return int(tok.eos_id), pathlib.Path(tokenizer)
  manifest = manifest_lib.Manifest.load(data_dir)
  return manifest.eos_id, manifest.tokenizer_path


def export_run(workdir, out, mesh: str | None = None, structured: bool = False) -> pathlib.Path:
  """Export the newest checkpoint of a training workdir (see the module docstring)."""
  from structffn_jax import run as run_lib, sgt
  run = run_lib.load_run(workdir, mesh)
  config, model = run.config, run.model
  if model.has_guide:
    alpha = sgt.alpha_of(run.opt_state)
    if alpha is not None and float(alpha) != 0.0:
      raise ValueError(f'export: the run is still self-guided (alpha={float(alpha):.3f}); '
                       'export a checkpoint from after the hand-over.')
    model.drop_guides()
  eos_id, tokenizer_path = _run_tokens(config, workdir)
  info = {'name': config.name, 'step': int(run.meta['step']),
          'workdir': str(pathlib.Path(workdir).resolve())}
  return export_model(model, out, eos_id=eos_id, tokenizer_path=tokenizer_path, info=info,
                      structured=structured)


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
  cfg = schema.from_dict({'model': config['structffn']['model']}).model  # over the defaults
  if dtype:
    cfg.dtype = dtype
  fmt = config['structffn'].get('format', 'merged')
  if fmt == 'structured' and not structured_layers:
    raise ValueError(f'{path} is a structured export (--structured): it holds no merged FFN '
                     'matrices; load it with structured_layers=True.')
  if not structured_layers:
    cfg.ffn.method = 'dense'
  fam = hf_families.FAMILIES[architecture(cfg)]
  weights = st.load_file(str(path / WEIGHTS))
  factors = {}
  if structured_layers and config['structffn'].get('factors'):
    factors = st.load_file(str(path / config['structffn']['factors']))
  model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
  per_layer = []
  for layer in range(cfg.num_layers):
    ours = hf_families.read_layer(fam, weights.get, layer, cfg, ffn=fmt != 'structured')
    p = fam.prefix + fam.block.format(layer)
    # a structured export: each projection's own parameters under mlp.<fc>.<name>; a merged
    # one: the structured layers' factors beside the merged matrices, under ffn.<fc>.<name>
    for prefix, tensors_ in ((p + 'mlp.', weights if fmt == 'structured' else {}),
                             (p + 'ffn.', factors)):
      for name, value in tensors_.items():
        if name.startswith(prefix):
          fc, leaf = name[len(prefix):].split('.')
          ours[('ffn', fc, leaf)] = value
    per_layer.append(ours)
  found = hf_families.read_outside(fam, weights.get, cfg)
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
