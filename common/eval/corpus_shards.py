"""Dense retrieval over a corpus too large for RAM: `evaluate_dense(..., shards=DIR)`.

`evaluate_dense` without it lists the corpus texts in Python, encodes them into one float32 matrix
and searches a faiss index holding it: for MS MARCO's 8.8 M passages x 768 dims that is 27 GB of
embeddings plus the texts. Here the corpus table is read a block of rows at a time, each block is
encoded and appended to on-disk shards (shards.py; float16 by default), and the search streams the
shards: memory is a block of texts and a block of embeddings, not the corpus.

* **Reuse, never a stale folder.** The shard manifest records what the embeddings are of: the
  encoder's fingerprint (every weight and setting, embed_cache.model_fingerprint), a digest of the
  corpus texts in order, the encoding settings and the rows. A folder that matches is searched
  without encoding; a complete folder of other embeddings is an error naming what differs (choose
  another folder or delete it: nothing here deletes embeddings it did not write for this key); an
  incomplete folder (a crash) is rewritten.
* **Several processes** (`accelerate launch`): process r of N encodes its contiguous slice of the
  corpus into `DIR/part-r-of-N/`, then every process searches every part and merges the top-k, so
  each ends with the same run as one process would.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from twotower.common.data.ids import IdColumn
from twotower.common.eval.embed_cache import model_fingerprint
from twotower.common.eval.search import as_matrix, index_factory_string, set_search_params
from twotower.common.eval.sharded import shard_bounds
from twotower.common.eval.shards import (ShardError, ShardSet, open_shards, run_from_rows,
                                         search_shards, sort_hits, write_shards)
from twotower.common.model.distributed import barrier, rank, world_size
from twotower.common.model.encoder import doc_text

BLOCK_ROWS = 8192  # corpus rows read and encoded per step
SHARD_ROWS = 1 << 20  # rows per shard file: 1.5 GB at 768 dims in float16
SEARCH_ROWS = 65536  # embedding rows scored per step of the search (192 MB at 768 dims, float32)
TRAIN_ROWS = 1 << 18  # rows an approximate index is trained on (faiss' k-means wants >= 39 a cell)


def corpus_blocks(corpus, start: int = 0, stop: int | None = None,
                  block_rows: int | None = None) -> Iterator[list[str]]:
    """The document texts (doc_text: title, a space, text) of rows [start, stop), a block at a
    time: only one block is ever a Python list."""
    stop, block_rows = len(corpus) if stop is None else stop, block_rows or BLOCK_ROWS
    titled = "title" in corpus.column_names
    for first in range(start, stop, block_rows):
        batch = corpus[first:min(first + block_rows, stop)]
        titles = batch["title"] if titled else [""] * len(batch["text"])
        yield [doc_text({"title": t, "text": x}) for t, x in zip(titles, batch["text"])]


def corpus_digest(corpus, start: int = 0, stop: int | None = None) -> str:
    """sha256 over the texts of rows [start, stop), each length-prefixed (no ambiguity at joins)."""
    h = hashlib.sha256()
    for texts in corpus_blocks(corpus, start, stop):
        for text in texts:
            raw = text.encode("utf-8")
            h.update(len(raw).to_bytes(8, "little"))
            h.update(raw)
    return h.hexdigest()


def part_folder(folder: Path, processes: int, index: int) -> Path:
    return folder if processes == 1 else folder / f"part-{index}-of-{processes}"


def encode_corpus_shards(encoder, corpus, folder: str | Path, *, batch_size: int = 64,
                         dtype: str = "float16", progress: bool = True,
                         block_rows: int | None = None) -> tuple[list[ShardSet], bool]:
    """Corpus embeddings as shards under `folder` (this process's slice encoded unless a matching
    folder exists), then every part opened in row order. Returns (parts, reused)."""
    block_rows = block_rows or BLOCK_ROWS
    folder, processes, index = Path(folder), world_size(), rank()
    start, stop = shard_bounds(len(corpus), processes, index)
    meta = {"model_fingerprint": model_fingerprint(encoder), "dtype": dtype,
            "corpus_digest": corpus_digest(corpus, start, stop), "rows": [start, stop],
            "corpus_rows": len(corpus), "tower": "doc", "max_length": encoder.max_length("doc"),
            "bf16": bool(encoder.encode_bf16), "serving": encoder.serving_digest("doc") or None,
            "model": str(getattr(encoder.args, "name_or_path", ""))}
    mine = part_folder(folder, processes, index)
    reused = _matching(mine, meta)
    if not reused:
        texts = tqdm(corpus_blocks(corpus, start, stop, block_rows), disable=not progress,
                     total=-(-(stop - start) // block_rows), unit="block",
                     desc=f"encode corpus rows {start}-{stop} into {mine}")
        blocks = (encoder.encode(block, tower="doc", batch_size=batch_size, progress=False)
                  for block in texts)
        write_shards(blocks, mine, dtype=dtype, shard_rows=SHARD_ROWS, meta=meta,
                     overwrite=(mine / "manifest.json").exists())
    if processes > 1:
        barrier()  # every part is written before any process reads them
    return [open_shards(part_folder(folder, processes, i)) for i in range(processes)], reused


def _matching(folder: Path, meta: dict) -> bool:
    """True when `folder` holds complete shards of exactly `meta`; False when it is absent or
    incomplete (to be written); an error when it holds other embeddings."""
    try:
        found = open_shards(folder)
    except (FileNotFoundError, ShardError):
        return False
    if found.meta == meta:
        return True
    differs = sorted(k for k in set(meta) | set(found.meta) if meta.get(k) != found.meta.get(k))
    raise ValueError(f"{folder} already holds embedding shards of another model, corpus or "
                     f"settings (differs in: {', '.join(differs)}); choose another shards "
                     f"folder or delete this one")


def search_parts(query_emb: np.ndarray, parts: list[ShardSet], k: int,
                 similarity: str = "dot") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over the rows of several shard sets taken in order (global rows), as
    `search_shards` over one: scores [nq, k] descending and their rows."""
    scores, rows, offset = [], [], 0
    for part in parts:
        s, r = search_shards(query_emb, part, k, similarity=similarity, block_rows=SEARCH_ROWS)
        scores.append(torch.from_numpy(s))
        rows.append(torch.from_numpy(np.where(r >= 0, r + offset, -1)))
        offset += len(part)
    if len(parts) == 1:
        return scores[0].numpy(), rows[0].numpy()
    merged_scores, merged_rows = torch.cat(scores, dim=1), torch.cat(rows, dim=1)
    top, keep = torch.topk(merged_scores, min(k, offset), dim=1)
    return sort_hits(top, merged_rows.gather(1, keep))


def approximate_index(parts: list[ShardSet], index: str, similarity: str = "dot") -> faiss.Index:
    """A faiss index (search.py's names: "hnsw", "ivf", or an index_factory string) of the
    shards' rows in global order, built without the corpus in RAM: trained (when the type needs
    it) on at most TRAIN_ROWS rows spread evenly over the corpus, then filled a block at a time.
    Its memory is what the index holds: for "IVF<n>,PQ<m>" m bytes of code a row (8.8 M rows at
    PQ48: ~0.5 GB), where "hnsw" and "ivf" (IVF-Flat) hold every float32 vector."""
    n = sum(len(part) for part in parts)
    spec = index_factory_string(index, n)
    try:
        faiss_index = faiss.index_factory(parts[0].dim, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(f"faiss cannot build index '{spec}': {err}") from None
    if not faiss_index.is_trained:
        sample = np.unique(np.linspace(0, n - 1, min(n, TRAIN_ROWS)).astype(np.int64))
        faiss_index.train(as_matrix(take_rows(parts, sample), "training rows", similarity))
    for part in parts:
        for _, block in part.blocks():
            faiss_index.add(as_matrix(block, "document embeddings", similarity))
    return faiss_index


def retrieve_from_shards(encoder, corpus, query_ids: list[str], query_texts: list[str],
                         folder: str | Path, k: int, *, batch_size: int = 64,
                         dtype: str = "float16", progress: bool = True, index: str = "flat",
                         search_params: str | None = None) -> tuple[dict, dict]:
    """(run {qid: {docid: score}}, timing) of dense retrieval through shards under `folder`:
    exact by default, what `dense_search` gives over in-RAM embeddings (equal up to the shards'
    dtype); with `index` an approximate faiss index built from the shards (approximate_index)
    and searched with `search_params` (dense_search's defaults)."""
    t = time.perf_counter()
    parts, reused = encode_corpus_shards(encoder, corpus, folder, batch_size=batch_size,
                                         dtype=dtype, progress=progress)
    t_docs = time.perf_counter() - t
    t = time.perf_counter()
    query_emb = encoder.encode_queries(query_texts, batch_size=batch_size, progress=progress)
    t_queries = time.perf_counter() - t
    t = time.perf_counter()
    if index_factory_string(index, len(corpus)) == "Flat":
        scores, rows = search_parts(query_emb, parts, k, similarity=encoder.similarity)
        built = {}
    else:
        faiss_index = approximate_index(parts, index, encoder.similarity)
        built = {"index_build_s": round(time.perf_counter() - t, 3)}
        t = time.perf_counter()
        set_search_params(faiss_index, min(k, len(corpus)), search_params)
        scores, rows = faiss_index.search(
            as_matrix(query_emb, "query embeddings", encoder.similarity), min(k, len(corpus)))
    run = run_from_rows(scores, rows, query_ids, IdColumn(corpus))
    timing = {"encode_corpus_s": round(t_docs, 3), "encode_queries_s": round(t_queries, 3),
              **built, "search_s": round(time.perf_counter() - t, 3), "shards": str(folder),
              "shards_dtype": dtype, "shards_reused": reused, "encode_processes": len(parts)}
    if not reused:
        timing["docs_per_s"] = round(len(corpus) / max(t_docs, 1e-9), 2)
    return run, timing


def take_rows(parts: list[ShardSet], rows) -> np.ndarray:
    """float32 [len(rows), dim] of global rows over parts taken in order (ShardSet.take)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    out = np.empty((rows.size, parts[0].dim), dtype=np.float32)
    offset, found = 0, np.zeros(rows.size, dtype=bool)
    for part in parts:
        mine = (rows >= offset) & (rows < offset + len(part))
        if mine.any():
            out[mine], found[mine] = part.take(rows[mine] - offset), True
        offset += len(part)
    if not found.all():
        raise IndexError(f"row {int(rows[~found][0])} is out of range for {offset} rows")
    return out
