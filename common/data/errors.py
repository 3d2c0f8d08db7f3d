"""Errors raised by the data readers, and the counted-skip policy for bad lines.

Every reader error is a :class:`DataError` (a ``ValueError``) whose message starts with
``file:line:`` (or ``file:`` for whole-file problems), so a failing run points at the exact
input line.  By default a bad line raises; a caller may opt into ``on_error="skip"``, in which
case bad lines are counted per (file, reason), logged as a warning when the file is finished,
and available from :meth:`SkipReport.summary`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

logger = logging.getLogger("twotower.common.data")

OnError = Literal["raise", "skip"]
ON_ERROR_CHOICES = ("raise", "skip")
_MAX_EXAMPLE_LINES = 3


class DataError(ValueError):
    """Bad or missing input data. ``path``/``line``/``reason`` are kept as attributes."""

    def __init__(self, message: str, *, path: object = None, line: int | None = None,
                 reason: str | None = None):
        self.path = None if path is None else str(path)
        self.line = line
        self.reason = reason or message
        self.detail = message
        if self.path is not None and line is not None:
            message = f"{self.path}:{line}: {message}"
        elif self.path is not None:
            message = f"{self.path}: {message}"
        super().__init__(message)


class DataNotFoundError(DataError):
    """A data name or path could not be resolved to local files (see ``resolve_data``)."""


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    return on_error


@dataclass
class SkipReport:
    """Counts of skipped bad lines, per (file, reason), with the first few line numbers."""

    counts: Counter = field(default_factory=Counter)
    example_lines: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __bool__(self) -> bool:  # "is there anything to report"
        return self.total > 0

    def add(self, error: DataError) -> None:
        key = (error.path or "<unknown>", error.reason)
        self.counts[key] += 1
        lines = self.example_lines.setdefault(key, [])
        if error.line is not None and len(lines) < _MAX_EXAMPLE_LINES:
            lines.append(error.line)

    def for_file(self, path: object) -> "SkipReport":
        path = str(path)
        sub = SkipReport()
        for key, n in self.counts.items():
            if key[0] == path:
                sub.counts[key] = n
                sub.example_lines[key] = list(self.example_lines.get(key, []))
        return sub

    def clear_file(self, path: object) -> None:
        for key in [k for k in self.counts if k[0] == str(path)]:
            del self.counts[key]
            self.example_lines.pop(key, None)

    def merge(self, other: "SkipReport") -> None:
        for key, n in other.counts.items():
            self.counts[key] += n
            lines = self.example_lines.setdefault(key, [])
            for line in other.example_lines.get(key, []):
                if len(lines) < _MAX_EXAMPLE_LINES:
                    lines.append(line)

    def summary(self) -> str:
        if not self:
            return "no bad lines skipped"
        parts = [f"skipped {self.total} bad line(s):"]
        for (path, reason), n in sorted(self.counts.items()):
            lines = self.example_lines.get((path, reason), [])
            where = f" (e.g. line {', '.join(map(str, lines))})" if lines else ""
            parts.append(f"  {path}: {n} x {reason}{where}")
        return "\n".join(parts)

    def to_json(self) -> dict:
        return {"entries": [[p, r, n, self.example_lines.get((p, r), [])]
                            for (p, r), n in self.counts.items()]}

    @classmethod
    def from_json(cls, data: dict) -> "SkipReport":
        report = cls()
        for path, reason, n, lines in data["entries"]:
            report.counts[(path, reason)] = n
            report.example_lines[(path, reason)] = list(lines)
        return report


class BadLinePolicy:
    """What a reader does with a bad line: raise it, or count it in a :class:`SkipReport`."""

    def __init__(self, on_error: str = "raise", report: SkipReport | None = None):
        self.on_error = check_on_error(on_error)
        self.report = report if report is not None else SkipReport()

    @property
    def skipping(self) -> bool:
        return self.on_error == "skip"

    def handle(self, error: DataError) -> None:
        """Raise ``error``, or count it when skipping was requested."""
        if not self.skipping:
            raise error
        self.report.add(error)

    def finish_file(self, path: object, records: int) -> None:
        """End-of-file bookkeeping: warn about skips; a file without any good record is an error."""
        skipped = self.report.for_file(path)
        if skipped:
            logger.warning("%s", skipped.summary())
        if records == 0:
            extra = f" ({skipped.total} bad line(s) skipped)" if skipped else ""
            raise DataError(f"no valid records{extra}", path=path, reason="no valid records")
