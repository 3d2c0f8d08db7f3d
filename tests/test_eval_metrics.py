"""twotower.common.eval.metrics against values computed by hand from the metric formulas."""
import math

import pytest

from twotower.common.eval.metrics import DEFAULT_MEASURES, compute_metrics, per_query

QRELS = {
    "q1": {"d1": 2, "d2": 1, "d3": 0},  # graded
    "q2": {"d4": 1},
    "q3": {"d5": 1, "d6": 1},
    "q4": {"d7": 1},  # judged, but the run has nothing for it: counts as 0
}
RUN = {
    # ranks: x9 (unjudged), d2 (rel 1), d1 (rel 2), d3 (rel 0)
    "q1": {"x9": 0.9, "d2": 0.8, "d1": 0.7, "d3": 0.6},
    # the only relevant document at rank 12
    "q2": {**{f"n{i:02d}": 1.0 - i / 100 for i in range(11)}, "d4": 0.5},
    # one of two relevant documents, at rank 1
    "q3": {"d5": 3.0, "x1": 2.0},
    # not judged: ignored
    "q99": {"d1": 1.0},
}


def dcg(gains):
    return sum(g / math.log2(rank + 1) for rank, g in enumerate(gains, start=1))


def expected_per_query():
    # nDCG@10 with trec_eval's linear gain; ideal ranking = judged grades sorted descending
    ndcg = {
        "q1": dcg([0, 1, 2, 0]) / dcg([2, 1, 0]),
        "q2": 0.0,  # relevant document below rank 10
        "q3": dcg([1, 0]) / dcg([1, 1]),
        "q4": 0.0,
    }
    mrr = {"q1": 1 / 2, "q2": 0.0, "q3": 1.0, "q4": 0.0}
    # AP: mean over relevant documents of precision at their rank (0 for unretrieved ones)
    ap = {"q1": (1 / 2 + 2 / 3) / 2, "q2": (1 / 12) / 1, "q3": (1 / 1 + 0) / 2, "q4": 0.0}
    r10 = {"q1": 2 / 2, "q2": 0 / 1, "q3": 1 / 2, "q4": 0.0}
    r100 = {"q1": 1.0, "q2": 1.0, "q3": 1 / 2, "q4": 0.0}
    return {"nDCG@10": ndcg, "MRR@10": mrr, "MAP@100": ap, "R@10": r10, "R@100": r100,
            "R@1000": r100}


def test_per_query_values_match_hand_computation():
    got = per_query(QRELS, RUN)
    want = expected_per_query()
    assert set(got) == set(DEFAULT_MEASURES)
    for measure, by_query in want.items():
        assert set(got[measure]) == set(QRELS), measure  # every judged query, no others
        for qid, value in by_query.items():
            assert got[measure][qid] == pytest.approx(value, abs=1e-9), (measure, qid)


def test_means_are_over_all_judged_queries():
    got = compute_metrics(QRELS, RUN)
    for measure, by_query in expected_per_query().items():
        assert got[measure] == pytest.approx(sum(by_query.values()) / 4, abs=1e-9), measure


def test_alias_names_and_subsets():
    a = compute_metrics(QRELS, RUN, ["RR@10", "AP@100"])
    b = compute_metrics(QRELS, RUN, ["MRR@10", "MAP@100"])
    assert a == b and list(a) == ["MRR@10", "MAP@100"]
    # other ir_measures names pass through: P@2 of q1 is 1/2, q3 is 1/2, q2 and q4 are 0
    assert compute_metrics(QRELS, RUN, ["P@2"])["P@2"] == pytest.approx((0.5 + 0 + 0.5 + 0) / 4)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown metric 'nope@3'"):
        compute_metrics(QRELS, RUN, ["nope@3"])
    with pytest.raises(ValueError, match="qrels are empty"):
        compute_metrics({}, RUN)
