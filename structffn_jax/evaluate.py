"""Evaluate a trained run: `python -m structffn_jax.evaluate --workdir DIR [--split test]`.

Restores the newest checkpoint of the workdir and reports loss and perplexity over every row of
the split (or `--max-tokens` of it), appending the result to <workdir>/eval.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from structffn_jax import accounting, checkpoint, optim, steps
from structffn_jax.data import pipeline
from structffn_jax.data import prepare as prepare_lib
from structffn_jax.model import GPT


def load_run(workdir):
  """(config, model, opt_state, meta) of the newest checkpoint in `workdir`."""
  workdir = pathlib.Path(workdir)
  cfg_path = workdir / 'config.json'
  if not cfg_path.is_file():
    raise FileNotFoundError(f'{cfg_path} not found: --workdir must be a training workdir.')
  config = ml_collections.ConfigDict(json.loads(cfg_path.read_text()))
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_ckpts)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f'{workdir / "checkpoints"} holds no checkpoint yet.')
  meta = ckpt.meta(step)
  model = GPT(config.model, guide=config.sgt.enabled, reduce_flop=config.sgt.reduce_flop,
              rngs=nnx.Rngs(0))
  if meta.get('guides_dropped'):
    model.drop_guides()
  total, guided = accounting.schedule_steps(config)
  tx = optim.make_optimizer(config, total, guided)
  graphdef, state = steps.init_state(model, tx)
  state, meta = ckpt.restore(step, state)
  ckpt.close()
  return config, nnx.merge(graphdef, state['params']), state['opt_state'], meta


def evaluate(workdir, split='valid', max_tokens=None, batch_size=None) -> dict:
  config, model, opt_state, meta = load_run(workdir)
  manifest = prepare_lib.Manifest.load(prepare_lib.resolve_data_dir(config.data, workdir))
  if split not in manifest.splits:
    raise ValueError(f'split {split!r} was not prepared for this run (has {sorted(manifest.splits)}); '
                     f'set data.{split}_paths in the config.')
  graphdef, params = nnx.split(model, nnx.Param)
  eval_step = jax.jit(steps.make_eval_step(graphdef))
  alpha = optim.alpha_of(opt_state) if not meta.get('guides_dropped') else None
  batch_size = batch_size or config.train.eval_batch or config.train.micro_batch or \
      config.train.global_batch
  max_rows = None if max_tokens is None else max(1, int(max_tokens // config.model.seq_len))
  total = count = 0.0
  for tokens, mask in pipeline.eval_batches(manifest, split, batch_size, max_rows):
    s, n = eval_step(params, alpha, jnp.asarray(tokens), jnp.asarray(mask))
    total, count = total + float(s), count + float(n)
  loss = total / max(count, 1.0)
  result = {'step': meta['step'], 'split': split, 'loss': loss, 'ppl': math.exp(min(loss, 50)),
            'tokens': count}
  with open(pathlib.Path(workdir) / 'eval.jsonl', 'a') as f:
    f.write(json.dumps(result) + '\n')
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--split', default='valid', help='valid or test')
  parser.add_argument('--max-tokens', type=float, default=None, help='evaluate only this many')
  parser.add_argument('--batch-size', type=int, default=None)
  args = parser.parse_args(argv)
  try:
    r = evaluate(args.workdir, args.split, args.max_tokens, args.batch_size)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  print(f'step {r["step"]}  {r["split"]}: loss {r["loss"]:.4f}  ppl {r["ppl"]:.2f}  '
        f'over {r["tokens"]:,.0f} tokens')


if __name__ == '__main__':
  main()
