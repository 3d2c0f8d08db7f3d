"""One measured step of benchmarks/scale.py, run in its own process (so its peak memory is its own).

    python -m benchmarks.scale_child data ROOT | bm25_build ROOT | bm25 ROOT | search ROOT MODEL SHARDS
        | stream CORPUS MODEL CACHE | random_write ROWS FOLDER | random_search FOLDER
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from twotower.common.data import (column, load_corpus, load_hard_negatives,
                                  load_msmarco_collection, load_msmarco_queries, load_qrels,
                                  load_teacher_scores)
from twotower.common.eval.bm25 import BM25Index
from twotower.common.eval.shards import open_shards, run_from_rows, search_shards, write_shards
from twotower.common.model.encoder import Encoder
from twotower.finetune.data import TextStore
from twotower.pretrain.chunks import Chunker, token_documents

BLOCK = 8192  # passages encoded / vectors written per step


def data(root: str) -> None:
    root = Path(root)
    docs = TextStore.from_table(load_msmarco_collection(root / "collection.tsv"), with_title=True)
    queries = TextStore.from_table(load_msmarco_queries(root / "queries.train.tsv"), False)
    qrels = load_qrels(root / "qrels.train.tsv", query_ids=queries, doc_ids=docs)
    negatives = load_hard_negatives(root / "msmarco-hard-negatives.jsonl.gz")
    print(f"{len(docs)} passages, {len(queries)} queries, {len(qrels)} judged, "
          f"{len(negatives)} hard-negative lines")


def bm25_build(root: str) -> None:
    started = time.time()
    BM25Index(load_msmarco_collection(Path(root) / "collection.tsv"), progress=False)
    print(f"index built (or read) in {time.time() - started:.1f} s")


def bm25(root: str) -> None:
    root = Path(root)
    started = time.time()
    index = BM25Index(load_msmarco_collection(root / "collection.tsv"), progress=False)
    print(f"index built (or read) in {time.time() - started:.1f} s")
    queries = load_msmarco_queries(root / "queries.train.tsv")
    n = min(10_000, len(queries))
    started = time.time()
    run = index.search(column(queries, "id")[:n], column(queries, "text")[:n], k=20)
    took = time.time() - started
    print(f"top-20 of {n} queries in {took:.1f} s ({took / n * 1000:.1f} ms a query), "
          f"{sum(map(len, run.values()))} hits")


def search(root: str, model: str, shards: str) -> None:
    root = Path(root)
    encoder = Encoder.load(model)
    corpus = load_msmarco_collection(root / "collection.tsv")

    def blocks():
        for start in range(0, len(corpus), BLOCK):
            yield encoder.encode(corpus[start:start + BLOCK]["text"], tower="doc",
                                 batch_size=256, progress=False)
    write_shards(blocks(), shards, dtype="float16", shard_rows=1 << 20, overwrite=True)
    dev = load_msmarco_queries(root / "queries.dev.small.tsv").select(range(1000))
    queries = encoder.encode(column(dev, "text"), progress=False)
    started = time.time()
    scores, rows = search_shards(queries, open_shards(shards), k=100)
    ids = TextStore.from_table(corpus, with_title=True).ids
    run = run_from_rows(scores, rows, column(dev, "id"), ids)
    print(f"exact top-100 of 1000 queries in {time.time() - started:.1f} s ({len(run)} queries)")


def stream(corpus: str, model: str, cache: str) -> None:
    """The pretraining token stream of a corpus (built on the first call), and 10k chunks read."""
    tokenizer = Encoder.load(model).tokenizer
    tokens, lengths = token_documents([load_corpus(corpus)], tokenizer, cache_dir=cache)
    chunker = Chunker(tokens, 256, seed=0)
    rng = np.random.default_rng(0)
    total = sum(int(chunker.chunk(0, int(i)).sum() % 7) for i in rng.integers(chunker.num_chunks,
                                                                           size=10_000))
    print(f"{len(tokens)} tokens, {len(lengths)} documents, {chunker.num_chunks} chunks ({total})")


def teacher(path: str, cache: str) -> None:
    """The teacher-score table (built on the first call), and every query's scores read."""
    scores = load_teacher_scores(path, cache_dir=cache)
    started, pairs, queries = time.time(), 0, 0
    for qid in scores:
        pairs += len(scores[qid])
        queries += 1
    print(f"{pairs} scores of {queries} queries read in {time.time() - started:.1f} s")


def random_write(rows: str, folder: str) -> None:
    rows, rng = int(rows), np.random.default_rng(0)
    blocks = (rng.standard_normal((min(1 << 16, rows - s), 768), dtype=np.float32)
              for s in range(0, rows, 1 << 16))
    write_shards(blocks, folder, dtype="float16", shard_rows=1 << 20, overwrite=True)


def random_search(folder: str) -> None:
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((1000, 768), dtype=np.float32)
    started = time.time()
    shards = open_shards(folder)
    search_shards(queries, shards, k=100)
    print(f"exact top-100 of 1000 queries over {shards.rows} x 768 fp16 in "
          f"{time.time() - started:.1f} s")


if __name__ == "__main__":
    {"data": data, "bm25_build": bm25_build, "bm25": bm25, "search": search, "stream": stream,
     "random_write": random_write, "random_search": random_search, "teacher": teacher}[
        sys.argv[1]](*sys.argv[2:])
