"""Synthetic MS MARCO passage data at any size, in the official layouts (used by benchmarks/scale.py).

What it imitates (figures of the real MS MARCO passage v1 release): 8,841,823 passages of about
56 words (here a gamma distribution, mean 56, sd 23, clipped to 1..300 words), pids 0..N-1 in
`collection.tsv`; 808,731 training queries of about 6 words (3..10 here) of which 502,939 are
judged, with 532,761 judgements in `qrels.train.tsv` (TREC `qid 0 pid 1`); the 6,980
`queries.dev.small.tsv` queries with their `qrels.dev.small.tsv`; and
`msmarco-hard-negatives.jsonl.gz` of sentence-transformers (a line per judged training query,
`{"qid", "pos": [pids], "neg": {system: [pids]}}`), here with 2 systems x 50 negatives drawn at
random (the real file has more systems); on request (`write_teacher_scores`) the
cross-encoder scores of every (query, positive) and (query, hard negative) pair of those files as
the public pickle `cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz` holds them (`{qid (int):
{pid (int): score}}`, ~50 M pairs at full size; positives ~ N(8, 1), negatives ~ N(2, 3) logits,
so a 3.0 margin drops some negatives). Below the full size, query and judgement counts shrink
in proportion to the collection (the dev set stays 6,980 queries).

Texts are spans of the real Wikipedia text under $TWOTOWER_DATA/wiki, so the tokenizer sees real
words; a query is a span of its first positive passage, so BM25 and a dense model find something.
Nothing here is a meaningful training set: it measures the data path, not quality.
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path

import numpy as np

FULL_PASSAGES, FULL_QUERIES, FULL_JUDGED, FULL_QRELS = 8_841_823, 808_731, 502_939, 532_761
WORDPIECES = 1.3  # WordPiece tokens per word of this text, about
DEV_QUERIES, NEG_SYSTEMS, NEGS_PER_SYSTEM = 6_980, ("bm25", "msmarco-distilbert-base-v3"), 50


def wiki_words() -> np.ndarray:
    root = os.environ.get("TWOTOWER_DATA")
    if not root or not (Path(root) / "wiki").is_dir():
        raise SystemExit(f"TWOTOWER_DATA={root!r} has no wiki/ folder: the synthetic texts are "
                         "drawn from it")
    words = []
    for name in ("wiki_summaries.jsonl", "wiki_articles.jsonl"):
        with open(Path(root) / "wiki" / name, encoding="utf-8") as f:
            for line in f:
                words.extend(json.loads(line)["text"].split())
    return np.array(words, dtype=object)


def _span(words: np.ndarray, rng, length: int) -> str:
    start = int(rng.integers(len(words) - length))
    return " ".join(words[start:start + length])


def _query(words: np.ndarray, rng, start: int, length: int) -> str:
    """3..10 consecutive words of the passage at words[start:start + length]."""
    n = min(length, int(rng.integers(3, 11)))
    first = start + int(rng.integers(length - n + 1))
    return " ".join(words[first:first + n])


def write_msmarco(root: Path, passages: int, seed: int = 0) -> Path:
    """The files of a collection of `passages` passages under `root` (skipped when complete)."""
    done = root / ".complete"
    if done.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = wiki_words()
    lengths = np.clip(rng.gamma(6.0, 56 / 6.0, size=passages).round(), 1, 300).astype(np.int64)
    starts = rng.integers(len(words) - lengths)
    with open(root / "collection.tsv", "w", encoding="utf-8") as f:
        for pid, (start, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
            f.write(f"{pid}\t{' '.join(words[start:start + n])}\n")
    share = passages / FULL_PASSAGES
    n_queries = max(100, round(FULL_QUERIES * share))
    n_judged = max(50, round(FULL_JUDGED * share))
    n_extra = round((FULL_QRELS - FULL_JUDGED) * share)
    qids = rng.choice(2 * (n_queries + DEV_QUERIES), n_queries + DEV_QUERIES, replace=False)
    positives = rng.integers(passages, size=n_queries + DEV_QUERIES)
    texts = [_query(words, rng, int(starts[p]), int(lengths[p])) for p in positives.tolist()]
    _queries_and_qrels(root, "train", qids[:n_queries], positives[:n_queries], texts[:n_queries],
                       n_judged, n_extra, passages, rng)
    _queries_and_qrels(root, "dev.small", qids[n_queries:], positives[n_queries:],
                       texts[n_queries:], DEV_QUERIES, round(DEV_QUERIES * 0.065), passages, rng)
    done.write_text(json.dumps({"passages": passages, "queries": n_queries, "seed": seed}))
    return root


def _queries_and_qrels(root, split, qids, positives, texts, n_judged, n_extra, passages, rng):
    """Queries i < n_judged are judged (their positive, and for n_extra of them the next pid)."""
    extra = set(rng.choice(n_judged, min(n_extra, n_judged), replace=False).tolist())
    with open(root / f"queries.{split}.tsv", "w", encoding="utf-8") as fq, \
            open(root / f"qrels.{split}.tsv", "w", encoding="utf-8") as fr:
        for i, (qid, pid, text) in enumerate(zip(qids.tolist(), positives.tolist(), texts)):
            fq.write(f"{qid}\t{text}\n")
            if i < n_judged:
                fr.write(f"{qid}\t0\t{pid}\t1\n")
                if i in extra:
                    fr.write(f"{qid}\t0\t{(pid + 1) % passages}\t1\n")
    if split != "train":
        return
    with gzip.open(root / "msmarco-hard-negatives.jsonl.gz", "wt", compresslevel=1) as f:
        for qid, pid in zip(qids[:n_judged].tolist(), positives[:n_judged].tolist()):
            neg = {s: rng.integers(passages, size=NEGS_PER_SYSTEM).tolist() for s in NEG_SYSTEMS}
            f.write(json.dumps({"qid": qid, "pos": [pid], "neg": neg}) + "\n")


def write_pretraining_corpus(path: Path, words_total: int, seed: int = 0) -> Path:
    """A Wikipedia-like corpus.jsonl (`_id`, `title`, `text`; documents of ~300 words) with
    `words_total` words: about 1.3 WordPiece tokens a word."""
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    words = wiki_words()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        written, doc = 0, 0
        while written < words_total:
            n = int(min(words_total - written, rng.integers(100, 500)))
            f.write(json.dumps({"_id": str(doc), "title": f"doc {doc}",
                                "text": _span(words, rng, n)}) + "\n")
            written, doc = written + n, doc + 1
    os.replace(tmp, path)
    return path


def write_teacher_scores(root: Path, seed: int = 0) -> Path:
    """`ce-scores.pkl.gz` beside the files of `write_msmarco` (skipped when written)."""
    path = root / "ce-scores.pkl.gz"
    if path.exists():
        return path
    rng, scores = np.random.default_rng(seed), {}
    with open(root / "qrels.train.tsv", encoding="utf-8") as f:
        for line in f:
            qid, _, pid, _ = line.split("\t")
            scores.setdefault(int(qid), {})[int(pid)] = float(rng.normal(8.0, 1.0))
    with gzip.open(root / "msmarco-hard-negatives.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            by_pid = scores.setdefault(obj["qid"], {})
            negs = [p for ps in obj["neg"].values() for p in ps if p not in by_pid]
            by_pid.update(zip(negs, rng.normal(2.0, 3.0, size=len(negs)).tolist()))
    tmp = path.with_suffix(".tmp")
    with gzip.open(tmp, "wb", compresslevel=1) as f:
        pickle.dump(scores, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
    return path
