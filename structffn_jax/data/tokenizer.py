"""Tokenizers behind one interface: SentencePiece `.model` files and Hugging Face `tokenizer.json`;
and the SentencePiece model `prepare` trains.

    tok = tokenizer.load(path)          # by file type: *.json -> Hugging Face, else SentencePiece
    tok.encode_batch(docs) -> [[id, ...], ...]   no BOS/EOS added; `prepare` appends tok.eos_id
    tok.decode(ids) -> str

SentencePiece covers the tokenizers `prepare` trains and existing models such as LLaMA 1/2's;
the `tokenizers` package reads any `tokenizer.json` (GPT-2, LLaMA 3, ...). A tokenizer.json does
not say which token ends a document, so `eos_id` is looked up among the usual names
(`EOS_CANDIDATES`) unless `eos_token` names it.

A `Tokenizer` pickles as its file's bytes, so `prepare` can send it to worker processes.

`train_tokenizer(docs, vocab_size) -> bytes` trains a byte-fallback BPE SentencePiece model that
decodes any text back exactly; `TOKENIZER_RECIPE`, part of a prepared directory's settings, changes
with its options.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

SENTENCEPIECE, HUGGINGFACE = 'sentencepiece', 'huggingface'
# File name of each kind inside a prepared data directory.
FILE_NAMES = {SENTENCEPIECE: 'tokenizer.model', HUGGINGFACE: 'tokenizer.json'}
# Document-end tokens of common tokenizer.json files: GPT-2 / LLaMA 3 / LLaMA 2, Mistral / Gemma.
EOS_CANDIDATES = ('<|endoftext|>', '<|end_of_text|>', '</s>', '<eos>')
BOS_CANDIDATES = ('<|begin_of_text|>', '<s>', '<bos>')
# Bumped when the training options of `train_tokenizer` change, so old directories are not reused.
TOKENIZER_RECIPE = 1
DEFAULT_TOKENIZER_TRAIN_BYTES = 32_000_000


def kind_of(path: str | os.PathLike) -> str:
  """'huggingface' for a `.json` file, else 'sentencepiece'."""
  return HUGGINGFACE if str(path).endswith('.json') else SENTENCEPIECE


class Tokenizer:
  """A loaded tokenizer: `vocab_size`, `eos_id`, `bos_id` (-1 if none), `encode_batch`, `decode`."""

  kind: str
  vocab_size: int
  eos_id: int
  bos_id: int

  def __init__(self, data: bytes, *, name: str = 'tokenizer', eos_token: str = ''):
    self.data, self.name, self.eos_token = bytes(data), name, eos_token
    self.num_threads = 0  # 0 = the library's default parallelism

  @property
  def file_name(self) -> str:
    """The name this tokenizer's file gets in a prepared directory."""
    return FILE_NAMES[self.kind]

  def encode_batch(self, docs: Sequence[str]) -> list[list[int]]:
    raise NotImplementedError

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0]

  def decode(self, ids: Iterable[int]) -> str:
    raise NotImplementedError

  def __getstate__(self):
    return {
        'data': self.data,
        'name': self.name,
        'eos_token': self.eos_token,
        'num_threads': self.num_threads
    }

  def __setstate__(self, state):
    num_threads = state.pop('num_threads')
    self.__init__(state.pop('data'), **state)
    self.num_threads = num_threads


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model; its own unk/bos/eos ids."""

  kind = SENTENCEPIECE

  def __init__(self, data: bytes, *, name: str = 'tokenizer', eos_token: str = ''):
    super().__init__(data, name=name, eos_token=eos_token)
    try:
      self.sp = spm.SentencePieceProcessor(model_proto=self.data)
    except (OSError, RuntimeError, TypeError) as e:
      raise ValueError(f'{name} is not a SentencePiece model ({e})') from e
    self.vocab_size = int(self.sp.get_piece_size())
    if eos_token:
      eos = self.sp.piece_to_id(eos_token)
      if eos == self.sp.unk_id() and eos_token != self.sp.id_to_piece(eos):
        raise ValueError(f'data.eos_token={eos_token!r} is not a piece of {name}')
      self.eos_id = int(eos)
    else:
      self.eos_id = int(self.sp.eos_id())
    self.bos_id = int(self.sp.bos_id())

  def encode_batch(self, docs: Sequence[str]) -> list[list[int]]:
    if self.num_threads:
      return self.sp.encode(list(docs), num_threads=self.num_threads)
    return self.sp.encode(list(docs))

  def decode(self, ids: Iterable[int]) -> str:
    return self.sp.decode([int(i) for i in ids])


def _import_tokenizers():
  try:
    import tokenizers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        'a tokenizer.json needs the Hugging Face `tokenizers` package: pip install tokenizers'
    ) from e
  return tokenizers


class HuggingFaceTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json`, encoded without its post-processor's special tokens."""

  kind = HUGGINGFACE

  def __init__(self, data: bytes, *, name: str = 'tokenizer', eos_token: str = ''):
    super().__init__(data, name=name, eos_token=eos_token)
    tokenizers = _import_tokenizers()
    try:
      self.tok = tokenizers.Tokenizer.from_str(self.data.decode('utf-8'))
    except Exception as e:  # pylint: disable=broad-except  # tokenizers raises plain Exception
      raise ValueError(f'{name} is not a Hugging Face tokenizer.json ({e})') from e
    self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))
    # Ids can sit above get_vocab_size() when added tokens leave gaps; the table must hold them.
    vocab = self.tok.get_vocab(with_added_tokens=True)
    if vocab:
      self.vocab_size = max(self.vocab_size, max(vocab.values()) + 1)
    if eos_token:
      if eos_token not in vocab:
        raise ValueError(f'data.eos_token={eos_token!r} is not a token of {name}')
      self.eos_id = vocab[eos_token]
    else:
      found = [t for t in EOS_CANDIDATES if t in vocab]
      if not found:
        raise ValueError(
            f'{name} has none of the usual end-of-document tokens {list(EOS_CANDIDATES)}: set '
            'data.eos_token to the token that ends a document')
      self.eos_id = vocab[found[0]]
    bos = [t for t in BOS_CANDIDATES if t in vocab]
    self.bos_id = vocab[bos[0]] if bos else -1

  def encode_batch(self, docs: Sequence[str]) -> list[list[int]]:
    encode = getattr(self.tok, 'encode_batch_fast', self.tok.encode_batch)
    return [e.ids for e in encode(list(docs), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def from_bytes(data: bytes,
               kind: str,
               *,
               name: str = 'tokenizer',
               eos_token: str = '') -> Tokenizer:
  """A tokenizer of `kind` ('sentencepiece' | 'huggingface') from its file's contents."""
  cls = {SENTENCEPIECE: SentencePieceTokenizer, HUGGINGFACE: HuggingFaceTokenizer}[kind]
  return cls(data, name=name, eos_token=eos_token)


def load(path: str | os.PathLike,
         *,
         field: str = 'data.tokenizer',
         eos_token: str = '') -> Tokenizer:
  """Loads a `.model` (SentencePiece) or `.json` (Hugging Face) file; errors name `field`."""
  path = Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f'{field}: tokenizer file not found: {str(path)!r}')
  try:
    data = path.read_bytes()
  except OSError as e:
    raise ValueError(f'{field}: cannot read {str(path)!r}: {e}') from e
  return from_bytes(data, kind_of(path), name=f'{field}={str(path)!r}', eos_token=eos_token)


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
