"""twotower.common.eval.bm25: ranking on a toy corpus and the Lucene BM25 formula recomputed by hand."""
import math
from pathlib import Path

import bm25s
import numpy as np
import pytest
from bm25s.tokenization import Tokenized

from twotower.common.eval import bm25 as B
from twotower.common.eval.bm25 import BM25Args, BM25Index, bm25_search
from twotower.common.eval.bm25_build import write_index
from twotower.common.eval.bm25_topk import PostingScorer, check_ascending

CORPUS = [
    {"id": "d0", "title": "Mangroves", "text": "Florida mangroves are protected by state law."},
    {"id": "d1", "title": "Herpes", "text": "Herpes viruses are contagious through contact."},
    {"id": "d2", "title": "Parenting",
     "text": "Some parents spank children; laws differ by state."},
    {"id": "d3", "title": "Cats", "text": "A cat runs after mice in the garden."},
    {"id": "d4", "title": "Garden", "text": "Gardens need water and sunlight."},
]


def test_exact_match_document_ranks_first():
    queries = [
        {"id": "q0", "text": "are florida mangroves protected"},
        {"id": "q1", "text": "herpes contagious"},
        {"id": "q2", "text": "running cats"},  # matches d3 only through stemming
    ]
    run = bm25_search(CORPUS, queries, k=10)
    top = {qid: max(docs, key=docs.get) for qid, docs in run.items()}
    assert top == {"q0": "d0", "q1": "d1", "q2": "d3"}
    # documents sharing no term are not returned (score 0)
    assert set(run["q1"]) == {"d1"}
    assert all(score > 0 for docs in run.values() for score in docs.values())


def test_stopword_only_query_returns_nothing():
    assert bm25_search(CORPUS, [{"id": "q", "text": "are the of"}], k=10) == {"q": {}}


def test_k_caps_the_run_and_is_capped_by_the_corpus():
    run = bm25_search(CORPUS, [{"id": "q", "text": "state garden laws"}], k=2)
    assert len(run["q"]) == 2
    run = bm25_search(CORPUS, [{"id": "q", "text": "state garden laws"}], k=1000)
    assert set(run["q"]) == {"d0", "d2", "d3", "d4"}


def test_score_equals_lucene_bm25_formula():
    # words chosen so that tokenising/stemming is the identity and no word is a stopword
    corpus = [
        {"id": "a", "title": "", "text": "apple banana apple"},
        {"id": "b", "title": "", "text": "banana cherry"},
        {"id": "c", "title": "", "text": "cherry cherry cherry durian"},
    ]
    args = BM25Args(k1=1.2, b=0.6)
    run = bm25_search(corpus, [{"id": "q", "text": "apple cherry"}], k=3, args=args)
    lengths = {"a": 3, "b": 2, "c": 4}
    tf = {"a": {"apple": 2}, "b": {"cherry": 1}, "c": {"cherry": 3}}
    df = {"apple": 1, "cherry": 2}
    n, avgdl = 3, sum(lengths.values()) / 3

    def lucene(doc):
        total = 0.0
        for term, f in tf[doc].items():
            idf = math.log(1 + (n - df[term] + 0.5) / (df[term] + 0.5))
            total += idf * f / (f + args.k1 * (1 - args.b + args.b * lengths[doc] / avgdl))
        return total

    assert set(run["q"]) == {"a", "b", "c"}
    for doc, score in run["q"].items():
        assert score == pytest.approx(lucene(doc), rel=1e-5), doc


def test_score_candidates_scores_only_candidates():
    index = BM25Index(CORPUS)
    full = index.search(["q"], ["state laws"], k=5)
    scored = index.score_candidates(["q", "other"], ["state laws", "cats"], {"q": ["d2", "d4"]})
    assert set(scored) == {"q"}
    assert set(scored["q"]) == {"d2", "d4"}
    assert scored["q"]["d2"] == pytest.approx(full["q"]["d2"])
    assert scored["q"]["d4"] == 0.0  # no shared term, but a candidate keeps its place
    with pytest.raises(KeyError, match="'zz' is not in the corpus"):
        index.score_candidates(["q"], ["state"], {"q": ["zz"]})


def test_long_bm25_steps_show_progress_without_flooding_a_log(capsys):
    """Not a terminal (a log, CI): the search says where it is in a line or two, not one line per
    query; progress=False says nothing."""
    corpus = [{"id": f"d{i}", "title": "", "text": f"document {i} about topic {i % 7}"}
              for i in range(50)]
    index = BM25Index(corpus)
    capsys.readouterr()
    index.search([f"q{i}" for i in range(200)], [f"topic {i % 7}" for i in range(200)], 10)
    lines = [x for x in capsys.readouterr().err.replace("\r", "\n").splitlines()
             if "BM25 search" in x]
    assert 1 <= len(lines) <= 3 and "200/200" in lines[-1]
    quiet = BM25Index(corpus, progress=False)
    quiet.search(["q"], ["topic 1"], 10)
    assert "BM25" not in capsys.readouterr().err


def _table_corpus(tmp_path, n=300):
    from twotower.common.data import load_corpus
    path = tmp_path / "corpus.jsonl"
    words = ["protein", "cell", "gene", "virus", "membrane", "signal", "tumour", "neuron"]
    path.write_text("".join(
        f'{{"_id": "d{i}", "title": "doc {i}", "text": "{words[i % 8]} {words[(i * 3) % 8]} '
        f'{words[(i * 5 + 1) % 8]} number{i}"}}\n' for i in range(n)))
    return load_corpus(path, cache_dir=tmp_path / "cache")


def test_a_table_corpus_is_indexed_once_saved_and_loaded_memory_mapped(tmp_path, monkeypatch):
    """The index of a cached table: the same run as the in-memory path, saved beside the table,
    loaded (memory-mapped) by the next index instead of rebuilt; other settings, another index."""
    table = _table_corpus(tmp_path)
    queries = ["gene virus", "membrane signal number7", "tumour"]
    qids = [f"q{i}" for i in range(len(queries))]
    expected = BM25Index(table.to_list(), progress=False).search(qids, queries, k=50)
    built = BM25Index(table, progress=False)
    assert built.path.is_dir() and built.path.parent == Path(table.cache_files[0]["filename"]).parent
    assert built.search(qids, queries, k=50) == expected
    monkeypatch.setattr(BM25Index, "_build_saved", lambda *a: pytest.fail("rebuilt a saved index"))
    loaded = BM25Index(table, progress=False)
    assert isinstance(loaded.retriever.scores["data"], np.memmap)
    assert loaded.search(qids, queries, k=50) == expected
    cand = {q: list(expected[q])[:5] + ["d0"] for q in qids}
    assert loaded.score_candidates(qids, queries, cand) == BM25Index(
        table.to_list(), progress=False).score_candidates(qids, queries, cand)
    monkeypatch.undo()
    other = BM25Index(table, BM25Args(k1=0.9, b=0.4), progress=False)
    assert other.path != built.path


def test_an_incomplete_saved_index_is_rebuilt_not_read(tmp_path):
    table = _table_corpus(tmp_path, n=50)
    index = BM25Index(table, progress=False)
    (index.path / "twotower_bm25.json").unlink()  # as a crash before the folder was complete
    for f in index.path.glob("*.npy"):
        f.write_bytes(b"junk")
    again = BM25Index(table, progress=False)
    assert (again.path / "twotower_bm25.json").exists()
    assert again.search(["q"], ["gene"], k=5) == BM25Index(table.to_list(), progress=False).search(
        ["q"], ["gene"], k=5)



def test_a_process_that_finds_no_index_never_removes_the_one_another_just_saved(tmp_path,
                                                                                   monkeypatch):
    """Two processes start on the same table (CI failure of session 23: the straight and the
    killed run of a resume test): B looks before A has saved, A saves and starts loading, B
    finishes building. B keeps A's folder; before the fix it removed it under A's reader (A then
    failed with FileNotFoundError on data.csc.index.npy)."""
    table = _table_corpus(tmp_path, n=50)
    first = BM25Index(table, progress=False)
    saved = {f.name: f.stat().st_ino for f in first.path.iterdir()}
    looks = iter([False])  # B's first look finds nothing yet; later looks read what is there
    real_load = BM25Index._load
    monkeypatch.setattr(BM25Index, "_load", lambda self: real_load(self) if next(looks, True)
                        else None)
    second = BM25Index(table, progress=False)
    assert second.path == first.path
    assert {f.name: f.stat().st_ino for f in first.path.iterdir()} == saved
    assert not [p for p in first.path.parent.iterdir() if ".partial" in p.name]
    assert second.search(["q"], ["gene"], k=5) == first.search(["q"], ["gene"], k=5)

@pytest.mark.parametrize("method", ["lucene", "robertson", "atire", "bm25l", "bm25+"])
def test_the_index_written_block_by_block_is_bm25s_own(tmp_path, method):
    """write_index over blocks of documents saves what bm25s.BM25.index builds from the whole
    corpus at once: the same vocabulary, matrix layout and scores (repeated terms, empty
    documents, terms first seen in a later block)."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    docs = [[words[int(j)] for j in rng.zipf(1.5, size=int(rng.integers(0, 12))) % 40]
            for _ in range(97)]
    vocab = {}
    ids = [[vocab.setdefault(t, len(vocab)) for t in d] for d in docs]
    reference = bm25s.BM25(method=method)
    reference.index(Tokenized(ids=ids, vocab=dict(vocab)), show_progress=False)
    blocks = [docs[i:i + 10] for i in range(0, len(docs), 10)]
    assert write_index(iter(blocks), bm25s.BM25(method=method), tmp_path / "index",
                       tmp_path / "scratch") == len(docs)
    assert not (tmp_path / "scratch").exists()
    saved = bm25s.BM25.load(str(tmp_path / "index"), mmap=True)
    assert saved.vocab_dict == reference.vocab_dict
    for key in ("indptr", "indices"):
        assert np.array_equal(saved.scores[key], reference.scores[key]), key
    assert saved.scores["data"].dtype == reference.scores["data"].dtype
    np.testing.assert_allclose(saved.scores["data"], reference.scores["data"], rtol=1e-6)
    if method in ("bm25l", "bm25+"):
        np.testing.assert_allclose(saved.nonoccurrence_array, reference.nonoccurrence_array,
                                   rtol=1e-6)
    for query in (["w1", "w3"], ["w0"], ["w7", "w7", "w39"]):
        np.testing.assert_allclose(saved.get_scores(query), reference.get_scores(query),
                                   rtol=1e-5)


def test_building_a_table_index_holds_one_block_of_tokens(tmp_path, monkeypatch):
    """The table's documents reach the index writer one block at a time, never as a corpus-sized
    list (bm25s' own index() is not called)."""
    table = _table_corpus(tmp_path, n=230)
    monkeypatch.setattr(B, "_BLOCK", 50)
    monkeypatch.setattr(bm25s.BM25, "index", lambda *a, **k: pytest.fail("whole-corpus index"))
    seen = []
    real = B.write_index

    def spy(blocks, *args):
        def counted():
            for block in blocks:
                seen.append(len(block))
                yield block
        return real(counted(), *args)
    monkeypatch.setattr(B, "write_index", spy)
    index = BM25Index(table, progress=False)
    assert seen == [50, 50, 50, 50, 30]
    monkeypatch.undo()
    assert index.search(["q"], ["gene virus"], k=20) == BM25Index(
        table.to_list(), progress=False).search(["q"], ["gene virus"], k=20)


def _zipf_index(method, n_docs=211, seed=0, copies=3):
    """A bm25s index over zipf-distributed words, some documents repeated (tied scores)."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(50)]
    docs = [[words[int(j)] for j in rng.zipf(1.4, size=int(rng.integers(0, 14))) % 50]
            for _ in range(n_docs)]
    docs += [list(docs[5]) for _ in range(copies)]  # the same text: the same score
    index = bm25s.BM25(method=method)
    index.index(Tokenized(ids=[[int(t[1:]) for t in d] for d in docs],
                          vocab={w: i for i, w in enumerate(words)}), show_progress=False)
    return index, docs


QUERIES = (["w1", "w3"], ["w0"], ["w7", "w7", "w39"], ["w49", "w2", "w11", "w5"], ["w48"])


@pytest.mark.parametrize("method", ["lucene", "robertson", "atire", "bm25l", "bm25+"])
@pytest.mark.parametrize("block", [1, 7, 64, 1 << 18])
def test_blockwise_top_k_is_bm25s_ranking_of_the_matching_documents(method, block):
    """PostingScorer.top_k equals bm25s' full score vector ranked: the documents sharing a query
    term, by descending score, ties by ascending row, the same float32 sums; over block sizes
    that cut the postings anywhere."""

    index, docs = _zipf_index(method)
    scorer = PostingScorer(index.scores, index.nonoccurrence_array, block=block)
    for query in QUERIES:
        ids = index.get_tokens_ids(query)
        full = index.get_scores(query)
        matching = np.array([r for r, d in enumerate(docs) if set(d) & set(query)], dtype=int)
        order = matching[np.lexsort((matching, -full[matching]))]
        for k in (1, 5, 10, 500):
            rows, scores = scorer.top_k(ids, k)
            assert rows.tolist() == order[:k].tolist(), (query, k)
            assert scores.dtype == full.dtype
            np.testing.assert_array_equal(scores, full[order[:k]])
    ties = scorer.top_k(index.get_tokens_ids(docs[5][:1]), 1000)[0]
    assert set(range(211, 214)) <= set(ties.tolist())
    assert scorer.top_k([], 10)[0].size == 0 and scorer.top_k(ids, 0)[0].size == 0


@pytest.mark.parametrize("method", ["lucene", "bm25l"])
def test_scores_at_given_rows_are_bm25s_scores(method):

    index, docs = _zipf_index(method)
    scorer = PostingScorer(index.scores, index.nonoccurrence_array, block=16)
    rows = np.random.default_rng(1).integers(0, len(docs), size=40)
    for query in QUERIES:
        np.testing.assert_array_equal(scorer.scores_at(index.get_tokens_ids(query), rows),
                                      index.get_scores(query)[rows])


def test_postings_out_of_document_order_are_detected():

    index, _ = _zipf_index("lucene")
    assert check_ascending(index.scores)
    indptr = index.scores["indptr"]
    column = int(np.argmax(np.diff(indptr) > 1))  # a term with two postings or more
    swapped = dict(index.scores, indices=index.scores["indices"].copy())
    lo = indptr[column]
    swapped["indices"][[lo, lo + 1]] = swapped["indices"][[lo + 1, lo]]
    assert not check_ascending(swapped)


def test_search_ranks_without_bm25s_whole_collection_scoring(tmp_path, monkeypatch):
    """Searching a saved index neither calls bm25s' retrieve nor scores every document."""
    table = _table_corpus(tmp_path, n=230)
    index = BM25Index(table, progress=False)
    expected = BM25Index(table.to_list(), progress=False).search(["q"], ["gene virus"], k=20)
    for name in ("retrieve", "get_scores", "get_scores_from_ids"):
        monkeypatch.setattr(bm25s.BM25, name, lambda *a, **k: pytest.fail("bm25s scoring"))
    assert index.search(["q"], ["gene virus"], k=20) == expected
    assert index.score_candidates(["q"], ["gene virus"], {"q": list(expected["q"])}) == expected


def test_a_query_whose_terms_have_no_postings_finds_nothing():
    """A term column left empty (a vocabulary entry no document holds) matches nothing: an empty
    result, not an error from joining no blocks."""
    scores = {"data": np.array([1.0, 2.0], dtype=np.float32), "indices": np.array([0, 2]),
              "indptr": np.array([0, 2, 2]), "num_docs": 3}
    scorer = PostingScorer(scores, None, block=2)
    rows, values = scorer.top_k([1], k=5)
    assert len(rows) == 0 and len(values) == 0
    rows, values = scorer.top_k([0, 1], k=5)
    assert rows.tolist() == [2, 0] and values.tolist() == [2.0, 1.0]
