"""Id → row lookup for a ``datasets`` table without a Python dict per process.

A ``{id: row}`` dict over MS MARCO's 8.8 M passage ids costs about 1 GB in every process (a
``str`` object per id plus the dict), and as many times over as there are processes on the node.
:class:`IdIndex` keeps two numpy arrays instead: the 64-bit hashes of the ids, sorted, and the row
of each. For a table cached on disk (what every reader here returns) they are ``.npy`` files next
to the table's Arrow cache, memory-mapped, so every process and every later run shares one copy in
the page cache; an in-memory table gets in-memory arrays.

* Built once per table: the file name carries the table's ``datasets`` fingerprint, which changes
  whenever the source file, the reader options or a ``select``/``filter`` change (see
  ``twotower.common.data.build``), so a stale index is never found, let alone read.
* Written to temporary names and renamed, the rows file last; on open the files must be valid
  ``.npy`` arrays of the table's length with matching hashes, rows and a small header record
  (version, row count, hash function), else they are rebuilt (a half-written or corrupt index is
  never read).
* Exact: a lookup hashes the key, binary-searches the hashes and compares the id stored in the
  table at each candidate row, so a hash collision can cost a comparison, never a wrong row.

Hashes are the first 8 bytes of BLAKE2b (``hashlib``; the same in every process and Python,
unlike ``hash()``), computed over the id column in blocks so building stays bounded in memory too.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from .io import write_bytes_atomic

INDEX_VERSION = 1
_BLOCK = 1 << 20  # ids hashed per step while building
_HASH = "blake2b-64 of the UTF-8 id, little-endian"


def hash_id(key: str) -> int:
    """The 64-bit hash every index and lookup shares."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def hash_ids(ids: Sequence[str]) -> np.ndarray:
    return np.fromiter((hash_id(k) for k in ids), dtype=np.uint64, count=len(ids))


def chunk_offsets(column: pa.ChunkedArray) -> np.ndarray:
    """Where each chunk of `column` starts, and its length at the end (for `take_column`)."""
    return np.cumsum([0] + [len(c) for c in column.chunks], dtype=np.int64)


def take_column(column: pa.ChunkedArray, rows, offsets: np.ndarray) -> list:
    """``column.take(rows).to_pylist()``, a chunk at a time: Arrow's take over a chunked array
    first concatenates every chunk (a table cached by ``datasets`` has one per 1,000 rows), which
    costs the whole column on every call: ~5 ms over 2 M ids, where a chunk's take is ~5 µs."""
    rows = np.asarray(rows, dtype=np.int64)
    chunk = np.searchsorted(offsets, rows, side="right") - 1
    if len(rows) == 1:
        return [column.chunk(int(chunk[0]))[int(rows[0] - offsets[chunk[0]])].as_py()]
    out: list = [None] * len(rows)
    order = np.argsort(chunk, kind="stable")
    for part in np.split(order, np.flatnonzero(np.diff(chunk[order])) + 1):
        if not len(part):
            continue
        c = int(chunk[part[0]])
        values = column.chunk(c).take(pa.array(rows[part] - offsets[c])).to_pylist()
        for i, value in zip(part.tolist(), values):
            out[i] = value
    return out


def cache_path(table, name: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """``<folder>/<name>-<fingerprint>`` beside the table's Arrow cache (or in ``cache_dir``):
    the fingerprint changes with the source file, the reader options and any select/filter, so a
    file derived from another version of the table is never found. None for an in-memory table."""
    if cache_dir is not None:
        folder = Path(cache_dir)
    elif table.cache_files:
        folder = Path(table.cache_files[0]["filename"]).parent
    else:
        return None
    return folder / f"{name}-{table._fingerprint}"


class RowDigests:
    """A 64-bit digest (``hash_id``) of each row's text, as ``text_of_rows`` makes it from a block
    of the table (a dict of columns), saved as ``.npy`` beside the table and memory-mapped: what
    fine-tuning compares to keep duplicate texts apart, without reading them. Opened (built by the
    first caller, read by later ones) on first use; a file of the wrong shape, type or content
    (spot-checked) is rebuilt, and written to a temporary name and renamed."""

    def __init__(self, table, name: str, text_of_rows: Callable[[dict], list[str]]):
        self.table, self.name, self.text_of_rows = table, name, text_of_rows
        self._digests: np.ndarray | None = None

    def __getitem__(self, row: int) -> int:
        if self._digests is None:
            self.open()
        return int(self._digests[row])

    def take(self, rows) -> np.ndarray:
        """The digests of many rows (uint64), in one read of the mapped array."""
        if self._digests is None:
            self.open()
        return np.asarray(self._digests[np.asarray(rows, dtype=np.int64)])

    def open(self) -> None:
        path = cache_path(self.table, f"twotower-digests-v{INDEX_VERSION}-{self.name}")
        if path is not None:
            path = path.with_suffix(".npy")
            try:
                digests = np.load(path, mmap_mode="r")
                if (digests.shape == (len(self.table),) and digests.dtype == np.uint64
                        and self._spot_check(digests)):
                    self._digests = digests
                    return
            except (OSError, ValueError):  # missing, truncated, not an .npy file
                pass
        digests = self._build()
        if path is not None:
            write_bytes_atomic(path, lambda f: np.save(f, digests))
        self._digests = np.load(path, mmap_mode="r") if path is not None else digests

    def _build(self) -> np.ndarray:
        digests = np.empty(len(self.table), dtype=np.uint64)
        for start in range(0, len(self.table), _BLOCK):
            block = self.text_of_rows(self.table[start:start + _BLOCK])
            digests[start:start + len(block)] = hash_ids(block)
        return digests

    def _spot_check(self, digests: np.ndarray) -> bool:
        if not len(digests):
            return True
        picks = np.unique(np.linspace(0, len(digests) - 1, num=min(len(digests), 16)).astype(int))
        texts = [self.text_of_rows(self.table[int(r):int(r) + 1])[0] for r in picks]
        return bool((np.asarray(digests[picks]) == hash_ids(texts)).all())


class IdColumn(Sequence):
    """The ``id`` column of a table as a read-only sequence of ``str``, read from Arrow on demand
    (a ``select``/``filter`` index mapping is respected)."""

    def __init__(self, table):
        self._ids: pa.ChunkedArray = table.data.column("id")
        self._offsets = chunk_offsets(self._ids)
        mapping = getattr(table, "_indices", None)  # datasets' select/filter row mapping
        self._rows = None if mapping is None else mapping.column(0).to_numpy()
        self._n = len(table)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[r] for r in range(*row.indices(self._n))]
        row = int(row)
        if row < 0:
            row += self._n
        if not 0 <= row < self._n:
            raise IndexError(f"row {row} out of range for {self._n} ids")
        physical = row if self._rows is None else int(self._rows[row])
        return self._ids[physical].as_py()

    def blocks(self, size: int | None = None) -> Iterator[list[str]]:
        """The ids in order, ``size`` (default ``_BLOCK``) at a time (a Python list per block
        only)."""
        size = size or _BLOCK
        for start in range(0, self._n, size):
            stop = min(start + size, self._n)
            if self._rows is None:
                yield self._ids.slice(start, stop - start).to_pylist()
            else:
                yield self._ids.take(pa.array(self._rows[start:stop])).to_pylist()

    def __iter__(self) -> Iterator[str]:
        for block in self.blocks():
            yield from block

    def take(self, rows) -> list[str]:
        """The ids of many rows in one Arrow read."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self._n):
            raise IndexError(f"row out of range for {self._n} ids")
        physical = rows if self._rows is None else self._rows[rows]
        return take_column(self._ids, physical, self._offsets)


class IdIndex:
    """Row of each id of ``table`` (a ``datasets.Dataset`` with a string ``id`` column)."""

    def __init__(self, table, cache_dir: str | os.PathLike | None = None):
        self.ids = IdColumn(table)
        self.path = self._cache_path(table, cache_dir)
        loaded = self._load() if self.path is not None else None
        if loaded is None:
            loaded = self._build()
            if self.path is not None:
                self._save(*loaded)
                loaded = self._load()
                if loaded is None:  # cannot happen unless the disk lies: fail loudly
                    raise OSError(f"{self.path}: the id index just written does not read back")
        self.hashes, self.rows = loaded

    # ---------------------------------------------------------------------------- lookup
    def __len__(self) -> int:
        return len(self.ids)

    def row(self, key: str) -> int:
        """The row of ``key``; ``KeyError`` when the table has no such id."""
        key = str(key)
        h = np.uint64(hash_id(key))
        i = int(np.searchsorted(self.hashes, h, side="left"))
        while i < len(self.hashes) and self.hashes[i] == h:
            row = int(self.rows[i])
            if self.ids[row] == key:
                return row
            i += 1
        raise KeyError(key)

    __getitem__ = row

    def rows_of(self, keys: Sequence[str]) -> np.ndarray:
        """``row`` of many keys at once (int64, -1 where the table has no such id): the hashes
        are searched together and the stored ids read in one Arrow call."""
        keys = [str(k) for k in keys]
        out = np.full(len(keys), -1, dtype=np.int64)
        if not keys or not len(self.hashes):
            return out
        wanted = hash_ids(keys)
        order = np.argsort(wanted)  # sorted needles search ~10x faster (each starts at the last)
        at = np.empty(len(keys), dtype=np.int64)
        at[order] = np.searchsorted(self.hashes, wanted[order], side="left")
        candidate = np.flatnonzero(at < len(self.hashes))
        candidate = candidate[np.asarray(self.hashes[at[candidate]]) == wanted[candidate]]
        rows = np.asarray(self.rows[at[candidate]])
        for i, row, stored in zip(candidate.tolist(), rows.tolist(), self.ids.take(rows)):
            # the first row of an equal hash is this id, or a collision: then the slow path
            out[i] = row if stored == keys[i] else self.get(keys[i], -1)
        return out

    def get(self, key: str, default=None):
        try:
            return self.row(key)
        except KeyError:
            return default

    def __contains__(self, key) -> bool:
        return self.get(key) is not None

    # ---------------------------------------------------------------------------- building
    @staticmethod
    def _cache_path(table, cache_dir) -> Path | None:
        return cache_path(table, f"twotower-ids-v{INDEX_VERSION}", cache_dir)

    def _build(self) -> tuple[np.ndarray, np.ndarray]:
        hashes = np.empty(len(self.ids), dtype=np.uint64)
        start = 0
        for block in self.ids.blocks():
            hashes[start:start + len(block)] = hash_ids(block)
            start += len(block)
        order = np.argsort(hashes, kind="stable")
        hashes = hashes[order]
        for i in np.flatnonzero(hashes[1:] == hashes[:-1]):  # equal hashes: a collision or a repeat
            first, second = self.ids[int(order[i])], self.ids[int(order[i + 1])]
            if first == second:
                raise ValueError(f"duplicate id {first!r} (rows {int(order[i])} and "
                                 f"{int(order[i + 1])})")
        return hashes, order.astype(np.int64)

    def _files(self) -> tuple[Path, Path, Path]:
        return (self.path.with_suffix(".hashes.npy"), self.path.with_suffix(".rows.npy"),
                self.path.with_suffix(".json"))

    def _header(self) -> dict:
        return {"version": INDEX_VERSION, "rows": len(self.ids), "hash": _HASH}

    def _save(self, hashes: np.ndarray, rows: np.ndarray) -> None:
        hashes_file, rows_file, header_file = self._files()
        hashes_file.parent.mkdir(parents=True, exist_ok=True)
        for target, write in ((hashes_file, lambda f: np.save(f, hashes)),
                              (header_file, lambda f: f.write(json.dumps(self._header()).encode())),
                              (rows_file, lambda f: np.save(f, rows))):  # rows last: "complete"
            write_bytes_atomic(target, write)

    def _load(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The saved arrays, memory-mapped; None when missing, stale or damaged (then rebuilt)."""
        hashes_file, rows_file, header_file = self._files()
        try:
            if json.loads(header_file.read_text()) != self._header():
                return None
            hashes = np.load(hashes_file, mmap_mode="r")
            rows = np.load(rows_file, mmap_mode="r")
        except (OSError, ValueError):  # missing, truncated or not an .npy / JSON file
            return None
        n = len(self.ids)
        if (hashes.shape != (n,) or rows.shape != (n,) or hashes.dtype != np.uint64
                or rows.dtype != np.int64):
            return None
        if n and not self._spot_check(hashes, rows):
            return None
        return hashes, rows

    def _spot_check(self, hashes: np.ndarray, rows: np.ndarray) -> bool:
        """A few entries re-hashed from the table: catches bytes changed inside the files."""
        picks = np.unique(np.linspace(0, len(hashes) - 1, num=min(len(hashes), 64)).astype(int))
        if not (0 <= rows[picks]).all() or not (rows[picks] < len(hashes)).all():
            return False
        expected = hash_ids([self.ids[int(r)] for r in rows[picks]])
        return bool((np.asarray(hashes[picks]) == expected).all()
                    and (np.diff(np.asarray(hashes[picks])) >= 0).all())
