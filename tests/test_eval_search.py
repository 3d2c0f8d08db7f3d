"""twotower.common.eval.search: faiss search against numpy brute force; rerank scores only the candidates."""
import numpy as np
import pytest

from twotower.common.eval.search import dense_search, rerank


@pytest.fixture
def embeddings():
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(7, 12)).astype(np.float32)
    docs = rng.normal(size=(300, 12)).astype(np.float32)
    return queries, docs, [f"q{i}" for i in range(7)], [f"doc{i}" for i in range(300)]


def brute_force(queries, docs, k):
    scores = queries.astype(np.float64) @ docs.astype(np.float64).T
    order = np.argsort(-scores, axis=1)[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


@pytest.mark.parametrize("batch_size", [1, 3, 1024])
def test_flat_search_equals_numpy_argsort(embeddings, batch_size):
    queries, docs, qids, dids = embeddings
    run = dense_search(queries, docs, qids, dids, k=20, batch_size=batch_size)
    order, scores = brute_force(queries, docs, 20)
    for i, qid in enumerate(qids):
        ranked = sorted(run[qid].items(), key=lambda kv: -kv[1])
        assert [d for d, _ in ranked] == [dids[j] for j in order[i]]
        np.testing.assert_allclose([s for _, s in ranked], scores[i], rtol=1e-5, atol=1e-5)


def test_cosine_normalises_and_k_is_capped(embeddings):
    queries, docs, qids, dids = embeddings
    docs = docs[:15]
    run = dense_search(queries * 5, docs * 3, qids, dids[:15], k=1000, similarity="cos")
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    dn = docs / np.linalg.norm(docs, axis=1, keepdims=True)
    order, scores = brute_force(qn, dn, 15)
    for i, qid in enumerate(qids):
        assert len(run[qid]) == 15  # k larger than the corpus returns the whole corpus
        ranked = sorted(run[qid].items(), key=lambda kv: -kv[1])
        assert [d for d, _ in ranked] == [dids[j] for j in order[i]]
        np.testing.assert_allclose([s for _, s in ranked], scores[i], atol=1e-5)


@pytest.mark.parametrize("index", ["hnsw", "IVF4,Flat"])
def test_approximate_indexes_find_the_true_neighbours(embeddings, index):
    queries, docs, qids, dids = embeddings
    run = dense_search(queries, docs, qids, dids, k=10, index=index)
    order, _ = brute_force(queries, docs, 10)
    overlap = np.mean([len(set(run[q]) & {dids[j] for j in order[i]}) / 10
                       for i, q in enumerate(qids)])
    # tiny corpus, default efSearch=128 / nprobe=min(32, nlist): should be (almost) exact
    assert overlap >= 0.9


def test_bad_inputs(embeddings):
    queries, docs, qids, dids = embeddings
    with pytest.raises(ValueError, match="dim"):
        dense_search(queries, docs[:, :5], qids, dids, k=3)
    with pytest.raises(ValueError, match="ids for"):
        dense_search(queries, docs, qids[:2], dids, k=3)
    bad = queries.copy()
    bad[2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        dense_search(bad, docs, qids, dids, k=3)
    with pytest.raises(ValueError, match="cannot build index"):
        dense_search(queries, docs, qids, dids, k=3, index="NotAnIndex")


def test_rerank_returns_exactly_the_candidates_with_their_dot_products(embeddings):
    queries, docs, qids, dids = embeddings
    candidates = {"q0": {"doc5": 1.0, "doc17": 0.5, "doc200": 0.1}, "q3": {"doc1": 3.0}}
    run = rerank(candidates, queries, docs, qids, dids)
    assert set(run) == {"q0", "q3"}
    for qid, cands in candidates.items():
        assert set(run[qid]) == set(cands)
        qi = qids.index(qid)
        for d, score in run[qid].items():
            assert score == pytest.approx(float(queries[qi] @ docs[dids.index(d)]), rel=1e-5)


def test_rerank_missing_document_is_an_error(embeddings):
    queries, docs, qids, dids = embeddings
    with pytest.raises(KeyError, match="'ghost' has no embedding"):
        rerank({"q0": {"doc1": 1.0, "ghost": 0.5}}, queries, docs, qids, dids)
    with pytest.raises(KeyError, match="query 'q77'"):
        rerank({"q77": {"doc1": 1.0}}, queries, docs, qids, dids)
