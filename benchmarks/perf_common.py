"""What the speed benchmarks share (benchmarks/perf.py, perf_train.py, perf_memory.py): the
model, the SciFact test data, timing, the machine's load and the sentence-transformers baseline."""
from __future__ import annotations

import os
import statistics
import time

from twotower.common.eval.evaluate import _corpus_rows, judged_queries, load_eval_data
from twotower.common.eval.metrics import aggregate, per_query
from twotower.common.eval.search import dense_search
from twotower.common.model.encoder import doc_text, resolve_model_path

MODEL = "bundled:all-MiniLM-L6-v2"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def scifact_test():
    return load_eval_data("scifact", "test")


def corpus_texts(data) -> tuple[list[str], list[str]]:
    ids, rows = _corpus_rows(data)
    return ids, [doc_text(r) for r in rows]


def st_model(max_length: int):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve_model_path(MODEL), device="cpu")
    model.max_seq_length = max_length
    return model


def ndcg_of(data, doc_emb, query_emb, doc_ids) -> float:
    qids, _ = judged_queries(data)
    run = dense_search(query_emb, doc_emb, qids, doc_ids, k=100, similarity="cos")
    return aggregate(per_query(data.qrels, run, ["nDCG@10"]))["nDCG@10"]
