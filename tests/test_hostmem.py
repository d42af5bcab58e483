"""hostmem.tune(): when it acts, and that it does what it says (large blocks are recycled).

Each case runs in a fresh interpreter, since the settings belong to the process and must come
before JAX starts its backend. The effect is measured with the kernel's own count of minor page
faults: a freed 64 MiB block that is allocated and written again faults in ~16K fresh pages
under glibc's defaults (mmap/munmap per block) and none once the heap keeps it.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from tests.tiny_setup import REPO as REPO_ROOT

pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')

FAULTS = textwrap.dedent('''
    import ctypes, resource, sys
    from structffn_jax import hostmem
    print(hostmem.tune())
    libc = ctypes.CDLL('libc.so.6')
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    faults = []
    for _ in range(3):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      block = libc.malloc(size)
      ctypes.memset(block, 1, size)
      libc.free(block)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(faults[-1])
''')


def _run(code, **env):
  environ = {k: v for k, v in os.environ.items()
             if k not in ('STRUCTFFN_SYSTEM_MALLOC', 'JAX_PLATFORMS')}
  environ.update(env, PYTHONPATH=str(REPO_ROOT))
  out = subprocess.run([sys.executable, '-c', code], env=environ, capture_output=True,
                       text=True, timeout=120, check=True)
  return out.stdout.strip().splitlines()


def test_tune_recycles_large_blocks():
  status, faults = _run(FAULTS, JAX_PLATFORMS='cpu')
  assert status.startswith('glibc') and 'heap only' in status, status
  assert int(faults) < 1000, faults  # the freed block came back from the heap


def test_opt_out_keeps_glibc_defaults():
  status, faults = _run(FAULTS, JAX_PLATFORMS='cpu', STRUCTFFN_SYSTEM_MALLOC='1')
  assert status == 'system defaults (STRUCTFFN_SYSTEM_MALLOC is set)'
  assert int(faults) > 10000, faults  # mmap'd afresh: every page faulted in again


@pytest.mark.parametrize('code,env,expected', [
    ('import jax; jax.devices()\n', {'JAX_PLATFORMS': 'cpu'}, 'JAX backend already started'),
    ('', {'JAX_PLATFORMS': 'cuda'}, 'an accelerator backend may be used'),
    ('', {'JAX_PLATFORMS': 'cpu,cuda'}, 'an accelerator backend may be used'),
])
def test_tune_stands_aside(code, env, expected):
  (status,) = _run(code + 'from structffn_jax import hostmem\nprint(hostmem.tune())', **env)
  assert expected in status, status


def test_entry_points_start_no_backend_at_import():
  code = textwrap.dedent('''
      import structffn_jax.train, structffn_jax.generate, structffn_jax.evaluate
      import structffn_jax.premerge, structffn_jax.bench.ffn, structffn_jax.bench.decode
      import structffn_jax.bench.train, structffn_jax.bench.kernels
      from jax._src import xla_bridge
      print(xla_bridge.backends_are_initialized())
  ''')
  assert _run(code, JAX_PLATFORMS='cpu') == ['False']
