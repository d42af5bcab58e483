"""A trained run read back from its workdir: its config.json and its newest checkpoint.

  config = run.load_config(workdir)             # the run's config (mesh sizes overridable)
  r = run.load_run(workdir, mesh='1,1,1')       # config, model, optimizer state, meta, mesh

The commands that read a trained run (evaluate, generate, premerge, lm_eval) start here, so
that a checkpoint is restored one way everywhere: onto the run's own mesh, or onto another
one given as 'D,F,T' (data, fsdp, tensor sizes), with the guides present or dropped as the
checkpoint recorded.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any, NamedTuple

import jax
import ml_collections
from flax import nnx

from structffn_jax import accounting, checkpoint, optim, sharding, steps
from structffn_jax.model import GPT


def load_config(workdir, mesh: str | None = None) -> ml_collections.ConfigDict:
  """The config.json of a training workdir; `mesh` 'D,F,T' overrides its mesh sizes."""
  cfg_path = pathlib.Path(workdir) / 'config.json'
  if not cfg_path.is_file():
    raise FileNotFoundError(f'{cfg_path} not found: --workdir must be a training workdir.')
  try:
    config = ml_collections.ConfigDict(json.loads(cfg_path.read_text()))
  except ValueError as e:
    raise ValueError(f'{cfg_path} cannot be read ({e}); --workdir must be a training workdir.') \
        from None
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
  """The newest readable checkpoint in `workdir`, restored onto the run's mesh (or `mesh`
  'D,F,T'). One that cannot be read is skipped with a note on stderr (and left in place: the
  trainer, not a reader, moves it aside)."""
  workdir = pathlib.Path(workdir)
  config = load_config(workdir, mesh)
  device_mesh = sharding.make_mesh(config)
  if not checkpoint.saved_steps(workdir):
    raise FileNotFoundError(f'{workdir / "checkpoints"} holds no checkpoint yet.')
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_ckpts, read_only=True,
                                 log=lambda line: print(line, file=sys.stderr))
  total, guided = accounting.schedule_steps(config)
  tx = optim.make_optimizer(config, total, guided)
  built = {}

  def target(meta):
    def init():
      model = GPT(config.model, guide=config.sgt.enabled, reduce_flop=config.sgt.reduce_flop,
                  rngs=nnx.Rngs(0))
      if meta.get('guides_dropped'):
        model.drop_guides()
      return model

    built['graphdef'] = nnx.split(nnx.eval_shape(init), nnx.Param)[0]
    abstract = jax.eval_shape(lambda: steps.init_state(init(), tx)[1])
    shardings = sharding.param_shardings(abstract, device_mesh, sharding.rules_of(config))
    return sharding.with_shardings(abstract, shardings)

  try:
    _, state, meta = ckpt.restore_newest(target)
  except checkpoint.CheckpointError as e:  # the commands report a ValueError as `error: ...`
    raise ValueError(str(e)) from None
  finally:
    ckpt.close(quiet=True)
  return Run(config, nnx.merge(built['graphdef'], state['params']), state['opt_state'], meta,
             device_mesh)
