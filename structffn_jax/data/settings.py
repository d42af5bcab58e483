"""What a preparation writes, decided before it reads any text: the plan and its settings.

  _plan        the input streams (train, and valid / test when they have inputs), the splits
               carved from train by document hash, and each split's cap in rows
  _settings    the plan and everything else the contents of a job's files depend on (sequence
               length, tokenizer, piece size, number of jobs), as JSON-normal data: stored in
               each job's record and in the manifest, and compared before a job resumes
  _short_diff  how two settings differ, in a line for a message
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from structffn_jax.data import sources
from structffn_jax.data import tokenizer as tokenizer_lib
from structffn_jax.data.encode import _Stream
from structffn_jax.data.manifest import FORMAT_VERSION, check_tokenizer_given, sha256_file

_MAX_CHUNK_CHARS = 1 << 20  # text per task sent to a worker
_AUTO_FRACTION = 0.01  # held-out fraction when only a token count is given and no cap on train
_FRACTION_MARGIN = 1.25  # held-out fraction = margin x its share of the caps


def _tokenizer_settings(cfg_data: Any, tokenizer_train_bytes: int) -> dict[str, Any]:
  """What identifies the tokenizer: the file's sha256, or the training recipe."""
  src = cfg_data.tokenizer
  check_tokenizer_given(src)
  if src:
    path = Path(src).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f'data.tokenizer: tokenizer file not found: {src!r}')
    return {
        'file_sha256': sha256_file(path),
        'kind': tokenizer_lib.kind_of(path),
        'eos_token': cfg_data.eos_token,
    }
  return {
      'trained': {
          'vocab_size': int(cfg_data.vocab_size),
          'max_train_bytes': int(tokenizer_train_bytes),
          'recipe': tokenizer_lib.TOKENIZER_RECIPE,
      }
  }


def _cap_tokens(cfg_data: Any, split: str) -> tuple[int, str]:
  """A split's cap in tokens (0 = none) and the field it comes from."""
  own = int(cfg_data[f'{split}_tokens']) if split != 'train' else 0
  if own:
    return own, f'data.{split}_tokens'
  return int(cfg_data.max_tokens), 'data.max_tokens'


def _plan(cfg_data: Any, seq_len: int) -> tuple[list[_Stream], dict[str, int | None]]:
  """The input streams and each split's cap in rows (None = no cap)."""
  row_len = seq_len + 1
  available = sources.available_splits(cfg_data)
  if 'train' not in available:
    raise ValueError('data.train_paths is empty: the train split needs at least one input')
  carve = []
  for split in ('valid', 'test'):
    fraction = float(cfg_data[f'{split}_fraction'])
    tokens = int(cfg_data[f'{split}_tokens'])
    if split in available:
      if fraction:
        raise ValueError(f'data.{split}_fraction={fraction} carves {split} from train, but '
                         f'{sources.paths_field(split)} already gives it inputs: set one of them')
      continue
    if not fraction and tokens:
      train_cap = int(cfg_data.max_tokens)
      others = tokens + int(cfg_data['valid_tokens' if split == 'test' else 'test_tokens'])
      fraction = (min(0.5, _FRACTION_MARGIN * tokens /
                      (train_cap + others)) if train_cap else _AUTO_FRACTION)
    if fraction:
      if not 0 < fraction < 1:
        raise ValueError(f'data.{split}_fraction={fraction} must lie in (0, 1)')
      carve.append((split, fraction))
  if sum(f for _, f in carve) >= 1:
    raise ValueError('data.valid_fraction + data.test_fraction must stay below 1')
  streams = [_Stream('train', tuple(carve))]
  streams += [_Stream(s) for s in ('valid', 'test') if s in available]
  caps: dict[str, int | None] = {}
  for stream in streams:
    for split in stream.outputs:
      tokens, field = _cap_tokens(cfg_data, split)
      if tokens and tokens < row_len:
        raise ValueError(f'{field}={tokens} is less than one row of seq_len+1={row_len} tokens')
      caps[split] = tokens // row_len if tokens else None
  return streams, caps


def _settings(cfg_data: Any, seq_len: int, tokenizer_train_bytes: int,
              num_jobs: int) -> tuple[list[_Stream], dict[str, Any]]:
  """The plan and everything the contents of a job's files depend on, as JSON-normal data."""
  streams, caps = _plan(cfg_data, seq_len)
  shard_tokens = int(cfg_data.shard_tokens)
  if shard_tokens < 1:
    raise ValueError(f'data.shard_tokens={shard_tokens} must be positive')
  settings = {
      'format': FORMAT_VERSION,
      'seq_len': int(seq_len),
      'source': cfg_data.source,
      'tokenizer': _tokenizer_settings(cfg_data, tokenizer_train_bytes),
      'streams': {
          st.split: {
              'input': sources.describe(cfg_data, st.split),
              'carve': dict(st.carve)
          } for st in streams
      },
      'max_rows': caps,
      'shard_rows': max(1, shard_tokens // (seq_len + 1)),
      'chunk_chars': int(min(_MAX_CHUNK_CHARS, max(1 << 12, shard_tokens // 4))),
      'num_jobs': int(num_jobs),
  }
  return streams, json.loads(json.dumps(settings))


def _diff(old: Any, new: Any, prefix: str = '') -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(old) | set(new)):
      out += _diff(old.get(k), new.get(k), f'{prefix}.{k}' if prefix else k)
    return out
  return [] if old == new else [f'{prefix}: existing {old!r} vs requested {new!r}']


def _short_diff(old: Any, new: Any) -> str:
  lines = _diff(old, new)
  return '; '.join(lines[:3]) + (f'; and {len(lines) - 3} more' if len(lines) > 3 else '')
