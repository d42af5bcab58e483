"""Tests of the tokenizers `prepare` accepts: an existing SentencePiece `.model`, and Hugging Face
`tokenizer.json` files trained here with the `tokenizers` package (no download)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from structffn_jax import schema
from structffn_jax.data import pipeline, prepare as prep, sources, tokenizer as tokenizer_lib
from tests import generated_text

SEQ_LEN = 32


def _bpe_json(path, docs, vocab_size=600, specials=('<|endoftext|>',), post=None):
  """A byte-level BPE tokenizer.json trained on `docs` (the GPT-2 / LLaMA 3 kind)."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(docs, trainer)
  if post:
    tok.post_processor = post(tok)
  tok.save(str(path))
  return path


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  d = tmp_path_factory.mktemp('corpus')
  train, valid = d / 'train.txt', d / 'valid.txt'
  train.write_text(generated_text.wikitext(40, seed=3), encoding='utf-8')
  valid.write_text(generated_text.wikitext(8, seed=4), encoding='utf-8')
  return train, valid


def _cfg(corpus, **overrides):
  cfg = schema.base_config().data
  cfg.source = 'text'
  cfg.train_paths, cfg.valid_paths = [str(corpus[0])], [str(corpus[1])]
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _reference_rows(encode, eos, docs, seq_len=SEQ_LEN) -> np.ndarray:
  ids = [i for doc in docs if doc for i in list(encode(doc)) + [eos]]
  n = len(ids) // (seq_len + 1)
  return np.asarray(ids[: n * (seq_len + 1)]).reshape(n, seq_len + 1)


def _docs(path):
  return list(sources.text_documents([str(path)]))


def test_hf_tokenizer_json_rows_equal_direct_encoding(corpus, tmp_path):
  path = _bpe_json(tmp_path / 'tokenizer.json', _docs(corpus[0]))
  reference = tokenizers.Tokenizer.from_file(str(path))
  eos = reference.token_to_id('<|endoftext|>')
  # Two worker processes: the tokenizer travels to them as its file's bytes.
  m = prep.prepare(_cfg(corpus, tokenizer=str(path), num_workers=2), tmp_path / 'out', SEQ_LEN,
                   model_vocab_size=600)
  assert (m.tokenizer_kind, m.tokenizer_file, m.eos_id, m.bos_id) == (
      'huggingface', 'tokenizer.json', eos, -1)
  assert m.vocab_size == reference.get_vocab_size() == 600 and m.dtype == 'uint16'
  assert (m.dir / 'tokenizer.json').read_bytes() == path.read_bytes()
  for split, file in zip(('train', 'valid'), corpus):
    expected = _reference_rows(lambda d: reference.encode(d).ids, eos, _docs(file))
    rows = pipeline.open_split(m, split)
    assert len(rows) == len(expected) > 50
    np.testing.assert_array_equal(rows.read(np.arange(len(rows))), expected)
  text = generated_text.wikitext(3, seed=9)
  tok = m.load_tokenizer()
  assert tok.decode(tok.encode(text)) == text
  with pytest.raises(ValueError, match=r'600 tokens, more than model\.vocab_size=500'):
    prep.prepare(_cfg(corpus, tokenizer=str(path)), tmp_path / 'small', SEQ_LEN,
                 model_vocab_size=500)


def test_hf_post_processor_specials_are_not_added(corpus, tmp_path):
  """A LLaMA-3-like tokenizer.json whose post-processor prepends BOS: rows hold documents + EOS
  only, EOS is <|end_of_text|> and BOS is recorded."""

  def template(tok):
    bos = tok.token_to_id('<|begin_of_text|>')
    return processors.TemplateProcessing(
        single='<|begin_of_text|> $A', special_tokens=[('<|begin_of_text|>', bos)])

  path = _bpe_json(tmp_path / 'llama3.json', _docs(corpus[0]),
                   specials=('<|begin_of_text|>', '<|end_of_text|>'), post=template)
  reference = tokenizers.Tokenizer.from_file(str(path))
  bos, eos = reference.token_to_id('<|begin_of_text|>'), reference.token_to_id('<|end_of_text|>')
  assert reference.encode('x').ids[0] == bos
  m = prep.prepare(_cfg(corpus, tokenizer=str(path)), tmp_path / 'out', SEQ_LEN)
  assert (m.eos_id, m.bos_id) == (eos, bos)
  expected = _reference_rows(lambda d: reference.encode(d).ids[1:], eos, _docs(corpus[1]))
  np.testing.assert_array_equal(
      pipeline.open_split(m, 'valid').read(np.arange(len(expected))), expected)


def test_eos_token_must_exist(corpus, tmp_path):
  path = _bpe_json(tmp_path / 'plain.json', _docs(corpus[1]), vocab_size=400,
                   specials=('<sep>',))
  with pytest.raises(ValueError, match=r'plain\.json.*set data\.eos_token'):
    prep.prepare(_cfg(corpus, tokenizer=str(path)), tmp_path / 'a', SEQ_LEN)
  with pytest.raises(ValueError, match=r"data\.eos_token='<end>' is not a token"):
    prep.prepare(_cfg(corpus, tokenizer=str(path), eos_token='<end>'), tmp_path / 'b', SEQ_LEN)
  m = prep.prepare(_cfg(corpus, tokenizer=str(path), eos_token='<sep>'), tmp_path / 'c', SEQ_LEN)
  assert m.eos_id == tokenizers.Tokenizer.from_file(str(path)).token_to_id('<sep>')


def test_vocabulary_above_65535_is_stored_as_uint32(tmp_path):
  """A 70,000-word WordLevel tokenizer.json; documents use ids on both sides of 65535."""
  vocab = {'<|endoftext|>': 0, '[UNK]': 1, **{f'w{i}': i for i in range(2, 70_000)}}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  path = tmp_path / 'big.json'
  tok.save(str(path))
  rng = np.random.default_rng(0)
  docs = [' '.join(f'w{i}' for i in rng.integers(60_000, 70_000, rng.integers(5, 60)))
          for _ in range(300)]
  corpus = tmp_path / 'docs.jsonl'
  corpus.write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
  cfg = schema.base_config().data
  cfg.source, cfg.train_paths, cfg.tokenizer = 'jsonl', [str(corpus)], str(path)
  m = prep.prepare(cfg, tmp_path / 'out', SEQ_LEN, model_vocab_size=70_016)
  assert m.dtype == 'uint32' and m.vocab_size == 70_000
  expected = _reference_rows(lambda d: [int(w[1:]) for w in d.split()], 0, docs)
  assert expected.max() > 65535 and expected[expected > 0].min() < 65535
  assert m.split_files('train')[0].stat().st_size == expected.size * 4
  rows = pipeline.open_split(m, 'train')
  np.testing.assert_array_equal(rows.read(np.arange(len(rows))), expected)
  with pytest.raises(ValueError, match=r'70000 tokens, more than model\.vocab_size=32000'):
    prep.prepare(cfg, tmp_path / 'out2', SEQ_LEN, model_vocab_size=32_000)


def test_existing_sentencepiece_model_in_workers(corpus, tmp_path):
  model = tmp_path / 'sp.model'
  model.write_bytes(tokenizer_lib.train_tokenizer(_docs(corpus[0]), 700))
  sp = spm.SentencePieceProcessor(model_file=str(model))
  m = prep.prepare(_cfg(corpus, tokenizer=str(model), num_workers=2), tmp_path / 'out', SEQ_LEN)
  assert (m.tokenizer_kind, m.tokenizer_file, m.vocab_size) == (
      'sentencepiece', 'tokenizer.model', 700)
  expected = _reference_rows(sp.encode, sp.eos_id(), _docs(corpus[0]))
  np.testing.assert_array_equal(
      pipeline.open_split(m, 'train').read(np.arange(len(expected))), expected)


def test_tokenizers_pickle_and_reject_bad_files(corpus, tmp_path):
  json_path = _bpe_json(tmp_path / 't.json', _docs(corpus[1]), vocab_size=400)
  model_path = tmp_path / 't.model'
  model_path.write_bytes(tokenizer_lib.train_tokenizer(_docs(corpus[1]), 400))
  text = _docs(corpus[0])[0]
  for path in (json_path, model_path):
    tok = tokenizer_lib.load(path)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(text) == tok.encode(text) and clone.eos_id == tok.eos_id
  for name, data in (('bad.json', b'{"not": "a tokenizer"}'), ('bad.model', b'garbage')):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match=rf'data\.tokenizer=.*{name}.* is not a'):
      tokenizer_lib.load(tmp_path / name)
  with pytest.raises(FileNotFoundError, match=r'data\.tokenizer: tokenizer file not found'):
    tokenizer_lib.load(tmp_path / 'none.json')
