"""Generate text from a trained run: `python -m structffn_jax.generate --workdir DIR --prompt TEXT`.

Prefill then KV-cache decoding (`GPT.decode`), the whole loop in one jitted call with a cache of
static shape; greedy by default, or sampled with --temperature and --top-k. Several prompts
(repeat --prompt, or --prompt-file with one prompt a line) run as one batch: rows are
right-padded and each row's cache advances by its own length, so a batch gives the same
completions as its prompts one at a time. The tokenizer is the run's (its data manifest); each
prompt follows an EOS, as every document but the first does in training. Generation stops at
EOS unless --no-stop-at-eos.

Pre-merge (docs/design.md §8): structured FFN layers also keep their merged matrix and use it for
calls on few tokens. The threshold is, in order: --merge-threshold, the config's
model.ffn.merge_threshold, the calibration <workdir>/premerge.json written by
`python -m structffn_jax.premerge`; -1 in the first two means "the next one"; 0 = never merged.

  python -m structffn_jax.generate --workdir runs/quickstart --prompt 'def main(' \\
      --prompt 'import os' --max-new-tokens 64 --temperature 0.8 --top-k 40
"""

from __future__ import annotations

import pathlib
import sys
import time

import jax
from flax import nnx

from structffn_jax import cli, memory, structured
from structffn_jax.decoding import generate, load, sample  # noqa: F401 (sample: public here too)
from structffn_jax.schema import SEED_MAX



def _read_prompts(args):
  prompts = list(args.prompt)
  if args.prompt_file:
    text = pathlib.Path(args.prompt_file).read_text()
    prompts += [line for line in text.splitlines() if line.strip()]
  return prompts


MERGE_WHAT = '0 = off, -1 = config / premerge.json'


def check_flags(config, args, ids):
  """Refuse flags the run cannot honour, in one line naming the flag: --top-k beyond the
  vocabulary, and a --max-new-tokens whose KV cache (every layer's keys and values for the
  longest prompt and the new tokens, at each prompt) cannot fit in one device's memory."""
  m = config.model
  if args.top_k > m.vocab_size:
    raise ValueError(f'--top-k {args.top_k}: more than the {m.vocab_size} tokens of the '
                     f'vocabulary; give at most {m.vocab_size} (0 = all).')
  longest = max(len(p) for p in ids)
  cache_len = longest + args.max_new_tokens
  if m.position == 'absolute' and cache_len - 1 > m.seq_len:
    raise ValueError(f'--max-new-tokens {args.max_new_tokens}: the prompt ({longest} tokens) and '
                     f'the new tokens exceed the {m.seq_len} learned positions of the model; give '
                     f'at most {max(1, m.seq_len - longest + 1)}.')
  kv = m.attn_dim // m.num_heads * m.num_kv_heads
  width = {'float32': 4}.get(m.dtype, 2)
  per_token = 2 * m.num_layers * kv * width * len(ids)
  limit, where = memory.available(jax.devices())
  if cache_len >= cli.INT32_MAX or (limit is not None and per_token * cache_len > limit):
    room = cli.INT32_MAX - 1 if limit is None else min(limit // per_token, cli.INT32_MAX - 1)
    fits = max(1, room - longest)
    raise ValueError(f'--max-new-tokens {args.max_new_tokens}: its KV cache of {cache_len:,} '
                     f'positions x {len(ids)} prompt(s) needs '
                     f'{memory.human_bytes(per_token * cache_len)}, more than one device holds '
                     f'({where}); give at most {fits:,} (the model was trained on '
                     f'{m.seq_len} tokens).')


def main(argv=None):
  parser = cli.parser(__doc__, 'structffn_jax.generate')
  parser.add_argument('--workdir', required=True, help='a training workdir')
  parser.add_argument('--prompt', action='append', default=[],
                      help='text to continue; repeat for a batch')
  parser.add_argument('--prompt-file', default='', help='a file of prompts, one per non-empty line')
  parser.add_argument('--max-new-tokens', type=cli.integer(1), default=64,
                      help='tokens to generate per prompt at most (default: 64)')
  parser.add_argument('--temperature', type=cli.real(0, what='0 = greedy'), default=0.0,
                      help='sampling temperature; 0 = greedy (default)')
  parser.add_argument('--top-k', type=cli.integer(0, what='0 = all'), default=0,
                      help='sample among the k likeliest; 0 = all')
  parser.add_argument('--seed', type=cli.integer(0, SEED_MAX), default=0,
                      help='seed of the sampling draws')
  parser.add_argument('--no-stop-at-eos', action='store_true',
                      help='keep generating after the end-of-document token')
  parser.add_argument('--merge-threshold', type=cli.integer(-1, what=MERGE_WHAT), default=None,
                      help='pre-merge threshold in tokens (0 = off, -1 = config / premerge.json)')
  parser.add_argument('--mesh', default=None, metavar='D,F,T',
                      help="mesh sizes (data, fsdp, tensor) instead of the run's, e.g. 1,1,1 to "
                           'generate on one device from a run trained on many')
  args = cli.parse(parser, argv)
  try:
    prompts = _read_prompts(args)
    if not prompts:
      raise ValueError('no prompt: pass --prompt TEXT (repeatable) or --prompt-file FILE.')
    config, model, alpha, manifest = load(args.workdir, args.merge_threshold, args.mesh)
    sp = manifest.load_tokenizer()  # SentencePiece or tokenizer.json, as the data was made
    ids = [[manifest.eos_id] + sp.encode(p) for p in prompts]
    check_flags(config, args, ids)
    start = time.perf_counter()
    completions = generate(model, ids, args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, seed=args.seed, alpha=alpha,
                           eos_id=None if args.no_stop_at_eos else manifest.eos_id)
    seconds = time.perf_counter() - start
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  for prompt, prompt_ids, new in zip(prompts, ids, completions):
    print(f'--- {prompt!r}')
    print(sp.decode(prompt_ids[1:] + new))
  merged = {'/'.join(map(str, path[-3:])): m.merge_threshold for path, m in nnx.iter_graph(model)
            if isinstance(m, structured.StructuredLinear) and m.merged is not None}
  n = sum(len(c) for c in completions)
  premerged = f'pre-merge on ({merged})' if merged else 'pre-merge off'
  print(f'[{len(prompts)} prompts, {n} new tokens in {seconds:.2f}s including compilation; '
        f'{config.name}, {premerged}]', file=sys.stderr)


if __name__ == '__main__':
  main()
