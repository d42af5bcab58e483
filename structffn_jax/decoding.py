"""Decoding from a GPT: prefill then KV-cache decoding in one jitted call, and a trained run
loaded for it (docs/design.md §8 for pre-merge).

  completions = decoding.generate(model, [[eos] + ids], max_new_tokens=64)
  config, model, alpha, manifest = decoding.load(workdir)

`generate` runs `GPT.decode` over a cache of static shape, the whole loop in one jitted call;
greedy by default, or sampled with a temperature and top-k. Several prompts run as one batch:
rows are right-padded and each row's cache advances by its own length, so a batch gives the same
completions as its prompts one at a time. The generate command, the decode benchmark and the
evaluation harness all decode through it.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from structffn_jax import calibration, sgt
from structffn_jax import run as run_lib
from structffn_jax.data import manifest as manifest_lib


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
  out_BG = jnp.full((b, max_new_tokens), -1, jnp.int32).at[:, 0].set(token_B)
  done_B = token_B == eos_id if eos_id is not None else jnp.zeros((b,), bool)

  def running(carry):
    i, _, _, done_B, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def step(carry):
    i, cache, out_BG, done_B, token_B = carry
    logits_B1V, cache = model.decode(token_B[:, None], cache, alpha=alpha)
    token_B = sample(logits_B1V[:, 0], jax.random.fold_in(key, i), temperature, top_k)
    out_BG = jax.lax.dynamic_update_slice_in_dim(
        out_BG, jnp.where(done_B, -1, token_B)[:, None], i, axis=1)
    if eos_id is not None:
      done_B = done_B | (token_B == eos_id)
    return i + 1, cache, out_BG, done_B, token_B

  steps, _, out_BG, _, _ = jax.lax.while_loop(running, step, (1, cache, out_BG, done_B, token_B))
  return out_BG, steps


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


def load(workdir, merge_threshold: int | None = None, mesh: str | None = None):
  """(config, model, alpha, manifest) of the newest checkpoint of `workdir`, pre-merged if asked,
  restored onto the run's mesh or `mesh` ('D,F,T', e.g. '1,1,1' for one device).

  A run stopped during self-guided training keeps its guides and their α (pre-merge is then
  skipped); at α = 0 the guides are dropped, which changes no output.
  """
  run = run_lib.load_run(workdir, mesh)
  config, model, opt_state = run.config, run.model, run.opt_state
  alpha = None
  if model.has_guide:
    alpha = sgt.alpha_of(opt_state)
    if alpha is None or float(alpha) == 0.0:
      model.drop_guides()
      alpha = None
  threshold = calibration.threshold(config, workdir, merge_threshold)
  if threshold is not None:
    if alpha is None:
      model.premerge(threshold)
    else:
      print(f'note: pre-merge skipped, the run is still self-guided (alpha={float(alpha):.3f}).',
            file=sys.stderr)
  manifest = manifest_lib.Manifest.load(manifest_lib.resolve_data_dir(config.data, workdir))
  return config, model, alpha, manifest
