"""Where fine-tuning reads texts by id: TextStore (a dict, or a memory-mapped datasets table with an
on-disk id index), and RowIds, a list of ids kept as int32 rows of a store.

RowIds is how the hard-negative pools are held: MS MARCO's hard-negatives file lists ~100 passages
for each of ~500k queries, 50 M ids; as Python strings in lists that is ~3 GB per process, as
int32 rows 200 MB. An id is read back from the store's id column when the pool is iterated.
`listed_rows` finds those rows once per (file, collection) and keeps them beside the file's
cached table: looking up 50 M ids took ~2.5 minutes of every start.
"""
from __future__ import annotations

import json
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from twotower.common.data.ids import IdIndex, RowDigests, cache_path, hash_id
from twotower.common.data.io import write_bytes_atomic
from twotower.common.model.encoder import doc_text

POOL_ROWS_VERSION = 1
LOOKUP_BLOCK = 4096  # lines of a table whose ids are looked up together


class RowIds(Sequence):
    """A read-only list of ids stored as rows of `ids` (a store's id sequence); equal to any
    sequence of the same ids in the same order."""

    __slots__ = ("rows", "ids")
    __hash__ = None  # a list, not a key

    def __init__(self, rows: np.ndarray, ids: Sequence[str]):
        self.rows, self.ids = np.asarray(rows, dtype=np.int32), ids

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._list(self.rows[i])
        return self.ids[int(self.rows[i])]

    def _list(self, rows: np.ndarray) -> List[str]:
        take = getattr(self.ids, "take", None)  # IdColumn: one Arrow read for all of them
        return take(rows) if take is not None else [self.ids[int(r)] for r in rows]

    def __iter__(self) -> Iterator[str]:
        return iter(self._list(self.rows))

    def __contains__(self, key) -> bool:
        return key in self._list(self.rows)

    def __add__(self, other) -> List[str]:
        return list(self) + list(other)

    def __radd__(self, other) -> List[str]:
        return list(other) + list(self)

    def __eq__(self, other) -> bool:
        if isinstance(other, (RowIds, list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"RowIds({list(self)!r})"


class TextStore:
    """id -> text for documents or queries: a dict, or a (memory-mapped) datasets table read on
    demand through an on-disk id index (twotower.common.data.ids), so a collection of millions
    of passages costs no per-process Python dict or id list."""

    def __init__(self, ids: Sequence[str], row: Callable[[str], int], fetch: Callable[[int], str],
                 contains: Callable[[str], bool], table=None, with_title: bool = False,
                 rows_of: Optional[Callable[[Sequence[str]], np.ndarray]] = None,
                 digests: Optional[RowDigests] = None):
        self.ids = ids  # row -> id, a sequence (a list, or the table's id column read on demand)
        self._row, self._fetch, self._contains = row, fetch, contains
        self._rows_of, self._digests = rows_of, digests
        # the backing datasets table (None for a dict): twotower.finetune.tokens tokenises it whole
        self.table, self.with_title = table, with_title

    @classmethod
    def from_dict(cls, texts: Dict[str, str]) -> "TextStore":
        ids = list(texts)
        row = {i: r for r, i in enumerate(ids)}
        return cls(ids, row.__getitem__, lambda r: texts[ids[r]], row.__contains__)

    @classmethod
    def from_table(cls, table, with_title: bool) -> "TextStore":
        """A datasets.Dataset with id, text (and title): texts are read on demand."""
        index = IdIndex(table)
        if with_title:
            digests = RowDigests(table, "doc_text", _doc_texts)
            return cls(index.ids, index.row, lambda r: doc_text(table[int(r)]), index.__contains__,
                       table, True, index.rows_of, digests)
        digests = RowDigests(table, "text", lambda block: block["text"])
        return cls(index.ids, index.row, lambda r: table[int(r)]["text"], index.__contains__,
                   table, False, index.rows_of, digests)

    def row(self, key: str) -> int:
        """The row of `key` in the ids (and the backing table)."""
        try:
            return self._row(key)
        except KeyError:
            raise KeyError(f"id {key!r} is not in the text store") from None

    def rows_of(self, keys: Sequence[str]) -> np.ndarray:
        """The rows of many ids at once (int64), -1 for an id the store lacks."""
        if self._rows_of is not None:
            return self._rows_of(keys)
        return np.array([self._row(k) if self._contains(k) else -1 for k in keys], dtype=np.int64)

    def digest(self, key: str) -> int:
        """A 64-bit digest of `self[key]` (equal texts, equal digests, in every process): read
        from the table's cached digests when there is a table, without reading the text."""
        if self._digests is None:
            return hash_id(self[key])
        return self._digests[self.row(key)]

    def digests_of_rows(self, rows) -> np.ndarray:
        """`digest` of the ids at many rows (uint64), without reading ids or texts when the
        table's digests are cached."""
        if self._digests is None:
            return np.array([hash_id(self._fetch(int(r))) for r in rows], dtype=np.uint64)
        return self._digests.take(rows)

    def open_digests(self) -> None:
        """Build (first caller) or map the table's digests now, not at a first `digest`."""
        if self._digests is not None:
            self._digests.open()

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, key: str) -> bool:
        return self._contains(key)

    def __getitem__(self, key: str) -> str:
        return self._fetch(self.row(key))


def _doc_texts(block: dict) -> List[str]:
    """doc_text of each row of a table block (title, a space, text)."""
    titles = block["title"] if "title" in block else [""] * len(block["text"])
    return [doc_text({"title": t, "text": x}) for t, x in zip(titles, block["text"])]


def listed_rows(table, columns: Sequence[str],
                store: "TextStore") -> Tuple[np.ndarray, np.ndarray]:
    """The rows in `store` of the ids that each line of `table` lists in `columns` (list
    columns), concatenated line by line (int32, -1 for an id the store lacks), and the offset
    where each line starts (int64, one more than the lines). Saved once per (table, store)
    beside the table (both fingerprints name the files) and memory-mapped by later runs and
    processes; a file of the wrong shape or content (a few lines looked up again) is rebuilt."""
    path = None
    if store.table is not None:
        path = cache_path(table, f"twotower-rows-v{POOL_ROWS_VERSION}-{'-'.join(columns)}-"
                                 f"{store.table._fingerprint}")
    if path is not None:
        loaded = _load_listed_rows(path, table, columns, store)
        if loaded is not None:
            return loaded
    rows, lengths = [], []
    for block in table.select_columns(list(columns)).iter(batch_size=LOOKUP_BLOCK):
        lines = [[i for part in parts for i in part]
                 for parts in zip(*(block[c] for c in columns))]
        lengths.extend(map(len, lines))
        rows.append(store.rows_of([i for line in lines for i in line]).astype(np.int32))
    rows = np.concatenate(rows) if rows else np.empty(0, dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    if path is None:
        return rows, offsets
    header = {"version": POOL_ROWS_VERSION, "lines": len(table), "ids": int(offsets[-1])}
    write_bytes_atomic(path.with_suffix(".rows.npy"), lambda f: np.save(f, rows))
    write_bytes_atomic(path.with_suffix(".json"), lambda f: f.write(json.dumps(header).encode()))
    write_bytes_atomic(path.with_suffix(".offsets.npy"), lambda f: np.save(f, offsets))  # last
    loaded = _load_listed_rows(path, table, columns, store)
    if loaded is None:  # cannot happen unless the disk lies: fail loudly
        raise OSError(f"{path}: the rows just written do not read back")
    return loaded


def _load_listed_rows(path, table, columns, store) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    try:
        header = json.loads(path.with_suffix(".json").read_text())
        rows = np.load(path.with_suffix(".rows.npy"), mmap_mode="r")
        offsets = np.load(path.with_suffix(".offsets.npy"), mmap_mode="r")
    except (OSError, ValueError):  # missing, truncated, not an .npy / JSON file
        return None
    if (header != {"version": POOL_ROWS_VERSION, "lines": len(table), "ids": len(rows)}
            or rows.dtype != np.int32 or offsets.dtype != np.int64
            or offsets.shape != (len(table) + 1,) or offsets[0] != 0 or offsets[-1] != len(rows)):
        return None
    for line in np.unique(np.linspace(0, len(table) - 1, num=min(len(table), 8)).astype(int)):
        record = table[int(line)]  # spot check: a few lines looked up again
        ids = [i for c in columns for i in record[c]]
        if not np.array_equal(rows[offsets[line]:offsets[line + 1]], store.rows_of(ids)):
            return None
    return rows, offsets
