"""Pseudo labels for PAIR stage 1 (RocketQA's denoised pseudo-labelling: Qu et al., "RocketQA:
An Optimized Training Approach to Dense Passage Retrieval for Open-Domain Question Answering",
NAACL 2021, Sec. 4: unlabelled questions, candidates retrieved, a cross-encoder keeps passages
scored above 0.9 as positives and below 0.1 as negatives).

The teacher scores the top-k candidates (BM25 over the corpus, or a given TREC run) of every
query of `data.path`; the thresholds apply to sigmoid(teacher logit) when pseudo.apply_sigmoid
(a one-logit cross-encoder's relevance probability), else to the raw score. All teacher scores
are kept in the pool, so Margin-MSE can use them too.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from twotower.common import data as D
from twotower.common.eval.bm25 import BM25Index
from twotower.common.model.distributed import broadcast_object, is_distributed, is_main
from twotower.finetune.args import DataArgs
from twotower.finetune.data import TextStore, TrainingPool
from twotower.finetune.groups import TrainGroup
from twotower.finetune.data_files import load_target_corpus, named

log = logging.getLogger("twotower.finetune")


def queries_file(data: DataArgs, root: Path) -> Path:
    """Exactly data.queries (inside data.path, or absolute). Only a recipe that leaves it at its
    default (queries.tsv) over a BEIR folder without that file reads the folder's queries.jsonl,
    and the log says so; anything else missing is an error naming data.queries and the folder."""
    path = Path(data.queries) if Path(data.queries).is_absolute() else root / data.queries
    if path.is_file():
        return path
    if not named(data, "queries") and (root / "queries.jsonl").is_file():
        log.info("pseudo labels: data.queries is not set and %s has no %s; labelling the BEIR "
                 "queries of %s", root, data.queries, root / "queries.jsonl")
        return root / "queries.jsonl"
    raise D.DataNotFoundError(f"data.queries={data.queries!r} is not in the data folder "
                              f"{str(root)!r}; name the file of the queries to label",
                              reason="data not found")


def load_unlabelled(data: DataArgs):
    """(corpus Dataset, queries Dataset, folder) of an MS MARCO-layout or BEIR folder; the
    queries are exactly data.queries (queries_file), JSONL (BEIR) or TSV (MS MARCO)."""
    corpus, root = load_target_corpus(data, {})
    queries = queries_file(data, root)
    if queries.name.endswith((".jsonl", ".jsonl.gz")):
        return corpus, D.load_queries(queries), root
    return corpus, D.load_msmarco_queries(queries), root


def candidate_run(data: DataArgs, corpus, qids, qtexts, root: Path) -> dict:
    k = data.pseudo.top_k
    if data.pseudo.candidates == "bm25":
        return BM25Index(corpus).search(qids, qtexts, k)
    path = Path(data.pseudo.candidates)
    run = D.load_run(path if path.is_absolute() or path.exists() else root / path)
    return {q: dict(sorted(run.get(q, {}).items(), key=lambda kv: -kv[1])[:k]) for q in qids}


def labelled_queries(data: DataArgs, query_store: TextStore) -> list:
    """The ids of the queries to label: all, or the few-shot sample of data.max_queries."""
    qids = list(query_store.ids)
    if data.max_queries and data.max_queries < len(qids):  # label only the few-shot sample
        keep = np.sort(np.random.default_rng(data.sample_seed).choice(len(qids), data.max_queries,
                                                                      replace=False))
        qids = [qids[i] for i in keep]
    return qids


def pseudo_candidates(data: DataArgs):
    """The BM25 candidate run of a pseudo-labelling stage, ranked on the main process only and
    sent to the others, so that a run of N processes builds one BM25 index, not N. Collective:
    every process calls it, at the same point, outside any main-process-first block; None (each
    pseudo_label_pool ranks for itself) on one process or with a candidate run file."""
    if data.kind != "pseudo" or data.pseudo.candidates != "bm25" or not is_distributed():
        return None
    run = None
    if is_main():
        corpus, queries, root = load_unlabelled(data)
        query_store = TextStore.from_table(queries, with_title=False)
        qids = labelled_queries(data, query_store)
        run = candidate_run(data, corpus, qids, [query_store[q] for q in qids], root)
    return broadcast_object(run)


def pseudo_label_pool(data: DataArgs, teacher, candidates=None) -> TrainingPool:
    """`candidates`: the run pseudo_candidates computed ({qid: {pid: score}}), or None to rank
    here."""
    corpus, queries, root = load_unlabelled(data)
    docs = TextStore.from_table(corpus, with_title=True)
    query_store = TextStore.from_table(queries, with_title=False)
    qids = labelled_queries(data, query_store)
    qtexts = [query_store[q] for q in qids]
    run = (candidate_run(data, corpus, qids, qtexts, root) if candidates is None
           else candidates)
    pairs = [(q, p) for q in qids for p in run.get(q, {})]
    scores = teacher.score([query_store[q] for q, _ in pairs], [docs[p] for _, p in pairs])
    teacher_scores: dict = {}
    for (q, p), s in zip(pairs, scores):
        teacher_scores.setdefault(q, {})[p] = float(s)
    args = data.pseudo
    squash = (lambda s: 1.0 / (1.0 + math.exp(-s))) if args.apply_sigmoid else (lambda s: s)
    groups = []
    for q in qids:
        ranked = sorted(teacher_scores.get(q, {}).items(), key=lambda kv: -kv[1])
        positives = [p for p, s in ranked if squash(s) >= args.pos_threshold][:args.max_positives]
        negatives = [p for p, s in ranked if squash(s) <= args.neg_threshold]
        if positives:
            groups.append(TrainGroup(q, positives, negatives))
    log.info("pseudo labels: %d of %d queries have a positive (>= %.2f); %.1f negatives "
             "(<= %.2f) per kept query", len(groups), len(qids), args.pos_threshold,
             np.mean([len(g.negatives) for g in groups]) if groups else 0.0, args.neg_threshold)
    if not groups:
        raise ValueError(f"pseudo labelling of {root}: no query has a candidate with teacher "
                         f"score >= {args.pos_threshold} (data.pseudo.pos_threshold)")
    return TrainingPool(groups, query_store, docs, teacher=teacher_scores,
                        source=f"{root} (pseudo-labelled by {teacher.args.model})")
