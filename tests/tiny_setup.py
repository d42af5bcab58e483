"""Tiny configurations shared by the tests (imported, not collected).

`model_config`: a validated model section for layer, model and decoding tests: 3 layers,
grouped-query attention (4 query / 2 kv heads), attn_dim 48 != hidden_dim 32, float32.
`run_config`: configs/tiny.py with overrides, for the training, sharding and multi-process tests,
trained on generated WikiText-format text (`text_files`) rather than a downloaded corpus.
"""

from __future__ import annotations

import hashlib
import math
import os
import pathlib
import tempfile

import ml_collections

from structffn_jax import config as config_lib
from structffn_jax.configs import common
from tests import generated_text

REPO = pathlib.Path(__file__).resolve().parents[1]
STRUCTURES = common.ffn_structures(rank=8, blockdense=(2, 16), blockshuffle_blocks=4)


def model_config(method: str = 'lowrank', init: str = 'gaussian', seq_len: int = 12,
                 **overrides) -> ml_collections.ConfigDict:
  """The model section. Gaussian FFN init unless asked: the tests randomise the parameters
  anyway, and every new shape of the paper's SVD-based init costs seconds of CPU compilation."""
  c = config_lib.base_config()
  m = c.model
  m.vocab_size, m.seq_len = 61, seq_len
  m.hidden_dim, m.ffn_dim, m.attn_dim = 32, 64, 48
  m.num_layers, m.num_heads, m.num_kv_heads = 3, 4, 2
  m.dtype = 'float32'
  m.ffn.update(STRUCTURES[method])
  m.ffn.init = init
  for key, value in overrides.items():
    m[key] = value
  c.data.vocab_size = m.vocab_size  # as every config sets it
  config_lib.validate(c)
  return m


def text_files() -> tuple[str, str]:
  """(train, valid) text files of generated WikiText-format articles, about 1 MB each: written
  once into the temporary directory (atomically, so that concurrent test processes agree)."""
  texts = {'train': generated_text.wikitext(400, seed=0),
           'valid': generated_text.wikitext(40, seed=1)}
  tag = hashlib.sha256(''.join(texts.values()).encode()).hexdigest()[:12]
  folder = pathlib.Path(tempfile.gettempdir()) / f'structffn_tiny_text_{tag}'
  folder.mkdir(exist_ok=True)
  paths = []
  for split, text in texts.items():
    path = folder / f'{split}.tokens'
    if not path.is_file():
      part = path.with_suffix(f'.{os.getpid()}.part')
      part.write_text(text, encoding='utf-8')
      os.replace(part, path)
    paths.append(str(path))
  return paths[0], paths[1]


def run_config(*overrides: str, method: str = 'lowrank', sgt: int = 1):
  """configs/tiny.py:method=<method>,sgt=<sgt> on the generated text (`text_files`), with
  'a.b=value' overrides, validated."""
  train, valid = text_files()
  data = ('data.source=text', f'data.train_paths={train}', f'data.valid_paths={valid}')
  return config_lib.load(f'{REPO}/configs/tiny.py:method={method},sgt={sgt}', data + overrides)


def random_model(cfg, seed: int = 0, **kw):
  """A GPT (of model section `cfg`, GPT keyword arguments `kw`) whose every parameter is random
  at a scale that gives peaked, distinct logits. Built abstractly, then filled: the eager
  initialisers would compile for every new shape."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from structffn_jax.model import GPT  # pylint: disable=import-outside-toplevel

  model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(seed), **kw))
  rng = np.random.default_rng(seed + 100)
  for path, v in nnx.iter_graph(model):
    if isinstance(v, nnx.Param):
      if path[-1] == 'scale':
        new = 1 + 0.2 * rng.standard_normal(v.shape)
      elif path[-1] == 'bias':
        new = 0.1 * rng.standard_normal(v.shape)
      else:
        new = 1.5 * rng.standard_normal(v.shape) / math.sqrt(v.shape[-1])
      v.set_value(jnp.asarray(new, jnp.float32))
  return model


# 6 steps of 8 sequences, a checkpoint every 2; self-guided for the first 3 (hand-over at 3), so
# checkpoint 2 still has its guides and 4 and 6 do not. The checkpoint, workdir and fault tests
# run it.
CHECKPOINTED_RUN = ('train.tokens=3072', 'train.log_every=1', 'train.eval_every=0',
                    'train.ckpt_every=2', 'train.eval_tokens=512')


def checkpointed_run(data_dir, *overrides, sgt=1):
  """`CHECKPOINTED_RUN` on the prepared `data_dir`, with more overrides."""
  return run_config(*CHECKPOINTED_RUN, f'data.data_dir={data_dir}', *overrides, sgt=sgt)
