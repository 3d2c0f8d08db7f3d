"""Line-level reading shared by every reader.

* plain or gzip files (detected by the gzip magic bytes, whatever the suffix);
* strict UTF-8 per line: bad bytes give file, line and byte offset; a UTF-8 BOM at the start of
  the file is dropped; ``\\r\\n`` line ends are handled;
* blank lines hold no record and are ignored; a file with no non-blank line is an error;
* JSON-object and tab-separated line parsing, id/text field checks, duplicate-id detection.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import BadLinePolicy, DataError

_GZIP_MAGIC = b"\x1f\x8b"
_UTF8_BOM = b"\xef\xbb\xbf"


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def require_file(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError("file does not exist", path=path, reason="missing file")
    if path.is_dir():
        raise DataError("is a directory, expected a file", path=path, reason="is a directory")
    return path


def open_binary(path: Path):
    """Open ``path`` for binary reading, decompressing gzip transparently."""
    path = require_file(path)
    if is_gzip(path):
        return gzip.open(path, "rb")
    return open(path, "rb", buffering=1 << 20)


def iter_lines(path: Path, policy: BadLinePolicy | None = None) -> Iterator[tuple[int, str]]:
    """Yield ``(line_no, text)`` for every non-blank line (1-based numbers, line ending removed).

    Lines that are not valid UTF-8 are a :class:`DataError` (or counted, with ``policy`` set to
    skip).  A truncated/corrupt gzip stream and an empty file are always errors.
    """
    policy = policy or BadLinePolicy()
    line_no = 0
    offset = 0  # byte offset of the current line's start (in the decompressed stream)
    seen_content = False
    path = require_file(path)
    compressed = is_gzip(path)  # only then are OSErrors while reading about the gzip stream
    with open_binary(path) as f:
        lines = iter(f)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                break
            except (EOFError, zlib.error, OSError) as e:
                if not compressed:
                    raise
                raise DataError(
                    f"truncated or corrupt gzip file ({e}): lines 1-{line_no} were read, line "
                    f"{line_no + 1} is incomplete or missing",
                    path=path, line=line_no + 1, reason="truncated gzip") from None
            line_no += 1
            start = offset
            offset += len(raw)
            if line_no == 1 and raw.startswith(_UTF8_BOM):
                raw = raw[len(_UTF8_BOM):]
                start += len(_UTF8_BOM)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = raw[e.start:e.start + 1].hex()
                policy.handle(DataError(
                    f"invalid UTF-8 byte 0x{bad} at byte offset {start + e.start} of the file"
                    f" (column {e.start + 1} of the line)",
                    path=path, line=line_no, reason="invalid UTF-8"))
                seen_content = True
                continue
            if text.endswith("\n"):
                text = text[:-1]
                if text.endswith("\r"):
                    text = text[:-1]
            if not text.strip():
                continue
            seen_content = True
            yield line_no, text
    if not seen_content:
        raise DataError("empty file (no non-blank lines)", path=path, reason="empty file")


def parse_json_object(path: Path, line_no: int, line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON ({e.msg} at column {e.colno})",
                        path=path, line=line_no, reason="malformed JSON") from None
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}",
                        path=path, line=line_no, reason="not a JSON object")
    return obj


def split_tsv(path: Path, line_no: int, line: str, expected: int) -> list[str]:
    cells = line.split("\t")
    if len(cells) != expected:
        raise DataError(f"expected {expected} tab-separated columns, got {len(cells)}",
                        path=path, line=line_no, reason="wrong number of columns")
    return cells


def split_whitespace(path: Path, line_no: int, line: str, expected: int, layout: str) -> list[str]:
    """Split a whitespace-separated line (qrels, runs); ``layout`` names the columns in errors."""
    cells = line.split()
    if len(cells) != expected:
        raise DataError(f"expected {expected} columns ({layout}), got {len(cells)}",
                        path=path, line=line_no, reason="wrong number of columns")
    return cells


def get_field(obj: dict, name: str, path: Path, line_no: int):
    if name not in obj:
        present = ", ".join(map(str, obj)) or "none"
        raise DataError(f"missing field {name!r} (fields present: {present})",
                        path=path, line=line_no, reason="missing field")
    return obj[name]


def as_id(value, name: str, path: Path, line_no: int) -> str:
    """Ids may be JSON strings or integers (MS MARCO uses ints); they are returned as strings."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"field {name!r} must be a string or integer id, got {value!r}",
                        path=path, line=line_no, reason="bad id")
    value = str(value)
    if not value.strip():
        raise DataError(f"empty id in field {name!r}", path=path, line=line_no, reason="empty id")
    return value


def as_text(value, name: str, path: Path, line_no: int, required: bool = True) -> str:
    """A text field; ``required`` texts must contain a non-whitespace character."""
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(f"field {name!r} must be a string, got {type(value).__name__}",
                        path=path, line=line_no, reason="bad text")
    if required and not value.strip():
        raise DataError(f"empty or whitespace-only text in field {name!r}",
                        path=path, line=line_no, reason="empty text")
    return value


def parse_int(value: str, name: str, path: Path, line_no: int) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{name} {value!r} is not an integer", path=path, line=line_no,
                        reason=f"bad {name}") from None


def parse_score(value, name: str, path: Path, line_no: int | None) -> float:
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{name} {value!r} is not a number", path=path, line=line_no,
                        reason=f"bad {name}") from None
    if isinstance(value, bool) or score != score or score in (float("inf"), float("-inf")):
        raise DataError(f"{name} {value!r} is not a finite number", path=path, line=line_no,
                        reason=f"bad {name}")
    return score


_SCORE_HEADERS = {"score", "relevance", "rel", "label", "grade", "judgement", "judgment"}


def looks_like_header(cells: list[str]) -> bool:
    """A qrels header such as BEIR's ``query-id corpus-id score`` (named score column)."""
    return bool(cells) and cells[-1].strip().lower() in _SCORE_HEADERS


class DuplicateChecker:
    """Detects repeated ids in one file.

    Keeps only a set of ids (not their line numbers) so a multi-million-line corpus stays cheap;
    the first occurrence's line number is found by re-scanning the file, only when an error is
    actually raised.
    """

    def __init__(self, path: Path, what: str, find_first_line):
        self.path, self.what, self.find_first_line = path, what, find_first_line
        self.seen: set[str] = set()

    def check(self, key: str, line_no: int, policy: BadLinePolicy) -> bool:
        """True if ``key`` is new; otherwise raise (or count and return False: first one wins)."""
        if key not in self.seen:
            self.seen.add(key)
            return True
        if policy.skipping:
            policy.handle(DataError(f"duplicate {self.what} {key!r} (first occurrence kept)",
                                    path=self.path, line=line_no, reason=f"duplicate {self.what}"))
            return False
        first = self.find_first_line(key)
        raise DataError(f"duplicate {self.what} {key!r}: also on line {first}",
                        path=self.path, line=line_no, reason=f"duplicate {self.what}")


def first_line_with(lines: Iterable[tuple[int, str]], key_of, key: str) -> int | str:
    """Line number of the first line whose key equals ``key`` (used for duplicate messages)."""
    for line_no, line in lines:
        try:
            if key_of(line_no, line) == key:
                return line_no
        except DataError:
            continue
    return "?"


def unique_records(path: Path, lines: Iterable[tuple[int, str]], parse, what: str,
                   after_line: int, policy: BadLinePolicy, check_duplicates: bool = True):
    """Yield `parse(line_no, line)` of each line (a dict with "id"), bad lines and repeated ids
    raising or counted by `policy`; a repeated id's message names the line of its first
    occurrence, found by re-reading the lines after `after_line` (the header)."""
    duplicates = DuplicateChecker(path, what, lambda key: first_line_with(
        ((n, text) for n, text in iter_lines(path) if n > after_line),
        lambda n, text: parse(n, text)["id"], key))
    for line_no, line in lines:
        try:
            record = parse(line_no, line)
        except DataError as e:
            policy.handle(e)
            continue
        if not check_duplicates or duplicates.check(record["id"], line_no, policy):
            yield record


def write_text_atomic(path: Path, write) -> None:
    """Write a text file via a temporary file in the same folder, then ``os.replace`` it."""
    _write_atomic(path, write, binary=False)


def write_bytes_atomic(path: Path, write) -> None:
    """``write(f)`` on a binary file via a temporary file in the same folder, then
    ``os.replace``: a crash never leaves a partial file under the real name."""
    _write_atomic(path, write, binary=True)


def _write_atomic(path: Path, write, binary: bool) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with (os.fdopen(fd, "wb") if binary
              else io.open(fd, "w", encoding="utf-8", newline="\n")) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish_folder(staging: Path, target: Path, complete: Callable[[Path], bool]) -> None:
    """Move the fully written folder `staging` to `target` in one ``os.replace``, for caches that
    several processes may build at once (BM25 indexes, reassembled models). A `target` already
    in place and `complete` is another process's finished copy: it is kept and `staging` dropped,
    never removed, because that process may be reading it. Only a `target` that `complete`
    rejects (a crash's or an older format's leftover) is removed before the move."""
    staging, target = Path(staging), Path(target)
    for attempt in range(2):
        try:
            os.replace(staging, target)
            return
        except OSError:
            if complete(target):
                shutil.rmtree(staging, ignore_errors=True)
                return
            if attempt:
                raise
            shutil.rmtree(target, ignore_errors=True)
