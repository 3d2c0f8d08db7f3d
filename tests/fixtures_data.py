"""Helpers for the data tests: write small input files exactly as given (bytes or text)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` as UTF-8 without newline translation (so ``\\r\\n`` stays as written)."""
    return write_bytes(path, text.encode("utf-8"))


def write_jsonl(path: Path, records) -> Path:
    return write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def write_tsv(path: Path, rows) -> Path:
    return write_text(path, "".join("\t".join(map(str, row)) + "\n" for row in rows))


def gzip_file(path: Path, out: Path | None = None) -> Path:
    out = out or path.with_name(path.name + ".gz")
    return write_bytes(out, gzip.compress(path.read_bytes()))


def at(path: Path, line: int | None = None) -> str:
    """Regex for the ``file:line:`` prefix every DataError starts with."""
    return re.escape(f"{path}:{line}: " if line is not None else f"{path}: ")


def rows(dataset) -> list[dict]:
    return [dict(r) for r in dataset]


DOCS = [
    {"_id": "d1", "title": "Mangroves", "text": "Mangroves protect coasts."},
    {"_id": "d2", "title": "", "text": "Herpes is contagious."},
    {"_id": "d3", "title": "Spanking", "text": "Laws differ by state."},
]
QUERIES = [
    {"_id": "q1", "text": "are mangroves protected"},
    {"_id": "q2", "text": "is herpes contagious"},
    {"_id": "q3", "text": "can parents spank children"},
]


def make_beir(root: Path, qrels_lines: list[str] | None = None, split: str = "test") -> Path:
    """A tiny BEIR folder; default qrels judge q3 then q1 (not file order), with a header."""
    write_jsonl(root / "corpus.jsonl", DOCS)
    write_jsonl(root / "queries.jsonl", QUERIES)
    lines = qrels_lines if qrels_lines is not None else [
        "query-id\tcorpus-id\tscore", "q3\td3\t1", "q1\td1\t1", "q1\td2\t0"]
    write_text(root / "qrels" / f"{split}.tsv", "\n".join(lines) + "\n")
    return root
