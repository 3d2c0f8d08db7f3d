"""Retrieval evaluation: dense (encoder + faiss), BM25, and reranking of a candidate run.

Library:  evaluate_dense(encoder, data), evaluate_bm25(data), evaluate_rerank(encoder, data, run)
          -> EvalResult(metrics, run, per_query, info); write_outputs(result, dir) writes
          run.trec, metrics.json and report.md.
CLI:      python -m common.evaluate --model bundled:all-MiniLM-L6-v2 --data scifact --split test
          python -m common.evaluate --system bm25 --data scifact
          python -m common.evaluate --model M --data msmarco_sample --rerank bm25_top20.trec
Metric definitions: common/metrics.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Sequence

from common.bm25 import BM25Args, BM25Index
from common.data import (DataError, RetrievalData, column, load_beir, load_msmarco_collection,
                         load_msmarco_queries, load_qrels, load_run, resolve_data)
from common.metrics import aggregate, per_query, resolve_measures
from common.report import OUTPUT_FILES, existing_outputs, write_outputs  # noqa: F401 (re-exported)
from common.search import dense_search, rerank

logger = logging.getLogger("common.evaluate")
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
    qrels = load_qrels(root / "qrels.tsv", query_ids=set(query_ids),
                       doc_ids=set(column(corpus, "id")))
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


def subsample(data: RetrievalData, max_queries: int = 0, max_docs: int = 0,
              seed: int = 0) -> RetrievalData:
    """A quick slice: `max_queries` judged queries sampled with `seed` (0 = all), and a corpus of
    every document judged for them plus `max_docs` others sampled with `seed` (0 = all)."""
    if not max_queries and not max_docs:
        return data
    rng = random.Random(seed)
    qids, _ = judged_queries(data)
    if max_queries and max_queries < len(qids):
        qids = sorted(rng.sample(qids, max_queries), key=qids.index)
    keep_q = set(qids)
    qrels = {q: dict(docs) for q, docs in data.qrels.items() if q in keep_q}
    queries = data.queries.select(
        [i for i, q in enumerate(column(data.queries, "id")) if str(q) in keep_q])
    corpus = data.corpus
    if max_docs:
        judged = {d for docs in qrels.values() for d in docs}
        doc_ids = [str(d) for d in column(corpus, "id")]
        others = [i for i, d in enumerate(doc_ids) if d not in judged]
        extra = set(rng.sample(others, min(max_docs, len(others))))
        corpus = corpus.select([i for i, d in enumerate(doc_ids) if d in judged or i in extra])
    return dataclasses.replace(data, corpus=corpus, queries=queries, qrels=qrels)


def _corpus_rows(data) -> tuple[list[str], list[dict]]:
    titles = column(data.corpus, "title") if "title" in data.corpus.column_names else None
    texts = column(data.corpus, "text")
    ids = [str(d) for d in column(data.corpus, "id")]
    rows = [{"title": titles[i] if titles else "", "text": texts[i]} for i in range(len(ids))]
    return ids, rows


def _finish(data, run: Run, info: dict, measures, started: float) -> EvalResult:
    t = time.perf_counter()
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
            progress: bool, cache_dir: str | Path | None = None) -> tuple:
    """(document embeddings, query embeddings, timing dict). With `cache_dir`, corpus embeddings
    come from / go to common.embed_cache (keyed by model, texts and settings)."""
    t = time.perf_counter()
    cache_info = {}
    if cache_dir is not None:
        from common.embed_cache import EmbeddingCache
        from common.encoder import doc_text

        cache = EmbeddingCache(cache_dir)
        doc_emb = cache.encode(encoder, [doc_text(r) for r in rows], tower="doc",
                               batch_size=batch_size, progress=progress)
        cache_info = {"corpus_cache_hit": cache.hits == 1}
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
                   cache_dir: str | Path | None = None) -> EvalResult:
    """Encode corpus and judged queries, retrieve the top k by inner product, score.
    cache_dir: keep corpus embeddings on disk (common/embed_cache.py) for re-evaluations."""
    started = time.perf_counter()
    qids, qtexts = judged_queries(data)
    doc_ids, rows = _corpus_rows(data)
    doc_emb, query_emb, timing = _encode(encoder, rows, qtexts, batch_size, progress, cache_dir)
    t = time.perf_counter()
    run = dense_search(query_emb, doc_emb, qids, doc_ids, k=k, index=index,
                       similarity=encoder.similarity, search_params=search_params)
    timing["search_s"] = round(time.perf_counter() - t, 3)
    info = {**_encoder_info(encoder), "mode": "retrieve", "k": k, "index": index,
            "n_docs": len(doc_ids), "timing": timing}
    return _finish(data, run, info, measures, started)


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
                    progress: bool = True) -> EvalResult:
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
    return _finish(data, run, info, measures, started)


def evaluate_bm25(data: RetrievalData, k: int = 1000,
                  candidates: Mapping[str, Mapping[str, float]] | None = None,
                  args: BM25Args | None = None,
                  measures: Sequence[str] | None = None) -> EvalResult:
    """BM25 (common/bm25.py) over the whole corpus, or scoring only `candidates` when given."""
    started = time.perf_counter()
    args = args or BM25Args()
    qids, qtexts = judged_queries(data)
    t = time.perf_counter()
    index = BM25Index(data.corpus, args)
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
    return _finish(data, run, info, measures, started)


def evaluator_from_args(eval_args, k: int = 1000,
                        seed: int = 0) -> Callable[[Any], Dict[str, float]]:
    """For evaluation before, during and after training: loads and slices `EvalArgs.data` once
    and returns `encoder -> metrics` (dense retrieval, exact search); the slice is its `.data`,
    the EvalResult of its latest call its `.last` (for the reports written after training)."""
    data = subsample(load_eval_data(eval_args.data, eval_args.split), eval_args.max_queries,
                     eval_args.max_docs, seed)

    def evaluate(encoder, progress: bool = False) -> Dict[str, float]:
        evaluate.last = evaluate_dense(  # type: ignore[attr-defined]
            encoder, data, k=k, batch_size=eval_args.batch_size, measures=eval_args.metrics,
            progress=progress)
        return evaluate.last.metrics  # type: ignore[attr-defined]

    evaluate.data, evaluate.last = data, None  # type: ignore[attr-defined]
    return evaluate


# ---------------------------------------------------------------------------------- CLI
def slug(text: str) -> str:
    text = text.split(":", 1)[1] if text.startswith("bundled:") else text
    text = Path(text).name if Path(text).exists() else text
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m common.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # a mistyped flag must not match a prefix
    p.add_argument("--system", choices=("dense", "bm25"), default="dense")
    p.add_argument("--model", help="hub id, local folder or bundled:all-MiniLM-L6-v2 (dense)")
    p.add_argument("--data", required=True, help="data name under $TWOTOWER_DATA or a folder")
    p.add_argument("--split", default="test")
    p.add_argument("--rerank", metavar="RUNFILE", help="TREC run whose candidates are scored")
    p.add_argument("--k", type=int, help="retrieval depth (default 1000; not with --rerank)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--index", help="dense retrieval: flat (exact, default) | hnsw | ivf | a faiss "
                   "index_factory string such as IVF4096,PQ64")
    p.add_argument("--search-params", help="faiss parameters, e.g. efSearch=512 or nprobe=64")
    p.add_argument("--metrics", nargs="+",
                   help="default: nDCG@10 MRR@10 MAP@100 R@10 R@100 R@1000 (any ir_measures name)")
    p.add_argument("--max-queries", type=int, default=0, help="sample this many judged queries")
    p.add_argument("--max-docs", type=int, default=0,
                   help="corpus = judged documents + this many sampled others")
    p.add_argument("--seed", type=int, default=0, help="for --max-queries/--max-docs sampling")
    p.add_argument("--output-dir", help="default runs/eval/<model>-<data>-<split>")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--no-progress", action="store_true")
    enc = p.add_argument_group("encoder settings (default: what the model folder says)")
    enc.add_argument("--pooling", choices=("auto", "mean", "cls"))
    enc.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None)
    enc.add_argument("--max-length", type=int, help="sets both query and document max tokens")
    enc.add_argument("--max-query-length", type=int)
    enc.add_argument("--max-doc-length", type=int)
    enc.add_argument("--query-prefix")
    enc.add_argument("--doc-prefix")
    bm = p.add_argument_group("BM25 (--system bm25)")
    bm.add_argument("--bm25-k1", type=float, help=f"default {BM25Args.k1}")
    bm.add_argument("--bm25-b", type=float, help=f"default {BM25Args.b}")
    return p


def _model_args(ns):
    from common.args import ModelArgs

    given = {"pooling": ns.pooling, "normalize": ns.normalize, "query_prefix": ns.query_prefix,
             "doc_prefix": ns.doc_prefix, "max_query_length": ns.max_query_length or ns.max_length,
             "max_doc_length": ns.max_doc_length or ns.max_length}
    return ModelArgs(name_or_path=ns.model, **{k: v for k, v in given.items() if v is not None})


def _check_flags(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    """Flags that do not apply to the chosen system/mode are errors, not silently ignored."""
    def given(*names):
        return [f"--{n.replace('_', '-')}" for n in names if getattr(ns, n) is not None]

    encoder_flags = given("pooling", "normalize", "max_length", "max_query_length",
                          "max_doc_length", "query_prefix", "doc_prefix")
    if ns.system == "dense":
        if not ns.model:
            parser.error("--model is required for --system dense")
        if given("bm25_k1", "bm25_b"):
            parser.error(f"{', '.join(given('bm25_k1', 'bm25_b'))} need --system bm25")
    elif ns.model or encoder_flags:
        parser.error(f"--system bm25 takes no {', '.join(given('model') + encoder_flags)}")
    if (ns.system == "bm25" or ns.rerank) and given("index", "search_params"):
        parser.error("--index/--search-params are for dense retrieval (not bm25 or --rerank)")
    if ns.rerank and (ns.max_docs or ns.k is not None):
        parser.error("--max-docs and --k do not apply to --rerank (the candidates are scored)")
    if ns.k is not None and ns.k <= 0 or ns.max_queries < 0 or ns.max_docs < 0:
        parser.error("--k must be > 0; --max-queries and --max-docs >= 0")
    try:
        resolve_measures(ns.metrics)
    except ValueError as err:
        parser.error(str(err))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    _check_flags(parser, ns)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    try:
        data_path = resolve_data(ns.data)
    except DataError as err:
        parser.error(str(err))
    model_slug = "bm25" if ns.system == "bm25" else slug(ns.model)
    default_dir = Path("runs", "eval", f"{model_slug}-{data_path.name}-{ns.split}"
                       + ("-rerank" if ns.rerank else ""))
    output_dir = Path(ns.output_dir) if ns.output_dir else default_dir
    found = existing_outputs(output_dir)
    if found and not ns.overwrite:  # refuse before any expensive work
        parser.error(f"{output_dir} already has {', '.join(found)}; pass --overwrite to replace "
                     "them, or choose another --output-dir")
    try:
        data = subsample(load_eval_data(data_path, ns.split), ns.max_queries, ns.max_docs, ns.seed)
        candidates = load_run(ns.rerank) if ns.rerank else None
    except DataError as err:  # names file and line; a traceback adds nothing
        parser.exit(1, f"error: {err}\n")
    depth = ns.k or 1000
    if ns.system == "bm25":
        bm25_args = BM25Args(**{f: v for f, v in (("k1", ns.bm25_k1), ("b", ns.bm25_b))
                                if v is not None})
        result = evaluate_bm25(data, k=depth, candidates=candidates, measures=ns.metrics,
                               args=bm25_args)
    else:
        from common.encoder import Encoder  # torch: only when needed

        encoder = Encoder.load(_model_args(ns))
        if candidates is not None:
            result = evaluate_rerank(encoder, data, candidates, batch_size=ns.batch_size,
                                     measures=ns.metrics, progress=not ns.no_progress)
        else:
            result = evaluate_dense(encoder, data, k=depth, batch_size=ns.batch_size,
                                    index=ns.index or "flat", search_params=ns.search_params,
                                    measures=ns.metrics, progress=not ns.no_progress)
    extra = {"data_path": str(data_path), "candidates": ns.rerank,
             "max_queries": ns.max_queries or None, "max_docs": ns.max_docs or None,
             "command": "python -m common.evaluate "
                        + shlex.join(sys.argv[1:] if argv is None else list(argv))}
    paths = write_outputs(result, output_dir, overwrite=ns.overwrite, data=data,
                          extra={k: v for k, v in extra.items() if v is not None})
    width = max(len(n) for n in result.metrics)
    for name, value in result.metrics.items():
        print(f"{name:<{width}}  {value:.4f}")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
