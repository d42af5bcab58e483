"""Conversion: imported logits against `transformers`, and the time to convert large shapes.

  # 1. In a separate venv with torch + transformers (this project does not install them):
  python -m structffn_jax.bench.convert --part write --dir /tmp/hf_families
  # 2. Here: convert each written model, compare its logits with transformers' (float32, CPU).
  python -m structffn_jax.bench.convert --part compare --dir /tmp/hf_families \\
      --out bench_results/convert_vs_transformers.json
  # 3. Here: conversion time of random dense checkpoints of a given shape.
  python -m structffn_jax.bench.convert --part time --shape xl --method lowrank \\
      --out bench_results/convert_time_xl.json

--part write builds a small random model of each family with transformers' own classes
(LlamaForCausalLM with Llama 3 RoPE scaling and GQA, Mistral, Qwen2, Starcoder2, GPT-2),
saves it (safetensors) with a word-level tokenizer.json, and stores its logits on fixed tokens.
--part compare converts each with ffn.method=dense (model.dtype=float32) and reports max |Δlogit|.
--part time writes a random checkpoint of the shape (Transformer-xl: Starcoder2 layout, width 2048,
FFN 8192, 24 layers; llama-1b: Llama 3.2 1B's shape) and times `convert` with the structure given.
"""

from __future__ import annotations

import json
import pathlib
import platform
import sys
import time

import numpy as np

FAMILIES = {  # small configs, transformers field names
    'llama': dict(model_type='llama', vocab_size=128, hidden_size=64, intermediate_size=160,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rope_theta=500000.0, tie_word_embeddings=False,
                  rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                                'high_freq_factor': 4.0, 'original_max_position_embeddings': 32}),
    'mistral': dict(model_type='mistral', vocab_size=128, hidden_size=64, intermediate_size=160,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=256, sliding_window=None, head_dim=16),
    'qwen2': dict(model_type='qwen2', vocab_size=128, hidden_size=64, intermediate_size=160,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, tie_word_embeddings=False),
    'starcoder2': dict(model_type='starcoder2', vocab_size=128, hidden_size=64,
                       intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256, sliding_window=None,
                       use_bias=True),
    'gpt2': dict(model_type='gpt2', vocab_size=128, n_embd=64, n_layer=3, n_head=4,
                 n_positions=256),
}
SHAPES = {  # name: (model_type, hidden, ffn, layers, heads, kv heads, vocab)
    'xl': ('starcoder2', 2048, 8192, 24, 16, 16, 32000),
    'llama-1b': ('llama', 2048, 8192, 16, 32, 8, 128256),
}


def _tokenizer(file, vocab_size):
  import tokenizers
  from tokenizers import models, pre_tokenizers
  vocab = {'<unk>': 0, '<eos>': 1, **{f'w{i}': i for i in range(2, vocab_size)}}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(file))


def write(root: pathlib.Path, seed: int = 0):
  """Each family built and saved by transformers, with its float32 logits on fixed tokens."""
  import torch
  import transformers
  root.mkdir(parents=True, exist_ok=True)
  tokens = np.random.default_rng(seed).integers(0, 128, (2, 48))
  for name, fields in FAMILIES.items():
    torch.manual_seed(seed)
    fields = dict(fields)
    config = transformers.AutoConfig.for_model(fields.pop('model_type'), **fields,
                                               initializer_range=0.1)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms away from 1, biases away from 0: every tensor matters
      for pname, p in model.named_parameters():
        if p.ndim == 1:
          p.add_(0.2 * torch.randn_like(p))
      logits = model(torch.tensor(tokens)).logits.double().numpy()
    out = root / name
    model.save_pretrained(out, safe_serialization=True)
    _tokenizer(out / 'tokenizer.json', 128)
    np.save(out / 'logits.npy', logits)
    np.save(out / 'tokens.npy', tokens)
    print(f'{name}: {type(model).__name__} -> {out} (max |logit| {np.abs(logits).max():.2f})')
  (root / 'versions.json').write_text(json.dumps(
      {'torch': torch.__version__, 'transformers': transformers.__version__}))


def compare(root: pathlib.Path, out):
  import jax.numpy as jnp
  from structffn_jax import conversion as convert, run as run_lib
  rows = []
  for name in FAMILIES:
    src = root / name
    new = root / f'{name}.converted'
    convert.convert(src, 'configs/tiny.py:method=lowrank', new,
                    ('model.dtype=float32', 'model.ffn.method=dense'), 'projection',
                    overwrite=True, log=lambda _: None)
    r = run_lib.load_run(new, mesh='1,1,1')
    tokens = np.load(src / 'tokens.npy')
    ours = np.asarray(r.model(jnp.asarray(tokens, jnp.int32)), np.float64)
    theirs = np.load(src / 'logits.npy')
    rows.append({'family': name, 'tokens': list(tokens.shape),
                 'max_abs_logit': float(np.abs(theirs).max()),
                 'max_abs_diff': float(np.abs(ours - theirs).max())})
    print(f'{name:11s} max |logit| {rows[-1]["max_abs_logit"]:7.3f}   max |Δlogit| '
          f'{rows[-1]["max_abs_diff"]:.2e}')
  versions = json.loads((root / 'versions.json').read_text())
  _write(out, {'part': 'compare', 'rows': rows, **versions})


def time_shape(shape: str, method: str, rank: int, blocks: int, mode: str, root: pathlib.Path,
               out, layers: int = 0):
  """A random checkpoint of `shape` (bfloat16 on disk), converted and timed; `layers` > 0:
  only that many of its blocks (a machine without the memory for the whole train state)."""
  import ml_dtypes
  from safetensors.numpy import save_file
  from structffn_jax import conversion as convert, hf_families
  model_type, d, f, full_layers, heads, kv, vocab = SHAPES[shape]
  layers = layers or full_layers
  src = root / f'{shape}-{layers}-src'
  if not (src / 'config.json').is_file():
    src.mkdir(parents=True, exist_ok=True)
    hf = dict(model_type=model_type, vocab_size=vocab, hidden_size=d, intermediate_size=f,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
              max_position_embeddings=2048, head_dim=d // heads)
    hf.update(hidden_act='silu', tie_word_embeddings=True) if model_type == 'llama' else \
        hf.update(hidden_act='gelu_pytorch_tanh', use_bias=True, sliding_window=None)
    (src / 'config.json').write_text(json.dumps(hf))
    fam = hf_families.FAMILIES[model_type]
    cfg = _section(hf_families.model_fields(fam, hf, 'config.json'))
    rng = np.random.default_rng(0)
    weight_map = {}
    names = list(hf_families.expected(fam, cfg).items())
    per = max(1, len(names) // 8)
    for s in range(0, len(names), per):  # shards of a few layers, like a hub checkpoint
      file = f'model-{s // per:05d}.safetensors'
      part = {n: (0.02 * rng.standard_normal(sh, dtype=np.float32)).astype(ml_dtypes.bfloat16)
              for n, sh in names[s:s + per]}
      save_file(part, str(src / file), metadata={'format': 'pt'})
      weight_map.update({n: file for n in part})
    (src / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
    _tokenizer(src / 'tokenizer.json', 1000)
  sets = (f'model.ffn.method={method}', f'model.ffn.rank={rank}', f'model.ffn.blocks={blocks}',
          'model.seq_len=1024')
  start = time.perf_counter()
  record = convert.convert(src, 'configs/tiny.py:method=lowrank', root / f'{shape}-new', sets,
                           mode, overwrite=True)
  import shutil
  shutil.rmtree(root / f'{shape}-new')
  total = time.perf_counter() - start
  per_layer = [e['seconds'] for e in record['layers']]
  result = {'part': 'time', 'shape': shape, 'method': method, 'rank': rank, 'blocks': blocks,
            'mode': mode, 'seconds_total': total, 'full_layers': full_layers, 'seconds_per_structured_layer':
            float(np.median(per_layer[1:])), 'layers': len(per_layer),
            'mean_relative_error_fc1': float(np.mean([e['fc1']['relative_error']
                                                      for e in record['layers'][1:]]))}
  print(json.dumps(result))
  _write(out, result)


def _section(fields):
  import ml_collections
  fields = dict(fields)
  fields.pop('max_positions')
  fields.pop('sliding_window')
  return ml_collections.ConfigDict(fields)


def _write(out, result):
  if not out:
    return
  import jax
  result.update(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), host=platform.node(),
                command=' '.join(sys.argv))
  pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(out).write_text(json.dumps(result, indent=1) + '\n')


def main(argv=None):
  from structffn_jax import cli
  p = cli.parser(__doc__)
  p.add_argument('--part', choices=('write', 'compare', 'time'), required=True,
                 help='write (torch venv), compare or time (see above)')
  p.add_argument('--dir', default='/tmp/structffn_convert_bench',
                 help='where the models and checkpoints go')
  p.add_argument('--shape', choices=tuple(SHAPES), default='xl', help='--part time: the shape')
  p.add_argument('--method', default='lowrank', help='--part time: model.ffn.method')
  p.add_argument('--rank', type=cli.integer(1), default=512, help='--part time: model.ffn.rank')
  p.add_argument('--blocks', type=cli.integer(1), default=1, help='--part time: model.ffn.blocks')
  p.add_argument('--mode', default='guided', help='--part time: the hand-over mode')
  p.add_argument('--layers', type=cli.integer(0), default=0, help='convert only this many blocks')
  p.add_argument('--out', default='', help='the JSON file to write')
  a = p.parse_args(argv)
  root = pathlib.Path(a.dir)
  if a.part == 'write':
    write(root)
  elif a.part == 'compare':
    compare(root, a.out)
  else:
    time_shape(a.shape, a.method, a.rank, a.blocks, a.mode, root, a.out, a.layers)


if __name__ == '__main__':
  main()
