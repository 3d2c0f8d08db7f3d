"""Relevance judgements (qrels) and TREC run files.

Both are whitespace-separated (tabs or spaces), plain or gzip.  ``load_qrels`` accepts the TREC
layout ``qid iteration docid relevance`` (MS MARCO ``qrels.*.tsv``) and the 3-column layout
``query-id corpus-id score`` (BEIR), with or without a header line; relevance must be an integer.
Runs are ``qid Q0 docid rank score tag``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Collection, Mapping

from .errors import BadLinePolicy, DataError, SkipReport
from .io import (iter_lines, looks_like_header, parse_int, parse_score, split_whitespace,
                 write_text_atomic)
from .resolve import resolve_data

_QRELS_LAYOUTS = {3: "query-id corpus-id score", 4: "TREC: qid iteration docid relevance"}
_RUN_LAYOUT = "TREC run: qid Q0 docid rank score tag"


def load_qrels(path: str | os.PathLike, *, query_ids: Collection[str] | None = None,
               doc_ids: Collection[str] | None = None, on_error: str = "raise",
               report: SkipReport | None = None) -> dict[str, dict[str, int]]:
    """Read qrels into ``{qid: {docid: relevance}}`` (all ids strings, file order kept).

    With ``query_ids``/``doc_ids`` given, a judgement naming an id outside them is an error
    naming file:line and the id (or a counted skip).  A repeated (qid, docid) pair is an error
    naming both lines (first one wins when skipping).
    """
    path = resolve_data(path)
    policy = BadLinePolicy(on_error, report)
    policy.report.clear_file(path)
    qrels: dict[str, dict[str, int]] = {}
    first_seen: dict[tuple[str, str], int] = {}
    columns = None
    count = 0
    for line_no, line in iter_lines(path, policy):
        if columns is None:
            cells = line.split()
            columns = len(cells)
            if columns not in _QRELS_LAYOUTS:
                raise DataError(f"expected 3 columns ({_QRELS_LAYOUTS[3]}) or 4 columns "
                                f"({_QRELS_LAYOUTS[4]}), got {columns}", path=path,
                                line=line_no, reason="wrong number of columns")
            if looks_like_header(cells):
                continue
        try:
            cells = split_whitespace(path, line_no, line, columns, _QRELS_LAYOUTS[columns])
            qid, docid, rel = (cells[0], cells[2], cells[3]) if columns == 4 else cells
            relevance = parse_int(rel, "relevance", path, line_no)
            if query_ids is not None and qid not in query_ids:
                raise DataError(f"qrels name unknown query id {qid!r} (not in the queries)",
                                path=path, line=line_no, reason="unknown query id")
            if doc_ids is not None and docid not in doc_ids:
                raise DataError(f"qrels name unknown document id {docid!r} (not in the corpus)",
                                path=path, line=line_no, reason="unknown document id")
            if (qid, docid) in first_seen:
                raise DataError(f"duplicate judgement for query {qid!r}, document {docid!r}: "
                                f"also on line {first_seen[(qid, docid)]}", path=path,
                                line=line_no, reason="duplicate judgement")
        except DataError as e:
            policy.handle(e)
            continue
        first_seen[(qid, docid)] = line_no
        qrels.setdefault(qid, {})[docid] = relevance
        count += 1
    policy.finish_file(path, count)
    return qrels


def load_run(path: str | os.PathLike, *, on_error: str = "raise",
             report: SkipReport | None = None) -> dict[str, dict[str, float]]:
    """Read a TREC run into ``{qid: {docid: score}}``; rank and tag are checked, not kept."""
    path = resolve_data(path)
    policy = BadLinePolicy(on_error, report)
    policy.report.clear_file(path)
    run: dict[str, dict[str, float]] = {}
    first_seen: dict[tuple[str, str], int] = {}
    count = 0
    for line_no, line in iter_lines(path, policy):
        try:
            qid, _q0, docid, rank, score, _tag = split_whitespace(path, line_no, line, 6,
                                                                  _RUN_LAYOUT)
            parse_int(rank, "rank", path, line_no)
            value = parse_score(score, "score", path, line_no)
            if (qid, docid) in first_seen:
                raise DataError(f"document {docid!r} listed twice for query {qid!r}: also on "
                                f"line {first_seen[(qid, docid)]}", path=path, line=line_no,
                                reason="duplicate run entry")
        except DataError as e:
            policy.handle(e)
            continue
        first_seen[(qid, docid)] = line_no
        run.setdefault(qid, {})[docid] = value
        count += 1
    policy.finish_file(path, count)
    return run


def _check_token(value: str, what: str) -> str:
    value = str(value)
    if not value or any(ch.isspace() for ch in value):
        raise DataError(f"{what} {value!r} cannot be written to a TREC run (empty or contains "
                        f"whitespace)", reason=f"bad {what}")
    return value


def ranked_ids(scores: Mapping[str, float]) -> list[str]:
    """Documents by descending score, ties by id: the order write_run writes."""
    return sorted(scores, key=lambda d: (-scores[d], d))


def write_run(run: Mapping[str, Mapping[str, float]], path: str | os.PathLike,
              tag: str = "twotower", depth: int | None = None) -> Path:
    """Write ``{qid: {docid: score}}`` as a TREC run, atomically (temp file + ``os.replace``).

    Documents are ranked by descending score (ties by docid, so output is deterministic),
    optionally cut to ``depth`` per query.  Scores are written with ``repr`` so they round-trip
    exactly; non-finite scores and ids or tags containing whitespace are errors.
    """
    tag = _check_token(tag, "tag")
    path = Path(path)

    def write(f) -> None:  # streamed: a full MS MARCO dev run is millions of lines
        for qid, docs in run.items():
            qid = _check_token(qid, "query id")
            scored = []
            for docid, score in docs.items():
                score = float(score)
                if not math.isfinite(score):
                    raise DataError(f"score {score!r} of query {qid!r}, document {docid!r} is "
                                    f"not finite", path=path, reason="bad score")
                scored.append((-score, _check_token(docid, "document id"), score))
            scored.sort()
            f.writelines(f"{qid} Q0 {docid} {rank} {score!r} {tag}\n"
                         for rank, (_, docid, score) in enumerate(scored[:depth], 1))

    write_text_atomic(path, write)
    return path
