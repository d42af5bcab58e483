"""Start from a dense model: its FFN projected onto a structure, in a new workdir ready to train.

  python -m structffn_jax.convert --from SRC --config CFG[:ARGS] --workdir NEW [--set F=V ...]
                                  [--mode guided|projection|scratch] [--overwrite]
  python -m structffn_jax.train --config NEW/config.py --workdir NEW

SRC is a workdir of this project (its newest readable checkpoint; a structured or self-guided one
counts as the dense matrices it applies) or a Hugging Face model directory: config.json, the
weights as model.safetensors or shards with model.safetensors.index.json, and tokenizer.json (it
comes along as NEW/tokenizer.json and NEW's data.tokenizer: the data the run prepares, and
generate, evaluate and lm_eval on NEW, use the source's vocabulary). Families: structffn_jax/hf_families.py (Llama and its relatives, Mistral without a sliding
window, Qwen2, Starcoder2, GPT-2).

The new run's config is CFG with the source's architecture (width, depth, heads, norms,
activation, positions, biases, head tying, vocabulary) and then the --set overrides. CFG gives
the structure (model.ffn.*, first_layer_dense), the schedule, self-guided training and the data.
Each layer is read, converted and reported on its own line; attention, embeddings and norms are
copied unchanged, and every structured FFN matrix W becomes, by --mode:
  guided      (default) the factors nearest W (structffn_jax/projection.py) and W itself as the
              self-guided guide (sgt.enabled=True): at α = 1 the step-0 logits are the source
              model's, exactly; α then hands over as sgt.* says.
  projection  the nearest factors alone (sgt.enabled=False).
  scratch     the structure's random initialisation (model.ffn.init, train.seed): the control.
NEW/convert.json records the source, the mode and each layer's relative Frobenius error with the
optimum the structure allows. Anything wrong with SRC, CFG or NEW is one line naming the file or
field, before anything is written; a NEW that holds a run is refused unless --overwrite.
"""

from __future__ import annotations

import sys

from structffn_jax import checkpoint, cli
from structffn_jax import config as config_lib
from structffn_jax.conversion import MODES, convert

__all__ = ['MODES', 'convert', 'main']


def main(argv=None):
  parser = cli.parser(__doc__)
  parser.add_argument('--from', dest='source', required=True, metavar='SRC',
                      help='a workdir of this project or a Hugging Face model directory')
  cli.add_config_flags(parser)
  parser.add_argument('--workdir', required=True, metavar='NEW', help='the new run directory')
  parser.add_argument('--mode', default='guided', choices=MODES,
                      help='guided (default), projection or scratch (see above)')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace the run NEW already holds')
  args = cli.parse(parser, argv)
  try:
    convert(args.source, args.config, args.workdir, tuple(args.set), args.mode, args.overwrite)
  except (config_lib.ConfigError, FileNotFoundError, FileExistsError, ValueError,
          checkpoint.CheckpointError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  main()
