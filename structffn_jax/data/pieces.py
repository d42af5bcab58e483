"""A job's share of one input stream, written piece by piece.

A piece closes once it holds `data.shard_tokens` of the stream's split: one `.bin` per split the
stream feeds (`<split>-<job>-<piece>.bin`), then its entry in the job's record, with the number
of documents read and the input's position after them. A job killed mid-piece resumes after its
last recorded piece, without tokenizing those documents again. A progress line every 10 s gives
documents, tokens, tokens/s and, under a cap, the time left.
"""

from __future__ import annotations

import collections
import logging
import time
from pathlib import Path
from typing import Any, Callable

from structffn_jax.data import sources
from structffn_jax.data import tokenizer as tokenizer_lib
from structffn_jax.data.encode import _chunks, _RowWriter, _Stream
from structffn_jax.data.manifest import atomic_write, json_bytes, token_dtype

log = logging.getLogger(__name__)

_PROGRESS_SECONDS = 10.0


def _human(x: float) -> str:
  for unit, scale in (('G', 1e9), ('M', 1e6), ('k', 1e3)):
    if abs(x) >= scale:
      return f'{x / scale:.2f}{unit}'
  return f'{x:.0f}'


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s'


class _Progress:
  """The progress line of one stream: documents, tokens, tokens/s and the time left."""

  def __init__(self, name: str, cap_tokens: int | None, done_tokens: int):
    self.name, self.cap, self.done = name, cap_tokens, done_tokens
    self.start = self.last = time.monotonic()
    self.docs = self.tokens = 0

  def update(self, docs: int, tokens: int, *, final: bool = False) -> None:
    self.docs += docs
    self.tokens += tokens
    now = time.monotonic()
    if not final and now - self.last < _PROGRESS_SECONDS:
      return
    self.last = now
    rate = self.tokens / max(now - self.start, 1e-9)
    line = (f'{self.name}: {_human(self.docs)} docs, {_human(self.tokens)} tokens, '
            f'{_human(rate)} tokens/s')
    if self.cap and not final:
      left = max(0, self.cap - self.done - self.tokens)
      eta = _duration(left / max(rate, 1e-9))
      line += f', {_human(self.done + self.tokens)}/{_human(self.cap)}, ETA {eta}'
    if final:
      line += f' in {_duration(now - self.start)}'
    log.info(line)


def _share(total: int | None, job: int, num_jobs: int) -> int | None:
  """Job `job`'s part of a cap of `total` rows shared by `num_jobs` jobs."""
  if total is None:
    return None
  return total // num_jobs + (1 if job < total % num_jobs else 0)


def _run_stream(
    stream: _Stream,
    cfg_data: Any,
    out_dir: Path,
    record: dict[str, Any],
    record_path: Path,
    encode: Callable,
    tok: tokenizer_lib.Tokenizer,
) -> None:
  """Tokenizes this job's share of `stream` piece by piece, recording each finished piece in
  `record`, which is written to `record_path`."""
  settings, job = record['settings'], record['job']
  num_jobs, row_len = settings['num_jobs'], settings['seq_len'] + 1
  state = record['streams'].setdefault(stream.split, {'pieces': [], 'doc_end': 0, 'done': False})
  if state['done']:
    return
  caps = {s: _share(settings['max_rows'][s], job, num_jobs) for s in stream.outputs}
  taken = {s: sum(p['splits'][s]['rows'] for p in state['pieces']) for s in stream.outputs}
  resume = state['pieces'][-1]['resume'] if state['pieces'] else None
  if resume:
    log.info(
        '%s: resuming after %d finished pieces (%d documents, not tokenized again)',
        stream.split,
        len(state['pieces']),
        state['doc_end'],
    )
  docs = sources.documents(cfg_data, stream.split, shard=(job, num_jobs), resume=resume)
  cap = caps[stream.split]
  progress = _Progress(
      f'{stream.split}' + (f' (job {job}/{num_jobs})' if num_jobs > 1 else ''),
      cap * row_len if cap is not None else None,
      taken[stream.split] * row_len,
  )
  dtype, vocab = token_dtype(tok.vocab_size), tok.vocab_size
  writers: dict[str, _RowWriter] = {}

  def open_piece():
    index = len(state['pieces'])
    return {
        s:
            _RowWriter(
                out_dir / f'{s}-{job:05d}-{index:05d}.bin',
                row_len,
                dtype,
                vocab,
                None if caps[s] is None else caps[s] - taken[s],
            ) for s in stream.outputs
    }

  def close_piece(doc_end: int, position: dict[str, Any]):
    entries = {s: w.finish() for s, w in writers.items()}
    writers.clear()
    state['pieces'].append({'doc_end': doc_end, 'resume': position, 'splits': entries})
    state['doc_end'] = doc_end
    for s, entry in entries.items():
      taken[s] += entry['rows']
    atomic_write(record_path, json_bytes(record))

  doc_end, position = state['doc_end'], resume
  positions: collections.deque = collections.deque()  # Of the chunks sent, in order.

  def tasks():
    for count, batch, after in _chunks(docs, settings['chunk_chars']):
      positions.append(after)
      yield stream, count, batch

  try:
    for count, out in encode(tasks()):
      if not writers:
        writers.update(open_piece())
      for split, (ids, n_docs) in out.items():
        writers[split].add(ids, n_docs)
      doc_end, position = doc_end + count, positions.popleft()
      primary = writers[stream.split]
      progress.update(count, sum(len(ids) for ids, _ in out.values()))
      if primary.full or primary.tokens >= settings['shard_rows'] * row_len:
        close_piece(doc_end, position)
        if cap is not None and taken[stream.split] >= cap:
          break
    if writers:
      close_piece(doc_end, position)
  except BaseException:
    for writer in writers.values():
      writer.abort()
    raise
  progress.update(0, 0, final=True)
  for split in stream.outputs[1:]:
    if caps[split] is not None and taken[split] < caps[split]:
      log.warning(
          '%s carved from train ended at %d of its %d rows: raise data.%s_fraction for more',
          split,
          taken[split],
          caps[split],
          split,
      )
  state['done'] = True
  atomic_write(record_path, json_bytes(record))
