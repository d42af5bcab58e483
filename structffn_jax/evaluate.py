"""Evaluate a trained run: `python -m structffn_jax.evaluate --workdir DIR [--split test]`.

Restores the newest checkpoint of the workdir and reports loss and perplexity over every row of
the split (or `--max-tokens` of it), appending the result to <workdir>/eval.jsonl.

The state is restored sharded onto the run's mesh (`mesh.*` of its config.json; `--mesh D,F,T`
picks another, e.g. `--mesh 1,1,1` for one device); with several processes every one runs this
command (as for training) and process 0 reports.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

import jax
from flax import nnx

from structffn_jax import cli, distributed, evaluation, sgt, sharding, steps
from structffn_jax.data import manifest as manifest_lib
from structffn_jax.data.sources import SPLITS
from structffn_jax.run import load_config, load_run


def evaluate(workdir, split='valid', max_tokens=None, batch_size=None, mesh=None) -> dict:
  config, model, opt_state, meta, device_mesh = load_run(workdir, mesh)
  rules = sharding.rules_of(config)
  manifest = manifest_lib.Manifest.load(manifest_lib.resolve_data_dir(config.data, workdir))
  if split not in manifest.splits:
    raise ValueError(f'split {split!r} was not prepared for this run (has '
                     f'{sorted(manifest.splits)}); set data.{split}_paths in the config.')
  if max_tokens is not None and not max_tokens >= config.model.seq_len:
    raise ValueError(f'--max-tokens {max_tokens:g}: less than one row of model.seq_len='
                     f'{config.model.seq_len} tokens; give at least {config.model.seq_len} (or '
                     f'leave it out for the whole split).')
  if batch_size is not None and batch_size < 1:
    raise ValueError(f'--batch-size {batch_size}: give at least 1 sequence per forward pass.')
  graphdef, params = nnx.split(model, nnx.Param)
  batch_size = batch_size or config.train.eval_batch or config.train.micro_batch or \
      config.train.global_batch
  config.train.eval_batch = batch_size
  sharding.check_batch(config, device_mesh, jax.process_count())
  params_sh = jax.tree.map(lambda x: x.sharding, params)
  batch_sh = sharding.batch_sharding(device_mesh, rules, 2)
  mask_sh = sharding.batch_sharding(device_mesh, rules, 1)
  eval_step = jax.jit(steps.make_eval_step(graphdef),
                      in_shardings=(params_sh, sharding.replicated(device_mesh), batch_sh, mask_sh),
                      out_shardings=sharding.replicated(device_mesh))
  alpha = sgt.alpha_of(opt_state) if not meta.get('guides_dropped') else None
  max_rows = None if max_tokens is None else int(max_tokens // config.model.seq_len)
  with sharding.use_mesh(device_mesh, rules):
    loss, count = evaluation.mean_loss(eval_step, params, alpha, manifest, split, batch_size,
                                       max_rows, batch_sh, mask_sh)
  result = {'step': meta['step'], 'split': split, 'loss': loss, 'ppl': math.exp(min(loss, 50)),
            'tokens': count}
  if jax.process_index() == 0:
    with open(pathlib.Path(workdir) / 'eval.jsonl', 'a') as f:
      f.write(json.dumps(result) + '\n')
  return result


def main(argv=None):
  parser = cli.parser(__doc__, 'structffn_jax.evaluate')
  parser.add_argument('--workdir', required=True, help='a training workdir (its config.json and '
                      'newest checkpoint)')
  parser.add_argument('--split', default='valid', choices=SPLITS,
                      help='which prepared split to evaluate on (default: valid)')
  parser.add_argument('--max-tokens', type=cli.real(0, above=True), default=None,
                      help='evaluate on the first this many tokens of the split (default: all)')
  parser.add_argument('--batch-size', type=cli.integer(1), default=None,
                      help="sequences per forward pass (default: the run's eval_batch, "
                           'micro_batch or global_batch)')
  parser.add_argument('--mesh', default=None, metavar='D,F,T',
                      help="mesh sizes (data, fsdp, tensor) instead of the run's, e.g. 1,1,1")
  args = cli.parse(parser, argv)
  try:
    distributed.initialize(load_config(args.workdir).mesh.distributed)
    r = evaluate(args.workdir, args.split, args.max_tokens, args.batch_size, args.mesh)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  if jax.process_index() != 0:
    return
  print(f'step {r["step"]}  {r["split"]}: loss {r["loss"]:.4f}  ppl {r["ppl"]:.2f}  '
        f'over {r["tokens"]:,.0f} tokens')


if __name__ == '__main__':
  main()
