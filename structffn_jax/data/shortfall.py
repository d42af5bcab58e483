"""Splits that came out smaller than asked: `data.valid_tokens` / `data.test_tokens` are caps,
and a corpus too small to fill one gives fewer tokens; the run says so in its first lines."""

from __future__ import annotations


def messages(cfg_data, manifest) -> list[str]:
  """A warning line for each split with fewer tokens than its cap asked (beyond the rounding
  down to whole rows), with what to change."""
  out = []
  row_len = manifest.seq_len + 1
  for split in ('valid', 'test'):
    asked = int(cfg_data.get(f'{split}_tokens', 0) or 0)
    info = manifest.splits.get(split)
    if not asked or info is None:
      continue
    got = int(info['tokens'])
    if got >= (asked // row_len) * row_len:
      continue
    carved = isinstance(info.get('source'), dict) and 'carved_from' in info['source']
    fix = (f'raise data.{split}_fraction (the share of training documents held out) or add text'
           if carved else f'add text to the {split} inputs')
    out.append(f'warning: data.{split}_tokens={asked:,} asked, the data holds {got:,} '
               f'{split} tokens ({100 * got / asked:.0f}%): {fix}, or set data.{split}_tokens='
               f'{got} to ask for what there is.')
  return out
