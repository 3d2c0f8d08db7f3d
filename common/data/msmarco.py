"""MS MARCO passage files in their official layouts.

* ``collection.tsv``: ``pid<TAB>passage`` → corpus Dataset ``id, title(""), text``;
* ``queries.*.tsv``: ``qid<TAB>query`` → Dataset ``id, text``;
* ``qrels.*.tsv`` (TREC layout) → :func:`twotower.common.data.load_qrels`;
* ``triples.train*.tsv``: ``query<TAB>positive<TAB>negative`` texts → Dataset
  ``query, positive, negative``;
* hard negatives JSONL ``{"qid", "pos": [pids], "neg": {"<system>": [pids]}}`` → Dataset
  ``qid, pos, neg, neg_system``: ``neg`` lists each negative pid once (first system wins) and
  ``neg_system[i]`` names the system that listed ``neg[i]``.  Negatives are not filtered
  against ``pos``; samplers should drop ``neg`` entries that are also positives;
* teacher scores → :mod:`twotower.common.data.scores`.  All ids are returned as strings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import datasets

from .build import build_dataset
from .corpus import load_corpus, load_queries
from .errors import BadLinePolicy, DataError, SkipReport
from .io import (DuplicateChecker, as_id, as_text, first_line_with, get_field, iter_lines,
                 parse_json_object, split_tsv)
from .resolve import resolve_data

_List = getattr(datasets, "List", None) or datasets.Sequence
TRIPLE_FEATURES = datasets.Features({name: datasets.Value("string")
                                     for name in ("query", "positive", "negative")})
HARD_NEGATIVE_FEATURES = datasets.Features({
    "qid": datasets.Value("string"), "pos": _List(datasets.Value("string")),
    "neg": _List(datasets.Value("string")), "neg_system": _List(datasets.Value("string"))})


def load_msmarco_collection(path: str | os.PathLike, **kwargs):
    """``collection.tsv`` (pid, passage) → Dataset ``id, title, text``; kwargs as load_corpus."""
    return load_corpus(path, fmt="tsv", tsv_columns=("id", "text"), **kwargs)


def load_msmarco_queries(path: str | os.PathLike, **kwargs):
    """``queries.*.tsv`` (qid, query) → Dataset ``id, text``; kwargs as load_queries."""
    return load_queries(path, fmt="tsv", tsv_columns=("id", "text"), **kwargs)


def _triple_records(path: Path, options: dict, policy: BadLinePolicy):
    for line_no, line in iter_lines(path, policy):
        try:
            cells = split_tsv(path, line_no, line, 3)
            yield {name: as_text(cell, name, path, line_no)
                   for name, cell in zip(("query", "positive", "negative"), cells)}
        except DataError as e:
            policy.handle(e)


def load_triples(path: str | os.PathLike, *, on_error: str = "raise",
                 report: SkipReport | None = None, streaming: bool = False,
                 cache_dir: str | os.PathLike | None = None):
    """``triples.train`` layout (query, positive, negative texts) → Dataset of those columns."""
    return build_dataset("triples", resolve_data(path), _triple_records, {}, TRIPLE_FEATURES,
                         on_error=on_error, report=report, streaming=streaming,
                         cache_dir=cache_dir)


def _id_list(value, name: str, path: Path, line_no: int) -> list[str]:
    if not isinstance(value, list):
        raise DataError(f"field {name!r} must be a list of ids, got {type(value).__name__}",
                        path=path, line=line_no, reason="bad id list")
    return [as_id(v, name, path, line_no) for v in value]


def _hard_negative_record(path: Path, line_no: int, line: str, systems, seen_systems) -> dict:
    obj = parse_json_object(path, line_no, line)
    qid = as_id(get_field(obj, "qid", path, line_no), "qid", path, line_no)
    pos = _id_list(get_field(obj, "pos", path, line_no), "pos", path, line_no)
    if not pos:
        raise DataError(f"query {qid!r} has no positives", path=path, line=line_no,
                        reason="no positives")
    by_system = get_field(obj, "neg", path, line_no)
    if not isinstance(by_system, dict):
        raise DataError("field 'neg' must be an object {system: [pids]}", path=path,
                        line=line_no, reason="bad neg")
    seen_systems.update(by_system)
    neg, neg_system, listed = [], [], set()
    for system in (systems if systems is not None else by_system):
        for pid in _id_list(by_system.get(system, []), f"neg.{system}", path, line_no):
            if pid not in listed:
                listed.add(pid)
                neg.append(pid)
                neg_system.append(system)
    return {"qid": qid, "pos": pos, "neg": neg, "neg_system": neg_system}


def _hard_negative_records(path: Path, options: dict, policy: BadLinePolicy):
    systems, seen_systems = options["systems"], set()

    def parse(line_no, line):
        return _hard_negative_record(path, line_no, line, systems, set())

    duplicates = DuplicateChecker(path, "query id", lambda key: first_line_with(
        iter_lines(path), lambda n, text: parse(n, text)["qid"], key))
    for line_no, line in iter_lines(path, policy):
        try:
            record = _hard_negative_record(path, line_no, line, systems, seen_systems)
        except DataError as e:
            policy.handle(e)
            continue
        if duplicates.check(record["qid"], line_no, policy):
            yield record
    missing = [s for s in (systems or ()) if s not in seen_systems]
    if missing:  # a typo in a recipe, not a bad line: never skipped
        raise DataError(f"negative system(s) {missing} never appear in the file; systems "
                        f"present: {sorted(seen_systems)}", path=path, reason="unknown system")


def load_hard_negatives(path: str | os.PathLike, *, systems: Iterable[str] | None = None,
                        on_error: str = "raise", report: SkipReport | None = None,
                        streaming: bool = False, cache_dir: str | os.PathLike | None = None):
    """Hard-negatives JSONL → Dataset ``qid, pos, neg, neg_system`` (see the module docstring).

    ``systems`` keeps only negatives from those systems, in that order; naming a system that
    never appears in the file is an error.
    """
    options = {"systems": None if systems is None else tuple(systems)}
    return build_dataset("hard_negatives", resolve_data(path), _hard_negative_records, options,
                         HARD_NEGATIVE_FEATURES, on_error=on_error, report=report,
                         streaming=streaming, cache_dir=cache_dir)


def hard_negative_pairs(dataset) -> list[tuple[str, str]]:
    """Every (qid, pid) pair a hard-negatives Dataset mentions (positives, then negatives)."""
    pairs = []
    for row in dataset:
        pairs.extend((row["qid"], pid) for pid in row["pos"])
        pairs.extend((row["qid"], pid) for pid in row["neg"])
    return pairs
