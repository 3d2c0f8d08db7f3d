"""Turn a record generator over one file into a cached, memory-mapped ``datasets.Dataset``.

``Dataset.from_generator`` caches by a fingerprint.  We compute it ourselves from the file's
identity (resolved path, size, mtime, inode), the reader options, ``on_error`` and a hash of this
package's source, so an edited file, other options or a changed reader are always re-read, and a
dataset built while skipping bad lines is never served to a caller who asked to raise.

Skip counts are produced while the generator runs, which does not happen on a cache hit, so with
``on_error="skip"`` the report is stored next to the Arrow cache file and read back on a hit.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator

import datasets
from datasets.exceptions import DatasetGenerationError

from .errors import BadLinePolicy, DataError, SkipReport, check_on_error, logger
from .io import require_file

# generator(path, options, policy) -> records; it reports bad lines through ``policy``.
RecordGenerator = Callable[[Path, dict, BadLinePolicy], Iterator[dict]]
_SKIP_REPORT_FILE = "twotower_skip_report.json"


# what a table is built from the files by, and what not: ids.py only derives indexes from a built
# table (each keyed by the table's fingerprint and its own version), __init__.py re-exports,
# progress.py draws bars and resolve.py finds the file (whose path, size and mtime are in the
# fingerprint). Editing those must not re-read and re-tokenise 8.8 M rows (~40 min).
_NOT_READERS = {"ids.py", "__init__.py", "progress.py", "resolve.py"}


def source_hash(folder: Path) -> str:
    """sha256 over the reader modules of `folder` (every *.py but _NOT_READERS)."""
    digest = hashlib.sha256()
    for source in sorted(folder.glob("*.py")):
        if source.name not in _NOT_READERS:
            digest.update(source.read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _code_hash() -> str:
    return source_hash(Path(__file__).parent)


def file_fingerprint(kind: str, path: Path, options: dict, on_error: str) -> str:
    st = path.stat()
    identity = {
        "kind": kind, "path": str(path.resolve()), "size": st.st_size,
        "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "options": options,
        "on_error": on_error, "code": _code_hash(),
    }
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return f"twotower-{kind}-" + hashlib.sha256(blob).hexdigest()[:32]


def _records(generator: RecordGenerator, path: str, options: dict, on_error: str,
             report: SkipReport, state: dict | None = None) -> Iterator[dict]:
    """Wrapper run by ``datasets``: fresh per-file counts, end-of-file checks and warning."""
    if state is not None:
        state["ran"] = True
    report.clear_file(path)
    policy = BadLinePolicy(on_error, report)
    count = 0
    for record in generator(Path(path), options, policy):
        count += 1
        yield record
    policy.finish_file(path, count)


def build_dataset(kind: str, path: Path, generator: RecordGenerator, options: dict,
                  features: datasets.Features, *, on_error: str = "raise",
                  report: SkipReport | None = None, streaming: bool = False,
                  cache_dir: str | os.PathLike | None = None):
    """Build a ``Dataset`` (or an ``IterableDataset`` with ``streaming=True``) from ``generator``.

    Skips (``on_error="skip"``) are merged into ``report`` when given, and always logged.  In
    streaming mode the report is filled while the dataset is iterated (in this process only:
    DataLoader worker processes count into their own copies).
    """
    check_on_error(on_error)
    path = require_file(path)
    if streaming:
        report = report if report is not None else SkipReport()
        return datasets.IterableDataset.from_generator(
            _records, features=features,
            gen_kwargs={"generator": generator, "path": str(path), "options": options,
                        "on_error": on_error, "report": report})

    fingerprint = file_fingerprint(kind, path, options, on_error)
    run_report, state = SkipReport(), {"ran": False}
    try:
        dataset = datasets.Dataset.from_generator(
            _records, features=features, cache_dir=None if cache_dir is None else str(cache_dir),
            fingerprint=fingerprint,
            gen_kwargs={"generator": generator, "path": str(path), "options": options,
                        "on_error": on_error, "report": run_report, "state": state})
    except DatasetGenerationError as e:
        # ``datasets`` wraps exceptions raised by the generator; surface ours unchanged.
        if isinstance(e.__cause__, DataError):
            raise e.__cause__ from None
        raise
    if on_error == "skip":
        run_report = _skip_report_for(dataset, state["ran"], run_report, generator, path,
                                      options)
        if report is not None:  # replace, not add to, earlier counts for this file
            report.clear_file(path)
            report.merge(run_report)
    return dataset


def _skip_report_for(dataset, ran: bool, run_report: SkipReport, generator, path: Path,
                     options: dict) -> SkipReport:
    """Persist the skip report of a fresh build, or read back the one of a cached build."""
    sidecar = Path(dataset.cache_files[0]["filename"]).parent / _SKIP_REPORT_FILE
    if not ran:
        if sidecar.exists():
            cached = SkipReport.from_json(json.loads(sidecar.read_text()))
            if cached:
                logger.warning("%s (from the cached build)", cached.summary())
            return cached
        # Cache without its report (e.g. interrupted right after the build): count again.
        run_report = SkipReport()
        for _ in _records(generator, str(path), options, "skip", run_report):
            pass
    tmp = sidecar.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(run_report.to_json()))
    os.replace(tmp, sidecar)
    return run_report
