"""Multi-process runs: start `jax.distributed` when asked or detected, and host barriers.

`config.mesh.distributed`:
  'off'   one process (its local devices only).
  'on'    always call `jax.distributed.initialize()`; coordinator, process count and id come from
          the cluster (SLURM, Cloud TPU pod, Kubernetes, Open MPI are auto-detected by JAX) or
          from JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID.
  'auto'  'on' when the environment asks for it: JAX_COORDINATOR_ADDRESS is set, an `srun` step
          of several tasks, or a TPU pod whose worker list is in the environment
          (TPU_WORKER_HOSTNAMES, as on GKE); 'off' otherwise. On TPU VMs created with gcloud the
          worker list lives in the metadata server: launch/tpu_pod.sh sets mesh.distributed=on.

Must run before anything touches a JAX device. Every process then runs the same program: logs,
metrics and config.json come from process 0, data preparation runs on process 0 behind a
barrier, checkpoints are written cooperatively by Orbax.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from structffn_jax.errors import ConfigError

MODES = ('auto', 'on', 'off')


def _env_int(name):
  value = os.environ.get(name)
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f'environment variable {name}={value!r} is not an integer.') \
        from None


def detected() -> str | None:
  """Why this process looks like one of several ('JAX_COORDINATOR_ADDRESS', 'SLURM', 'TPU pod')."""
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS'
  if (_env_int('SLURM_STEP_NUM_TASKS') or 1) > 1:  # an `srun` step of several tasks
    return 'SLURM'
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('TPU_PROCESS_ADDRESSES') or ''
  if len([h for h in hosts.split(',') if h]) > 1 or os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'TPU pod'
  return None


def initialize(mode: str = 'auto') -> bool:
  """Start `jax.distributed` per `mode` (see the module docstring); True when started."""
  if mode not in MODES:
    raise ConfigError(f'mesh.distributed={mode!r} is not allowed; use one of: '
                      f'{", ".join(MODES)}.')
  if jax.distributed.is_initialized():
    return True
  if mode == 'off' or (mode == 'auto' and detected() is None):
    return False
  kwargs = {}
  in_srun = 'SLURM_STEP_NUM_TASKS' in os.environ  # SLURM gives the process count and id
  if os.environ.get('JAX_COORDINATOR_ADDRESS') and not in_srun:
    kwargs = dict(coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
                  num_processes=_env_int('JAX_NUM_PROCESSES'),
                  process_id=_env_int('JAX_PROCESS_ID'))
    missing = [k for k, v in (('JAX_NUM_PROCESSES', kwargs['num_processes']),
                              ('JAX_PROCESS_ID', kwargs['process_id'])) if v is None]
    if missing:
      raise ConfigError(
          f'JAX_COORDINATOR_ADDRESS is set but {" and ".join(missing)} is not; set all three '
          f'(launch/local.sh does), or --set mesh.distributed=off for one process.')
  jax.distributed.initialize(**kwargs)
  return True


def barrier(name: str) -> None:
  """All processes reach this point before any goes on (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def fetch(x) -> np.ndarray:
  """The whole value of `x` on this process, also when `x` spans other processes' devices (every
  process must then call this, as with any collective)."""
  if getattr(x, 'is_fully_addressable', True):
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def agree(flag: bool) -> bool:
  """True on every process when `flag` is True on any (a no-op with one process)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).max())
