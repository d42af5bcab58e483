"""The `rows_bin` format: token rows tokenized elsewhere, such as the paper authors'.

One `.bin` of uint16 (or uint32, `data.rows_dtype`) rows of seq_len + 1 tokens per file, no
manifest: `data.*_paths` name the files, read where they are, and `prepare_rows_bin` writes a
manifest into the data directory that points at them (with a copy of `data.tokenizer`, if one is
given, for decoding). `prepare.prepare` calls it for `data.format='rows_bin'`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from structffn_jax.data import manifest as manifest_lib
from structffn_jax.data import sources
from structffn_jax.data import tokenizer as tokenizer_lib


def prepare_rows_bin(cfg_data: Any, out_dir: Path, seq_len: int,
                     model_vocab_size: int | None) -> manifest_lib.Manifest:
  """A manifest for token rows written elsewhere (`data.*_paths`), read where they are."""
  dtype_name = cfg_data.rows_dtype
  if dtype_name not in ('uint16', 'uint32'):
    raise ValueError(f"data.rows_dtype={dtype_name!r}: expected 'uint16' or 'uint32'")
  dtype, row_len = np.dtype(dtype_name), seq_len + 1
  splits = {}
  for split in sources.SPLITS:
    field = sources.paths_field(split)
    paths = cfg_data[f'{split}_paths'] or []
    shards = []
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
      path = Path(p).expanduser().resolve()
      rows = manifest_lib.file_rows(
          path,
          seq_len,
          dtype,
          field=field,
          fix='set model.seq_len (and data.rows_dtype) to what the rows were written with')
      shards.append({'file': str(path), 'rows': rows, 'sha256': None})
    if shards:
      rows = sum(s['rows'] for s in shards)
      splits[split] = {
          'rows': rows,
          'tokens': rows * row_len,
          'dropped_tokens': 0,
          'docs': None,
          'shards': shards,
          'source': {
              'kind': 'rows_bin',
              'files': [{
                  'path': s['file']
              } for s in shards]
          },
      }
  if 'train' not in splits:
    raise ValueError("data.format='rows_bin' needs data.train_paths: the .bin file(s) of train")
  src = cfg_data.tokenizer
  manifest_lib.check_tokenizer_given(src)
  out_dir.mkdir(parents=True, exist_ok=True)
  tok = None
  if src:
    tok = tokenizer_lib.load(src, field='data.tokenizer', eos_token=cfg_data.eos_token)
    manifest_lib.check_model_vocab(tok.vocab_size, model_vocab_size, f'data.tokenizer={src!r}')
    manifest_lib.atomic_write(out_dir / tok.file_name, tok.data)
    vocab_size = tok.vocab_size
  elif model_vocab_size is None:
    raise ValueError(
        "data.format='rows_bin' without data.tokenizer needs the model's vocabulary size "
        '(model.vocab_size, or --model-vocab-size) to check the token ids')
  else:
    vocab_size = model_vocab_size
  if dtype == np.uint16 and vocab_size > 65536:
    raise ValueError(
        f'a {vocab_size}-token vocabulary does not fit uint16 rows: set data.rows_dtype=uint32')
  manifest = manifest_lib.Manifest(
      dir=out_dir,
      seq_len=int(seq_len),
      vocab_size=int(vocab_size),
      dtype=dtype.name,
      tokenizer_file=tok.file_name if tok else '',
      tokenizer_sha256=hashlib.sha256(tok.data).hexdigest() if tok else '',
      tokenizer_source=str(Path(src).expanduser().resolve()) if tok else '',
      eos_id=int(tok.eos_id) if tok else -1,
      bos_id=int(tok.bos_id) if tok else -1,
      splits=splits,
      settings={
          'format': manifest_lib.FORMAT_VERSION,
          'seq_len': int(seq_len),
          'data_format': 'rows_bin',
          'rows_dtype': dtype.name
      },
      tokenizer_kind=tok.kind if tok else '',
  )
  manifest.save()
  return manifest
