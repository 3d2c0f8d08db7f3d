"""Retrieval evaluation: dense (encoder + faiss), BM25, and reranking of a candidate run.

Library:  evaluate_dense(encoder, data), evaluate_bm25(data), evaluate_rerank(encoder, data, run),
          evaluate_hybrid(encoder, data, fusion="rrf"|"wsum")
          -> EvalResult(metrics, run, per_query, info); common/eval/outputs.py's write_outputs(result, dir) writes
          run.trec, metrics.json and report.md.
CLI:      python -m twotower.common.eval.evaluate --model bundled:all-MiniLM-L6-v2 --data scifact --split test
          python -m twotower.common.eval.evaluate --system bm25 --data scifact
          python -m twotower.common.eval.evaluate --model M --data msmarco_sample --rerank bm25_top20.trec
Metric definitions: common/eval/metrics.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twotower.common.data import (RetrievalData, column, load_beir, load_msmarco_collection,
                                  load_msmarco_queries, load_qrels, resolve_data)
from twotower.common.data.ids import IdIndex
from twotower.common.eval.bm25 import BM25Args, BM25Index
from twotower.common.eval.corpus_shards import retrieve_from_shards
from twotower.common.eval.embed_cache import EmbeddingCache
from twotower.common.eval.fusion import fuse
from twotower.common.eval.metrics import aggregate, per_query
from twotower.common.eval.search import dense_search, rerank
from twotower.common.eval.sharded import encode_sharded, world_size
from twotower.common.model.distributed import leave_processes, rank
from twotower.common.model.encoder import doc_text

logger = logging.getLogger("twotower.common.eval.evaluate")
Run = Dict[str, Dict[str, float]]


@dataclass
class EvalResult:
    metrics: Dict[str, float]
    run: Run
    per_query: Dict[str, Dict[str, float]]  # measure -> qid -> value
    info: Dict[str, Any] = field(default_factory=dict)  # system, data, counts, timing, ...


# ------------------------------------------------------------------------------------ data
def load_eval_data(name_or_path: str | Path, split: str) -> RetrievalData:
    """A BEIR folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv) or an MS MARCO-layout folder
    (collection.tsv, queries.tsv, qrels.tsv; `split` is then only a label) as RetrievalData."""
    root = resolve_data(name_or_path)
    if not all((root / f).is_file() for f in ("collection.tsv", "queries.tsv", "qrels.tsv")):
        return load_beir(root, split)
    corpus = load_msmarco_collection(root / "collection.tsv")
    queries = load_msmarco_queries(root / "queries.tsv")
    query_ids = column(queries, "id")
    qrels = load_qrels(root / "qrels.tsv", query_ids=set(query_ids), doc_ids=IdIndex(corpus))
    judged = [i for i, qid in enumerate(query_ids) if qid in qrels]  # as load_beir does
    return RetrievalData(corpus=corpus, queries=queries.select(judged), qrels=qrels,
                           name=root.resolve().name, split=split)


def judged_queries(data: RetrievalData) -> tuple[list[str], list[str]]:
    """(ids, texts) of the queries that have qrels, in the order of the queries table."""
    ids = [str(q) for q in column(data.queries, "id")]
    texts = column(data.queries, "text")
    judged = [(q, t) for q, t in zip(ids, texts) if q in data.qrels]
    missing = set(data.qrels) - set(ids)
    if missing:
        raise ValueError(
            f"{data.name}/{data.split}: {len(missing)} judged query id(s) have no query text, "
            f"e.g. {sorted(missing)[:3]}; qrels and queries do not belong together"
        )
    return [q for q, _ in judged], [t for _, t in judged]


def holdout_queries(qids: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """`n` of `qids` (in their order): the n smallest seeded hashes of the ids, so the choice does
    not depend on the order of `qids` and is the same on every machine and run.
    The dev split of EvalArgs.holdout; fine-tuning on the same split leaves these out."""
    if n <= 0 or n >= len(qids):
        raise ValueError(f"a holdout of {n} queries out of {len(qids)} leaves nothing to "
                         "evaluate or nothing to train on")
    key = {q: hashlib.sha256(f"{seed}:{q}".encode()).hexdigest() for q in qids}
    chosen = set(sorted(qids, key=lambda q: (key[q], q))[:n])
    return [q for q in qids if q in chosen]


def restrict_queries(data: RetrievalData, keep: Sequence[str]) -> RetrievalData:
    """`data` with only the queries (and qrels) in `keep`; the corpus is unchanged."""
    keep_q = set(keep)
    queries = data.queries.select(
        [i for i, q in enumerate(column(data.queries, "id")) if str(q) in keep_q])
    return dataclasses.replace(data, queries=queries,
                               qrels={q: dict(d) for q, d in data.qrels.items() if q in keep_q})


def eval_args_data(eval_args) -> RetrievalData:
    """EvalArgs.data/.split, restricted to the EvalArgs.holdout dev queries when that is set."""
    data = load_eval_data(eval_args.data, eval_args.split)
    if getattr(eval_args, "holdout", 0):
        qids, _ = judged_queries(data)
        data = restrict_queries(data, holdout_queries(qids, eval_args.holdout,
                                                      eval_args.holdout_seed))
    return data


def subsample(data: RetrievalData, max_queries: int = 0, max_docs: int = 0,
              seed: int = 0) -> RetrievalData:
    """A quick slice: `max_queries` judged queries sampled with `seed` (0 = all), and a corpus of
    every document judged for them plus `max_docs` others sampled with `seed` (0 = all)."""
    if not max_queries and not max_docs:
        return data
    rng = random.Random(seed)
    qids, _ = judged_queries(data)
    if max_queries and max_queries < len(qids):
        order = {q: i for i, q in enumerate(qids)}
        qids = sorted(rng.sample(qids, max_queries), key=order.__getitem__)
    data = restrict_queries(data, qids)
    qrels, queries, corpus = data.qrels, data.queries, data.corpus
    if max_docs:
        # on the id column as Arrow (memory-mapped) and a byte per row: no Python string per
        # document (8.8 M ids were ~1 GB of lists); the same rows as sampling a list of the
        # unjudged rows, since random.sample's picks depend only on the population's length
        judged = pa.array(sorted({str(d) for docs in qrels.values() for d in docs}), pa.string())
        ids = corpus.select_columns(["id"]).with_format("arrow")[:]["id"]
        keep = np.array(pc.is_in(pc.cast(ids, pa.string()), value_set=judged), dtype=bool)
        others = np.flatnonzero(~keep)
        keep[others[rng.sample(range(len(others)), min(max_docs, len(others)))]] = True
        corpus = corpus.select(np.flatnonzero(keep))
    return dataclasses.replace(data, corpus=corpus, queries=queries, qrels=qrels)


def _corpus_rows(data) -> tuple[list[str], list[dict]]:
    titles = column(data.corpus, "title") if "title" in data.corpus.column_names else None
    texts = column(data.corpus, "text")
    ids = [str(d) for d in column(data.corpus, "id")]
    rows = [{"title": titles[i] if titles else "", "text": texts[i]} for i in range(len(ids))]
    return ids, rows


def drop_identical_ids(run: Run) -> int:
    """BEIR's protocol (`ignore_identical_ids`, on by default in beir.retrieval.evaluation.
    EvaluateRetrieval.evaluate): a retrieved document whose id is the query's own id is dropped
    from the run before scoring, in place (ArguAna, Quora: queries are corpus documents too).
    Returns how many were dropped."""
    dropped = 0
    for qid, docs in run.items():
        if docs.pop(qid, None) is not None:
            dropped += 1
    return dropped


def _finish(data, run: Run, info: dict, measures, started: float,
            ignore_identical_ids: bool = True) -> EvalResult:
    t = time.perf_counter()
    info["ignore_identical_ids"] = ignore_identical_ids
    if ignore_identical_ids:
        info["identical_ids_dropped"] = drop_identical_ids(run)
    values = per_query(data.qrels, run, measures)
    info.setdefault("timing", {})["metrics_s"] = round(time.perf_counter() - t, 3)
    info["timing"]["total_s"] = round(time.perf_counter() - started, 3)
    info.update(data=data.name, split=data.split, n_queries=len(data.qrels))
    return EvalResult(aggregate(values), run, values, info)


def _encoder_info(encoder) -> dict:
    args = encoder.args
    return {
        "system": "dense", "model": args.name_or_path, "similarity": encoder.similarity,
        "encoder": {k: getattr(args, k) for k in ("pooling", "normalize", "shared_tower",
                    "query_prefix", "doc_prefix", "max_query_length", "max_doc_length")},
    }


def _encode(encoder, rows: list[dict], query_texts: list[str], batch_size: int,
            progress: bool, cache_dir: str | Path | None = None, shard: bool = False) -> tuple:
    """(document embeddings, query embeddings, timing dict). With `cache_dir`, corpus embeddings
    come from / go to twotower.common.eval.embed_cache (keyed by model, texts and settings); with `shard`,
    every process encodes its slice of the corpus (common/eval/sharded.py)."""
    t = time.perf_counter()
    cache_info = {}
    if cache_dir is not None:
        cache = EmbeddingCache(cache_dir)
        doc_emb = cache.encode(encoder, [doc_text(r) for r in rows], tower="doc",
                               batch_size=batch_size, progress=progress)
        cache_info = {"corpus_cache_hit": cache.hits == 1}
    elif shard:
        doc_emb = encode_sharded(
            lambda part: encoder.encode_corpus(part, batch_size=batch_size, progress=progress), rows)
        cache_info = {"encode_processes": world_size()}
    else:
        doc_emb = encoder.encode_corpus(rows, batch_size=batch_size, progress=progress)
    t_docs = time.perf_counter() - t
    t = time.perf_counter()
    query_emb = encoder.encode_queries(query_texts, batch_size=batch_size, progress=progress)
    timing = {"encode_corpus_s": round(t_docs, 3),
              "encode_queries_s": round(time.perf_counter() - t, 3),
              "docs_per_s": round(len(rows) / max(t_docs, 1e-9), 2), **cache_info}
    return doc_emb, query_emb, timing


# ------------------------------------------------------------------------------ systems
def evaluate_dense(encoder, data: RetrievalData, k: int = 1000, batch_size: int = 64,
                   index: str = "flat", search_params: str | None = None,
                   measures: Sequence[str] | None = None, progress: bool = True,
                   cache_dir: str | Path | None = None, shard: bool = False,
                   ignore_identical_ids: bool = True, shards: str | Path | None = None,
                   shards_dtype: str = "float16") -> EvalResult:
    """Encode corpus and judged queries, retrieve the top k by inner product, score.
    cache_dir: keep corpus embeddings on disk (common/eval/embed_cache.py) for re-evaluations.
    shard: every process of a multi-process launch encodes a slice of the corpus (all processes
    must call this; each gets the full result). ignore_identical_ids: BEIR's protocol
    (drop_identical_ids), as in evaluate_rerank and evaluate_bm25. shards: a folder for the corpus
    embeddings as on-disk shards, encoded a block at a time and searched exactly shard by shard
    (common/eval/corpus_shards.py: memory bounded by a block, not the corpus; reused when they
    match; every process of a launch encodes its slice); with an approximate `index`, that index
    is built from the shards a block at a time (its memory is what it holds: IVF-PQ's codes)."""
    started = time.perf_counter()
    qids, qtexts = judged_queries(data)
    if shards is not None:
        if cache_dir is not None:
            raise ValueError("shards: the on-disk embeddings are their own cache: not with "
                             "cache_dir")
        run, timing = retrieve_from_shards(encoder, data.corpus, qids, qtexts, shards, k,
                                           batch_size=batch_size, dtype=shards_dtype,
                                           progress=progress, index=index,
                                           search_params=search_params)
        info = {**_encoder_info(encoder), "mode": "retrieve", "k": k, "n_docs": len(data.corpus),
                "index": "shards" if index == "flat" else f"shards, {index}", "timing": timing}
        return _finish(data, run, info, measures, started, ignore_identical_ids)
    doc_ids, rows = _corpus_rows(data)
    doc_emb, query_emb, timing = _encode(encoder, rows, qtexts, batch_size, progress, cache_dir,
                                         shard)
    t = time.perf_counter()
    run = dense_search(query_emb, doc_emb, qids, doc_ids, k=k, index=index,
                       similarity=encoder.similarity, search_params=search_params)
    timing["search_s"] = round(time.perf_counter() - t, 3)
    info = {**_encoder_info(encoder), "mode": "retrieve", "k": k, "index": index,
            "n_docs": len(doc_ids), "timing": timing}
    return _finish(data, run, info, measures, started, ignore_identical_ids)


def restrict_candidates(data, candidates: Mapping[str, Mapping[str, float]]) -> tuple[Run, dict]:
    """The candidate lists of the judged queries, and counts of what was left out or missing."""
    qids, _ = judged_queries(data)
    kept = {q: dict(candidates[q]) for q in qids if q in candidates}
    counts = {"candidate_queries_not_judged": len(set(candidates) - set(qids)),
              "judged_queries_without_candidates": len(set(qids) - set(kept)),
              "n_candidates": sum(len(c) for c in kept.values())}
    if counts["candidate_queries_not_judged"]:
        logger.warning("rerank: %d candidate-run queries are not among the judged queries of "
                       "%s/%s and are left out", counts["candidate_queries_not_judged"],
                       data.name, data.split)
    return kept, counts


def evaluate_rerank(encoder, data: RetrievalData, candidates: Mapping[str, Mapping[str, float]],
                    batch_size: int = 64, measures: Sequence[str] | None = None,
                    progress: bool = True, ignore_identical_ids: bool = True) -> EvalResult:
    """Score only the candidate documents of each judged query (e.g. MS MARCO BM25 top-k)."""
    started = time.perf_counter()
    kept, counts = restrict_candidates(data, candidates)
    qids, qtexts = judged_queries(data)
    needed = {d for c in kept.values() for d in c}
    all_ids, all_rows = _corpus_rows(data)
    missing = needed - set(all_ids)
    if missing:
        raise KeyError(f"rerank: {len(missing)} candidate document(s) are not in the corpus of "
                       f"{data.name}, e.g. {sorted(missing)[:3]}")
    doc_ids = [d for d in all_ids if d in needed]  # encode only the candidates
    rows = [r for d, r in zip(all_ids, all_rows) if d in needed]
    doc_emb, query_emb, timing = _encode(encoder, rows, qtexts, batch_size, progress)
    t = time.perf_counter()
    run = rerank(kept, query_emb, doc_emb, qids, doc_ids, similarity=encoder.similarity)
    timing["score_s"] = round(time.perf_counter() - t, 3)
    info = {**_encoder_info(encoder), "mode": "rerank", **counts, "n_docs": len(doc_ids),
            "timing": timing}
    return _finish(data, run, info, measures, started, ignore_identical_ids)


def evaluate_bm25(data: RetrievalData, k: int = 1000,
                  candidates: Mapping[str, Mapping[str, float]] | None = None,
                  args: BM25Args | None = None,
                  measures: Sequence[str] | None = None,
                  ignore_identical_ids: bool = True, progress: bool = True) -> EvalResult:
    """BM25 (common/eval/bm25.py) over the whole corpus, or scoring only `candidates` when given."""
    started = time.perf_counter()
    args = args or BM25Args()
    qids, qtexts = judged_queries(data)
    t = time.perf_counter()
    index = BM25Index(data.corpus, args, progress=progress)
    t_index = time.perf_counter() - t
    t = time.perf_counter()
    info: dict = {"system": "bm25", "model": "bm25", "bm25": dataclasses.asdict(args)}
    if candidates is None:
        run = index.search(qids, qtexts, k)
        info.update(mode="retrieve", k=k)
    else:
        kept, counts = restrict_candidates(data, candidates)
        run = index.score_candidates(qids, qtexts, kept)
        info.update(mode="rerank", **counts)
    info.update(n_docs=len(index.doc_ids), timing={"index_s": round(t_index, 3),
                                                    "search_s": round(time.perf_counter() - t, 3)})
    return _finish(data, run, info, measures, started, ignore_identical_ids)


def evaluate_hybrid(encoder, data: RetrievalData, k: int = 1000, fusion: str = "rrf",
                    dense_weight: float = 0.5, rrf_k: int = 60, batch_size: int = 64,
                    bm25_args: BM25Args | None = None, measures: Sequence[str] | None = None,
                    progress: bool = True, cache_dir: str | Path | None = None,
                    shard: bool = False, ignore_identical_ids: bool = True,
                    shards: str | Path | None = None, shards_dtype: str = "float16") -> EvalResult:
    """BM25 and dense retrieval, each to depth k, fused (common/eval/fusion.py: rrf or wsum with
    `dense_weight`) and cut to k. info["parts"] keeps each system's own metrics. shards: the
    dense part's corpus embeddings on disk (evaluate_dense)."""
    started = time.perf_counter()
    parts = {"bm25": evaluate_bm25(data, k=k, args=bm25_args, measures=measures,
                                   ignore_identical_ids=ignore_identical_ids, progress=progress),
             "dense": evaluate_dense(encoder, data, k=k, batch_size=batch_size, measures=measures,
                                     progress=progress, cache_dir=cache_dir, shard=shard,
                                     ignore_identical_ids=ignore_identical_ids, shards=shards,
                                     shards_dtype=shards_dtype)}
    run = fuse(parts["bm25"].run, parts["dense"].run, fusion, dense_weight, rrf_k, depth=k)
    info = {**parts["dense"].info, "system": "hybrid", "mode": "retrieve", "k": k,
            "fusion": {"method": fusion, "rrf_k": rrf_k} if fusion == "rrf"
            else {"method": fusion, "dense_weight": dense_weight},
            "bm25": parts["bm25"].info["bm25"],
            "parts": {name: part.metrics for name, part in parts.items()}}
    return _finish(data, run, info, measures, started, ignore_identical_ids)


class DenseEvaluator:
    """For evaluation before, during and after training: loads and slices `EvalArgs.data` once
    (`.data`); each call `encoder -> metrics` (dense retrieval, exact search) keeps its EvalResult
    as `.last` (for the reports written after training). shard: every process of the launch calls
    it and encodes a slice of the corpus (common/eval/sharded.py). With `EvalArgs.shards`, each
    call's corpus embeddings go to on-disk shards in a folder of their own under it, named by
    `tag` (the Trainer's step) or the call's number; the previous call's folder is removed once
    the new one has been searched (by the main process: every process is past it by then)."""

    def __init__(self, eval_args, k: int = 1000, seed: int = 0, shard: bool = False):
        self.eval_args, self.k, self.shard = eval_args, k, shard
        self.data = subsample(eval_args_data(eval_args), eval_args.max_queries,
                              eval_args.max_docs, seed)
        self.last: EvalResult | None = None
        self.calls, self.shards_folder = 0, None

    def __call__(self, encoder, progress: bool = False, tag: str = "") -> Dict[str, float]:
        args = self.eval_args
        self.calls += 1
        previous, folder = self.shards_folder, None
        if args.shards:
            folder = Path(args.shards) / (tag or f"eval-{self.calls:04d}")
        with encoder.inference_options(bf16=args.bf16, compile=args.compile):
            self.last = evaluate_dense(encoder, self.data, k=self.k, batch_size=args.batch_size,
                                       measures=args.metrics, progress=progress,
                                       shard=self.shard and folder is None, shards=folder,
                                       shards_dtype=args.shards_dtype,
                                       ignore_identical_ids=args.ignore_identical_ids)
        self.shards_folder = folder
        if previous is not None and previous != folder and rank() == 0:
            shutil.rmtree(previous, ignore_errors=True)
        return self.last.metrics


if __name__ == "__main__":  # `python -m twotower.common.eval.evaluate ...`: the command line (evaluate_cli.py)
    from twotower.common.eval.cli import main

    code = main()
    leave_processes()
    sys.exit(code)
