"""Configs: loading a config file with its overrides, and checking every field.

The schema, every field with its one default, is `base_config()` (structffn_jax/schema.py,
re-exported here). Config files in `configs/` start from it and override what their paper table
needs; what they share (the paper's sizes, the data recipe, their argument parser) is
configs/common.py, installed as `structffn_jax.configs.common`. `validate(config)` turns a bad
value into a one-line error naming the field and what is allowed, before anything is built or
compiled.
"""

from __future__ import annotations

import ast
import math

import ml_collections

from structffn_jax import schema
from structffn_jax.errors import ConfigError
from structffn_jax.schema import base_config, from_dict

__all__ = ['ConfigError', 'base_config', 'coerce', 'config_module', 'from_dict', 'load', 'override',
           'validate']


def _get(config, dotted):
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def _leaves(d, prefix=''):
  """(dotted field, value) of every leaf of a config (a ConfigDict or a plain dict)."""
  for key, value in d.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def _type_error(field, value, default):
  """Why `value` does not have the type of the schema's `default` (None when it does)."""
  if isinstance(default, bool):
    ok, kind = isinstance(value, bool), 'true or false'
  elif isinstance(default, int):
    ok, kind = isinstance(value, int) and not isinstance(value, bool), 'an integer'
  elif isinstance(default, float):
    ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), 'a number'
  elif isinstance(default, str):
    ok, kind = isinstance(value, str), 'a string'
  elif isinstance(default, (list, tuple)):
    ok, kind = isinstance(value, (list, tuple)), 'a list'
  else:
    return None
  if ok:
    return None
  return (f'{field}={value!r}: expected {kind}, got {type(value).__name__}; set it like the '
          f'default {default!r}.')


# The largest magnitude of an integer field: int64, what NumPy and XLA hold.
INT_LIMIT = 2**63 - 1


def _size_error(field, value, default):
  """Why a number of the right type cannot be held (None when it can): a non-finite float
  (inf, nan) anywhere, or an integer beyond int64."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  if isinstance(value, float) and not math.isfinite(value):
    return (f'{field}={value!r}: must be a finite number; set it like the default '
            f'{default!r}.')
  if isinstance(value, int) and abs(value) > INT_LIMIT:
    return (f'{field}={value!r}: too large to hold (an integer must fit in 64 bits, '
            f'|value| <= {INT_LIMIT}); set it like the default {default!r}.')
  return None


def _validate_fields(config):
  """The type of every field of the schema (`base_config()`), then the choices; returns
  {field: value} of every field."""
  values = {}
  for field, default in _leaves(base_config()):
    try:
      value = _get(config, field)
    except (KeyError, AttributeError):
      raise ConfigError(f'{field}: missing; a config starts from base_config(), which has every '
                        f'field (a config.json read back goes through from_dict).') from None
    error = _type_error(field, value, default) or _size_error(field, value, default)
    if error:
      raise ConfigError(error)
    values[field] = value
  for field, allowed in schema.CHOICES.items():
    if values[field] not in allowed:
      raise ConfigError(f'{field}={values[field]!r} is not allowed; use one of: '
                        f'{", ".join(allowed)}.')
  return values


def _validate_ranges(values):
  """The range of every numeric field, and the entries of the path lists."""
  for field, (holds, why) in schema.RANGES.items():
    if not holds(values[field]):
      raise ConfigError(f'{field}={values[field]!r}: {why}.')
  if not values['name'].strip():
    raise ConfigError("name='': the run needs a name (logs and plots show it); set name=...")
  for field in ('data.train_paths', 'data.valid_paths', 'data.test_paths', 'data.hf_data_files'):
    bad = [p for p in values[field] if not isinstance(p, str) or not p]
    if bad:
      raise ConfigError(f'{field}={list(values[field])!r}: entries must be non-empty strings '
                        f'(file paths, or split names for source=hf).')
  return values


# The most optimizer steps a run may have: Optax counts them in int32.
MAX_STEPS = 2**31 - 1


def _validate_relations(config):
  """Fields that must agree with each other (train, sgt, data and mesh sections)."""
  t = config.train
  if t.micro_batch and t.global_batch % t.micro_batch:
    raise ConfigError(f'train.micro_batch={t.micro_batch}: must divide train.global_batch='
                      f'{t.global_batch}; pick a divisor such as {t.global_batch // 2 or 1}.')
  steps = t.tokens / (t.global_batch * config.model.seq_len)
  if steps > MAX_STEPS:
    raise ConfigError(f'train.tokens={t.tokens!r}: {steps:.3g} steps of train.global_batch='
                      f'{t.global_batch} x model.seq_len={config.model.seq_len} tokens, more than '
                      f'the {MAX_STEPS} a step counter holds; lower train.tokens.')
  d = config.data
  if d.source in ('text', 'jsonl') and not d.train_paths:
    raise ConfigError(f'data.train_paths=[]: source={d.source!r} needs at least one training '
                      f'file; set data.train_paths=/path/to/train.{d.source}.')
  if d.source == 'jsonl' and not d.text_field:
    raise ConfigError("data.text_field='': source='jsonl' reads the document from this field "
                      "of each line; set data.text_field=text.")
  if d.source == 'hf' and not (d.hf_name or d.hf_path):
    raise ConfigError("data.hf_name='': source='hf' needs a hub dataset name or a "
                      'save_to_disk directory; set data.hf_name=... or data.hf_path=....')
  if d.valid_fraction + d.test_fraction >= 1:
    raise ConfigError(f'data.test_fraction={d.test_fraction}: with data.valid_fraction='
                      f'{d.valid_fraction} nothing is left to train on; keep their sum below 1.')
  if d.shard >= d.num_shards:
    raise ConfigError(f'data.shard={d.shard}: must be below data.num_shards={d.num_shards} '
                      f'(jobs are numbered from 0).')
  if not d.tokenizer and d.format == 'tokens' and d.vocab_size > config.model.vocab_size:
    raise ConfigError(f'data.vocab_size={d.vocab_size}: the trained tokenizer would have more '
                      f'tokens than model.vocab_size={config.model.vocab_size}; set '
                      f'data.vocab_size <= model.vocab_size.')
  schema.check_mesh_sizes(config.mesh)  # mesh.data, fsdp, tensor
  for entry in config.mesh.rules:
    if not isinstance(entry, str) and not (isinstance(entry, (list, tuple)) and len(entry) == 2):
      raise ConfigError(f'mesh.rules={list(config.mesh.rules)!r}: entry {entry!r} is neither a '
                        f"(logical, mesh axis) pair nor a 'logical=axis' string; e.g. "
                        f"('embed', 'fsdp') or 'embed=fsdp'.")
  schema.parse_rules(config.mesh.rules)


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Check every field of every section (type, range, relation); raise ConfigError naming the
  field, before anything is built or compiled."""
  values = _validate_fields(config)  # types and choices
  m = config.model
  for field in ('vocab_size', 'seq_len', 'hidden_dim', 'ffn_dim', 'num_layers', 'num_heads',
                'num_kv_heads', 'attn_dim'):
    if int(m[field]) <= 0:
      raise ConfigError(f'model.{field}={m[field]} must be a positive integer.')
  if m.attn_dim % m.num_heads:
    raise ConfigError(f'model.attn_dim={m.attn_dim} is not divisible by model.num_heads='
                      f'{m.num_heads}; pick num_heads dividing {m.attn_dim}.')
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(f'model.num_kv_heads={m.num_kv_heads} must divide model.num_heads='
                      f'{m.num_heads}; allowed: {_divisors(m.num_heads)}.')
  if m.position == 'rope' and (m.attn_dim // m.num_heads) % 2:
    raise ConfigError(f'RoPE needs an even head width; model.attn_dim/model.num_heads = '
                      f'{m.attn_dim // m.num_heads}.')
  _validate_ffn(m)
  _validate_ranges(values)
  _validate_relations(config)
  return config


def _divisors(n):
  return [d for d in range(1, n + 1) if n % d == 0]


def _validate_ffn(m):
  f = m.ffn
  d = m.hidden_dim
  fc1_out = 2 * m.ffn_dim if m.activation == 'swiglu' else m.ffn_dim
  shapes = ((d, fc1_out), (m.ffn_dim, d))
  if f.method in ('lowrank', 'blockdense'):
    limit = min(min(n, k) for n, k in shapes)
    if not 0 < f.rank <= limit:
      raise ConfigError(f'model.ffn.rank={f.rank} must be in [1, {limit}] for '
                        f'method={f.method!r} with hidden_dim={d}, ffn_dim={m.ffn_dim}.')
  if f.method in ('blockdense', 'blockshuffle'):
    dims = {'hidden_dim': d, 'ffn_dim': m.ffn_dim}
    if f.method == 'blockdense':
      dims['ffn.rank'] = f.rank
    for name, value in dims.items():
      if f.blocks <= 0 or value % f.blocks:
        common = sorted(set.intersection(*(set(_divisors(v)) for v in dims.values())))
        raise ConfigError(f'model.ffn.blocks={f.blocks} does not divide model.{name}={value}; '
                          f'allowed block counts: {common[:12]}.')


def config_module(path):
  """The config file at `path` as a module (its `get_config`, and `VARIANTS` if it has them).

  A path `configs/<file>.py` that is not there (a run outside the checkout) is the installed
  copy of that file, `structffn_jax/configs/<file>.py`.
  """
  import importlib.util
  import pathlib

  file = pathlib.Path(path)
  if not file.is_file() and file.parent == pathlib.Path('configs'):
    import structffn_jax.configs
    installed = pathlib.Path(structffn_jax.configs.__file__).parent / file.name
    file = installed if installed.is_file() else file
  if not file.is_file():
    raise ConfigError(f'--config: no config file at {str(path)!r} '
                      '(expected configs/<name>.py:<arg>).')
  module_spec = importlib.util.spec_from_file_location(f'_config_{file.stem}', file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load(spec: str, overrides: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """Load 'path/to/config.py:arg', apply the overrides in order, validate.

  An override is 'a.b=value' (`--set a.b=value` or `--config.a.b=value` on a command line) or a
  bare 'a.b', which sets a bool field to true. The value is typed like the field's current value,
  as ml_collections' config_flags types it: a bool from true/false (t/f, 1/0), an int or
  a float from a number, a tuple or list from comma-separated items or a Python literal
  ("('a', 'b')"), a section from a dict literal ("{'rank': 128}"), a string as it is. A value of
  the wrong type is a ConfigError that names the field.
  """
  path, _, arg = spec.partition(':')
  return validate(override(config_module(path).get_config(arg or None), overrides))


def override(config: ml_collections.ConfigDict,
             overrides: tuple[str, ...]) -> ml_collections.ConfigDict:
  """`config` with the overrides ('a.b=value' or a bare 'a.b') applied in order, typed as `load`
  describes; not validated."""
  for item in overrides:
    key, sep, value = item.partition('=')
    _override(config, key, value if sep else None, item)
  return config


def _override(config, key: str, text: str | None, item: str):
  """Set field `key` of `config` from `text` (None: given bare), typed like its value."""
  try:
    current = _get(config, key)
  except (KeyError, AttributeError, TypeError):
    raise ConfigError(f'override {key!r}: no such config field.') from None
  if text is None:
    if not isinstance(current, bool):
      raise ConfigError(f'override {item!r} is not field=value (only a bool field may be '
                        'given bare, meaning true).')
    text = 'true'
  if isinstance(current, ml_collections.ConfigDict):
    fields = ', '.join(current.keys())
    hint = (f'a section (fields: {fields}); set one field, e.g. --config.{key}.'
            f'{next(iter(current.keys()), "x")}=..., or give a dict literal')
    value = _literal(text)
    if not isinstance(value, dict):
      raise ConfigError(f'override {key}={text!r}: {key} is {hint}.')
    for sub, v in value.items():
      _override(config, f'{key}.{sub}', v if isinstance(v, str) else repr(v), item)
    return
  parent, _, leaf = key.rpartition('.')
  node = _get(config, parent) if parent else config
  try:
    node[leaf] = coerce(text, current, f'override {key}')
  except TypeError as e:  # the ConfigDict refused the type
    raise ConfigError(f'override {key}={text!r}: {e}'.split('\n')[0]) from None


def _literal(text):
  """A Python literal in `text`, or the text itself when it is none."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError, MemoryError, RecursionError):
    return text


_TRUE, _FALSE = ('true', 't', '1'), ('false', 'f', '0')


def coerce(text, current, what):
  """text as the type of `current`; errors name `what` and the type expected."""
  if current is None:
    return _literal(text)
  if isinstance(current, bool):
    if text.lower() not in _TRUE + _FALSE:
      raise ConfigError(f'{what}={text!r}: expected true or false.')
    return text.lower() in _TRUE
  if isinstance(current, (int, float)):
    try:
      return int(text) if isinstance(current, int) else float(text)
    except ValueError:
      pass
    try:
      value = float(text)
    except ValueError:
      kind = 'an integer' if isinstance(current, int) else 'a float'
      raise ConfigError(f'{what}={text!r}: expected a number ({kind}, like {current!r}).') \
          from None
    if not value.is_integer():  # an int field given a fraction
      raise ConfigError(f'{what}={text!r}: expected an integer, like {current!r}.')
    return int(value)
  if isinstance(current, (list, tuple)):
    value = _literal(text)
    if not isinstance(value, (list, tuple)):
      value = [part.strip() for part in text.split(',') if part.strip()]
    return type(current)(value)
  return text
