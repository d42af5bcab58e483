"""What the config files share: the paper's model sizes and data recipe, the small configs'
structures, and the parser of a config's argument (as big_vision's configs/common.py).

Import it as `from structffn_jax.configs import common`: pyproject.toml installs this directory as
`structffn_jax.configs`, so the import works from a checkout and from a wheel alike. It loads no
JAX, so that `info` and the launchers can read configs cheaply.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from structffn_jax import config as config_lib
from structffn_jax.data.manifest import REQUIRED
from structffn_jax.errors import ConfigError

SIZES = {  # docs/design.md §6.2: hidden, ffn, heads, layers, tokens, peak lr
    's': dict(hidden_dim=768, ffn_dim=3072, num_heads=12, num_layers=12, tokens=2.2e9,
              peak_lr=6e-4),
    'm': dict(hidden_dim=1024, ffn_dim=4096, num_heads=16, num_layers=24, tokens=6.7e9,
              peak_lr=3e-4),
    'l': dict(hidden_dim=1536, ffn_dim=6144, num_heads=12, num_layers=24, tokens=14.58e9,
              peak_lr=2.5e-4),
    'xl': dict(hidden_dim=2048, ffn_dim=8192, num_heads=16, num_layers=24, tokens=25.5e9,
               peak_lr=2e-4),
}

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


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parse a config argument 'k1=v1,k2=v2' against `defaults` (unknown keys are an error).

  Each value is typed like its default, as an override is (`structffn_jax.config.load`). A bare
  key is a switch turned on, as in big_vision's parse_arg: 'sgt' means sgt=True for a bool
  default and sgt=1 for a 0/1 one.
  """
  out = dict(defaults)
  switches = [k for k, v in defaults.items() if isinstance(v, int) and v in (0, 1)]
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if key not in defaults:
      raise ConfigError(f'config argument {key!r} is unknown; keys: {", ".join(defaults)}.')
    if not sep:
      if key not in switches:
        raise ConfigError(f'config argument {item!r} is not key=value; only an on/off key may '
                          f'stand alone ({", ".join(switches) or "none here"}); '
                          f'keys: {", ".join(defaults)}.')
      value = 'true' if isinstance(defaults[key], bool) else '1'
    out[key] = config_lib.coerce(value, defaults[key], f'config argument {key}')
  return ml_collections.ConfigDict(out)


def ffn_structures(*, rank: int, blockdense: tuple[int, int], blockshuffle_blocks: int) -> dict:
  """{method: model.ffn fields} for dense and the three structures of one small config: LowRank
  of `rank`, BlockDense with (blocks, rank) = `blockdense`, BlockShuffle with its block count."""
  return {
      'dense': dict(method='dense', rank=0, blocks=1),
      'lowrank': dict(method='lowrank', rank=rank, blocks=1),
      'blockdense': dict(method='blockdense', rank=blockdense[1], blocks=blockdense[0]),
      'blockshuffle': dict(method='blockshuffle', rank=0, blocks=blockshuffle_blocks),
  }


def choose(field: str, value, table: dict):
  """table[value], or a ConfigError naming the field and the allowed values."""
  if value not in table:
    allowed = ', '.join(map(str, table))
    raise ConfigError(f'{field}={value!r} is not allowed; use one of: {allowed}.')
  return table[value]
