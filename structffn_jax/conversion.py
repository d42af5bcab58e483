"""The conversion behind `python -m structffn_jax.convert` (its docstring says what it does):
sources, the new config, one layer at a time, the new workdir."""

from __future__ import annotations

import json
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from structffn_jax import checkpoint, hf_families, optim, plan as plan_lib, projection
from structffn_jax import config as config_lib
from structffn_jax import run as run_lib
from structffn_jax import sgt, structured
from structffn_jax import workdir as workdir_lib
from structffn_jax.model import GPT

MODES = ('guided', 'projection', 'scratch')
# The model fields a source fixes (the rest of model.* comes from CFG).
ARCH_FIELDS = ('vocab_size', 'hidden_dim', 'ffn_dim', 'num_layers', 'num_heads', 'num_kv_heads',
               'attn_dim', 'norm', 'norm_eps', 'activation', 'use_bias', 'qkv_bias', 'position',
               'rope_base', 'rope_scaling', 'tie_embeddings', 'hf_family')
DTYPES = ('F32', 'F16', 'BF16')
CONFIG_PY = '''"""The config of the run in this directory: config.json beside it (structffn_jax.convert)."""
import json
import pathlib

from structffn_jax import schema


def get_config(arg=None):
  del arg
  return schema.from_dict(json.loads((pathlib.Path(__file__).parent / 'config.json').read_text()))
'''


# ----------------------------------------------------------------------------- sources


class HFSource:
  """A Hugging Face model directory read tensor by tensor (safetensors, memory-mapped)."""

  kind = 'huggingface'

  def __init__(self, path: pathlib.Path):
    self.path = path
    cfg_path = path / 'config.json'
    if not cfg_path.is_file():
      raise FileNotFoundError(f'{cfg_path} not found: --from must be a workdir of this project or '
                              'a Hugging Face model directory.')
    try:
      self.hf = json.loads(cfg_path.read_text())
    except ValueError as e:
      raise ValueError(f'{cfg_path} is not JSON ({e}); restore the file.') from None
    where = str(cfg_path)
    self.family = hf_families.family(self.hf, where)
    fields = hf_families.model_fields(self.family, self.hf, where)
    self.max_positions = fields.pop('max_positions')
    self.sliding_window = fields.pop('sliding_window')
    self.fields = {**fields, 'hf_family': self.family.model_type}
    self.tokenizer = path / 'tokenizer.json' if (path / 'tokenizer.json').is_file() else None
    self._handles = {}
    self.files = self._weight_files()

  def _weight_files(self) -> dict:
    """{tensor name: shard file}, every shard present."""
    index = self.path / 'model.safetensors.index.json'
    single = self.path / 'model.safetensors'
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text())['weight_map']
      except (ValueError, KeyError) as e:
        raise ValueError(f'{index} has no weight_map ({e}); restore the index file.') from None
    elif single.is_file():
      weight_map = None
    else:
      bins = sorted(p.name for p in self.path.glob('*.bin'))
      hint = (f' (only {bins[0]}: save the model with safe_serialization=True)' if bins else '')
      raise FileNotFoundError(f'{self.path}: no model.safetensors or '
                              f'model.safetensors.index.json{hint}.')
    from safetensors import safe_open
    files = {}
    shards = sorted(set(weight_map.values())) if weight_map else ['model.safetensors']
    for shard in shards:
      file = self.path / shard
      if not file.is_file():
        raise FileNotFoundError(f'{file}: a shard named by {index.name} is missing; copy every '
                                'shard of the checkpoint into the directory.')
      try:
        handle = safe_open(str(file), framework='numpy')
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f'{file} cannot be read as safetensors ({e}); copy it again.') from None
      self._handles[shard] = handle
      for name in handle.keys():
        files[name] = shard
    if weight_map:
      absent = [n for n, shard in weight_map.items() if n not in files]
      if absent:
        raise ValueError(f'{self.path / weight_map[absent[0]]}: tensor {absent[0]} listed in '
                         f'{index.name} is not in it (a partial shard); copy the shard again.')
    return files

  def _name(self, name):
    """GPT-2 checkpoints saved from the bare backbone lack the 'transformer.' prefix."""
    if name in self.files:
      return name
    prefix = self.family.prefix
    if prefix == 'transformer.' and name.startswith(prefix) and name[len(prefix):] in self.files:
      return name[len(prefix):]
    return None

  def check(self, cfg):
    """Every tensor the architecture needs is present with config.json's shape and a float dtype
    this project holds: read from the headers only."""
    where = 'model.safetensors.index.json' if len(self._handles) > 1 else 'model.safetensors'
    for name, shape in hf_families.expected(self.family, cfg, self.max_positions).items():
      found = self._name(name)
      if found is None:
        raise ValueError(f'{self.path / where}: tensor {name} is missing (a partial or foreign '
                         'checkpoint); copy the complete checkpoint.')
      piece = self._handles[self.files[found]].get_slice(found)
      dtype, got = piece.get_dtype(), tuple(piece.get_shape())
      file = self.path / self.files[found]
      if dtype not in DTYPES:
        raise ValueError(f'{file}: tensor {found} is {dtype}; this project holds float32 '
                         f'weights read from {", ".join(DTYPES)}: save the model in one of them.')
      if got != tuple(shape):
        raise ValueError(f'{file}: tensor {found} has shape {got} but config.json gives '
                         f'{tuple(shape)}; the weights and config.json are of different models.')

  def get(self, name):
    found = self._name(name)
    return None if found is None else self._handles[self.files[found]].get_tensor(found)

  def layer(self, i, cfg):
    return hf_families.read_layer(self.family, self.get, i, cfg)

  def outside(self, cfg):
    return hf_families.read_outside(self.family, self.get, cfg)

  def describe(self):
    return f'{self.family.architecture} from {self.path}'


class WorkdirSource:
  """A run of this project: its newest readable checkpoint, every FFN as the matrix it applies."""

  kind = 'workdir'

  def __init__(self, path: pathlib.Path):
    self.path = path
    r = run_lib.load_run(path, mesh='1,1,1')
    self.config, self.model, self.meta = r.config, r.model, r.meta
    alpha = None if r.meta.get('guides_dropped') else sgt.alpha_of(r.opt_state)
    self.alpha = None if alpha is None else float(alpha)
    self.fields = {k: self.config.model[k] for k in ARCH_FIELDS}
    self.fields['rope_scaling'] = self.config.model.rope_scaling.to_dict()
    self.fields['seq_len'] = self.config.model.seq_len
    self.tokenizer = None
    self.sliding_window = None
    self.max_positions = self.config.model.seq_len

  def check(self, cfg):
    del cfg

  def _matrix(self, layer, index):
    """What an FFN layer applies: its kernel, factors, or the α-blend with its guide."""
    if index is not None:
      graphdef, state = nnx.split(layer)
      layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[index], state))
    if isinstance(layer, structured.Dense):
      return np.asarray(layer.kernel[...], np.float32)
    w = np.asarray(layer.to_dense(), np.float32)
    if layer.guide is not None and self.alpha is not None:
      w = self.alpha * np.asarray(layer.guide[...], np.float32) + (1 - self.alpha) * w
    return w

  def layer(self, i, cfg):
    del cfg
    block, index = (self.model.first, None) if i == 0 else (self.model.stack, i - 1)
    params = nnx.to_pure_dict(nnx.state(block, nnx.Param))
    out = {}
    for module, leaves in (('norm1', params['norm1']), ('norm2', params['norm2'])):
      for leaf, v in leaves.items():
        out[(module, leaf)] = v
    for name in ('qkv', 'out'):
      for leaf, v in params['attn'][name].items():
        out[('attn', name, leaf)] = v
    for fc in ('fc1', 'fc2'):
      out[('ffn', fc, 'kernel')] = self._matrix(getattr(block.ffn, fc), index)
      if 'bias' in params['ffn'][fc]:
        out[('ffn', fc, 'bias')] = params['ffn'][fc]['bias']
    if index is not None:
      out = {k: (v if k[-1] == 'kernel' and k[0] == 'ffn' else v[index]) for k, v in out.items()}
    return {k: np.asarray(v, np.float32) for k, v in out.items()}

  def outside(self, cfg):
    m = self.model
    out = {('embedding',): m.embedding[...], ('final_norm', 'scale'): m.final_norm.scale[...]}
    if getattr(m.final_norm, 'bias', None) is not None:
      out[('final_norm', 'bias')] = m.final_norm.bias[...]
    if m.pos_embedding is not None:
      out[('pos_embedding',)] = m.pos_embedding[...][:cfg.seq_len]
    if m.head is not None:
      out[('head',)] = m.head[...]
    return {k: np.asarray(v, np.float32) for k, v in out.items()}

  def describe(self):
    step = self.meta.get('step')
    blend = f', α={self.alpha:.3f} blended' if self.alpha is not None else ''
    return f'workdir {self.path} step {step}{blend}'


def open_source(path) -> HFSource | WorkdirSource:
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f'--from {path}: no such directory.')
  if (path / 'checkpoints').is_dir():
    return WorkdirSource(path)
  return HFSource(path)


# ----------------------------------------------------------------------------- the config


def build_config(spec: str, sets, source, mode: str):
  """CFG, then the source's architecture, then the --set overrides; validated."""
  path, _, arg = spec.partition(':')
  config = config_lib.config_module(path).get_config(arg or None)
  fields = dict(source.fields)
  config.model.rope_scaling.update(fields.pop('rope_scaling'))
  config.model.update(fields)
  if mode not in MODES:
    raise config_lib.ConfigError(f'--mode {mode!r}: use one of {", ".join(MODES)}.')
  config.sgt.enabled = {'guided': True, 'projection': False}.get(mode, config.sgt.enabled)
  if isinstance(source, WorkdirSource):  # the same tokens and tokenizer as the source run
    from structffn_jax.data import manifest as manifest_lib
    config.data = source.config.data
    config.data.data_dir = str(manifest_lib.resolve_data_dir(source.config.data, source.path)
                               .absolute())
  elif source.tokenizer is not None:  # the source's own vocabulary
    config.data.tokenizer = str(source.tokenizer.absolute())
  config = config_lib.override(config, tuple(sets))
  if isinstance(source, HFSource) and not config.data.tokenizer:
    raise config_lib.ConfigError(
        f'{source.path} has no tokenizer.json, so the tokens of its embedding are unknown; '
        'pass --set data.tokenizer=FILE (the tokenizer the model was trained with).')
  if mode == 'guided' and not config.sgt.enabled:
    raise config_lib.ConfigError('--mode guided needs sgt.enabled=True; drop the --set that '
                                 'turns it off, or use --mode projection.')
  config_lib.validate(config)
  m = config.model
  if source.max_positions and m.seq_len > source.max_positions:
    what = ('n_positions' if m.position == 'absolute' else 'max_position_embeddings')
    raise config_lib.ConfigError(
        f'model.seq_len={m.seq_len} exceeds the source\'s {what}={source.max_positions}; set '
        f'--set model.seq_len={source.max_positions} (or less).')
  if source.sliding_window and source.sliding_window < m.seq_len:
    raise config_lib.ConfigError(
        f'config.json: sliding_window={source.sliding_window} is shorter than the context '
        f'model.seq_len={m.seq_len}; this model attends over the whole context, which equals '
        f'the window only up to it: set --set model.seq_len={source.sliding_window} (or less).')
  return config


def _check_structure(config):
  """The FFN matrices' shapes against the structure: one line naming the field."""
  m = config.model
  if m.ffn.method == 'dense' or m.num_layers == 1 and m.first_layer_dense:
    return
  fc1_out = 2 * m.ffn_dim if m.activation == 'swiglu' else m.ffn_dim
  for name, n, mm in (('fc1', m.hidden_dim, fc1_out), ('fc2', m.ffn_dim, m.hidden_dim)):
    projection.check(m.ffn.method, n, mm, rank=m.ffn.rank, blocks=m.ffn.blocks,
                     where=f'ffn.{name} ({n}->{mm})')


def _check_workdir(new: pathlib.Path, overwrite: bool):
  if not new.exists():
    return
  if not new.is_dir():
    raise FileExistsError(f'--workdir {new} is a file; choose a new directory.')
  entries = list(new.iterdir())
  if not entries:
    return
  is_run = (new / 'config.json').exists() or (new / 'checkpoints').exists()
  if not is_run:
    raise FileExistsError(f'--workdir {new} holds files that are not a run; choose an empty or '
                          'new directory.')
  if not overwrite:
    raise FileExistsError(f'--workdir {new} already holds a run; choose a new directory, or pass '
                          '--overwrite to replace it.')


# ----------------------------------------------------------------------------- the conversion


def _set_path(tree: dict, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def convert(source_path, spec: str, workdir, sets=(), mode: str = 'guided',
            overwrite: bool = False, log=print) -> dict:
  """Convert SRC into NEW (see the module docstring); returns NEW/convert.json's record."""
  start = time.perf_counter()
  source = open_source(source_path)
  config = build_config(spec, sets, source, mode)
  _check_structure(config)
  source.check(config.model)
  new = pathlib.Path(workdir)
  _check_workdir(new, overwrite)
  m = config.model
  log(f'convert: {source.describe()} -> {new} ({mode}, ffn.method={m.ffn.method}, '
      f'rank={m.ffn.rank}, blocks={m.ffn.blocks}, {m.num_layers} layers)')

  # The target's parameters: shapes only, or (scratch) the structure's random init.
  if mode == 'scratch':
    model = GPT.from_config(config, guides=True, seed=config.train.seed)
  else:
    model = nnx.eval_shape(lambda: GPT.from_config(config, guides=True))
  shapes = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  _FILLED.clear()
  # our path -> numpy array (stacked layers: preallocated, filled per layer)
  if mode == 'scratch':
    values = jax.tree.map(lambda a: np.array(a, np.float32), shapes)
  else:
    values = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), shapes)

  record = {'source': str(pathlib.Path(source_path).absolute()), 'source_kind': source.kind,
            'mode': mode, 'method': m.ffn.method, 'rank': m.ffn.rank, 'blocks': m.ffn.blocks,
            'layers': []}
  for i in range(m.num_layers):
    t0 = time.perf_counter()
    where, index = ('first', None) if i == 0 else ('stack', i - 1)
    method = 'dense' if (i == 0 and m.first_layer_dense) else m.ffn.method
    ours = source.layer(i, m)
    line, entry = [], {'layer': i, 'method': method}
    for path, value in ours.items():
      if path[0] == 'ffn' and path[-1] == 'kernel' and method != 'dense':
        fc = path[1]
        w = value
        if mode == 'scratch':
          factors = None
        else:
          factors, best = projection.nearest(method, w, rank=m.ffn.rank, blocks=m.ffn.blocks)
          for leaf, f in factors.items():
            _put(values, (where, 'ffn', fc, leaf), index, np.asarray(f, np.float32))
        if config.sgt.enabled:
          _put(values, (where, 'ffn', fc, 'guide'), index, w)
        if factors is not None:
          err = projection.relative_error(method, w, factors)
          entry[fc] = {'relative_error': err, 'optimum': best}
          line.append(f'{fc} {method} rel. error {err:.4f} (optimum {best:.4f})')
        continue
      _put(values, (where,) + path, index, value)
    if method == 'dense':
      line.append('ffn dense, copied')
    entry['seconds'] = time.perf_counter() - t0
    record['layers'].append(entry)
    log(f'layer {i + 1}/{m.num_layers}: {", ".join(line)} [{entry["seconds"]:.1f}s]')
  for path, value in source.outside(m).items():
    _put(values, path, None, value)
  _check_filled(values, mode, m.num_layers - 1)

  # Everything read and converted: now NEW is written.
  if new.exists() and overwrite and any(new.iterdir()):
    shutil.rmtree(new)
  new.mkdir(parents=True, exist_ok=True)
  if isinstance(source, HFSource) and source.tokenizer is not None \
      and config.data.tokenizer == str(source.tokenizer.absolute()):
    shutil.copyfile(source.tokenizer, new / 'tokenizer.json')
    config.data.tokenizer = str((new / 'tokenizer.json').absolute())
  state = _train_state(config, model, values)
  plan = plan_lib.make_plan(config)
  meta = {'step': 0, 'guides_dropped': False, 'data_next_index': plan.data_index(0),
          'config': config.name, 'converted_from': record['source']}
  ckpt = checkpoint.Checkpointer(new, config.train.keep_ckpts, log=log)
  try:
    ckpt.save(0, state, meta)
    ckpt.wait()
  finally:
    ckpt.close()
  workdir_lib.write_workdir_config(new, config)
  (new / 'config.py').write_text(CONFIG_PY)
  record['seconds'] = time.perf_counter() - start
  (new / 'convert.json').write_text(json.dumps(record, indent=1) + '\n')
  log(f'wrote {new} in {record["seconds"]:.1f}s; train it with: python -m structffn_jax.train '
      f'--config {new}/config.py --workdir {new}')
  return record


def _put(values, path, index, value):
  """Write `value` at our parameter `path`, into layer `index` of a stacked one."""
  tree = values
  for key in path[:-1]:
    tree = tree[key]
  leaf = path[-1]
  if leaf not in tree:
    raise ValueError(f'the source has {"/".join(map(str, path))}, which the target model lacks '
                     '(model.use_bias / model.qkv_bias disagree with the checkpoint).')
  target = tree[leaf] if index is None else tree[leaf][index]
  if tuple(target.shape) != tuple(np.shape(value)):
    raise ValueError(f'{"/".join(map(str, path))}: the source gives shape {np.shape(value)}, the '
                     f'target model {tuple(target.shape)}.')
  if index is None:
    tree[leaf] = np.asarray(value, np.float32)
  else:
    tree[leaf][index] = value
  _FILLED[path] = _FILLED.get(path, 0) + 1


_FILLED = {}  # our path -> how many times `_put` wrote it (one conversion at a time)


def _check_filled(values, mode, stacked: int):
  """Every target parameter was written by the source (the factors too, unless scratch)."""
  for p, leaf in jax.tree_util.tree_flatten_with_path(values)[0]:
    path = tuple(getattr(k, 'key', k) for k in p)
    if mode == 'scratch' and path[-1] in ('u', 'v', 'w1', 'w2'):
      continue
    want = stacked if path[0] == 'stack' else 1
    if _FILLED.get(path, 0) != want:
      raise ValueError(f'the source has no tensor for {"/".join(map(str, path))} of the target '
                       'model (model.use_bias / model.qkv_bias / model.tie_embeddings disagree '
                       'with the checkpoint).')


def _train_state(config, model, values):
  """{'params', 'opt_state'} of the converted model, the optimizer freshly initialised."""
  params = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, values))
  counts = sgt.step_counts(config)
  tx = optim.make_optimizer(config, counts.total, counts.guided)
  return {'params': params, 'opt_state': tx.init(params)}
