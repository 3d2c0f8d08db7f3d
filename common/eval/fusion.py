"""Fusion of ranked runs (hybrid BM25 + dense retrieval), as ranx defines its methods.

    rrf:  score(d) = sum_r 1 / (k + rank_r(d))          Cormack, Clarke & Büttcher, SIGIR 2009
          (rank from 1; a run that did not retrieve d adds nothing; k = 60 in the paper)
    wsum: score(d) = sum_r w_r * minmax_r(d)            a convex combination of scores, each run
          min-max normalised per query (max -> 1, min -> 0; a run that did not retrieve d adds 0)

These are ranx's `fuse(method="rrf")` and `fuse(method="wsum", norm="min-max")` (Bassani & Romelli,
"ranx.fuse", CIKM 2022). ranx itself is not a dependency: importing it compiles numba kernels for
~35 s per process here, for what is a few lines; tests/test_eval_fusion.py checks these against
values ranx 0.3.21 printed for the same runs, and against a slow per-document re-computation.
Ties in rank (equal scores) are broken by document id, as the runs are written.
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

from twotower.common.data import ranked_ids

Run = Dict[str, Dict[str, float]]
METHODS = ("rrf", "wsum")


def rrf(runs: Sequence[Mapping[str, Mapping[str, float]]], k: int = 60) -> Run:
    fused: Run = {}
    for run in runs:
        for qid, docs in run.items():
            target = fused.setdefault(qid, {})
            for rank, doc in enumerate(ranked_ids(docs), start=1):
                target[doc] = target.get(doc, 0.0) + 1.0 / (k + rank)
    return fused


def min_max(docs: Mapping[str, float]) -> dict[str, float]:
    """(s - min) / (max - min) per query; a query whose scores are all equal gets 1.0 for each
    (the formula divides by zero there; a single retrieved document is that run's best)."""
    if not docs:
        return {}
    low, high = min(docs.values()), max(docs.values())
    span = high - low
    return {d: (s - low) / span if span > 0 else 1.0 for d, s in docs.items()}


def weighted_sum(runs: Sequence[Mapping[str, Mapping[str, float]]],
                 weights: Sequence[float]) -> Run:
    if len(weights) != len(runs):
        raise ValueError(f"{len(runs)} runs need {len(runs)} weights, got {list(weights)}")
    fused: Run = {}
    for run, weight in zip(runs, weights):
        for qid, docs in run.items():
            target = fused.setdefault(qid, {})
            for doc, score in min_max(docs).items():
                target[doc] = target.get(doc, 0.0) + weight * score
    return fused


def fuse(sparse: Mapping, dense: Mapping, method: str = "rrf", dense_weight: float = 0.5,
         rrf_k: int = 60, depth: int | None = None) -> Run:
    """BM25 and dense runs fused; `dense_weight` (wsum only) in [0, 1]; the top `depth` kept."""
    if method == "rrf":
        fused = rrf([sparse, dense], k=rrf_k)
    elif method == "wsum":
        if not 0.0 <= dense_weight <= 1.0:
            raise ValueError(f"the dense weight must be in [0, 1], got {dense_weight}")
        fused = weighted_sum([sparse, dense], [1.0 - dense_weight, dense_weight])
    else:
        raise ValueError(f"fusion must be one of {METHODS}, got {method!r}")
    if depth:
        fused = {q: {d: docs[d] for d in ranked_ids(docs)[:depth]} for q, docs in fused.items()}
    return fused
