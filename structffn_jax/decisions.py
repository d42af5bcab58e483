"""Decision rules of the CPU studies (configs/cpu_reproduction.py), as functions of their numbers.

A study's verdict is computed here from its runs, never written by hand: each function takes the
measured numbers, applies the rule fixed in the study's config before the runs, and returns a
`Verdict` that carries the rule's text, so that a report quotes the rule beside its outcome.

  paired(gaps, sign)              the paired-seed rule: every seed agrees and |mean| > 3 se
  bootstrap_difference(d, boot)   an estimate against its bootstrap's standard error
  spikes_more(structured, dense)  Figure 3: a structure spikes more than dense
  spikes_removed(sgt, plain)      Figure 3: self-guided training removes the spikes
  best_lr(losses)                 the probe's argmin, and whether it sits at the grid's edge
  settled_from(xs, gaps)          where a curve of gaps takes its final sign for good
  matches(values, reference, tol) an equality to a tolerance: every seed within tol
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = 'reproduced', 'not reproduced', 'inconclusive'
SE_MARGIN = 3.0
PAIRED_RULE = ('reproduced if every seed has the predicted sign and |mean| > 3 se; not '
               'reproduced if every seed has the opposite sign and |mean| > 3 se; otherwise '
               'inconclusive')
BOOTSTRAP_RULE = ('reproduced if the estimate has the predicted sign and exceeds 3 bootstrap '
                  'se; not reproduced if it has the opposite sign by 3 se; otherwise '
                  'inconclusive')
SPIKES_MORE_RULE = ("over the LRs at which dense does not diverge: reproduced if the "
                    "structure's spikes total at least dense's + 2 and it has at least dense's "
                    "count at every LR; not reproduced if its total is at most dense's; "
                    "otherwise inconclusive")
SPIKES_REMOVED_RULE = ('needs at least 2 spikes without SGT (otherwise inconclusive); '
                       'reproduced if SGT has at most half the total and at most the count at '
                       'every LR; not reproduced if SGT has at least the total; otherwise '
                       'inconclusive')


@dataclasses.dataclass(frozen=True)
class Verdict:
  verdict: str  # REPRODUCED | NOT_REPRODUCED | INCONCLUSIVE
  rule: str  # the rule, as the study's config states it
  why: str  # the numbers that decided it, in one line
  mean: float | None = None
  se: float | None = None
  n: int = 0

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def mean_se(values: Sequence[float]) -> tuple[float, float]:
  """Mean and standard error (sample sd / sqrt(n); nan for one value)."""
  x = np.asarray(values, dtype=np.float64)
  if x.size == 0:
    return math.nan, math.nan
  se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
  return float(x.mean()), se


def paired(gaps: Sequence[float], sign: int, min_seeds: int = 3) -> Verdict:
  """The paired-seed rule for a claim that predicts `sign` (+1 / -1) of each seed's gap."""
  if sign not in (1, -1):
    raise ValueError(f'sign={sign}: must be +1 or -1')
  gaps = [float(g) for g in gaps]
  mean, se = mean_se(gaps)
  if len(gaps) < min_seeds:
    return Verdict(INCONCLUSIVE, PAIRED_RULE, f'{len(gaps)} of the {min_seeds} seeds needed',
                   mean if gaps else None, se if len(gaps) > 1 else None, len(gaps))
  why = f'mean {mean:+.4f} ± {se:.4f} (se) over {len(gaps)} seeds, gaps ' + \
      ', '.join(f'{g:+.4f}' for g in gaps)
  if all(sign * g > 0 for g in gaps) and sign * mean > SE_MARGIN * se:
    verdict = REPRODUCED
  elif all(sign * g < 0 for g in gaps) and -sign * mean > SE_MARGIN * se:
    verdict = NOT_REPRODUCED
  else:
    verdict = INCONCLUSIVE
  return Verdict(verdict, PAIRED_RULE, why, mean, se, len(gaps))


def bootstrap_difference(estimate: float, resamples: Sequence[float], sign: int) -> Verdict:
  """An estimate (e.g. b_structure - b_dense) against the sd of its bootstrap resamples."""
  boot = np.asarray([r for r in resamples if np.isfinite(r)], dtype=np.float64)
  if boot.size < 2:
    return Verdict(INCONCLUSIVE, BOOTSTRAP_RULE, 'fewer than 2 bootstrap resamples fitted',
                   float(estimate), None, int(boot.size))
  se = float(boot.std(ddof=1))
  if not se > 1e-12 * max(1.0, abs(float(estimate))):  # equal resamples, up to rounding
    return Verdict(INCONCLUSIVE, BOOTSTRAP_RULE, 'the resamples do not vary: no seed noise to '
                   'weigh the estimate against', float(estimate), se, int(boot.size))
  lo, hi = np.percentile(boot, [2.5, 97.5])
  why = (f'estimate {estimate:+.4f}, bootstrap se {se:.4f}, 95% interval [{lo:+.4f}, '
         f'{hi:+.4f}] over {boot.size} resamples')
  if sign * estimate > SE_MARGIN * se:
    verdict = REPRODUCED
  elif -sign * estimate > SE_MARGIN * se:
    verdict = NOT_REPRODUCED
  else:
    verdict = INCONCLUSIVE
  return Verdict(verdict, BOOTSTRAP_RULE, why, float(estimate), se, int(boot.size))


def _counts(by_lr: Mapping[float, int], lrs) -> list[int]:
  return [int(by_lr[lr]) for lr in lrs]


def spikes_more(structured: Mapping[float, int], dense: Mapping[float, int],
                dense_diverged: Mapping[float, bool]) -> Verdict:
  """Figure 3's "the structure spikes more": spike counts by LR (a divergence counted as one more
  spike by the caller), over the LRs at which dense does not diverge."""
  lrs = sorted(lr for lr in dense if lr in structured and not dense_diverged.get(lr, False))
  if not lrs:
    return Verdict(INCONCLUSIVE, SPIKES_MORE_RULE, 'no LR at which both ran and dense trained')
  s, d = _counts(structured, lrs), _counts(dense, lrs)
  why = (f'spikes at LR {", ".join(f"{lr:g}" for lr in lrs)}: structure {s} (total {sum(s)}), '
         f'dense {d} (total {sum(d)})')
  if sum(s) >= sum(d) + 2 and all(a >= b for a, b in zip(s, d)):
    verdict = REPRODUCED
  elif sum(s) <= sum(d):
    verdict = NOT_REPRODUCED
  else:
    verdict = INCONCLUSIVE
  return Verdict(verdict, SPIKES_MORE_RULE, why, n=len(lrs))


def spikes_removed(sgt: Mapping[float, int], plain: Mapping[float, int],
                   lrs: Sequence[float] | None = None) -> Verdict:
  """Figure 3's "self-guided training removes the spikes" (the same LRs as `spikes_more`)."""
  lrs = sorted(lrs if lrs is not None else (lr for lr in plain if lr in sgt))
  g, p = _counts(sgt, lrs), _counts(plain, lrs)
  why = f'spikes with SGT {g} (total {sum(g)}), without {p} (total {sum(p)})'
  if sum(p) < 2:
    return Verdict(INCONCLUSIVE, SPIKES_REMOVED_RULE, why + ': nothing to remove', n=len(lrs))
  if sum(g) <= sum(p) / 2 and all(a <= b for a, b in zip(g, p)):
    verdict = REPRODUCED
  elif sum(g) >= sum(p):
    verdict = NOT_REPRODUCED
  else:
    verdict = INCONCLUSIVE
  return Verdict(verdict, SPIKES_REMOVED_RULE, why, n=len(lrs))


def best_lr(losses: Mapping[float, float | None]) -> tuple[float, bool]:
  """(the LR of the lowest finite loss, whether it is an edge of the grid). A diverged or missing
  run is None or non-finite and never best."""
  finite = {lr: v for lr, v in losses.items() if v is not None and math.isfinite(v)}
  if not finite:
    raise ValueError('no probe run finished with a finite loss')
  lr = min(finite, key=finite.get)
  grid = sorted(losses)
  return lr, lr in (grid[0], grid[-1])


def settled_from(xs: Sequence[float], gaps: Sequence[float]) -> float | None:
  """The first x from which every later gap has the final gap's sign (None: no curve, or a final
  gap of exactly 0)."""
  if not len(gaps) or gaps[-1] == 0:
    return None
  sign = np.sign(gaps[-1])
  start = len(gaps) - 1
  while start > 0 and np.sign(gaps[start - 1]) == sign:
    start -= 1
  return xs[start]


MATCH_RULE = ('reproduced if every seed\'s value is within the tolerance of the reference; not '
              'reproduced if any seed\'s is not; inconclusive without a value or a reference')


def matches(values: Sequence[float], reference: float | None, tol: float,
            min_seeds: int = 1) -> Verdict:
  """An equality the design fixes (e.g. a converted model's step-0 loss equals its source's):
  every value within `tol` of `reference`."""
  values = [float(v) for v in values]
  if reference is None or not math.isfinite(reference):
    return Verdict(INCONCLUSIVE, MATCH_RULE, 'no reference value', n=len(values))
  if len(values) < min_seeds:
    return Verdict(INCONCLUSIVE, MATCH_RULE, f'{len(values)} of the {min_seeds} seeds needed',
                   n=len(values))
  diffs = [v - reference for v in values]
  worst = max(diffs, key=abs)
  why = (f'reference {reference:.6f}, differences ' + ', '.join(f'{d:+.2e}' for d in diffs)
         + f' (tolerance {tol:g})')
  verdict = REPRODUCED if all(abs(d) <= tol for d in diffs) else NOT_REPRODUCED
  return Verdict(verdict, MATCH_RULE, why, float(worst), None, len(values))
