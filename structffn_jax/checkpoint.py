"""Orbax checkpoints of a run: model + optimizer state, and a JSON record of where the run is.

A checkpoint holds everything a resumed run needs to continue exactly: parameters, optimizer state
(which carries the self-guided step and α), the step, and whether the guides were already dropped.
The data position is a pure function of the step (see `data.pipeline.BatchStream`), so it is saved
implicitly and restored exactly.

Arrays are saved sharded: with several processes every one writes its shards (Orbax coordinates
them) and process 0 the metadata. A restore reads into whatever shardings its target asks for, so
a run saved on one mesh resumes on another (`mesh.*` may change between a run and its resumption).

The workdir also keeps `config.json`; starting a different config in the same workdir is an error
naming the fields that differ, and nothing there is overwritten.
"""

from __future__ import annotations

import json
import pathlib

import jax
import ml_collections
import orbax.checkpoint as ocp

# Fields that may change between a run and its resumption without changing what is trained.
RUNTIME_FIELDS = ('train.eval_every', 'train.log_every', 'train.ckpt_every', 'train.keep_ckpts',
                  'train.profile_start', 'train.profile_steps', 'train.peak_flops',
                  'train.eval_batch', 'train.micro_batch', 'model.remat', 'data.data_dir',
                  'mesh.data', 'mesh.fsdp', 'mesh.tensor', 'mesh.rules', 'mesh.distributed',
                  'model.ffn.merge_threshold', 'model.ffn.implementation')


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten(v, key + '.'))
    else:
      out[key] = v
  return out


def check_workdir_config(workdir: pathlib.Path, config: ml_collections.ConfigDict, *,
                         write: bool = True) -> None:
  """Check that config.json matches the run already in `workdir`; then (over)write it if `write`.

  With several processes all check and only process 0 writes (atomically, so a process reading
  meanwhile sees the old file or the new one).
  """
  path = workdir / 'config.json'
  current = json.loads(config.to_json_best_effort())
  if path.exists():
    saved = json.loads(path.read_text())
    old, new = _flatten(saved), _flatten(current)
    differ = sorted(k for k in set(old) | set(new)
                    if old.get(k) != new.get(k) and k not in RUNTIME_FIELDS)
    if differ:
      shown = ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in differ[:6])
      raise ValueError(
          f'workdir {workdir} holds a run of another config ({shown}'
          f'{", ..." if len(differ) > 6 else ""}); use a new --workdir, or the same config '
          f'to resume. Nothing was overwritten.')
  workdir.mkdir(parents=True, exist_ok=True)
  if write:
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(json.dumps(current, indent=2, sort_keys=True))
    tmp.replace(path)


class Checkpointer:
  """Async Orbax checkpoints under <workdir>/checkpoints, keeping the newest `keep`."""

  def __init__(self, workdir: pathlib.Path, keep: int):
    self.manager = ocp.CheckpointManager(
        (workdir / 'checkpoints').absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=max(1, keep),
                                             enable_async_checkpointing=True, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)

  def meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore(self, step: int, like):
    """Restore the state at `step` into the structure, shapes and shardings of `like`.

    `like`: arrays, or `jax.ShapeDtypeStruct`s with `sharding=` (see `sharding.with_shardings`),
    which restores straight into place without building the state first.
    """
    abstract = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else ocp.utils.to_shape_dtype_struct(x),
        like)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out['state'], out['meta']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
