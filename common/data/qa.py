"""Open-domain QA inputs in the layouts of DPR (Karpukhin et al. 2020, facebookresearch/DPR).

* passages: DPR's ``psgs_w100.tsv`` (plain or gzip) — a header ``id<TAB>text<TAB>title`` then one
  passage per line → Dataset ``id, title, text`` (the corpus layout of common/data/corpus.py);
* questions: DPR's ``*.qa.csv`` (``nq-test.qa.csv``: ``question<TAB>["answer 1", "answer 2"]``,
  no header, the answers a Python/JSON list literal; question ids are the 0-based row numbers)
  or JSONL ``{"question": ..., "answers": [...], "id"?: ...}`` → list of :class:`QAQuestion`.

Fields are csv-unquoted as DPR reads them (``csv.reader(delimiter="\\t")``): psgs_w100.tsv quotes
passages that contain ``"`` (``"a ""b"" c"`` → ``a "b" c``).  Two deliberate differences from
DPR's readers: quoting is parsed per line in strict mode (DPR's non-strict whole-file reader
would let a stray quote swallow the following lines silently; here it is an error naming the
line), and answers are parsed with ``ast.literal_eval`` instead of DPR's ``eval``.
Like DPR's CsvCtxSrc we strip ``"`` from both ends of a passage text after unquoting; Contriever's
``load_passages`` does not (the references differ; it only matters for texts that start or end
with a quote character).

Every problem is a :class:`twotower.common.data.DataError` naming file and line: malformed line or
quoting, wrong column count, missing header, empty question or passage, no answers, a blank
answer, duplicate passage or question id, an id containing whitespace (TREC runs cannot hold
it), undecodable bytes (common/data/io.py).
"""
from __future__ import annotations

import ast
import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import regex

from .build import build_dataset
from .corpus import CORPUS_FEATURES
from .errors import BadLinePolicy, DataError, SkipReport
from .io import as_id, get_field, iter_lines, parse_json_object, require_file, unique_records
from .resolve import resolve_data

PASSAGE_HEADER = ("id", "text", "title")
# a DPR token is a run of letters/numbers/marks or any one other non-separator, non-control
# character (common/eval/qa.py); an answer without such a character has no tokens, and DPR's string
# match would find the empty token sequence in *every* passage
_HAS_TOKEN = regex.compile(r"[^\p{Z}\p{C}]")


@dataclass
class QAQuestion:
    id: str
    question: str
    answers: List[str] = field(default_factory=list)


def split_fields(path: Path, line_no: int, line: str, expected: int) -> list[str]:
    """Tab-separated fields, csv-unquoted like DPR's readers; strict about bad quoting."""
    if '"' in line:
        try:
            cells = next(csv.reader([line], delimiter="\t", strict=True))
        except csv.Error as e:
            raise DataError(f"malformed quoting ({e})", path=path, line=line_no,
                            reason="malformed quoting") from None
    else:  # the common case, and what csv would return for it
        cells = line.split("\t")
    if len(cells) != expected:
        raise DataError(f"expected {expected} tab-separated columns, got {len(cells)}",
                        path=path, line=line_no, reason="wrong number of columns")
    return cells


def _token_id(value, name: str, path: Path, line_no: int) -> str:
    value = as_id(value, name, path, line_no)
    if len(value.split()) != 1 or value != value.strip():
        raise DataError(f"{name} {value!r} contains whitespace (TREC run files cannot hold it)",
                        path=path, line=line_no, reason="bad id")
    return value


# ------------------------------------------------------------------------------ passages
def _passage_records(path: Path, options: dict, policy: BadLinePolicy):
    lines = iter_lines(path, policy)
    first = next(lines, None)
    if first is None:
        return
    header_no, header = first
    names = tuple(c.strip().lower() for c in header.split("\t"))
    if sorted(names) != sorted(PASSAGE_HEADER):
        raise DataError(f"expected the DPR header {chr(9).join(PASSAGE_HEADER)!r} (tab-separated)"
                        f", got {header[:80]!r}", path=path, line=header_no,
                        reason="missing header")
    column = {name: i for i, name in enumerate(names)}

    def parse(line_no: int, line: str) -> dict:
        cells = split_fields(path, line_no, line, len(names))
        record = {"id": _token_id(cells[column["id"]], "passage id", path, line_no),
                  "title": cells[column["title"]],
                  "text": cells[column["text"]].strip('"')}  # as DPR's CsvCtxSrc
        if not (record["text"].strip() or record["title"].strip()):
            raise DataError("empty passage: text and title are both empty", path=path,
                            line=line_no, reason="empty text")
        return record

    yield from unique_records(path, lines, parse, "passage id", header_no, policy)


def load_dpr_passages(path: str | os.PathLike, *, on_error: str = "raise",
                      report: SkipReport | None = None,
                      cache_dir: str | os.PathLike | None = None):
    """DPR passages TSV (``id, text, title`` header) → cached Dataset ``id, title, text``.
    ``path`` may be a name under ``$TWOTOWER_DATA`` (twotower.common.data.resolve_data)."""
    path = require_file(resolve_data(path))
    return build_dataset("dpr-passages", path, _passage_records, {}, CORPUS_FEATURES,
                         on_error=on_error, report=report, cache_dir=cache_dir)


# ----------------------------------------------------------------------------- questions
def _answers(value, path: Path, line_no: int) -> list[str]:
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"answers must be a non-empty list of strings, got {value!r}"[:200],
                        path=path, line=line_no, reason="no answers")
    for answer in value:
        if not isinstance(answer, str):
            raise DataError(f"answer {answer!r} is not a string", path=path, line=line_no,
                            reason="bad answer")
        if not _HAS_TOKEN.search(answer):
            raise DataError(f"blank answer {answer!r} (it would match every passage)",
                            path=path, line=line_no, reason="bad answer")
    return list(value)


def _question_text(value, path: Path, line_no: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"empty question {value!r}", path=path, line=line_no,
                        reason="empty question")
    return value


def _csv_question(path: Path, line_no: int, line: str, index: int) -> QAQuestion:
    question, answers = split_fields(path, line_no, line, 2)
    try:
        parsed = ast.literal_eval(answers.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise DataError(f"the answers column {answers[:80]!r} is not a list literal",
                        path=path, line=line_no, reason="malformed answers") from None
    return QAQuestion(str(index), _question_text(question, path, line_no),
                      _answers(parsed, path, line_no))


def _jsonl_question(path: Path, line_no: int, line: str, index: int) -> QAQuestion:
    obj = parse_json_object(path, line_no, line)
    qid = _token_id(obj["id"], "id", path, line_no) if "id" in obj else str(index)
    return QAQuestion(qid, _question_text(get_field(obj, "question", path, line_no), path,
                                          line_no),
                      _answers(get_field(obj, "answers", path, line_no), path, line_no))


def qa_format(path: Path, fmt: str | None = None) -> str:
    if fmt is not None:
        if fmt not in ("csv", "jsonl"):
            raise ValueError(f"fmt must be 'csv' or 'jsonl', got {fmt!r}")
        return fmt
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    last = suffixes[-1] if suffixes else ""
    if last in (".csv", ".tsv"):
        return "csv"
    if last in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    raise DataError("cannot tell the questions format from the file name (.csv/.tsv for DPR's "
                    "qa.csv layout, .jsonl); pass fmt", path=path, reason="unknown format")


def load_qa_questions(path: str | os.PathLike, fmt: str | None = None) -> list[QAQuestion]:
    """Questions with answer strings (see the module docstring); ids unique per file."""
    path = require_file(resolve_data(path))
    parse = _csv_question if qa_format(path, fmt) == "csv" else _jsonl_question
    questions: list[QAQuestion] = []
    line_of: dict[str, int] = {}
    for line_no, line in iter_lines(path):
        item = parse(path, line_no, line, len(questions))
        if item.id in line_of:
            raise DataError(f"duplicate question id {item.id!r}: also on line {line_of[item.id]}",
                            path=path, line=line_no, reason="duplicate question id")
        line_of[item.id] = line_no
        questions.append(item)
    return questions
