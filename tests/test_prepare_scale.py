"""Tests of `prepare` at scale, on small generated corpora: worker processes, pieces (sharded
splits), token caps, held-out splits carved by document hash, one job per host merged by the
manifest, resuming, local parquet shards, the rows_bin format and the paper configs' data."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from structffn_jax import config as config_lib
from structffn_jax import schema
from structffn_jax.data import encode, pieces, pipeline, prepare as prep, sources
from structffn_jax.data import settings as settings_lib
from structffn_jax.data import tokenizer as tokenizer_lib
from structffn_jax.data.manifest import Manifest
from tests import generated_text
from tests.generated_text import Interrupted

SEQ_LEN = 32
ROW = SEQ_LEN + 1
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """600 short documents as JSON lines, 100 more for validation, and a SentencePiece model."""
  d = tmp_path_factory.mktemp('corpus')
  docs = generated_text.documents(600, seed=0)
  valid = generated_text.documents(100, seed=1)
  for name, items in (('train.jsonl', docs), ('valid.jsonl', valid)):
    (d / name).write_text(''.join(json.dumps({'text': t}) + '\n' for t in items))
  model = d / 'sp.model'
  model.write_bytes(tokenizer_lib.train_tokenizer(docs, 700))
  return {'dir': d, 'docs': docs, 'valid': valid, 'model': model,
          'sp': spm.SentencePieceProcessor(model_file=str(model))}


def _cfg(corpus, valid=True, **overrides):
  cfg = schema.base_config().data
  cfg.source = 'jsonl'
  cfg.train_paths = [str(corpus['dir'] / 'train.jsonl')]
  cfg.valid_paths = [str(corpus['dir'] / 'valid.jsonl')] if valid else []
  cfg.tokenizer = str(corpus['model'])
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _ids(sp, docs) -> list[int]:
  return [i for doc in docs if doc for i in sp.encode(doc) + [sp.eos_id()]]


def _rows(ids) -> np.ndarray:
  n = len(ids) // ROW
  return np.asarray(ids[: n * ROW], dtype=np.int64).reshape(n, ROW)


def _all_rows(m, split) -> np.ndarray:
  rows = pipeline.open_split(m, split)
  return rows.read(np.arange(len(rows)))


def _shas(m):
  return {s: [f['sha256'] for f in i['shards']] for s, i in m.splits.items()}


def _record(m, job=0, num_jobs=1):
  return json.loads((m.dir / 'jobs' / f'job-{job:05d}-of-{num_jobs:05d}.json').read_text())


def _piece_reference(sp, docs, pieces, keep=lambda doc: True):
  """Rows of each piece, tokenized directly from the document range the job record gives it
  (those of its documents that `keep` selects)."""
  out, start = [], 0
  for piece in pieces:
    end = piece['doc_end']
    out.append(_rows(_ids(sp, [d for d in docs[start:end] if keep(d)])))
    start = end
  return np.concatenate(out)


def test_workers_and_pieces_give_the_same_rows(corpus, tmp_path):
  sp, docs = corpus['sp'], corpus['docs']
  one = prep.prepare(_cfg(corpus, shard_tokens=3000), tmp_path / 'w0', SEQ_LEN)
  two = prep.prepare(_cfg(corpus, shard_tokens=3000, num_workers=2), tmp_path / 'w2', SEQ_LEN)
  assert _shas(one) == _shas(two)
  files = one.split_files('train')
  assert len(files) > 5 and all(f.name.startswith('train-00000-') for f in files)
  # The shards form one row space: file after file, in order ...
  rows = pipeline.open_split(one, 'train')
  assert rows.shard_rows == [f['rows'] for f in one.splits['train']['shards']]
  by_file = np.concatenate([np.fromfile(f, np.uint16).reshape(-1, ROW) for f in files])
  np.testing.assert_array_equal(rows.read(np.arange(len(rows))), by_file)
  ids = np.random.default_rng(0).permutation(len(rows))[:50]
  np.testing.assert_array_equal(rows.read(ids), by_file[ids])
  np.testing.assert_array_equal(rows[-1], by_file[-1])
  # ... and each piece is its own documents tokenized directly, its partial last row dropped.
  pieces = _record(one)['streams']['train']['pieces']
  assert pieces[-1]['doc_end'] == len(docs)
  assert all(p['splits']['train']['rows'] >= 3000 // ROW for p in pieces[:-1])
  np.testing.assert_array_equal(by_file, _piece_reference(sp, docs, pieces))
  assert one.rows('train') == len(by_file)
  # Training batches read across files.
  stream = pipeline.BatchStream(one, global_batch=16, seed=0)
  np.testing.assert_array_equal(stream.get(3), by_file[stream.row_ids(3)])


def test_caps_stop_each_split(corpus, tmp_path):
  sp = corpus['sp']
  m = prep.prepare(_cfg(corpus, max_tokens=100 * ROW + 5, valid_tokens=20 * ROW), tmp_path,
                   SEQ_LEN)
  assert (m.rows('train'), m.rows('valid')) == (100, 20)
  np.testing.assert_array_equal(_all_rows(m, 'train'), _rows(_ids(sp, corpus['docs']))[:100])
  np.testing.assert_array_equal(_all_rows(m, 'valid'), _rows(_ids(sp, corpus['valid']))[:20])
  with pytest.raises(ValueError, match=r'data\.max_tokens=10 is less than one row'):
    prep.prepare(_cfg(corpus, max_tokens=10), tmp_path / 'x', SEQ_LEN)


def _unit(doc: str) -> float:
  """The documented routing hash: blake2b-64 of the UTF-8 text, as a fraction of 2^64."""
  return int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=8).digest(), 'big') / 2**64


def test_held_out_splits_carved_by_document_hash(corpus, tmp_path):
  sp, docs = corpus['sp'], corpus['docs']
  m = prep.prepare(_cfg(corpus, valid=False, valid_fraction=0.1, test_fraction=0.05, num_workers=2),
                   tmp_path / 'a', SEQ_LEN)
  route = {'valid': [d for d in docs if _unit(d) < 0.1],
           'test': [d for d in docs if 0.1 <= _unit(d) < 0.15],
           'train': [d for d in docs if _unit(d) >= 0.15]}
  assert 30 < len(route['valid']) < 90 and len(route['test']) > 10
  for split, split_docs in route.items():
    np.testing.assert_array_equal(_all_rows(m, split), _rows(_ids(sp, split_docs)))
    assert m.splits[split]['docs'] == len(split_docs)
  assert m.splits['valid']['source']['fraction'] == 0.1
  assert m.splits['valid']['source']['carved_from']['kind'] == 'jsonl'
  # A token count alone sets the fraction from the caps (with a margin) and caps the split.
  m = prep.prepare(_cfg(corpus, valid=False, max_tokens=1000 * ROW, valid_tokens=30 * ROW,
                        shard_tokens=10_000), tmp_path / 'b', SEQ_LEN)
  fraction = m.splits['valid']['source']['fraction']
  assert fraction == pytest.approx(1.25 * 30 / 1030) and 'test' not in m.splits
  pieces = _record(m)['streams']['train']['pieces']
  assert pieces[-1]['doc_end'] < len(docs)  # Train reached its cap and the stream stopped.
  assert (m.rows('train'), m.rows('valid')) == (1000, 30)
  for split, keep, cap in (('train', lambda d: _unit(d) >= fraction, 1000),
                           ('valid', lambda d: _unit(d) < fraction, 30)):
    np.testing.assert_array_equal(
        _all_rows(m, split), _piece_reference(sp, docs, pieces, keep)[:cap])
  with pytest.raises(ValueError, match=r'data\.valid_fraction=0\.1 carves.*data\.valid_paths'):
    prep.prepare(_cfg(corpus, valid_fraction=0.1), tmp_path / 'c', SEQ_LEN)


def test_jobs_per_host_merge_by_manifest(corpus, tmp_path):
  sp, docs = corpus['sp'], corpus['docs']
  cfg = _cfg(corpus, num_shards=2, shard_tokens=4000, max_tokens=201 * ROW)
  cfg.shard = 1
  with pytest.raises(prep.PendingJobs, match=r'jobs \[0\] of data\.num_shards=2'):
    prep.prepare(cfg, tmp_path, SEQ_LEN)
  assert not (tmp_path / 'manifest.json').exists()
  cfg.shard = 0
  m = prep.prepare(cfg, tmp_path, SEQ_LEN)
  names = [f.name for f in m.split_files('train')]
  assert names == sorted(names) and names[0].startswith('train-00000-')
  assert names[-1].startswith('train-00001-')
  # Job i read every second document from i; the cap of 201 rows is split 101 + 100.
  expected = []
  for job, share in ((0, 101), (1, 100)):
    pieces = _record(m, job, 2)['streams']['train']['pieces']
    rows = _piece_reference(sp, docs[job::2], pieces)
    expected.append(rows[:share])
    assert sum(p['splits']['train']['rows'] for p in pieces) == share
  np.testing.assert_array_equal(_all_rows(m, 'train'), np.concatenate(expected))
  assert m.rows('train') == 201
  # Another job count on the same directory is another preparation, not mixed in.
  other = _cfg(corpus, num_shards=3, shard_tokens=4000)
  assert prep.prepare(other, tmp_path, SEQ_LEN).splits == m.splits  # Finished: reused as is.


def test_resume_skips_finished_pieces(corpus, tmp_path, monkeypatch):
  cfg = _cfg(corpus, shard_tokens=5000)
  whole = prep.prepare(cfg, tmp_path / 'whole', SEQ_LEN)
  tokenized = []
  real_call = encode._Encoder.__call__

  def counting_call(self, task):
    tokenized.append(task[1])
    return real_call(self, task)

  real_documents = sources.documents

  def interrupted(cfg_data, split, shard=(0, 1), resume=None):
    docs = real_documents(cfg_data, split, shard, resume)
    return Interrupted(docs, 400) if split == 'train' else docs

  monkeypatch.setattr(encode._Encoder, '__call__', counting_call)
  monkeypatch.setattr(sources, 'documents', interrupted)
  with pytest.raises(KeyboardInterrupt):
    prep.prepare(cfg, tmp_path / 'part', SEQ_LEN)
  finished = json.loads((tmp_path / 'part/jobs/job-00000-of-00001.json').read_text())
  pieces = finished['streams']['train']['pieces']
  assert len(pieces) >= 2 and not finished['complete']
  done_docs = pieces[-1]['doc_end']
  stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'part').glob('train-*.bin')}
  assert len(stamps) == len(pieces) and not list((tmp_path / 'part').glob('.*tmp*'))
  with pytest.raises(ValueError, match=r'unfinished preparation with other settings.*shard_rows'):
    prep.prepare(_cfg(corpus, shard_tokens=6000), tmp_path / 'part', SEQ_LEN)

  monkeypatch.setattr(sources, 'documents', real_documents)
  tokenized.clear()
  m = prep.prepare(cfg, tmp_path / 'part', SEQ_LEN)
  assert _shas(m) == _shas(whole)
  # Only the documents after the last finished piece were tokenized again (train + valid).
  assert sum(tokenized) == len(corpus['docs']) - done_docs + len(corpus['valid'])
  assert stamps == {n: (tmp_path / 'part' / n).stat().st_mtime_ns for n in stamps}


def test_local_parquet_shards(corpus, tmp_path):
  pq = pytest.importorskip('pyarrow.parquet')
  pa = pytest.importorskip('pyarrow')
  docs, sp = corpus['docs'], corpus['sp']
  for i, part in enumerate((docs[:300], docs[300:])):
    pq.write_table(pa.table({'content': part, 'n': list(range(len(part)))}),
                   tmp_path / f'part-{i}.parquet')
  cfg = _cfg(corpus, False, source='hf', hf_name='parquet', text_field='content', train_paths=[],
             hf_data_files=[str(tmp_path / 'part-*.parquet')])
  m = prep.prepare(cfg, tmp_path / 'one', SEQ_LEN)
  np.testing.assert_array_equal(_all_rows(m, 'train'), _rows(_ids(sp, docs)))
  assert [f['path'] for f in m.splits['train']['source']['files']] == [
      str(tmp_path / 'part-0.parquet'), str(tmp_path / 'part-1.parquet')]
  # Two jobs: each streams one of the two files.
  for job in (1, 0):
    cfg.shard, cfg.num_shards = job, 2
    try:
      m = prep.prepare(cfg, tmp_path / 'two', SEQ_LEN)
    except prep.PendingJobs:
      pass
  expected = np.concatenate([_rows(_ids(sp, docs[:300])), _rows(_ids(sp, docs[300:]))])
  np.testing.assert_array_equal(_all_rows(m, 'train'), expected)
  cfg.hf_data_files = [str(tmp_path / 'nothing-*.parquet')]
  with pytest.raises(FileNotFoundError, match=r'data\.hf_data_files: no file matches'):
    prep.prepare(cfg, tmp_path / 'three', SEQ_LEN)


def test_streamed_dataset_resumes_from_its_saved_state(corpus, tmp_path, monkeypatch):
  pq = pytest.importorskip('pyarrow.parquet')
  pa = pytest.importorskip('pyarrow')
  docs = corpus['docs']
  for i in range(3):
    pq.write_table(pa.table({'content': docs[200 * i: 200 * (i + 1)]}), tmp_path / f'p{i}.parquet')
  cfg = _cfg(corpus, False, source='hf', hf_name='parquet', text_field='content', train_paths=[],
             hf_data_files=[str(tmp_path / 'p*.parquet')], shard_tokens=5000)
  whole = prep.prepare(cfg, tmp_path / 'whole', SEQ_LEN)
  pulled = []  # Examples the dataset yields.
  real_examples, real_documents = sources._HFDocuments._examples, sources.documents

  def counting(self):
    for doc in real_examples(self):
      pulled.append(doc)
      yield doc

  monkeypatch.setattr(sources._HFDocuments, '_examples', counting)
  monkeypatch.setattr(sources, 'documents', lambda c, s, shard=(0, 1), resume=None: Interrupted(
      real_documents(c, s, shard, resume), 450))
  with pytest.raises(KeyboardInterrupt):
    prep.prepare(cfg, tmp_path / 'part', SEQ_LEN)
  last = json.loads((tmp_path / 'part/jobs/job-00000-of-00001.json').read_text())[
      'streams']['train']['pieces'][-1]
  assert 200 < last['doc_end'] < 450 and last['resume']['part'] == 0
  assert last['resume']['dataset']['examples_iterable']  # The dataset's own state_dict.
  monkeypatch.setattr(sources, 'documents', real_documents)
  pulled.clear()
  m = prep.prepare(cfg, tmp_path / 'part', SEQ_LEN)
  assert _shas(m) == _shas(whole)
  assert pulled == docs[last['doc_end']:]  # Nothing before the last finished piece read again.


def test_rows_bin_format_read_in_place(corpus, tmp_path):
  """The paper authors' format: uint16 rows of 1025 tokens in one .bin, no manifest."""
  rng = np.random.default_rng(0)
  train = rng.integers(0, 32000, (40, 1025), dtype=np.uint16)
  valid = rng.integers(0, 32000, (8, 1025), dtype=np.uint16)
  train.tofile(tmp_path / 'train.bin')
  valid.tofile(tmp_path / 'val.bin')
  cfg = schema.base_config().data
  cfg.format = 'rows_bin'
  cfg.train_paths, cfg.valid_paths = [str(tmp_path / 'train.bin')], [str(tmp_path / 'val.bin')]
  m = prep.prepare(cfg, tmp_path / 'data', 1024, model_vocab_size=32000)
  assert (m.rows('train'), m.rows('valid'), m.dtype) == (40, 8, 'uint16')
  assert not list((tmp_path / 'data').glob('*.bin'))  # Read where they are, not copied.
  stream = pipeline.BatchStream(tmp_path / 'data', global_batch=8, seed=1)
  np.testing.assert_array_equal(stream.get(2), train[stream.row_ids(2)].astype(np.int32))
  batches = list(pipeline.eval_batches(m, 'valid', 4))
  np.testing.assert_array_equal(np.concatenate([t for t, _ in batches]), valid)
  # Reused as is on the next start; a split of two files is one row space.
  assert prep.prepare(cfg, tmp_path / 'data', 1024, model_vocab_size=32000).splits == m.splits
  cfg.train_paths = [str(tmp_path / 'train.bin'), str(tmp_path / 'val.bin')]
  two = prep.prepare(cfg, tmp_path / 'two', 1024, model_vocab_size=32000)
  np.testing.assert_array_equal(_all_rows(two, 'train'), np.concatenate([train, valid]))
  with pytest.raises(ValueError, match=r"data\.train_paths: .*train\.bin' is 82000 bytes, not "
                                       r'whole rows of seq_len\+1=2049.*model\.seq_len'):
    prep.prepare(cfg, tmp_path / 'bad', 2048, model_vocab_size=32000)
  with pytest.raises(ValueError, match=r'seq_len=1024 \(1025 tokens\), not model\.seq_len=512'):
    prep.prepare(cfg, tmp_path / 'data', 512, model_vocab_size=32000)
  with pytest.raises(ValueError, match=r'needs the model.s vocabulary size'):
    prep.prepare(cfg, tmp_path / 'novocab', 1024)
  with pytest.raises(ValueError, match=r'token id \d+, outside the tokenizer.s vocab of 1000'):
    pipeline.open_split(prep.prepare(cfg, tmp_path / 'small', 1024, model_vocab_size=1000),
                        'train')


def test_format_1_directories_still_read(tmp_path):
  rows = np.arange(5 * ROW, dtype=np.uint16).reshape(5, ROW) % 500
  rows.tofile(tmp_path / 'train.bin')
  (tmp_path / 'tokenizer.model').write_bytes(b'')
  manifest = {
      'format': 1, 'seq_len': SEQ_LEN, 'vocab_size': 512, 'dtype': 'uint16',
      'tokenizer_file': 'tokenizer.model', 'tokenizer_sha256': hashlib.sha256(b'').hexdigest(),
      'tokenizer_source': 'trained', 'eos_id': 2, 'bos_id': 1, 'settings': {},
      'splits': {'train': {'file': 'train.bin', 'rows': 5, 'tokens': 5 * ROW, 'docs': 3,
                           'dropped_tokens': 4, 'sha256': 'x', 'source': {}}},
  }
  (tmp_path / 'manifest.json').write_text(json.dumps(manifest))
  np.testing.assert_array_equal(_all_rows(tmp_path, 'train'), rows)
  cfg = schema.base_config().data
  cfg.vocab_size = 512
  assert prep.prepare(cfg, tmp_path, SEQ_LEN).rows('train') == 5


def test_paper_configs_name_the_refinedweb_recipe(tmp_path):
  for spec in ('configs/structured_ffn.py:model=xl,method=lowrank,fraction=32',
               'configs/wide_structured.py:model=m,variant=ours'):
    c = config_lib.load(os.path.join(REPO, spec))
    d = c.data
    assert (d.source, d.hf_name, d.text_field) == ('hf', 'tiiuae/falcon-refinedweb', 'content')
    assert (d.max_tokens, d.valid_tokens, c.model.seq_len) == (65e9, 0.7e9, 1024)
    with pytest.raises(ValueError, match=r'data\.tokenizer is required.*data=local'):
      prep.prepare(d, tmp_path / 'x', c.model.seq_len)
    assert not (tmp_path / 'x').exists()
    local = config_lib.load(os.path.join(REPO, spec + ',data=local'))
    assert local.data.source == 'stdlib' and local.data.tokenizer == ''
    assert local.name == c.name + '-local' and local.model == c.model
  # With the tokenizer set, the rest of the recipe is what prepare reads (here: offline).
  c = config_lib.load(os.path.join(REPO, 'configs/structured_ffn.py:model=s'))
  streams, caps = settings_lib._plan(c.data, 1024)
  assert caps == {'train': 65e9 // 1025, 'valid': 0.7e9 // 1025}
  assert streams[0].carve == (('valid', pytest.approx(1.25 * 0.7 / 65.7)),)


def _cli(args, **env):
  return subprocess.run([sys.executable, '-m', 'structffn_jax.data.prepare', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, 'PYTHONPATH': REPO, **env})


def test_cli_errors_are_one_line(tmp_path):
  cases = [
      (['--config', 'configs/structured_ffn.py:model=s', '--out', str(tmp_path / 'a')],
       'data.tokenizer is required'),
  ]
  sp_model = tmp_path / 'sp.model'
  sp_model.write_bytes(tokenizer_lib.train_tokenizer(generated_text.documents(200), 600))
  cases.append(
      (['--source', 'hf', '--hf-name', 'no-such-owner/no-such-dataset', '--seq-len', '32',
        '--tokenizer', str(sp_model), '--out', str(tmp_path / 'c')],
       "data.hf_name='no-such-owner/no-such-dataset': cannot open the dataset"))
  for args, words in cases:
    proc = _cli(args, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1')
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and proc.stdout == '', proc.stderr
    assert lines[-1].startswith('error: ') and words in lines[-1], proc.stderr
    assert 'Traceback' not in proc.stderr


def test_progress_line(corpus, tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(pieces, '_PROGRESS_SECONDS', 0.0)
  with caplog.at_level('INFO', logger=pieces.log.name):
    prep.prepare(_cfg(corpus, max_tokens=300 * ROW, shard_tokens=2000), tmp_path, SEQ_LEN)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('train: ')]
  assert len(lines) > 3
  assert all(' docs, ' in line and ' tokens/s' in line for line in lines)
  assert 'ETA ' in lines[0] and '/9.90k' in lines[0] and ' in 0h' in lines[-1]


def test_tokenize_benchmark(tmp_path):
  from structffn_jax.bench import tokenize  # pylint: disable=import-outside-toplevel
  text = tmp_path / 'corpus.txt'
  text.write_text(generated_text.wikitext(12, seed=5), encoding='utf-8')
  out = tmp_path / 'bench.json'
  assert tokenize.main(['--text', str(text), '--vocab-size', '600', '--seq-len', '32',
                        '--workers', '0,1', '--json', str(out)]) == 0
  rows = json.loads(out.read_text())['rows']
  assert [(r['tokenizer'], r['workers']) for r in rows] == [
      ('sentencepiece', 0), ('sentencepiece', 1), ('huggingface', 0), ('huggingface', 1)]
  assert rows[0]['tokens'] == rows[1]['tokens'] > 5_000
  assert all(r['tokens_per_s'] > 0 and r['tokens_per_cpu_s'] > 0 for r in rows)


def test_cli_from_a_config_data_local(tmp_path, capsys):
  """The paper config's data=local variant, prepared from its own data section by the CLI."""
  out = tmp_path / 'local'
  assert prep.main([
      '--config', os.path.join(REPO, 'configs/structured_ffn.py:model=s,data=local'),
      '--set', 'data.stdlib_max_bytes=150000', '--set', 'data.vocab_size=600',
      '--set', 'data.stdlib_tests=false', '--out', str(out), '--num-workers', '2',
  ]) == 0
  summary = json.loads(capsys.readouterr().out)
  m = Manifest.load(out)
  assert m.seq_len == 1024 and m.vocab_size == 600 and set(summary['splits']) == set(m.splits)
  assert m.splits['train']['source']['kind'] == 'stdlib' and m.rows('valid') > 0
  cfg = config_lib.load(os.path.join(REPO, 'configs/structured_ffn.py:model=s,data=local'),
                        ('data.stdlib_max_bytes=150000', 'data.stdlib_tests=false'))
  tok = m.load_tokenizer()
  ids = [i for doc in sources.documents(cfg.data, 'valid') if doc
         for i in tok.encode(doc) + [tok.eos_id]]
  n = len(ids) // 1025
  np.testing.assert_array_equal(_all_rows(m, 'valid'), np.reshape(ids[: n * 1025], (n, 1025)))


def test_large_splits_check_the_recorded_largest_ids(corpus, tmp_path, monkeypatch):
  m = prep.prepare(_cfg(corpus, shard_tokens=3000), tmp_path, SEQ_LEN)
  shards = m.splits['train']['shards']
  assert [s['max_id'] for s in shards] == [
      int(np.fromfile(f, np.uint16).max()) for f in m.split_files('train')]
  bad = np.memmap(m.split_files('train')[1], dtype=np.uint16, mode='r+')
  bad[5] = 703
  bad.flush()
  del bad
  with pytest.raises(ValueError, match=r'train-00000-00001\.bin contains token id 703.*700'):
    pipeline.open_split(m, 'train')  # Small: every file is scanned.
  monkeypatch.setattr(pipeline, 'SCAN_BYTES', 0)  # As if the split were 65B tokens.
  assert len(pipeline.open_split(m, 'train')) == m.rows('train')  # The record is trusted ...
  record = json.loads((tmp_path / 'manifest.json').read_text())
  record['splits']['train']['shards'][2]['max_id'] = 700
  (tmp_path / 'manifest.json').write_text(json.dumps(record))
  with pytest.raises(ValueError, match=r'train-00000-00002\.bin contains token id 700'):
    pipeline.open_split(tmp_path, 'train')  # ... and checked.
