"""Tests of structffn_jax.data on generated WikiText-layout text, the Python stdlib, saved HF data."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from structffn_jax import schema
from structffn_jax.data import pipeline, prepare as prep, sources
from structffn_jax.data import tokenizer as tokenizer_lib
from structffn_jax.data.manifest import Manifest, token_dtype
from structffn_jax.data.prepare import load_tokenizer, prepare
from tests import generated_text
from tests.generated_text import Interrupted

SEQ_LEN = 64
VOCAB = 512


@pytest.fixture(scope='module')
def wiki_files(tmp_path_factory):
  d = tmp_path_factory.mktemp('wiki')
  train, valid = d / 'train.tokens', d / 'valid.tokens'
  train.write_text(generated_text.wikitext(100, seed=0), encoding='utf-8')
  valid.write_text(generated_text.wikitext(20, seed=1), encoding='utf-8')
  return train, valid


def _text_cfg(train: Path, valid: Path, **overrides):
  cfg = schema.base_config().data
  cfg.source = 'text'
  cfg.train_paths = [str(train)]
  cfg.valid_paths = [str(valid)]
  cfg.vocab_size = VOCAB
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


@pytest.fixture(scope='module')
def prepared(wiki_files, tmp_path_factory) -> Manifest:
  train, valid = wiki_files
  return prepare(_text_cfg(train, valid), tmp_path_factory.mktemp('prepared'), SEQ_LEN)


def _reference_rows(tok, docs, seq_len: int) -> np.ndarray:
  """Direct tokenization: each document's ids then EOS, concatenated, cut into whole rows."""
  ids = [i for doc in docs if doc for i in tok.encode(doc) + [tok.eos_id]]
  n_rows = len(ids) // (seq_len + 1)
  return np.asarray(ids[: n_rows * (seq_len + 1)]).reshape(n_rows, seq_len + 1)


def _stored_rows(manifest: Manifest, split: str) -> np.ndarray:
  return np.concatenate([
      np.fromfile(path, dtype=manifest.dtype).reshape(-1, manifest.seq_len + 1)
      for path in manifest.split_files(split)
  ])


def _shas(manifest: Manifest) -> dict:
  return {s: [shard['sha256'] for shard in i['shards']] for s, i in manifest.splits.items()}


# ------------------------------------------------------------------------------------ sources


def test_wikitext_split_per_article_and_joins_back(wiki_files):
  path = wiki_files[0]
  docs = list(sources.text_documents([str(path)]))
  text = path.read_text(encoding='utf-8')
  assert ''.join(docs) == text
  titles = [line for line in text.split('\n') if sources._WIKITEXT_TITLE.match(line)]
  assert len(docs) == len(titles) == 100
  assert docs[0].startswith(' \n' + titles[0] + '\n')
  assert all(d.startswith(t + '\n') for d, t in zip(docs[1:], titles[1:]))
  assert any(' = = ' in d for d in docs)  # Sections stay inside their articles.
  assert all(' = = ' not in d.split('\n')[1] for d in docs[1:])


def test_plain_file_is_one_document(tmp_path):
  path = tmp_path / 'input.txt'
  path.write_text('First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak.\n')
  assert list(sources.text_documents([str(path)])) == [path.read_text(encoding='utf-8')]


def test_stdlib_split_is_deterministic_and_disjoint():
  cap = 2_000_000
  splits = {s: sources.stdlib_files(s, cap, tests=False) for s in sources.SPLITS}
  assert splits == {s: sources.stdlib_files(s, cap, tests=False) for s in sources.SPLITS}
  names = {s: {rel for rel, _ in files} for s, files in splits.items()}
  assert not (names['train'] & names['valid']) and not (names['train'] & names['test'])
  assert not (names['valid'] & names['test'])
  assert names['valid'] and names['test']
  assert all(sources.stdlib_split_of(rel) == s for s in names for rel in names[s])
  assert all('site-packages' not in rel and '/test/' not in f'/{rel}' for rel in names['train'])
  total = sum(size for _, size in splits['train'])
  assert cap * 0.9 < total <= cap
  docs = list(sources.stdlib_documents('valid', cap))
  assert docs == list(sources.stdlib_documents('valid', cap)) and all(
      isinstance(d, str) for d in docs
  )


def test_missing_files_name_path_and_field(wiki_files, tmp_path):
  train, valid = wiki_files
  missing = tmp_path / 'nope.txt'
  with pytest.raises(FileNotFoundError, match=r'data\.train_paths.*nope\.txt'):
    prepare(_text_cfg(missing, valid), tmp_path / 'a', SEQ_LEN)
  with pytest.raises(FileNotFoundError, match=r'data\.valid_paths.*nope\.txt'):
    prepare(_text_cfg(train, missing), tmp_path / 'b', SEQ_LEN)
  with pytest.raises(FileNotFoundError, match=r'data\.tokenizer.*nope\.model'):
    prepare(
        _text_cfg(train, valid, tokenizer=str(tmp_path / 'nope.model')), tmp_path / 'c', SEQ_LEN
    )
  with pytest.raises(ValueError, match=r'data\.train_paths'):
    prepare(_text_cfg(train, valid, train_paths=[]), tmp_path / 'd', SEQ_LEN)
  latin1 = tmp_path / 'latin1.txt'
  latin1.write_bytes('caf\xe9\n'.encode('latin-1'))
  with pytest.raises(ValueError, match=r'data\.train_paths.*latin1\.txt.*UTF-8'):
    list(sources.text_documents([str(latin1)], field='data.train_paths'))
  assert not (tmp_path / 'a' / 'manifest.json').exists()


def test_jsonl_missing_field_names_text_field(tmp_path):
  path = tmp_path / 'x.jsonl'
  path.write_text(json.dumps({'body': 'hello'}) + '\n')
  with pytest.raises(ValueError, match=r'x\.jsonl:1.*data\.text_field'):
    list(sources.jsonl_documents([str(path)], 'text'))


def test_hf_without_datasets_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, 'datasets', None)
  with pytest.raises(ImportError, match='pip install datasets'):
    list(sources.hf_documents(name='wikitext', splits=['train']))


# ---------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_wikitext(prepared):
  tok = load_tokenizer(prepared.tokenizer_path)
  assert tok.vocab_size == VOCAB == prepared.vocab_size and tok.kind == 'sentencepiece'
  # Text the tokenizer was not trained on: other articles, with accents, CJK and emoji.
  text = generated_text.wikitext(30, seed=7)
  assert any(ord(c) > 0x4E00 for c in text)
  assert tok.decode(tok.encode(text)) == text


def test_tokenizer_round_trips_python_source(prepared):
  tok = load_tokenizer(prepared.tokenizer_path)
  odd = (
      'def f(x):\n\tif x:  \n\t\treturn  x\t# tab\n\n\n\n    pass   \r\n'
      's = \'  two  spaces  \', "\u00e9\u00e8 \u4e2d\u6587 \U0001f600"\n\x0b\x0c\x00end'
  )
  stdlib_file = Path(sources.stdlib_root()) / 'textwrap.py'
  for text in (odd, stdlib_file.read_text(encoding='utf-8'), '   leading', 'trailing   '):
    assert tok.decode(tok.encode(text)) == text


# ---------------------------------------------------------------------------------- prepared


def test_rows_equal_direct_tokenization(prepared, wiki_files):
  tok = load_tokenizer(prepared.tokenizer_path)
  for split, path in zip(('train', 'valid'), wiki_files):
    expected = _reference_rows(tok, sources.text_documents([str(path)]), SEQ_LEN)
    stored = _stored_rows(prepared, split)
    assert stored.shape == expected.shape and expected.shape[0] > 100
    np.testing.assert_array_equal(stored, expected)
    assert prepared.rows(split) == expected.shape[0]
    np.testing.assert_array_equal(
        pipeline.open_split(prepared, split).read(np.arange(len(expected))), expected
    )


def test_manifest_checksums_and_layout(prepared):
  on_disk = json.loads((prepared.dir / 'manifest.json').read_text())
  assert (
      on_disk['vocab_size'] == VOCAB
      and on_disk['seq_len'] == SEQ_LEN
      and on_disk['dtype'] == 'uint16'
      and on_disk['tokenizer_kind'] == 'sentencepiece'
  )
  assert (
      prepared.tokenizer_sha256 == hashlib.sha256(prepared.tokenizer_path.read_bytes()).hexdigest()
  )
  for split, info in on_disk['splits'].items():
    assert len(info['shards']) == 1  # Less text than data.shard_tokens: one file.
    shard = info['shards'][0]
    data = (prepared.dir / shard['file']).read_bytes()
    assert hashlib.sha256(data).hexdigest() == shard['sha256']
    assert len(data) == info['rows'] * (SEQ_LEN + 1) * 2 == info['tokens'] * 2
    assert shard['rows'] == info['rows']
    assert 0 <= info['dropped_tokens'] <= SEQ_LEN
    assert info['source']['kind'] == 'text' and len(info['source']['files'][0]['sha256']) == 64
  assert sorted(p.name for p in prepared.dir.iterdir()) == [
      'jobs',
      'manifest.json',
      'tokenizer.model',
      'train-00000-00000.bin',
      'valid-00000-00000.bin',
  ]


def test_token_dtype_uint16_vs_uint32():
  assert token_dtype(512) == np.uint16 and token_dtype(65535) == np.uint16
  assert token_dtype(65536) == np.uint32 and token_dtype(128_256) == np.uint32


def test_prepare_is_idempotent(prepared, wiki_files):
  stamps = {p.name: p.stat().st_mtime_ns for p in prepared.dir.iterdir()}
  again = prepare(_text_cfg(*wiki_files), prepared.dir, SEQ_LEN)
  assert again == Manifest.load(prepared.dir) and again.splits == prepared.splits
  assert stamps == {p.name: p.stat().st_mtime_ns for p in prepared.dir.iterdir()}


def test_reuse_needs_only_seq_len_and_tokenizer(prepared, wiki_files, tmp_path):
  before = (prepared.dir / 'manifest.json').read_bytes()
  # Other inputs, caps, workers and shard sizes: the directory is used as it is, unread.
  other = _text_cfg(
      tmp_path / 'gone.txt', tmp_path / 'gone-too.txt', max_tokens=1000, num_workers=2,
      shard_tokens=100,
  )
  assert prepare(other, prepared.dir, SEQ_LEN).splits == prepared.splits
  assert prepare(
      _text_cfg(*wiki_files, tokenizer=str(prepared.tokenizer_path)), prepared.dir, SEQ_LEN
  ).splits == prepared.splits
  with pytest.raises(ValueError, match=r'seq_len=64 \(65 tokens\), not model\.seq_len=32'):
    prepare(_text_cfg(*wiki_files), prepared.dir, 32)
  with pytest.raises(ValueError, match=r'512-token tokenizer, not data\.vocab_size=1024'):
    prepare(_text_cfg(*wiki_files, vocab_size=1024), prepared.dir, SEQ_LEN)
  other_tok = tmp_path / 'other.model'
  other_tok.write_bytes(tokenizer_lib.train_tokenizer(generated_text.documents(200), 600))
  with pytest.raises(ValueError, match=r'other\.model.*is not the tokenizer'):
    prepare(_text_cfg(*wiki_files, tokenizer=str(other_tok)), prepared.dir, SEQ_LEN)
  assert (prepared.dir / 'manifest.json').read_bytes() == before


def test_tokenizer_larger_than_model_vocab(prepared, wiki_files, tmp_path):
  with pytest.raises(ValueError, match=r'512 tokens.*model\.vocab_size=256'):
    prepare(_text_cfg(*wiki_files), prepared.dir, SEQ_LEN, model_vocab_size=256)
  with pytest.raises(ValueError, match=r'512 tokens.*model\.vocab_size=500'):
    prepare(
        _text_cfg(*wiki_files, tokenizer=str(prepared.tokenizer_path)),
        tmp_path / 'x',
        SEQ_LEN,
        model_vocab_size=500,
    )
  assert not list((tmp_path / 'x').glob('*.bin'))


def test_unusable_sizes_name_the_setting(prepared, wiki_files, tmp_path):
  with pytest.raises(ValueError, match=r'data\.vocab_size=100000.*too high'):
    prepare(_text_cfg(*wiki_files, vocab_size=100_000), tmp_path / 'big', SEQ_LEN)
  tiny = tmp_path / 'tiny.txt'
  tiny.write_text(' = Tiny = \n a few words only \n')
  cfg = _text_cfg(wiki_files[0], tiny, tokenizer=str(prepared.tokenizer_path))
  with pytest.raises(ValueError, match=r"split 'valid' has \d+ tokens.*data\.valid_paths"):
    prepare(cfg, tmp_path / 'short', SEQ_LEN)
  assert not (tmp_path / 'short' / 'manifest.json').exists()


def test_existing_tokenizer_reproduces_rows(prepared, wiki_files, tmp_path):
  m = prepare(
      _text_cfg(*wiki_files, tokenizer=str(prepared.tokenizer_path)),
      tmp_path / 'x',
      SEQ_LEN,
      model_vocab_size=512,
  )
  assert m.tokenizer_sha256 == prepared.tokenizer_sha256
  assert m.tokenizer_source == str(prepared.tokenizer_path.resolve())
  assert _shas(m) == _shas(prepared)


def test_tokenizer_training_is_deterministic(prepared, wiki_files, tmp_path):
  m = prepare(_text_cfg(*wiki_files), tmp_path / 'again', SEQ_LEN)
  assert m.tokenizer_sha256 == prepared.tokenizer_sha256
  assert _shas(m) == _shas(prepared)


def test_interrupted_prepare_resumes_with_the_same_rows(
    prepared, wiki_files, tmp_path, monkeypatch
):
  real_documents = sources.documents

  def failing_documents(cfg, split, shard=(0, 1), resume=None):
    docs = real_documents(cfg, split, shard, resume)
    return Interrupted(docs, 3) if split == 'valid' else docs

  cfg = _text_cfg(*wiki_files, tokenizer=str(prepared.tokenizer_path))
  monkeypatch.setattr(sources, 'documents', failing_documents)
  with pytest.raises(KeyboardInterrupt):
    prepare(cfg, tmp_path, SEQ_LEN)
  # Train finished and recorded; nothing of valid, no manifest, no temporary file left.
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      'jobs', 'tokenizer.model', 'train-00000-00000.bin'
  ]
  stamp = (tmp_path / 'train-00000-00000.bin').stat().st_mtime_ns
  monkeypatch.setattr(sources, 'documents', real_documents)
  m = prepare(cfg, tmp_path, SEQ_LEN)
  assert _shas(m) == _shas(prepared)
  assert (tmp_path / 'train-00000-00000.bin').stat().st_mtime_ns == stamp


def test_jsonl_and_hf_sources_match_text(prepared, wiki_files, tmp_path):
  train_docs = list(sources.text_documents([str(wiki_files[0])]))
  valid_docs = list(sources.text_documents([str(wiki_files[1])]))
  for split, docs in (('train', train_docs), ('valid', valid_docs)):
    with open(tmp_path / f'{split}.jsonl', 'w') as f:
      for doc in docs:
        f.write(json.dumps({'id': 0, 'body': doc}) + '\n\n')
  cfg = _text_cfg(
      tmp_path / 'train.jsonl',
      tmp_path / 'valid.jsonl',
      source='jsonl',
      text_field='body',
      tokenizer=str(prepared.tokenizer_path),
  )
  assert list(sources.documents(cfg, 'train')) == train_docs
  m = prepare(cfg, tmp_path / 'jsonl', SEQ_LEN)
  assert _shas(m) == _shas(prepared)

  datasets = pytest.importorskip('datasets')
  saved = tmp_path / 'hf_saved'
  datasets.DatasetDict(
      {
          'train': datasets.Dataset.from_dict({'text': train_docs}),
          'validation': datasets.Dataset.from_dict({'text': valid_docs}),
      }
  ).save_to_disk(str(saved))
  cfg = _text_cfg(
      'train',
      'validation',
      source='hf',
      hf_path=str(saved),
      train_paths=[],
      tokenizer=str(prepared.tokenizer_path),
  )
  assert list(sources.documents(cfg, 'valid')) == valid_docs
  m = prepare(cfg, tmp_path / 'hf', SEQ_LEN)
  assert _shas(m) == _shas(prepared)
  assert m.splits['train']['source']['path'] == str(saved.resolve())
  with pytest.raises(FileNotFoundError, match=r'data\.hf_path.*missing'):
    prepare(
        _text_cfg('train', 'validation', source='hf', hf_path=str(tmp_path / 'missing')),
        tmp_path / 'y',
        SEQ_LEN,
    )


def test_stdlib_end_to_end_and_cli(tmp_path, capsys):
  cfg = schema.base_config().data
  cfg.stdlib_max_bytes = 300_000
  cfg.vocab_size = VOCAB
  m = prepare(cfg, tmp_path / 'lib', SEQ_LEN)
  assert (
      set(m.splits) == {'train', 'valid', 'test'}
      and m.splits['train']['source']['kind'] == 'stdlib'
  )
  tok = m.load_tokenizer()
  expected = _reference_rows(tok, sources.documents(cfg, 'valid'), SEQ_LEN)
  np.testing.assert_array_equal(
      pipeline.open_split(m, 'valid').read(np.arange(len(expected))), expected
  )

  argv = [
      '--source',
      'stdlib',
      '--out',
      str(tmp_path / 'cli'),
      '--seq-len',
      str(SEQ_LEN),
      '--vocab-size',
      str(VOCAB),
      '--stdlib-max-bytes',
      '300000',
  ]
  assert prep.main(argv) == 0
  summary = json.loads(capsys.readouterr().out)
  assert {s: i['sha256'] for s, i in summary['splits'].items()} == _shas(m)


# ---------------------------------------------------------------------------------- pipeline


def test_pipeline_rejects_out_of_range_ids(prepared, tmp_path):
  bad = tmp_path / 'bad'
  shutil.copytree(prepared.dir, bad)
  data = np.memmap(bad / 'valid-00000-00000.bin', dtype=np.uint16, mode='r+')
  data[17] = VOCAB + 3
  data.flush()
  del data
  with pytest.raises(ValueError, match=r'valid-00000-00000\.bin contains token id 515.*512'):
    pipeline.open_split(bad, 'valid')
  with pytest.raises(KeyError, match='test'):
    pipeline.open_split(bad, 'test')
  with pytest.raises(FileNotFoundError, match='manifest'):
    pipeline.open_split(tmp_path, 'train')


def test_token_rows_pickle(prepared):
  import pickle

  rows = pipeline.open_split(prepared, 'train')
  first = rows[5]
  clone = pickle.loads(pickle.dumps(rows))
  np.testing.assert_array_equal(clone[5], first)
  assert first.shape == (SEQ_LEN + 1,) and first.dtype == np.int32


def test_train_iterator_resumes_exactly(prepared):
  it = pipeline.make_train_iterator(prepared.dir, global_batch=8, seed=3)
  first = [next(it) for _ in range(5)]
  state = json.loads(json.dumps(it.get_state()))
  assert state == {'next_index': 5}
  rest = [next(it) for _ in range(5)]
  it.close()
  resumed = pipeline.make_train_iterator(prepared, global_batch=8, seed=3)
  resumed.set_state(state)
  again = [next(resumed) for _ in range(5)]
  resumed.close()
  for a, b in zip(rest, again):
    assert a.dtype == np.int32 and a.shape == (8, SEQ_LEN + 1)
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[0], rest[0])
  stream = pipeline.BatchStream(prepared, global_batch=8, seed=3)
  for d, batch in enumerate(first + rest):
    np.testing.assert_array_equal(stream.get(d), batch)


def test_processes_split_the_global_batch(prepared):
  whole = pipeline.BatchStream(prepared, global_batch=8, seed=1)
  parts = [
      pipeline.BatchStream(prepared, global_batch=8, seed=1, process_index=p, process_count=2)
      for p in range(2)
  ]
  epoch_end = whole.batches_per_epoch
  for d in (0, 1, 7, epoch_end - 1, epoch_end, 3 * epoch_end + 5):
    shares = [s.get(d) for s in parts]
    assert shares[0].shape == (4, SEQ_LEN + 1)
    np.testing.assert_array_equal(np.concatenate(shares), whole.get(d))
  its = [s.iterate(10) for s in parts]
  for d in range(10, 14):
    np.testing.assert_array_equal(np.concatenate([next(i) for i in its]), whole.get(d))
  with pytest.raises(ValueError, match=r'train\.global_batch=9'):
    pipeline.BatchStream(prepared, global_batch=9, seed=1, process_index=0, process_count=2)


def test_epochs_cover_rows_and_reshuffle(prepared):
  stream = pipeline.BatchStream(prepared, global_batch=16, seed=0)
  n, per_epoch = prepared.rows('train'), stream.batches_per_epoch
  assert per_epoch == n // 16
  epoch = [
      np.concatenate([stream.global_row_ids(e * per_epoch + j) for j in range(per_epoch)])
      for e in range(2)
  ]
  for ids in epoch:
    assert len(np.unique(ids)) == len(ids) == per_epoch * 16 and ids.min() >= 0 and ids.max() < n
  assert not np.array_equal(epoch[0], epoch[1])
  other_seed = pipeline.BatchStream(prepared, global_batch=16, seed=1)
  assert not np.array_equal(other_seed.global_row_ids(0), stream.global_row_ids(0))
  assert not np.array_equal(other_seed.global_row_ids(0), stream.global_row_ids(per_epoch))
  rows = pipeline.open_split(prepared, 'train')
  np.testing.assert_array_equal(stream.get(per_epoch + 2), rows.read(stream.row_ids(per_epoch + 2)))


def test_fixedflop_replay_sees_same_batches(prepared):
  guide_steps, restart = 6, 10  # Steps [0, G) and [S, S + G) read the same data.
  stream = pipeline.BatchStream(prepared, global_batch=8, seed=5)
  it = stream.iterate(0, index_fn=lambda t: t if t < restart else t - restart)
  seen = [next(it) for _ in range(restart + guide_steps)]
  for t in range(guide_steps):
    np.testing.assert_array_equal(seen[restart + t], seen[t])
  assert not np.array_equal(seen[guide_steps], seen[0])
  # Resuming mid-replay continues the replay.
  it.set_state({'next_index': restart + 2})
  np.testing.assert_array_equal(next(it), seen[2])
  it.close()


def test_eval_batches_cover_every_row_once(prepared):
  rows = pipeline.open_split(prepared, 'valid')
  n = len(rows)
  all_rows = rows.read(np.arange(n))
  batches = list(pipeline.eval_batches(prepared, 'valid', 48))
  assert len(batches) == pipeline.num_eval_batches(prepared, 'valid', 48) == -(-n // 48)
  tokens = np.concatenate([t[m] for t, m in batches])
  np.testing.assert_array_equal(tokens, all_rows)
  assert sum(int(m.sum()) for _, m in batches) == n and n % 48 != 0
  assert not batches[-1][1].all() and (batches[-1][0][~batches[-1][1]] == 0).all()
  # Two processes: interleaving their shares batch by batch gives the same rows.
  shares = [
      list(pipeline.eval_batches(prepared, 'valid', 48, process_index=p, process_count=2))
      for p in range(2)
  ]
  merged = np.concatenate([np.concatenate([a[0][a[1]], b[0][b[1]]]) for a, b in zip(*shares)])
  np.testing.assert_array_equal(merged, all_rows)
  capped = list(pipeline.eval_batches(prepared, 'valid', 48, max_rows=100))
  np.testing.assert_array_equal(np.concatenate([t[m] for t, m in capped]), all_rows[:100])
