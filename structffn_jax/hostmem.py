"""Host allocator settings for runs on the CPU: reuse large buffers instead of faulting them in.

XLA:CPU allocates a step's temporaries and outputs afresh on every call. glibc's malloc serves
blocks above its mmap threshold (at most 32 MiB) with a fresh `mmap` and returns them with
`munmap`, so every step page-faults (and the kernel zeroes) all of its large buffers again. For
the FFN of a width-1024 model on 8192 tokens that is several (8192, 4096) float32 arrays per
step, and the faults cost as much as a quarter of a structured FFN's training step on a 2-core
machine (BENCHMARKS.md, "Host allocator").

`tune()` asks glibc, through `mallopt`, to serve every block from the heap (M_MMAP_MAX = 0),
never to return freed heap memory to the system (M_TRIM_THRESHOLD at its maximum), and to keep
one arena (M_ARENA_MAX = 1) so that blocks freed by one XLA worker thread are reused by the
next. After the first step every buffer is recycled; the process keeps its peak memory.

It only acts where it helps and is safe: Linux with glibc, JAX's backend not yet started (the
worker threads' arenas are created with it), and the run bound for the CPU (`JAX_PLATFORMS=cpu`,
or no accelerator plugin installed). The command-line entry points call it first; set
`STRUCTFFN_SYSTEM_MALLOC=1` to keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import sys

OPT_OUT = 'STRUCTFFN_SYSTEM_MALLOC'
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_INT_MAX = 2**31 - 1

_status = 'not requested'


def _accelerator_plugin_installed() -> bool:
  if any(True for _ in importlib.metadata.entry_points(group='jax_plugins')):
    return True
  return any(importlib.util.find_spec(name) is not None
             for name in ('libtpu', 'jax_cuda12_plugin', 'jax_cuda13_plugin', 'jaxlib.cuda'))


def _cpu_bound() -> bool:
  platforms = os.environ.get('JAX_PLATFORMS', '').strip().lower()
  if platforms:  # JAX picks the highest-priority platform listed, an accelerator before cpu
    return {p.strip() for p in platforms.split(',')} == {'cpu'}
  return not _accelerator_plugin_installed()


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # another jax layout: assume the worst
    return 'jax' in sys.modules


def tune() -> str:
  """Apply the settings if they apply here; returns (and remembers) what was done, for logs."""
  global _status
  if _status.startswith('glibc'):
    return _status
  if os.environ.get(OPT_OUT, '') not in ('', '0'):
    _status = f'system defaults ({OPT_OUT} is set)'
  elif not sys.platform.startswith('linux'):
    _status = 'system defaults (not Linux)'
  elif not _cpu_bound():
    _status = 'system defaults (an accelerator backend may be used)'
  elif _backend_started():
    _status = 'system defaults (JAX backend already started; call hostmem.tune() first)'
  else:
    _status = _apply()
  return _status


def _apply() -> str:
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    version = libc.gnu_get_libc_version().decode()
  except (OSError, AttributeError):
    return 'system defaults (the C library is not glibc)'
  done = all(libc.mallopt(option, value) == 1 for option, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX)))
  if not done:
    return f'system defaults (glibc {version} refused mallopt)'
  return f'glibc {version}: heap only, no trim, 1 arena'


def status() -> str:
  """What `tune()` did in this process ('not requested' if it was not called)."""
  return _status
