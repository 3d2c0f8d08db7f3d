"""Raw text → one token stream → chunks: fixed-length across documents (Contriever), or within them.

Contriever tokenises its corpora once, concatenates all tokens, and at every epoch cuts the stream
into chunks of `chunk_length` tokens starting at a random offset in [0, chunk_length)
(facebookresearch/contriever src/data.py, `generate_offset`). Here the tokenisation is a cached
`datasets.map` (keyed by the corpus fingerprint and the tokenizer), and the offset is a pure
function of (seed, epoch), so every process and every resumed run cut the same chunks.
`DocumentChunker` (pairs.chunking=document) cuts each document on its own instead, so that no
chunk -- and so no positive pair -- joins the end of one document to the start of another.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import datasets
import numpy as np

from twotower.common.data import load_corpus, load_msmarco_collection, resolve_data
from twotower.common.data.io import write_bytes_atomic
from twotower.common.model.encoder import doc_text

log = logging.getLogger("twotower.pretrain")
CACHE_VERSION = "1"  # bump when what the cached map computes changes


# ------------------------------------------------------------------------------ corpora
def corpus_file(path: Path) -> Path:
    """The corpus file inside a dataset folder (BEIR corpus.jsonl or MS MARCO collection.tsv)."""
    if path.is_file():
        return path
    for name in ("corpus.jsonl", "corpus.jsonl.gz", "collection.tsv", "collection.tsv.gz"):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path}: a folder without corpus.jsonl or collection.tsv; name a "
                            "corpus file (jsonl with _id,title,text or tsv) in data.corpora")


def load_corpora(names: Sequence[str], max_docs: int = 0, on_error: str = "raise",
                 report=None) -> list[datasets.Dataset]:
    """Each name (under $TWOTOWER_DATA, or a path) as a Dataset with id, title, text; bad lines
    raise, or with on_error="skip" are counted in `report` (twotower.common.data.SkipReport)."""
    out = []
    for name in names:
        path = corpus_file(resolve_data(name))
        loader = load_msmarco_collection if path.name.startswith("collection.tsv") else load_corpus
        corpus = loader(path, on_error=on_error, report=report)
        if max_docs:
            corpus = corpus.select(range(min(max_docs, len(corpus))))
        log.info("corpus %s: %d documents", path, len(corpus))
        out.append(corpus)
    return out


# ------------------------------------------------------------------------------ tokenising
def tokenizer_key(tokenizer) -> str:
    """Identity of a tokenizer for cache keys: its full serialisation when it has one."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # without the truncation / padding state, which every call with other settings rewrites
        # (the same tokenizer would otherwise key differently before and after a first use)
        state = {k: v for k, v in json.loads(backend.to_str()).items()
                 if k not in ("truncation", "padding")}
        digest.update(json.dumps(state, sort_keys=True).encode())
    else:
        digest.update(f"{tokenizer.name_or_path}:{len(tokenizer)}".encode())
    return digest.hexdigest()[:16]


def cached_map(corpus: datasets.Dataset, function, what: str, key_parts: Sequence[str],
               cache_dir: str = "", batch_size: int = 1000) -> datasets.Dataset:
    """`corpus.map(function, batched)` cached under a fingerprint we choose ourselves (the
    corpus' fingerprint + `key_parts`): functions holding tokenizers do not hash reliably."""
    key = hashlib.sha256("|".join([CACHE_VERSION, what, corpus._fingerprint, *key_parts])
                         .encode()).hexdigest()[:32]
    # no cache_dir: datasets caches next to a file-backed corpus; an in-memory one is not cached
    cache_file = None
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        cache_file = str(Path(cache_dir) / f"{what}-{key}.arrow")
    return corpus.map(function, batched=True, batch_size=batch_size, new_fingerprint=key,
                      cache_file_name=cache_file, remove_columns=corpus.column_names,
                      desc=f"{what} (cached)")


class _Tokenize:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch: dict) -> dict:
        texts = [doc_text({"title": t, "text": x}) for t, x in zip(batch["title"], batch["text"])]
        ids = self.tokenizer(texts, add_special_tokens=False, truncation=False,
                             verbose=False)["input_ids"]
        return {"input_ids": ids}


def tokenize_corpus(corpus: datasets.Dataset, tokenizer, cache_dir: str = "",
                    batch_size: int = 1000) -> datasets.Dataset:
    """One row per document: `input_ids` of (title + " " + text), no special tokens."""
    return cached_map(corpus, _Tokenize(tokenizer), "tokens", [tokenizer_key(tokenizer)],
                      cache_dir, batch_size)


def _list_chunks(tokenized: datasets.Dataset, column: str):
    """The record batches of a list column, in row order, as Arrow ListArrays (no copy of the
    whole column: a `select`/`filter` mapping is flattened first)."""
    if getattr(tokenized, "_indices", None) is not None:
        tokenized = tokenized.flatten_indices()
    return tokenized.data.column(column).chunks


def flatten_ids(tokenized: datasets.Dataset, column: str = "input_ids") -> np.ndarray:
    """All token ids of a list column, concatenated in row order, in memory."""
    parts = [np.asarray(c.flatten().to_numpy(zero_copy_only=False), dtype=np.int32)
             for c in _list_chunks(tokenized, column)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def row_lengths(tokenized: datasets.Dataset, column: str = "input_ids") -> np.ndarray:
    """The length of each row of a list column (its documents' token counts)."""
    parts = [np.diff(c.offsets.to_numpy(zero_copy_only=False)).astype(np.int64)
             for c in _list_chunks(tokenized, column)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _stream_file(tokenized: Sequence[datasets.Dataset], cache_dir: str) -> Path | None:
    """Where the concatenated stream of these token tables is kept: beside them (or in
    cache_dir), named by their fingerprints; None when a table lives in memory only."""
    if not tokenized or not all(t.cache_files for t in tokenized):
        return None
    key = hashlib.sha256("|".join([CACHE_VERSION, "stream", *(t._fingerprint for t in tokenized)])
                         .encode()).hexdigest()[:32]
    folder = Path(cache_dir) if cache_dir else Path(tokenized[0].cache_files[0]["filename"]).parent
    return folder / f"token-stream-{key}.npy"


def _write_stream(tokenized: Sequence[datasets.Dataset], path: Path, total: int) -> None:
    """The int32 stream as one .npy file, written a record batch at a time (bounded memory) to a
    temporary name and renamed: a crash never leaves a partial file under the real name."""
    def write(f):
        np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(np.int32).str,
                                                 "fortran_order": False, "shape": (total,)})
        for t in tokenized:
            for chunk in _list_chunks(t, "input_ids"):
                f.write(np.asarray(chunk.flatten().to_numpy(zero_copy_only=False),
                                   dtype=np.int32).tobytes())
    write_bytes_atomic(path, write)


def _mapped_stream(tokenized: Sequence[datasets.Dataset], path: Path, total: int) -> np.ndarray:
    """The stream file memory-mapped (shared by every process and run), written first when it
    is missing or does not hold exactly `total` int32 tokens (truncated, damaged, foreign)."""
    for attempt in range(2):
        try:
            stream = np.load(path, mmap_mode="r")
            if stream.shape == (total,) and stream.dtype == np.int32:
                return stream
        except (OSError, ValueError):  # missing, truncated, not an .npy file
            pass
        if attempt == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_stream(tokenized, path, total)
    raise OSError(f"{path}: the token stream just written does not read back")


def token_documents(corpora: Sequence[datasets.Dataset], tokenizer, cache_dir: str = "",
                    batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """The tokens of every document of every corpus, concatenated (contriever's layout), and
    each document's token count (in the same order), which marks where documents end.

    The stream of cached corpora is a memory-mapped int32 .npy file beside the token tables,
    written once (a record batch at a time), so a process holds pages of it, not a copy, and
    its memory does not grow with the corpus; in-memory corpora give an in-memory array."""
    tokenized = [tokenize_corpus(c, tokenizer, cache_dir, batch_size) for c in corpora]
    lengths = (np.concatenate([row_lengths(t) for t in tokenized]) if tokenized
               else np.zeros(0, dtype=np.int64))
    path = _stream_file(tokenized, cache_dir)
    if path is None:
        parts = [flatten_ids(t) for t in tokenized]
        stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    else:
        stream = _mapped_stream(tokenized, path, int(lengths.sum()))
    log.info("token stream: %d tokens, %d documents from %d corpora%s", len(stream),
             len(lengths), len(tokenized), f" (memory-mapped {path})" if path else "")
    return stream, lengths


def token_stream(corpora: Sequence[datasets.Dataset], tokenizer, cache_dir: str = "",
                 batch_size: int = 1000) -> np.ndarray:
    """The tokens of every document of every corpus, concatenated."""
    return token_documents(corpora, tokenizer, cache_dir, batch_size)[0]


# ------------------------------------------------------------------------------ chunking
class Chunker:
    """Chunk `index` of `epoch` = stream[offset + index * L : offset + (index + 1) * L] with
    offset = U[0, L) drawn from (seed, epoch). The number of chunks is the same every epoch
    ((N - L + 1) // L, contriever's varies by one) so that epoch lengths never change."""

    def __init__(self, stream: np.ndarray, chunk_length: int, seed: int):
        if len(stream) < 2 * chunk_length - 1:
            raise ValueError(f"the corpus has {len(stream)} tokens, too few for chunks of "
                             f"pairs.chunk_length={chunk_length} (need at least "
                             f"{2 * chunk_length - 1}); add text or lower pairs.chunk_length")
        self.stream, self.chunk_length, self.seed = stream, chunk_length, seed
        self.num_chunks = (len(stream) - chunk_length + 1) // chunk_length

    def offset(self, epoch: int) -> int:
        return int(np.random.default_rng([self.seed, epoch, 0x0FF5E7]).integers(self.chunk_length))

    def start(self, epoch: int, index: int) -> int:
        if not 0 <= index < self.num_chunks:
            raise IndexError(f"chunk {index} out of range (0..{self.num_chunks - 1})")
        return self.offset(epoch) + index * self.chunk_length

    def chunk(self, epoch: int, index: int) -> np.ndarray:
        start = self.start(epoch, index)
        return np.array(self.stream[start:start + self.chunk_length])  # a copy, not a view of the map


class DocumentChunker:
    """Chunks that stay inside one document: a document of n tokens gives ceil(n / L) chunks of
    near-equal length (n = 300, L = 128: 100 + 100 + 100), a document of at most L tokens is one
    chunk; documents without tokens give none (counted in the log). The cut is the same every
    epoch -- the crops drawn from a chunk change -- so epoch lengths never change.

    Why: Contriever's stream chunking joins unrelated documents inside one chunk, so on a corpus
    of short passages (MS MARCO: ~60 tokens) most 128-token chunks hold two or three passages and
    a query crop's positive may come from another passage."""

    def __init__(self, stream: np.ndarray, lengths: np.ndarray, chunk_length: int):
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(stream):
            raise ValueError(f"document lengths sum to {int(lengths.sum())}, the stream has "
                             f"{len(stream)} tokens")
        self.stream, self.chunk_length = stream, chunk_length
        doc_starts = np.cumsum(lengths) - lengths
        pieces = -(-lengths // chunk_length)  # ceil; 0 for an empty document
        self.empty_documents = int((lengths == 0).sum())
        if self.empty_documents:
            log.warning("%d documents have no tokens and give no chunk", self.empty_documents)
        if not pieces.sum():
            raise ValueError("the corpus has no tokens: nothing to chunk")
        doc = np.repeat(np.arange(len(lengths)), pieces)
        piece = np.arange(len(doc)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        n, k = lengths[doc], pieces[doc]
        self.starts = doc_starts[doc] + piece * n // k
        self.ends = doc_starts[doc] + (piece + 1) * n // k
        self.num_chunks = len(self.starts)

    def start(self, epoch: int, index: int) -> int:
        if not 0 <= index < self.num_chunks:
            raise IndexError(f"chunk {index} out of range (0..{self.num_chunks - 1})")
        return int(self.starts[index])

    def chunk(self, epoch: int, index: int) -> np.ndarray:
        start = self.start(epoch, index)
        return np.array(self.stream[start:int(self.ends[index])])  # a copy, not a view of the map
