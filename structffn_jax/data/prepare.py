"""Prepare a data directory: a tokenizer plus the token rows of every split, in shards.

    prepare(cfg.data, out_dir, seq_len) -> Manifest

writes, once:

    out_dir/tokenizer.model   SentencePiece, trained on the train split (BPE, byte fallback, no
                              normalization, so any text, source code included, decodes back
                              exactly), or a copy of `data.tokenizer` (a `.model`, e.g. LLaMA's)
       or tokenizer.json      a copy of a Hugging Face `data.tokenizer` (GPT-2, LLaMA 3, ...)
    out_dir/<split>-<job>-<piece>.bin
                              token ids, shape (rows, seq_len + 1), uint16 if vocab <= 65535 else
                              uint32: the documents joined with EOS after each, cut into rows
    out_dir/jobs/job-<i>-of-<n>.json
                              what job i of n has finished, piece by piece
    out_dir/manifest.json     settings, tokenizer sha256, per split its shards in order (rows,
                              sha256): written once every job has finished

How the text is cut. Each input stream (the train split's, and the valid / test splits' own when
they have inputs) is read as this job's share (`sources.documents(..., shard=(i, n))`) and cut at
document boundaries into pieces: a piece closes once it holds `data.shard_tokens` of its
stream's split. A piece is one file per split with its last partial row dropped, so it depends
only on its own documents. When the source has no validation (or test) split, documents whose
hash falls below `data.valid_fraction` (then `data.test_fraction`) go there instead of train:
the same document always lands in the same split, whichever job reads it. A split stops at
`data.max_tokens` (valid and test at `data.valid_tokens` / `data.test_tokens` when set), each of
n jobs taking 1/n of the cap.

Tokenization runs on `data.num_workers` processes (spawned, so it is safe after JAX has started)
fed chunks of documents and read back in order, so the output does not depend on the worker
count. A progress line every 10 s gives documents, tokens, tokens/s and, under a cap, the time
left.

Every file is written under a temporary name and renamed into place, and a job records a piece
after its files and its position in the input: an interrupted job resumes after its last
finished piece without tokenizing those documents again (a streamed Hugging Face dataset
continues from its saved `state_dict`, without reading them again; local files are scanned up to
there). The last job to finish writes the manifest.

Calling `prepare` on a finished directory returns its manifest without reading any input. Only
the sequence length and the tokenizer must match (the tokenizer file's sha256 when
`data.tokenizer` is set, else the vocabulary size); other settings and the inputs may differ,
and the directory is used as it is.

`data.format='rows_bin'` reads rows tokenized elsewhere, such as the paper authors' (one `.bin`
of uint16 rows of seq_len + 1 tokens, no manifest): `data.*_paths` name the files, read in place,
and `out_dir` gets a manifest that points at them.

Command line, from a config's data section, or without --config from the schema's defaults
(structffn_jax/schema.py); --set (or --config.data.FIELD=...) and then the data flags, each the
shorthand of one data field, are applied over it and the whole is validated as by every command:

    python -m structffn_jax.data.prepare --config configs/structured_ffn.py:model=xl \\
        --set data.tokenizer=/models/llama/tokenizer.model --out /data/refinedweb-llama \\
        --num-workers 32 [--shard 3 --num-shards 16]
    python -m structffn_jax.data.prepare --source text --train a.txt --valid b.txt \\
        --out DIR --seq-len 1024 --vocab-size 8192 [--tokenizer existing.model|tokenizer.json]
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import ml_collections
import sentencepiece as spm

from structffn_jax import schema
from structffn_jax.data import rows_bin, sources
# The tokenizing half, used here (and its names read from here by the tests).
from structffn_jax.data.encode import (_chunks, _encoding, _Encoder, _RowWriter, _route, _Stream,
                                       resolve_num_workers)
from structffn_jax.data import tokenizer as tokenizer_lib
# The reader's names, used here and read from here by older callers.
from structffn_jax.data import shortfall
from structffn_jax.data.manifest import (FORMAT_VERSION, MANIFEST_NAME, REQUIRED, Manifest,
                                         as_manifest, atomic_write, check_model_vocab,
                                         check_tokenizer_given, file_rows, json_bytes,
                                         remove_dead_tmp, resolve_data_dir, sha256_file,
                                         token_dtype)

log = logging.getLogger(__name__)

JOBS_DIR = 'jobs'
TOKENIZER_NAME = tokenizer_lib.FILE_NAMES[tokenizer_lib.SENTENCEPIECE]
# Bumped when the tokenizer training options below change, so old directories are not reused.
TOKENIZER_RECIPE = 1
DEFAULT_TOKENIZER_TRAIN_BYTES = 32_000_000
_PROGRESS_SECONDS = 10.0
_MAX_CHUNK_CHARS = 1 << 20  # text per task sent to a worker
_AUTO_FRACTION = 0.01  # held-out fraction when only a token count is given and no cap on train
_FRACTION_MARGIN = 1.25  # held-out fraction = margin x its share of the caps

# The paper's data: RefinedWeb (train only, so 0.7B validation tokens are carved from it by
# document hash) tokenized with the LLaMA SentencePiece model, whose path the user supplies; 65B
# train tokens in rows of seq_len + 1 = 1025. `local`: the stdlib, to try a config here.
DATA_RECIPES = {
    'refinedweb':
        dict(
            source='hf',
            hf_name='tiiuae/falcon-refinedweb',
            text_field='content',
            tokenizer=REQUIRED,
            max_tokens=65_000_000_000,
            valid_tokens=700_000_000,
            num_workers=-1,
        ),
    'local':
        dict(source='stdlib'),
}


def apply_recipe(cfg_data: ml_collections.ConfigDict, recipe: dict[str, Any]) -> None:
  """Sets the fields of a `DATA_RECIPES` entry on a config's data section."""
  for name, value in recipe.items():
    cfg_data[name] = value


class PendingJobs(ValueError):
  """Raised when this job has finished but others of `data.num_shards` have not."""


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
        f'training a SentencePiece tokenizer with data.vocab_size={vocab_size} failed: {e}') from e
  return model.getvalue()


def load_tokenizer(path: str | os.PathLike,
                   *,
                   field: str = 'data.tokenizer',
                   eos_token: str = '') -> tokenizer_lib.Tokenizer:
  """Loads a SentencePiece `.model` or Hugging Face `tokenizer.json`, errors naming `field`."""
  return tokenizer_lib.load(path, field=field, eos_token=eos_token)


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
          'recipe': TOKENIZER_RECIPE,
      }
  }


# ------------------------------------------------------------------------------ the plan


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


# ------------------------------------------------------------------------------ progress


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


# ---------------------------------------------------------------------------------- jobs


def _job_path(out_dir: Path, job: int, num_jobs: int) -> Path:
  return out_dir / JOBS_DIR / f'job-{job:05d}-of-{num_jobs:05d}.json'


def _job_of(cfg_data: Any) -> tuple[int, int]:
  job, num_jobs = int(cfg_data.shard), int(cfg_data.num_shards)
  if num_jobs < 1:
    raise ValueError(f'data.num_shards={num_jobs} must be at least 1')
  if not 0 <= job < num_jobs:
    raise ValueError(f'data.shard={job} outside [0, data.num_shards={num_jobs})')
  return job, num_jobs


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
    encode: Callable,
    tok: tokenizer_lib.Tokenizer,
) -> None:
  """Tokenizes this job's share of `stream` piece by piece, recording each finished piece."""
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
    atomic_write(_job_path(out_dir, job, num_jobs), json_bytes(record))

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
  atomic_write(_job_path(out_dir, job, num_jobs), json_bytes(record))


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
    tok = load_tokenizer(src, eos_token=spec['eos_token'])
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
      model = train_tokenizer(
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


# --------------------------------------------------------------------------------- prepare


def _reuse(manifest: Manifest, cfg_data: Any, seq_len: int,
           model_vocab_size: int | None) -> Manifest:
  """Checks that a finished directory fits this run (seq_len, tokenizer) and is intact."""
  m = manifest
  if m.seq_len != seq_len:
    raise ValueError(
        f'{m.dir} holds rows for seq_len={m.seq_len} ({m.seq_len + 1} tokens), not '
        f'model.seq_len={seq_len}: set data.data_dir to a directory prepared for {seq_len}, or '
        f'delete {m.dir}')
  src = cfg_data.tokenizer
  if src and src != REQUIRED:
    path = Path(src).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f'data.tokenizer: tokenizer file not found: {src!r}')
    if sha256_file(path) != m.tokenizer_sha256:
      raise ValueError(f'data.tokenizer={src!r} is not the tokenizer {m.dir} was prepared with '
                       f'({m.tokenizer_source}): use that one, or another data.data_dir')
  elif not src and m.tokenizer_file and cfg_data.format == 'tokens':
    vocab_size = int(cfg_data.vocab_size)
    if m.vocab_size != vocab_size:
      raise ValueError(
          f'{m.dir} was prepared with a {m.vocab_size}-token tokenizer, not '
          f'data.vocab_size={vocab_size}: set data.vocab_size={m.vocab_size} to use it, or '
          'another data.data_dir')
  if m.tokenizer_file and sha256_file(m.tokenizer_path) != m.tokenizer_sha256:
    raise ValueError(f'{m.tokenizer_path} does not match its sha256 in the manifest; delete '
                     f'{m.dir} and prepare again')
  for split in m.splits:
    for shard, path in zip(m.split_info(split)['shards'], m.split_files(split)):
      try:
        intact = file_rows(path, m.seq_len, m.dtype) == int(shard['rows'])
      except (OSError, ValueError):
        intact = False
      if not intact:
        raise ValueError(
            f'{path} is missing or not the {shard["rows"]} rows the manifest says; delete '
            f'{m.dir} and prepare again')
  check_model_vocab(m.vocab_size, model_vocab_size, f'tokenizer of {m.dir}')
  log.info('reusing prepared data in %s', m.dir)
  return m


def prepare_for_run(config: ml_collections.ConfigDict,
                    workdir,
                    *,
                    is_main: bool = True,
                    barrier: Callable[[], None] = lambda: None,
                    log=print) -> 'Manifest':
  """The data of a run in `workdir`: prepared by the main process (`is_main`); every process
  then passes `barrier` and the others load (and check) its manifest."""
  data_dir = resolve_data_dir(config.data, workdir)
  log(f'data: {data_dir}')
  manifest = None
  if is_main:
    # The run's own <workdir>/data (no data.data_dir), prepared by one job: an unfinished
    # preparation there is one a failed start of this workdir left (the workdir's lock keeps
    # other trainers out), so one with other settings is replaced rather than refused.
    section = schema.data_section(config.data)
    own = not section.data_dir and int(section.num_shards) == 1
    manifest = prepare(config.data,
                       data_dir,
                       config.model.seq_len,
                       model_vocab_size=config.model.vocab_size,
                       replace_unfinished=own,
                       log_replaced=log)
  barrier()
  if manifest is None:
    manifest = prepare(config.data,
                       data_dir,
                       config.model.seq_len,
                       model_vocab_size=config.model.vocab_size)
  for line in shortfall.messages(config.data, manifest):  # a split smaller than asked
    log(line)
  return manifest


def prepare(
    cfg_data: Any,
    out_dir: str | os.PathLike,
    seq_len: int,
    *,
    model_vocab_size: int | None = None,
    tokenizer_train_bytes: int = DEFAULT_TOKENIZER_TRAIN_BYTES,
    num_threads: int = 2,
    replace_unfinished: bool = False,
    log_replaced: Callable[[str], None] = log.info,
) -> Manifest:
  """Tokenizes every split of `cfg_data` into `out_dir`, or returns the manifest already there.

  Runs job `data.shard` of `data.num_shards` and, when that was the last job to finish, writes
  the manifest; raises `PendingJobs` (a ValueError) when other jobs have yet to finish.

  Args:
    cfg_data: the `cfg.data` ConfigDict (or a dict: absent fields take the schema's defaults).
    out_dir: the data directory, created if needed.
    seq_len: model context length; rows hold seq_len + 1 ids (inputs and shifted targets).
    model_vocab_size: if given, a tokenizer with more tokens than this is an error.
    tokenizer_train_bytes: how much training text the tokenizer sees (when one is trained).
    num_threads: threads for SentencePiece training, and for encoding without workers.
    replace_unfinished: an unfinished preparation in `out_dir` with other settings (or another
      tokenizer) is removed and prepared anew instead of refused; one with the same settings is
      resumed either way. For a directory no one else prepares (a run's own <workdir>/data).
    log_replaced: where the line about a replaced preparation goes.
  """
  if seq_len < 1:
    raise ValueError(f'seq_len must be positive, got {seq_len}')
  cfg_data = schema.data_section(cfg_data)
  out_dir = Path(out_dir)
  if (out_dir / MANIFEST_NAME).is_file():
    return _reuse(Manifest.load(out_dir), cfg_data, seq_len, model_vocab_size)
  data_format = cfg_data.format
  if data_format not in schema.DATA_FORMATS:
    raise ValueError(f'data.format={data_format!r} is not one of {schema.DATA_FORMATS}')
  if data_format == 'rows_bin':
    return rows_bin.prepare_rows_bin(cfg_data, out_dir, seq_len, model_vocab_size)
  job, num_jobs = _job_of(cfg_data)
  num_workers = resolve_num_workers(cfg_data.num_workers)
  streams, settings = _settings(cfg_data, seq_len, tokenizer_train_bytes, num_jobs)
  record_path = _job_path(out_dir, job, num_jobs)
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
        _run_stream(stream, cfg_data, out_dir, record, encode, tok)
    record['complete'] = True
    atomic_write(record_path, json_bytes(record))
  src = cfg_data.tokenizer
  return _merge(
      out_dir,
      settings,
      streams,
      tok,
      tok_path,
      str(Path(src).expanduser().resolve()) if src else 'trained',
  )


# ------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
  from structffn_jax import cli  # pylint: disable=g-import-not-at-top
  p = cli.parser(__doc__, 'structffn_jax.data.prepare')
  p.epilog += ('\n\nEach data flag sets one field of the data section (--source is --set '
               'data.source=...), after --set; --set data.<field>=value reaches any field.')

  def data_flag(flag, field, **kwargs):
    """A flag that sets data.<field>, typed like the schema's default (see _main)."""
    if 'choices' not in kwargs:
      kwargs['metavar'] = flag[2:].upper().replace('-', '_')
    p.add_argument(flag, dest=f'data.{field}', default=None, **kwargs)

  cli.add_config_flags(
      p,
      required=False,
      optional_help=(
          'its data section, model.seq_len and model.vocab_size; without it, --set and the data '
          "flags apply to the schema's defaults (structffn_jax/schema.py)"))
  p.add_argument('--out', default='', help='data directory to write (default: data.data_dir)')
  p.add_argument('--seq-len', type=cli.integer(1), help='default: model.seq_len of --config')
  p.add_argument('--model-vocab-size',
                 type=cli.integer(2),
                 help='the model vocabulary the tokenizer must fit in (default: model.vocab_size)')
  data_flag('--source', 'source', choices=sources.SOURCES, help='where the text comes from')
  data_flag('--train', 'train_paths', nargs='*', help='train files (hf: split names)')
  data_flag('--valid', 'valid_paths', nargs='*', help='validation files (hf: split names)')
  data_flag('--test', 'test_paths', nargs='*', help='test files (hf: split names)')
  data_flag('--vocab-size', 'vocab_size', type=int, help='size of the tokenizer to train')
  data_flag('--tokenizer',
            'tokenizer',
            help='existing SentencePiece .model or Hugging Face tokenizer.json')
  data_flag('--eos-token',
            'eos_token',
            help="token ending each document (tokenizer.json; default: the tokenizer's own)")
  data_flag('--text-field', 'text_field', help='field holding the text (jsonl, hf)')
  data_flag('--hf-name',
            'hf_name',
            help='Hugging Face hub dataset, or parquet|json|arrow|text|csv read from '
            '--hf-data-files')
  data_flag('--hf-config', 'hf_config', help='Hugging Face dataset config name')
  data_flag('--hf-path', 'hf_path', help='a directory written by datasets.save_to_disk')
  data_flag('--hf-data-files',
            'hf_data_files',
            nargs='*',
            help='local files or globs read by --hf-name parquet|json|...')
  data_flag('--stdlib-max-bytes',
            'stdlib_max_bytes',
            type=int,
            help='cap on standard-library text per split in bytes (0 = none)')
  data_flag('--max-tokens', 'max_tokens', type=float, help='cap per split, e.g. 65e9')
  data_flag('--valid-tokens',
            'valid_tokens',
            type=float,
            help='cap on validation tokens; carved from train when there is no valid input')
  data_flag('--valid-fraction',
            'valid_fraction',
            type=float,
            help='fraction of the train documents held out for validation')
  data_flag('--test-tokens',
            'test_tokens',
            type=float,
            help='cap on test tokens; carved from train when there is no test input')
  data_flag('--test-fraction',
            'test_fraction',
            type=float,
            help='fraction of the train documents held out for test')
  data_flag('--num-workers', 'num_workers', type=int, help='tokenizer processes (-1 = CPUs)')
  data_flag('--shard-tokens', 'shard_tokens', type=float, help='tokens per output file')
  data_flag('--shard', 'shard', type=int, help='this job (with --num-shards)')
  data_flag('--num-shards',
            'num_shards',
            type=int,
            help='jobs sharing the input (one per host); the last one writes the manifest')
  data_flag('--format',
            'format',
            choices=schema.DATA_FORMATS,
            help='tokens: tokenize the text; rows_bin: the inputs are token rows already')
  data_flag('--rows-dtype',
            'rows_dtype',
            choices=('uint16', 'uint32'),
            help='token type of rows_bin inputs')
  p.add_argument('--tokenizer-train-bytes',
                 type=cli.integer(1, 2**62),
                 default=DEFAULT_TOKENIZER_TRAIN_BYTES,
                 help='text the tokenizer is trained on, in bytes')
  p.add_argument('--num-threads', type=cli.integer(1), default=2,
                 help='threads of the tokenizer training')
  args = cli.parse(p, argv)
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter('%(asctime)s %(message)s'))
  log.addHandler(handler)
  level, propagate = log.level, log.propagate
  log.setLevel(logging.INFO)
  log.propagate = False
  try:
    return _main(args)
  except PendingJobs as e:
    log.info('%s', e)
    return 0
  except (ValueError, FileNotFoundError, ImportError, KeyError) as e:
    sys.exit(f'error: {e}')
  finally:
    log.removeHandler(handler)
    log.setLevel(level)
    log.propagate = propagate


def _main(args) -> int:
  """The run's config, from --config or the schema (`base_config()`), with --set and then the data
  flags applied and the whole validated as every command validates it."""
  from structffn_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  flags = [
      f'{dest}={value!r}' if isinstance(value, list) else f'{dest}={value}'
      for dest, value in vars(args).items()
      if dest.startswith('data.') and value is not None
  ]
  try:
    if args.config:
      config = config_lib.load(args.config, (*args.set, *flags))
    else:
      # No model to fit: the vocabulary is checked against --model-vocab-size only.
      config = config_lib.override(config_lib.base_config(), (*args.set, *flags))
      config.model.vocab_size = args.model_vocab_size or config.data.vocab_size
      config_lib.validate(config)
  except config_lib.ConfigError as e:
    raise ValueError(str(e)) from e
  seq_len, model_vocab_size = args.seq_len, args.model_vocab_size
  if args.config:
    seq_len = seq_len or config.model.seq_len
    model_vocab_size = model_vocab_size or config.model.vocab_size
  cfg = config.data
  out = args.out or cfg.data_dir
  if not out:
    raise ValueError('--out: where to write the data directory (or set data.data_dir)')
  if seq_len is None:
    raise ValueError('--seq-len is required without --config')
  cfg.data_dir = out
  manifest = prepare(
      cfg,
      out,
      seq_len,
      model_vocab_size=model_vocab_size,
      tokenizer_train_bytes=args.tokenizer_train_bytes,
      num_threads=args.num_threads,
  )
  summary = {
      s: {
          k: v for k, v in info.items() if k not in ('source', 'shards')
      } | {
          'files': len(info['shards']),
          'sha256': [shard['sha256'] for shard in info['shards']],
      } for s, info in manifest.splits.items()
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
      ))
  return 0


if __name__ == '__main__':
  sys.exit(main())
