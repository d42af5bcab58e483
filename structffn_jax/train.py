"""Train a GPT with structured FFNs: `python -m structffn_jax.train --config F.py:ARG --workdir DIR`.

One run = one workdir: config.json, data/ (tokenizer + token rows, prepared on first use),
checkpoints/, metrics.jsonl, tb/ (TensorBoard), profile/ (XLA traces). Re-running the same
command resumes from the newest checkpoint and continues exactly as if never stopped.

Self-guided training (docs/design.md §3, structffn_jax/sgt.py): the optimizer state carries α;
before step G the guides and their optimizer state are dropped and the step is compiled once
more. With `sgt.mode=fixedflop` the run has S + G steps and its last G steps replay the first G
batches.

The loop (`Trainer.run`) is the train step plus hooks, one responsibility each (`Hook`): late
metrics, the checkpoint in flight, the profiler window, the hand-over, throughput, evaluation,
checkpoints and stopping. `Trainer(..., hooks=[...])` adds more, e.g. one that reads every
step's record with `on_metrics`.

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

import contextlib
import logging
import math
import pathlib
import signal
import sys
import time

import jax
import numpy as np

from structffn_jax import accounting, checkpoint, cli, distributed, hostmem, memory, metrics
from structffn_jax import optim
from structffn_jax import run as run_lib
from structffn_jax import sgt, sharding, steps
from structffn_jax import workdir as workdir_lib
from structffn_jax import config as config_lib
from structffn_jax import evaluation
from structffn_jax.data import pipeline
from structffn_jax.data import prepare as prepare_lib
from structffn_jax.model import GPT
from structffn_jax.plan import make_plan


# The exit status of a run stopped by SIGTERM or SIGINT after saving a checkpoint (EX_TEMPFAIL):
# a scheduler that sees it requeues the same command, which resumes. A finished run exits 0, a
# failed one 1 with an `error: ...` line.
EXIT_PREEMPTED = 75


class NonFiniteLoss(RuntimeError):
  """Training produced a NaN or Inf loss."""


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
    self._set_abstract(guides=config.sgt.enabled)  # raises on a dimension the mesh can't split
    self.lock = self.ckpt = self.report = None
    try:
      self.lock = workdir_lib.lock_workdir(self.workdir)
      self._start(profile, allow_change, tuple(hooks))
    except BaseException as e:
      self.close(quiet=True)
      if isinstance(e, OSError) and workdir_lib.is_disk_full(e):
        raise checkpoint.CheckpointError(checkpoint.disk_full(self.workdir, e)) from None
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
    self.profile = profile or (config.train.profile_start, config.train.profile_steps)
    self.stop_signal = None  # set by the signal handler of StopHook
    self.stop_at = None  # run(stop_at)
    self._metrics = MetricsHook()
    lm_eval_hook = ()
    if (config.get('eval') or {}).get('lm_eval_tasks'):  # the harness in the loop: lm_eval.py
      from structffn_jax import lm_eval
      lm_eval_hook = (lm_eval.LMEvalHook(config),)
    # The checkpoint hook comes before the evaluations: the last step's checkpoint is final
    # before the final evaluation starts, so that no evaluation failure can lose a finished run.
    self.hooks = (self._metrics, SaveStatusHook(), ProfilerHook(*self.profile), HandOverHook(),
                  ThroughputHook(), CheckpointHook(), EvalHook(), *lm_eval_hook, StopHook(),
                  *extra_hooks)
    self.ckpt = checkpoint.Checkpointer(self.workdir, config.train.keep_ckpts, cleanup=True,
                                        log=self.report.log)
    self._build_state()
    # The run has started: now its identity (config.json) and any accepted change are written.
    workdir_lib.record_start(self.workdir, config, changes, self.step, log=self.report.log,
                             write=self.is_main, data_identity=self.manifest.identity())
    distributed.barrier('workdir config written')

  def close(self, quiet: bool = False) -> None:
    """Finish the save in flight, close the reports and release the workdir. Called by `run()`;
    call it for a Trainer that is never run. `quiet`: another error is on its way.

    Every step is taken whatever the one before raised (the lock is always released); then the
    first error, if any and unless `quiet`, is raised (a full disk in one line naming the last
    good checkpoint)."""
    errors = []
    ckpt, report, lock = self.ckpt, self.report, self.lock
    self.ckpt = self.report = self.lock = None
    try:
      for close in (ckpt and (lambda: ckpt.close(quiet=quiet)),
                    report and (lambda: report.close(quiet=quiet))):
        if close:
          try:
            close()
          except Exception as e:  # pylint: disable=broad-except
            errors.append(e)
    finally:
      if lock is not None:
        lock.release()
    if errors and not quiet:
      if isinstance(errors[0], OSError) and workdir_lib.is_disk_full(errors[0]):
        raise checkpoint.CheckpointError(checkpoint.disk_full(self.workdir, errors[0])) from None
      raise errors[0]

  # --------------------------------------------------------------------------- state

  def _set_abstract(self, guides: bool):
    """The train state's graph and shardings, with or without the guides (`run.abstract_state`);
    returns its abstract state."""
    self.graphdef, abstract, self.state_shardings = run_lib.abstract_state(
        self.config, self.tx, self.mesh, guides)
    return abstract

  def _build_state(self):
    """Restore the newest checkpoint that can be read (see `Checkpointer.restore_newest`), or
    initialise. Whether the guides were dropped comes from the metadata of the checkpoint tried,
    and the data position from its step."""
    def target(meta):
      self.guides = self.config.sgt.enabled and not meta.get('guides_dropped', False)
      return sharding.with_shardings(self._set_abstract(self.guides), self.state_shardings)

    restored = self.ckpt.restore_newest(target)
    self.step = 0
    if restored is None:  # initialised in place: a large model never sits on one device
      self.guides = self.config.sgt.enabled
      self._set_abstract(self.guides)
      c, guides = self.config, self.guides
      new_model = lambda: GPT.from_config(c, guides=guides, seed=c.train.seed)
      self.state = jax.jit(lambda: steps.init_state(new_model(), self.tx)[1],
                           out_shardings=self.state_shardings)()
    else:
      step, self.state, meta = restored
      self.step = int(meta['step'])
      self.report.log(f'resumed from {self.ckpt.path(step)} at step {self.step}')
    # What was trained before this run(): the checkpoint's count (one saved before it kept one
    # counts its steps at this config's batch).
    meta = restored[2] if restored is not None else {}
    self.resumed = (self.step, int(meta.get('tokens_trained', self.tokens_at(self.step))),
                    float(meta.get('train_flops', self.flops_at(self.step))))
    self._compile()

  def tokens_at(self, step: int) -> int:
    """Tokens trained by the end of optimizer step `step`: those the checkpoint resumed from
    had trained, plus the steps since at this config's global_batch x seq_len. A change of
    train.global_batch on resume keeps the step; the plan, the schedule and the data position
    are the new config's, in optimizer steps (its total: train.tokens / (global_batch x
    seq_len)), and each step from then on trains the new batch (README, "What survives
    what")."""
    start, tokens, _ = getattr(self, 'resumed', (0, 0, 0.0))
    return tokens + (step - start) * self.config.train.global_batch * self.config.model.seq_len

  def flops_at(self, step: int) -> float:
    """Training FLOPs by the end of optimizer step `step`, counted as `tokens_at`."""
    start, _, flops = getattr(self, 'resumed', (0, 0, 0.0))
    return flops + accounting.flops_between(self.config, self.acc, start, step)

  def _compile(self):
    mesh, rules = self.mesh, self.rules
    state_sh, rep = self.state_shardings, sharding.replicated(mesh)
    self.batch_sharding = sharding.batch_sharding(mesh, rules, 2)
    self.mask_sharding = sharding.batch_sharding(mesh, rules, 1)
    self.train_step = jax.jit(
        steps.make_train_step(self.graphdef, self.tx, self.plan.micro_batches),
        in_shardings=(state_sh, self.batch_sharding, rep), out_shardings=(state_sh, rep),
        donate_argnums=0)
    self.eval_step = jax.jit(
        steps.make_eval_step(self.graphdef),
        in_shardings=(state_sh['params'], rep, self.batch_sharding, self.mask_sharding),
        out_shardings=rep)

  def hand_over(self):
    """Hand-over complete: remove the guides and their optimizer state, compile once more."""
    self.state = sgt.hand_over(self.graphdef, self.state, self.tx)
    self._set_abstract(guides=False)
    self.guides = False
    self._compile()
    self.report.log(f'step {self.step}: self-guided hand-over complete (α=0); dropped '
                    f'{self.acc.params_guide:,} guide parameters and their optimizer state')

  # --------------------------------------------------------------------------- loop

  def run(self, stop_at: int | None = None) -> dict:
    """Train to the end. `stop_at`: behave as if interrupted once that step is done."""
    failed = False
    try:
      with sharding.use_mesh(self.mesh, self.rules):
        self.stop_at = stop_at
        return self._run()
    except OSError as e:
      failed = True
      if workdir_lib.is_disk_full(e):  # metrics, TensorBoard or a checkpoint
        with contextlib.suppress(Exception):  # the save in flight: final or failed, then named
          self.ckpt.wait()
        raise checkpoint.CheckpointError(checkpoint.disk_full(self.workdir, e)) from None
      raise
    except BaseException:
      failed = True
      raise
    finally:
      self.close(quiet=failed)

  def _run(self) -> dict:
    """The loop: one train step after another, the hooks around each (see `Hook`)."""
    t = self.config.train
    self.report.log(accounting.describe_run(self.config, self.acc))
    index, count = sharding.process_share(self.batch_sharding, (t.global_batch, 1))
    stream = pipeline.BatchStream(self.manifest, 'train', global_batch=t.global_batch,
                                  seed=t.seed if t.data_seed < 0 else t.data_seed,
                                  process_index=index, process_count=count)
    batches = stream.iterate(self.step, self.plan.data_index)
    step_key = jax.random.key(t.seed + 1)
    self.stopped = None
    try:
      for hook in self.hooks:
        hook.begin(self)
      if self.step >= self.plan.total_steps:
        self.report.log(
            f'step {self.step}: {"past" if self.step > self.plan.total_steps else "at"} the end '
            f'of this config\'s {self.plan.total_steps} steps (train.tokens / (global_batch x '
            f'seq_len)); nothing to train, {self.tokens_at(self.step):,} tokens trained. Raise '
            f'train.tokens (--allow-change train.tokens) to train on.')
      else:
        self.report.log(f'training from step {self.step}; the first step compiles')
      while self.step < self.plan.total_steps:
        for hook in self.hooks:
          hook.before_step(self)
        local = next(batches)
        batch = jax.make_array_from_process_local_data(  # this process's rows, over the mesh
            self.batch_sharding, local, (t.global_batch,) + local.shape[1:])
        self.state, m = self.train_step(self.state, batch, jax.random.fold_in(step_key, self.step))
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
    """Write the metrics of the step held back (`MetricsHook`) now, before anything else is
    reported about that step; `extra` joins its record, `progress` (steps/s) prints the line."""
    self._metrics.flush(self, extra, progress)


# ----------------------------------------------------------------------------- the loop's hooks


class Hook:
  """One responsibility of the training loop, called by `Trainer.run` at fixed points.

  Every hook in `Trainer.hooks` is called in that order at each point; a method does nothing
  unless a hook overrides it. Add one with `Trainer(..., hooks=[MyHook()])`.

    begin(trainer)                     before the first step of this run() (a resumed one too)
    before_step(trainer)               trainer.step: the optimizer steps done so far
    after_step(trainer, m)             the step just run, when trainer.step is a multiple of
                                       `every` (1: every step; 0: never); m: its metrics, still
                                       on the device
    on_metrics(trainer, step, record)  the record of `step`, fetched to the host one step late
    end(trainer)                       every step done; a dict returned joins run()'s result
    close(trainer)                     always, last (also after an error): undo begin()

  `every` may be set in begin() from the config (EvalHook: train.eval_every).
  """

  every = 1

  def begin(self, trainer: Trainer) -> None:
    pass

  def before_step(self, trainer: Trainer) -> None:
    pass

  def after_step(self, trainer: Trainer, m: dict) -> None:
    pass

  def on_metrics(self, trainer: Trainer, step: int, record: dict) -> None:
    pass

  def end(self, trainer: Trainer) -> dict | None:
    pass

  def close(self, trainer: Trainer) -> None:
    pass


def step_flops(trainer: Trainer) -> float:
  """Training FLOPs of the step just run, in the paper's accounting."""
  return accounting.flops_between(trainer.config, trainer.acc, trainer.step - 1, trainer.step)


class MetricsHook(Hook):
  """Each step's metrics, fetched one step late so that the host never waits for the step it
  just launched: stops on a non-finite loss, writes the record (loss, grad_norm, α, tokens,
  training FLOPs so far) and hands it to every hook's `on_metrics`."""

  def begin(self, trainer):
    self.pending = None  # (step, metrics on the device, training FLOPs up to that step)
    # A resumed run counts on from the FLOPs of the steps before it (`Trainer.flops_at`).
    self.flops_done = trainer.flops_at(trainer.step)

  def after_step(self, trainer, m):
    self.flops_done += step_flops(trainer)
    self.flush(trainer)
    self.pending = (trainer.step, m, self.flops_done)

  def flush(self, trainer, extra=None, progress=None):
    """Fetch the step held back (blocking only now) and report it; see `Trainer.flush_metrics`."""
    if getattr(self, 'pending', None) is None:
      return
    (step, m, flops_done), self.pending = self.pending, None
    host = {k: float(v) for k, v in jax.device_get(m).items()}
    if not np.isfinite(host['loss']):
      raise NonFiniteLoss(trainer.ckpt.set_aside_non_finite(step, host['loss'],
                                                            trainer.config.train.peak_lr))
    record = {**host, 'tokens': trainer.tokens_at(step), 'train_flops': flops_done,
              **(extra or {})}
    written = {k: v for k, v in record.items() if v is not None}
    trainer.report.write(step, written)
    if progress is not None:
      trainer.report.progress(step, record, progress)
    for hook in trainer.hooks:
      hook.on_metrics(trainer, step, written)

  def end(self, trainer):
    self.flush(trainer)


class SaveStatusHook(Hook):
  """The checkpoint save in flight: reported once final, and a failed one stops the run at the
  next step (every step with one process; at log steps with several, where they agree)."""

  def begin(self, trainer):
    self.every = 1 if jax.process_count() == 1 else trainer.config.train.log_every

  def after_step(self, trainer, m):
    self.check(trainer)

  @staticmethod
  def check(trainer: Trainer, block: bool = False):
    """Report the checkpoint in flight once it is final (a log line and a metrics record with
    how long it took); raise CheckpointError if its save failed (on any process)."""
    error = done = None
    try:
      done = trainer.ckpt.poll(block)
    except checkpoint.CheckpointError as e:
      error = e
    if jax.process_count() > 1 and distributed.agree(error is not None) and error is None:
      error = checkpoint.CheckpointError(
          f'a checkpoint save failed on another process (see its log); '
          f'{workdir_lib.free_space(trainer.workdir)} in {trainer.workdir}.')
    if error is not None:
      raise error
    if done:
      lag = trainer.step - done['step']
      trainer.report.log(f'checkpoint step {done["step"]} final after {done["seconds"]:.2f}s'
                         + (f' ({lag} steps later)' if lag else ''))
      trainer.report.write(trainer.step, {'ckpt_step': done['step'],
                                          'ckpt_final_s': done['seconds'], 'ckpt_lag_steps': lag})


class ProfilerHook(Hook):
  """An XLA trace of steps [start, start + count) under <workdir>/profile, on process 0
  (start < 0: none)."""

  def __init__(self, start: int, count: int):
    self.start, self.count = start, count
    self.tracing = False

  def before_step(self, trainer):
    if self.start >= 0 and trainer.step == self.start and trainer.is_main:
      jax.profiler.start_trace(str(trainer.workdir / 'profile'))
      self.tracing = True

  def after_step(self, trainer, m):
    if self.tracing and trainer.step >= self.start + self.count:
      jax.block_until_ready(trainer.state)
      jax.profiler.stop_trace()
      self.tracing = False
      trainer.report.log(f'profile: steps {self.start}..{trainer.step - 1} written to '
                         f'{trainer.workdir / "profile"}')

  def close(self, trainer):
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False


class HandOverHook(Hook):
  """Self-guided training's hand-over (`sgt.is_guided`): before the first step that is not
  guided, the step held back is reported, then the guides and their optimizer state are dropped
  and the step is compiled again."""

  def before_step(self, trainer):
    if trainer.guides and not sgt.is_guided(trainer.step, trainer.plan.guided_steps):
      trainer.flush_metrics()
      trainer.hand_over()


class ThroughputHook(Hook):
  """At every train.log_every-th step and the last: tokens/s, learning rate, training FLOPs and
  MFU over the steps since the last report, with the progress line. A step that compiled (the
  first, the one after the hand-over) is left out of the window."""

  def begin(self, trainer):
    t = trainer.config.train
    self.tokens_per_step = t.global_batch * trainer.config.model.seq_len
    self.peak = metrics.peak_flops_per_device(t.peak_flops)
    self.timed = None  # the compiled step the window times
    self.start, self.steps = time.perf_counter(), 0

  def after_step(self, trainer, m):
    self.steps += 1
    if trainer.train_step is not self.timed:  # this step compiled: start the window after it
      jax.block_until_ready(m['loss'])
      self.start, self.steps, self.timed = time.perf_counter(), 0, trainer.train_step
    if trainer.step % trainer.config.train.log_every and trainer.step != trainer.plan.total_steps:
      return
    jax.block_until_ready(m['loss'])
    rate = self.steps / (time.perf_counter() - self.start) if self.steps else 0.0
    peak = self.peak * jax.device_count() if self.peak else None
    trainer.flush_metrics({'tokens_per_s': rate * self.tokens_per_step,
                           'lr': float(trainer.lr(trainer.step - 1)),
                           'mfu': step_flops(trainer) * rate / peak if peak else None},
                          progress=rate)
    self.start, self.steps = time.perf_counter(), 0


class EvalHook(Hook):
  """The validation loss every train.eval_every steps and after the last step; the last joins
  run()'s result."""

  def begin(self, trainer):
    self.every = trainer.config.train.eval_every

  def after_step(self, trainer, m):
    if trainer.step < trainer.plan.total_steps:
      self._evaluate(trainer)

  def end(self, trainer):
    return self._evaluate(trainer)

  @staticmethod
  def _evaluate(trainer, split='valid'):
    trainer.flush_metrics()
    if split not in trainer.manifest.splits:
      return None
    t = trainer.config.train
    batch = t.eval_batch or t.micro_batch or t.global_batch
    max_rows = max(1, int(t.eval_tokens // trainer.config.model.seq_len))
    alpha = sgt.alpha_of(trainer.state['opt_state']) if trainer.guides else None
    with sharding.use_mesh(trainer.mesh, trainer.rules):
      loss, count = evaluation.mean_loss(trainer.eval_step, trainer.state['params'], alpha,
                                         trainer.manifest, split, batch, max_rows,
                                         trainer.batch_sharding, trainer.mask_sharding)
    result = {f'{split}_loss': loss, f'{split}_ppl': math.exp(min(loss, 50)),
              f'{split}_tokens': count}
    trainer.report.write(trainer.step, result)
    trainer.report.log(f'step {trainer.step:>6}  eval  ' + '  '.join(
        f'{k} {v:.4f}' if 'tokens' not in k else f'{k} {v:,.0f}' for k, v in result.items()))
    return result


class CheckpointHook(Hook):
  """A checkpoint every train.ckpt_every steps and after the last step (waiting until it is
  final)."""

  def begin(self, trainer):
    self.every = trainer.config.train.ckpt_every

  def after_step(self, trainer, m):
    trainer.flush_metrics()
    self.save(trainer)

  def end(self, trainer):
    self.save(trainer)
    SaveStatusHook.check(trainer, block=True)

  @staticmethod
  def save(trainer: Trainer):
    """Save the state at trainer.step (after the save before it is final: its time, or its
    failure), with the step, whether the guides were dropped, and the data position."""
    meta = {'step': trainer.step,
            'guides_dropped': trainer.config.sgt.enabled and not trainer.guides,
            'data_next_index': trainer.plan.data_index(trainer.step),
            'config': trainer.config.name, 'tokens_trained': trainer.tokens_at(trainer.step),
            'train_flops': trainer.flops_at(trainer.step)}
    SaveStatusHook.check(trainer, block=True)
    trainer.ckpt.save(trainer.step, trainer.state, meta)


class StopHook(Hook):
  """Stops the run after a step when asked: SIGTERM or SIGINT (the handler only takes note),
  run(stop_at=...), or with several processes a signal to any of them (they agree at log
  steps). It saves a checkpoint, waits until it is final, and run() returns {'step', 'stopped'}:
  the same command resumes (exit status EXIT_PREEMPTED)."""

  def begin(self, trainer):
    def on_signal(signum, frame):
      del frame
      trainer.stop_signal = signal.Signals(signum).name
      trainer.report.log(f'{trainer.stop_signal} received: saving a checkpoint after this step')

    self.old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

  def after_step(self, trainer, m):
    stop, stop_at = trainer.stop_signal, trainer.stop_at
    if stop_at is not None and trainer.step >= stop_at:
      stop = stop or f'stop_at={stop_at}'
    elif jax.process_count() > 1:  # processes agree on a signal at log steps, stop together
      agreed = (trainer.step % trainer.config.train.log_every == 0
                and distributed.agree(bool(stop)))
      stop = (stop or 'a signal to another process') if agreed else None
    if stop:
      trainer.flush_metrics()
      CheckpointHook.save(trainer)
      SaveStatusHook.check(trainer, block=True)
      trainer.report.log(f'{stop}: checkpoint saved at step {trainer.step}; run the same command '
                         f'to resume (exit status {EXIT_PREEMPTED})')
      trainer.stopped = stop

  def close(self, trainer):
    for s, h in getattr(self, 'old_handlers', {}).items():
      signal.signal(s, h)
    self.old_handlers = {}


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
