"""The jobs of a preparation and their records: everything under `out_dir/jobs/`.

  job-<i>-of-<n>.json   what job i of n has finished, stream by stream and piece by piece, with
                        the settings and the tokenizer it started with
  tokenizer.json        the settings of a tokenizer trained into `out_dir`, and its sha256

  _job_of            this job and the number of jobs, from `data.shard` / `data.num_shards`
  _run_job           a job run to its end, or resumed after its last recorded piece; an
                     unfinished record with other settings is refused, or with
                     `replace_unfinished` the directory is prepared anew
  _setup_tokenizer   `data.tokenizer` copied into `out_dir`, or one trained there, once,
                     whichever job is first
  _merge             the manifest, written once every job's record says it has finished;
                     before that `PendingJobs`
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from structffn_jax.data import sources
from structffn_jax.data import tokenizer as tokenizer_lib
from structffn_jax.data.encode import _encoding, _route, _Stream
from structffn_jax.data.manifest import (Manifest, atomic_write, check_model_vocab, json_bytes,
                                         remove_dead_tmp, sha256_file, token_dtype)
from structffn_jax.data.pieces import _run_stream
from structffn_jax.data.settings import _short_diff

log = logging.getLogger(__name__)

JOBS_DIR = 'jobs'
TOKENIZER_NAME = tokenizer_lib.FILE_NAMES[tokenizer_lib.SENTENCEPIECE]


class PendingJobs(ValueError):
  """Raised when this job has finished but others of `data.num_shards` have not."""


def _job_path(out_dir: Path, job: int, num_jobs: int) -> Path:
  return out_dir / JOBS_DIR / f'job-{job:05d}-of-{num_jobs:05d}.json'


def _job_of(cfg_data: Any) -> tuple[int, int]:
  job, num_jobs = int(cfg_data.shard), int(cfg_data.num_shards)
  if num_jobs < 1:
    raise ValueError(f'data.num_shards={num_jobs} must be at least 1')
  if not 0 <= job < num_jobs:
    raise ValueError(f'data.shard={job} outside [0, data.num_shards={num_jobs})')
  return job, num_jobs


def _unfinished_record(
    out_dir: Path,
    record_path: Path,
    settings: dict[str, Any],
    replace_unfinished: bool,
    log_replaced: Callable[[str], None],
) -> dict[str, Any] | None:
  """This job's record of an unfinished preparation in `out_dir` (None if there is none), when it
  was started with `settings`; one with other settings is refused, or with `replace_unfinished`
  the whole directory is removed (the line about it goes to `log_replaced`)."""
  record = json.loads(record_path.read_text()) if record_path.is_file() else None
  if record is not None and record['settings'] != settings and replace_unfinished:
    log_replaced(f'{out_dir}: replaced an unfinished preparation with other settings '
                 f'({_short_diff(record["settings"], settings)}), left by a start that failed')
    shutil.rmtree(out_dir)
    record = None
  if record is not None and record['settings'] != settings:
    raise ValueError(
        f'{out_dir} holds an unfinished preparation with other settings '
        f'({_short_diff(record["settings"], settings)}): finish it with the same settings, or '
        f'delete {out_dir}')
  return record


def _run_job(
    cfg_data: Any,
    out_dir: Path,
    job: int,
    settings: dict[str, Any],
    streams: list[_Stream],
    *,
    model_vocab_size: int | None,
    tokenizer_train_bytes: int,
    num_workers: int,
    num_threads: int,
    replace_unfinished: bool,
    log_replaced: Callable[[str], None],
) -> tuple[tokenizer_lib.Tokenizer, Path]:
  """Runs job `job` of `settings['num_jobs']` to its end, or resumes it after its last recorded
  piece; returns the directory's tokenizer and its file."""
  num_jobs = settings['num_jobs']
  record_path = _job_path(out_dir, job, num_jobs)
  record = _unfinished_record(out_dir, record_path, settings, replace_unfinished, log_replaced)
  (out_dir / JOBS_DIR).mkdir(parents=True, exist_ok=True)
  for p in remove_dead_tmp(out_dir) + remove_dead_tmp(out_dir / JOBS_DIR):
    log.info('%s: removed, left by a writer that died', p.name)
  tok, tok_path = _setup_tokenizer(cfg_data, out_dir, settings, streams, model_vocab_size,
                                   tokenizer_train_bytes, num_threads)
  tok_sha = sha256_file(tok_path)
  if record is None:
    record = {
        'job': job,
        'settings': settings,
        'tokenizer_sha256': tok_sha,
        'streams': {},
        'complete': False
    }
  elif record['tokenizer_sha256'] != tok_sha:
    raise ValueError(f'{tok_path} changed since {record_path} was started; delete {out_dir}')
  if not record['complete']:
    with _encoding(tok, num_workers, num_threads) as encode:
      for stream in streams:
        _run_stream(stream, cfg_data, out_dir, record, record_path, encode, tok)
    record['complete'] = True
    atomic_write(record_path, json_bytes(record))
  return tok, tok_path


def _setup_tokenizer(
    cfg_data: Any,
    out_dir: Path,
    settings: dict[str, Any],
    streams: list[_Stream],
    model_vocab_size: int | None,
    tokenizer_train_bytes: int,
    num_threads: int,
) -> tuple[tokenizer_lib.Tokenizer, Path]:
  """Copies `data.tokenizer` into `out_dir`, or trains one there (once, whichever job is first)."""
  src, spec = cfg_data.tokenizer, settings['tokenizer']
  if src:
    tok = tokenizer_lib.load(src, eos_token=spec['eos_token'])
    check_model_vocab(tok.vocab_size, model_vocab_size, f'data.tokenizer={src!r}')
    dst = out_dir / tok.file_name
    if not (dst.is_file() and sha256_file(dst) == spec['file_sha256']):
      atomic_write(dst, tok.data)
  else:
    vocab_size = spec['trained']['vocab_size']
    check_model_vocab(vocab_size, model_vocab_size, f'data.vocab_size={vocab_size}')
    dst, marker = out_dir / TOKENIZER_NAME, out_dir / JOBS_DIR / 'tokenizer.json'
    done = {'settings': spec, 'sha256': sha256_file(dst) if dst.is_file() else None}
    if marker.is_file() and json.loads(marker.read_text()) == done:
      model = dst.read_bytes()
    else:
      log.info('training a %d-token SentencePiece model on the train split', vocab_size)
      t0 = time.monotonic()
      train_docs = (
          d for d in sources.documents(cfg_data, 'train') if _route(d, streams[0]) == 'train')
      model = tokenizer_lib.train_tokenizer(
          train_docs,
          vocab_size,
          max_train_bytes=spec['trained']['max_train_bytes'],
          num_threads=num_threads,
      )
      atomic_write(dst, model)
      atomic_write(marker, json_bytes({'settings': spec, 'sha256': sha256_file(dst)}))
      log.info('tokenizer trained in %.1f s', time.monotonic() - t0)
    tok = tokenizer_lib.SentencePieceTokenizer(model, name=str(dst))
  if tok.eos_id < 0:
    raise ValueError(
        f'tokenizer {src or dst} defines no EOS id; documents need one as separator (set '
        'data.eos_token)')
  return tok, dst


def _merge(
    out_dir: Path,
    settings: dict[str, Any],
    streams: list[_Stream],
    tok: tokenizer_lib.Tokenizer,
    tok_path: Path,
    tokenizer_source: str,
) -> Manifest:
  """Writes the manifest once every job has finished; raises PendingJobs before that."""
  num_jobs, records, pending = settings['num_jobs'], [], []
  for job in range(num_jobs):
    path = _job_path(out_dir, job, num_jobs)
    record = json.loads(path.read_text()) if path.is_file() else None
    if not record or not record.get('complete'):
      pending.append(job)
      continue
    if record['settings'] != settings:
      raise ValueError(
          f'{path} was prepared with other settings than this job '
          f'({_short_diff(record["settings"], settings)}): run every job with the same settings')
    records.append(record)
  if pending:
    raise PendingJobs(
        f'{out_dir}: jobs {pending} of data.num_shards={num_jobs} have not finished; run them '
        f'(prepare --shard i --num-shards {num_jobs}): the last one to finish writes the manifest')
  if len({r['tokenizer_sha256'] for r in records}) > 1:
    raise ValueError(f'the jobs in {out_dir / JOBS_DIR} used different tokenizers; prepare again')
  row_len = settings['seq_len'] + 1
  splits = {}
  for stream in streams:
    for split in stream.outputs:
      entries = [
          piece['splits'][split]
          for record in records
          for piece in record['streams'][stream.split]['pieces']
      ]
      rows = sum(e['rows'] for e in entries)
      dropped = sum(e['dropped_tokens'] for e in entries)
      if rows == 0:
        field = (sources.paths_field(split) if split == stream.split else f'data.{split}_fraction')
        raise ValueError(
            f'split {split!r} has {dropped} tokens, fewer than one row of seq_len+1={row_len}; '
            f'add text to {field} or lower the sequence length')
      source = settings['streams'][stream.split]['input']
      if split != stream.split:
        source = {'carved_from': source, 'fraction': dict(stream.carve)[split]}
      splits[split] = {
          'rows': rows,
          'tokens': rows * row_len,
          'dropped_tokens': dropped,
          'docs': sum(e['docs'] for e in entries),
          'shards': [{
              'file': e['file'],
              'rows': e['rows'],
              'sha256': e['sha256'],
              'max_id': e['max_id']
          } for e in entries if e['rows']],
          'source': source,
      }
  manifest = Manifest(
      dir=out_dir,
      seq_len=settings['seq_len'],
      vocab_size=int(tok.vocab_size),
      dtype=token_dtype(tok.vocab_size).name,
      tokenizer_file=tok_path.name,
      tokenizer_sha256=sha256_file(tok_path),
      tokenizer_source=tokenizer_source,
      eos_id=int(tok.eos_id),
      bos_id=int(tok.bos_id),
      splits=splits,
      settings=settings,
      tokenizer_kind=tok.kind,
  )
  manifest.save()
  return manifest
