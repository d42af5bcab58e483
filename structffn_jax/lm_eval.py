"""Zero-shot (and few-shot) evaluation of a trained run with EleutherAI's lm-evaluation-harness.

  pip install '.[eval]'
  python -m structffn_jax.lm_eval --workdir runs/quickstart --tasks arc_easy,hellaswag,piqa

`StructFFNLM` is the harness's `LM` interface over a restored run (decoding.load: the newest
checkpoint, its tokenizer, pre-merge where configured):
  - loglikelihood: log p(continuation | context), as batched jitted forwards. Requests are sorted
    by length and padded to (batch_size, L) with L a power of two up to model.seq_len, so a whole
    task compiles a handful of programs; a longer request keeps its last seq_len + 1 tokens.
  - loglikelihood_rolling: the document's total log-likelihood over windows of model.seq_len
    tokens (the harness's rolling windows, the first one after an EOS), through the same forward.
  - generate_until: greedy (or sampled, with do_sample) decoding on the KV cache
    (decoding.generate), cut at the first `until` string.
Every text follows an EOS, as every document but the first does in training.

Results go to <workdir>/lm_eval/step<N>_<tasks>.json (or --out) and a summary is printed. Tasks
are the harness's registry names; --include-path DIR adds task YAMLs of your own (a local jsonl
works offline). The harness fetches its standard tasks' datasets from the Hugging Face Hub.

This module is `structffn_jax.lm_eval`; `import lm_eval` in it is the harness (absolute imports).
"""

from __future__ import annotations

import functools
import hashlib
import json
import pathlib
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from structffn_jax import checkpoint, cli
from structffn_jax import decoding

try:
  import lm_eval as harness  # the harness package, not this module
  import lm_eval.api.model
  import lm_eval.tasks
  import lm_eval.utils
  _LM = lm_eval.api.model.LM
except ImportError as e:  # the class below still defines; using it says what to install
  harness, _LM, _IMPORT_ERROR = None, object, e
else:
  _IMPORT_ERROR = None

RESULTS_DIR = 'lm_eval'
MIN_BUCKET = 16  # shortest padded length of a loglikelihood forward


def require_harness():
  """Raise a one-line ImportError when lm-evaluation-harness is not installed."""
  if harness is None:
    raise ImportError(f'lm-evaluation-harness is not installed ({_IMPORT_ERROR}): '
                      "pip install '.[eval]' (or pip install lm_eval).")


@nnx.jit
def _score(model, tokens_BT, targets_BT, mask_BT, alpha):
  """Per row: sum of log p(target) over the masked positions, and whether each masked target is
  the argmax (the harness's is_greedy). Letters of docs/design.md §1."""
  logits_BTV = model(tokens_BT, alpha=alpha)
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  target_lp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
  ll_B = jnp.sum(jnp.where(mask_BT, target_lp_BT, 0.0), axis=-1)
  greedy_B = jnp.all(jnp.where(mask_BT, jnp.argmax(logits_BTV, -1) == targets_BT, True), axis=-1)
  return ll_B, greedy_B


class StructFFNLM(_LM):
  """The harness's LM over a model of this project (see the module docstring).

  model: a GPT; tokenizer: a structffn_jax.data.tokenizer.Tokenizer (encode, decode; the run's
  is `manifest.load_tokenizer()`); eos_id: the EOS id every text follows; alpha: the self-guided
  α when guides remain (decoding.load gives the model, α and the manifest of a run).
  """

  def __init__(self, model, tokenizer, eos_id: int, *, alpha=None,
               batch_size: int = 16, seed: int = 0):
    require_harness()
    super().__init__()
    if batch_size < 1:
      raise ValueError(f'--batch-size {batch_size}: must be at least 1.')
    self.model, self.tokenizer, self.eos_id = model, tokenizer, int(eos_id)
    self.alpha, self.batch_size, self.seed = alpha, int(batch_size), seed
    self.seq_len = int(model.cfg.seq_len)

  # ------------------------------------------------------------------------- token sequences

  def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids after an EOS, continuation ids): trailing spaces of the context move to the
    continuation, and the split point is where the context's own encoding ends inside the
    encoding of the whole text, so that tokens merged across the boundary are not lost."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = self.tokenizer.encode(context + continuation)
    n = len(self.tokenizer.encode(context)) if context else 0
    ctx, cont = whole[:n], whole[n:]
    if not cont or whole[:n] != self.tokenizer.encode(context)[:n]:
      ctx, cont = self.tokenizer.encode(context) if context else [], \
          self.tokenizer.encode(continuation)
    return [self.eos_id] + ctx, cont

  def _bucket(self, n: int) -> int:
    """The padded length of a forward over n tokens: a power of two, at most seq_len."""
    return min(self.seq_len, max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()))

  def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each continuation given its context, both token lists.

    The input of a pair is (context + continuation)[:-1], its last seq_len tokens when longer;
    only continuation tokens are scored. Rows are sorted by length and batched.
    """
    rows = []
    for ctx, cont in pairs:
      if not cont:
        raise ValueError('loglikelihood: a request has an empty continuation.')
      whole = (list(ctx) + list(cont))[-(self.seq_len + 1):]
      rows.append((whole[:-1], whole[1:], min(len(cont), len(whole) - 1)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[Any] = [None] * len(rows)
    b = self.batch_size
    for start in range(0, len(order), b):
      chunk = order[start:start + b]
      length = self._bucket(len(rows[chunk[0]][0]))
      tokens = np.zeros((b, length), np.int32)
      targets = np.zeros((b, length), np.int32)
      mask = np.zeros((b, length), bool)
      for r, i in enumerate(chunk):
        inp, tgt, n_cont = rows[i]
        tokens[r, :len(inp)], targets[r, :len(tgt)] = inp, tgt
        mask[r, len(tgt) - n_cont:len(tgt)] = True
      ll, greedy = _score(self.model, jnp.asarray(tokens), jnp.asarray(targets),
                          jnp.asarray(mask), self.alpha)
      ll, greedy = np.asarray(ll), np.asarray(greedy)
      for r, i in enumerate(chunk):
        out[i] = (float(ll[r]), bool(greedy[r]))
    return out

  # ------------------------------------------------------------------------- the LM interface

  def loglikelihood(self, requests, disable_tqdm: bool = False):
    results = self.score([self._pair(*r.args) for r in requests])
    for r, result in zip(requests, results):
      self.cache_hook.add_partial('loglikelihood', r.args, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    windows, owner = [], []
    for i, r in enumerate(requests):
      tokens = self.tokenizer.encode(r.args[0])
      for window in lm_eval.utils.get_rolling_token_windows(
          tokens, prefix_token=self.eos_id, max_seq_len=self.seq_len, context_len=1):
        windows.append(lm_eval.utils.make_disjoint_window(window))
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (ll, _) in zip(owner, self.score(windows)):
      totals[i] += ll
    for r, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', r.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False):
    groups: dict[tuple, list[int]] = {}
    settings = []
    for i, r in enumerate(requests):
      context, kwargs = r.args
      kwargs = dict(kwargs or {})
      until = kwargs.pop('until', None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(kwargs.pop('max_gen_toks', 256))
      max_new = max(1, min(max_new, self.seq_len - 1))
      temperature = float(kwargs.pop('temperature', 0.0)) if kwargs.pop('do_sample', False) \
          else 0.0
      prompt = ([self.eos_id] + self.tokenizer.encode(context))[-(self.seq_len - max_new + 1):]
      settings.append((prompt, until))
      groups.setdefault((max_new, temperature), []).append(i)
    out: list[Any] = [None] * len(requests)
    for (max_new, temperature), members in groups.items():
      members = sorted(members, key=lambda i: -len(settings[i][0]))
      for start in range(0, len(members), self.batch_size):
        chunk = members[start:start + self.batch_size]
        prompts = [settings[i][0] for i in chunk]
        prompts += [[self.eos_id]] * (self.batch_size - len(chunk))  # one batch shape
        new = decoding.generate(self.model, prompts, max_new, temperature=temperature,
                                eos_id=self.eos_id, seed=self.seed, alpha=self.alpha,
                                pad_multiple=32)
        for i, ids in zip(chunk, new):
          text = self.tokenizer.decode(ids)
          for stop in settings[i][1]:
            if stop and stop in text:
              text = text[:text.index(stop)]
          out[i] = text
          self.cache_hook.add_partial('generate_until', requests[i].args, text)
    return out


# ----------------------------------------------------------------------------- a trained run


@functools.lru_cache(maxsize=4)
def task_manager(include_path=None, include_defaults: bool = True):
  """The harness's task index (kept: indexing its thousands of YAMLs takes seconds)."""
  require_harness()
  return lm_eval.tasks.TaskManager(include_path=include_path, include_defaults=include_defaults)


def check_tasks(tasks: Sequence[str], manager) -> None:
  """A one-line ValueError naming every requested task the harness does not know."""
  known = set(manager.all_tasks)
  missing = [t for t in tasks if t not in known]
  if missing:
    raise ValueError(f'--tasks: no lm-eval task named {", ".join(map(repr, missing))}; list '
                     'them with `lm-eval ls tasks`, or add your own YAML with --include-path DIR.')


def latest_step(workdir, config) -> int:
  """The step of the newest checkpoint of `workdir` (the one decoding.load restores)."""
  ckpt = checkpoint.Checkpointer(pathlib.Path(workdir), keep=config.train.keep_ckpts)
  try:
    return int(ckpt.latest_step())
  finally:
    ckpt.close()


def results_path(workdir, step: int, tasks: Sequence[str]) -> pathlib.Path:
  name = '+'.join(tasks)
  if len(name) > 80:
    name = f'{name[:60]}+{len(tasks)}tasks-{hashlib.sha1(name.encode()).hexdigest()[:8]}'
  return pathlib.Path(workdir) / RESULTS_DIR / f'step{step}_{name}.json'


def evaluate(workdir, tasks: Sequence[str], *, num_fewshot: int | None = None,
             limit: float | None = None, batch_size: int = 16, include_path=None,
             include_defaults: bool = True, merge_threshold: int | None = None,
             mesh: str | None = None, bootstrap_iters: int = 100000, out=None, seed: int = 0):
  """Run the harness on the newest checkpoint of `workdir`; returns (results path, record)."""
  tasks = [t.strip() for t in tasks if t.strip()]
  if not tasks:
    raise ValueError('--tasks: name at least one task, e.g. --tasks arc_easy,hellaswag')
  require_harness()
  config, model, alpha, manifest = decoding.load(workdir, merge_threshold, mesh)
  manager = task_manager(None if include_path is None else str(include_path), include_defaults)
  check_tasks(tasks, manager)
  step = latest_step(workdir, config)
  lm = StructFFNLM(model, manifest.load_tokenizer(), manifest.eos_id, alpha=alpha,
                   batch_size=batch_size, seed=seed)
  results = harness.simple_evaluate(
      model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
      bootstrap_iters=bootstrap_iters, log_samples=False, random_seed=seed,
      numpy_random_seed=seed, fewshot_random_seed=seed)
  record = {'workdir': str(workdir), 'step': step, 'name': config.name, 'tasks': tasks,
            'num_fewshot': num_fewshot, 'limit': limit}
  for key in ('results', 'groups', 'versions', 'n-shot', 'higher_is_better', 'n-samples'):
    if key in results:
      record[key] = results[key]
  path = pathlib.Path(out) if out else results_path(workdir, step, tasks)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(record, indent=1, default=lm_eval.utils.handle_non_serializable)
                  + '\n')
  return path, record


def summary(record: dict) -> list[str]:
  """One line per task and metric: value (± stderr)."""
  lines = []
  for task, metrics in record.get('results', {}).items():
    for key, value in metrics.items():
      if not isinstance(value, (int, float)) or key.startswith('sample') or '_stderr' in key:
        continue
      metric, _, filt = key.partition(',')
      stderr = metrics.get(f'{metric}_stderr,{filt}')
      err = f' ± {stderr:.4f}' if isinstance(stderr, float) else ''
      lines.append(f'{task:<24} {metric:<16} {value:.4f}{err}')
  return lines


def main(argv=None):
  parser = cli.parser(__doc__)
  parser.add_argument('--workdir', required=True, help='a training workdir')
  parser.add_argument('--tasks', required=True, help='comma-separated lm-eval task names')
  parser.add_argument('--num-fewshot', type=int, default=None, help='default: each task\'s own')
  parser.add_argument('--limit', type=float, default=None,
                      help='documents per task (a fraction when < 1), for a quick look')
  parser.add_argument('--batch-size', type=int, default=16,
                      help='requests per forward pass (default: 16)')
  parser.add_argument('--include-path', default=None, help='a folder of extra task YAMLs')
  parser.add_argument('--bootstrap-iters', type=int, default=100000,
                      help='for the stderr of non-mean metrics; 0 = none')
  parser.add_argument('--merge-threshold', type=int, default=None,
                      help='pre-merge threshold in tokens (0 = off, -1 = config / premerge.json)')
  parser.add_argument('--mesh', default=None, metavar='D,F,T',
                      help="mesh sizes (data, fsdp, tensor) instead of the run's, e.g. 1,1,1")
  parser.add_argument('--out', default=None, help='results JSON (default: <workdir>/lm_eval/)')
  parser.add_argument('--seed', type=int, default=0, help='seed of sampled generations')
  args = parser.parse_args(argv)
  try:
    path, record = evaluate(
        args.workdir, args.tasks.split(','), num_fewshot=args.num_fewshot, limit=args.limit,
        batch_size=args.batch_size, include_path=args.include_path,
        merge_threshold=args.merge_threshold, mesh=args.mesh,
        bootstrap_iters=args.bootstrap_iters, out=args.out, seed=args.seed)
  except (FileNotFoundError, ValueError, ImportError) as e:
    sys.exit(f'error: {e}')
  print('\n'.join(summary(record)))
  print(f'[step {record["step"]} of {record["name"]}; results in {path}]', file=sys.stderr)


if __name__ == '__main__':
  main()
