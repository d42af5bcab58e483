"""Generated text for the data tests (imported, not collected): no downloaded corpus needed.

`wikitext(n_articles, seed)` writes articles in WikiText-103's layout (a ` = Title = ` line, then
` = = Section = = ` headings and paragraphs of space-separated tokens, blank ` ` lines between),
from a Zipf-distributed vocabulary of made-up words with some digits, punctuation, accented Latin,
Chinese and emoji, so that tokenizers see a realistic mix. The same arguments give the same text.
"""

from __future__ import annotations

import itertools
import random

_SYLLABLES = ('ka', 'lo', 'mi', 'ten', 'sa', 'ri', 'vor', 'el', 'an', 'tu', 'pes', 'qui',
              'dor', 'ne', 'ba', 'zu', 'hal', 'ox', 'fi', 'gre')
_EXTRA = ('é', 'è', 'ü', 'ñ', '中文', '東京', 'μ', 'Ω', '😀', '—', '@-@', '@,@', '@.@')
_PUNCT = (',', '.', ';', ':', '(', ')', '"', "'s")


def _vocabulary(rng: random.Random, size: int) -> list[str]:
  words = set()
  while len(words) < size:
    word = ''.join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
    if rng.random() < 0.04:
      word += rng.choice(_EXTRA)
    if rng.random() < 0.1:
      word = word.capitalize()
    words.add(word)
  return sorted(words)


def _sentence(rng: random.Random, words: list[str], cum_weights: list[float]) -> str:
  tokens = rng.choices(words, cum_weights=cum_weights, k=rng.randint(6, 30))
  for i in range(len(tokens)):
    r = rng.random()
    if r < 0.05:
      tokens[i] = str(rng.randint(0, 3000))
    elif r < 0.12:
      tokens[i] = rng.choice(_PUNCT)
  return ' '.join(tokens) + ' .'


def wikitext(n_articles: int, seed: int = 0, vocab: int = 3000) -> str:
  """`n_articles` generated articles in WikiText layout, as one string."""
  rng = random.Random(seed)
  words = _vocabulary(random.Random(1234), vocab)
  weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(words))))
  lines = [' \n']
  for _ in range(n_articles):
    title = ' '.join(rng.choice(words).capitalize() for _ in range(rng.randint(1, 3)))
    lines += [f' = {title} = \n', ' \n']
    for section in range(rng.randint(1, 4)):
      if section:
        heading = rng.choice(words).capitalize()
        lines += [f' = = {heading} = = \n', ' \n']
      for _ in range(rng.randint(1, 3)):
        paragraph = ' '.join(_sentence(rng, words, weights) for _ in range(rng.randint(2, 8)))
        lines += [f' {paragraph} \n', ' \n']
  return ''.join(lines)


def documents(n: int, seed: int = 0) -> list[str]:
  """`n` short generated documents (a few sentences each), for jsonl and Hugging Face inputs."""
  rng = random.Random(seed)
  words = _vocabulary(random.Random(1234), 3000)
  weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(words))))
  return [
      '\n'.join(_sentence(rng, words, weights) for _ in range(rng.randint(1, 12)))
      for _ in range(n)
  ]


class Interrupted:
  """Documents that stop with KeyboardInterrupt (as Ctrl-C would) before document `at`; passes
  `state()` through, like the `sources.Documents` it wraps."""

  def __init__(self, docs, at: int):
    self.docs, self.at, self.count = docs, at, 0

  def __iter__(self):
    return self

  def __next__(self):
    if self.count == self.at:
      raise KeyboardInterrupt
    self.count += 1
    return next(self.docs)

  def state(self):
    return self.docs.state()
