"""Batches from prepared token rows, addressed by batch index so any step can be replayed.

The training stream is a grain `MapDataset` whose element d is global batch d:

    range(rows).shuffle(seed).batch(global_batch, drop_remainder=True).repeat()

Batch d lies in epoch d // batches_per_epoch; each epoch is a different permutation of the rows
(grain seeds epoch e's shuffle with seed' + e, where seed' is derived from `seed`), and the
rows left over at the end of an epoch are skipped in that epoch only. Because a batch is a pure
function of its index, resuming is exact and cheap: the iterator state is the next index, and a
trainer replaying data (fixed-FLOP runs restarting the data at step S) maps step t to any index.

Process p of P reads only its slice [p·B/P, (p+1)·B/P) of each global batch of B rows, so the
processes' slices concatenated in process order are the single-process global batch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np

from structffn_jax.data.manifest import Manifest, as_manifest, file_rows


class TokenRows:
  """Random access to the rows of a split: `rows[i]` is int32 [seq_len + 1].

  `paths` is one `.bin` file or a list of them (a split's shards, in order): their rows form one
  index space, row i of the split being row i - offset[k] of the shard k that holds it. The
  memory maps are opened on first access and dropped when pickled, so instances can be sent to
  worker processes.
  """

  def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], seq_len: int,
               dtype: Any):
    single = isinstance(paths, (str, os.PathLike))
    self.paths = [Path(p) for p in ([paths] if single else paths)]
    if not self.paths:
      raise ValueError('TokenRows needs at least one .bin file')
    self.path = self.paths[0]  # The file, for a single-file split (and messages).
    self.seq_len = int(seq_len)
    self.dtype = np.dtype(dtype)
    counts = [file_rows(path, self.seq_len, self.dtype) for path in self.paths]
    self.shard_rows = counts
    self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    self._len = int(self._offsets[-1])
    self._arrays: list[np.memmap] | None = None

  def _maps(self) -> list[np.memmap]:
    if self._arrays is None:
      self._arrays = [
          np.memmap(path, dtype=self.dtype, mode='r', shape=(n, self.seq_len + 1))
          for path, n in zip(self.paths, self.shard_rows)
      ]
    return self._arrays

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> np.ndarray:
    return self.read(np.asarray([index]))[0]

  def read(self, indices: np.ndarray) -> np.ndarray:
    """Rows `indices` in that order: int32 [len(indices), seq_len + 1]."""
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size and (indices.min() < -self._len or indices.max() >= self._len):
      raise IndexError(f'row index outside [0, {self._len}) of {self.path}')
    indices = np.where(indices < 0, indices + self._len, indices)
    maps = self._maps()
    if len(maps) == 1:
      return maps[0][indices].astype(np.int32)
    out = np.empty((len(indices), self.seq_len + 1), np.int32)
    shard = np.searchsorted(self._offsets, indices, side='right') - 1
    for k in np.unique(shard):
      take = shard == k
      out[take] = maps[k][indices[take] - self._offsets[k]]
    return out

  def max_id(self, chunk_rows: int = 1 << 16) -> int:
    """Largest token id in the split, read in chunks to bound memory."""
    return max(self.file_max_id(k, chunk_rows) for k in range(len(self.paths)))

  def file_max_id(self, k: int, chunk_rows: int = 1 << 16) -> int:
    """Largest token id of file k."""
    rows = self._maps()[k]
    return max(int(rows[i:i + chunk_rows].max()) for i in range(0, len(rows), chunk_rows))

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, '_arrays': None}


def open_split(manifest: Manifest | str | os.PathLike,
               split: str,
               *,
               verify_ids: bool = True) -> TokenRows:
  """Opens `split` of a prepared directory, checking its size and (optionally) its token ids.

  The id check raises naming the file if an id does not fit the manifest's vocab, which would
  otherwise index past the embedding table. It scans each file once per process (a max over a
  memory map), except in a split above `SCAN_BYTES` whose files have their largest id in the
  manifest (`prepare` checked every id when writing them): there it checks that record, so a
  65B-token split is not read at every start of every host.
  """
  m = as_manifest(manifest)
  rows = TokenRows(m.split_files(split), m.seq_len, m.dtype)
  if len(rows) != m.rows(split):
    raise ValueError(
        f'{rows.path} holds {len(rows)} rows but the manifest says {m.rows(split)}; prepare again')
  if verify_ids:
    shards = m.split_info(split)['shards']
    recorded = [shard.get('max_id') for shard in shards]
    if sum(p.stat().st_size for p in rows.paths) <= SCAN_BYTES:
      recorded = [None] * len(shards)
    for path, top in zip(rows.paths, _max_ids(rows, recorded)):
      if top >= m.vocab_size:
        raise ValueError(
            f"{path} contains token id {top}, outside the tokenizer's vocab of {m.vocab_size}")
  return rows


# Splits up to this size have their token ids scanned by `open_split`; larger ones with a
# recorded largest id per file are checked against that record.
SCAN_BYTES = 4 << 30
# Largest id per file already scanned by this process, keyed by the file's identity, so that
# evaluating every few hundred steps does not read the validation split again each time.
_SCANNED: dict[tuple[str, int, int], int] = {}


def _max_ids(rows: TokenRows, recorded: list[int | None]) -> list[int]:
  """The largest id of each file of `rows`: `recorded[k]` where given, else scanned (once)."""
  out = []
  for k, (path, known) in enumerate(zip(rows.paths, recorded)):
    if known is not None:
      out.append(int(known))
      continue
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SCANNED:
      _SCANNED[key] = rows.file_max_id(k)
    out.append(_SCANNED[key])
  return out


def _shuffle_seed(seed: int) -> int:
  """A 32-bit shuffle seed derived from `seed`.

  Grain shuffles epoch e with seed' + e; spreading the seeds out keeps runs with seeds s and s + 1
  from seeing each other's epoch orders one epoch apart.
  """
  return int(np.random.SeedSequence(int(seed)).generate_state(1, np.uint32)[0])


class BatchStream:
  """Global batch d of a split, as this process's share: `get(d)` -> int32 [B/P, seq_len + 1]."""

  def __init__(
      self,
      manifest: Manifest | str | os.PathLike,
      split: str = 'train',
      *,
      global_batch: int,
      seed: int,
      process_index: int = 0,
      process_count: int = 1,
      verify_ids: bool = True,
  ):
    if global_batch <= 0 or global_batch % process_count:
      raise ValueError(
          f'train.global_batch={global_batch} must be a positive multiple of the process '
          f'count {process_count}')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index={process_index} outside [0, {process_count})')
    self.manifest = as_manifest(manifest)
    self.rows = open_split(self.manifest, split, verify_ids=verify_ids)
    self.global_batch = global_batch
    self.per_process_batch = global_batch // process_count
    self.seq_len = self.manifest.seq_len
    self.batches_per_epoch = len(self.rows) // global_batch
    if self.batches_per_epoch == 0:
      raise ValueError(
          f'split {split!r} has {len(self.rows)} rows, fewer than train.global_batch={global_batch}'
      )
    self._share = slice(process_index * self.per_process_batch,
                        (process_index + 1) * self.per_process_batch)
    # Element d: the row ids of global batch d (int64 [global_batch]); epochs reshuffle.
    self._row_ids = (grain.MapDataset.range(len(self.rows)).shuffle(seed=_shuffle_seed(seed)).batch(
        global_batch, drop_remainder=True).repeat())

  def global_row_ids(self, batch_index: int) -> np.ndarray:
    """Row ids of all of global batch `batch_index`: int64 [global_batch]."""
    if batch_index < 0:
      raise IndexError(f'batch index {batch_index} < 0')
    return np.asarray(self._row_ids[batch_index], dtype=np.int64)

  def row_ids(self, batch_index: int) -> np.ndarray:
    """Row ids of this process's share of batch `batch_index`: int64 [per_process_batch]."""
    return self.global_row_ids(batch_index)[self._share]

  def get(self, batch_index: int) -> np.ndarray:
    """This process's rows of global batch `batch_index`: int32 [per_process_batch, seq_len + 1]."""
    return self.rows.read(self.row_ids(batch_index))

  def iterate(
      self,
      start_index: int = 0,
      index_fn: Callable[[int], int] | None = None,
      *,
      num_threads: int = 2,
      prefetch: int = 4,
  ) -> 'BatchIterator':
    """Prefetching iterator yielding get(index_fn(t)) for t = start_index, start_index + 1, ...

    `index_fn` maps the iterator's position (usually the optimizer step) to a batch index; the
    identity by default.
    """
    return BatchIterator(self, start_index, index_fn, num_threads=num_threads, prefetch=prefetch)


class BatchIterator:
  """Iterator over a BatchStream whose state is {'next_index': t}: the position it yields next.

  Reads run ahead on a grain thread pool (`ReadOptions`), in order. `set_state` restarts the
  prefetch at the given position, so a restored iterator yields exactly what the saved one would.
  """

  def __init__(
      self,
      stream: BatchStream,
      start_index: int = 0,
      index_fn: Callable[[int], int] | None = None,
      *,
      num_threads: int = 2,
      prefetch: int = 4,
  ):
    self.stream = stream
    self.index_fn = index_fn
    self._read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    self._it = None
    self._start(int(start_index))

  def _batch_at(self, position: int) -> np.ndarray:
    return self.stream.get(position if self.index_fn is None else int(self.index_fn(position)))

  def _start(self, position: int) -> None:
    if position < 0:
      raise ValueError(f'iterator position {position} < 0')
    self.close()
    self._next_index = position
    ds = grain.MapDataset.range(position, sys.maxsize).map(self._batch_at)
    self._it = iter(ds.to_iter_dataset(self._read_options))

  def __iter__(self) -> 'BatchIterator':
    return self

  def __next__(self) -> np.ndarray:
    batch = next(self._it)
    self._next_index += 1
    return batch

  def get_state(self) -> dict[str, int]:
    return {'next_index': self._next_index}

  def set_state(self, state: dict[str, int]) -> None:
    self._start(int(state['next_index']))

  def close(self) -> None:
    """Stops the prefetch threads; the iterator can be restarted with `set_state`."""
    if self._it is not None and hasattr(self._it, 'close'):
      self._it.close()
    self._it = None


def make_train_iterator(
    manifest_or_dir: Manifest | str | os.PathLike,
    *,
    global_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_index: int = 0,
    index_fn: Callable[[int], int] | None = None,
    split: str = 'train',
    num_threads: int = 2,
    prefetch: int = 4,
) -> BatchIterator:
  """The training iterator: this process's share of shuffled global batches, from `start_index`."""
  stream = BatchStream(
      manifest_or_dir,
      split,
      global_batch=global_batch,
      seed=seed,
      process_index=process_index,
      process_count=process_count,
  )
  return stream.iterate(start_index, index_fn, num_threads=num_threads, prefetch=prefetch)


def num_eval_batches(manifest: Manifest | str | os.PathLike,
                     split: str,
                     batch_size: int,
                     max_rows: int | None = None) -> int:
  """How many batches `eval_batches` yields."""
  rows = as_manifest(manifest).rows(split)
  rows = rows if max_rows is None else min(rows, max_rows)
  return -(-rows // batch_size)


def eval_batches(
    manifest: Manifest | str | os.PathLike,
    split: str,
    batch_size: int,
    max_rows: int | None = None,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Every row of `split` (or its first `max_rows`) once, in file order, as (tokens, mask).

  tokens: int32 [batch_size / P, seq_len + 1]; mask: bool [batch_size / P], False on the zero
  padding that fills the last batch, so summing losses over masked rows is exact. With P
  processes each global batch is split as in training (process p takes slice p).
  """
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(
        f'eval batch size {batch_size} must be a positive multiple of the process count '
        f'{process_count}')
  m = as_manifest(manifest)
  rows = open_split(m, split)
  n = len(rows) if max_rows is None else min(len(rows), max_rows)
  share = batch_size // process_count
  for start in range(0, n, batch_size):
    ids = np.arange(start + process_index * share, start + (process_index + 1) * share)
    mask = ids < n
    tokens = np.zeros((share, m.seq_len + 1), np.int32)
    if mask.any():
      tokens[mask] = rows.read(ids[mask])
    yield tokens, mask
