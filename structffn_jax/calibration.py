"""Pre-merge calibration (docs/design.md §8): where a structured FFN layer's merged dense matrix
beats its factors on this device, and the record of it that a run keeps.

`calibrate(model_cfg)` times, for each structured FFN layer shape of a model (fc1, fc2) in its
compute dtype, the merged matmul against the structured one over a range of token counts and
returns the crossovers. `python -m structffn_jax.premerge` writes them to <workdir>/premerge.json;
`threshold(config, workdir)` reads them back when a run is loaded for inference.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from structffn_jax import structured, timing
from structffn_jax.model import DTYPES

DEFAULT_TOKENS = tuple(2 ** i for i in range(13))  # 1 .. 4096
FILE = 'premerge.json'  # the calibration record in a workdir


def ffn_layers(model_cfg) -> dict[str, structured.StructuredLinear]:
  """Stand-alone fc1 / fc2 of the model's structured FFN (random weights: only shapes matter)."""
  f = model_cfg.ffn
  if f.method == 'dense':
    return {}
  d, h = model_cfg.hidden_dim, model_cfg.ffn_dim
  fc1_out = 2 * h if model_cfg.activation == 'swiglu' else h
  common_kw = dict(rank=f.rank, blocks=f.blocks, use_bias=False, init='gaussian',
                   dtype=DTYPES[model_cfg.dtype], rngs=nnx.Rngs(0))
  return {'fc1': structured.make_linear(f.method, d, fc1_out, **common_kw),
          'fc2': structured.make_linear(f.method, h, d, **common_kw)}


def describe(layer) -> str:
  extra = ''.join(f', {k}={getattr(layer, k)}' for k in ('rank', 'blocks') if hasattr(layer, k))
  return f'{type(layer).__name__}({layer.in_features}->{layer.out_features}{extra})'


def time_forms(layer, tokens, *, iters: int = 10):
  """Median seconds of the merged and the structured form of `layer` at each token count."""
  merged_layer = nnx.clone(layer)
  merged_layer.merge(threshold=max(tokens))
  forms = {'merged': timing.jitted_forward(merged_layer),
           'structured': timing.jitted_forward(layer)}
  out = {'merged_s': [], 'structured_s': []}
  key = jax.random.key(0)
  for t in tokens:
    x = jax.random.normal(key, (t, layer.in_features), layer.dtype or jnp.float32)
    times = timing.time_interleaved(
        {name: (fn, (state, x)) for name, (fn, state) in forms.items()}, iters=iters)
    out['merged_s'].append(times['merged'])
    out['structured_s'].append(times['structured'])
  return out


def crossover(tokens, merged_s, structured_s) -> int:
  """Largest token count up to which the merged form was faster at every measured count."""
  threshold = 0
  for t, m, s in zip(tokens, merged_s, structured_s):
    if m >= s:
      break
    threshold = t
  return threshold


def calibrate(model_cfg, tokens=DEFAULT_TOKENS, iters: int = 10) -> dict:
  """{'thresholds': {name: T}, 'layers': {name: timings}} for the model's structured FFN."""
  tokens = sorted(int(t) for t in tokens)
  result = {'thresholds': {}, 'layers': {}, 'dtype': model_cfg.dtype, 'tokens': tokens}
  for name, layer in ffn_layers(model_cfg).items():
    times = time_forms(layer, tokens, iters=iters)
    found = crossover(tokens, times['merged_s'], times['structured_s'])
    result['thresholds'][name] = found
    result['layers'][name] = {'layer': describe(layer), 'threshold': found, **times}
  return result


def threshold(config, workdir, override: int | None = None):
  """The pre-merge threshold of a run: int, {'fc1': int, 'fc2': int}, or None (no pre-merge).

  Order: `override`, then model.ffn.merge_threshold, then <workdir>/premerge.json; -1 in the
  first two defers to the next, 0 means never merged.
  """
  for value in (override, config.model.ffn.merge_threshold):
    if value is not None and value >= 0:
      return int(value) or None
  path = pathlib.Path(workdir) / FILE
  if not path.is_file():
    return None
  record = json.loads(path.read_text())
  here = jax.devices()[0].device_kind
  if record.get('device') != here:
    print(f'note: {path} was calibrated on {record.get("device")!r}, this is {here!r}; '
          'run structffn_jax.premerge again for this device.', file=sys.stderr)
  thresholds = {k: int(v) for k, v in record['thresholds'].items()}
  return thresholds if any(thresholds.values()) else None
