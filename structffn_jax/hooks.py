"""The training loop's hooks: one responsibility each, called by `Trainer.run` (train.py)
around every step (`Hook` says when).

  MetricsHook     each step's record, fetched one step late; a non-finite loss stops the run
  SaveStatusHook  the checkpoint save in flight: reported once final; a failed one stops the run
  ProfilerHook    the XLA trace window (--profile K:N)
  HandOverHook    self-guided training's hand-over
  ThroughputHook  tokens/s, learning rate, training FLOPs and MFU, with the progress line
  CheckpointHook  a checkpoint every train.ckpt_every steps and after the last
  EvalHook        the validation loss every train.eval_every steps and after the last
  StopHook        SIGTERM, SIGINT or run(stop_at=...): save, wait until final, stop

`default_hooks` gives a run's hooks in the loop's order. A hook reads the trainer's state
(step, state, config, plan, report, ckpt, ...) and calls its `flush_metrics`, `hand_over`,
`tokens_at` and `flops_at`.
"""

from __future__ import annotations

import math
import signal
import time

import jax
import numpy as np

from structffn_jax import accounting, checkpoint, distributed, evaluation, metrics, sgt, sharding
from structffn_jax import workdir as workdir_lib

# The exit status of a run stopped by SIGTERM or SIGINT after saving a checkpoint (EX_TEMPFAIL):
# a scheduler that sees it requeues the same command, which resumes. A finished run exits 0, a
# failed one 1 with an `error: ...` line.
EXIT_PREEMPTED = 75


class NonFiniteLoss(RuntimeError):
  """Training produced a NaN or Inf loss."""


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

  def begin(self, trainer) -> None:
    pass

  def before_step(self, trainer) -> None:
    pass

  def after_step(self, trainer, m: dict) -> None:
    pass

  def on_metrics(self, trainer, step: int, record: dict) -> None:
    pass

  def end(self, trainer) -> dict | None:
    pass

  def close(self, trainer) -> None:
    pass


def step_flops(trainer) -> float:
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
  def check(trainer, block: bool = False):
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
    self.tokens_per_step = accounting.tokens_per_step(trainer.config)
    self.peak = metrics.peak_flops_per_device(trainer.config.train.peak_flops)
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
  def save(trainer):
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


def default_hooks(config, profile: tuple[int, int],
                  evals: tuple[Hook, ...] = ()) -> tuple[Hook, ...]:
  """The hooks of a run of `config`, in the order the loop calls them, the `MetricsHook` first;
  `profile`: the profiler window (start step, steps); `evals`: more evaluations, after the
  validation loss (lm_eval.LMEvalHook)."""
  # The checkpoint hook comes before the evaluations: the last step's checkpoint is final
  # before the final evaluation starts, so that no evaluation failure can lose a finished run.
  return (MetricsHook(), SaveStatusHook(), ProfilerHook(*profile), HandOverHook(),
          ThroughputHook(), CheckpointHook(), EvalHook(), *evals, StopHook())
