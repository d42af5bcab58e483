"""Prepare a data directory: a SentencePiece tokenizer plus token rows for each split.

    prepare(cfg.data, out_dir, seq_len) -> Manifest

writes, once:

    out_dir/tokenizer.model   trained on the train split (BPE, byte fallback, no normalization, so
                              any text, source code included, decodes back exactly), or a copy of
                              an existing `.model` given as `data.tokenizer` (e.g. LLaMA's)
    out_dir/<split>.bin       raw token ids, shape (rows, seq_len + 1), uint16 if vocab <= 65535
                              else uint32: the documents of the split joined with EOS after each
                              and cut into consecutive rows; the last partial row is dropped
    out_dir/manifest.json     settings, tokenizer sha256, per split rows/tokens/sha256/source

Every file is written under a temporary name and renamed into place, and the manifest goes last,
so a directory with a manifest is complete. Calling `prepare` again with the same settings and
unchanged inputs returns the existing manifest without tokenizing; with different settings it
raises instead of overwriting.

Command line:

    python -m structffn_jax.data.prepare --source text --train a.txt --valid b.txt \\
        --out DIR --seq-len 1024 --vocab-size 8192 [--tokenizer existing.model]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import ml_collections
import numpy as np
import sentencepiece as spm

from structffn_jax.data import sources

log = logging.getLogger(__name__)

MANIFEST_NAME = 'manifest.json'
TOKENIZER_NAME = 'tokenizer.model'
FORMAT_VERSION = 1
# Bumped when the tokenizer training options below change, so old directories are not reused.
TOKENIZER_RECIPE = 1
DEFAULT_TOKENIZER_TRAIN_BYTES = 32_000_000
_PROGRESS_SECONDS = 10.0


def default_data_config() -> ml_collections.ConfigDict:
  """The `cfg.data` section with its defaults: the stdlib corpus and a freshly trained tokenizer."""
  c = ml_collections.ConfigDict()
  c.source = 'stdlib'  # 'stdlib' | 'text' | 'jsonl' | 'hf'.
  c.train_paths = []  # Training files (text/jsonl) or split names (hf; default ['train']).
  c.valid_paths = []  # Validation files or hf split names; empty = no validation split.
  c.test_paths = []  # Test files or hf split names; empty = no test split.
  c.text_field = 'text'  # Field holding the document in jsonl lines / hf examples.
  c.hf_name = ''  # Hugging Face hub dataset name (source='hf'), streamed.
  c.hf_config = ''  # Hugging Face dataset config name, '' = none.
  c.hf_path = ''  # Directory written by `datasets.save_to_disk`; overrides hf_name.
  c.tokenizer = ''  # Path of an existing SentencePiece .model; '' = train one on the train split.
  c.vocab_size = 8192  # Size of the SentencePiece vocabulary to train (ignored with `tokenizer`).
  c.data_dir = ''  # Where tokenizer, token rows and manifest go; '' = <workdir>/data.
  c.stdlib_max_bytes = sources.DEFAULT_STDLIB_MAX_BYTES  # Cap on stdlib text per split (0 = none).
  c.stdlib_tests = True  # Include the standard library's own test suites.
  c.stdlib_site_packages = False  # Add the installed site-packages sources (deduplicated).
  return c


def resolve_data_dir(cfg_data: Any, workdir: str | os.PathLike) -> Path:
  """`data.data_dir`, or `<workdir>/data` when it is empty."""
  data_dir = sources.config_value(cfg_data, 'data_dir', '')
  return Path(data_dir) if data_dir else Path(workdir) / 'data'


def token_dtype(vocab_size: int) -> np.dtype:
  """Storage type of token ids: uint16 when every id fits (vocab <= 65535), else uint32."""
  return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


# --------------------------------------------------------------------------------- manifest


@dataclasses.dataclass
class Manifest:
  """What `prepare` wrote into `dir`; file names are relative so the directory can be moved.

  `splits[name]` holds: file, rows, tokens (= rows * (seq_len + 1)), dropped_tokens (the final
  partial row), docs, sha256 (of the .bin), source (the input's identity from `sources.describe`).
  `settings` is what a later `prepare` call compares to decide whether to reuse the directory.
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

  @property
  def tokenizer_path(self) -> Path:
    return self.dir / self.tokenizer_file

  def split_path(self, split: str) -> Path:
    return self.dir / self.split_info(split)['file']

  def rows(self, split: str) -> int:
    return int(self.split_info(split)['rows'])

  def split_info(self, split: str) -> dict[str, Any]:
    if split not in self.splits:
      raise KeyError(
          f'{self.dir / MANIFEST_NAME} has no split {split!r} (has {sorted(self.splits)})'
      )
    return self.splits[split]

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.pop('dir')
    return {'format': FORMAT_VERSION, **d}

  @classmethod
  def load(cls, data_dir: str | os.PathLike) -> 'Manifest':
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
      raise FileNotFoundError(
          f'no {MANIFEST_NAME} in {data_dir}: run structffn_jax.data.prepare first'
      )
    d = json.loads(path.read_text())
    if d.pop('format', None) != FORMAT_VERSION:
      raise ValueError(f'{path} has an unknown format; delete the directory and prepare again')
    return cls(dir=Path(data_dir), **d)

  def save(self) -> None:
    _atomic_write(self.dir / MANIFEST_NAME, (json.dumps(self.to_json(), indent=1) + '\n').encode())


def as_manifest(manifest_or_dir: 'Manifest | str | os.PathLike') -> Manifest:
  """Accepts a Manifest or a prepared directory."""
  return (
      manifest_or_dir if isinstance(manifest_or_dir, Manifest) else Manifest.load(manifest_or_dir)
  )


# -------------------------------------------------------------------------------- files


def _tmp_name(path: Path) -> Path:
  return path.with_name(f'.{path.name}.tmp-{os.getpid()}')


def _atomic_write(path: Path, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file and rename: readers see all of it or none."""
  tmp = _tmp_name(path)
  with open(tmp, 'wb') as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def sha256_file(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      digest.update(block)
  return digest.hexdigest()


# ------------------------------------------------------------------------------- tokenizer


def _training_lines(docs: Iterable[str], max_bytes: int) -> Iterator[str]:
  """Non-empty lines of `docs`, up to `max_bytes` of UTF-8 in total: SentencePiece's sentences."""
  total = 0
  for doc in docs:
    for line in doc.split('\n'):
      if not line:
        continue
      total += len(line.encode('utf-8')) + 1
      if total > max_bytes:
        return
      yield line


def train_tokenizer(
    docs: Iterable[str],
    vocab_size: int,
    *,
    max_train_bytes: int = DEFAULT_TOKENIZER_TRAIN_BYTES,
    num_threads: int = 2,
) -> bytes:
  """Trains a byte-fallback BPE SentencePiece model on the first `max_train_bytes` of `docs`.

  Options chosen so that decode(encode(s)) == s for any string: no normalization, whitespace
  kept as is (no dummy prefix, no collapsing of runs), and bytes for anything outside the vocab.
  Sentences are fed in order without sampling, so the model is a function of the text. Returns
  the serialized model; ids: unk 0, bos 1, eos 2, no pad.
  """
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(docs, max_train_bytes),
        model_writer=model,
        model_type='bpe',
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name='identity',
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=0.9995,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=1 << 16,
        num_threads=num_threads,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
  except RuntimeError as e:
    raise ValueError(
        f'training a SentencePiece tokenizer with data.vocab_size={vocab_size} failed: {e}'
    ) from e
  return model.getvalue()


def load_tokenizer(
    path: str | os.PathLike, *, field: str = 'data.tokenizer'
) -> spm.SentencePieceProcessor:
  """Loads a SentencePiece `.model`, with an error naming `field` if it is missing or invalid."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'{field}: tokenizer file not found: {str(path)!r}')
  try:
    return spm.SentencePieceProcessor(model_file=str(path))
  except (OSError, RuntimeError) as e:
    raise ValueError(f'{field}: {str(path)!r} is not a SentencePiece model ({e})') from e


def _check_model_vocab(tokenizer_vocab: int, model_vocab_size: int | None, what: str) -> None:
  if model_vocab_size is not None and tokenizer_vocab > model_vocab_size:
    raise ValueError(
        f'{what} has {tokenizer_vocab} tokens, more than model.vocab_size={model_vocab_size}: '
        f'raise model.vocab_size to at least {tokenizer_vocab} or use a smaller tokenizer'
    )


# ------------------------------------------------------------------------------ token rows


class _RowWriter:
  """Appends token ids and writes them out in whole rows of `row_len`, hashing what it writes."""

  def __init__(self, path: Path, row_len: int, dtype: np.dtype, vocab_size: int):
    self.path, self.row_len, self.dtype, self.vocab_size = path, row_len, dtype, vocab_size
    self.tmp = _tmp_name(path)
    self.file = open(self.tmp, 'wb')
    self.digest = hashlib.sha256()
    self.pending: list[np.ndarray] = []
    self.pending_len = 0
    self.rows = 0

  def add(self, ids: np.ndarray) -> None:
    self.pending.append(ids)
    self.pending_len += len(ids)
    if self.pending_len >= 64 * self.row_len:
      self._flush()

  def _flush(self) -> None:
    flat = np.concatenate(self.pending) if self.pending else np.zeros(0, np.int64)
    n_rows = len(flat) // self.row_len
    full, rest = flat[: n_rows * self.row_len], flat[n_rows * self.row_len :]
    if len(full):
      if full.min() < 0 or full.max() >= self.vocab_size:
        raise ValueError(f'token id outside [0, {self.vocab_size}) while writing {self.path}')
      data = full.astype(self.dtype).tobytes()
      self.file.write(data)
      self.digest.update(data)
      self.rows += n_rows
    self.pending, self.pending_len = [rest], len(rest)

  def finish(self) -> tuple[int, int, str]:
    """Closes and renames into place; returns (rows, dropped tail tokens, sha256)."""
    self._flush()
    self.file.flush()
    os.fsync(self.file.fileno())
    self.file.close()
    os.replace(self.tmp, self.path)
    return self.rows, self.pending_len, self.digest.hexdigest()

  def abort(self) -> None:
    self.file.close()
    self.tmp.unlink(missing_ok=True)


def _doc_batches(docs: Iterable[str], max_chars: int = 4_000_000) -> Iterator[list[str]]:
  batch, size = [], 0
  for doc in docs:
    if not doc:
      continue
    batch.append(doc)
    size += len(doc)
    if size >= max_chars:
      yield batch
      batch, size = [], 0
  if batch:
    yield batch


def write_rows(
    sp: spm.SentencePieceProcessor,
    docs: Iterable[str],
    path: Path,
    seq_len: int,
    *,
    num_threads: int = 2,
    name: str = '',
) -> dict[str, Any]:
  """Tokenizes `docs` into rows of `seq_len + 1` ids at `path`; returns the split's manifest entry.

  Each non-empty document contributes its ids followed by EOS; the stream is cut into
  consecutive rows and the final partial row dropped.
  """
  vocab_size, eos = sp.get_piece_size(), sp.eos_id()
  writer = _RowWriter(path, seq_len + 1, token_dtype(vocab_size), vocab_size)
  n_docs = n_tokens = 0
  start = last_report = time.monotonic()
  try:
    for batch in _doc_batches(docs):
      for ids in sp.encode(batch, num_threads=num_threads):
        writer.add(np.asarray(ids + [eos], dtype=np.int64))
        n_tokens += len(ids) + 1
      n_docs += len(batch)
      if time.monotonic() - last_report > _PROGRESS_SECONDS:
        last_report = time.monotonic()
        log.info(
            '%s: %d docs, %d tokens, %.0f s',
            name or path.name,
            n_docs,
            n_tokens,
            last_report - start,
        )
    rows, dropped, sha = writer.finish()
  except BaseException:
    writer.abort()
    raise
  log.info(
      '%s: %d docs, %d tokens -> %d rows of %d (%.1f s)',
      name or path.name,
      n_docs,
      n_tokens,
      rows,
      seq_len + 1,
      time.monotonic() - start,
  )
  return {
      'file': path.name,
      'rows': rows,
      'tokens': rows * (seq_len + 1),
      'dropped_tokens': dropped,
      'docs': n_docs,
      'sha256': sha,
  }


# --------------------------------------------------------------------------------- prepare


def _settings(cfg_data: Any, seq_len: int, tokenizer_train_bytes: int) -> dict[str, Any]:
  """Everything the contents of a data directory depend on, as JSON-normal data."""
  tokenizer_path = sources.config_value(cfg_data, 'tokenizer', '')
  if tokenizer_path:
    if not Path(tokenizer_path).is_file():
      raise FileNotFoundError(f'data.tokenizer: tokenizer file not found: {tokenizer_path!r}')
    tokenizer = {'file_sha256': sha256_file(tokenizer_path)}
  else:
    tokenizer = {
        'trained': {
            'vocab_size': int(sources.config_value(cfg_data, 'vocab_size', 8192)),
            'max_train_bytes': int(tokenizer_train_bytes),
            'recipe': TOKENIZER_RECIPE,
        }
    }
  splits = sources.available_splits(cfg_data)
  if 'train' not in splits:
    raise ValueError('data.train_paths is empty: the train split needs at least one input')
  settings = {
      'format': FORMAT_VERSION,
      'seq_len': int(seq_len),
      'source': sources.config_value(cfg_data, 'source', 'stdlib'),
      'tokenizer': tokenizer,
      'splits': {split: sources.describe(cfg_data, split) for split in splits},
  }
  return json.loads(json.dumps(settings))


def _diff(old: Any, new: Any, prefix: str = '') -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(old) | set(new)):
      out += _diff(old.get(k), new.get(k), f'{prefix}.{k}' if prefix else k)
    return out
  return [] if old == new else [f'{prefix}: existing {old!r} vs requested {new!r}']


def _reuse(manifest: Manifest, model_vocab_size: int | None) -> Manifest:
  """Checks that an existing directory is intact before handing it back."""
  if sha256_file(manifest.tokenizer_path) != manifest.tokenizer_sha256:
    raise ValueError(
        f'{manifest.tokenizer_path} does not match its sha256 in the manifest; delete '
        f'{manifest.dir} and prepare again'
    )
  itemsize = np.dtype(manifest.dtype).itemsize
  for split, info in manifest.splits.items():
    path = manifest.dir / info['file']
    expected = int(info['rows']) * (manifest.seq_len + 1) * itemsize
    if not path.is_file() or path.stat().st_size != expected:
      raise ValueError(
          f'{path} is missing or not {expected} bytes as the manifest says; delete '
          f'{manifest.dir} and prepare again'
      )
  _check_model_vocab(manifest.vocab_size, model_vocab_size, f'tokenizer {manifest.tokenizer_path}')
  return manifest


def prepare(
    cfg_data: Any,
    out_dir: str | os.PathLike,
    seq_len: int,
    *,
    model_vocab_size: int | None = None,
    tokenizer_train_bytes: int = DEFAULT_TOKENIZER_TRAIN_BYTES,
    num_threads: int = 2,
) -> Manifest:
  """Tokenizes every split of `cfg_data` into `out_dir`, or returns the manifest already there.

  Args:
    cfg_data: the `cfg.data` ConfigDict (or a dict); absent fields take `default_data_config()`.
    out_dir: the data directory, created if needed.
    seq_len: model context length; rows hold seq_len + 1 ids (inputs and shifted targets).
    model_vocab_size: if given, a tokenizer with more tokens than this is an error.
    tokenizer_train_bytes: how much training text the tokenizer sees (when one is trained).
    num_threads: threads for SentencePiece training and encoding.
  """
  if seq_len < 1:
    raise ValueError(f'seq_len must be positive, got {seq_len}')
  out_dir = Path(out_dir)
  settings = _settings(cfg_data, seq_len, tokenizer_train_bytes)
  if (out_dir / MANIFEST_NAME).is_file():
    existing = Manifest.load(out_dir)
    if existing.settings == settings:
      log.info('reusing prepared data in %s', out_dir)
      return _reuse(existing, model_vocab_size)
    raise ValueError(
        f'{out_dir} already holds data prepared with other settings; use another data.data_dir '
        'or delete it. Differences:\n  ' + '\n  '.join(_diff(existing.settings, settings))
    )

  out_dir.mkdir(parents=True, exist_ok=True)
  tokenizer_dst = out_dir / TOKENIZER_NAME
  tokenizer_src = sources.config_value(cfg_data, 'tokenizer', '')
  if tokenizer_src:
    sp = load_tokenizer(tokenizer_src)
    _check_model_vocab(sp.get_piece_size(), model_vocab_size, f'data.tokenizer={tokenizer_src!r}')
    _atomic_write(tokenizer_dst, Path(tokenizer_src).read_bytes())
  else:
    vocab_size = settings['tokenizer']['trained']['vocab_size']
    _check_model_vocab(vocab_size, model_vocab_size, f'data.vocab_size={vocab_size}')
    log.info('training a %d-token SentencePiece model on the train split', vocab_size)
    t0 = time.monotonic()
    model = train_tokenizer(
        sources.documents(cfg_data, 'train'),
        vocab_size,
        max_train_bytes=tokenizer_train_bytes,
        num_threads=num_threads,
    )
    _atomic_write(tokenizer_dst, model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    log.info('tokenizer trained in %.1f s', time.monotonic() - t0)
  if sp.eos_id() < 0:
    raise ValueError(
        f'tokenizer {tokenizer_src or tokenizer_dst} defines no EOS id; documents need one as '
        'separator'
    )

  splits = {}
  for split, source in settings['splits'].items():
    info = write_rows(
        sp,
        sources.documents(cfg_data, split),
        out_dir / f'{split}.bin',
        seq_len,
        num_threads=num_threads,
        name=split,
    )
    if info['rows'] == 0:
      raise ValueError(
          f"split {split!r} has {info['dropped_tokens']} tokens, fewer than one row of seq_len+1="
          f'{seq_len + 1}; add text to {sources.paths_field(split)} or lower the sequence length'
      )
    splits[split] = {**info, 'source': source}

  manifest = Manifest(
      dir=out_dir,
      seq_len=int(seq_len),
      vocab_size=int(sp.get_piece_size()),
      dtype=token_dtype(sp.get_piece_size()).name,
      tokenizer_file=TOKENIZER_NAME,
      tokenizer_sha256=sha256_file(tokenizer_dst),
      tokenizer_source=str(Path(tokenizer_src).resolve()) if tokenizer_src else 'trained',
      eos_id=int(sp.eos_id()),
      bos_id=int(sp.bos_id()),
      splits=splits,
      settings=settings,
  )
  manifest.save()
  return manifest


# ------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      prog='python -m structffn_jax.data.prepare', description=__doc__.split('\n\n')[0]
  )
  p.add_argument('--source', choices=sources.SOURCES, default='stdlib')
  p.add_argument('--train', nargs='*', default=[], help='train files (hf: split names)')
  p.add_argument('--valid', nargs='*', default=[], help='validation files (hf: split names)')
  p.add_argument('--test', nargs='*', default=[], help='test files (hf: split names)')
  p.add_argument('--out', required=True, help='data directory to write')
  p.add_argument('--seq-len', type=int, required=True)
  p.add_argument('--vocab-size', type=int, default=8192, help='size of the tokenizer to train')
  p.add_argument(
      '--tokenizer', default='', help='existing SentencePiece .model instead of training'
  )
  p.add_argument('--text-field', default='text')
  p.add_argument('--hf-name', default='')
  p.add_argument('--hf-config', default='')
  p.add_argument('--hf-path', default='')
  p.add_argument('--stdlib-max-bytes', type=int, default=sources.DEFAULT_STDLIB_MAX_BYTES)
  p.add_argument('--model-vocab-size', type=int, default=None)
  p.add_argument('--tokenizer-train-bytes', type=int, default=DEFAULT_TOKENIZER_TRAIN_BYTES)
  p.add_argument('--num-threads', type=int, default=2)
  args = p.parse_args(argv)
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter('%(asctime)s %(message)s'))
  log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False

  cfg = default_data_config()
  cfg.source = args.source
  cfg.train_paths, cfg.valid_paths, cfg.test_paths = args.train, args.valid, args.test
  cfg.text_field, cfg.tokenizer, cfg.vocab_size = args.text_field, args.tokenizer, args.vocab_size
  cfg.hf_name, cfg.hf_config, cfg.hf_path = args.hf_name, args.hf_config, args.hf_path
  cfg.stdlib_max_bytes = args.stdlib_max_bytes
  cfg.data_dir = args.out
  manifest = prepare(
      cfg,
      args.out,
      args.seq_len,
      model_vocab_size=args.model_vocab_size,
      tokenizer_train_bytes=args.tokenizer_train_bytes,
      num_threads=args.num_threads,
  )
  summary = {
      s: {k: v for k, v in info.items() if k != 'source'} for s, info in manifest.splits.items()
  }
  print(
      json.dumps(
          {
              'dir': str(manifest.dir),
              'vocab_size': manifest.vocab_size,
              'dtype': manifest.dtype,
              'splits': summary,
          },
          indent=1,
      )
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
