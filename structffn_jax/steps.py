"""Pure, jittable training and evaluation steps over (graphdef, state) of an NNX model.

A train state is the pytree `{'params': nnx.State, 'opt_state': optax state}`; the model graph
(`graphdef`) is static. Dropping the self-guided guides changes the graph, which is why the trainer
rebuilds these functions (one re-jit) at the hand-over. On a device mesh the trainer jits them with
the shardings of `structffn_jax.sharding`: the state like its parameters, batches over the batch
axes.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from structffn_jax import sgt, sharding
from structffn_jax.data import pipeline


def init_state(model, tx: optax.GradientTransformation):
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, {'params': params, 'opt_state': tx.init(params)}


def cross_entropy(logits_BTV, targets_BT, mask_BT=None):
  """Summed token cross-entropy (float32) and the number of tokens it covers."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32),
                                                           targets_BT)
  if mask_BT is None:
    return losses.sum(), jnp.asarray(losses.size, jnp.float32)
  mask_BT = mask_BT.astype(jnp.float32)
  return (losses * mask_BT).sum(), mask_BT.sum()


def make_train_step(graphdef, tx: optax.GradientTransformation, micro_batches: int):
  """step(state, batch (B, T+1) int32, key) -> (state, metrics); gradients are accumulated over
  `micro_batches` equal slices of the batch (scan), then one optimizer update."""

  def loss_fn(params, tokens_BT1, alpha, key):
    model = nnx.merge(graphdef, params)
    logits = model(tokens_BT1[:, :-1], alpha=alpha, key=key)
    total, count = cross_entropy(logits, tokens_BT1[:, 1:])
    return total / count

  grad_fn = jax.value_and_grad(loss_fn)

  def step(state, batch, key):
    params, opt_state = state['params'], state['opt_state']
    alpha = sgt.alpha_of(opt_state)
    micro = batch.reshape(micro_batches, batch.shape[0] // micro_batches, batch.shape[1])
    micro = sharding.constrain(micro, (None, 'batch', None))  # each slice over the batch axes

    def accumulate(carry, i):
      loss_sum, grad_sum = carry
      loss, grads = grad_fn(params, micro[i], alpha, jax.random.fold_in(key, i))
      return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros([], jnp.float32), zeros),
                                    jnp.arange(micro_batches))
    loss = loss / micro_batches
    grads = jax.tree.map(lambda g: g / micro_batches, grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads)}
    if alpha is not None:
      metrics['alpha'] = alpha
    return {'params': params, 'opt_state': opt_state}, metrics

  return step


def make_eval_step(graphdef):
  """eval(params, alpha, batch (B, T+1), mask (B,)) -> (summed loss, token count)."""

  def evaluate(params, alpha, batch, mask_B):
    model = nnx.merge(graphdef, params)
    logits = model(batch[:, :-1], alpha=alpha)
    mask_BT = jnp.broadcast_to(mask_B[:, None], batch[:, 1:].shape)
    return cross_entropy(logits, batch[:, 1:], mask_BT)

  return evaluate


class Jitted(NamedTuple):
  """A trainer's two steps, jitted over a mesh, and the shardings their batches take."""
  train_step: Callable  # the train step; the state it is given is donated
  eval_step: Callable
  batch_sharding: Any  # a batch (B, T+1) over the batch axes
  mask_sharding: Any  # an eval mask (B,) likewise


def jit_steps(graphdef, tx: optax.GradientTransformation, micro_batches: int, mesh, rules,
              state_shardings) -> Jitted:
  """The train and eval steps of `graphdef` on `mesh` with explicit shardings: the state as
  `state_shardings`, the batches over the batch axes (`rules`), metrics replicated."""
  rep = sharding.replicated(mesh)
  batch_sh = sharding.batch_sharding(mesh, rules, 2)
  mask_sh = sharding.batch_sharding(mesh, rules, 1)
  train_step = jax.jit(make_train_step(graphdef, tx, micro_batches),
                       in_shardings=(state_shardings, batch_sh, rep),
                       out_shardings=(state_shardings, rep), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(graphdef),
                      in_shardings=(state_shardings['params'], rep, batch_sh, mask_sh),
                      out_shardings=rep)
  return Jitted(train_step, eval_step, batch_sh, mask_sh)


class TrainBatches:
  """The global batch of each optimizer step from `start` on (`plan.data_index`), as the train
  step takes it: an array over the batch axes of which this process reads only its own rows
  (`sharding.process_share`). `close()` stops the reads running ahead."""

  def __init__(self, config, manifest, plan, batch_sh, start: int):
    t = config.train
    index, count = sharding.process_share(batch_sh, (t.global_batch, 1))
    self.rows = pipeline.make_train_iterator(
        manifest, global_batch=t.global_batch, seed=t.seed if t.data_seed < 0 else t.data_seed,
        process_index=index, process_count=count, start_index=start, index_fn=plan.data_index)
    self.global_batch, self.sharding = t.global_batch, batch_sh

  def __next__(self) -> jax.Array:
    local = next(self.rows)
    return jax.make_array_from_process_local_data(self.sharding, local,
                                                  (self.global_batch,) + local.shape[1:])

  def close(self) -> None:
    self.rows.close()
