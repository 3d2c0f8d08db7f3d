"""Scoring queries against bm25s' eager index a block of documents at a time: top-k search whose
cost grows with the query's postings, and the scores of given documents.

bm25s (0.3, numpy backend) scores a query by adding each query term's postings into an array of
every document's score (`np.add.at`), then takes the top k by `argpartition` over all documents.
Per query that is work over the whole collection, and random writes into an array that at
MS MARCO's 8.8 M passages (35 MB of float32) no longer stays in cache: 25 ms a query at 1 M
passages, 301 ms at 8.8 M (x11.8 for x8.8; docs/results.md, issue #23).

Here the documents are taken in blocks of `BLOCK` rows (a 1 MB float32 buffer, reused, that stays
in cache). Each query term's postings are the documents' rows in ascending order (as
bm25_build.write_index writes them and bm25s' own index builds them; `check_ascending`), so
binary search cuts them at the block bounds. In a block, the postings of the query's terms (in
query order, a repeated term twice, as bm25s) are added into the buffer, each touched document's
sum is read once (a second read finds the NaN left by the first), the buffer is reset where it
was touched, and the block's best k are kept. Per query: work linear in its postings plus the
number of blocks, nothing allocated per document of the collection.

The sums are bm25s' own: the same float32 additions in the same order, and for bm25l / bm25+ the
same constant for the query's non-occurring terms, added after. Documents that share no term
with the query are not candidates (bm25s ranks them too, at score 0, or at that constant for
bm25l / bm25+). Ties are broken by the lower row, so a run does not depend on the partition
algorithm.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

BLOCK = 1 << 18  # documents a block: 1 MB of float32, within a core's L2 (measured in #23)


def check_ascending(scores: Dict[str, np.ndarray]) -> bool:
    """Whether every term's postings list its documents in ascending row order."""
    indices, indptr = scores["indices"], scores["indptr"]
    if len(indices) < 2:
        return True
    rises = np.diff(indices.astype(np.int64)) > 0
    starts = indptr[1:-1]  # a term's first posting may be below its predecessor's last
    starts = starts[(starts > 0) & (starts < len(indices))]
    rises[starts - 1] = True
    return bool(rises.all())


def best_k(rows: np.ndarray, values: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """The k largest values with their rows, by descending value, ties by ascending row."""
    if len(values) > k:
        kth = np.partition(values, len(values) - k)[len(values) - k]
        above = np.flatnonzero(values > kth)
        tied = np.flatnonzero(values == kth)
        tied = tied[np.argsort(rows[tied], kind="stable")[:k - len(above)]]
        keep = np.concatenate([above, tied])
        rows, values = rows[keep], values[keep]
    order = np.lexsort((rows, -values))
    return rows[order], values[order]


class PostingScorer:
    """Top-k search and candidate scores over bm25s' score matrix (CSC: a column of document rows
    and precomputed scores per term), read in place (memory-mapped when saved)."""

    def __init__(self, scores: Dict[str, np.ndarray], nonoccurrence: Optional[np.ndarray],
                 block: int = BLOCK):
        self.data, self.indices = scores["data"], scores["indices"]
        self.indptr, self.num_docs = scores["indptr"], int(scores["num_docs"])
        self.nonoccurrence = nonoccurrence
        self._buffer = np.zeros(min(block, max(self.num_docs, 1)), dtype=self.data.dtype)
        self._bounds = np.append(np.arange(0, self.num_docs, block), self.num_docs)

    def _terms(self, term_ids: Sequence[int]) -> List[int]:
        # the token bm25s adds for empty queries has no column: it matches nothing
        return [int(t) for t in term_ids if 0 <= int(t) < len(self.indptr) - 1]

    def _constant(self, term_ids: Sequence[int]):
        """bm25l / bm25+: every document's score for the query's terms it does not contain."""
        if self.nonoccurrence is None or not len(term_ids):
            return self.data.dtype.type(0)
        return self.nonoccurrence[np.asarray(term_ids, dtype=np.int64)].sum()

    def top_k(self, term_ids: Sequence[int], k: int) -> Tuple[np.ndarray, np.ndarray]:
        """The k best documents sharing a term with the query: (rows, scores), best first."""
        terms = self._terms(term_ids)
        if not terms or k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=self.data.dtype)
        cuts = [int(self.indptr[t]) + np.searchsorted(
            self.indices[self.indptr[t]:self.indptr[t + 1]], self._bounds) for t in terms]
        buffer, found_rows, found_values = self._buffer, [], []
        for b in range(len(self._bounds) - 1):
            base, touched = int(self._bounds[b]), []
            for cut in cuts:
                lo, hi = cut[b], cut[b + 1]
                if hi > lo:
                    local = self.indices[lo:hi] - base
                    buffer[local] += self.data[lo:hi]
                    touched.append(local)
            if not touched:
                continue
            sums = []
            for local in touched:  # each document's sum once: later reads find NaN
                sums.append(buffer[local])
                buffer[local] = np.nan
            local, values = np.concatenate(touched), np.concatenate(sums)
            buffer[local] = 0
            first = ~np.isnan(values)
            rows, values = best_k(local[first].astype(np.int64) + base, values[first], k)
            found_rows.append(rows)
            found_values.append(values)
        if not found_rows:  # every term without postings (a column left empty)
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=self.data.dtype)
        rows, values = best_k(np.concatenate(found_rows), np.concatenate(found_values), k)
        return rows, values + self._constant(terms)

    def scores_at(self, term_ids: Sequence[int], rows: np.ndarray) -> np.ndarray:
        """The query's score of each of `rows` (as bm25s' get_scores at those rows)."""
        terms = self._terms(term_ids)
        rows = np.asarray(rows, dtype=np.int64)
        out = np.zeros(len(rows), dtype=self.data.dtype)
        for t in terms:
            lo, hi = int(self.indptr[t]), int(self.indptr[t + 1])
            column = self.indices[lo:hi]
            at = np.searchsorted(column, rows)
            hit = at < len(column)
            hit[hit] = column[at[hit]] == rows[hit]
            out[hit] += self.data[lo + at[hit]]
        return out + self._constant(terms)
