"""MS MARCO layouts, teacher scores and TREC runs."""

import gzip
import json
import os
import pickle

import numpy as np
import pytest

from tests.fixtures_data import at, rows, write_bytes, write_jsonl, write_text, write_tsv
from twotower.common.data import (DataError, SkipReport, check_teacher_scores, column,
                                  hard_negative_pairs, load_hard_negatives, load_msmarco_collection,
                                  load_msmarco_queries, load_qrels, load_run, load_teacher_scores,
                                  load_triples, write_run)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hf_cache"


# ------------------------------------------------------------- collection, queries, triples
def test_collection_and_queries_round_trip(tmp_path, cache):
    passages = [(17474, "Invitation for a party."), (29360, "Sherlock Holmes.")]
    ds = load_msmarco_collection(write_tsv(tmp_path / "collection.tsv", passages), cache_dir=cache)
    assert rows(ds) == [{"id": str(p), "title": "", "text": t} for p, t in passages]
    queries = [(22479, "are florida mangroves protected"), (22882, "are herpes contagious")]
    ds = load_msmarco_queries(write_tsv(tmp_path / "queries.dev.tsv", queries), cache_dir=cache)
    assert rows(ds) == [{"id": str(q), "text": t} for q, t in queries]


def test_collection_with_title_column_is_rejected(tmp_path, cache):
    path = write_tsv(tmp_path / "collection.tsv", [(1, "text", "title")])
    with pytest.raises(DataError, match=at(path, 1) + "expected 2 tab-separated columns, got 3"):
        load_msmarco_collection(path, cache_dir=cache)


def test_triples_round_trip_and_errors(tmp_path, cache):
    triples = [("q one", "good passage", "bad passage"), ("q two", "p+", "p-")]
    ds = load_triples(write_tsv(tmp_path / "triples.train.tsv", triples), cache_dir=cache)
    assert rows(ds) == [dict(zip(("query", "positive", "negative"), t)) for t in triples]
    short = write_text(tmp_path / "short.tsv", "q\tpos\tneg\nq\tpos\n")
    with pytest.raises(DataError, match=at(short, 2) + "expected 3 tab-separated columns, got 2"):
        load_triples(short, cache_dir=cache)
    blank = write_text(tmp_path / "blank.tsv", "q\t \tneg\n")
    with pytest.raises(DataError, match=at(blank, 1) + "empty or whitespace-only text in field "
                                                       "'positive'"):
        load_triples(blank, cache_dir=cache)


# --------------------------------------------------------------------------- hard negatives
HARD = [
    {"qid": 1, "pos": [10], "neg": {"bm25": [11, 12, 13], "ce": [12, 14]}},
    {"qid": 2, "pos": [20, 21], "neg": {"bm25": [22], "ce": []}},
]


def test_hard_negatives_flattening(tmp_path, cache):
    ds = load_hard_negatives(write_jsonl(tmp_path / "hn.jsonl", HARD), cache_dir=cache)
    assert rows(ds) == [
        {"qid": "1", "pos": ["10"], "neg": ["11", "12", "13", "14"],
         "neg_system": ["bm25", "bm25", "bm25", "ce"]},
        {"qid": "2", "pos": ["20", "21"], "neg": ["22"], "neg_system": ["bm25"]}]
    assert hard_negative_pairs(ds) == [("1", "10"), ("1", "11"), ("1", "12"), ("1", "13"),
                                       ("1", "14"), ("2", "20"), ("2", "21"), ("2", "22")]


def test_hard_negatives_system_selection(tmp_path, cache):
    path = write_jsonl(tmp_path / "hn.jsonl", HARD)
    ds = load_hard_negatives(path, systems=["ce", "bm25"], cache_dir=cache)
    assert ds[0]["neg"] == ["12", "14", "11", "13"]
    assert ds[0]["neg_system"] == ["ce", "ce", "bm25", "bm25"]
    assert load_hard_negatives(path, systems=["ce"], cache_dir=cache)[1]["neg"] == []
    expected = r"negative system\(s\) \['bm26'\] never appear in the file; systems present: "
    with pytest.raises(DataError, match=at(path) + expected + r"\['bm25', 'ce'\]"):
        load_hard_negatives(path, systems=["bm26"], cache_dir=cache)


@pytest.mark.parametrize("line,message", [
    ({"qid": 3, "pos": [], "neg": {}}, "query '3' has no positives"),
    ({"qid": 3, "pos": [30], "neg": [31]}, r"field 'neg' must be an object \{system: \[pids\]\}"),
    ({"qid": 3, "pos": 30, "neg": {}}, "field 'pos' must be a list of ids, got int"),
    ({"qid": 3, "pos": [30]}, "missing field 'neg'"),
    ({"qid": 1, "pos": [30], "neg": {}}, "duplicate query id '1': also on line 1"),
])
def test_bad_hard_negative_lines(tmp_path, cache, line, message):
    path = write_jsonl(tmp_path / "hn.jsonl", HARD + [line])
    with pytest.raises(DataError, match=at(path, 3) + message):
        load_hard_negatives(path, cache_dir=cache)
    report = SkipReport()
    assert load_hard_negatives(path, on_error="skip", report=report, cache_dir=cache).num_rows == 2
    assert report.total == 1


# ---------------------------------------------------------------------------- teacher scores
SCORES = {"1": {"10": 9.5, "11": -1.25}, "2": {"20": 3.0}}


def test_teacher_scores_jsonl_layouts(tmp_path):
    flat = write_jsonl(tmp_path / "flat.jsonl", [{"qid": int(q), "pid": int(p), "score": s}
                                                for q, d in SCORES.items() for p, s in d.items()])
    nested = write_jsonl(tmp_path / "nested.jsonl", [{"qid": q, "scores": d}
                                                    for q, d in SCORES.items()])
    assert load_teacher_scores(flat) == SCORES
    assert load_teacher_scores(nested) == SCORES


def test_teacher_scores_public_pickle_layout(tmp_path):
    raw = {int(q): {int(p): np.float32(s) for p, s in d.items()} for q, d in SCORES.items()}
    plain = write_bytes(tmp_path / "ce-scores.pkl", pickle.dumps(raw))
    packed = write_bytes(tmp_path / "ce-scores.pkl.gz", gzip.compress(pickle.dumps(raw)))
    assert load_teacher_scores(plain) == SCORES
    assert load_teacher_scores(packed) == SCORES


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_teacher_pickle_refuses_code(tmp_path):
    path = write_bytes(tmp_path / "evil.pkl", pickle.dumps({1: {2: _Evil()}}))
    with pytest.raises(DataError, match=at(path) + r"cannot read the pickle \(UnpicklingError: "
                                                   "refusing to load"):
        load_teacher_scores(path)


@pytest.mark.parametrize("lines,line_no,message", [
    ([{"qid": 1, "pid": 2, "score": 1.0}, {"qid": 1, "pid": 2, "score": 2.0}], 2,
     "duplicate score for query '1', passage '2': also on line 1"),
    ([{"qid": 1, "pid": 2, "score": "high"}], 1, "score 'high' is not a number"),
    ([{"qid": 1, "pid": 2, "score": float("nan")}], 1, "score nan is not a finite number"),
    ([{"qid": 1, "scores": [1, 2]}], 1, r"field 'scores' must be an object \{pid: score\}"),
    ([{"qid": 1, "pid": 2}], 1, "missing field 'score'"),
])
def test_bad_teacher_score_lines(tmp_path, lines, line_no, message):
    path = write_text(tmp_path / "scores.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(DataError, match=at(path, line_no) + message):
        load_teacher_scores(path)


def test_check_teacher_scores_names_missing_pairs(tmp_path):
    check_teacher_scores(SCORES, [("1", "10"), ("2", "20")])  # complete: no error
    needed = [("1", "10"), ("1", "12"), ("3", "30"), ("2", "20"), ("2", "21")]
    source = tmp_path / "scores.jsonl"
    with pytest.raises(DataError, match=at(source) + r"3 of 5 required \(qid, pid\) pairs have no "
                       r"teacher score; first missing: \('1', '12'\), \('3', '30'\)"):
        check_teacher_scores(SCORES, needed, source=source, max_listed=2)


# ------------------------------------------------------------------------------ TREC runs
def test_run_round_trip_is_exact_and_ranked(tmp_path):
    run = {"q1": {"d1": 0.1 + 0.2, "d2": np.float32(2.5), "d3": -1e-9}, "q2": {"d9": 7.0}}
    path = write_run(run, tmp_path / "runs" / "run.trec", tag="my-model")
    lines = path.read_text().splitlines()
    assert lines[:3] == ["q1 Q0 d2 1 2.5 my-model", "q1 Q0 d1 2 0.30000000000000004 my-model",
                         "q1 Q0 d3 3 -1e-09 my-model"]
    assert load_run(path) == {q: {d: float(s) for d, s in docs.items()} for q, docs in run.items()}
    assert load_run(write_run(run, tmp_path / "top1.trec", depth=1)) == {"q1": {"d2": 2.5},
                                                                          "q2": {"d9": 7.0}}


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    path = write_run({"q": {"d": 1.0}}, tmp_path / "run.trec")
    before = path.read_text()
    with pytest.raises(DataError, match="score nan of query 'q2', document 'd' is not finite"):
        write_run({"q1": {"d": 1.0}, "q2": {"d": float("nan")}}, path)
    with pytest.raises(DataError, match="document id 'a b' cannot be written"):
        write_run({"q": {"a b": 1.0}}, path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.trec"]


@pytest.mark.parametrize("content,line_no,message", [
    ("q Q0 d 1 1.0 t\nq Q0 e 2 0.5\n", 2, r"expected 6 columns \(TREC run: qid Q0 docid rank "
                                          r"score tag\), got 5"),
    ("q Q0 d 1 high t\n", 1, "score 'high' is not a number"),
    ("q Q0 d one 1.0 t\n", 1, "rank 'one' is not an integer"),
    ("q Q0 d 1 1.0 t\nq Q0 d 2 0.5 t\n", 2, "document 'd' listed twice for query 'q': also on "
                                            "line 1"),
])
def test_bad_run_lines(tmp_path, content, line_no, message):
    path = write_text(tmp_path / "run.trec", content)
    with pytest.raises(DataError, match=at(path, line_no) + message):
        load_run(path)


def test_run_skipping_is_counted(tmp_path):
    path = write_text(tmp_path / "run.trec", "q Q0 d 1 1.0 t\nq Q0 e 2 x t\nq Q0 f 3 0.5 t\n")
    report = SkipReport()
    assert load_run(path, on_error="skip", report=report) == {"q": {"d": 1.0, "f": 0.5}}
    assert report.counts == {(str(path), "bad score"): 1}


# ---------------------------------------------------------------------- real shared data
def test_shared_msmarco_sample(shared_data_root, cache):
    root = shared_data_root / "msmarco_sample"
    collection = load_msmarco_collection(root / "collection.tsv", cache_dir=cache)
    queries = load_msmarco_queries(root / "queries.tsv", cache_dir=cache)
    qrels = load_qrels(root / "qrels.tsv")
    assert collection.num_rows == 3969 and queries.num_rows == 200
    pids, qids = set(column(collection, "id")), set(column(queries, "id"))
    assert all(pid in pids for docs in qrels.values() for pid in docs)  # every qrels pid
    assert set(qrels) <= qids
    # the same check, as the loader performs it
    assert load_qrels(root / "qrels.tsv", query_ids=qids, doc_ids=pids) == qrels
    negatives = load_hard_negatives(root / "hard_negatives.jsonl", cache_dir=cache)
    assert negatives.num_rows == 200 and set(column(negatives, "qid")) <= qids
    assert {s for row in column(negatives, "neg_system") for s in row} == {"bm25"}
    assert all(p in pids for _, p in hard_negative_pairs(negatives))
    assert load_triples(root / "triples.tsv", cache_dir=cache).num_rows == 1000
    run = load_run(root / "bm25_top20.trec")
    assert len(run) == 200 and all(len(docs) == 20 for docs in run.values())
