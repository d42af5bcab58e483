"""A run's model and train state, built from its config, and a trained run read back.

  a = run.abstract_state(config, tx, mesh, guides=True)  # graph, shapes, shardings of a state
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

from structffn_jax import checkpoint, optim, schema, sgt, sharding, steps
from structffn_jax import workdir as workdir_lib
from structffn_jax.model import GPT


class AbstractState(NamedTuple):
  """A train state's graph, shapes and shardings, computed without any array."""
  graphdef: Any              # the model's graph (static in the jitted steps)
  state: Any                 # {'params', 'opt_state'} of jax.ShapeDtypeStruct leaves
  shardings: Any             # the same tree of NamedShardings over `mesh`


def abstract_state(config: ml_collections.ConfigDict, tx, mesh: jax.sharding.Mesh,
                   guides: bool) -> AbstractState:
  """The train state of `config` with optimizer `tx` on `mesh`, with or without its guides.
  Raises (naming the config field) on a dimension that the mesh cannot split."""
  graphdef = nnx.split(nnx.eval_shape(lambda: GPT.from_config(config, guides=guides)), nnx.Param)[0]
  state = jax.eval_shape(lambda: steps.init_state(GPT.from_config(config, guides=guides), tx)[1])
  return AbstractState(graphdef, state,
                       sharding.param_shardings(state, mesh, sharding.rules_of(config)))


def load_config(workdir, mesh: str | None = None) -> ml_collections.ConfigDict:
  """The config.json of a training workdir over the schema (`schema.from_dict`: a field the file
  lacks has its default); `mesh` 'D,F,T' overrides its mesh sizes."""
  cfg_path = pathlib.Path(workdir) / 'config.json'
  if not cfg_path.is_file():
    raise FileNotFoundError(f'{cfg_path} not found: --workdir must be a training workdir.')
  try:
    config = schema.from_dict(json.loads(cfg_path.read_text()))
  except (ValueError, TypeError) as e:
    raise ValueError(f'{cfg_path} cannot be read ({e}); --workdir must be a training workdir.') \
        from None
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
  opt_state: Any             # carries the self-guided α (sgt.alpha_of)
  meta: dict                 # the checkpoint's metadata: step, guides_dropped, ...
  mesh: jax.sharding.Mesh    # the mesh the arrays were restored onto


def load_run(workdir, mesh: str | None = None) -> Run:
  """The newest readable checkpoint in `workdir`, restored onto the run's mesh (or `mesh`
  'D,F,T'). One that cannot be read is skipped with a note on stderr (and left in place: the
  trainer, not a reader, moves it aside)."""
  workdir = pathlib.Path(workdir)
  config = load_config(workdir, mesh)
  device_mesh = sharding.make_mesh(config)
  if not workdir_lib.saved_steps(workdir):
    raise FileNotFoundError(f'{workdir / "checkpoints"} holds no checkpoint yet.')
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_ckpts, read_only=True,
                                 log=lambda line: print(line, file=sys.stderr))
  counts = sgt.step_counts(config)
  tx = optim.make_optimizer(config, counts.total, counts.guided)
  built = {}

  def target(meta):
    built['graphdef'], abstract, shardings = abstract_state(
        config, tx, device_mesh, guides=not meta.get('guides_dropped'))
    return sharding.with_shardings(abstract, shardings)

  try:
    _, state, meta = ckpt.restore_newest(target)
  except checkpoint.CheckpointError as e:  # the commands report a ValueError as `error: ...`
    raise ValueError(str(e)) from None
  finally:
    ckpt.close(quiet=True)
  return Run(config, nnx.merge(built['graphdef'], state['params']), state['opt_state'], meta,
             device_mesh)
