"""What every command does first: tune the host allocator for CPU runs (`hostmem.tune`, which must
come before JAX starts its backend), then parse flags with the module's docstring as the help."""

from __future__ import annotations

import argparse

from structffn_jax import hostmem


def parser(doc: str) -> argparse.ArgumentParser:
  """An ArgumentParser for a command whose module docstring is `doc` (first line: description)."""
  hostmem.tune()
  lines = (doc or '').strip().splitlines() or ['']
  return argparse.ArgumentParser(description=lines[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog='\n'.join(lines[1:]))
