"""95% confidence intervals for every number the evaluation reports.

* Per-image measures (a share of images, a mean, a median, a quantile over images): a
  percentile bootstrap over images, :func:`bootstrap_interval`, with a fixed seed, so that the
  same data give the same interval.
* Measures that depend on a random split or initialisation (linear probes): the mean over seeds
  with a Student-t interval, :func:`seed_interval`, as the paper reports its probes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import InvalidArgumentError

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
Interval = tuple[float, float]

#: Two-sided 95% critical values of Student's t by degrees of freedom (1..30); beyond, the normal's 1.96.
_T_95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean(values: np.ndarray) -> np.ndarray:
    return values.mean(axis=-1)


def median(values: np.ndarray) -> np.ndarray:
    return np.median(values, axis=-1)


def quantile(q: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda values: np.quantile(values, q, axis=-1)


def bootstrap_interval(values, statistic: Callable[[np.ndarray], np.ndarray] = mean, *,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Interval | None:
    """The percentile-bootstrap 95% interval of ``statistic`` over per-image ``values``.

    ``values`` is [N] (one number per image; ``statistic`` maps [R, N] to [R]: :func:`mean`,
    :func:`median`, :func:`quantile`) or [N, K] (several counts per image, for a ratio of sums such
    as a dataset-wide IoU; ``statistic`` maps [R, N, K] to [R]). Images are resampled with
    replacement, ``resamples`` times, from a generator seeded with ``seed``. Returns None for
    fewer than two images, where no interval can be had.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim not in (1, 2):
        raise InvalidArgumentError(f"bootstrap values must be [N] or [N, K], got shape {values.shape}")
    if len(values) < 2:
        return None
    if not np.isfinite(values).all():
        raise InvalidArgumentError("a bootstrap interval needs finite values")
    generator = np.random.default_rng(seed)
    estimates = np.empty(resamples)
    chunk = max(1, 2_000_000 // values[0].size // len(values))           # bounded memory for large sets
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        estimates[start:start + count] = statistic(values[generator.integers(0, len(values), (count, len(values)))])
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(estimates, [tail, 1 - tail])
    return float(low), float(high)


def seed_interval(values: Sequence[float], bounds: Interval | None = None) -> tuple[float, Interval | None]:
    """The mean of per-seed ``values`` and its Student-t 95% interval (None for one seed), clipped to
    ``bounds`` where the measure has them (an accuracy lies in [0, 1])."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(values) == 0:
        raise InvalidArgumentError("a seed interval needs at least one value")
    centre = float(values.mean())
    if len(values) < 2:
        return centre, None
    freedom = len(values) - 1
    critical = _T_95[freedom - 1] if freedom <= len(_T_95) else 1.96
    half = critical * float(values.std(ddof=1)) / math.sqrt(len(values))
    low, high = centre - half, centre + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return centre, (low, high)
