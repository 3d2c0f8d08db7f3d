"""Teacher (cross-encoder) scores t(q, d) on disk: ``{qid: {pid: score}}`` without the dict.

MS MARCO's public cross-encoder scores cover ~50 M (query, passage) pairs; as a Python dict of
dicts that is several GB in every process (the unpickled file alone peaks at 5.6 GB of anonymous
memory, benchmarks/scale.py). :func:`load_teacher_scores` reads the file once into a
cached Arrow table (a record per JSONL line or per pickled query: ``qid, line, pids, scores``)
plus an index beside it (``.npy``, memory-mapped, shared by every process and later run): the
64-bit hashes of the records' qids, sorted, and their rows. :class:`TeacherScores` answers
``scores[qid][pid]`` / ``scores.get(qid, {})`` from it, a query at a time, exactly (the stored
qid is compared, so a hash collision costs a comparison, never a wrong score).

Layouts: JSONL with ``{"qid", "pid", "score"}`` or ``{"qid", "scores": {pid: score}}`` per line,
or the public pickle (``.pkl``/``.pkl.gz``) holding ``{qid: {pid: score}}`` -- read whole once,
when the table is built (a pickle cannot be streamed), with an unpickler that refuses anything
but dicts, strings and numbers. All ids are strings. A (qid, pid) pair scored on two lines is an
error naming both lines; with ``on_error="skip"`` the later line is dropped and counted (the
check runs once, when the index is built, over the pairs' hashes: no set of 50 M pairs).

Scores added later (a teacher model scoring missing pairs, a JSONL training file's own scores)
go to an in-memory overlay: ``setdefault(qid, {})[pid] = s`` and ``scores[qid] = {...}`` work as
on a dict.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import datasets
import numpy as np

from .build import build_dataset
from .errors import BadLinePolicy, DataError, SkipReport
from .ids import INDEX_VERSION, cache_path, chunk_offsets, hash_id, hash_ids, take_column
from .io import (as_id, get_field, iter_lines, open_binary, parse_json_object, parse_score,
                 write_bytes_atomic)
from .resolve import resolve_data

log = logging.getLogger("twotower.common.data")
_List = getattr(datasets, "List", None) or datasets.Sequence
SCORE_FEATURES = datasets.Features({
    "qid": datasets.Value("string"), "line": datasets.Value("int64"),
    "pids": _List(datasets.Value("string")), "scores": _List(datasets.Value("float64"))})
_BLOCK = 1 << 16      # records read per step while indexing
_RECENT = 4096        # queries whose scores are kept decoded


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


def _pickle_records(path: Path, options: dict, policy: BadLinePolicy) -> Iterator[dict]:
    """A bad pickle always raises (it has no lines to skip)."""
    try:
        with open_binary(path) as f:
            raw = _ScoresUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        raise DataError(f"cannot read the pickle ({type(e).__name__}: {e})", path=path,
                        reason="bad pickle") from None
    if not isinstance(raw, dict):
        raise DataError(f"expected a pickled dict qid -> {{pid: score}}, got "
                        f"{type(raw).__name__}", path=path, reason="bad pickle")
    for qid, by_pid in raw.items():
        where = f"query {qid!r}"
        if not isinstance(by_pid, dict):
            raise DataError(f"{where}: expected a dict pid -> score, got {type(by_pid).__name__}",
                            path=path, reason="bad pickle")
        yield {"qid": as_id(qid, "qid", path, None), "line": None,
               "pids": [as_id(pid, "pid", path, None) for pid in by_pid],
               "scores": [parse_score(s, f"score of {where}, passage {pid!r}", path, None)
                          for pid, s in by_pid.items()]}


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


def _jsonl_records(path: Path, options: dict, policy: BadLinePolicy) -> Iterator[dict]:
    for line_no, line in iter_lines(path, policy):
        try:
            qid, by_pid = _jsonl_scores_line(path, line_no, line)
        except DataError as e:
            policy.handle(e)
            continue
        yield {"qid": qid, "line": line_no, "pids": list(by_pid), "scores": list(by_pid.values())}


def load_teacher_scores(path: str | os.PathLike, *, on_error: str = "raise",
                        report: SkipReport | None = None,
                        cache_dir: str | os.PathLike | None = None) -> "TeacherScores":
    """Teacher scores (JSONL or pickle, see the module docstring) → :class:`TeacherScores`."""
    path = resolve_data(path)
    pickled = _is_pickle(path)
    table = build_dataset("teacher_scores", path, _pickle_records if pickled else _jsonl_records,
                          {}, SCORE_FEATURES, on_error=on_error, report=report,
                          cache_dir=cache_dir)
    return TeacherScores(table, path, BadLinePolicy(on_error, report))


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


class TeacherScores(Mapping):
    """``{qid: {pid: score}}`` read from a cached table a query at a time, with an overlay."""

    def __init__(self, table, path: Path, policy: BadLinePolicy):
        self.table, self.path = table, Path(path)
        self._open_columns()
        self.hashes, self.rows, dropped = _ScoreIndex(self).open(policy)
        self.dropped = len(dropped)
        self._extra: dict[str, dict[str, float]] = {}
        self._replaced: set[str] = set()
        self._recent: OrderedDict = OrderedDict()

    # ------------------------------------------------------------------------- reading
    def _open_columns(self) -> None:
        self._columns = {name: self.table.data.column(name) for name in SCORE_FEATURES}
        self._offsets = {name: chunk_offsets(c) for name, c in self._columns.items()}

    def _take(self, name: str, rows) -> list:
        return take_column(self._columns[name], rows, self._offsets[name])

    def _records(self, rows) -> list[tuple[str, list[str], list[float]]]:
        return list(zip(self._take("qid", rows), self._take("pids", rows),
                        self._take("scores", rows)))

    def _from_file(self, qid: str) -> dict[str, float] | None:
        if qid in self._recent:
            self._recent.move_to_end(qid)
            return self._recent[qid]
        h = np.uint64(hash_id(qid))
        lo = int(np.searchsorted(self.hashes, h, side="left"))
        hi = int(np.searchsorted(self.hashes, h, side="right"))
        if lo == hi:
            return None
        found: dict[str, float] | None = None
        for stored, pids, scores in self._records(np.sort(np.asarray(self.rows[lo:hi]))):
            if stored == qid:  # else a hash collision
                found = found if found is not None else {}
                found.update(zip(pids, scores))
        self._recent[qid] = found
        if len(self._recent) > _RECENT:
            self._recent.popitem(last=False)
        return found

    def get(self, qid, default=None):
        qid = str(qid)
        extra = self._extra.get(qid)
        if qid in self._replaced:
            return dict(extra)
        known = self._from_file(qid)
        if known is None and extra is None:
            return default
        return {**(known or {}), **(extra or {})}

    def __getitem__(self, qid) -> dict[str, float]:
        found = self.get(qid)
        if found is None:
            raise KeyError(qid)
        return found

    def __contains__(self, qid) -> bool:
        return self.get(qid) is not None

    def __iter__(self) -> Iterator[str]:
        """Every qid: the file's in hash order, then those only in the overlay."""
        seen = set()
        for start in range(0, len(self.rows), _BLOCK):
            for qid in self._take("qid", self.rows[start:start + _BLOCK]):
                if qid not in seen:
                    seen.add(qid)
                    yield qid
        yield from (q for q in self._extra if q not in seen)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    # ------------------------------------------------------------------------- overlay
    def __setitem__(self, qid, by_pid: Mapping[str, float]) -> None:
        """Replace the scores of ``qid`` (as a dict would)."""
        self._extra[str(qid)] = dict(by_pid)
        self._replaced.add(str(qid))

    def setdefault(self, qid, default=None) -> dict[str, float]:
        """The overlay's dict of ``qid``, to add scores to (the file's scores stay visible)."""
        return self._extra.setdefault(str(qid), {} if default is None else default)

    def add_unscored(self, other: Mapping[str, Mapping[str, float]]) -> None:
        """Add ``other``'s scores for the pairs this file does not score (the file wins)."""
        for qid, by_pid in other.items():
            known = self._from_file(str(qid)) or {}
            self.setdefault(qid).update({p: s for p, s in by_pid.items() if p not in known})

    def __getstate__(self):  # pickled for a worker: reopen the mapped index there
        state = dict(self.__dict__, _recent=OrderedDict())
        state.update(hashes=None, rows=None, _columns=None, _offsets=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open_columns()
        self.hashes, self.rows, _ = _ScoreIndex(self).open(BadLinePolicy("skip"))


class _ScoreIndex:
    """The sorted qid hashes of the records and their rows, built once per table (the later
    line of a pair scored twice raised, or dropped when skipping) and memory-mapped."""

    def __init__(self, scores: TeacherScores):
        self.scores, self.table = scores, scores.table
        path = cache_path(self.table, f"twotower-scores-v{INDEX_VERSION}")
        self.files = None if path is None else (
            path.with_suffix(".hashes.npy"), path.with_suffix(".rows.npy"),
            path.with_suffix(".dropped.npy"), path.with_suffix(".json"))

    def open(self, policy: BadLinePolicy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        arrays = self._load() if self.files else None
        if arrays is None:
            arrays = self._build(policy)
            if self.files:
                self._save(*arrays)
                arrays = self._load()
                if arrays is None:
                    raise OSError(f"{self.files[0]}: the score index just written does not "
                                  "read back")
        dropped = arrays[2]
        if len(dropped):  # the skips of the duplicate check, counted on every load
            for line in self.scores._take("line", dropped):
                policy.report.add(DataError("duplicate score", path=self.scores.path, line=line,
                                            reason="duplicate score"))
            log.warning("%s: %d line(s) scoring a (qid, pid) pair scored on an earlier line "
                        "skipped", self.scores.path, len(dropped))
        return arrays

    def _build(self, policy: BadLinePolicy):
        n = len(self.table)
        qids = self.scores._columns["qid"]
        hashes = np.empty(n, dtype=np.uint64)
        for start in range(0, n, 1 << 20):
            hashes[start:start + (1 << 20)] = hash_ids(qids.slice(start, 1 << 20).to_pylist())
        order = np.argsort(hashes, kind="stable")
        dropped = self._duplicates(hashes, order, policy)
        if len(dropped):
            order = order[~np.isin(order, dropped)]
        return hashes[order], order.astype(np.int64), dropped.astype(np.int64)

    def _duplicates(self, hashes, order, policy: BadLinePolicy) -> np.ndarray:
        """Rows of the later lines that score a pair an earlier line scored: raised, or
        returned (first wins) when skipping. Only records whose qid hash repeats can clash."""
        sorted_hashes = hashes[order]
        repeated = np.zeros(len(order), dtype=bool)
        same = sorted_hashes[1:] == sorted_hashes[:-1]
        repeated[1:] |= same
        repeated[:-1] |= same
        rows = np.sort(order[repeated])
        if not len(rows):
            return np.empty(0, dtype=np.int64)
        keys, owners = [], []
        for start in range(0, len(rows), _BLOCK):
            block = rows[start:start + _BLOCK]
            records = self.scores._records(block)
            keys.append(hash_ids([f"{qid}\t{p}" for qid, pids, _ in records for p in pids]))
            owners.append(np.repeat(block, [len(pids) for _, pids, _ in records]))
        keys, owners = np.concatenate(keys), np.concatenate(owners)
        by_key = np.lexsort((owners, keys))
        keys, owners = keys[by_key], owners[by_key]
        clash = np.flatnonzero(keys[1:] == keys[:-1])
        involved = np.unique(np.concatenate([owners[clash], owners[clash + 1]]))
        return self._resolve(involved, policy)

    def _resolve(self, involved: np.ndarray, policy: BadLinePolicy) -> np.ndarray:
        """Replay the lines that share a pair hash in file order, as a reader keeping every
        pair would: the first line to repeat an accepted pair raises, or is dropped."""
        accepted: dict[tuple[str, str], int | None] = {}
        lines = self.scores._take("line", involved)
        dropped = []
        for row, line, (qid, pids, _) in zip(involved.tolist(), lines,
                                             self.scores._records(involved)):
            repeat = next((p for p in pids if (qid, p) in accepted), None)
            if repeat is None:
                accepted.update(((qid, p), line) for p in pids)
                continue
            first = accepted[(qid, repeat)]
            where = f"line {first}" if first is not None else "an earlier entry"
            error = DataError(f"duplicate score for query {qid!r}, passage {repeat!r}: also on "
                              f"{where}", path=self.scores.path, line=line,
                              reason="duplicate score")
            if not policy.skipping:
                raise error
            dropped.append(row)
        return np.asarray(dropped, dtype=np.int64)

    def _header(self) -> dict:
        return {"version": INDEX_VERSION, "records": len(self.table), "hash": "blake2b-64 of qid"}

    def _save(self, hashes, rows, dropped) -> None:
        hashes_file, rows_file, dropped_file, header_file = self.files
        hashes_file.parent.mkdir(parents=True, exist_ok=True)
        for target, array in ((hashes_file, hashes), (dropped_file, dropped)):
            write_bytes_atomic(target, lambda f, a=array: np.save(f, a))
        write_bytes_atomic(header_file, lambda f: f.write(json.dumps(self._header()).encode()))
        write_bytes_atomic(rows_file, lambda f: np.save(f, rows))  # last: "complete"

    def _load(self):
        """The saved arrays, memory-mapped; None when missing, stale or damaged (then rebuilt)."""
        hashes_file, rows_file, dropped_file, header_file = self.files
        try:
            if json.loads(header_file.read_text()) != self._header():
                return None
            hashes, rows = np.load(hashes_file, mmap_mode="r"), np.load(rows_file, mmap_mode="r")
            dropped = np.load(dropped_file)
        except (OSError, ValueError):  # missing, truncated or not an .npy / JSON file
            return None
        n = len(self.table)
        if (hashes.shape != rows.shape or hashes.dtype != np.uint64 or rows.dtype != np.int64
                or len(rows) + len(dropped) != n or dropped.dtype != np.int64):
            return None
        picks = np.unique(np.linspace(0, len(rows) - 1, num=min(len(rows), 64)).astype(int))
        if len(rows):
            if (rows[picks] < 0).any() or (rows[picks] >= n).any():
                return None
            stored = self.scores._take("qid", rows[picks])
            if not ((np.asarray(hashes[picks]) == hash_ids(stored)).all()
                    and (np.diff(np.asarray(hashes[picks])) >= 0).all()):
                return None
        return hashes, rows, dropped
