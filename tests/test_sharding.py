"""Sharded training: the rules table, placements, errors before compile, and 8 simulated devices.

The mesh runs happen in one subprocess (this file run as a script) with
XLA_FLAGS=--xla_force_host_platform_device_count=8, so the pytest process keeps its single CPU
device. There the tiny config trains on meshes (data, fsdp, tensor) = (8,1,1), (1,8,1), (2,2,2);
here it trains on one device, and every mesh must give the same losses. A checkpoint saved on
(8,1,1) resumes on (2,2,2).
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from structffn_jax import evaluate, metrics, optim, sgt, sharding, steps, train  # noqa: E402
from structffn_jax import config as config_lib  # noqa: E402
from structffn_jax.model import GPT  # noqa: E402
from tests import tiny_setup  # noqa: E402

MESHES = {'data': (8, 1, 1), 'fsdp': (1, 8, 1), 'mixed': (2, 2, 2)}
# 6 steps of 8 x 64 tokens, self-guided throughout (guides are placed too; the hand-over is
# covered by test_train and, across processes, test_distributed). The mesh runs stop and
# checkpoint at STOP; one is resumed on another mesh and trained to step 6.
RUN = ('train.tokens=3072', 'sgt.ratio=1', 'train.log_every=1', 'train.eval_every=0',
       'train.ckpt_every=1000', 'train.eval_tokens=512')
STOP = 4
RTOL = 1e-5  # float32 sums in another order over 6 steps


tiny = tiny_setup.run_config  # (*overrides, method='lowrank', sgt=1)


def mesh_overrides(shape):
  return tuple(f'mesh.{a}={n}' for a, n in zip(sharding.MESH_AXES, shape))


def losses(workdir):
  return {r['step']: r['loss'] for r in metrics.read_metrics(workdir) if 'loss' in r}


def subprocess_env(devices):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO),
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             # XLA:CPU runs a collective's participants on a pool sized by NPROC (default: the
             # cores); with fewer threads than simulated devices the rendezvous never completes.
             NPROC=str(max(16, 2 * devices)))
  return env


# ----------------------------------------------------------------------------- rules, in-process


def _spec(*names):
  """A PartitionSpec as a comparable tuple without trailing Nones."""
  names = list(names)
  while names and names[-1] is None:
    names.pop()
  return tuple(names)


def spec_tuple(spec):
  return _spec(*tuple(spec))


# Expected placements on (2,2,2) with the default rules, written out by hand per parameter
# (the stacked blocks add a leading replicated 'layers' dimension).
T, F = 'tensor', 'fsdp'
EXPECTED_DENSE = {
    'embedding': _spec(T, F),
    'attn/qkv/kernel': _spec(T, F), 'attn/qkv/bias': _spec(T),
    'attn/out/kernel': _spec(F, T), 'attn/out/bias': _spec(F),
    'ffn/fc1/kernel': _spec(T, F), 'ffn/fc1/bias': _spec(T),
    'ffn/fc2/kernel': _spec(F, T), 'ffn/fc2/bias': _spec(F),
    'ffn/fc1/guide': _spec(T, F), 'ffn/fc2/guide': _spec(F, T),  # a guide shards like dense
}
EXPECTED_STRUCTURED = {
    'lowrank': {'ffn/fc1/v': _spec(T, F), 'ffn/fc1/u': _spec(T, None),  # (mlp, rank): rank whole
                'ffn/fc2/v': _spec(T, None), 'ffn/fc2/u': _spec(F, T)},
    'blockdense': {'ffn/fc1/v': _spec(T), 'ffn/fc1/u': _spec(T, None),
                   'ffn/fc2/v': _spec(T), 'ffn/fc2/u': _spec(F, T)},
    'blockshuffle': {'ffn/fc1/w1': _spec(T), 'ffn/fc1/w2': _spec(T),
                     'ffn/fc2/w1': _spec(T), 'ffn/fc2/w2': _spec(T)},
}


def expected_spec(path: str, method: str):
  """Hand-written placement of a parameter path like 'stack/ffn/fc1/u'."""
  if 'norm' in path:
    return ()
  stacked = path.startswith('stack/')
  key = path.split('/', 1)[1] if path.startswith(('stack/', 'first/')) else path
  table = {**EXPECTED_DENSE, **(EXPECTED_STRUCTURED[method] if stacked else {})}
  spec = table[key]
  return _spec(None, *spec) if stacked else spec


def abstract_state(config):
  counts = sgt.step_counts(config)
  total, guided = counts.total, counts.guided
  tx = optim.make_optimizer(config, total, guided)

  def init():
    model = GPT(config.model, guide=config.sgt.enabled, rngs=nnx.Rngs(params=0))
    return steps.init_state(model, tx)[1]

  return jax.eval_shape(init)


def flat(tree):
  """{'params/stack/ffn/fc1/u': leaf, 'opt_state/1/0/mu/embedding': leaf, ...} of a train state."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path]
    out['/'.join(keys[:-1] if keys[-1] == 'value' else keys)] = leaf
  return out


def expected_state_spec(path: str, method: str):
  """A parameter and its Adam moments follow the table; counters and α are replicated."""
  for marker in ('/mu/', '/nu/'):
    if marker in path:
      return expected_spec(path.split(marker, 1)[1], method)
  if path.startswith('params/'):
    return expected_spec(path.removeprefix('params/'), method)
  return ()


def test_logical_to_spec_follows_the_rules_table():
  rules = tiny().mesh.rules
  assert sharding.logical_to_spec(('batch', None), rules) == jax.sharding.PartitionSpec(
      ('data', 'fsdp'), None)
  assert spec_tuple(sharding.logical_to_spec(('vocab', 'embed'), rules)) == (T, F)
  assert spec_tuple(sharding.logical_to_spec(('layers', 'blocks', None, None), rules)) == (None, T)
  # An axis used twice in one array: the first dimension keeps it, the second is replicated.
  assert spec_tuple(sharding.logical_to_spec(('mlp', 'rank'), rules)) == (T,)
  assert spec_tuple(sharding.logical_to_spec(('rank', 'mlp'), rules)) == (T,)
  assert spec_tuple(sharding.logical_to_spec(('unknown', None), rules)) == ()
  assert spec_tuple(sharding.logical_to_spec(None, rules)) == ()


def test_rules_parse_from_set_strings():
  parsed = sharding.parse_rules(['embed=fsdp', 'batch=data+fsdp', 'layers=none', 'rank='])
  assert parsed == (('embed', 'fsdp'), ('batch', ('data', 'fsdp')), ('layers', None),
                    ('rank', None))
  # The same table survives config.json (tuples become lists).
  default = tiny().mesh.rules
  assert sharding.parse_rules(json.loads(json.dumps(default))) == sharding.parse_rules(default)
  with pytest.raises(config_lib.ConfigError, match="'model'.*not a mesh axis"):
    sharding.parse_rules(['embed=model'])
  with pytest.raises(config_lib.ConfigError, match='not logical=mesh_axis'):
    sharding.parse_rules(['embed'])


@pytest.mark.parametrize('method', ['lowrank', 'blockdense', 'blockshuffle'])
def test_every_parameter_and_moment_is_placed_as_the_rules_say(method):
  config = tiny(method=method)
  state = abstract_state(config)
  mesh = AbstractMesh((2, 2, 2), sharding.MESH_AXES)
  placed = flat(sharding.param_shardings(state, mesh, config.mesh.rules))
  assert len(placed) == len(jax.tree.leaves(state))
  assert len([p for p in placed if p.endswith('fc1/guide')]) == 3  # param, mu, nu
  assert 'opt_state/2/alpha' in placed
  for path, s in placed.items():
    assert s.mesh.shape == mesh.shape
    assert spec_tuple(s.spec) == expected_state_spec(path, method), path


def test_mesh_sizes_resolve_and_bad_sizes_name_the_fields():
  def shape(d, f, t, devices):
    return sharding.mesh_shape(tiny(f'mesh.data={d}', f'mesh.fsdp={f}', f'mesh.tensor={t}'),
                               devices)

  assert shape(-1, 1, 1, 8) == (8, 1, 1)
  assert shape(-1, 2, 2, 8) == (2, 2, 2)
  assert shape(1, -1, 1, 8) == (1, 8, 1)
  assert shape(1, 1, 1, 1) == (1, 1, 1)
  with pytest.raises(config_lib.ConfigError,
                     match=r'mesh.data=3 x mesh.fsdp=1 x mesh.tensor=1 = 3 devices, but this run '
                           r'has 8; make the product 8'):
    shape(3, 1, 1, 8)
  with pytest.raises(config_lib.ConfigError, match='multiply to 3, which does not divide the 8'):
    shape(-1, 3, 1, 8)
  with pytest.raises(config_lib.ConfigError, match='at most one mesh size may be -1'):
    shape(-1, -1, 1, 8)
  with pytest.raises(config_lib.ConfigError, match='mesh.tensor=0 must be a positive size'):
    shape(1, 1, 0, 8)


def test_batches_must_split_over_the_batch_axes():
  mesh = AbstractMesh((4, 2, 1), sharding.MESH_AXES)
  sharding.check_batch(tiny(), mesh)  # global batch 8 over data x fsdp = 8
  with pytest.raises(config_lib.ConfigError,
                     match=r'train.global_batch=12 is not divisible by the batch axes '
                           r'mesh.data=4 x mesh.fsdp=2 = 8; make train.global_batch a multiple'):
    sharding.check_batch(tiny('train.global_batch=12'), mesh)
  with pytest.raises(config_lib.ConfigError, match='train.micro_batch=4 is not divisible'):
    sharding.check_batch(tiny('train.micro_batch=4'), mesh)
  with pytest.raises(config_lib.ConfigError, match='train.eval_batch=6 is not divisible'):
    sharding.check_batch(tiny('train.eval_batch=6'), mesh)
  with pytest.raises(config_lib.ConfigError, match='not divisible by the 3 processes'):
    sharding.check_batch(tiny(), AbstractMesh((1, 1, 1), sharding.MESH_AXES), process_count=3)


def test_a_dimension_its_mesh_axis_cannot_split_names_the_parameter():
  config = tiny(method='blockshuffle')  # 2 blocks
  mesh = AbstractMesh((1, 1, 8), sharding.MESH_AXES)
  with pytest.raises(config_lib.ConfigError,
                     match=r"parameter stack/ffn/fc1/w1 \(2, 2, 32, 32\): dimension 1 \('blocks', "
                           r"size 2\) is not divisible by mesh.tensor=8 = 8; set mesh.tensor to a "
                           r"divisor of 2, map 'blocks' to None in mesh.rules, or change "
                           r"model.ffn.blocks"):
    sharding.param_shardings(abstract_state(config), mesh, config.mesh.rules)
  # Mapping blocks to None instead leaves them whole: no error.
  sharding.param_shardings(abstract_state(config), mesh, ('blocks=none', 'embed=fsdp',
                                                          'mlp=tensor', 'qkv=tensor'))


def test_cli_reports_a_bad_mesh_without_a_traceback(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'structffn_jax.train', '--config', f'{REPO}/configs/tiny.py',
       '--workdir', str(tmp_path / 'w'), '--set', 'mesh.data=2'],
      capture_output=True, text=True, cwd=REPO, timeout=300, env=subprocess_env(1))
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert 'error: mesh.data=2 x mesh.fsdp=1 x mesh.tensor=1 = 2 devices, but this run has 1' \
      in out.stderr
  assert not (tmp_path / 'w').exists()  # refused before the workdir was touched


# ----------------------------------------------------------------------------- 8 devices


@pytest.fixture(scope='module')
def runs(tmp_path_factory, data_dir):
  """`worker` below on 8 simulated devices (a subprocess), and meanwhile the same run here on
  this process's single device, uninterrupted: (the worker's JSON report, the reference)."""
  root = tmp_path_factory.mktemp('meshes')
  proc = subprocess.Popen([sys.executable, __file__, str(root), str(data_dir)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                          env=subprocess_env(8))
  try:
    workdir = tmp_path_factory.mktemp('single')
    trainer = train.Trainer(tiny(*RUN, f'data.data_dir={data_dir}'), workdir)
    assert trainer.mesh.devices.shape == (1, 1, 1)
    result = trainer.run()
    reference = {'losses': losses(workdir), 'valid_loss': result['valid_loss']}
    stdout, stderr = proc.communicate(timeout=600)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
  return json.loads((root / 'report.json').read_text()), reference, root


@pytest.fixture(scope='module')
def meshes(runs):
  return runs[0]


@pytest.fixture(scope='module')
def reference(runs):
  return runs[1]


@pytest.mark.slow
def test_every_mesh_trains_to_the_same_losses(meshes, reference):
  ref = reference['losses']
  assert sorted(ref) == list(range(1, 7))
  for name, shape in MESHES.items():
    got = {int(k): v for k, v in meshes['losses'][name].items()}
    assert sorted(got) == list(range(1, STOP + 1)), name
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(got)],
                               rtol=RTOL, err_msg=f'mesh {name} {shape}')
    assert meshes['devices'][name] == list(shape)


@pytest.mark.slow
def test_trained_state_is_placed_as_the_rules_say(meshes):
  placed = meshes['placements']  # (2,2,2), guided
  assert 'params/stack/ffn/fc1/u' in placed and 'params/stack/ffn/fc2/guide' in placed
  for path, spec in placed.items():
    assert tuple(spec) == expected_state_spec(path, 'lowrank'), path


@pytest.mark.slow
def test_a_checkpoint_saved_on_one_mesh_resumes_on_another(meshes, reference):
  resumed = meshes['resumed']
  assert resumed['step'] == STOP and resumed['devices'] == [2, 2, 2]
  assert resumed['restored_equal'], 'restored arrays differ from the ones saved on (8,1,1)'
  assert resumed['restored_on_new_mesh']
  got = {int(k): v for k, v in resumed['losses'].items()}
  assert sorted(got) == list(range(1, 7))
  for s in range(STOP + 1, 7):
    assert got[s] == pytest.approx(reference['losses'][s], rel=RTOL), s


@pytest.mark.slow
def test_evaluate_restores_a_sharded_run_on_one_device(runs):
  _, reference, root = runs
  workdir = root / 'data'  # ended on (2,2,2), which this 1-device process cannot build
  with pytest.raises(config_lib.ConfigError, match='= 8 devices, but this run has 1'):
    evaluate.evaluate(workdir, max_tokens=512)
  result = evaluate.evaluate(workdir, max_tokens=512, mesh='1,1,1')
  assert result['step'] == 6
  assert result['loss'] == pytest.approx(reference['valid_loss'], rel=RTOL)


@pytest.mark.slow
def test_bad_meshes_fail_before_any_compile(meshes):
  errors = meshes['errors']
  assert errors['mesh_product']['compiles'] == 0
  assert 'mesh.data=3 x mesh.fsdp=1 x mesh.tensor=1 = 3 devices, but this run has 8' in \
      errors['mesh_product']['error']
  assert errors['batch']['compiles'] == 0
  assert 'train.micro_batch=4 is not divisible by the batch axes mesh.data=8 x mesh.fsdp=1 = 8' \
      in errors['batch']['error']
  assert errors['dimension']['compiles'] == 0
  assert 'parameter stack/ffn/fc1/w1 (2, 2, 32, 32): dimension 1' in errors['dimension']['error']
  assert 'model.ffn.blocks' in errors['dimension']['error']
  assert not any(e['workdir_created'] for e in errors.values())


def worker(root: pathlib.Path, data_dir: str) -> None:
  """On 8 devices: train each mesh to STOP, resume (8,1,1)'s checkpoint on (2,2,2), bad configs.

  Compiles: the init and the train step per mesh; the resumed run reuses (2,2,2)'s step."""
  assert jax.device_count() == 8, jax.devices()
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, *_, **__: compiles.append(event) if 'backend_compile' in event else None)
  report = {'losses': {}, 'devices': {}, 'errors': {}}
  base = RUN + (f'data.data_dir={data_dir}',)
  for name, shape in MESHES.items():
    trainer = train.Trainer(tiny(*base, *mesh_overrides(shape)), root / name)
    report['devices'][name] = list(trainer.mesh.devices.shape)
    assert trainer.run(stop_at=STOP)['step'] == STOP
    report['losses'][name] = losses(root / name)
    if name == 'mixed':
      report['placements'] = {path: spec_tuple(leaf.sharding.spec)
                              for path, leaf in flat(trainer.state).items()}
    if name == 'data':
      saved = jax.tree.map(np.asarray, trainer.state)
  # The (8,1,1) checkpoint of step STOP, resumed on (2,2,2) and trained to the end.
  trainer = train.Trainer(tiny(*base, *mesh_overrides((2, 2, 2))), root / 'data')
  restored = jax.tree.map(np.asarray, trainer.state)
  flat_saved, flat_restored = jax.tree.leaves(saved), jax.tree.leaves(restored)
  equal = len(flat_saved) == len(flat_restored) and all(
      np.array_equal(a, b) for a, b in zip(flat_saved, flat_restored))
  on_new_mesh = all(
      leaf.sharding.mesh.devices.shape == (2, 2, 2)
      and leaf.sharding == expected for leaf, expected in zip(
          jax.tree.leaves(trainer.state), jax.tree.leaves(trainer.state_shardings)))
  step = trainer.step
  assert trainer.run(stop_at=6)['step'] == 6  # checkpoint, no evaluation (one compile less)
  report['resumed'] = {'step': step, 'devices': list(trainer.mesh.devices.shape),
                       'restored_equal': bool(equal), 'restored_on_new_mesh': bool(on_new_mesh),
                       'losses': losses(root / 'data')}
  # Bad configs: each fails with a ConfigError before anything is compiled.
  bad = {'mesh_product': (tiny(*base, 'mesh.data=3'), 'a'),
         'batch': (tiny(*base, 'train.micro_batch=4'), 'b'),
         'dimension': (tiny(*base, *mesh_overrides((1, 1, 8)), method='blockshuffle'), 'c')}
  for name, (config, workdir) in bad.items():
    compiles.clear()
    try:
      train.Trainer(config, root / f'bad-{workdir}')
      error = None
    except config_lib.ConfigError as e:
      error = str(e)
    report['errors'][name] = {'error': error, 'compiles': len(compiles),
                              'workdir_created': (root / f'bad-{workdir}').exists()}
  (root / 'report.json').write_text(json.dumps(report, indent=1))


if __name__ == '__main__':
  worker(pathlib.Path(sys.argv[1]), sys.argv[2])
