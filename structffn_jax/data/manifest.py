"""A prepared data directory, read: its manifest, its `.bin` shards and their checks.

    m = Manifest.load(data_dir)    # manifest.json: seq_len, dtype, tokenizer, splits and shards
    m.split_files('train')         # the shard files of a split, in row order
    file_rows(path, seq_len, dtype)  # whole rows in a .bin file, or an error naming it

The pipeline, evaluation and decoding read a directory through this module; it imports no
tokenizer library (`Manifest.load_tokenizer` loads one when asked). `prepare.py` writes the
directories, `rows_bin.py` points a manifest at rows tokenized elsewhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np

from structffn_jax import schema

MANIFEST_NAME = 'manifest.json'
# 2: splits in shards, jobs; 1 (read still): one <split>.bin per split.
FORMAT_VERSION = 2
# A config's placeholder for a tokenizer the user must supply (`data.tokenizer`).
REQUIRED = 'required'


def resolve_data_dir(cfg_data: Any, workdir: str | os.PathLike) -> Path:
  """`data.data_dir`, or `<workdir>/data` when it is empty."""
  data_dir = schema.data_section(cfg_data).data_dir
  return Path(data_dir) if data_dir else Path(workdir) / 'data'


def token_dtype(vocab_size: int) -> np.dtype:
  """Storage type of token ids: uint16 when every id fits (vocab <= 65535), else uint32."""
  return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def file_rows(path: str | os.PathLike,
              seq_len: int,
              dtype: Any,
              *,
              field: str = '',
              fix: str = 'prepare the data directory first') -> int:
  """The rows of seq_len + 1 tokens of `dtype` in the `.bin` file at `path`.

  A missing file is a FileNotFoundError, a size that is not a positive multiple of a row a
  ValueError; both name `field` (the config field that named the file) when given, and `fix`.
  """
  path = Path(path)
  dtype = np.dtype(dtype)
  row_len = seq_len + 1
  row_bytes = row_len * dtype.itemsize
  where = f'{field}: ' if field else ''
  if not path.is_file():
    raise FileNotFoundError(f'{where}token file not found: {str(path)!r} ({fix})')
  size = path.stat().st_size
  if size == 0 or size % row_bytes:
    raise ValueError(f'{where}{str(path)!r} is {size} bytes, not whole rows of seq_len+1={row_len} '
                     f'{dtype.name} tokens ({row_bytes} bytes each): {fix}')
  return size // row_bytes


def check_model_vocab(tokenizer_vocab: int, model_vocab_size: int | None, what: str) -> None:
  if model_vocab_size is not None and tokenizer_vocab > model_vocab_size:
    raise ValueError(
        f'{what} has {tokenizer_vocab} tokens, more than model.vocab_size={model_vocab_size}: '
        f'raise model.vocab_size to at least {tokenizer_vocab} or use a smaller tokenizer')


def check_tokenizer_given(src: str) -> None:
  """A config that marks `data.tokenizer` REQUIRED (the paper's recipe) needs the user's file."""
  if src == REQUIRED:
    raise ValueError(
        'data.tokenizer is required by this config (the paper tokenizes with the LLaMA '
        'SentencePiece model): add --set data.tokenizer=/path/to/tokenizer.model, or use the '
        "config's data=local variant")


# --------------------------------------------------------------------------------- manifest


@dataclasses.dataclass
class Manifest:
  """What `prepare` wrote into `dir`; file names are relative so the directory can be moved.

  `splits[name]` holds: rows, tokens (= rows * (seq_len + 1)), dropped_tokens (the partial rows
  left at the ends of pieces), docs, shards (a list of {file, rows, sha256, max_id: the largest
  token id}, in row order; a `rows_bin` file is named by its absolute path and has neither) and
  source (the input's identity from `sources.describe`). `settings` records how the directory
  was made.
  """

  dir: Path
  seq_len: int
  vocab_size: int
  dtype: str
  tokenizer_file: str
  tokenizer_sha256: str
  tokenizer_source: str
  eos_id: int
  bos_id: int
  splits: dict[str, dict[str, Any]]
  settings: dict[str, Any]
  tokenizer_kind: str = 'sentencepiece'  # or 'huggingface' (data/tokenizer.py)

  @property
  def tokenizer_path(self) -> Path:
    if not self.tokenizer_file:
      raise FileNotFoundError(
          f'{self.dir / MANIFEST_NAME} names no tokenizer: prepare it again with data.tokenizer')
    return self.dir / self.tokenizer_file

  def load_tokenizer(self):
    """The directory's tokenizer (`tokenizer.Tokenizer`), with the EOS the rows were written
    with. The one place the reader loads a tokenizer library."""
    from structffn_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    tok = tokenizer_lib.load(self.tokenizer_path, field=f'{self.dir} tokenizer')
    tok.eos_id = self.eos_id
    return tok

  def split_files(self, split: str) -> list[Path]:
    """The shard files of `split`, in row order."""
    return [self.dir / shard['file'] for shard in self.split_info(split)['shards']]

  def rows(self, split: str) -> int:
    return int(self.split_info(split)['rows'])

  def split_info(self, split: str) -> dict[str, Any]:
    if split not in self.splits:
      raise KeyError(
          f'{self.dir / MANIFEST_NAME} has no split {split!r} (has {sorted(self.splits)})')
    return self.splits[split]

  def identity(self) -> dict[str, str]:
    """What a run trains on, wherever the directory lies: the tokenizer's sha256 and one sha256
    over the train split's shards (each shard's sha256, or its file for a `rows_bin` one, and
    rows). A resumed run compares them (`workdir.check_data_identity`)."""
    shards = [(shard.get('sha256') or shard['file'], int(shard['rows']))
              for shard in self.splits.get('train', {}).get('shards', [])]
    rows = hashlib.sha256(json.dumps(shards).encode()).hexdigest()
    return {'data.tokenizer_sha256': self.tokenizer_sha256 or '', 'data.train_sha256': rows}

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.pop('dir')
    return {'format': FORMAT_VERSION, **d}

  @classmethod
  def load(cls, data_dir: str | os.PathLike) -> 'Manifest':
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
      raise FileNotFoundError(
          f'no {MANIFEST_NAME} in {data_dir}: run structffn_jax.data.prepare first')
    d = json.loads(path.read_text())
    version = d.pop('format', None)
    if version == 1:  # One file per split.
      for info in d['splits'].values():
        info['shards'] = [{
            'file': info.pop('file'),
            'rows': info['rows'],
            'sha256': info.get('sha256')
        }]
    elif version != FORMAT_VERSION:
      raise ValueError(f'{path} has an unknown format; delete the directory and prepare again')
    return cls(dir=Path(data_dir), **d)

  def save(self) -> None:
    atomic_write(self.dir / MANIFEST_NAME, json_bytes(self.to_json()))


def as_manifest(manifest_or_dir: 'Manifest | str | os.PathLike') -> Manifest:
  """Accepts a Manifest or a prepared directory."""
  return (manifest_or_dir
          if isinstance(manifest_or_dir, Manifest) else Manifest.load(manifest_or_dir))


# -------------------------------------------------------------------------------- files


def tmp_name(path: Path) -> Path:
  # Host and pid: jobs on several hosts may write the same file of a shared directory at once.
  return path.with_name(f'.{path.name}.tmp-{socket.gethostname()}-{os.getpid()}')


def remove_dead_tmp(directory: Path) -> list[Path]:
  """Delete the temporary files that writers on this host left when they died (a kill -9 of a
  preparation); those of a live process, or of another host, stay. Returns what was removed."""
  host, removed = socket.gethostname(), []
  for p in Path(directory).glob('.*.tmp-*'):
    who, _, pid = p.name.rpartition('.tmp-')[2].rpartition('-')
    if who != host or not pid.isdigit() or int(pid) == os.getpid():
      continue
    try:
      os.kill(int(pid), 0)
      continue  # alive: still writing
    except ProcessLookupError:
      pass
    except PermissionError:
      continue  # alive, another user's
    p.unlink(missing_ok=True)
    removed.append(p)
  return removed


def atomic_write(path: Path, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file and rename: readers see all of it or none."""
  tmp = tmp_name(path)
  with open(tmp, 'wb') as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def json_bytes(obj: Any) -> bytes:
  return (json.dumps(obj, indent=1) + '\n').encode()


def sha256_file(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      digest.update(block)
  return digest.hexdigest()
