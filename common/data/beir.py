"""BEIR dataset folders: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``.

Each of the three files may also be gzipped (``corpus.jsonl.gz``...).  Unlike BEIR's
``GenericDataLoader`` (which keeps queries in qrels order and silently drops qrels whose query
is missing), queries keep their file order and qrels naming an unknown query or document are an
error naming file:line and the id, unless the caller opts into counted skipping.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from .corpus import column, load_corpus, load_queries
from .errors import DataError, SkipReport, check_on_error
from .resolve import resolve_data
from .ids import IdIndex
from .trec import load_qrels


@dataclass
class RetrievalData:
    """One evaluation (or training) split of a retrieval dataset."""

    corpus: datasets.Dataset  # id, title, text
    queries: datasets.Dataset  # id, text: only queries judged in this split, in file order
    qrels: dict[str, dict[str, int]]  # qid -> docid -> relevance
    name: str
    split: str
    report: SkipReport = field(default_factory=SkipReport)  # bad lines skipped (if opted in)


def _find(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"BEIR folder has no {name} (or {name}.gz)", path=folder,
                    reason="missing file")


def beir_splits(folder: str | os.PathLike) -> list[str]:
    """Split names available under ``<folder>/qrels``."""
    qrels_dir = resolve_data(folder) / "qrels"
    if not qrels_dir.is_dir():
        return []
    return sorted(p.name.split(".")[0] for p in qrels_dir.iterdir()
                  if p.name.endswith((".tsv", ".tsv.gz")))


def load_beir(path_or_name: str | os.PathLike, split: str = "test", *,
              on_error: str = "raise", report: SkipReport | None = None,
              cache_dir: str | os.PathLike | None = None) -> RetrievalData:
    """Load a BEIR folder (a path, a name under ``$TWOTOWER_DATA``, or a BEIR download)."""
    check_on_error(on_error)
    folder = resolve_data(path_or_name)
    if not folder.is_dir():
        raise DataError("expected a BEIR folder (corpus.jsonl, queries.jsonl, qrels/)",
                        path=folder, reason="not a folder")
    try:
        qrels_path = _find(folder / "qrels", f"{split}.tsv")
    except DataError:
        available = ", ".join(beir_splits(folder)) or "none"
        raise DataError(f"no qrels for split {split!r} (qrels/{split}.tsv); available splits: "
                        f"{available}", path=folder, reason="missing split") from None
    report = report if report is not None else SkipReport()
    corpus = load_corpus(_find(folder, "corpus.jsonl"), on_error=on_error, report=report,
                         cache_dir=cache_dir)
    queries = load_queries(_find(folder, "queries.jsonl"), on_error=on_error, report=report,
                           cache_dir=cache_dir)
    query_ids = column(queries, "id")
    qrels = load_qrels(qrels_path, query_ids=set(query_ids),
                       doc_ids=IdIndex(corpus), on_error=on_error, report=report)
    judged = [i for i, qid in enumerate(query_ids) if qid in qrels]
    return RetrievalData(corpus=corpus, queries=queries.select(judged), qrels=qrels,
                         name=folder.resolve().name, split=split, report=report)
