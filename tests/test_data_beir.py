"""BEIR folders and qrels (TREC / 3-column, header detection, unknown ids, skipping)."""

import pytest

from tests.fixtures_data import at, gzip_file, make_beir, write_text
from twotower.common.data import (DataError, RetrievalData, SkipReport, beir_splits, column,
                                  load_beir, load_corpus, load_qrels)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hf_cache"


def test_beir_folder_round_trip(tmp_path, cache):
    root = make_beir(tmp_path / "tiny")
    data = load_beir(root, "test", cache_dir=cache)
    assert isinstance(data, RetrievalData)
    assert (data.name, data.split) == ("tiny", "test")
    assert column(data.corpus, "id") == ["d1", "d2", "d3"]
    # only judged queries, in queries.jsonl order (qrels list q3 first)
    assert [dict(r) for r in data.queries] == [
        {"id": "q1", "text": "are mangroves protected"},
        {"id": "q3", "text": "can parents spank children"}]
    assert data.qrels == {"q3": {"d3": 1}, "q1": {"d1": 1, "d2": 0}}
    assert not data.report


def test_beir_gzipped_files(tmp_path, cache):
    root = make_beir(tmp_path / "tiny")
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        gzip_file(root / name)
        (root / name).unlink()
    data = load_beir(root, "test", cache_dir=cache)
    assert data.corpus.num_rows == 3 and data.queries.num_rows == 2
    assert data.qrels == {"q3": {"d3": 1}, "q1": {"d1": 1, "d2": 0}}


def test_missing_split_lists_available_ones(tmp_path, cache):
    root = make_beir(tmp_path / "tiny")
    assert beir_splits(root) == ["test"]
    with pytest.raises(DataError, match=at(root) + r"no qrels for split 'dev' \(qrels/dev.tsv\); "
                       "available splits: test"):
        load_beir(root, "dev", cache_dir=cache)


def test_missing_corpus_file(tmp_path, cache):
    root = make_beir(tmp_path / "tiny")
    (root / "corpus.jsonl").unlink()
    with pytest.raises(DataError, match=at(root) + r"BEIR folder has no corpus.jsonl"):
        load_beir(root, cache_dir=cache)


@pytest.mark.parametrize("bad_line,line_no,message", [
    ("q9\td1\t1", 3, "qrels name unknown query id 'q9' \\(not in the queries\\)"),
    ("q1\td9\t1", 3, "qrels name unknown document id 'd9' \\(not in the corpus\\)"),
])
def test_qrels_naming_unknown_ids(tmp_path, cache, bad_line, line_no, message):
    root = make_beir(tmp_path / "tiny", ["query-id\tcorpus-id\tscore", "q1\td1\t1", bad_line,
                                         "q3\td3\t2"])
    with pytest.raises(DataError, match=at(root / "qrels" / "test.tsv", line_no) + message):
        load_beir(root, cache_dir=cache)


def test_unknown_ids_counted_when_skipping(tmp_path, cache):
    root = make_beir(tmp_path / "tiny", ["q1\td1\t1", "q9\td1\t1", "q3\td9\t1", "q3\td3\t2"])
    data = load_beir(root, on_error="skip", cache_dir=cache)
    qrels_path = str(root / "qrels" / "test.tsv")
    assert data.qrels == {"q1": {"d1": 1}, "q3": {"d3": 2}}
    assert data.report.counts == {(qrels_path, "unknown query id"): 1,
                                  (qrels_path, "unknown document id"): 1}
    assert f"{qrels_path}: 1 x unknown query id (e.g. line 2)" in data.report.summary()


def test_one_report_collects_every_file(tmp_path, cache):
    root = make_beir(tmp_path / "tiny", ["q1\td1\t1", "q1\td1\t1"])
    write_text(root / "corpus.jsonl", (root / "corpus.jsonl").read_text() + "{broken\n")
    report = SkipReport()
    data = load_beir(root, on_error="skip", report=report, cache_dir=cache)
    assert data.report is report
    assert set(report.counts) == {(str(root / "corpus.jsonl"), "malformed JSON"),
                                  (str(root / "qrels" / "test.tsv"), "duplicate judgement")}


# ------------------------------------------------------------------------------ qrels
def test_qrels_trec_and_three_column_forms_agree(tmp_path):
    expected = {"1": {"10": 1, "11": 0}, "2": {"20": 2}}
    trec = write_text(tmp_path / "qrels.trec", "1 0 10 1\n1 0 11 0\n2 0 20 2\n")
    tabbed = write_text(tmp_path / "qrels.tsv", "1\t0\t10\t1\n1\t0\t11\t0\n2\t0\t20\t2\n")
    beir = write_text(tmp_path / "beir.tsv", "query-id\tcorpus-id\tscore\n1\t10\t1\n1\t11\t0\n"
                                             "2\t20\t2\n")
    bare = write_text(tmp_path / "bare.tsv", "1\t10\t1\n1\t11\t0\n2\t20\t2\n")
    for path in (trec, tabbed, beir, bare):
        assert load_qrels(path) == expected, path


@pytest.mark.parametrize("content,line_no,message", [
    ("1 0 10 1\n1 10 1\n", 2, r"expected 4 columns \(TREC: qid iteration docid relevance\), got 3"),
    ("1 10 1 x y\n", 1, r"expected 3 columns \(query-id corpus-id score\) or 4 columns"),
    ("q\td\tscore\nq1\td1\t0.5\n", 2, "relevance '0.5' is not an integer"),
    ("q1\td1\tx\nq1\td2\t1\n", 1, "relevance 'x' is not an integer"),  # not taken as a header
    ("1 0 10 1\n1 0 10 2\n", 2, "duplicate judgement for query '1', document '10': also on line 1"),
])
def test_bad_qrels(tmp_path, content, line_no, message):
    path = write_text(tmp_path / "qrels.tsv", content)
    with pytest.raises(DataError, match=at(path, line_no) + message):
        load_qrels(path)


def test_qrels_with_only_a_header_is_an_error(tmp_path):
    path = write_text(tmp_path / "qrels.tsv", "query-id\tcorpus-id\tscore\n")
    with pytest.raises(DataError, match=at(path) + "no valid records"):
        load_qrels(path)


# ---------------------------------------------------------------------- real shared data
def test_shared_scifact(shared_data_root, cache, monkeypatch):
    monkeypatch.setenv("TWOTOWER_DATA", str(shared_data_root))
    test = load_beir("scifact", "test", cache_dir=cache)  # by name, through $TWOTOWER_DATA
    assert test.corpus.num_rows == 5183
    assert test.queries.num_rows == 300 == len(test.qrels)
    assert sum(len(d) for d in test.qrels.values()) == 339
    train = load_beir(shared_data_root / "scifact", "train", cache_dir=cache)
    assert train.queries.num_rows == 809 == len(train.qrels)
    assert sum(len(d) for d in train.qrels.values()) == 919
    assert set(column(train.queries, "id")).isdisjoint(column(test.queries, "id"))
    assert not test.report and not train.report


def test_shared_wiki_corpus(shared_data_root, cache):
    wiki = load_corpus(shared_data_root / "wiki" / "wiki_summaries.jsonl", cache_dir=cache)
    assert wiki.num_rows == 10_033
    assert all(t.strip() for t in column(wiki, "title"))
