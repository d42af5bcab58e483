"""A run's model and train state, built from its config, and a trained run read back.

  a = run.abstract_state(config, tx, mesh, guides=True)  # graph, shapes, shardings of a state
  a, state, meta = run.restore_or_init(config, tx, mesh, ckpt)  # a trainer's state
  config = run.load_config(workdir)             # the run's config (mesh sizes overridable)
  r = run.load_run(workdir, mesh='1,1,1')       # config, model, optimizer state, meta, mesh

The trainer and the commands that read a trained run (evaluate, generate, premerge, lm_eval)
restore through `restore_newest`, so that a checkpoint is restored one way everywhere: onto the run's own mesh, or onto another
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
  try:
    _, abstract, state, meta = restore_newest(config, tx, device_mesh, ckpt)
  except checkpoint.CheckpointError as e:  # the commands report a ValueError as `error: ...`
    raise ValueError(str(e)) from None
  finally:
    ckpt.close(quiet=True)
  return Run(config, nnx.merge(abstract.graphdef, state['params']), state['opt_state'], meta,
             device_mesh)


def has_guides(config: ml_collections.ConfigDict, meta: dict) -> bool:
  """Whether the state a checkpoint with metadata `meta` holds (or a new one: {}) has guides."""
  return bool(config.sgt.enabled) and not meta.get('guides_dropped', False)


def restore_newest(config: ml_collections.ConfigDict, tx, mesh: jax.sharding.Mesh,
                   ckpt: checkpoint.Checkpointer) -> tuple[int, AbstractState, Any, dict] | None:
  """(step, abstract state, state, meta) of the newest checkpoint of `ckpt` that restores
  (`Checkpointer.restore_newest`), read straight into its shardings on `mesh`, with the guides
  present or dropped as its metadata says; None when there is none."""
  built = {}

  def target(meta):
    built['abstract'] = abstract_state(config, tx, mesh, has_guides(config, meta))
    return sharding.with_shardings(built['abstract'].state, built['abstract'].shardings)

  restored = ckpt.restore_newest(target)
  if restored is None:
    return None
  step, state, meta = restored
  return step, built['abstract'], state, meta


def restore_or_init(config: ml_collections.ConfigDict, tx, mesh: jax.sharding.Mesh,
                    ckpt: checkpoint.Checkpointer) -> tuple[AbstractState, Any, dict]:
  """A trainer's state: the newest checkpoint that restores (`restore_newest`, logged with
  `ckpt.log`), or a new state initialised in place (a large model never sits on one device) with
  meta {}. The data position follows from meta['step']."""
  restored = restore_newest(config, tx, mesh, ckpt)
  if restored is not None:
    step, abstract, state, meta = restored
    ckpt.log(f'resumed from {ckpt.path(step)} at step {int(meta["step"])}')
    return abstract, state, meta
  guides = has_guides(config, {})
  abstract = abstract_state(config, tx, mesh, guides)
  new_model = lambda: GPT.from_config(config, guides=guides, seed=config.train.seed)
  state = jax.jit(lambda: steps.init_state(new_model(), tx)[1],
                  out_shardings=abstract.shardings)()
  return abstract, state, {}
