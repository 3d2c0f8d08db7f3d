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
* teacher scores → ``{qid: {pid: score}}``: JSONL with either ``{"qid", "pid", "score"}`` or
  ``{"qid", "scores": {pid: score}}`` per line, or the public pickle (``.pkl``/``.pkl.gz``)
  holding ``{qid: {pid: score}}``.  All ids are returned as strings.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Iterable, Mapping

import datasets

from .build import build_dataset
from .corpus import load_corpus, load_queries
from .errors import BadLinePolicy, DataError, SkipReport
from .io import (DuplicateChecker, as_id, as_text, first_line_with, get_field, iter_lines,
                 open_binary, parse_json_object, parse_score, split_tsv)
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


class _ScoresUnpickler(pickle.Unpickler):
    """Only plain containers and numbers: a teacher-score pickle has no reason to run code."""

    _ALLOWED = {("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _is_pickle(path: Path) -> bool:
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    return bool(suffixes) and suffixes[-1] in (".pkl", ".pickle")


def _load_pickled_scores(path: Path) -> dict[str, dict[str, float]]:
    try:
        with open_binary(path) as f:
            raw = _ScoresUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        raise DataError(f"cannot read the pickle ({type(e).__name__}: {e})", path=path,
                        reason="bad pickle") from None
    if not isinstance(raw, dict):
        raise DataError(f"expected a pickled dict qid -> {{pid: score}}, got "
                        f"{type(raw).__name__}", path=path, reason="bad pickle")
    scores = {}
    for qid, by_pid in raw.items():
        where = f"query {qid!r}"
        if not isinstance(by_pid, dict):
            raise DataError(f"{where}: expected a dict pid -> score, got {type(by_pid).__name__}",
                            path=path, reason="bad pickle")
        scores[as_id(qid, "qid", path, None)] = {
            as_id(pid, "pid", path, None): parse_score(s, f"score of {where}, passage {pid!r}",
                                                       path, None)
            for pid, s in by_pid.items()}
    return scores


def _jsonl_scores_line(path: Path, line_no: int, line: str) -> tuple[str, dict]:
    obj = parse_json_object(path, line_no, line)
    qid = as_id(get_field(obj, "qid", path, line_no), "qid", path, line_no)
    if "scores" in obj:
        by_pid = obj["scores"]
        if not isinstance(by_pid, dict):
            raise DataError("field 'scores' must be an object {pid: score}", path=path,
                            line=line_no, reason="bad scores")
    else:
        by_pid = {get_field(obj, "pid", path, line_no): get_field(obj, "score", path, line_no)}
    return qid, {as_id(pid, "pid", path, line_no): parse_score(s, "score", path, line_no)
                 for pid, s in by_pid.items()}


def _first_line_scoring(path: Path, qid: str, pid: str) -> int | str:
    for line_no, line in iter_lines(path):
        try:
            line_qid, by_pid = _jsonl_scores_line(path, line_no, line)
        except DataError:
            continue
        if line_qid == qid and pid in by_pid:
            return line_no
    return "?"


def load_teacher_scores(path: str | os.PathLike, *, on_error: str = "raise",
                        report: SkipReport | None = None) -> dict[str, dict[str, float]]:
    """Teacher (cross-encoder) scores → ``{qid: {pid: score}}``; JSONL or pickle.

    A (qid, pid) pair scored twice is an error naming both lines (first wins when skipping).
    Pickles are read with an unpickler that refuses anything but dicts, strings and numbers;
    a bad pickle always raises (it has no lines to skip).
    """
    path = resolve_data(path)
    if _is_pickle(path):
        return _load_pickled_scores(path)
    policy = BadLinePolicy(on_error, report)
    policy.report.clear_file(path)
    scores: dict[str, dict[str, float]] = {}
    count = 0
    for line_no, line in iter_lines(path, policy):
        try:
            qid, by_pid = _jsonl_scores_line(path, line_no, line)
            known = scores.get(qid, {})
            for pid in by_pid:
                if pid in known:
                    first = "an earlier line" if policy.skipping else \
                        f"line {_first_line_scoring(path, qid, pid)}"
                    raise DataError(f"duplicate score for query {qid!r}, passage {pid!r}: also "
                                    f"on {first}", path=path, line=line_no,
                                    reason="duplicate score")
        except DataError as e:
            policy.handle(e)
            continue
        scores.setdefault(qid, {}).update(by_pid)
        count += 1
    policy.finish_file(path, count)
    return scores


def check_teacher_scores(scores: Mapping[str, Mapping[str, float]],
                         pairs: Iterable[tuple[str, str]], *, source: object = "teacher scores",
                         max_listed: int = 5) -> None:
    """Raise a DataError naming the count and first missing (qid, pid) pairs, if any."""
    pairs = list(pairs)
    missing = [(q, p) for q, p in pairs if p not in scores.get(q, {})]
    if missing:
        listed = ", ".join(f"({q!r}, {p!r})" for q, p in missing[:max_listed])
        raise DataError(f"{len(missing)} of {len(pairs)} required (qid, pid) pairs have no "
                        f"teacher score; first missing: {listed}", path=source,
                        reason="missing teacher scores")
