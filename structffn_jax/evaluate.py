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
from typing import Any, NamedTuple

import jax
import ml_collections
from flax import nnx

from structffn_jax import accounting, checkpoint, cli, distributed, optim, sharding, steps
from structffn_jax.data import pipeline
from structffn_jax.data import prepare as prepare_lib
from structffn_jax.model import GPT


def load_config(workdir, mesh: str | None = None) -> ml_collections.ConfigDict:
  """The config.json of a training workdir; `mesh` 'D,F,T' overrides its mesh sizes."""
  cfg_path = pathlib.Path(workdir) / 'config.json'
  if not cfg_path.is_file():
    raise FileNotFoundError(f'{cfg_path} not found: --workdir must be a training workdir.')
  config = ml_collections.ConfigDict(json.loads(cfg_path.read_text()))
  if config.get('mesh') is None:  # a run from before the mesh section
    config.mesh = sharding.mesh_config(config)
  if mesh:
    try:
      config.mesh.data, config.mesh.fsdp, config.mesh.tensor = (int(x) for x in mesh.split(','))
    except ValueError:
      raise ValueError(f'--mesh {mesh!r}: expected three sizes D,F,T, e.g. --mesh 1,1,1') from None
  return config


class Run(NamedTuple):
  """A trained run restored from its newest checkpoint (`load_run`)."""
  config: ml_collections.ConfigDict
  model: GPT
  opt_state: Any             # carries the self-guided α (optim.alpha_of)
  meta: dict                 # the checkpoint's metadata: step, guides_dropped, ...
  mesh: jax.sharding.Mesh    # the mesh the arrays were restored onto


def load_run(workdir, mesh: str | None = None) -> Run:
  """The newest checkpoint in `workdir`, restored onto the run's mesh (or `mesh` 'D,F,T')."""
  workdir = pathlib.Path(workdir)
  config = load_config(workdir, mesh)
  device_mesh = sharding.make_mesh(config)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_ckpts)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f'{workdir / "checkpoints"} holds no checkpoint yet.')
  meta = ckpt.meta(step)
  total, guided = accounting.schedule_steps(config)
  tx = optim.make_optimizer(config, total, guided)

  def init():
    model = GPT(config.model, guide=config.sgt.enabled, reduce_flop=config.sgt.reduce_flop,
                rngs=nnx.Rngs(0))
    if meta.get('guides_dropped'):
      model.drop_guides()
    return model

  graphdef = nnx.split(nnx.eval_shape(init), nnx.Param)[0]
  abstract = jax.eval_shape(lambda: steps.init_state(init(), tx)[1])
  shardings = sharding.param_shardings(abstract, device_mesh, sharding.rules_of(config))
  state, meta = ckpt.restore(step, sharding.with_shardings(abstract, shardings))
  ckpt.close()
  return Run(config, nnx.merge(graphdef, state['params']), state['opt_state'], meta, device_mesh)


def mean_loss(eval_step, params, alpha, manifest, split: str, batch_size: int,
              max_rows: int | None, batch_sh, mask_sh) -> tuple[float, float]:
  """(mean loss per token, tokens) of `eval_step` over the first `max_rows` rows of `split` (all
  when None), each process reading its share of every global batch. Call it under the mesh."""
  index, share_count = sharding.process_share(batch_sh, (batch_size, 1))
  total = count = 0.0
  for tokens, mask in pipeline.eval_batches(manifest, split, batch_size, max_rows,
                                            process_index=index, process_count=share_count):
    s, n = eval_step(
        params, alpha,
        jax.make_array_from_process_local_data(batch_sh, tokens, (batch_size, tokens.shape[1])),
        jax.make_array_from_process_local_data(mask_sh, mask, (batch_size,)))
    total, count = total + float(s), count + float(n)
  return total / max(count, 1.0), count


def evaluate(workdir, split='valid', max_tokens=None, batch_size=None, mesh=None) -> dict:
  config, model, opt_state, meta, device_mesh = load_run(workdir, mesh)
  rules = sharding.rules_of(config)
  manifest = prepare_lib.Manifest.load(prepare_lib.resolve_data_dir(config.data, workdir))
  if split not in manifest.splits:
    raise ValueError(f'split {split!r} was not prepared for this run (has '
                     f'{sorted(manifest.splits)}); set data.{split}_paths in the config.')
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
  alpha = optim.alpha_of(opt_state) if not meta.get('guides_dropped') else None
  max_rows = None if max_tokens is None else max(1, int(max_tokens // config.model.seq_len))
  with sharding.use_mesh(device_mesh, rules):
    loss, count = mean_loss(eval_step, params, alpha, manifest, split, batch_size, max_rows,
                            batch_sh, mask_sh)
  result = {'step': meta['step'], 'split': split, 'loss': loss, 'ppl': math.exp(min(loss, 50)),
            'tokens': count}
  if jax.process_index() == 0:
    with open(pathlib.Path(workdir) / 'eval.jsonl', 'a') as f:
      f.write(json.dumps(result) + '\n')
  return result


def main(argv=None):
  parser = cli.parser(__doc__)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--split', default='valid', help='valid or test')
  parser.add_argument('--max-tokens', type=float, default=None, help='evaluate only this many')
  parser.add_argument('--batch-size', type=int, default=None)
  parser.add_argument('--mesh', default=None, metavar='D,F,T',
                      help="mesh sizes (data, fsdp, tensor) instead of the run's, e.g. 1,1,1")
  args = parser.parse_args(argv)
  try:
    distributed.initialize(sharding.mesh_config(load_config(args.workdir)).distributed)
    r = evaluate(args.workdir, args.split, args.max_tokens, args.batch_size, args.mesh)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  if jax.process_index() != 0:
    return
  print(f'step {r["step"]}  {r["split"]}: loss {r["loss"]:.4f}  ppl {r["ppl"]:.2f}  '
        f'over {r["tokens"]:,.0f} tokens')


if __name__ == '__main__':
  main()
