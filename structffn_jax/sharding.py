"""The device mesh of a run, and where every parameter, optimizer moment and batch lives on it.

The devices form a 3-D mesh `(data, fsdp, tensor)` sized by `config.mesh` (-1: the devices left
over). Parameters name their dimensions with logical axes (`axes` metadata, `structured.logical`:
vocab, embed, mlp, heads, qkv, kv, rank, blocks; `nnx.vmap` adds `layers` to the stacked blocks);
one rules table, `config.mesh.rules`, maps each logical axis to a mesh axis or to None
(replicated), MaxText-style:

  batch -> (data, fsdp)   embed -> fsdp   mlp, heads, qkv, kv, vocab -> tensor
  rank -> tensor (LowRank / BlockDense inner dim)   blocks -> tensor (block-diagonal factors)
  layers -> None (the stacked-layer axis is scanned over)

A self-guided guide carries its layer's (out, in) axes, so it shards like a dense layer. Within
one array a mesh axis is used at most once: a later dimension whose rule names an axis already
taken is replicated (LowRank's fc1 `u` (mlp, rank) shards mlp over tensor, keeps rank whole).
Optimizer moments are trees of the same Variables, so they shard exactly like their parameters;
scalars (step counts, α) are replicated.

Every check runs on shapes, before anything is compiled, and names the config field to change.

Why the names and their translation are this module's, not Flax's `out_sharding` metadata with
`nnx.logical_axis_rules` and `nnx.get_partition_spec`: Flax looks each name up on its own, so a
name without a rule is taken for a mesh axis, and two dimensions whose rules name the same mesh
axis (LowRank's u (mlp, rank), both on tensor) give a spec that uses it twice, which JAX
refuses; and a Variable with `out_sharding` is placed by that same translation whenever it is
made or `nnx.eval_shape`d under a mesh. `logical_to_spec` replicates a name without a rule and
lets the first dimension keep a shared axis, and `param_shardings` checks divisibility with
errors that name the config field.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from structffn_jax import schema
from structffn_jax.errors import ConfigError
from structffn_jax.schema import MESH_AXES, check_mesh_sizes, parse_rules  # the config's checks

_ACTIVE_RULES: contextvars.ContextVar = contextvars.ContextVar('structffn_rules', default=None)


# ----------------------------------------------------------------------------- config


def mesh_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.mesh`: every config has the section (configs start from `base_config()`)."""
  return config.mesh


def rules_of(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  return parse_rules(config.mesh.rules)


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """The (data, fsdp, tensor) sizes of `config.mesh` on `num_devices` devices, -1 resolved."""
  sizes = check_mesh_sizes(config.mesh)
  free = [a for a, s in sizes.items() if s == -1]
  fixed = math.prod(s for s in sizes.values() if s != -1)
  shown = ' x '.join(f'mesh.{a}={s}' for a, s in sizes.items())
  if free:
    if num_devices % fixed:
      raise ConfigError(
          f'{shown}: mesh.{free[0]}=-1 takes the devices left over, but the other sizes '
          f'multiply to {fixed}, which does not divide the {num_devices} devices; make their '
          f'product a divisor of {num_devices}.')
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(
        f'{shown} = {fixed} devices, but this run has {num_devices}; make the product '
        f'{num_devices}, or set one size to -1 (e.g. --set mesh.data=-1).')
  return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh of `config.mesh` over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


# ----------------------------------------------------------------------------- specs


def logical_to_spec(axes, rules) -> P:
  """PartitionSpec of an array whose dimensions carry logical names `axes` (None: replicated).

  A logical name without a rule, or whose mesh axes an earlier dimension already uses, is
  replicated.
  """
  table = dict(parse_rules(rules))
  used: set[str] = set()
  spec = []
  for name in axes or ():
    target = table.get(name) if name is not None else None
    names = (target,) if isinstance(target, str) else tuple(target or ())
    if not names or used & set(names):
      spec.append(None)
      continue
    used |= set(names)
    spec.append(names[0] if len(names) == 1 else names)
  return P(*spec)


# The model field behind each logical axis, for error messages.
_MODEL_FIELDS = {'vocab': 'model.vocab_size', 'embed': 'model.hidden_dim', 'mlp': 'model.ffn_dim',
                 'heads': 'model.attn_dim', 'qkv': 'model.num_heads / model.num_kv_heads',
                 'rank': 'model.ffn.rank', 'blocks': 'model.ffn.blocks'}


def _axis_size(mesh, entry) -> int:
  names = (entry,) if isinstance(entry, str) else tuple(entry or ())
  return math.prod(mesh.shape[n] for n in names)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _param_name(path) -> str:
  """'stack/ffn/fc1/u' for a parameter, or its Adam moment, anywhere in a train state."""
  names = []
  for key in reversed(path):
    if not isinstance(key, jax.tree_util.DictKey):
      break
    names.append(str(key.key))
  names = names[::-1]
  return '/'.join(names[1:] if names[:1] == ['params'] else names) or jax.tree_util.keystr(path)


def _spec_of(path, leaf, mesh, rules) -> P:
  """The checked spec of one leaf: a Variable's logical axes (`axes`), or replicated."""
  if not _is_var(leaf):
    return P()
  shape = tuple(leaf.shape)
  axes = tuple(leaf.get_metadata().get('axes') or ())
  if not any(axes):  # no dimension named (the norms' scale and offset): replicated
    return P()
  if len(axes) != len(shape):
    raise ValueError(f'parameter {_param_name(path)} has shape {shape} but logical axes '
                     f'{axes}; the model must name every dimension.')
  spec = logical_to_spec(axes, rules)
  for dim, (size, logical, entry) in enumerate(zip(shape, axes, spec)):
    k = _axis_size(mesh, entry)
    if size % k:
      names = (entry,) if isinstance(entry, str) else tuple(entry)
      fields = ' x '.join(f'mesh.{n}={mesh.shape[n]}' for n in names)
      fix = (f'set mesh.{names[0]} to a divisor of {size}' if len(names) == 1 else
             f'make {" x ".join("mesh." + n for n in names)} a divisor of {size}')
      model_field = _MODEL_FIELDS.get(logical)
      raise ConfigError(
          f'parameter {_param_name(path)} {shape}: dimension {dim} ({logical!r}, size '
          f'{size}) is not divisible by {fields} = {k}; {fix}, map {logical!r} to None in '
          f'mesh.rules' + (f', or change {model_field}' if model_field else '') + '.')
  return spec


def param_shardings(abstract_state, mesh: jax.sharding.Mesh, rules):
  """NamedShardings shaped like `abstract_state` (Variables kept: the tree matches the state).

  Works for params alone or a whole train state: every Variable shards by its logical axes,
  every other array (optimizer counters, α) is replicated. Raises ConfigError for a dimension
  its mesh axes do not divide, naming the parameter.
  """
  def one(path, leaf):
    spec = _spec_of(path, leaf, mesh, rules)
    sharding = NamedSharding(mesh, spec)
    return leaf.replace(sharding) if _is_var(leaf) else sharding

  return jax.tree_util.tree_map_with_path(one, abstract_state, is_leaf=_is_var)


def with_shardings(abstract_state, shardings):
  """ShapeDtypeStructs of `abstract_state` carrying `shardings`: a restore target."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, shardings)


def batch_sharding(mesh: jax.sharding.Mesh, rules, ndim: int = 2) -> NamedSharding:
  """Sharding of a (batch, ...) array: the batch over the `batch` rule's axes, the rest whole."""
  return NamedSharding(mesh, logical_to_spec(('batch',) + (None,) * (ndim - 1), rules))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                process_count: int = 1) -> None:
  """Every batch the run forms splits evenly over the batch axes (and the processes)."""
  rules = rules_of(config)
  spec = logical_to_spec(('batch',), rules)
  k = _axis_size(mesh, spec[0])
  names = (spec[0],) if isinstance(spec[0], str) else tuple(spec[0] or ())
  axes = ' x '.join(f'mesh.{n}={mesh.shape[n]}' for n in names) or 'no mesh axis'
  t = config.train
  micro = t.micro_batch or t.global_batch
  batches = {'train.global_batch': t.global_batch, 'train.micro_batch': micro,
             'train.eval_batch': t.eval_batch or micro}
  for field, size in batches.items():
    if size % k:
      raise ConfigError(
          f'{field}={size} is not divisible by the batch axes {axes} = {k}; make {field} a '
          f'multiple of {k}, or shrink those mesh axes (e.g. --set mesh.data=1).')
    if size % process_count:
      raise ConfigError(
          f'{field}={size} is not divisible by the {process_count} processes; make it a multiple '
          f'of {process_count}.')


def process_share(sharding: NamedSharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
  """(index, count) such that this process's devices hold rows [index·B/count, (index+1)·B/count).

  Feed `BatchStream(process_index=index, process_count=count)` and pass what it yields to
  `jax.make_array_from_process_local_data`. count is 1 when every process needs the whole batch
  (batch not split across processes).
  """
  b = global_shape[0]
  rows = set()
  for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
    start, stop, _ = index[0].indices(b)
    rows.update(range(start, stop))
  lo, hi = min(rows), max(rows) + 1
  size = hi - lo
  if len(rows) != size or b % size or lo % size:
    raise ValueError(f'this process holds batch rows {sorted(rows)[:8]}... of {b}, not one '
                     f'contiguous equal share; order the mesh devices by process.')
  return lo // size, b // size


# ----------------------------------------------------------------------------- activations


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules):
  """`jax.set_mesh(mesh)`, and the rules `constrain` reads while tracing under it."""
  token = _ACTIVE_RULES.set(parse_rules(rules))
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _ACTIVE_RULES.reset(token)


def active_rules() -> tuple[tuple[str, Any], ...]:
  """The rules table set by `use_mesh`, or `base_config()`'s when none is set."""
  rules = _ACTIVE_RULES.get()
  return rules if rules is not None else parse_rules(schema.base_config().mesh.rules)


def mesh_is_set() -> bool:
  """Whether a (data, fsdp, tensor) mesh is set (`jax.set_mesh`) for the code being traced."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and set(MESH_AXES) <= set(mesh.axis_names)


def per_device_specs(shapes, axes, out_axes) -> tuple[tuple[P, ...], P]:
  """(in_specs, out_spec) for a `jax.shard_map` over the mesh that is set: argument i of shape
  `shapes[i]` names its dimensions `axes[i]` (None: whole on every device), the result names
  its own `out_axes`. Each logical name maps to mesh axes by `active_rules()`; a name whose mesh
  axes do not divide every dimension that carries it stays whole."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = active_rules()
  names = {n for a in (*axes, out_axes) for n in a if n is not None}
  target = {n: logical_to_spec((n,), rules)[0] for n in names}
  for shape, arg_axes in zip(shapes, axes):
    for size, name in zip(shape, arg_axes):
      if name is not None and size % _axis_size(mesh, target[name]):
        target[name] = None
  spec = lambda a: P(*(None if n is None else target[n] for n in a))
  return tuple(spec(a) for a in axes), spec(out_axes)


def constrain(x: jax.Array, axes: tuple) -> jax.Array:
  """Pin an activation with logical `axes` to its sharding; the identity without a mesh set."""
  if not mesh_is_set():
    return x
  mesh = jax.sharding.get_abstract_mesh()
  spec = logical_to_spec(axes, active_rules())
  if any(x.shape[d] % _axis_size(mesh, e) for d, e in enumerate(spec)):
    return x  # e.g. a small eval batch: leave placement to the compiler
  return jax.lax.with_sharding_constraint(x, spec)


def describe(mesh: jax.sharding.Mesh) -> str:
  """'mesh data=8 fsdp=1 tensor=1 (8 gpu devices, 1 process)' for the log."""
  sizes = ' '.join(f'{a}={mesh.shape[a]}' for a in MESH_AXES)
  n, p = mesh.size, jax.process_count()
  return (f'mesh {sizes} ({n} {np.asarray(mesh.devices).flat[0].platform} device'
          f'{"s" if n > 1 else ""}, {p} process{"es" if p > 1 else ""})')
