"""The command line: every command's help, the ml_collections-style config flags and their errors.

Help is checked in-process on the parser each command builds (its `main` runs up to the parse):
the usage names `python -m structffn_jax.X`, every flag says what it is for, and the flags with
a fixed set of values list them. The override forms are checked on `cli.config_overrides` and
`config.load`; errors are one line naming the field, in-process and from a real process.
"""

import argparse
import ast
import importlib
import importlib.util
import subprocess
import sys

import pytest

from structffn_jax import cli
from structffn_jax import config as config_lib
from structffn_jax.configs import common
from tests.tiny_setup import REPO

TINY = f'{REPO}/configs/tiny.py'


def _commands():
  """(name, main) of every `python -m structffn_jax.X` command (a module with a __main__ guard),
  and launch/sweep.py."""
  out = []
  for path in sorted((REPO / 'structffn_jax').rglob('*.py')):
    tree = ast.parse(path.read_text())
    if any(isinstance(n, ast.If) and 'name' in ast.dump(n.test) and '__main__' in ast.dump(n.test)
           for n in tree.body):
      out.append('.'.join(path.relative_to(REPO).with_suffix('').parts))
  return out + ['launch/sweep.py']


COMMANDS = _commands()
CHOICES = {  # flags with a fixed set of values: they must list them
    'structffn_jax.evaluate': ['--split'],
    'structffn_jax.plot': ['--x'],
    'structffn_jax.data.prepare': ['--source', '--format', '--rows-dtype'],
    'structffn_jax.bench.ffn': ['--preset', '--dtype', '--implementation'],
    'structffn_jax.bench.decode': ['--part', '--dtype', '--model'],
    'structffn_jax.bench.kernels': ['--dtype'],
    'launch/sweep.py': ['--launcher'],
}


def _main(name):
  if name.endswith('.py'):
    spec = importlib.util.spec_from_file_location('sweep', REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main
  return importlib.import_module(name).main


class _Parsed(Exception):
  pass


def _parser_of(name, monkeypatch) -> argparse.ArgumentParser:
  """The parser `main` of command `name` builds, caught when it parses."""
  seen = []

  def catch(self, args=None, namespace=None):
    seen.append(self)
    raise _Parsed

  monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', catch)
  with pytest.raises(_Parsed):
    _main(name)([])
  return seen[0]


def test_every_command_is_found():
  for name in ('train', 'evaluate', 'generate', 'premerge', 'info', 'plot', 'traces',
               'data.prepare', 'bench.ffn', 'bench.decode', 'bench.kernels', 'bench.train'):
    assert f'structffn_jax.{name}' in COMMANDS


@pytest.mark.parametrize('name', COMMANDS)
def test_help_names_the_command_and_every_flag(name, monkeypatch, capsys):
  prog = f'python {name}' if name.endswith('.py') else f'python -m {name}'
  p = _parser_of(name, monkeypatch)
  assert p.prog == prog
  for action in p._actions:  # pylint: disable=protected-access
    if isinstance(action, argparse._HelpAction):  # pylint: disable=protected-access
      continue
    flag = '/'.join(action.option_strings) or action.dest
    assert action.help and action.help.strip(), f'{prog}: {flag} has no help text'
  for flag in CHOICES.get(name, ()):
    action = next(a for a in p._actions if flag in a.option_strings)  # pylint: disable=protected-access
    assert action.choices, f'{prog}: {flag} does not list its values'
    assert '{' + ','.join(map(str, action.choices)) + '}' in p.format_help()
  monkeypatch.undo()
  with pytest.raises(SystemExit) as info:
    _main(name)(['--help'])
  assert info.value.code == 0
  assert capsys.readouterr().out.startswith(f'usage: {prog} ')


# ----------------------------------------------------------------------------- override forms


@pytest.mark.parametrize('argv,expected', [
    (['--config.train.peak_lr=3e-4'], ['--set', 'train.peak_lr=3e-4']),
    (['--config.train.peak_lr', '3e-4'], ['--set', 'train.peak_lr=3e-4']),
    (['--config.mesh.data', '-1'], ['--set', 'mesh.data=-1']),
    (['--config.sgt.enabled', '--workdir', 'w'], ['--set', 'sgt.enabled', '--workdir', 'w']),
    (['--config.sgt.enabled'], ['--set', 'sgt.enabled']),
    (['--noconfig.model.use_bias'], ['--set', 'model.use_bias=false']),
    (['--config', 'c.py:x=1', '--set', 'a=1', '--config.b=2', '--set', 'c=3'],
     ['--config', 'c.py:x=1', '--set', 'a=1', '--set', 'b=2', '--set', 'c=3']),
    (['--config.data.train_paths=a.txt,b.txt'], ['--set', 'data.train_paths=a.txt,b.txt']),
])
def test_config_flags_become_overrides_in_order(argv, expected):
  assert cli.config_overrides(argv) == expected


def test_override_forms_are_typed_like_the_field():
  c = config_lib.load(TINY, (
      'train.peak_lr=3e-4', 'train.global_batch=8', 'sgt.enabled', 'model.use_bias=false',
      'sgt.reduce_flop=t', 'data.train_paths=a.txt, b.txt', 'data.valid_paths=["v 1.txt"]',
      'mesh.rules=batch=data+fsdp,embed=fsdp', "model.ffn={'method': 'lowrank', 'rank': 4}",
      'train.tokens=1e6'))
  assert c.train.peak_lr == 3e-4 and isinstance(c.train.peak_lr, float)
  assert c.train.global_batch == 8 and isinstance(c.train.global_batch, int)
  assert c.sgt.enabled is True and c.model.use_bias is False and c.sgt.reduce_flop is True
  assert list(c.data.train_paths) == ['a.txt', 'b.txt']  # split on commas, not ';'
  assert list(c.data.valid_paths) == ['v 1.txt']  # a Python literal, kept whole
  assert tuple(c.mesh.rules) == ('batch=data+fsdp', 'embed=fsdp')
  assert (c.model.ffn.method, c.model.ffn.rank) == ('lowrank', 4)
  assert c.train.tokens == 1e6


def test_command_line_overrides_reach_the_config():
  args = cli.parse(_info_parser(), ['--config', f'{TINY}:method=dense', '--set', 'train.seed=3',
                                    '--config.train.seed', '4', '--noconfig.model.use_bias'])
  c = config_lib.load(args.config, tuple(args.set))
  assert c.train.seed == 4 and c.model.use_bias is False  # the last word wins


def _info_parser():
  p = cli.parser('test', 'structffn_jax.info')
  cli.add_config_flags(p)
  return p


def test_a_bare_key_in_the_config_argument_is_a_switch():
  assert config_lib.load(f'{TINY}:sgt,method=dense').sgt.enabled
  assert not config_lib.load(f'{TINY}:method=dense').sgt.enabled
  a = common.parse_arg('fast,n=2', fast=False, n=1, name='a')
  assert a.fast is True and a.n == 2
  with pytest.raises(config_lib.ConfigError, match=r"'name' is not key=value.*fast, n"):
    common.parse_arg('name', fast=False, n=1, name='a')


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize('argv,words', [
    (['--set', 'model.ffn=lowrank'], ['model.ffn', 'section', '--config.model.ffn.']),
    (['--config.train.peak_lr=abc'], ['train.peak_lr', "'abc'", 'number']),
    (['--config.model.num_layers=2.5'], ['model.num_layers', 'integer']),
    (['--config.model.use_bias=maybe'], ['model.use_bias', 'true or false']),
    (['--config.model.num_layers'], ['model.num_layers', 'field=value']),
    (['--config.model.nonexistent=1'], ['model.nonexistent', 'no such config field']),
    (['--noconfig.model.use_bias=1'], ['--noconfig.model.use_bias', 'no value']),
])
def test_a_bad_override_is_one_error_line_naming_the_field(argv, words):
  from structffn_jax import info  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit) as e:
    info.main(['--config', TINY] + argv)
  message = str(e.value.code)
  assert message.startswith('error: ') and '\n' not in message, message
  for word in words:
    assert word in message, (word, message)


def test_a_wrong_typed_override_exits_without_a_traceback():
  proc = subprocess.run([sys.executable, '-m', 'structffn_jax.info', '--config', TINY,
                         '--set', 'model.ffn=lowrank'], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode != 0 and proc.stdout == ''
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and 'model.ffn' in lines[0], \
      proc.stderr


# ----------------------------------------------------------------------------- numeric flags


FLAG_ERRORS = [  # (command, flags, the error line's words)
    ('generate', ['--temperature', '-1'], "argument --temperature: '-1' is out of range"),
    ('generate', ['--temperature', 'nan'], "argument --temperature: 'nan' is out of range"),
    ('generate', ['--temperature', 'inf'], "argument --temperature: 'inf' is out of range"),
    ('generate', ['--top-k', '-5'], "argument --top-k: '-5' is out of range; give an integer in "
                                    '[0, 2147483647] (0 = all)'),
    ('generate', ['--max-new-tokens', '0'], "argument --max-new-tokens: '0' is out of range"),
    ('generate', ['--seed', '1e30'], "argument --seed: '1e30' is out of range"),
    ('generate', ['--merge-threshold', '-2'], "argument --merge-threshold: '-2' is out of range"),
    ('evaluate', ['--max-tokens', '0'], "argument --max-tokens: '0' is out of range; give a "
                                        'finite number > 0'),
    ('evaluate', ['--max-tokens', '-5'], "argument --max-tokens: '-5' is out of range"),
    ('evaluate', ['--max-tokens', 'nan'], "argument --max-tokens: 'nan' is out of range"),
    ('evaluate', ['--batch-size', '-2'], "argument --batch-size: '-2' is out of range"),
    ('evaluate', ['--batch-size', 'two'], "argument --batch-size: 'two' is not an integer"),
    ('plot', ['--smooth', '0'], "argument --smooth: '0' is out of range"),
    ('premerge', ['--iters', '0'], "argument --iters: '0' is out of range"),
    ('traces', ['--top', '-1'], "argument --top: '-1' is out of range"),
    ('lm_eval', ['--tasks', 'x', '--batch-size', '0'], "argument --batch-size: '0' is out of"),
    ('lm_eval', ['--tasks', 'x', '--limit', 'inf'], "argument --limit: 'inf' is out of range"),
]


@pytest.mark.parametrize('command, flags, words', FLAG_ERRORS,
                         ids=[f'{c}{"".join(f)}' for c, f, _ in FLAG_ERRORS])
def test_a_bad_numeric_flag_is_one_error_line(tmp_path, capsys, command, flags, words):
  """These were accepted silently (a negative temperature or top-k, --max-tokens 0 evaluating 64
  tokens), or failed later with a traceback (`length should not be negative`)."""
  module = importlib.import_module(f'structffn_jax.{command}')
  positional = [str(tmp_path)] if command in ('plot', 'traces') else []
  workdir = [] if positional else ['--workdir', str(tmp_path)]
  with pytest.raises(SystemExit) as e:
    module.main(positional + workdir + flags)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert words in err.splitlines()[-1] and 'Traceback' not in err


def test_flags_the_run_cannot_honour_are_refused_in_one_line(trained_workdir, capsys):
  from structffn_jax import evaluate, generate  # pylint: disable=import-outside-toplevel
  run = ['--workdir', str(trained_workdir)]
  cases = [
      (generate, ['--prompt', 'x', '--max-new-tokens', '1000000000'],
       'error: --max-new-tokens 1000000000: its KV cache of 1,000,000,00'),
      (generate, ['--prompt', 'x', '--top-k', '100000'],
       'error: --top-k 100000: more than the 512 tokens of the vocabulary'),
      (evaluate, ['--max-tokens', '10'],
       'error: --max-tokens 10: less than one row of model.seq_len=64 tokens; give at least 64'),
  ]
  evaluations = trained_workdir / 'eval.jsonl'
  before = evaluations.read_text() if evaluations.exists() else None
  for module, flags, words in cases:
    with pytest.raises(SystemExit) as e:
      module.main(run + flags)
    assert str(e.value).startswith(words) and '\n' not in str(e.value), (flags, str(e.value))
  assert (evaluations.read_text() if evaluations.exists() else None) == before


@pytest.mark.parametrize('profile', ['5:0', '-1:3', '2:x'])
def test_train_profile_flag_out_of_range_is_one_error_line(tmp_path, profile):
  """`--profile 5:0` (no step traced) and `-1:3` were accepted silently."""
  import signal  # pylint: disable=import-outside-toplevel
  from structffn_jax import train  # pylint: disable=import-outside-toplevel
  handler = signal.getsignal(signal.SIGTERM)
  try:
    with pytest.raises(SystemExit) as e:
      train.main(['--config', f'{REPO}/configs/tiny.py', '--workdir', str(tmp_path / 'w'),
                  f'--profile={profile}'])
  finally:
    signal.signal(signal.SIGTERM, handler)
  assert str(e.value) == (f'error: --profile {profile!r}: expected K:N, the first step K >= 0 and '
                          f'N >= 1 steps, e.g. --profile 10:5')
  assert not (tmp_path / 'w').exists()
