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

import functools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from structffn_jax import cli, structured

PREMERGE_FILE = 'premerge.json'


def sample(logits_BV, key, temperature: float, top_k: int):
  """Next tokens (B,): argmax when temperature == 0, else a draw from softmax(logits / T) over
  the top_k most likely tokens (all of them when top_k == 0)."""
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / temperature
  if 0 < top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(nnx.jit, static_argnames=('max_new_tokens', 'max_len', 'temperature',
                                             'top_k', 'eos_id'))
def _generate(model, tokens_BP, lengths_B, key, alpha, *, max_new_tokens, max_len, temperature,
              top_k, eos_id):
  """New tokens (B, max_new_tokens), -1 after a row's EOS; and how many steps ran."""
  b = tokens_BP.shape[0]
  cache = model.init_cache(b, max_len)
  logits_BV, cache = model.decode(tokens_BP, cache, lengths_B=lengths_B, alpha=alpha,
                                  last_only=True)
  token_B = sample(logits_BV, jax.random.fold_in(key, 0), temperature, top_k)
  out_BN = jnp.full((b, max_new_tokens), -1, jnp.int32).at[:, 0].set(token_B)
  done_B = token_B == eos_id if eos_id is not None else jnp.zeros((b,), bool)

  def running(carry):
    i, _, _, done_B, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def step(carry):
    i, cache, out_BN, done_B, token_B = carry
    logits_B1V, cache = model.decode(token_B[:, None], cache, alpha=alpha)
    token_B = sample(logits_B1V[:, 0], jax.random.fold_in(key, i), temperature, top_k)
    out_BN = jax.lax.dynamic_update_slice_in_dim(
        out_BN, jnp.where(done_B, -1, token_B)[:, None], i, axis=1)
    if eos_id is not None:
      done_B = done_B | (token_B == eos_id)
    return i + 1, cache, out_BN, done_B, token_B

  steps, _, out_BN, _, _ = jax.lax.while_loop(running, step, (1, cache, out_BN, done_B, token_B))
  return out_BN, steps


def generate(model, prompts, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             eos_id: int | None = None, seed: int = 0, alpha=None, pad_multiple: int = 8):
  """Continue each prompt (a list of token ids) by up to `max_new_tokens` tokens.

  Returns one list of new token ids per prompt, cut before its first EOS when `eos_id` is set.
  Prompts are right-padded to a multiple of `pad_multiple` (fewer recompilations for new
  lengths); the padding never influences a row. alpha: the self-guided α if guides remain.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('generate: every prompt needs at least one token.')
  if max_new_tokens < 1:
    raise ValueError(f'generate: max_new_tokens={max_new_tokens} must be at least 1.')
  cfg = model.cfg
  longest = max(len(p) for p in prompts)
  padded = -(-longest // pad_multiple) * pad_multiple
  if cfg.position == 'absolute':
    if longest + max_new_tokens - 1 > cfg.seq_len:
      raise ValueError(f'generate: prompt ({longest} tokens) + max_new_tokens={max_new_tokens} '
                       f'exceeds the {cfg.seq_len} learned positions of the model.')
    padded = min(padded, cfg.seq_len - max_new_tokens + 1)
  tokens = np.zeros((len(prompts), padded), np.int32)
  for row, p in enumerate(prompts):
    tokens[row, :len(p)] = p
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  out, _ = _generate(model, jnp.asarray(tokens), jnp.asarray(lengths),
                     jax.random.key(seed), alpha, max_new_tokens=max_new_tokens,
                     max_len=padded + max_new_tokens - 1, temperature=float(temperature),
                     top_k=int(top_k), eos_id=eos_id)
  completions = []
  for row in np.asarray(out):
    row = row[row >= 0].tolist()
    if eos_id is not None and eos_id in row:
      row = row[:row.index(eos_id)]
    completions.append(row)
  return completions


# ----------------------------------------------------------------------------- a trained run


def premerge_threshold(config, workdir, override: int | None = None):
  """The pre-merge threshold of a run: int, {'fc1': int, 'fc2': int}, or None (no pre-merge).

  Order: `override`, then model.ffn.merge_threshold, then <workdir>/premerge.json; -1 in the
  first two defers to the next, 0 means never merged.
  """
  for value in (override, config.model.ffn.get('merge_threshold', -1)):
    if value is not None and value >= 0:
      return int(value) or None
  path = pathlib.Path(workdir) / PREMERGE_FILE
  if not path.is_file():
    return None
  record = json.loads(path.read_text())
  here = jax.devices()[0].device_kind
  if record.get('device') != here:
    print(f'note: {path} was calibrated on {record.get("device")!r}, this is {here!r}; '
          'run structffn_jax.premerge again for this device.', file=sys.stderr)
  thresholds = {k: int(v) for k, v in record['thresholds'].items()}
  return thresholds if any(thresholds.values()) else None


def load(workdir, merge_threshold: int | None = None, mesh: str | None = None):
  """(config, model, alpha, manifest) of the newest checkpoint of `workdir`, pre-merged if asked,
  restored onto the run's mesh or `mesh` ('D,F,T', e.g. '1,1,1' for one device).

  A run stopped during self-guided training keeps its guides and their α (pre-merge is then
  skipped); at α = 0 the guides are dropped, which changes no output.
  """
  from structffn_jax import evaluate, optim
  from structffn_jax.data import prepare as prepare_lib

  run = evaluate.load_run(workdir, mesh)
  config, model, opt_state = run.config, run.model, run.opt_state
  alpha = None
  if model.has_guide:
    alpha = optim.alpha_of(opt_state)
    if alpha is None or float(alpha) == 0.0:
      model.drop_guides()
      alpha = None
  threshold = premerge_threshold(config, workdir, merge_threshold)
  if threshold is not None:
    if alpha is None:
      model.premerge(threshold)
    else:
      print(f'note: pre-merge skipped, the run is still self-guided (alpha={float(alpha):.3f}).',
            file=sys.stderr)
  manifest = prepare_lib.Manifest.load(prepare_lib.resolve_data_dir(config.data, workdir))
  return config, model, alpha, manifest


def _read_prompts(args):
  prompts = list(args.prompt)
  if args.prompt_file:
    text = pathlib.Path(args.prompt_file).read_text()
    prompts += [line for line in text.splitlines() if line.strip()]
  return prompts


def main(argv=None):
  parser = cli.parser(__doc__)
  parser.add_argument('--workdir', required=True, help='a training workdir')
  parser.add_argument('--prompt', action='append', default=[], help='repeat for a batch')
  parser.add_argument('--prompt-file', default='', help='one prompt per non-empty line')
  parser.add_argument('--max-new-tokens', type=int, default=64)
  parser.add_argument('--temperature', type=float, default=0.0, help='0 = greedy')
  parser.add_argument('--top-k', type=int, default=0, help='sample among the k likeliest; 0 = all')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--no-stop-at-eos', action='store_true')
  parser.add_argument('--merge-threshold', type=int, default=None,
                      help='pre-merge threshold in tokens (0 = off, -1 = config / premerge.json)')
  parser.add_argument('--mesh', default=None, metavar='D,F,T',
                      help="mesh sizes (data, fsdp, tensor) instead of the run's, e.g. 1,1,1 to "
                           'generate on one device from a run trained on many')
  args = parser.parse_args(argv)
  import sentencepiece as spm

  try:
    prompts = _read_prompts(args)
    if not prompts:
      raise ValueError('no prompt: pass --prompt TEXT (repeatable) or --prompt-file FILE.')
    config, model, alpha, manifest = load(args.workdir, args.merge_threshold, args.mesh)
    sp = spm.SentencePieceProcessor(model_file=str(manifest.tokenizer_path))
    ids = [[manifest.eos_id] + sp.encode(p) for p in prompts]
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
