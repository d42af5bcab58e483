"""launch/convert_study_report.py on synthetic records of every run of configs/convert_study.py:
the verdicts follow the numbers (an effect built in is reproduced, its opposite is not, noise is
inconclusive), the step-0 equality is checked to its tolerance, a missing or unfinished run makes
the claims that need it inconclusive with the reason, and the CLI refuses a bad folder."""

import gzip
import importlib.util
import json
import pathlib

import pytest

from structffn_jax import config as config_lib
from structffn_jax import decisions, workdir

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / 'configs' / 'convert_study.py'
SOURCE_LOSS = 3.0
LONG_LOSS = 3.2


@pytest.fixture(scope='module')
def report():
  spec = importlib.util.spec_from_file_location('convert_report',
                                                REPO / 'launch' / 'convert_study_report.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def study():
  return config_lib.config_module(CONFIG)


@pytest.fixture(scope='module')
def configs(study):
  """{PLAN argument: config}, loaded once (the records' config.json come from these)."""
  return {arg: config_lib.load(f'{CONFIG}:{arg},size=cpu') for arg in study.VARIANTS}


NOISE_K = {'guided': 1.0, 'projection': -1.0, 'scratch': 2.0, 'dense': 0.0}


def _loss(role, t, seed, effect, noise, delta0):
  """L(role, t): the built-in effect (+1: the claims hold, -1: their opposite) and a noise whose
  paired gaps flip sign between the two seeds."""
  offset = 0.01 * (seed - 1005)  # shared by every mode of a seed: cancels in the gaps
  base = SOURCE_LOSS - 0.1 * t / 300 + offset
  sign = 1.0 if seed == 1005 else -1.0
  n = noise * sign * NOISE_K.get(role, 0.0)
  if role == 'dense':
    return (SOURCE_LOSS if t == 0 else base) + n
  proj = (3.5 + offset if t == 0 else base + 0.05)
  if role == 'projection':
    return proj + n
  if role == 'scratch':
    return proj + effect * (2.0 if t == 0 else 0.4) + n
  if role == 'guided':
    return (SOURCE_LOSS + delta0 if t == 0 else proj - effect * 0.03) + n
  raise ValueError(role)


def _write(d: pathlib.Path, config, curve: dict, converted: bool):
  d.mkdir(parents=True)
  workdir.write_workdir_config(d, config)
  lines = [json.dumps({'step': s, 'valid_loss': v}) for s, v in sorted(curve.items())]
  (d / 'metrics.jsonl.gz').write_bytes(gzip.compress(('\n'.join(lines) + '\n').encode()))
  (d / 'sweep.json').write_text(json.dumps({'exit': 0, 'wall_s': 60.0, 'cpu_s': 100.0}))
  if converted:
    layers = [{'layer': 0, 'method': 'dense'}] + [
        {'layer': i, 'method': config.model.ffn.method,
         'fc1': {'relative_error': 0.5, 'optimum': 0.4},
         'fc2': {'relative_error': 0.7, 'optimum': 0.6}} for i in range(1, 4)]
    (d / 'convert.json').write_text(json.dumps({'mode': 'x', 'layers': layers, 'seconds': 2.0}))
    (d / 'convert_sweep.json').write_text(json.dumps({'exit': 0, 'wall_s': 6.0, 'cpu_s': 9.0}))


def build(report, study, configs, tmp_path, effect=1.0, noise=0.0, delta0=0.0, skip=(),
          partial=()):
  """Records of every run under tmp_path/runs, and the step-0 losses {run name: {'loss'}}."""
  root = tmp_path / 'runs'
  step0 = {}
  for arg, converted in study.PLAN:
    config = configs[arg]
    a = report.parse_arg(arg)
    r, seed = report.role(a), int(a['seed'])
    total, every = report.sgt.step_counts(config).total, config.train.eval_every
    steps = range(every, total + 1, every)
    if r == 'source':
      curve = {s: SOURCE_LOSS + 0.5 * (1 - s / total) for s in steps}
    elif r == 'long':
      curve = {s: LONG_LOSS + 0.5 * (1 - s / total) for s in steps}
    else:
      curve = {s: _loss(r, s, seed, effect, noise, delta0) for s in steps}
      step0[config.name] = {'loss': _loss(r, 0, seed, effect, noise, delta0), 'tokens': 65536.0}
    if config.name in partial:
      curve = {s: v for s, v in curve.items() if s <= total // 2}
    if config.name not in skip:
      _write(root / config.name, config, curve, converted)
  return root, step0


def _run(report, study, root, step0, out):
  runs = report.load_runs(study, root, None)
  return report.report(study, runs, step0, out)


def _verdicts(numbers, claim):
  return {name: v.verdict for name, vs in numbers['verdicts'].items() for c, v in vs.items()
          if c == claim}


def test_an_effect_built_in_is_reproduced(report, study, configs, tmp_path):
  root, step0 = build(report, study, configs, tmp_path)
  text, numbers = _run(report, study, root, step0, tmp_path / 'out')
  for claim in ('C1', 'C2', 'C3a', 'C3b', 'C3', 'C4'):
    assert set(_verdicts(numbers, claim).values()) == {decisions.REPRODUCED}, claim
  assert len(numbers['verdicts']) == len(study.STRUCTURES) == 6
  assert text.startswith('40 of 40 runs done')
  assert "the source's final validation loss 3.0000 (step 1200)" in text.splitlines()[0]
  # training 40 x 60 s and the conversions 38 x 6 s of wall time
  assert numbers['header']['wall_s'] == pytest.approx(40 * 60 + 38 * 6)
  assert numbers['header']['cpu_s'] == pytest.approx(40 * 100 + 38 * 9)
  lr = numbers['tables']['lowrank 32%']
  assert lr['losses']['guided']['0']['mean'] == pytest.approx(SOURCE_LOSS)
  assert lr['losses']['scratch']['0']['mean'] == pytest.approx(5.505)  # 3.5 + 2 + seed offsets
  assert lr['gaps']['projection − guided']['half']['mean'] == pytest.approx(0.03)
  assert lr['gaps']['scratch − projection']['end']['mean'] == pytest.approx(0.4)
  conv = numbers['conversion']['lowrank 32%']['conversion']
  assert conv['relative_error'] == pytest.approx(0.6) and conv['optimum'] == pytest.approx(0.5)
  assert conv['matrices'] == 6
  assert '| lowrank 32% | 0.600 | 0.500 | +1.0e-01 | 3.000 | 3.505 | 5.505 | 3.000 |' in text
  # C5: min(guided, projection) - dense = 0.05 - 0.03, the same in both seeds: within 0.05 nats
  c5 = numbers['c5']['blockshuffle 63%']
  assert c5['mean'] == pytest.approx(0.02) and c5['within'] is True
  assert set(c5['best_mode'].values()) == {'guided'}
  # C6: the long run against the converted LowRank 32% runs of seed 1005 at their end
  c6 = numbers['c6']
  assert c6['long'] == pytest.approx(LONG_LOSS)
  assert c6['modes']['guided']['long_minus_mode'] == pytest.approx(LONG_LOSS - 2.92)
  assert 'measured by this report (--step0, 38 runs' in text
  assert 'the rule' not in text and decisions.PAIRED_RULE in text  # each row quotes its rule
  saved = json.loads((tmp_path / 'out' / 'convert_study.json').read_text())
  assert saved['verdicts']['lowrank 32%']['C1']['verdict'] == decisions.REPRODUCED
  assert saved['c5']['lowrank 32%']['within'] is True
  assert (tmp_path / 'out' / 'loss.png').stat().st_size > 10_000
  assert (tmp_path / 'out' / 'step0.png').stat().st_size > 5_000


def test_the_opposite_is_not_reproduced_and_noise_is_inconclusive(report, study, configs,
                                                                  tmp_path):
  root, step0 = build(report, study, configs, tmp_path / 'opposite', effect=-1.0)
  _, numbers = _run(report, study, root, step0, tmp_path / 'out1')
  for claim in ('C1', 'C2', 'C3a', 'C3', 'C4'):
    assert set(_verdicts(numbers, claim).values()) == {decisions.NOT_REPRODUCED}, claim
  assert set(_verdicts(numbers, 'C3b').values()) == {decisions.REPRODUCED}
  root, step0 = build(report, study, configs, tmp_path / 'noise', effect=0.0, noise=0.05)
  _, numbers = _run(report, study, root, step0, tmp_path / 'out2')
  for claim in ('C1', 'C2', 'C3a', 'C4'):
    assert set(_verdicts(numbers, claim).values()) == {decisions.INCONCLUSIVE}, claim
  c5 = numbers['c5']['lowrank 32%']  # the lower of guided, projection in each seed
  assert list(c5['gaps'].values()) == pytest.approx([0.0, 0.0])
  assert c5['best_mode'] == {1005: 'projection', 1006: 'guided'}


def test_the_step0_equality_is_checked_to_its_tolerance(report, study, configs, tmp_path):
  root, step0 = build(report, study, configs, tmp_path, delta0=1e-3)
  _, numbers = _run(report, study, root, step0, tmp_path / 'out')
  assert set(_verdicts(numbers, 'C3b').values()) == {decisions.NOT_REPRODUCED}
  assert set(_verdicts(numbers, 'C3a').values()) == {decisions.REPRODUCED}
  assert set(_verdicts(numbers, 'C3').values()) == {decisions.NOT_REPRODUCED}
  text, numbers = _run(report, study, root, {}, tmp_path / 'out')  # nothing measured
  assert set(_verdicts(numbers, 'C1').values()) == {decisions.INCONCLUSIVE}
  assert set(_verdicts(numbers, 'C3b').values()) == {decisions.INCONCLUSIVE}
  assert set(_verdicts(numbers, 'C2').values()) == {decisions.REPRODUCED}
  assert 'It is not measured yet: run this report with --step0' in text
  assert 'no step-0 loss measured (--step0)' in numbers['verdicts']['lowrank 32%']['C1'].why


def test_a_missing_run_gives_inconclusive_with_the_reason(report, study, configs, tmp_path):
  gone = 'convert-cpu-lowrank32-guided-seed1006'
  half = 'convert-cpu-blockdense63-scratch-seed1005'
  root, step0 = build(report, study, configs, tmp_path, skip=(gone, 'convert-cpu-lowrank32-long'
                                                              '-seed1005'), partial=(half,))
  text, numbers = _run(report, study, root, step0, tmp_path / 'out')
  assert text.startswith('37 of 40 runs done')
  for claim in ('C3a', 'C4'):
    v = numbers['verdicts']['lowrank 32%'][claim]
    assert v.verdict == decisions.INCONCLUSIVE and f'{gone}: new' in v.why and v.n == 1
  assert numbers['verdicts']['lowrank 32%']['C2'].verdict == decisions.REPRODUCED
  v = numbers['verdicts']['blockdense 63%']['C2']
  assert v.verdict == decisions.INCONCLUSIVE and f'{half}: partial (150/300 steps)' in v.why
  assert numbers['verdicts']['blockdense 63%']['C1'].verdict == decisions.REPRODUCED  # step 0
  assert numbers['c5']['lowrank 32%']['within'] is None
  assert any(gone in m for m in numbers['c5']['lowrank 32%']['missing'])
  assert numbers['c6']['long'] is None and 'missing: convert-cpu-lowrank32-long-seed1005: new' \
      in text
  assert '3 of 40 runs not finished yet: ' in text and f'{gone}, ' in text.split('not finished')[-1]
  assert (tmp_path / 'out' / 'loss.png').stat().st_size > 10_000


def test_cli_reads_records_and_refuses_a_folder_that_is_not_there(report, study, configs,
                                                                  tmp_path, capsys):
  root, step0 = build(report, study, configs, tmp_path)
  out = tmp_path / 'out'
  out.mkdir()
  (out / report.STEP0_FILE).write_text(json.dumps({'losses': step0}))
  assert report.main(['--record', str(root), '--out', str(out)]) == 0
  assert 'C1 lowrank 32% | **reproduced**' in (out / 'report.md').read_text()
  assert (out / 'loss.png').exists() and (out / 'convert_study.json').exists()
  with pytest.raises(SystemExit, match=r'^error: --record .*nope: no such directory; give '):
    report.main(['--record', str(tmp_path / 'nope'), '--out', str(out)])
  with pytest.raises(SystemExit, match=r'^error: --root .*nope: no such directory'):
    report.main(['--root', str(tmp_path / 'nope'), '--out', str(out)])
  with pytest.raises(SystemExit, match=r"^error: --step0: the source .* is new"):
    report.main(['--root', str(tmp_path), '--out', str(out), '--step0'])


def _end(method, fraction, role, seed, loss):
  return {'run': f'{method}{fraction}-{role}-{seed}', 'method': method, 'fraction': fraction,
          'role': role, 'seed': seed, 'state': 'finished', 'status': 'finished', 'steps': 300,
          'half_step': 150, 'valid_curve': [[300, loss]], 'batch_tokens': 1}


@pytest.mark.parametrize('gaps,within', [((0.019, 0.021), True), ((0.005, 0.035), False),
                                         ((0.06, 0.07), False)])
def test_c5_within_is_mean_plus_three_se_below_the_bound(report, study, gaps, within):
  runs = []
  for seed, g in zip(study.SEEDS, gaps):
    runs += [_end('dense', 100, 'dense', seed, 3.0), _end('lowrank', 32, 'guided', seed, 3.0 + g),
             _end('lowrank', 32, 'projection', seed, 3.1 + g)]
  c5 = report.gap_to_dense(report.Study(study, runs, {}), 'lowrank', 32)
  assert c5['mean'] == pytest.approx(sum(gaps) / 2) and c5['within'] is within
