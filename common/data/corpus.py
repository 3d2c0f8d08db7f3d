"""Generic corpus and query readers (JSONL or TSV, plain or gzip) → ``datasets.Dataset``.

Corpus rows are ``{"id", "title", "text"}`` strings (title ``""`` when the source has none);
query rows are ``{"id", "text"}``.  Ids may be strings or integers in the source; they are
always returned as strings.

TSV layout: columns are positional and named by ``tsv_columns`` using the roles ``"id"``,
``"title"``, ``"text"`` and ``"_"`` (ignored).  Without ``tsv_columns`` a header line made only of
known column names (e.g. DPR's ``id\\ttext\\ttitle``) gives the roles; otherwise 2 columns mean
``(id, text)`` and 3 columns ``(id, text, title)``.

Validation (each a ``DataError`` with file:line, or a counted skip with ``on_error="skip"``):
malformed JSON, missing id/text field, empty id, duplicate id (first occurrence wins when
skipping), empty or whitespace-only query text, a document whose title and text are both empty.
A document with a title but an empty body is kept: several BEIR corpora contain such documents.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets

from .build import build_dataset
from .errors import BadLinePolicy, DataError, SkipReport
from .io import (as_id, as_text, get_field, iter_lines, parse_json_object, require_file, split_tsv,
                 unique_records)
from .resolve import resolve_data

CORPUS_FEATURES = datasets.Features(
    {"id": datasets.Value("string"), "title": datasets.Value("string"),
     "text": datasets.Value("string")})
QUERY_FEATURES = datasets.Features(
    {"id": datasets.Value("string"), "text": datasets.Value("string")})

_ROLES = ("id", "title", "text", "_")
_HEADER_ROLES = {
    "id": "id", "_id": "id", "docid": "id", "doc_id": "id", "pid": "id", "qid": "id",
    "query_id": "id", "query-id": "id", "corpus-id": "id",
    "text": "text", "passage": "text", "contents": "text", "body": "text", "query": "text",
    "title": "title",
}


def detect_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in ("jsonl", "tsv"):
            raise ValueError(f"fmt must be 'jsonl' or 'tsv', got {fmt!r}")
        return fmt
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    last = suffixes[-1] if suffixes else ""
    if last in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if last in (".tsv", ".txt", ".tab"):
        return "tsv"
    raise DataError("cannot tell the format from the file name; pass fmt='jsonl' or fmt='tsv'",
                    path=path, reason="unknown format")


def _doc_text_ok(record: dict, path: Path, line_no: int, with_title: bool) -> dict:
    if with_title:
        if not (record["title"].strip() or record["text"].strip()):
            raise DataError("empty document: title and text are both empty or whitespace-only",
                            path=path, line=line_no, reason="empty text")
    elif not record["text"].strip():
        raise DataError("empty or whitespace-only text", path=path, line=line_no,
                        reason="empty text")
    return record


def _jsonl_record(path: Path, line_no: int, line: str, options: dict) -> dict:
    obj = parse_json_object(path, line_no, line)
    id_field, text_field, title_field = (options["id_field"], options["text_field"],
                                         options["title_field"])
    record = {"id": as_id(get_field(obj, id_field, path, line_no), id_field, path, line_no)}
    if options["with_title"]:
        title = obj.get(title_field) if title_field is not None else None
        record["title"] = as_text(title, title_field, path, line_no, required=False)
    record["text"] = as_text(get_field(obj, text_field, path, line_no), text_field, path,
                             line_no, required=False)
    return _doc_text_ok(record, path, line_no, options["with_title"])


def _tsv_roles(first_cells: list[str], options: dict, path: Path) -> tuple[tuple, bool]:
    """Column roles and whether the first line is a header."""
    names = [c.strip().lower() for c in first_cells]
    is_header = all(n in _HEADER_ROLES for n in names)
    if options["tsv_columns"] is not None:
        return tuple(options["tsv_columns"]), is_header
    if is_header:
        return tuple(_HEADER_ROLES[n] for n in names), True
    n = len(first_cells)
    default = {2: ("id", "text"), 3: ("id", "text", "title")} if options["with_title"] else \
        {2: ("id", "text")}
    if n not in default:
        raise DataError(f"cannot infer the TSV columns of a {n}-column file; pass tsv_columns "
                        f"(roles: id, title, text, _)", path=path, line=1, reason="unknown layout")
    return default[n], False


def _check_roles(roles: tuple, with_title: bool, path: Path) -> None:
    bad = [r for r in roles if r not in _ROLES or (r == "title" and not with_title)]
    if bad or roles.count("id") != 1 or roles.count("text") != 1 or roles.count("title") > 1:
        raise DataError(f"bad tsv_columns {roles!r}: need exactly one 'id' and one 'text', "
                        f"at most one 'title' (corpora only), others '_'", path=path,
                        reason="bad tsv_columns")


def _tsv_record(path: Path, line_no: int, cells: list[str], roles: tuple, options: dict) -> dict:
    values = dict(zip(roles, cells))
    record = {"id": as_id(values["id"], "id", path, line_no)}
    if options["with_title"]:
        record["title"] = values.get("title", "")
    record["text"] = values["text"]
    return _doc_text_ok(record, path, line_no, options["with_title"])


def _records(path: Path, options: dict, policy: BadLinePolicy):
    """Record generator for both formats (used through ``build_dataset``)."""
    lines = iter_lines(path, policy)
    header_line = 0
    if options["fmt"] == "jsonl":
        def parse(line_no, line):
            return _jsonl_record(path, line_no, line, options)
    else:
        first = next(lines, None)
        if first is None:
            return
        roles, header = _tsv_roles(first[1].split("\t"), options, path)
        _check_roles(roles, options["with_title"], path)
        if header:
            header_line = first[0]
        else:
            lines = _chain_first(first, lines)

        def parse(line_no, line):
            return _tsv_record(path, line_no, split_tsv(path, line_no, line, len(roles)), roles,
                               options)

    what = "document id" if options["with_title"] else "query id"
    yield from unique_records(path, lines, parse, what, header_line, policy,
                              options["check_duplicates"])


def _chain_first(first, rest):
    yield first
    yield from rest


def _load(path, with_title: bool, *, id_field, title_field, text_field, fmt, tsv_columns,
          on_error, report, streaming, cache_dir, check_duplicates):
    path = require_file(resolve_data(path))
    options = {
        "fmt": detect_format(path, fmt), "with_title": with_title, "id_field": id_field,
        "title_field": title_field, "text_field": text_field,
        "tsv_columns": None if tsv_columns is None else tuple(tsv_columns),
        "check_duplicates": check_duplicates,
    }
    kind, features = ("corpus", CORPUS_FEATURES) if with_title else ("queries", QUERY_FEATURES)
    return build_dataset(kind, path, _records, options, features, on_error=on_error,
                         report=report, streaming=streaming, cache_dir=cache_dir)


def load_corpus(path: str | os.PathLike, *, id_field: str = "_id",
                title_field: str | None = "title", text_field: str = "text",
                fmt: str | None = None, tsv_columns: tuple[str, ...] | None = None,
                on_error: str = "raise", report: SkipReport | None = None,
                streaming: bool = False, cache_dir: str | os.PathLike | None = None,
                check_duplicates: bool = True):
    """Load a corpus file (JSONL or TSV, optionally gzipped) as a Dataset ``id, title, text``.

    ``path`` goes through :func:`resolve_data` (a path, or a name under ``$TWOTOWER_DATA``).
    ``streaming=True`` returns an ``IterableDataset`` (nothing cached; errors surface during
    iteration).  Skipped lines (``on_error="skip"``) are added to ``report`` and logged.
    """
    return _load(path, True, id_field=id_field, title_field=title_field, text_field=text_field,
                 fmt=fmt, tsv_columns=tsv_columns, on_error=on_error, report=report,
                 streaming=streaming, cache_dir=cache_dir, check_duplicates=check_duplicates)


def load_queries(path: str | os.PathLike, *, id_field: str = "_id", text_field: str = "text",
                 fmt: str | None = None, tsv_columns: tuple[str, ...] | None = None,
                 on_error: str = "raise", report: SkipReport | None = None,
                 streaming: bool = False, cache_dir: str | os.PathLike | None = None,
                 check_duplicates: bool = True):
    """Load a queries file (JSONL or TSV, optionally gzipped) as a Dataset ``id, text``."""
    return _load(path, False, id_field=id_field, title_field=None, text_field=text_field,
                 fmt=fmt, tsv_columns=tsv_columns, on_error=on_error, report=report,
                 streaming=streaming, cache_dir=cache_dir, check_duplicates=check_duplicates)


def column(dataset, name: str) -> list:
    """A whole column as a Python list (respects ``select``/``filter`` index mappings)."""
    return dataset.select_columns([name]).with_format("arrow")[:][name].to_pylist()
