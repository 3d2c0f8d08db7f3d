"""A bm25s index written a block of documents at a time, so that building it for a collection of
millions of passages holds one block of tokens in memory, not the whole corpus.

bm25s builds its matrix from every document's token ids at once (Python lists: ~1.3 KB a passage,
~11 GB for MS MARCO's 8.8 M). Here each block's (document, term, term frequency) triples go to
scratch files as int32 / float32 arrays; the document frequencies and lengths are summed as the
blocks pass; then the scores are computed with bm25s' own idf and term-frequency functions and
placed into the CSC arrays (memory-mapped) by a counting sort on the term, block by block. The
result is bm25s' saved index, written by bm25s' own `save`: the same vocabulary, arrays and scores
as `bm25s.BM25.index` on the same token ids (tests/test_eval_bm25.py compares them).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, Iterable, List

import bm25s
import numpy as np
from bm25s.scoring import (_build_idf_array, _build_nonoccurrence_array, _select_idf_scorer,
                           _select_tfc_scorer)

_NONOCCURRENCE_METHODS = ("bm25l", "bm25+")


def _block_triples(docs: List[List[str]], vocab: Dict[str, int]):
    """(document in the block, term id, tf) of each distinct term of each document, the
    documents' lengths in tokens; new terms get the next ids (first seen, first numbered)."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    terms = np.fromiter((vocab.setdefault(t, len(vocab)) for d in docs for t in d),
                        dtype=np.int64, count=int(lengths.sum()))
    doc = np.repeat(np.arange(len(docs), dtype=np.int64), lengths)
    keys, tf = np.unique((doc << 32) | terms, return_counts=True)  # sorted by document, term
    return keys >> 32, (keys & 0xFFFFFFFF).astype(np.int32), tf.astype(np.float32), lengths


def write_index(token_blocks: Iterable[List[List[str]]], retriever: "bm25s.BM25", out: Path,
                scratch: Path) -> int:
    """Index the documents of `token_blocks` (each a list of documents' tokens, in corpus order)
    with `retriever`'s settings (k1, b, delta, method, dtypes) and save it to `out` with
    bm25s' save; `scratch` holds the blocks meanwhile and is removed. Returns the documents."""
    scratch.mkdir(parents=True, exist_ok=True)
    vocab: Dict[str, int] = {}
    df = np.zeros(0, dtype=np.int64)
    lengths, n_docs, blocks = [], 0, 0
    for docs in token_blocks:
        doc, term, tf, block_lengths = _block_triples(docs, vocab)
        if len(vocab) > len(df):
            df = np.pad(df, (0, len(vocab) - len(df)))
        df += np.bincount(term, minlength=len(df))
        for name, array in (("doc", (doc + n_docs).astype(np.int32)), ("term", term), ("tf", tf)):
            np.save(scratch / f"{blocks}.{name}.npy", array)
        lengths.append(block_lengths)
        n_docs, blocks = n_docs + len(docs), blocks + 1
    doc_len = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    avg_len = float(doc_len.mean()) if n_docs else 0.0
    r = retriever
    frequencies = dict(enumerate(df.tolist()))
    idf = _build_idf_array(frequencies, n_docs, _select_idf_scorer(r.idf_method), dtype=r.dtype)
    tfc = _select_tfc_scorer(r.method)
    nonoccurrence = None
    if r.method in _NONOCCURRENCE_METHODS:
        nonoccurrence = _build_nonoccurrence_array(
            frequencies, n_docs, _select_idf_scorer(r.idf_method), tfc, l_d=avg_len,
            l_avg=avg_len, k1=r.k1, b=r.b, delta=r.delta, dtype=r.dtype)
    indptr = np.zeros(len(df) + 1, dtype=np.int64)
    np.cumsum(df, out=indptr[1:])
    data = np.lib.format.open_memmap(scratch / "data.npy", "w+", np.dtype(r.dtype), (indptr[-1],))
    indices = np.lib.format.open_memmap(scratch / "indices.npy", "w+", np.dtype(r.int_dtype),
                                        (indptr[-1],))
    heads = indptr[:-1].copy()  # where each term's next document goes
    for b in range(blocks):
        doc, term, tf = (np.load(scratch / f"{b}.{name}.npy") for name in ("doc", "term", "tf"))
        scores = idf[term] * tfc(tf_array=tf, l_d=doc_len[doc], l_avg=avg_len, k1=r.k1, b=r.b,
                                 delta=r.delta)
        if nonoccurrence is not None:
            scores -= nonoccurrence[term]
        order = np.argsort(term, kind="stable")  # by term; documents stay ascending within one
        term = term[order]
        counts = np.bincount(term, minlength=len(df))
        first = np.cumsum(counts) - counts  # where each term's run starts in this block
        place = heads[term] + (np.arange(len(term)) - first[term])
        data[place] = scores[order]
        indices[place] = doc[order]
        heads += counts
    if "" not in vocab:  # what bm25s.BM25.index adds: a token for queries without any
        vocab[""] = len(vocab)
    r.scores = {"data": data, "indices": indices, "indptr": indptr, "num_docs": n_docs}
    r.vocab_dict, r.nonoccurrence_array = vocab, nonoccurrence
    r.unique_token_ids_set = set(vocab.values())
    r.save(str(out), show_progress=False)
    r.scores = None
    del data, indices
    shutil.rmtree(scratch, ignore_errors=True)
    return n_docs
