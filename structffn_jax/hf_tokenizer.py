"""The run's tokenizer as a Hugging Face `tokenizer.json`, encoding as training did.

`transformers.AutoTokenizer` reads a `tokenizer.json` with the `tokenizers` package alone; a
SentencePiece `tokenizer.model` needs sentencepiece (and, in transformers 5, tiktoken or a slow
conversion). So an export writes a `tokenizer.json` for every run:

  - SentencePiece BPE (what `prepare` trains): the same vocabulary and ids, merges ranked by the
    merged piece's score (SentencePiece BPE merges the highest-scoring adjacent pair first;
    BPE with these ranks merges the same pairs), byte fallback, ' ' -> '▁' and back, and the
    control pieces as special tokens. Built with `tokenizers` from the model's pieces.
  - A Hugging Face tokenizer.json: the file itself, without its post-processor. Training encoded
    with add_special_tokens=False; a post-processor would add a BOS no training text began with.

Neither adds a token to an encoded text: every training document followed an EOS, which the
export declares as the BOS too (see export.py).
"""

from __future__ import annotations

import json
import pathlib


def from_sentencepiece(model_file) -> 'tokenizers.Tokenizer':  # noqa: F821
  """A `tokenizers.Tokenizer` with the ids and encoding of a SentencePiece BPE model."""
  import sentencepiece as spm
  import tokenizers
  from tokenizers import decoders, models, normalizers

  sp = spm.SentencePieceProcessor(model_file=str(model_file))
  size = sp.get_piece_size()
  vocab = {sp.id_to_piece(i): i for i in range(size)}
  normal = {i for i in range(size)
            if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}
  pieces = {sp.id_to_piece(i): i for i in normal}
  merges = []
  for i in normal:
    piece = sp.id_to_piece(i)
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in pieces and right in pieces:
        merges.append((-sp.get_score(i), i, pieces[left], pieces[right], left, right))
  merges.sort()
  unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
  tok = tokenizers.Tokenizer(models.BPE(
      vocab=vocab, merges=[(m[4], m[5]) for m in merges], unk_token=unk, fuse_unk=True,
      byte_fallback=any(sp.is_byte(i) for i in range(size))))
  # SentencePiece's escaping of spaces; the models `prepare` trains normalize nothing else.
  tok.normalizer = normalizers.Replace(' ', '\u2581')
  tok.decoder = decoders.Sequence([decoders.Replace('\u2581', ' '), decoders.ByteFallback(),
                                   decoders.Fuse()])
  tok.add_special_tokens([tokenizers.AddedToken(sp.id_to_piece(i), special=True, normalized=False)
                          for i in range(size) if sp.is_control(i) or sp.is_unknown(i)])
  return tok


# Spaces (runs, leading, trailing), tabs, newlines, digits, punctuation, code and characters
# outside any small vocabulary (byte fallback).
PROBE = ('The game was released in 1996 , and it sold  well .\n= = Reception = =\n'
         '\tdef f(x):\n    return x ** 2  # 3.14159\n  naïve café — 東京 🙂 end ')


def write(tokenizer_path, out_file) -> pathlib.Path:
  """Write the tokenizer.json of the run's tokenizer file (SentencePiece .model or .json)."""
  import tokenizers
  tokenizer_path, out_file = pathlib.Path(tokenizer_path), pathlib.Path(out_file)
  if tokenizer_path.suffix == '.json':
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_path))
    if tok.post_processor is None:
      if tokenizer_path.resolve() != out_file.resolve():
        out_file.write_bytes(tokenizer_path.read_bytes())
      return out_file
    spec = json.loads(tok.to_str())
    spec['post_processor'] = None
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
  else:
    import sentencepiece as spm
    tok = from_sentencepiece(tokenizer_path)
    theirs = tok.encode(PROBE, add_special_tokens=False).ids
    ours = spm.SentencePieceProcessor(model_file=str(tokenizer_path)).encode(PROBE)
    if theirs != ours:
      raise ValueError(f'{tokenizer_path}: its tokenizer.json would encode differently from the '
                       'SentencePiece model (a model not trained by `prepare`: normalization, '
                       'dummy prefix or unigram); export a run whose data.tokenizer is a '
                       'tokenizer.json, or one prepared with a trained tokenizer.')
  tok.save(str(out_file))
  return out_file
