"""Training-step speed: tokens/s and MFU of one full optimizer step, dense vs structured FFNs.

  python -m structffn_jax.bench.train [--config configs/F.py:ARG ...] [--global-batch B]
      [--micro-batch M] [--set field=value ...] [--steps N] [--plot]

A step is the trainer's own (`steps.make_train_step`: forward, backward, gradient accumulation
over micro-batches, clipping, AdamW), jitted with the state donated, on one device, random
tokens; the configs' steps are timed round-robin after a warm-up step (median). FLOPs are the
paper's accounting (`accounting.account(config).flops_per_token`, training = 3 x forward), so
MFU = 3 x flops_per_token x tokens/s / peak, the peak from `metrics.peak_flops_per_device`
(n/a where unknown, e.g. on a CPU; `--peak-flops` sets it).

Defaults: on a CPU the tiny and quickstart configs (dense and the three structures); on a GPU
Transformer-m dense and its 32% structured versions (configs/structured_ffn.py), where
the target is >= 45% MFU for dense.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from structffn_jax import accounting, cli, metrics, optim, steps, timing
from structffn_jax import config as config_lib
from structffn_jax.model import GPT
from structffn_jax.plan import make_plan

_METHODS = ('dense', 'lowrank', 'blockdense', 'blockshuffle')


def default_configs(gpu: bool) -> list[str]:
  if gpu:
    return [f'configs/structured_ffn.py:model=m,method={m},fraction=32' for m in _METHODS]
  return ([f'configs/tiny.py:method={m}' for m in _METHODS]
          + [f'configs/quickstart.py:method={m}' for m in _METHODS])


def prepare(spec, overrides, global_batch, micro_batch):
  """(row of facts, one-step function) for a config: state initialised, step compiled."""
  config = config_lib.load(spec, tuple(overrides))
  t = config.train
  if global_batch:
    t.global_batch = global_batch
    t.micro_batch = 0
  if micro_batch:
    t.micro_batch = micro_batch
  plan = make_plan(config)  # checks that the micro batch divides the global one
  micro = t.global_batch // plan.micro_batches
  acc = accounting.account(config)
  tx = optim.make_optimizer(config, plan.total_steps, plan.guided_steps)
  new_model = lambda: GPT.from_config(config, seed=t.seed)
  graphdef = nnx.split(nnx.eval_shape(new_model), nnx.Param)[0]
  holder = {'state': jax.jit(lambda: steps.init_state(new_model(), tx)[1])()}
  step = jax.jit(steps.make_train_step(graphdef, tx, plan.micro_batches), donate_argnums=0)
  seq = config.model.seq_len
  batch = jnp.asarray(np.random.default_rng(0).integers(
      0, config.model.vocab_size, (t.global_batch, seq + 1)), jnp.int32)
  key = jax.random.key(0)

  def one_step():
    holder['state'], m = step(holder['state'], batch, key)
    return m['loss']

  start = time.perf_counter()
  jax.block_until_ready(one_step())
  row = {'config': spec, 'name': config.name, 'params': acc.params_total,
         'batch': f'{t.global_batch}x{seq}' + (f' ({micro}/micro)' if micro != t.global_batch
                                                else ''),
         'dtype': config.model.dtype, 'remat': config.model.remat,
         'flops_per_token': acc.flops_per_token, 'tokens_per_step': t.global_batch * seq,
         'compile_s': time.perf_counter() - start,
         'note': ' (guides excluded from FLOPs)' if config.sgt.enabled else ''}
  return row, one_step


def bench(specs, overrides, global_batch, micro_batch, num_steps, peak):
  """Every config's step timed round-robin (interleaved), so their ratios are side by side."""
  prepared = {}
  for spec in specs:
    prepared[spec] = prepare(spec, overrides, global_batch, micro_batch)
    print(f'{spec}: compiled in {prepared[spec][0]["compile_s"]:.1f}s', file=sys.stderr,
          flush=True)
  times = timing.time_interleaved({s: (fn, ()) for s, (_, fn) in prepared.items()},
                                  warmup=1, iters=num_steps)
  rows = []
  for spec, (row, _) in prepared.items():
    tokens_per_s = row['tokens_per_step'] / times[spec]
    flops_per_s = 3 * row['flops_per_token'] * tokens_per_s
    rows.append({**row, 'step_s': times[spec], 'tokens_per_s': tokens_per_s,
                 'tflops_per_s': flops_per_s / 1e12,
                 'mfu': flops_per_s / peak if peak else 'n/a'})
  return rows


def plot(rows, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 4))
  ax.bar(range(len(rows)), [r['tokens_per_s'] for r in rows])
  ax.set_xticks(range(len(rows)), [r['name'] for r in rows], rotation=30, ha='right', fontsize=7)
  ax.set_ylabel('training tokens/s')
  for i, r in enumerate(rows):
    if isinstance(r['mfu'], float):
      ax.annotate(f'{100 * r["mfu"]:.0f}%', (i, r['tokens_per_s']), ha='center', va='bottom')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f'wrote {path}')


def main(argv=None):
  gpu = jax.default_backend() != 'cpu'
  parser = cli.parser(__doc__, 'structffn_jax.bench.train')
  cli.add_config_flags(parser, repeat=True)
  parser.add_argument('--global-batch', type=cli.integer(0), default=0,
                      help='sequences per step (0: config)')
  parser.add_argument('--micro-batch', type=cli.integer(0), default=0,
                      help='sequences per micro-batch')
  parser.add_argument('--steps', type=cli.integer(1), default=10 if gpu else 5, help='timed steps')
  parser.add_argument('--peak-flops', type=cli.real(0), default=0.0,
                      help='peak FLOP/s of one device for the MFU column (0: look it up)')
  parser.add_argument('--out', default=timing.default_out('train'), help='JSON path')
  parser.add_argument('--plot', nargs='?', const='', default=None, metavar='PNG',
                      help='also draw a bar chart (default: the JSON path with .png)')
  args = cli.parse(parser, argv)
  peak = metrics.peak_flops_per_device(args.peak_flops)
  try:
    rows = bench(args.config or default_configs(gpu), args.set, args.global_batch, args.micro_batch,
                 args.steps, peak)
  except config_lib.ConfigError as e:
    sys.exit(f'error: {e}')
  print(f'\nTraining step on {jax.devices()[0].device_kind} (peak '
        f'{f"{peak:.3g} FLOP/s" if peak else "unknown: MFU n/a"}; FLOPs: paper accounting):')
  timing.print_table(rows, ['name', 'params', 'batch', 'dtype', 'remat', 'step_s',
                            'tokens_per_s', 'tflops_per_s', 'mfu', 'compile_s'])
  timing.write_json(args.out, {'args': vars(args), 'peak_flops': peak, 'rows': rows})
  if args.plot is not None:
    plot(rows, args.plot or args.out.rsplit('.', 1)[0] + '.png')


if __name__ == '__main__':
  main()
