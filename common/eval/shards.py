"""Corpus embeddings as a folder of .npy shards, and exact top-k search over them in bounded memory.

`dense_search` (search.py) holds every document embedding in RAM; MS MARCO's 8.8M passages x 768
dims are 27 GB in float32. Here they live on disk and the search streams them:

* `write_shards(blocks, folder, shard_rows=...)` takes row blocks of any size (e.g. one encoder
  batch at a time) and writes `shard-00000.npy`, ... of at most `shard_rows` rows (plain .npy:
  `np.load(path, mmap_mode="r")` reads one), each under a temporary name renamed when complete,
  then `manifest.json` last, also atomically: dim, dtype, rows, each shard's file, rows and byte
  size, and the caller's `meta` (e.g. model and data fingerprints, to tell a stale folder). A
  folder without a manifest is incomplete (a crash, or a write still running) and is never read.
  Rewriting needs `overwrite=True`: the old manifest is removed first (a crash half-way leaves an
  incomplete folder, never old and new shards mixed); shards the new manifest does not list are
  deleted after it is written. One writer per folder at a time.
* `open_shards(folder)` checks every shard against the manifest (exists, byte size, .npy header
  shape and dtype): a truncated or half-written shard is an error naming it.
* `search_shards(queries, shards, k)` is exact (every query against every row, float32). It reads
  one block of `block_rows` rows at a time with plain reads into a reused buffer (not a memmap:
  its touched pages count in the resident set while mapped), takes the block's top-k of
  queries @ block.T and merges it with the running top-k. Memory: about
  block_rows * dim * (4 + itemsize) + query_batch * block_rows * 4 bytes, plus 12 bytes per query
  and hit; not the corpus. `run_from_rows` turns the global row numbers into a run.

Ties: a query's hits are sorted by score descending, equal scores lower row first; which of
several rows tied exactly at the k-th score are kept is torch.topk's (deterministic) choice.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Sequence

import numpy as np
import torch
from numpy.lib import format as npy_format

from twotower.common.data.io import write_text_atomic

Run = Dict[str, Dict[str, float]]

FORMAT = "twotower-embedding-shards"
FORMAT_VERSION = 1  # bump when the layout or the manifest's meaning changes
MANIFEST = "manifest.json"
DTYPES = ("float16", "float32")
HEADER_BYTES = 128  # .npy version 1.0 header, padded like numpy's own (room for any row count)


class ShardError(ValueError):
    """A shard folder that is incomplete, corrupt or does not match its manifest: rebuild it."""


def _npy_header(rows: int, dim: int, dtype: np.dtype) -> bytes:
    """A .npy 1.0 header of exactly HEADER_BYTES bytes for a C-order [rows, dim] array."""
    text = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': ({rows}, {dim}), }}"
    body = text.ljust(HEADER_BYTES - 10 - 1) + "\n"  # 10: magic, version, header length
    header = npy_format.magic(1, 0) + len(body).to_bytes(2, "little") + body.encode("latin1")
    assert len(header) == HEADER_BYTES, len(header)
    return header


class _PartialShard:
    """One shard being written to a temporary file next to its final name."""

    def __init__(self, folder: Path, index: int, dim: int, dtype: np.dtype):
        self.path = folder / f"shard-{index:05d}.npy"
        self.dim, self.dtype, self.rows = dim, dtype, 0
        fd, self.tmp = tempfile.mkstemp(dir=folder, prefix=self.path.name + ".", suffix=".partial")
        self.file = os.fdopen(fd, "wb")
        self.file.write(b"\0" * HEADER_BYTES)  # the real header once the row count is known

    def write(self, rows: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(rows).data)
        self.rows += rows.shape[0]

    def finish(self) -> dict:
        self.file.seek(0)
        self.file.write(_npy_header(self.rows, self.dim, self.dtype))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return {"file": self.path.name, "rows": self.rows,
                "bytes": HEADER_BYTES + self.rows * self.dim * self.dtype.itemsize}

    def abort(self) -> None:
        self.file.close()
        Path(self.tmp).unlink(missing_ok=True)


def _checked_block(block: np.ndarray, dim: int | None, first_row: int,
                   dtype: np.dtype) -> np.ndarray:
    """`block` as a 2-D array of `dtype`; non-finite values (also float16 overflow) name the row."""
    arr = np.asarray(block)
    if arr.ndim != 2 or (dim is not None and arr.shape[1] != dim):
        raise ValueError(f"embedding block at row {first_row}: shape {arr.shape}, "
                         f"expected [n, {dim if dim is not None else 'dim'}]")
    with np.errstate(over="ignore"):  # float16 overflow: reported below, naming the row
        cast = arr.astype(dtype)
    for values, what in ((arr, "NaN or inf"), (cast, f"a value too large for {dtype}")):
        bad = ~np.isfinite(values)
        if bad.any():
            raise ValueError(f"embedding row {first_row + int(np.argwhere(bad)[0, 0])} "
                             f"contains {what}")
    return cast


def _prepare_folder(folder: Path, overwrite: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / MANIFEST
    if manifest.exists():
        if not overwrite:
            raise FileExistsError(f"{folder} already holds embedding shards ({MANIFEST}); pass "
                                  f"overwrite=True to replace them")
        manifest.unlink()  # from here on the folder reads as incomplete until the new manifest


def write_shards(blocks: Iterable[np.ndarray], out_dir: str | os.PathLike, *,
                 dtype: str = "float16", shard_rows: int, meta: dict | None = None,
                 overwrite: bool = False) -> Path:
    """Write the rows of `blocks` (consecutive row blocks of one [n, dim] matrix; a 2-D array is
    one block) as shards of at most `shard_rows` rows, then the manifest; returns the folder.
    A folder with a manifest needs overwrite=True; an incomplete one (none) is simply rewritten."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if shard_rows <= 0:
        raise ValueError(f"shard_rows must be > 0, got {shard_rows}")
    meta = dict(meta or {})
    json.dumps(meta)  # not JSON-serialisable: fail before writing gigabytes
    folder, np_dtype = Path(out_dir), np.dtype(dtype)
    blocks = [blocks] if isinstance(blocks, np.ndarray) else blocks
    _prepare_folder(folder, overwrite)
    entries: list[dict] = []
    dim, total, current = None, 0, None
    try:
        for block in blocks:
            arr = _checked_block(block, dim, total, np_dtype)
            dim, pos = arr.shape[1], 0
            while pos < arr.shape[0]:
                if current is None:
                    current = _PartialShard(folder, len(entries), dim, np_dtype)
                take = min(shard_rows - current.rows, arr.shape[0] - pos)
                current.write(arr[pos:pos + take])
                pos += take
                if current.rows == shard_rows:
                    entries.append(current.finish())
                    current = None
            total += arr.shape[0]
        if current is not None:
            entries.append(current.finish())
            current = None
    finally:
        if current is not None:
            current.abort()
    if total == 0:
        raise ValueError(f"no embedding rows to write to {folder}")
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "dim": dim, "dtype": dtype,
                "rows": total, "shard_rows": shard_rows, "shards": entries, "meta": meta}
    write_text_atomic(folder / MANIFEST, lambda f: json.dump(manifest, f, indent=2))
    listed = {e["file"] for e in entries}
    for path in folder.glob("shard-*.npy*"):  # an earlier write's shards, crashed temp files
        if path.name not in listed:
            path.unlink(missing_ok=True)
    return folder


@dataclass(frozen=True)
class Shard:
    path: Path
    start: int  # global row of its first row
    rows: int


def _load_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise FileNotFoundError(f"embedding shard folder {folder} does not exist")
    if not path.is_file():
        raise ShardError(f"{folder} has no {MANIFEST}: the folder is incomplete (a write that "
                         f"crashed or is still running) and must be rebuilt")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest["format"] != FORMAT or manifest["version"] != FORMAT_VERSION:
            raise ShardError(f"{path}: format {manifest['format']!r} version "
                             f"{manifest['version']}, expected {FORMAT!r} {FORMAT_VERSION}")
        if manifest["dtype"] not in DTYPES:
            raise ShardError(f"{path}: dtype {manifest['dtype']!r} is not one of {DTYPES}")
        missing = {"dim", "rows", "shards", "meta"} - set(manifest)
        if missing or not all({"file", "rows", "bytes"} <= set(e) for e in manifest["shards"]):
            raise KeyError(sorted(missing) or "a shard's file, rows or bytes")
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ShardError(f"{path} is not a valid shard manifest ({err!r}); rebuild the "
                         f"folder") from None
    return manifest


def _check_shard_file(path: Path, entry: dict, dim: int, dtype: np.dtype) -> None:
    """The file exists with its recorded size and an .npy header of [rows, dim] `dtype`."""
    if not path.is_file():
        raise ShardError(f"shard {path} listed in the manifest is missing; rebuild the folder")
    size = path.stat().st_size
    expected = HEADER_BYTES + entry["rows"] * dim * dtype.itemsize
    if size != entry["bytes"] or size != expected:
        raise ShardError(f"shard {path} has {size} bytes, the manifest says {entry['bytes']} "
                         f"({entry['rows']} rows x {dim} {dtype}): truncated or replaced; rebuild")
    try:
        with open(path, "rb") as f:
            version = npy_format.read_magic(f)
            read_header = (npy_format.read_array_header_1_0 if version == (1, 0)
                           else npy_format.read_array_header_2_0)
            shape, fortran, file_dtype = read_header(f)
            offset = f.tell()
    except ValueError as err:
        raise ShardError(f"shard {path} has no valid .npy header ({err}); rebuild") from None
    if (shape, fortran, file_dtype, offset) != ((entry["rows"], dim), False, dtype, HEADER_BYTES):
        raise ShardError(f"shard {path}: header says shape {shape} {file_dtype} (fortran order "
                         f"{fortran}), the manifest {entry['rows']} x {dim} {dtype}; rebuild")


class ShardSet:
    """A validated shard folder (`open_shards`); iterating yields (start_row, float32 block)."""

    def __init__(self, folder: Path, manifest: dict, shards: list[Shard], block_rows: int):
        self.folder, self.shards, self.block_rows = folder, shards, block_rows
        self.dim: int = manifest["dim"]
        self.rows: int = manifest["rows"]
        self.dtype = np.dtype(manifest["dtype"])
        self.meta: dict[str, Any] = manifest["meta"]

    def __len__(self) -> int:
        return self.rows

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        return self.blocks()

    def blocks(self, block_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(global start row, float32 [<= block_rows, dim] array) in row order; a block never
        spans two shards. Each block is a new array; the file is read with plain reads into one
        reused buffer, so memory stays about one block whatever the shard and corpus size."""
        block_rows = self.block_rows if block_rows is None else block_rows
        if block_rows <= 0:
            raise ValueError(f"block_rows must be > 0, got {block_rows}")
        row_bytes = self.dim * self.dtype.itemsize
        buffer = np.empty((block_rows, self.dim), dtype=self.dtype)
        for shard in self.shards:
            with open(shard.path, "rb", buffering=0) as f:
                f.seek(HEADER_BYTES)
                for first in range(0, shard.rows, block_rows):
                    n = min(block_rows, shard.rows - first)
                    raw = buffer[:n]
                    if f.readinto(memoryview(raw).cast("B")) != n * row_bytes:
                        raise ShardError(f"shard {shard.path} ended before row {first + n} of "
                                         f"{shard.rows} (truncated since it was opened); rebuild")
                    # no local name for the block: the caller's copy is its only reference
                    yield shard.start + first, _as_float32(raw)


    def take(self, rows: Sequence[int]) -> np.ndarray:
        """float32 [len(rows), dim]: the given global rows, read through a memory map of each
        shard they fall in (for a few rows: positives' embeddings, not a scan)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows):
            raise IndexError(f"row out of range for {self.rows} embedding rows")
        out = np.empty((rows.size, self.dim), dtype=np.float32)
        for shard in self.shards:
            mine = (rows >= shard.start) & (rows < shard.start + shard.rows)
            if mine.any():
                mapped = np.load(shard.path, mmap_mode="r")
                out[mine] = mapped[rows[mine] - shard.start]
                del mapped
        return out


def _as_float32(raw: np.ndarray) -> np.ndarray:
    out = np.empty(raw.shape, dtype=np.float32)
    torch.from_numpy(out).copy_(torch.from_numpy(raw))  # a multi-threaded cast
    return out


def open_shards(folder: str | os.PathLike, *, block_rows: int = 65536) -> ShardSet:
    """Open a folder written by `write_shards`, checking every shard against the manifest."""
    folder = Path(folder)
    manifest = _load_manifest(folder)
    dim, dtype = manifest["dim"], np.dtype(manifest["dtype"])
    shards, start = [], 0
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        _check_shard_file(path, entry, dim, dtype)
        shards.append(Shard(path, start, entry["rows"]))
        start += entry["rows"]
    if start != manifest["rows"]:
        raise ShardError(f"{folder / MANIFEST}: shards hold {start} rows, the manifest says "
                         f"{manifest['rows']}; rebuild")
    return ShardSet(folder, manifest, shards, block_rows)


def _query_tensor(query_emb: np.ndarray, dim: int, similarity: str) -> torch.Tensor:
    queries = torch.from_numpy(np.array(query_emb, dtype=np.float32, ndmin=2, copy=True))
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"query embeddings have shape {tuple(queries.shape)}: query dim "
                         f"{queries.shape[-1]} != shard dim {dim}")
    if not torch.isfinite(queries).all():
        row = int(torch.nonzero(~torch.isfinite(queries))[0, 0])
        raise ValueError(f"query embeddings contain NaN or inf (first in row {row})")
    if similarity not in ("dot", "cos"):
        raise ValueError(f"similarity must be 'dot' or 'cos', got {similarity!r}")
    return _normalise(queries) if similarity == "cos" else queries


def _normalise(rows: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm in place; zero rows stay zero."""
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    return rows.div_(torch.where(norms > 0, norms, torch.ones_like(norms)))


def search_shards(query_emb: np.ndarray, shards: ShardSet, k: int, *, block_rows: int = 65536,
                  similarity: str = "dot",
                  query_batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k rows per query by inner product (cosine with similarity="cos"): scores
    [nq, k] float32 sorted descending and their global rows [nq, k] int64; k is capped at the
    number of rows."""
    queries = _query_tensor(query_emb, shards.dim, similarity)
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    if query_batch <= 0:
        raise ValueError(f"query_batch must be > 0, got {query_batch}")
    k, nq = min(k, len(shards)), queries.shape[0]
    best_scores = torch.full((nq, k), -torch.inf)
    best_rows = torch.full((nq, k), -1, dtype=torch.int64)
    for start, block in shards.blocks(block_rows):
        docs = torch.from_numpy(block)
        bad = ~torch.isfinite(docs.sum(dim=1))  # per row: a whole-block mask would cost a block
        if bad.any():
            raise ShardError(f"{shards.folder}: embedding row {start + int(bad.nonzero()[0, 0])} "
                             f"holds NaN, inf or overflowing values on disk; rebuild")
        if similarity == "cos":
            _normalise(docs)
        for q0 in range(0, nq, query_batch):
            q1 = min(q0 + query_batch, nq)
            scores = torch.matmul(queries[q0:q1], docs.T)
            top_scores, top_rows = torch.topk(scores, min(k, docs.shape[0]), dim=1)
            del scores
            merged_scores = torch.cat([best_scores[q0:q1], top_scores], dim=1)
            merged_rows = torch.cat([best_rows[q0:q1], top_rows + start], dim=1)
            keep_scores, keep = torch.topk(merged_scores, k, dim=1)
            best_scores[q0:q1], best_rows[q0:q1] = keep_scores, merged_rows.gather(1, keep)
        del docs, block  # free this block before the next one is read
    return sort_hits(best_scores, best_rows)


def sort_hits(scores: torch.Tensor, rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Score descending, equal scores by lower row (a stable sort of a row-sorted order)."""
    rows, order = torch.sort(rows, dim=1)
    scores = scores.gather(1, order)
    scores, order = torch.sort(scores, dim=1, descending=True, stable=True)
    return scores.numpy(), rows.gather(1, order).numpy()


def run_from_rows(scores: np.ndarray, rows: np.ndarray, query_ids: Sequence[str],
                  id_of_row: Callable[[int], str] | Sequence[str]) -> Run:
    """{qid: {docid: score}} (the run of `dense_search`) from `search_shards`' arrays; rows < 0
    are skipped. Two hits of one query mapping to the same document id are an error."""
    scores, rows = np.asarray(scores), np.asarray(rows)
    if scores.shape != rows.shape or scores.ndim != 2 or scores.shape[0] != len(query_ids):
        raise ValueError(f"scores {scores.shape} and rows {rows.shape} must both be "
                         f"[{len(query_ids)} queries, k]")
    lookup = id_of_row if callable(id_of_row) else id_of_row.__getitem__
    run: Run = {}
    for qid, row_scores, row_ids in zip(query_ids, scores, rows):
        hits = row_ids >= 0
        ranked = {lookup(int(r)): float(s) for r, s in zip(row_ids[hits], row_scores[hits])}
        if len(ranked) != int(hits.sum()):
            raise ValueError(f"query '{qid}': two of its hit rows map to the same document id")
        run[qid] = ranked
    return run
