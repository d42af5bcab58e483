"""What every command does first: tune the host allocator for CPU runs (`hostmem.tune`, which must
come before JAX starts its backend), then parse flags with the module's docstring as the help.

Config flags follow ml_collections' `config_flags`, as users of big_vision and other JAX code
bases write them:

  --config configs/tiny.py:method=lowrank,sgt     the file, and the argument its get_config reads
                                                  (a bare key is a switch turned on: sgt=1)
  --config.train.peak_lr=3e-4                     override one field, typed like its default
  --config.train.peak_lr 3e-4                     the same
  --config.sgt.reduce_flop / --noconfig.sgt.reduce_flop    a bool field on / off
  --set train.peak_lr=3e-4                        the same as --config.train.peak_lr=3e-4

The commands parse with argparse, so `parse` rewrites every `--config.FIELD...` word into a
`--set` item, in command-line order, before argparse sees them; `config.load` then applies the
items with config_flags' typing rules (docs in `config.load`). Defining the flags through absl
instead would take a second, global flag registry next to argparse, one absl flag per override
discovered from sys.argv, and absl's multi-line errors; the rewrite keeps one parser per command
and one-line `error: ...` messages that name the field.
"""

from __future__ import annotations

import argparse
import math
import re
import sys

from structffn_jax import hostmem

_OVERRIDE = re.compile(r'^--(no)?config\.([A-Za-z_][\w.]*)(=(.*))?$', re.S)
_NUMBER = re.compile(r'^-?[\d.]')

CONFIG_HELP = ('config file and its argument: key=value pairs joined by commas, where a bare '
               'key turns a switch on (e.g. configs/tiny.py:method=blockshuffle,sgt)')
SET_HELP = ('override a config field, typed like its default; repeatable. Same as '
            '--config.FIELD=VALUE (e.g. --config.train.peak_lr=3e-4); a bare FIELD sets a bool '
            'field to true, --noconfig.FIELD to false; lists are comma-separated or a Python '
            'literal')


def parser(doc: str, module: str | None = None) -> argparse.ArgumentParser:
  """An ArgumentParser for the command `python -m <module>` whose module docstring is `doc`
  (first line: description; the rest: epilog). `module` may also be a script path; without it,
  the calling module's own name."""
  hostmem.tune()
  lines = (doc or '').strip().splitlines() or ['']
  if module is None:
    spec = sys._getframe(1).f_globals.get('__spec__')  # pylint: disable=protected-access
    module = spec.name if spec is not None else sys.argv[0]
  prog = f'python {module}' if module.endswith('.py') else f'python -m {module}'
  return argparse.ArgumentParser(prog=prog, description=lines[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog='\n'.join(lines[1:]))


def add_config_flags(p: argparse.ArgumentParser, *, repeat: bool = False,
                     required: bool = True, optional_help: str = ''):
  """`--config` (required; repeatable with `repeat`; or optional, default '', with `required`
  False and `optional_help` saying what stands in for it) and `--set`; parse with `parse`."""
  if repeat:
    p.add_argument('--config', action='append', default=[], metavar='FILE.py:ARG',
                   help=CONFIG_HELP + "; repeatable (without one: the command's defaults)")
  elif not required:
    p.add_argument('--config', default='', metavar='FILE.py:ARG',
                   help=CONFIG_HELP + (f'; {optional_help}' if optional_help else ''))
  else:
    p.add_argument('--config', required=True, metavar='FILE.py:ARG', help=CONFIG_HELP)
  p.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE', help=SET_HELP)


def config_overrides(argv) -> list[str]:
  """argv with each `--config.FIELD=V`, `--config.FIELD V`, `--config.FIELD` and
  `--noconfig.FIELD` written as `--set FIELD=V` (bare: `--set FIELD`, true for a bool field)."""
  out, i = [], 0
  while i < len(argv):
    word = argv[i]
    match = _OVERRIDE.match(word)
    i += 1
    if not match:
      out.append(word)
      continue
    negated, field, has_value, value = match.groups()
    if negated:
      if has_value:
        raise ValueError(f'{word}: --noconfig.{field} sets a bool field to false and takes no '
                         f'value; write --config.{field}={value}.')
      out += ['--set', f'{field}=false']
    elif has_value:
      out += ['--set', f'{field}={value}']
    elif i < len(argv) and (not argv[i].startswith('-') or _NUMBER.match(argv[i])):
      out += ['--set', f'{field}={argv[i]}']
      i += 1
    else:
      out += ['--set', field]
  return out


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
  """`p.parse_args` after the `--config.FIELD` rewrite (see the module docstring)."""
  try:
    argv = config_overrides(sys.argv[1:] if argv is None else list(argv))
  except ValueError as e:
    sys.exit(f'error: {e}')
  return p.parse_args(argv)


# ----------------------------------------------------------------------------- numeric flags
# `type=` of argparse flags: a bad value is one `error: argument --FLAG: ...` line, as a config
# field's is, never a traceback or a silent substitute.

# The largest integer a flag takes without a bound of its own (int32, what XLA counts in).
INT32_MAX = 2**31 - 1


def integer(minimum: int, maximum: int = INT32_MAX, what: str = ''):
  """An argparse `type`: an integer in [minimum, maximum]; `what` explains the range (e.g.
  '0 = all') in the error."""
  def parse_integer(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      try:
        number = float(text)
      except ValueError:
        number = math.nan
      if not (math.isfinite(number) and number.is_integer()):
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer; give one in '
                                         f'[{minimum}, {maximum}]{_why(what)}.') from None
      value = int(number)
    if not minimum <= value <= maximum:
      raise argparse.ArgumentTypeError(f'{text!r} is out of range; give an integer in '
                                       f'[{minimum}, {maximum}]{_why(what)}.')
    return value
  return parse_integer


def real(minimum: float, *, above: bool = False, maximum: float = math.inf, what: str = ''):
  """An argparse `type`: a finite float >= minimum (> minimum with `above`), <= maximum."""
  bound = f'> {minimum:g}' if above else f'>= {minimum:g}'
  if math.isfinite(maximum):
    bound += f' and <= {maximum:g}'

  def parse_real(text: str) -> float:
    try:
      value = float(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f'{text!r} is not a number; give a finite number '
                                       f'{bound}{_why(what)}.') from None
    low_ok = value > minimum if above else value >= minimum
    if not (math.isfinite(value) and low_ok and value <= maximum):
      raise argparse.ArgumentTypeError(f'{text!r} is out of range; give a finite number '
                                       f'{bound}{_why(what)}.')
    return value
  return parse_real


def _why(what: str) -> str:
  return f' ({what})' if what else ''
