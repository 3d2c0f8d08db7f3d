"""Inner-product search over embeddings with faiss, and reranking of a candidate run.

`dense_search` is exact by default (faiss IndexFlatIP: every query against every document).
For corpora too large for that, `index` takes an approximate faiss index: "hnsw" (HNSW graph,
32 links per node), "ivf" (inverted lists with about 4*sqrt(n) k-means cells, exact vectors in
each cell) or any faiss index_factory string such as "IVF4096,PQ64" or "HNSW64". Cosine
similarity is an inner product of L2-normalised vectors, so `similarity="cos"` normalises a copy
of the embeddings first.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Sequence

import faiss
import numpy as np

Run = Dict[str, Dict[str, float]]

INDEX_ALIASES = {"flat": "Flat", "exact": "Flat", "hnsw": "HNSW32"}


def as_matrix(emb: np.ndarray, name: str, similarity: str) -> np.ndarray:
    """float32, C-contiguous, 2-D (what faiss needs); normalised rows for cosine."""
    arr = np.ascontiguousarray(np.asarray(emb, dtype=np.float32))
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, dim], got shape {arr.shape}")
    if not np.isfinite(arr).all():
        row = int(np.argwhere(~np.isfinite(arr))[0, 0])
        raise ValueError(f"{name} contains NaN or inf (first in row {row})")
    if similarity == "cos":
        arr = arr.copy()
        faiss.normalize_L2(arr)
    elif similarity != "dot":
        raise ValueError(f"similarity must be 'dot' or 'cos', got {similarity!r}")
    return arr


def _check_ids(ids: Sequence[str], n_rows: int, name: str) -> None:
    if len(ids) != n_rows:
        raise ValueError(f"{name}: {len(ids)} ids for {n_rows} embedding rows")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name}: duplicate ids")


def index_factory_string(index: str, n_docs: int) -> str:
    """Resolve "flat" / "hnsw" / "ivf" to a faiss index_factory string (others pass through)."""
    if index.lower() in INDEX_ALIASES:
        return INDEX_ALIASES[index.lower()]
    if index.lower() == "ivf":
        # faiss' rule of thumb: nlist ~ 4*sqrt(n); at least one cell, never more cells than points
        nlist = max(1, min(n_docs, int(4 * math.sqrt(n_docs))))
        return f"IVF{nlist},Flat"
    return index


def build_index(doc_matrix: np.ndarray, index: str = "flat") -> faiss.Index:
    """An inner-product faiss index holding `doc_matrix` (trained first when the type needs it)."""
    spec = index_factory_string(index, doc_matrix.shape[0])
    try:
        faiss_index = faiss.index_factory(doc_matrix.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(f"faiss cannot build index '{spec}': {err}") from None
    if not faiss_index.is_trained:
        faiss_index.train(doc_matrix)
    faiss_index.add(doc_matrix)
    return faiss_index


def set_search_params(faiss_index: faiss.Index, k: int, search_params: str | None) -> None:
    if search_params is None:
        # defaults that keep recall high: HNSW recall at depth k needs efSearch well above k
        names = []
        if "HNSW" in type(faiss.downcast_index(faiss_index)).__name__:
            names.append(f"efSearch={max(2 * k, 128)}")
        ivf = faiss.try_extract_index_ivf(faiss_index)
        if ivf is not None:
            names.append(f"nprobe={min(32, ivf.nlist)}")
        search_params = ",".join(names)
    if search_params:
        try:
            faiss.ParameterSpace().set_index_parameters(faiss_index, search_params)
        except RuntimeError as err:
            raise ValueError(f"faiss search parameters '{search_params}': {err}") from None


def dense_search(
    query_emb: np.ndarray,
    doc_emb: np.ndarray,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    k: int = 1000,
    index: str = "flat",
    similarity: str = "dot",
    batch_size: int = 1024,
    search_params: str | None = None,
) -> Run:
    """Top-k documents per query by inner product: {qid: {docid: score}}.

    index: "flat" (exact), "hnsw", "ivf" or a faiss index_factory string (approximate).
    search_params: faiss ParameterSpace string such as "efSearch=512" or "nprobe=64"; by default
    efSearch = max(2k, 128) for HNSW and nprobe = 32 for IVF.
    """
    queries = as_matrix(query_emb, "query embeddings", similarity)
    docs = as_matrix(doc_emb, "document embeddings", similarity)
    _check_ids(query_ids, queries.shape[0], "query ids")
    _check_ids(doc_ids, docs.shape[0], "document ids")
    if queries.shape[1] != docs.shape[1]:
        raise ValueError(f"query dim {queries.shape[1]} != document dim {docs.shape[1]}")
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    k = min(k, docs.shape[0])
    faiss_index = build_index(docs, index)
    set_search_params(faiss_index, k, search_params)

    run: Run = {}
    for start in range(0, queries.shape[0], batch_size):
        scores, rows = faiss_index.search(queries[start : start + batch_size], k)
        for offset, (row_scores, row_ids) in enumerate(zip(scores, rows)):
            hits = row_ids >= 0  # approximate indexes pad with -1 when they find fewer than k
            run[query_ids[start + offset]] = {
                doc_ids[j]: float(s) for j, s in zip(row_ids[hits], row_scores[hits])
            }
    return run


def rerank(
    candidates: Mapping[str, Mapping[str, float]],
    query_emb: np.ndarray,
    doc_emb: np.ndarray,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    similarity: str = "dot",
) -> Run:
    """Score exactly the candidate documents of each query (e.g. BM25 top-k): {qid: {docid: score}}.

    Every query and candidate document must have an embedding; a missing one is an error naming
    it (the candidate run and the data do not belong together).
    """
    queries = as_matrix(query_emb, "query embeddings", similarity)
    docs = as_matrix(doc_emb, "document embeddings", similarity)
    _check_ids(query_ids, queries.shape[0], "query ids")
    _check_ids(doc_ids, docs.shape[0], "document ids")
    query_row = {qid: i for i, qid in enumerate(query_ids)}
    doc_row = {did: i for i, did in enumerate(doc_ids)}
    run: Run = {}
    for qid, cands in candidates.items():
        if qid not in query_row:
            raise KeyError(f"candidate run query '{qid}' has no query embedding")
        cand_ids = list(cands)
        missing = [d for d in cand_ids if d not in doc_row]
        if missing:
            raise KeyError(
                f"candidate run query '{qid}': document '{missing[0]}' has no embedding "
                f"({len(missing)} missing)"
            )
        rows = np.fromiter((doc_row[d] for d in cand_ids), dtype=np.int64, count=len(cand_ids))
        scores = docs[rows] @ queries[query_row[qid]]
        run[qid] = {d: float(s) for d, s in zip(cand_ids, scores)}
    return run
