"""A label-free teacher that fuses lexical and dense relevance (teacher.kind=fusion):

    t(q, d) = (1 - w) * minmax_q(BM25(q, d)) + w * minmax_q(<e(q), e(d)>)

each system's scores min-max normalised over the candidates of query q that the pool holds (its
positives, hard negatives, and the passages of negative queries), w = teacher.dense_weight: the
`wsum` fusion of twotower.common.eval.fusion (ranx's `fuse(method="wsum", norm="min-max")`), as
hybrid retrieval and hybrid mining use it, applied to a query's candidate list. Scores lie in
[0, 1]; a query whose candidates a system scores alike gets 1.0 from it for each.

Why: on a corpus where BM25 beats the dense start model (SciFact: 0.686 vs 0.645 nDCG@10) and
the two fused beat both (0.732, docs/results.md), the fusion is a teacher stronger than the
student with no labels and no cross-encoder -- GPL's recipe (Wang et al., NAACL 2022: pseudo-
queries, mined candidates, Margin-MSE to a teacher) with this fusion in place of its
cross-encoder, and the dense-imitates-sparse idea of Spar (Chen et al., Findings of EMNLP 2022).

BM25 (common/eval/bm25.py, the Lucene variant) indexes the pool's documents (the cached corpus
table when the pool has one, saved and reused) and scores the given candidates only; the dense
scores are those of a bi_encoder Teacher of teacher.model (cached in the teacher's sqlite file).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from twotower.common.eval.bm25 import BM25Index
from twotower.common.eval.fusion import weighted_sum
from twotower.finetune.args import TeacherArgs
from twotower.finetune.teacher import Teacher

log = logging.getLogger("twotower.finetune")


class FusionTeacher:
    """fill_pool(pool, pairs) as Teacher's, scoring each query's candidates together."""

    def __init__(self, args: TeacherArgs, cache_path: str | Path | None = None,
                 device="cpu", key: str = "teacher.model"):
        self.args = args
        self.dense = Teacher(dataclasses.replace(args, kind="bi_encoder"), cache_path, device, key)
        self._bm25: BM25Index | None = None

    @property
    def computed(self) -> int:
        return self.dense.computed

    @property
    def cache_hits(self) -> int:
        return self.dense.cache_hits

    def _index(self, pool) -> BM25Index:
        if self._bm25 is None:
            docs = pool.docs
            corpus = docs.table if docs.table is not None else [
                {"id": d, "text": docs[d]} for d in docs.ids]
            self._bm25 = BM25Index(corpus)
        return self._bm25

    def fill_pool(self, pool, pairs: Sequence[Tuple[str, str]]) -> int:
        """Teacher scores for the pairs the pool lacks; a query with any such pair has all of its
        pairs in `pairs` scored (its min-max needs them), and only the missing ones written (the
        recipe refuses data.teacher_scores beside this teacher: no other scale enters the pool).
        Returns how many were written."""
        missing = [(q, p) for q, p in pairs if p not in pool.teacher.get(q, {})]
        if not missing:
            return 0
        wanted = {q for q, _ in missing}
        candidates: Dict[str, List[str]] = {}
        for q, p in dict.fromkeys(pairs):
            if q in wanted:
                candidates.setdefault(q, []).append(p)
        qids = list(candidates)
        flat = [(q, p) for q in qids for p in candidates[q]]
        dense_scores = self.dense.score([pool.queries[q] for q, _ in flat],
                                        [pool.docs[p] for _, p in flat])
        dense: Dict[str, Dict[str, float]] = {}
        for (q, p), s in zip(flat, dense_scores):
            dense.setdefault(q, {})[p] = float(s)
        lexical = self._index(pool).score_candidates(qids, [pool.queries[q] for q in qids],
                                                     candidates)
        fused = weighted_sum([lexical, dense], [1.0 - self.args.dense_weight,
                                                self.args.dense_weight])
        for q, p in missing:
            pool.teacher.setdefault(q, {})[p] = fused[q][p]
        log.info("fusion teacher: %d queries' candidates scored by BM25 and %s (dense weight %s)",
                 len(qids), self.args.model, self.args.dense_weight)
        return len(missing)

    def close(self) -> None:
        self.dense.close()
