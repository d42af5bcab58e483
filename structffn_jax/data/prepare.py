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

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import ml_collections

from structffn_jax import schema
from structffn_jax.data import rows_bin, shortfall, sources
from structffn_jax.data import tokenizer as tokenizer_lib
from structffn_jax.data.encode import resolve_num_workers
from structffn_jax.data.jobs import PendingJobs, _job_of, _merge, _run_job
from structffn_jax.data.manifest import (MANIFEST_NAME, REQUIRED, Manifest, check_model_vocab,
                                         file_rows, resolve_data_dir, sha256_file)
from structffn_jax.data.settings import _settings

# By name: run as `python -m structffn_jax.data.prepare`, this module's __name__ is '__main__'.
log = logging.getLogger('structffn_jax.data.prepare')

def load_tokenizer(path: str | os.PathLike,
                   *,
                   field: str = 'data.tokenizer',
                   eos_token: str = '') -> tokenizer_lib.Tokenizer:
  """Loads a SentencePiece `.model` or Hugging Face `tokenizer.json`, errors naming `field`."""
  return tokenizer_lib.load(path, field=field, eos_token=eos_token)


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
    tokenizer_train_bytes: int = tokenizer_lib.DEFAULT_TOKENIZER_TRAIN_BYTES,
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
  tok, tok_path = _run_job(
      cfg_data,
      out_dir,
      job,
      settings,
      streams,
      model_vocab_size=model_vocab_size,
      tokenizer_train_bytes=tokenizer_train_bytes,
      num_workers=num_workers,
      num_threads=num_threads,
      replace_unfinished=replace_unfinished,
      log_replaced=log_replaced,
  )
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
                 default=tokenizer_lib.DEFAULT_TOKENIZER_TRAIN_BYTES,
                 help='text the tokenizer is trained on, in bytes')
  p.add_argument('--num-threads', type=cli.integer(1), default=2,
                 help='threads of the tokenizer training')
  args = cli.parse(p, argv)
  # The lines of every module of the writer (this one, jobs, pieces) on stderr.
  writer_log = logging.getLogger('structffn_jax.data')
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter('%(asctime)s %(message)s'))
  writer_log.addHandler(handler)
  level, propagate = writer_log.level, writer_log.propagate
  writer_log.setLevel(logging.INFO)
  writer_log.propagate = False
  try:
    return _main(args)
  except PendingJobs as e:
    log.info('%s', e)
    return 0
  except (ValueError, FileNotFoundError, ImportError, KeyError) as e:
    sys.exit(f'error: {e}')
  finally:
    writer_log.removeHandler(handler)
    writer_log.setLevel(level)
    writer_log.propagate = propagate


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
