"""Train a GPT with structured FFNs: `python -m structffn_jax.train --config F.py:ARG --workdir DIR`.

One run = one workdir: config.json, data/ (tokenizer + token rows, prepared on first use),
checkpoints/, metrics.jsonl, tb/ (TensorBoard), profile/ (XLA traces). Re-running the same
command resumes from the newest checkpoint and continues exactly as if never stopped.

Self-guided training (docs/design.md §3, structffn_jax/sgt.py): the optimizer state carries α;
before step G the guides and their optimizer state are dropped and the step is compiled once
more. With `sgt.mode=fixedflop` the run has S + G steps and its last G steps replay the first G
batches.

The loop (`Trainer.run`) is the train step plus hooks, one responsibility each (`Hook`,
structffn_jax/hooks.py): late metrics, the checkpoint in flight, the profiler window, the
hand-over, throughput, evaluation, checkpoints and stopping. `Trainer(..., hooks=[...])` adds
more, e.g. one that reads every step's record with `on_metrics`.

Devices: one (data, fsdp, tensor) mesh over every device of every process (`config.mesh`, see
structffn_jax/sharding.py). The state is initialised sharded, each step is jitted with explicit
shardings, and each process reads only the rows of a batch its devices hold. With several
processes (`mesh.distributed`, launch/README.md) every one runs this same command.

  --profile K:N   XLA trace of steps K..K+N-1 under <workdir>/profile (TensorBoard / Perfetto)
  --config.F=V    override any config field, e.g. --config.train.tokens=1e6 (or --set F=V)
  --allow-change F  resume with a changed train.* / data.* field, e.g. after a non-finite loss:
                  --set train.peak_lr=3e-4 --allow-change train.peak_lr

Exit status: 0 finished; 75 (EX_TEMPFAIL) stopped by SIGTERM/SIGINT after saving a checkpoint,
so requeue the same command to resume; 1 an error (one `error: ...` line on stderr).
"""

from __future__ import annotations

import logging
import pathlib
import signal
import sys

import jax

from structffn_jax import accounting, checkpoint, cli, distributed, hostmem, memory, metrics
from structffn_jax import hooks as hooks_lib
from structffn_jax import optim
from structffn_jax import run as run_lib
from structffn_jax import sgt, sharding, steps
from structffn_jax import workdir as workdir_lib
from structffn_jax import config as config_lib
from structffn_jax.data import prepare as prepare_lib
from structffn_jax.hooks import EXIT_PREEMPTED, Hook, NonFiniteLoss
from structffn_jax.plan import make_plan

__all__ = ['EXIT_PREEMPTED', 'Hook', 'NonFiniteLoss', 'Trainer', 'main']


class Trainer:
  """Owns the state of one run; `run()` trains to the end or to a stop request."""

  def __init__(self, config, workdir, *, profile: tuple[int, int] | None = None,
               allow_change: tuple[str, ...] = (), hooks: tuple[Hook, ...] = ()):
    """`allow_change`: config fields (train.*, data.*) that may differ from the run already in
    `workdir`, e.g. a lower train.peak_lr after a non-finite loss; recorded in its history.
    `hooks`: more `Hook`s for the training loop, called after the built-in ones."""
    self.config = config
    self.workdir = pathlib.Path(workdir)
    self.is_main = jax.process_index() == 0
    # Every check on the config, the mesh, the batches and the parameter shapes comes before any
    # compile, and before anything is written.
    config_lib.validate(config)
    allow_change = workdir_lib.check_allow_change(allow_change)
    self.mesh = sharding.make_mesh(config)
    memory.check(config, dict(self.mesh.shape), list(self.mesh.devices.flat))  # before any build
    self.rules = sharding.rules_of(config)
    self.plan = make_plan(config)
    sharding.check_batch(config, self.mesh, jax.process_count())
    self.tx = optim.make_optimizer(config, self.plan.total_steps, self.plan.guided_steps)
    self.lr = optim.lr_schedule(config.train, self.plan.total_steps)
    run_lib.abstract_state(config, self.tx, self.mesh, guides=True)  # the parameter shapes
    self.lock = self.ckpt = self.report = None
    with checkpoint.disk_full_in_one_line(self.workdir):
      try:
        self.lock = workdir_lib.lock_workdir(self.workdir)
        self._start(profile, allow_change, tuple(hooks))
      except BaseException:
        self.close(quiet=True)
        raise

  def _start(self, profile, allow_change, extra_hooks):
    """Everything after the lock: the workdir's config, data, checkpoints, state, compiles."""
    config = self.config
    changes = workdir_lib.check_workdir_config(self.workdir, config, allow_change=allow_change)
    distributed.barrier('workdir checked')
    self.report = metrics.Reporter(self.workdir, self.plan.total_steps, enabled=self.is_main,
                                   config=config)
    if self.lock is not None and self.lock.took_over:
      self.report.log(self.lock.took_over)
    self.report.log(sharding.describe(self.mesh))
    if hostmem.status() != 'not requested':  # the CLI tuned (or left) the CPU allocator
      self.report.log(f'host allocator: {hostmem.status()}')
    self.acc = accounting.account(config)
    self.manifest = prepare_lib.prepare_for_run(
        config, self.workdir, is_main=self.is_main,
        barrier=lambda: distributed.barrier('data prepared'), log=self.report.log)
    changes.update(workdir_lib.check_data_identity(  # another tokenizer or other rows
        self.workdir, self.manifest.identity(), allow_change=allow_change))
    self.stop_signal = self.stop_at = None  # set by StopHook's signal handler; run(stop_at)
    profile = profile or (config.train.profile_start, config.train.profile_steps)
    self.hooks = (*hooks_lib.default_hooks(config, profile, _lm_eval_hooks(config)), *extra_hooks)
    self.ckpt = checkpoint.Checkpointer(self.workdir, config.train.keep_ckpts, cleanup=True,
                                        log=self.report.log)
    abstract, self.state, meta = run_lib.restore_or_init(config, self.tx, self.mesh, self.ckpt)
    self.step, self.guides = int(meta.get('step', 0)), run_lib.has_guides(config, meta)
    self.resumed = accounting.Trained.resumed(config, self.acc, self.step, meta)
    self._compile(abstract)
    # The run has started: now its identity (config.json) and any accepted change are written.
    workdir_lib.record_start(self.workdir, config, changes, self.step, log=self.report.log,
                             write=self.is_main, data_identity=self.manifest.identity())
    distributed.barrier('workdir config written')

  def close(self, quiet: bool = False) -> None:
    """Finish the save in flight, close the reports, release the workdir (each whatever the one
    before raised); then raise the first error unless `quiet` (another error is on its way).
    Called by `run()`; call it for a Trainer that is never run."""
    ckpt, report, lock = self.ckpt, self.report, self.lock
    self.ckpt = self.report = self.lock = None
    errors = workdir_lib.close_then_release(
        [lambda w=w: w.close(quiet=quiet) for w in (ckpt, report) if w is not None], lock)
    if errors and not quiet:
      with checkpoint.disk_full_in_one_line(self.workdir):
        raise errors[0]

  # --------------------------------------------------------------------------- state

  def tokens_at(self, step: int) -> int:
    """Tokens trained by the end of optimizer step `step` (`accounting.Trained`)."""
    return self.resumed.tokens_at(self.config, step)

  def flops_at(self, step: int) -> float:
    """Training FLOPs by the end of optimizer step `step`, counted as `tokens_at`."""
    return self.resumed.flops_at(self.config, self.acc, step)

  def _compile(self, abstract: run_lib.AbstractState):
    """The steps of the state's graph (`steps.jit_steps`), at the start and after the hand-over."""
    self.graphdef, self.state_shardings = abstract.graphdef, abstract.shardings
    self.train_step, self.eval_step, self.batch_sharding, self.mask_sharding = steps.jit_steps(
        self.graphdef, self.tx, self.plan.micro_batches, self.mesh, self.rules,
        self.state_shardings)

  def hand_over(self):
    """Hand-over complete: remove the guides and their optimizer state, compile once more."""
    self.state = sgt.hand_over(self.graphdef, self.state, self.tx)
    self.guides = False
    self._compile(run_lib.abstract_state(self.config, self.tx, self.mesh, guides=False))
    self.report.log(f'step {self.step}: self-guided hand-over complete (α=0); dropped '
                    f'{self.acc.params_guide:,} guide parameters and their optimizer state')

  # --------------------------------------------------------------------------- loop

  def run(self, stop_at: int | None = None) -> dict:
    """Train to the end. `stop_at`: behave as if interrupted once that step is done."""
    failed = True
    try:
      with checkpoint.disk_full_in_one_line(self.workdir, first=lambda: self.ckpt.wait()), \
          sharding.use_mesh(self.mesh, self.rules):
        self.stop_at = stop_at
        result = self._run()
      failed = False
    finally:
      self.close(quiet=failed)
    return result

  def _run(self) -> dict:
    """The loop: one train step after another, the hooks around each (see `Hook`)."""
    self.report.log(accounting.describe_run(self.config, self.acc))
    batches = steps.TrainBatches(self.config, self.manifest, self.plan, self.batch_sharding,
                                 self.step)
    step_key = jax.random.key(self.config.train.seed + 1)
    self.stopped = None
    try:
      for hook in self.hooks:
        hook.begin(self)
      self.report.log(self.plan.start_line(self.step, self.tokens_at(self.step)))
      while self.step < self.plan.total_steps:
        for hook in self.hooks:
          hook.before_step(self)
        key = jax.random.fold_in(step_key, self.step)
        self.state, m = self.train_step(self.state, next(batches), key)
        self.step += 1
        for hook in self.hooks:
          if hook.every and self.step % hook.every == 0:
            hook.after_step(self, m)
        if self.stopped:
          return {'step': self.step, 'stopped': self.stopped}
      result = {'step': self.step}
      for hook in self.hooks:
        result.update(hook.end(self) or {})
      return result
    finally:
      for hook in self.hooks:
        hook.close(self)
      batches.close()

  def flush_metrics(self, extra: dict | None = None, progress: float | None = None):
    """Write the metrics of the step held back (`hooks.MetricsHook`) now, before anything else is
    reported about that step; `extra` joins its record, `progress` (steps/s) prints the line."""
    self.hooks[0].flush(self, extra, progress)


def _lm_eval_hooks(config) -> tuple[Hook, ...]:
  """The harness in the loop: `eval.lm_eval_tasks` (structffn_jax/lm_eval.py), if any."""
  if not (config.get('eval') or {}).get('lm_eval_tasks'):
    return ()
  from structffn_jax import lm_eval  # pylint: disable=import-outside-toplevel
  return (lm_eval.LMEvalHook(config),)


class StartupTerminated(KeyboardInterrupt):
  """SIGTERM before the training loop's own handler is installed (start-up): unwinds like Ctrl-C,
  so that the workdir's lock is released and one line is printed."""


def _terminate_startup(signum, frame):
  raise StartupTerminated(signal.Signals(signum).name)


def main(argv=None):
  # From the first line on, SIGTERM unwinds like SIGINT; the training loop's hook replaces both
  # handlers with its save-and-stop one once training starts. A signal may land anywhere in
  # start-up (parsing flags included), so the whole of it runs inside the handler below.
  signal.signal(signal.SIGTERM, _terminate_startup)
  try:
    _main(argv)
  except KeyboardInterrupt as e:
    name = 'SIGTERM' if isinstance(e, StartupTerminated) else 'SIGINT'
    print(f'error: {name} before training started; nothing was saved. Run the same command '
          f'to start again.', file=sys.stderr)
    sys.exit(EXIT_PREEMPTED if name == 'SIGTERM' else 130)


def _main(argv):
  parser = cli.parser(__doc__, 'structffn_jax.train')
  cli.add_config_flags(parser)
  parser.add_argument('--workdir', required=True,
                      help='directory of the run: created, or resumed from its newest checkpoint')
  parser.add_argument('--profile', default='', metavar='K:N',
                      help='XLA profiler trace of steps K..K+N-1 under <workdir>/profile')
  parser.add_argument('--allow-change', action='append', default=[], metavar='FIELD',
                      help='let a resumed run change this train.* or data.* field (repeatable); '
                           'recorded in <workdir>/config_history.jsonl')
  args = cli.parse(parser, argv)
  logging.basicConfig(level=logging.INFO, format='%(message)s')
  for noisy in ('absl', 'orbax', 'jax'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  profile = None
  if args.profile:
    try:
      k, n = (int(x) for x in args.profile.split(':'))
      if k < 0 or n < 1:
        raise ValueError
    except ValueError:
      sys.exit(f'error: --profile {args.profile!r}: expected K:N, the first step K >= 0 and N >= 1 '
               f'steps, e.g. --profile 10:5')
    profile = (k, n)
  try:
    config = config_lib.load(args.config, tuple(args.set))
    distributed.initialize(sharding.mesh_config(config).distributed)
    trainer = Trainer(config, args.workdir, profile=profile,
                      allow_change=tuple(args.allow_change))
    result = trainer.run()
  except (config_lib.ConfigError, FileNotFoundError, ValueError, NonFiniteLoss,
          checkpoint.CheckpointError, workdir_lib.WorkdirLocked) as e:
    sys.exit(f'error: {e}')
  except OSError as e:
    extra = f'; {workdir_lib.free_space(args.workdir)} in {args.workdir}' \
        if workdir_lib.is_disk_full(e) else ''
    sys.exit(f'error: {e}{extra}')
  if result.get('stopped'):
    sys.exit(EXIT_PREEMPTED)


if __name__ == '__main__':
  main()
