"""Retrieval metrics through ir_measures (pytrec_eval / official MS MARCO code underneath).

Default measures, reported under the names used in papers and the README:

    nDCG@10   ir_measures nDCG@10 (pytrec_eval ndcg_cut_10): graded relevance with *linear* gain
              (gain = qrel score, trec_eval's convention, not 2^rel - 1), log2 discount, ideal DCG
              from all judged documents of the query.
    MRR@10    ir_measures RR@10 (official MS MARCO eval code): 1 / rank of the first document with
              relevance >= 1 within the top 10, else 0.
    MAP@100   ir_measures AP@100 (pytrec_eval map_cut_100): average precision over the top 100,
              normalised by the number of relevant documents of the query.
    R@k       ir_measures R@k (pytrec_eval recall_k): relevant documents in the top k / all relevant
              documents of the query.

Which queries count: every query id present in the qrels (including a query whose judgements are
all 0, which scores 0 everywhere). A judged query that has no ranked document in the run counts as
0. Run queries that are not in the qrels are ignored. The mean is over the judged queries. This is
what `trec_eval -c` and BEIR's pytrec_eval-based EvaluateRetrieval report, with one difference:
BEIR's EvaluateRetrieval.evaluate has an `ignore_identical_ids` option (on by default) that drops
a retrieved document whose id equals the query id (needed for ArguAna/Quora, where queries are
also corpus documents). SciFact's query and document ids never collide that way, so we do not do
it; for corpora that need it, remove such documents from the run before calling these functions.

Ties (equal scores) are ordered by the libraries: pytrec_eval by document id descending, the
MS MARCO RR code by document id ascending. Dense float scores practically never tie; only
duplicate documents can.
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping, Sequence

import ir_measures

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]

# reported name -> ir_measures measure string
DEFAULT_MEASURES: Dict[str, str] = {
    "nDCG@10": "nDCG@10",
    "MRR@10": "RR@10",
    "MAP@100": "AP@100",
    "R@10": "R@10",
    "R@100": "R@100",
    "R@1000": "R@1000",
}
# names people also write; both spellings are accepted on input
_ALIASES = {"MRR": "RR", "MAP": "AP", "Recall": "R", "NDCG": "nDCG", "ndcg": "nDCG"}


def _display_name(measure_str: str) -> str:
    for shown, ir_name in DEFAULT_MEASURES.items():
        if ir_name == measure_str:
            return shown
    return measure_str


def resolve_measures(names: Iterable[str] | None = None) -> Dict[str, object]:
    """Map measure names ("nDCG@10", "MRR@10" or "RR@10", "R@100", ...) to ir_measures objects,
    keyed by the reported name. Unknown names raise ValueError naming them."""
    if names is None:
        names = list(DEFAULT_MEASURES)
    resolved: Dict[str, object] = {}
    for name in names:
        base, sep, rest = str(name).partition("@")
        ir_name = _ALIASES.get(base, base) + sep + rest
        try:
            measure = ir_measures.parse_measure(ir_name)
        except Exception as err:  # ir_measures raises assorted types for bad names
            raise ValueError(
                f"unknown metric '{name}' (known e.g. {', '.join(DEFAULT_MEASURES)}; any "
                f"ir_measures name works): {err}"
            ) from None
        resolved[_display_name(str(measure))] = measure
    return resolved


def _check_inputs(qrels: Qrels, run: Run) -> None:
    if not qrels:
        raise ValueError("qrels are empty: there is no judged query to evaluate")
    for qid, docs in run.items():
        if not isinstance(docs, Mapping):
            raise TypeError(
                f"run[{qid!r}] must be a dict docid -> score, got {type(docs).__name__}"
            )


def per_query(
    qrels: Qrels, run: Run, measures: Iterable[str] | None = None
) -> Dict[str, Dict[str, float]]:
    """{reported measure name: {qid: value}} for every query id in the qrels (0 when the run has
    nothing for it)."""
    _check_inputs(qrels, run)
    resolved = resolve_measures(measures)
    name_of = {str(m): shown for shown, m in resolved.items()}
    # ir_measures wants plain dicts of str -> int / float
    qrels_plain = {str(q): {str(d): int(r) for d, r in docs.items()} for q, docs in qrels.items()}
    run_plain = {
        str(q): {str(d): float(s) for d, s in docs.items()}
        for q, docs in run.items()
        if str(q) in qrels_plain and docs
    }
    values: Dict[str, Dict[str, float]] = {shown: {} for shown in resolved}
    for metric in ir_measures.iter_calc(list(resolved.values()), qrels_plain, run_plain):
        values[name_of[str(metric.measure)]][metric.query_id] = float(metric.value)
    # the providers already emit 0 for judged queries missing from the run; make it a guarantee
    for shown in values:
        for qid in qrels_plain:
            values[shown].setdefault(qid, 0.0)
    return values


def aggregate(per_query_values: Mapping[str, Mapping[str, float]]) -> Dict[str, float]:
    """Mean over queries of each measure."""
    return {
        name: (sum(by_q.values()) / len(by_q) if by_q else 0.0)
        for name, by_q in per_query_values.items()
    }


def compute_metrics(
    qrels: Qrels, run: Run, measures: Sequence[str] | None = None
) -> Dict[str, float]:
    """Mean of each measure over the judged queries (see the module docstring for definitions)."""
    return aggregate(per_query(qrels, run, measures))
