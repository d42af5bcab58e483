"""CPU throughput in transformers: the structured export (--structured, the FFN as its factors,
trust_remote_code) against the merged export (the FFN as dense matrices) of the same model.

  python -m structffn_jax.bench.hf_export --config configs/structured_ffn.py:model=s,method=lowrank,fraction=32

Needs torch and transformers (a separate environment; CPU torch is enough). Random parameters
(Gaussian, std 0.02) of the config's model, float32. Both directories are written by
structffn_jax.export, loaded with AutoModelForCausalLM, and timed interleaved in this process:
a forward over (batch, seq) tokens (prefill) and greedy generation of --new tokens after a
--prompt-token prompt with the KV cache (decode). Also the largest |Δlogit| between the two
exports and this project's own forward. Prints a table and writes --out (JSON).
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys
import tempfile
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

from structffn_jax import cli, export
from structffn_jax import config as config_lib
from structffn_jax.model import GPT


def random_model(cfg, seed: int = 0):
  model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(seed)))
  rng = np.random.default_rng(seed)
  for _, v in nnx.iter_graph(model):
    if isinstance(v, nnx.Param):
      v.set_value(jnp.asarray(0.02 * rng.standard_normal(v.shape), jnp.float32))
  return model


def main(argv=None):
  parser = cli.parser(__doc__, 'structffn_jax.bench.hf_export')
  parser.add_argument('--config', required=True, help='FILE:ARG of the model to export')
  parser.add_argument('--batch', type=cli.integer(1), default=4, help='prefill batch (default: 4)')
  parser.add_argument('--seq', type=cli.integer(1), default=256,
                      help='prefill length (default: 256)')
  parser.add_argument('--prompt', type=cli.integer(1), default=32,
                      help='prompt tokens before decoding')
  parser.add_argument('--new', type=cli.integer(1), default=32, help='tokens generated')
  parser.add_argument('--repeats', type=cli.integer(1), default=5,
                      help='timed runs (median; default: 5)')
  parser.add_argument('--threads', type=cli.integer(1), default=2,
                      help='torch threads (default: 2)')
  parser.add_argument('--out', default='bench_results/hf_export.json', help='the JSON written')
  args = parser.parse_args(argv)
  try:
    import torch
    import transformers
  except ImportError as e:
    sys.exit(f'error: this benchmark needs torch and transformers ({e}); install them in a '
             'separate environment.')
  torch.set_num_threads(args.threads)
  config = config_lib.load(args.config, ('model.dtype=float32', 'model.ffn.init=gaussian'))
  cfg = config.model
  model = random_model(cfg)
  root = pathlib.Path(tempfile.mkdtemp())
  dirs = {'merged': export.export_model(model, root / 'merged', eos_id=0),
          'structured': export.export_model(model, root / 'structured', eos_id=0,
                                            structured=True)}
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (args.batch, args.seq))
  ours = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens, jnp.int32)), np.float64)
  hf = {k: transformers.AutoModelForCausalLM.from_pretrained(
      d, dtype=torch.float32, trust_remote_code=(k == 'structured')).eval()
        for k, d in dirs.items()}
  x = torch.tensor(tokens, dtype=torch.long)
  prompt = x[:1, :args.prompt]
  times = {k: {'prefill': [], 'decode': []} for k in hf}
  diffs = {}
  with torch.no_grad():
    for k, m in hf.items():  # warm-up, and the logits
      diffs[k] = float(np.abs(m(x).logits.double().numpy() - ours).max())
      m.generate(prompt, max_new_tokens=2, do_sample=False, min_new_tokens=2)
    for _ in range(args.repeats):
      for k, m in hf.items():
        t = time.perf_counter()
        m(x)
        times[k]['prefill'].append(time.perf_counter() - t)
        t = time.perf_counter()
        m.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
        times[k]['decode'].append(time.perf_counter() - t)
  ffn_params = {k: sum(v.numel() for n, v in m.named_parameters() if '.mlp.' in n)
                for k, m in hf.items()}
  rows = []
  for k in hf:
    prefill = statistics.median(times[k]['prefill'])
    decode = statistics.median(times[k]['decode'])
    rows.append({'export': k, 'ffn_params': ffn_params[k],
                 'prefill_tok_s': args.batch * args.seq / prefill,
                 'decode_tok_s': args.new / decode, 'max_abs_logit_diff_vs_ours': diffs[k]})
  base = rows[0]
  print(f'{config.name}: batch {args.batch} x seq {args.seq} prefill, decode {args.new} tokens '
        f'after {args.prompt} (batch 1), {args.threads} threads, torch {torch.__version__}, '
        f'transformers {transformers.__version__}')
  print(f'{"export":<11} {"FFN params":>12} {"prefill tok/s":>14} {"x":>6} {"decode tok/s":>13} '
        f'{"x":>6} {"|Δlogit| vs ours":>17}')
  for r in rows:
    print(f'{r["export"]:<11} {r["ffn_params"]:>12,} {r["prefill_tok_s"]:>14,.0f} '
          f'{r["prefill_tok_s"] / base["prefill_tok_s"]:>6.2f} {r["decode_tok_s"]:>13,.1f} '
          f'{r["decode_tok_s"] / base["decode_tok_s"]:>6.2f} '
          f'{r["max_abs_logit_diff_vs_ours"]:>17.2e}')
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({'config': args.config, 'name': config.name, 'args': vars(args),
                             'torch': torch.__version__,
                             'transformers': transformers.__version__, 'rows': rows}, indent=1))


if __name__ == '__main__':
  main()
