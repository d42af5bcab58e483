"""Config files express the paper's tables (docs/design.md §7); bad input is a one-line ConfigError.

Every error must name the field and say what is allowed, before anything is built; the info CLI
turns it into `error: ...` on stderr with a non-zero exit status and no traceback.
"""

import math
import re
import subprocess
import sys

import pytest

from structffn_jax import config as config_lib
from structffn_jax.configs import common

SIZES = ('s', 'm', 'l', 'xl')
PAPER_SIZES = {  # docs/design.md §6.2: hidden, ffn, heads, layers, tokens, peak lr
    's': (768, 3072, 12, 12, 2.2e9, 6e-4),
    'm': (1024, 4096, 16, 24, 6.7e9, 3e-4),
    'l': (1536, 6144, 12, 24, 14.58e9, 2.5e-4),
    'xl': (2048, 8192, 16, 24, 25.5e9, 2e-4),
}
BLOCKDENSE = {'s': ((2, 512), (2, 256)), 'm': ((4, 768), (4, 384)),
              'l': ((2, 1024), (2, 512)), 'xl': ((4, 1536), (4, 768))}
FIXEDFLOP = {'lowrank': {'s': 0.30, 'm': 0.38, 'l': 0.41, 'xl': 0.43},
             'blockshuffle': {'s': 0.30, 'm': 0.38, 'l': 0.41, 'xl': 0.43},
             'blockdense': {'s': 0.30, 'm': 0.40, 'l': 0.41, 'xl': 0.45}}


def load(repo_root, spec, overrides=()):
  path, _, arg = spec.partition(':')
  return config_lib.load(f'{repo_root / path}:{arg}', tuple(overrides))


# ----------------------------------------------------------------------------- the tables


def test_base_config_paper_defaults():
  c = config_lib.base_config()
  m, t, s = c.model, c.train, c.sgt
  assert (m.vocab_size, m.seq_len) == (32000, 1024)
  assert (m.norm, m.activation, m.position, m.use_bias) == ('layernorm', 'gelu', 'rope', True)
  assert m.rope_base == 10000 and m.init_std == 0.02 and m.first_layer_dense
  assert m.dtype == 'bfloat16' and m.ffn.init == 'paper'
  assert (t.b1, t.b2, t.weight_decay, t.grad_clip) == (0.9, 0.999, 0.1, 1.0)
  assert (t.global_batch, t.warmup_frac, t.min_lr_ratio, t.seed) == (512, 0.1, 0.1, 1005)
  assert t.eval_tokens == 0.5e9
  assert (s.enabled, s.mode, s.ratio, s.schedule, s.reduce_flop) == (
      False, 'fixedstep', 0.5, 'cosine', False)
  config_lib.validate(c)


@pytest.mark.parametrize('size', SIZES)
def test_structured_ffn_grid(repo_root, size):
  hidden, ffn, heads, layers, tokens, lr = PAPER_SIZES[size]
  for method in ('dense', 'lowrank', 'blockdense', 'blockshuffle'):
    for i, fraction in enumerate((63, 32)):
      c = load(repo_root, f'configs/structured_ffn.py:model={size},method={method},'
                          f'fraction={fraction}')
      m = c.model
      assert (m.hidden_dim, m.ffn_dim, m.num_heads, m.num_layers) == (hidden, ffn, heads, layers)
      assert (m.num_kv_heads, m.attn_dim) == (heads, hidden)
      assert (c.train.tokens, c.train.peak_lr) == (tokens, lr)
      assert not c.sgt.enabled and m.first_layer_dense
      f = m.ffn
      assert f.method == method
      if method == 'lowrank':
        assert f.rank == hidden // (2, 4)[i]
      elif method == 'blockshuffle':
        assert f.blocks == (2, 4)[i]
      elif method == 'blockdense':
        assert (f.blocks, f.rank) == BLOCKDENSE[size][i]


@pytest.mark.parametrize('size', SIZES)
def test_sgt_configs(repo_root, size):
  for method in ('lowrank', 'blockdense', 'blockshuffle'):
    c = load(repo_root, f'configs/structured_ffn.py:model={size},method={method},fraction=32,'
                        'sgt=fixedflop')
    assert c.sgt.enabled and c.sgt.mode == 'fixedflop'
    assert c.sgt.ratio == FIXEDFLOP[method][size]
    assert c.sgt.reduce_flop and c.sgt.schedule == 'cosine'
    c = load(repo_root, f'configs/structured_ffn.py:model={size},method={method},fraction=32,'
                        'sgt=fixedstep')
    assert (c.sgt.enabled, c.sgt.mode, c.sgt.ratio, c.sgt.reduce_flop) == (
        True, 'fixedstep', 0.5, False)
    c = load(repo_root, f'configs/structured_ffn.py:model={size},method={method},fraction=32,'
                        'sgt=fixedstep,reduce_flop=1')
    assert c.sgt.reduce_flop


def test_wide_structured(repo_root):
  ours = {'m': (1024, 4864, 512, 8, 4, 512, 10.58e9, 0.40),
          'l': (1536, 7424, 768, 12, 4, 768, 23.36e9, 0.395)}
  gqa = {'m': (4, 4864), 'l': (2, 7424)}
  for size in ('m', 'l'):
    hidden, ffn, heads, layers, tokens, _ = PAPER_SIZES[size]
    dense = load(repo_root, f'configs/wide_structured.py:model={size},variant=dense').model
    assert (dense.hidden_dim, dense.ffn_dim, dense.num_heads, dense.num_kv_heads,
            dense.attn_dim, dense.ffn.method) == (hidden, ffn, heads, heads, hidden, 'dense')
    g = load(repo_root, f'configs/wide_structured.py:model={size},variant=gqa').model
    assert (g.num_kv_heads, g.ffn_dim, g.num_heads, g.attn_dim) == gqa[size] + (heads, hidden)
    for variant in ('ours', 'ours_sgt'):
      c = load(repo_root, f'configs/wide_structured.py:model={size},variant={variant}')
      m = c.model
      h, f, a, nh, kv, r, t, ratio = ours[size]
      assert (m.hidden_dim, m.ffn_dim, m.attn_dim, m.num_heads, m.num_kv_heads) == (h, f, a, nh, kv)
      assert (m.ffn.method, m.ffn.rank, m.num_layers) == ('lowrank', r, layers)
      if variant == 'ours':
        assert c.train.tokens == t and not c.sgt.enabled
      else:
        assert c.train.tokens == tokens  # the dense token budget
        assert (c.sgt.enabled, c.sgt.mode, c.sgt.ratio, c.sgt.reduce_flop) == (
            True, 'fixedflop', ratio, True)


@pytest.mark.parametrize('method', ['dense', 'lowrank', 'blockdense', 'blockshuffle'])
def test_tiny_configs_load(repo_root, method):
  for sgt in (0, 1):
    c = load(repo_root, f'configs/tiny.py:method={method},sgt={sgt}')
    assert c.model.ffn.method == method and c.sgt.enabled == bool(sgt)
    assert c.model.dtype == 'float32'


def test_overrides_are_applied_and_typed(repo_root):
  c = load(repo_root, 'configs/structured_ffn.py:model=s,method=lowrank',
           ('model.ffn.rank=128', 'model.init_std=0.01', 'model.use_bias=false',
            'model.norm=rmsnorm', 'train.peak_lr=1e-3', 'model.num_kv_heads=4'))
  m = c.model
  assert m.ffn.rank == 128 and isinstance(m.ffn.rank, int)
  assert m.init_std == 0.01 and m.use_bias is False and m.norm == 'rmsnorm'
  assert c.train.peak_lr == 1e-3 and m.num_kv_heads == 4


# ----------------------------------------------------------------------------- bad input

S = 'configs/structured_ffn.py:model=s'
BAD = [
    # (config spec, overrides, words the message must contain)
    ('configs/structured_ffn.py:model=s,method=butterfly', (),
     ["method='butterfly'", 'dense, lowrank, blockdense, blockshuffle']),
    (S, ('model.ffn.method=butterfly',),
     ["model.ffn.method='butterfly'", 'dense, lowrank, blockdense, blockshuffle']),
    (S + ',method=lowrank', ('model.ffn.rank=0',), ['model.ffn.rank=0', '[1, 768]']),
    (S + ',method=lowrank', ('model.ffn.rank=1000',), ['model.ffn.rank=1000', '[1, 768]']),
    (S + ',method=blockdense', ('model.ffn.rank=0',), ['model.ffn.rank=0', '[1, 768]']),
    (S + ',method=blockdense', ('model.ffn.rank=769',), ['model.ffn.rank=769', '[1, 768]']),
    (S + ',method=blockshuffle', ('model.ffn.blocks=5',),
     ['model.ffn.blocks=5', 'model.hidden_dim=768', 'allowed', '[1, 2, 3, 4, 6, 8']),
    (S + ',method=blockshuffle', ('model.ffn.blocks=0',), ['model.ffn.blocks=0', 'allowed']),
    (S + ',method=blockdense', ('model.ffn.rank=255',),
     ['model.ffn.blocks=2', 'model.ffn.rank=255', 'allowed', '[1, 3]']),
    (S, ('model.ffn.method=blockshuffle', 'model.ffn.blocks=7'),
     ['model.ffn.blocks=7', 'allowed']),
    (S, ('model.num_heads=5',), ['model.attn_dim=768', 'model.num_heads=5']),
    (S, ('model.num_kv_heads=5',),
     ['model.num_kv_heads=5', 'model.num_heads=12', '[1, 2, 3, 4, 6, 12]']),
    (S, ('model.num_heads=256', 'model.num_kv_heads=256'), ['RoPE', 'model.attn_dim']),
    (S, ('model.num_layers=0',), ['model.num_layers=0', 'positive']),
    (S, ('model.norm=batchnorm',), ["model.norm='batchnorm'", 'layernorm, rmsnorm']),
    (S, ('model.activation=relu',), ["model.activation='relu'", 'gelu, swiglu']),
    (S, ('model.position=alibi',), ["model.position='alibi'", 'rope, absolute']),
    (S, ('model.dtype=float64',), ["model.dtype='float64'", 'bfloat16']),
    (S, ('model.remat=some',), ["model.remat='some'", 'none, dots, full']),
    (S, ('model.ffn.init=ortho',), ["model.ffn.init='ortho'", 'paper, gaussian']),
    (S, ('sgt.mode=fixed',), ["sgt.mode='fixed'", 'fixedstep, fixedflop']),
    (S, ('sgt.schedule=step',), ["sgt.schedule='step'", 'cosine, linear']),
    ('configs/structured_ffn.py:model=s,foo=1', (),
     ["'foo'", 'unknown', 'model, method, fraction, sgt, reduce_flop']),
    ('configs/structured_ffn.py:model', (), ["'model'", 'key=value']),
    ('configs/structured_ffn.py:model=xxl', (), ["model='xxl'", 's, m, l, xl']),
    ('configs/structured_ffn.py:model=s,fraction=50', (), ['fraction=50', '63, 32']),
    ('configs/structured_ffn.py:model=s,fraction=abc', (), ['fraction', "'abc'"]),
    ('configs/structured_ffn.py:model=s,sgt=fixed', (),
     ["sgt='fixed'", 'none, fixedstep, fixedflop']),
    ('configs/structured_ffn.py:model=s,sgt=fixedflop', (), ['sgt', 'lowrank']),
    ('configs/structured_ffn.py:model=s,method=lowrank,sgt=fixedflop,reduce_flop=2', (),
     ["reduce_flop='2'", '0, 1']),
    ('configs/wide_structured.py:model=s', (), ["model='s'", 'm, l']),
    ('configs/wide_structured.py:model=m,variant=moe', (),
     ["variant='moe'", 'dense, gqa, ours, ours_sgt']),
    ('configs/tiny.py:method=dense,bar=2', (), ["'bar'", 'method, sgt']),
    (S, ('model.nonexistent=1',), ["'model.nonexistent'", 'no such config field']),
    (S, ('model.num_layers',), ["'model.num_layers'", 'field=value']),
    (S, ('model.num_layers=abc',), ['model.num_layers', 'number']),
    (S, ('model.num_heads=5.5',), ['model.num_heads', 'integer']),
    (S, ('model.use_bias=maybe',), ['model.use_bias', 'true or false']),
    (S, ('train.peak_lr=-1',), ['train.peak_lr=-1.0', 'must be > 0']),
    (S, ('train.warmup_frac=-0.5',), ['train.warmup_frac=-0.5', '[0, 1)']),
    (S, ('train.ckpt_every=0',), ['train.ckpt_every=0', '>= 1']),
    (S, ('train.log_every=0',), ['train.log_every=0', '>= 1']),
    (S, ('train.global_batch=0',), ['train.global_batch=0', '>= 1']),
    (S, ('train.keep_ckpts=0',), ['train.keep_ckpts=0', 'fall back']),
    (S, ('train.micro_batch=3',), ['train.micro_batch=3', 'divide train.global_batch=512']),
    (S, ('sgt.ratio=0',), ['sgt.ratio=0.0', '(0, 1]']),
    (S, ('mesh.data=-1', 'mesh.fsdp=-1'), ['mesh.fsdp=-1', 'at most one']),
    (S, ('mesh.distributed=maybe',), ["mesh.distributed='maybe'", 'auto, on, off']),
    (S, ('data.source=web',), ["data.source='web'", 'stdlib, text, jsonl, hf']),
    (S, ('data.source=text',), ['data.train_paths=[]', 'at least one training file']),
]


@pytest.mark.parametrize('spec,overrides,words', BAD, ids=[f'{i:02d}' for i in range(len(BAD))])
def test_bad_input_is_a_one_line_config_error(repo_root, spec, overrides, words):
  with pytest.raises(config_lib.ConfigError) as info:
    load(repo_root, spec, overrides)
  message = str(info.value)
  assert '\n' not in message and message.strip() == message
  for word in words:
    assert word in message, (word, message)


def test_missing_config_file(repo_root):
  with pytest.raises(config_lib.ConfigError, match='no config file'):
    config_lib.load(str(repo_root / 'configs' / 'nope.py') + ':model=s')


def test_config_error_is_a_value_error():
  assert issubclass(config_lib.ConfigError, ValueError)


# An invalid value of the right type for each field that has one; every field also gets a value
# of the wrong type. A field of the schema missing here fails the walk below until it is added.
INVALID = {
    'name': '',
    'eval.lm_eval_every': -1, 'eval.lm_eval_limit': -0.5, 'eval.lm_eval_batch_size': 0,
    'model.vocab_size': 0, 'model.seq_len': 0, 'model.hidden_dim': 0, 'model.ffn_dim': -1,
    'model.num_layers': 0, 'model.num_heads': 0, 'model.num_kv_heads': 0, 'model.attn_dim': 0,
    'model.norm': 'batchnorm', 'model.norm_eps': 0.0, 'model.activation': 'relu',
    'model.use_bias': None, 'model.position': 'alibi', 'model.rope_base': -1.0,
    'model.init_std': 0.0, 'model.first_layer_dense': None, 'model.dtype': 'float64',
    'model.qkv_bias': None, 'model.tie_embeddings': None, 'model.rope_scaling.type': 'yarn',
    'model.hf_family': 'falcon',
    'model.rope_scaling.factor': 0.0, 'model.rope_scaling.low_freq_factor': 0.0,
    'model.rope_scaling.high_freq_factor': -1.0, 'model.rope_scaling.original_len': 0,
    'model.remat': 'some', 'model.ffn.method': 'butterfly', 'model.ffn.rank': -1,
    'model.ffn.blocks': 0, 'model.ffn.init': 'ortho', 'model.ffn.implementation': 'cuda',
    'model.ffn.merge_threshold': -2, 'model.attention.implementation': 'flash9',
    'sgt.enabled': None, 'sgt.mode': 'fixed', 'sgt.ratio': 1.5, 'sgt.schedule': 'step',
    'sgt.reduce_flop': None,
    'train.tokens': 0.0, 'train.global_batch': 0, 'train.micro_batch': -1, 'train.peak_lr': -1.0,
    'train.warmup_frac': 1.0, 'train.min_lr_ratio': 1.5, 'train.b1': 1.0, 'train.b2': -0.1,
    'train.weight_decay': -0.1, 'train.grad_clip': 0.0, 'train.seed': -1, 'train.data_start': -1,
    'train.data_seed': -2,
    'train.eval_tokens': -1.0, 'train.eval_every': -1, 'train.eval_batch': -1,
    'train.log_every': 0, 'train.ckpt_every': 0, 'train.keep_ckpts': 0,
    'train.profile_start': -2, 'train.profile_steps': 0, 'train.peak_flops': -1.0,
    'data.source': 'web', 'data.train_paths': [''], 'data.valid_paths': [''],
    'data.test_paths': [''], 'data.vocab_size': 1, 'data.stdlib_max_bytes': -1,
    'data.hf_data_files': [''], 'data.max_tokens': -1, 'data.valid_tokens': -1,
    'data.test_tokens': -1, 'data.valid_fraction': 1.0, 'data.test_fraction': -0.5,
    'data.num_workers': -2, 'data.shard_tokens': 0, 'data.shard': 1, 'data.num_shards': 0,
    'data.format': 'csv', 'data.rows_dtype': 'int8',
    'mesh.data': 0, 'mesh.fsdp': -2, 'mesh.tensor': 0, 'mesh.rules': [('embed', 'gpu')],
    'mesh.distributed': 'maybe',
}


def _wrong_type(value):
  """A value of another type than `value` (the field's default)."""
  if isinstance(value, bool):
    return 'yes'
  if isinstance(value, (int, float)):
    return 'many'
  if isinstance(value, str):
    return 7
  return 7  # a list or tuple


def _schema_fields():
  return [f for f, _ in config_lib._leaves(config_lib.base_config())]


def _with(field, value):
  """base_config() with `field` set to `value`, built from a plain dict (so a value of another
  type is not refused by ConfigDict itself, as in a config.json read back)."""
  import ml_collections
  d = config_lib.base_config().to_dict()
  node = d
  *parents, leaf = field.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = value
  return ml_collections.ConfigDict(d)


@pytest.mark.parametrize('field', _schema_fields())
def test_every_field_of_the_schema_is_validated(field):
  """Walk the whole schema: a value of the wrong type, and (where a field has one) an invalid
  value of the right type, each a one-line ConfigError that names the field."""
  default = config_lib._get(config_lib.base_config(), field)
  cases = [_wrong_type(default)]
  if field in INVALID:
    cases.append(INVALID[field])
  elif isinstance(default, (int, float)) and not isinstance(default, bool):
    pytest.fail(f'{field}: a number without a range; add its range to schema.RANGES and an '
                f'invalid value to INVALID')
  for value in cases:
    with pytest.raises(config_lib.ConfigError) as info:
      config_lib.validate(_with(field, value))
    message = str(info.value)
    assert '\n' not in message
    assert re.search(rf'(?<![\w.]){re.escape(field)}(?!\w)', message), (field, value, message)


def test_the_default_of_every_field_is_valid():
  for field in _schema_fields():
    config_lib.validate(_with(field, config_lib._get(config_lib.base_config(), field)))


def test_validate_catches_direct_edits():
  c = config_lib.base_config()
  c.model.ffn.method = 'lowrank'
  c.model.ffn.rank = 0
  with pytest.raises(config_lib.ConfigError, match=r'model\.ffn\.rank=0'):
    config_lib.validate(c)
  c.model.ffn.rank = 384
  config_lib.validate(c)
  c.model.attn_dim = 700
  with pytest.raises(config_lib.ConfigError, match=r'model\.attn_dim=700.*num_heads=12'):
    config_lib.validate(c)


@pytest.mark.parametrize('args,words', [
    (['--config', 'configs/structured_ffn.py:model=s,method=butterfly'],
     ["method='butterfly'", 'lowrank']),
    (['--config', 'configs/structured_ffn.py:model=s,method=blockshuffle', '--set',
      'model.ffn.blocks=5'], ['model.ffn.blocks=5', 'allowed']),
    (['--config', 'configs/structured_ffn.py:model=s', '--set', 'model.num_heads=5.5'],
     ['model.num_heads', 'integer']),
], ids=['unknown-method', 'blocks', 'non-integer'])
def test_info_cli_bad_input_exits_with_error_line(repo_root, args, words):
  proc = subprocess.run([sys.executable, '-m', 'structffn_jax.info', *args], cwd=repo_root,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert proc.stdout == ''
  assert 'Traceback' not in proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
  for word in words:
    assert word in lines[0]


def test_parse_arg_types_each_value_like_its_default():
  c = common.parse_arg('n=3,rate=0.5,name=x,flag=0,other=True', n=1, rate=0.1, name='a',
                       flag=True, other=False)
  assert (c.n, c.rate, c.name, c.flag, c.other) == (3, 0.5, 'x', False, True)
  with pytest.raises(config_lib.ConfigError, match="flag='maybe': expected true or false"):
    common.parse_arg('flag=maybe', flag=True)
  with pytest.raises(config_lib.ConfigError, match="n='x': expected a number"):
    common.parse_arg('n=x', n=1)
  with pytest.raises(config_lib.ConfigError, match="'m' is unknown; keys: n"):
    common.parse_arg('m=1', n=1)


def _numeric_fields(kind):
  return [f for f in _schema_fields()
          if type(config_lib._get(config_lib.base_config(), f)) is kind]


@pytest.mark.parametrize('value', [math.inf, -math.inf, math.nan], ids=['inf', '-inf', 'nan'])
@pytest.mark.parametrize('field', _numeric_fields(float))
def test_no_float_field_takes_a_non_finite_value(field, value):
  """inf passed every range of the form `v > 0` (train.tokens, train.eval_tokens,
  train.peak_lr, ...) and failed later, deep in a run."""
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(_with(field, value))
  message = str(info.value)
  assert '\n' not in message and message.startswith(f'{field}=') and 'finite' in message


@pytest.mark.parametrize('field', _numeric_fields(int))
def test_no_int_field_takes_a_value_beyond_int64(field):
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(_with(field, 10**30))
  message = str(info.value)
  assert '\n' not in message and message.startswith(f'{field}=')


@pytest.mark.parametrize('overrides, words', [
    (('train.tokens=inf',), 'train.tokens=inf: must be a finite number'),
    (('train.eval_tokens=inf',), 'train.eval_tokens=inf: must be a finite number'),
    (('train.peak_lr=inf',), 'train.peak_lr=inf: must be a finite number'),
    (('train.peak_lr=nan',), 'train.peak_lr=nan: must be a finite number'),
    (('train.seed=1e30',), 'train.seed='),
    (('train.seed=4294967295',), 'train.seed=4294967295: must be in [0, 4294967294]'),
    (('train.data_seed=4294967295',), 'train.data_seed=4294967295: must be in'),
    (('train.tokens=1e300',), 'more than the 2147483647 a step counter holds'),
], ids=['tokens-inf', 'eval-tokens-inf', 'peak-lr-inf', 'peak-lr-nan', 'seed-1e30',
        'seed-uint32', 'data-seed-uint32', 'steps-int32'])
def test_overrides_the_hardware_cannot_hold_are_refused(repo_root, overrides, words):
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.load(f'{repo_root}/configs/tiny.py', overrides)
  assert words in str(info.value) and '\n' not in str(info.value)
