"""Zero-shot (and few-shot) evaluation of a trained run with EleutherAI's lm-evaluation-harness.

  pip install -e '.[eval]'
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
Texts are encoded as the harness's Hugging Face model (`--model hf`) encodes them for a model
exported by structffn_jax.export, whose BOS is the EOS: the EOS starts a rolling window and
stands for an empty context, and nothing is added before a non-empty one. Both give one score.

The harness's own command line, with this adapter registered as the model `structffn` (its
--log_samples, --use_cache, --output_path layout, every option):

  python -m structffn_jax.lm_eval run --model structffn --model_args pretrained=runs/quickstart \
      --tasks arc_easy --output_path out/ --log_samples

`pretrained=` (or `workdir=`) is a training workdir or a directory written by
structffn_jax.export. Importing this module registers the model in `lm_eval.api.registry`;
lm-eval 0.4.13's `lm_eval` command discovers no model outside its own package (it reads no entry
points), so its command line is reached through this module: the same subcommands and flags.

Results go to <workdir>/lm_eval/step<N>_<tasks>.json (or --out) and a summary is printed. Tasks
are the harness's registry names; --include-path DIR adds task YAMLs of your own (a local jsonl
works offline). The harness fetches its standard tasks' datasets from the Hugging Face Hub.

`LMEvalHook` runs tasks inside the training loop (config `eval.lm_eval_tasks`,
`eval.lm_eval_every`) on the parameters being trained, the scores logged as lm_eval/<task>/<metric>.

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
from structffn_jax import distributed

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
                      "pip install -e '.[eval]' (or pip install lm_eval).")


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

  @classmethod
  def from_path(cls, pretrained=None, *, workdir=None, merge_threshold=None, mesh=None,
                batch_size=16, seed=0, **ignored) -> 'StructFFNLM':
    """The adapter over a training workdir (its newest checkpoint) or an exported directory
    (structffn_jax.export): what `--model structffn --model_args pretrained=PATH` builds.
    `workdir=` is the same as `pretrained=`; the harness's device and max_batch_size are
    ignored (the run's mesh places the model)."""
    del ignored
    path = pretrained or workdir
    if not path:
      raise ValueError('--model_args: give pretrained=WORKDIR_OR_EXPORT_DIR (a training workdir '
                       'or a directory written by structffn_jax.export).')
    batch_size = 16 if batch_size in (None, 'auto') or str(batch_size).startswith('auto') \
        else int(batch_size)
    path = pathlib.Path(path)
    exported = path / 'config.json'
    if exported.is_file() and 'structffn' in json.loads(exported.read_text()):
      from structffn_jax import export
      from structffn_jax.data import tokenizer as tokenizer_lib
      model = export.load(path)
      eos = int(json.loads(exported.read_text())['eos_token_id'])
      file = path / 'tokenizer.model' if (path / 'tokenizer.model').is_file() else \
          path / 'tokenizer.json'
      tok = tokenizer_lib.load(file, field='--model_args pretrained')
      tok.eos_id = eos
      return cls(model, tok, eos, batch_size=batch_size, seed=int(seed))
    _, model, alpha, manifest = decoding.load(
        path, None if merge_threshold is None else int(merge_threshold), mesh)
    return cls(model, manifest.load_tokenizer(), manifest.eos_id, alpha=alpha,
               batch_size=batch_size, seed=int(seed))

  @classmethod
  def create_from_arg_obj(cls, arg_dict, additional_config=None):
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
    return cls.from_path(**{**extra, **arg_dict})

  @classmethod
  def create_from_arg_string(cls, arg_string, additional_config=None):
    return cls.create_from_arg_obj(lm_eval.utils.simple_parse_args_string(arg_string),
                                   additional_config)

  # ------------------------------------------------------------------------- token sequences

  def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), as the harness's Hugging Face model makes them, so that
    a model exported with structffn_jax.export scores the same under `--model hf`: trailing
    spaces of the context move to the continuation; the continuation's ids are those of the
    whole text past the context's own ids; an empty context is the EOS (the harness's prefix
    token: the exported BOS is the EOS)."""
    if not context:
      cont = self.tokenizer.encode(continuation)
      return ([self.eos_id], cont) if not cont or cont[0] != self.eos_id else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = self.tokenizer.encode(context + continuation)
    ctx = self.tokenizer.encode(context)
    cont = whole[len(ctx):]
    if not cont:  # the context's ids ran past the whole text's: score the continuation alone
      cont = self.tokenizer.encode(continuation)
    return ctx, cont

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
      ll, greedy = distributed.fetch(ll), distributed.fetch(greedy)  # on every process
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
      prompt = (self.tokenizer.encode(context) or [self.eos_id])[-(self.seq_len - max_new):]
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


MODEL_NAME = 'structffn'  # the adapter's name in the harness's model registry


def register() -> None:
  """Register StructFFNLM as the harness's model 'structffn' (again: nothing happens)."""
  require_harness()
  import importlib
  import lm_eval.api.registry
  # The harness's own names first: its lookup fills the registry only when it is empty.
  importlib.import_module('lm_eval.models')
  registry = lm_eval.api.registry.model_registry
  if registry.get(MODEL_NAME, None) is not StructFFNLM:
    registry.register(MODEL_NAME)(StructFFNLM)


def harness_cli(argv: Sequence[str]) -> None:
  """The harness's own command line (`lm_eval run|ls|validate ...`) with 'structffn' registered:
  --model structffn --model_args pretrained=WORKDIR_OR_EXPORT_DIR, and every harness option
  (--log_samples, --use_cache, --output_path and its layout)."""
  register()
  from lm_eval.__main__ import cli_evaluate
  saved = sys.argv
  sys.argv = ['lm_eval', *argv]
  try:
    cli_evaluate()
  finally:
    sys.argv = saved


if harness is not None:
  register()


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


def scalars(results: dict, prefix: str = 'lm_eval') -> dict:
  """{'lm_eval/<task>/<metric>': value} of a harness result: the numeric metrics and their
  stderrs, the filter name dropped when it is the default ('none')."""
  out = {}
  for task, metrics in results.get('results', {}).items():
    for key, value in metrics.items():
      if isinstance(value, bool) or not isinstance(value, (int, float)) or key.startswith('sample'):
        continue
      metric, _, filt = key.partition(',')
      out[f'{prefix}/{task}/{metric}' + (f',{filt}' if filt and filt != 'none' else '')] = \
          float(value)
  return out


class LMEvalHook:
  """The training loop's lm-eval hook (train.Hook): the harness's tasks `eval.lm_eval_tasks`
  every `eval.lm_eval_every` steps and after the last one, on the parameters being trained (no
  checkpoint round trip), with the run's tokenizer. The scores go to metrics.jsonl, TensorBoard
  and W&B as lm_eval/<task>/<metric> (the run's Reporter, which writes on process 0 only; every
  process evaluates, since the model is sharded over all of them), and the last ones join
  run()'s result."""

  def __init__(self, config):
    e = config.eval
    self.tasks = [t.strip() for t in str(e.lm_eval_tasks).split(',') if t.strip()]
    self.every = int(e.lm_eval_every)
    self.limit = float(e.lm_eval_limit) or None
    self.batch_size = int(e.lm_eval_batch_size)
    self.include_path = str(e.lm_eval_include_path) or None
    self.last_step = None

  def begin(self, trainer):
    require_harness()
    self.manager = task_manager(self.include_path)
    try:
      check_tasks(self.tasks, self.manager)
    except ValueError as e:
      raise ValueError(str(e).replace('--tasks', 'eval.lm_eval_tasks').replace(
          '--include-path DIR', 'eval.lm_eval_include_path=DIR')) from None
    self.tokenizer = trainer.manifest.load_tokenizer()

  def before_step(self, trainer):
    pass

  def after_step(self, trainer, m):
    if self.every and trainer.step % self.every == 0 and trainer.step < trainer.plan.total_steps:
      self._evaluate(trainer)

  def on_metrics(self, trainer, step, record):
    pass

  def end(self, trainer):
    if self.last_step == trainer.step:  # evaluated at this step already
      return {}
    return self._evaluate(trainer)

  def close(self, trainer):
    pass

  def _evaluate(self, trainer) -> dict:
    from structffn_jax import sgt, sharding
    trainer.flush_metrics()
    with sharding.use_mesh(trainer.mesh, trainer.rules):
      model = nnx.merge(trainer.graphdef, trainer.state['params'])
      alpha = sgt.alpha_of(trainer.state['opt_state']) if trainer.guides else None
      lm = StructFFNLM(model, self.tokenizer, trainer.manifest.eos_id, alpha=alpha,
                       batch_size=self.batch_size, seed=0)
      results = harness.simple_evaluate(
          model=lm, tasks=self.tasks, limit=self.limit, task_manager=self.manager,
          bootstrap_iters=0, log_samples=False, random_seed=0, numpy_random_seed=0,
          fewshot_random_seed=0)
    record = scalars(results)
    self.last_step = trainer.step
    trainer.report.write(trainer.step, record)
    trainer.report.log(f'step {trainer.step:>6}  lm_eval  ' + '  '.join(
        f'{k[len("lm_eval/"):]} {v:.4f}' for k, v in record.items() if '_stderr' not in k))
    return record


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


HARNESS_COMMANDS = ('run', 'ls', 'validate')


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] in HARNESS_COMMANDS:
    try:
      require_harness()
    except ImportError as e:
      sys.exit(f'error: {e}')
    return harness_cli(argv)
  parser = cli.parser(__doc__)
  parser.add_argument('--workdir', required=True, help='a training workdir')
  parser.add_argument('--tasks', required=True, help='comma-separated lm-eval task names')
  parser.add_argument('--num-fewshot', type=cli.integer(0), default=None,
                      help='default: each task\'s own')
  parser.add_argument('--limit', type=cli.real(0), default=None,
                      help='documents per task (a fraction when < 1), for a quick look')
  parser.add_argument('--batch-size', type=cli.integer(1), default=16,
                      help='requests per forward pass (default: 16)')
  parser.add_argument('--include-path', default=None, help='a folder of extra task YAMLs')
  parser.add_argument('--bootstrap-iters', type=cli.integer(0), default=100000,
                      help='for the stderr of non-mean metrics; 0 = none')
  parser.add_argument('--merge-threshold', type=cli.integer(-1), default=None,
                      help='pre-merge threshold in tokens (0 = off, -1 = config / premerge.json)')
  parser.add_argument('--mesh', default=None, metavar='D,F,T',
                      help="mesh sizes (data, fsdp, tensor) instead of the run's, e.g. 1,1,1")
  parser.add_argument('--out', default=None, help='results JSON (default: <workdir>/lm_eval/)')
  parser.add_argument('--seed', type=cli.integer(0), default=0,
                      help='seed of sampled generations')
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
