"""Tokenization throughput of `prepare`: tokens/s per worker process, and scaling with workers.

  python -m structffn_jax.bench.tokenize [--workers 1,2] [--kinds sentencepiece,huggingface] \\
      [--stdlib-max-bytes 16000000 | --text FILE ...] [--vocab-size 32000] [--repeats 1]

Tokenizes one corpus (the Python standard library's train, valid and test splits by default, or
the given text files) into a fresh data directory per run with `prepare` and an existing
tokenizer, so the timing holds what a full-scale run spends per token: reading the documents,
sending chunks to the spawned workers (their start included), encoding, and writing the rows. The tokenizers are
trained once, beforehand, on the first 8 MB of the corpus with the project's SentencePiece
recipe and, for a `tokenizer.json`, a byte-level BPE from the `tokenizers` package (GPT-2's
kind), both of `--vocab-size` (32000, LLaMA's). 0 workers means tokenizing in the calling
process (SentencePiece with 2 threads, `tokenizers` with its own thread pool).

Prints one row per (tokenizer, workers): tokens, seconds, tokens/s, tokens/s per worker, the
speed-up over the first worker count, tokens per CPU-second of this process and its workers
(what one worker does on an idle core; other processes on the same cores lower the wall-clock
rates but not this), the CPU seconds of the calling process (reading, chunking, writing) and of
the workers (encoding), whose ratio bounds the speed-up more workers can give, and the load
average.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import shutil
import tempfile
import time

from structffn_jax import cli, schema
from structffn_jax.data import prepare as prep
from structffn_jax.data import sources
from structffn_jax.data import tokenizer as tokenizer_lib

_TRAIN_BYTES = 8_000_000


def _train_tokenizers(cfg, kinds, vocab_size: int, out: pathlib.Path) -> dict[str, pathlib.Path]:
  docs = list(tokenizer_lib._training_lines(sources.documents(cfg, 'train'), _TRAIN_BYTES))
  paths = {}
  if 'sentencepiece' in kinds:
    paths['sentencepiece'] = out / 'sp.model'
    paths['sentencepiece'].write_bytes(tokenizer_lib.train_tokenizer(docs, vocab_size))
  if 'huggingface' in kinds:
    import tokenizers  # pylint: disable=import-outside-toplevel
    from tokenizers import (  # pylint: disable=import-outside-toplevel
        decoders, models, pre_tokenizers, trainers)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=['<|endoftext|>'], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    paths['huggingface'] = out / 'tokenizer.json'
    tok.save(str(paths['huggingface']))
  return paths


def _cpu_seconds() -> tuple[float, float]:
  """CPU time of this process, and of its finished children (the workers, once shut down)."""
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
      resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def main(argv=None) -> int:
  p = cli.parser(__doc__, 'structffn_jax.bench.tokenize')
  p.add_argument('--workers', default='1,2', help='worker counts, comma-separated (0 = in process)')
  p.add_argument('--kinds', default='sentencepiece,huggingface',
                 help='tokenizers to time, comma-separated: sentencepiece, huggingface')
  p.add_argument('--text', nargs='*', default=None, help='text files instead of the stdlib')
  p.add_argument('--stdlib-max-bytes', type=cli.integer(1, 2**62), default=16_000_000,
                 help='standard-library text per split, in bytes')
  p.add_argument('--vocab-size', type=cli.integer(2), default=32000,
                 help='vocabulary of both tokenizers')
  p.add_argument('--seq-len', type=cli.integer(1), default=1024, help='tokens per row written')
  p.add_argument('--repeats', type=cli.integer(1), default=1,
                 help='runs per cell; the fastest is kept')
  p.add_argument('--json', default='', help='also write the rows to this file')
  args = cli.parse(p, argv)
  workers = [int(w) for w in args.workers.split(',')]
  kinds = args.kinds.split(',')

  cfg = schema.base_config().data
  if args.text:
    cfg.source, cfg.train_paths = 'text', list(args.text)
    corpus = ' + '.join(pathlib.Path(t).name for t in args.text)
  else:
    cfg.source, cfg.stdlib_max_bytes = 'stdlib', args.stdlib_max_bytes
    corpus = f'stdlib, up to {args.stdlib_max_bytes / 1e6:g} MB per split'
  n_bytes = sum(len(d.encode('utf-8')) for split in sources.available_splits(cfg)
                for d in sources.documents(cfg, split))
  print(f'corpus: {corpus}: {n_bytes / 1e6:.1f} MB; {os.cpu_count()} CPUs')
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    t0 = time.perf_counter()
    tokenizer_paths = _train_tokenizers(cfg, kinds, args.vocab_size, tmp)
    print(f'tokenizers trained in {time.perf_counter() - t0:.0f} s')
    print('| tokenizer | workers | tokens | s | tokens/s | tokens/s per worker | speed-up '
          '| MB/s | tokens per CPU-s | CPU-s main / workers | load avg |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for kind in kinds:
      base = None
      for w in workers:
        best = None
        for _ in range(args.repeats):
          out = tmp / f'{kind}-{w}'
          shutil.rmtree(out, ignore_errors=True)
          cfg.tokenizer, cfg.num_workers = str(tokenizer_paths[kind]), w
          cpu0, start = _cpu_seconds(), time.perf_counter()
          m = prep.prepare(cfg, out, args.seq_len)
          seconds, cpu1 = time.perf_counter() - start, _cpu_seconds()
          if best is None or seconds < best:
            best, main_cpu, worker_cpu = seconds, cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
        tokens = sum(i['tokens'] + i['dropped_tokens'] for i in m.splits.values())
        rate = tokens / best
        base = base or rate
        row = {'tokenizer': kind, 'workers': w, 'tokens': tokens, 'seconds': best,
               'tokens_per_s': rate, 'tokens_per_s_per_worker': rate / max(w, 1),
               'speedup': rate / base, 'mb_per_s': n_bytes / best / 1e6,
               'main_cpu_s': main_cpu, 'worker_cpu_s': worker_cpu,
               'tokens_per_cpu_s': tokens / (main_cpu + worker_cpu),
               'load_avg': os.getloadavg()[0]}
        rows.append(row)
        print(f"| {kind} | {w} | {tokens / 1e6:.2f}M | {best:.1f} | {rate / 1e6:.3f}M "
              f"| {row['tokens_per_s_per_worker'] / 1e6:.3f}M | {row['speedup']:.2f}x "
              f"| {row['mb_per_s']:.2f} | {row['tokens_per_cpu_s'] / 1e6:.3f}M "
              f"| {main_cpu:.1f} / {worker_cpu:.1f} | {row['load_avg']:.1f} |", flush=True)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps({'corpus': corpus, 'bytes': n_bytes,
                                                   'rows': rows}, indent=1) + '\n')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
