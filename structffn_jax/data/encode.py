"""Documents to token ids, on worker processes: the writer's tokenizing half (pieces.py runs it).

  _Stream       one input stream of documents and the splits its documents go to
  _route        the split of a document: by its hash, the same whichever job reads it
  _chunks       a stream cut into chunks of about `chunk_chars` characters (one task each)
  _Encoder      a chunk's documents tokenized, EOS after each, per split
  _encoding     tasks mapped to results in order, in this process or on spawned workers
  _RowWriter    ids appended and written out in whole rows, hashed as they are written
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import itertools
import multiprocessing
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from structffn_jax.data import sources
from structffn_jax.data import tokenizer as tokenizer_lib
from structffn_jax.data.manifest import tmp_name


@dataclasses.dataclass(frozen=True)
class _Stream:
  """One input read once: its documents go to `split`, or by hash to a split in `carve`."""

  split: str
  carve: tuple[tuple[str, float], ...] = ()

  @property
  def outputs(self) -> tuple[str, ...]:
    return (self.split,) + tuple(s for s, _ in self.carve)


def _route(doc: str, stream: _Stream) -> str:
  """The split of a document of `stream`: a fixed function of its text."""
  if not stream.carve:
    return stream.split
  digest = hashlib.blake2b(doc.encode('utf-8', 'surrogatepass'), digest_size=8).digest()
  u, bound = int.from_bytes(digest, 'big') / 2**64, 0.0
  for split, fraction in stream.carve:
    bound += fraction
    if u < bound:
      return split
  return stream.split


class _RowWriter:
  """Appends token ids and writes them out in whole rows of `row_len`, hashing what it writes.

  With `max_rows` it keeps only the first max_rows rows and drops the rest.
  """

  def __init__(
      self,
      path: Path,
      row_len: int,
      dtype: np.dtype,
      vocab_size: int,
      max_rows: int | None = None,
  ):
    self.path, self.row_len, self.dtype, self.vocab_size = path, row_len, dtype, vocab_size
    self.max_rows = max_rows
    self.tmp = tmp_name(path)
    self.file = open(self.tmp, 'wb')
    self.digest = hashlib.sha256()
    self.pending: list[np.ndarray] = []
    self.pending_len = 0
    self.rows = 0
    self.docs = 0
    self.max_id = -1

  @property
  def tokens(self) -> int:
    """Tokens taken so far, whole rows and the pending partial one."""
    return self.rows * self.row_len + self.pending_len

  @property
  def full(self) -> bool:
    return self.max_rows is not None and self.tokens >= self.max_rows * self.row_len

  def add(self, ids: np.ndarray, docs: int = 1) -> None:
    if self.max_rows is not None:
      ids = ids[:max(0, self.max_rows * self.row_len - self.tokens)]
    if not len(ids):
      return
    self.docs += docs
    self.pending.append(ids)
    self.pending_len += len(ids)
    if self.pending_len >= 64 * self.row_len:
      self._flush()

  def _flush(self) -> None:
    flat = np.concatenate(self.pending) if self.pending else np.zeros(0, np.int64)
    n_rows = len(flat) // self.row_len
    full, rest = flat[:n_rows * self.row_len], flat[n_rows * self.row_len:]
    if len(full):
      top = int(full.max())
      if full.min() < 0 or top >= self.vocab_size:
        raise ValueError(f'token id outside [0, {self.vocab_size}) while writing {self.path}')
      self.max_id = max(self.max_id, top)
      data = full.astype(self.dtype).tobytes()
      self.file.write(data)
      self.digest.update(data)
      self.rows += n_rows
    self.pending, self.pending_len = [rest], len(rest)

  def finish(self) -> dict[str, Any]:
    """Closes and renames into place (a file without rows is not kept); its piece entry."""
    self._flush()
    self.file.flush()
    os.fsync(self.file.fileno())
    self.file.close()
    if self.rows:
      os.replace(self.tmp, self.path)
    else:
      self.tmp.unlink()
    return {
        'file': self.path.name if self.rows else None,
        'rows': self.rows,
        'sha256': self.digest.hexdigest() if self.rows else None,
        'max_id': self.max_id,
        'docs': self.docs,
        'dropped_tokens': self.pending_len,
    }

  def abort(self) -> None:
    self.file.close()
    self.tmp.unlink(missing_ok=True)


def _chunks(docs: sources.Documents,
            max_chars: int) -> Iterator[tuple[int, list[str], dict[str, Any]]]:
  """(documents read, the non-empty ones, `docs.state()` after them) in chunks of about
  `max_chars` characters."""
  batch, size, count = [], 0, 0
  for doc in docs:
    count += 1
    if doc:
      batch.append(doc)
      size += len(doc)
    if size >= max_chars:
      yield count, batch, docs.state()
      batch, size, count = [], 0, 0
  if count:
    yield count, batch, docs.state()


class _Encoder:
  """Tokenizes a chunk of a stream's documents: per split, the ids with EOS after each document."""

  def __init__(self, tok: tokenizer_lib.Tokenizer):
    self.tok = tok

  def __call__(self, task: tuple[_Stream, int, list[str]]):
    stream, count, docs = task
    routed: dict[str, list[str]] = {split: [] for split in stream.outputs}
    for doc in docs:
      routed[_route(doc, stream)].append(doc)
    eos, out = self.tok.eos_id, {}
    for split, split_docs in routed.items():
      encoded = self.tok.encode_batch(split_docs) if split_docs else []
      flat = np.fromiter(
          itertools.chain.from_iterable(itertools.chain(ids, (eos,)) for ids in encoded),
          dtype=np.uint32,
          count=sum(len(ids) for ids in encoded) + len(encoded),
      )
      out[split] = (flat, len(split_docs))
    return count, out


_WORKER_ENCODER: _Encoder | None = None


def _init_worker(data: bytes, kind: str, eos_token: str, eos_id: int) -> None:
  # One thread per process: the processes are the parallelism.
  os.environ['TOKENIZERS_PARALLELISM'] = 'false'
  global _WORKER_ENCODER
  tok = tokenizer_lib.from_bytes(data, kind, eos_token=eos_token)
  tok.num_threads, tok.eos_id = 1, eos_id
  _WORKER_ENCODER = _Encoder(tok)


def _encode_in_worker(task):
  return _WORKER_ENCODER(task)


def resolve_num_workers(num_workers: int) -> int:
  """`data.num_workers`, with -1 meaning one per CPU core."""
  num_workers = int(num_workers)
  if num_workers == -1:
    return os.cpu_count() or 1
  if num_workers < 0:
    raise ValueError(f'data.num_workers={num_workers}: expected 0, a positive count or -1')
  return num_workers


@contextlib.contextmanager
def _encoding(tok: tokenizer_lib.Tokenizer, num_workers: int, num_threads: int):
  """A function mapping an iterable of tasks to their results, in order, lazily.

  With workers, at most 2 tasks per worker are in flight, so a stream of any length is read
  only as fast as it is tokenized.
  """
  if num_workers == 0:
    tok.num_threads = num_threads
    encoder = _Encoder(tok)
    yield lambda tasks: map(encoder, tasks)
    return
  executor = concurrent.futures.ProcessPoolExecutor(
      num_workers,
      mp_context=multiprocessing.get_context('spawn'),
      initializer=_init_worker,
      initargs=(tok.data, tok.kind, tok.eos_token, tok.eos_id),
  )

  def run(tasks):
    window: collections.deque = collections.deque()
    for task in tasks:
      window.append(executor.submit(_encode_in_worker, task))
      if len(window) > 2 * num_workers:
        yield window.popleft().result()
    while window:
      yield window.popleft().result()

  try:
    yield run
  finally:
    executor.shutdown(wait=True, cancel_futures=True)
