"""Paired significance tests between two systems scored on the same queries.

Both tests take per-query values of one measure (twotower.common.eval.metrics.per_query) for the same query
ids and test "no difference in the mean". They are the two tests Smucker, Allan & Carterette
(2007, "A comparison of statistical significance tests for information retrieval evaluation")
recommend and that agree with each other on IR data; ReContriever (Lei et al. 2023) marks gains
with a paired t-test.

- Paired t-test: scipy.stats.ttest_rel, two-sided. scipy returns nan when every difference is
  the same; we define p = 1 when all differences are zero (identical systems: no evidence of a
  difference) and p = 0 when all are the same non-zero value (scipy's own limit, t = ±inf).
- Randomisation (sign-flip) test: under the null hypothesis the two systems' scores of a query
  are exchangeable, so each per-query difference keeps or flips its sign with probability 1/2.
  Two-sided statistic |mean difference|. With 2^n <= n_permutations every sign vector is
  enumerated (exact p); otherwise n_permutations random sign vectors from a seeded generator and
  p = (1 + #{|flipped mean| >= |observed mean|}) / (1 + n_permutations), which counts the
  observed assignment and is never 0 (Phipson & Smyth 2010). Identical scores give p = 1.
No correction for multiple comparisons is applied (one test per run x dataset x measure).
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np
from scipy import stats

# relative slack when comparing a permuted mean with the observed one: the identity sign
# vector must count as "at least as extreme" despite summation-order rounding
_REL_TOL = 1e-9


@dataclass
class SignificanceArgs:
    n_permutations: int = 10000
    seed: int = 0
    alpha: float = 0.05  # p below this is marked significant


@dataclass
class PairedResult:
    n_queries: int
    mean_a: float
    mean_b: float
    p_ttest: float
    p_randomization: float

    @property
    def difference(self) -> float:
        """mean(b) - mean(a)."""
        return self.mean_b - self.mean_a

    def to_json(self) -> dict:
        return {**asdict(self), "difference": self.difference}


def paired_arrays(a: Mapping[str, float], b: Mapping[str, float],
                  names: tuple[str, str] = ("a", "b")) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Align two {query id: value} maps; they must cover the same queries."""
    only_a, only_b = set(a) - set(b), set(b) - set(a)
    if only_a or only_b:
        raise ValueError(
            f"paired tests need the same queries: {len(only_a)} only in {names[0]} "
            f"(e.g. {sorted(only_a)[:3]}), {len(only_b)} only in {names[1]} "
            f"(e.g. {sorted(only_b)[:3]}); were they evaluated on different query samples?")
    ids = sorted(a)
    return ids, np.array([a[q] for q in ids], float), np.array([b[q] for q in ids], float)


def paired_t_test(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided p of the paired t-test; 1 for identical scores, 0 for a constant non-zero shift,
    1 with fewer than 2 queries (nothing to test)."""
    diffs = np.asarray(b, float) - np.asarray(a, float)
    if len(diffs) < 2 or not diffs.any():
        return 1.0
    if np.ptp(diffs) == 0:
        return 0.0
    return float(stats.ttest_rel(b, a).pvalue)


def randomization_test(a: np.ndarray, b: np.ndarray, n_permutations: int = 10000, seed: int = 0,
                       exact: bool | None = None, chunk: int = 1000) -> float:
    """Two-sided paired sign-flip randomisation test of mean(b) - mean(a) (see module docstring).
    `exact=None` enumerates all 2^n sign vectors when that is no more than `n_permutations`."""
    diffs = np.asarray(b, float) - np.asarray(a, float)
    n = len(diffs)
    if n == 0:
        raise ValueError("randomisation test on zero queries")
    observed = abs(diffs.mean())
    threshold = observed - _REL_TOL * max(observed, np.abs(diffs).mean(), 1e-300)
    if exact is None:
        exact = n < 63 and 2 ** n <= n_permutations
    if exact:
        if n > 16:
            raise ValueError(f"exact enumeration of 2^{n} sign vectors is too large")
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        return float(np.mean(np.abs(signs @ diffs) / n >= threshold))
    rng = np.random.default_rng(seed)
    extreme = 0
    for start in range(0, n_permutations, chunk):
        size = min(chunk, n_permutations - start)
        signs = rng.integers(0, 2, size=(size, n)) * 2.0 - 1.0
        extreme += int(np.sum(np.abs(signs @ diffs) / n >= threshold))
    return (1 + extreme) / (1 + n_permutations)


def compare_paired(a: Mapping[str, float], b: Mapping[str, float],
                   args: SignificanceArgs | None = None,
                   names: tuple[str, str] = ("a", "b")) -> PairedResult:
    """Both tests on two {query id: value} maps of one measure."""
    args = args or SignificanceArgs()
    _, x, y = paired_arrays(a, b, names)
    return PairedResult(
        n_queries=len(x), mean_a=float(x.mean()) if len(x) else 0.0,
        mean_b=float(y.mean()) if len(y) else 0.0, p_ttest=paired_t_test(x, y),
        p_randomization=randomization_test(x, y, args.n_permutations, args.seed) if len(x) else 1.0)
