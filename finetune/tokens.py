"""Fine-tuning's tokenisation, done once: the token ids of every query and document a stage's
groups can draw (queries, positives, the hard-negative pools, negative queries) are computed
before the first step and kept; a step only pads (`data.pretokenize`, on by default).

Texts read from a cached datasets table (a corpus or queries file: TextStore.from_table) are
tokenised whole, once per table, tokenizer and tower settings, into a cached Arrow table beside it
(`tokenize_tables`, which the main process runs first): every process and every later run maps
that one file, a row found through the store's on-disk id index, so a warm start of an 8.8 M
passage collection tokenises nothing and keeps no per-process copy. Texts of dict-backed stores
(triples, JSONL groups, pseudo-queries) are tokenised per process as below.

A text outside those pools -- a random corpus document filling a short negative pool
(`data.short_pool=random`) -- is tokenised the first time a step meets it and kept, and counted
(`computed_in_steps`, by the process that collates: a DataLoader worker keeps its own count).
Ids are stored unpadded, per tower (the query and document towers may have different prefixes
and lengths), as uint16 arrays when the vocabulary fits, so the cost is about 2 bytes per kept
token; `data.pretokenize=false` tokenises in the collator instead and keeps nothing
(tests/test_finetune_data.py checks both give the same tensors).
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Dict, Iterable, List, Sequence

import datasets
import numpy as np
from tqdm.auto import tqdm

from twotower.common.model.encoder import doc_text, token_ids
from twotower.pretrain.chunks import tokenizer_key

log = logging.getLogger("twotower.finetune")

TOWER_OF_STORE = {"queries": "query", "docs": "doc"}
TABLE_TOKENS_VERSION = "1"  # bump when what the cached table holds changes
PARALLEL_MAP_ROWS = 200_000  # tables at least this long are tokenised by several processes
MAX_MAP_WORKERS = 16
_List = getattr(datasets, "List", None) or datasets.Sequence


class _TowerTokens:
    """datasets.map function: a table's texts -> `Encoder.token_ids` of one tower (it holds the
    tokenizer, not the model: each map worker gets a pickled copy)."""

    def __init__(self, encoder, tower: str, with_title: bool):
        self.tokenizer, self.with_title = encoder.tokenizer, with_title
        self.prefix, self.max_length = encoder.prefix(tower), encoder.max_length(tower)

    def __call__(self, batch: dict) -> dict:
        texts = ([doc_text({"title": t, "text": x}) for t, x in zip(batch["title"], batch["text"])]
                 if self.with_title else batch["text"])
        return {"input_ids": token_ids(self.tokenizer, texts, self.prefix, self.max_length)}


def map_workers(rows: int) -> int | None:
    """datasets.map's num_proc for tokenising a table of `rows`: every CPU this process may use
    (at most MAX_MAP_WORKERS) once the table is large enough to repay starting them (a cold
    8.8 M passage collection is ~30 min on one core); None (in process) below that."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = min(cpus or 1, MAX_MAP_WORKERS)
    return workers if rows >= PARALLEL_MAP_ROWS and workers > 1 else None


class TokenCache:
    """id -> unpadded token ids, per tower, for the texts of one TrainingPool."""

    def __init__(self, encoder, pool, batch_size: int = 1024):
        self.encoder, self.pool, self.batch_size = encoder, pool, batch_size
        self.stores = {"query": pool.queries, "doc": pool.docs}
        self.ids: Dict[str, Dict[str, np.ndarray]] = {"query": {}, "doc": {}}
        self.dtype = np.uint16 if len(encoder.tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
        self.computed_in_steps = 0
        self.tables: Dict[str, object] = {}  # tower -> the input_ids column of its cached table

    def tokenize_tables(self) -> None:
        """Tokenise each table-backed store whole into a cached Arrow table (built by the first
        process to call, read by the others: call it under main_process_first)."""
        for tower, store in self.stores.items():
            table = getattr(store, "table", None)
            if table is None or not table.cache_files:  # in-memory tables: per process, below
                continue
            key = hashlib.sha256("|".join([
                TABLE_TOKENS_VERSION, tower, table._fingerprint, tokenizer_key(self.encoder.tokenizer),
                repr(self.encoder.prefix(tower)), str(self.encoder.max_length(tower)),
                str(store.with_title), np.dtype(self.dtype).name]).encode()).hexdigest()[:32]
            features = datasets.Features({"input_ids": _List(datasets.Value(np.dtype(self.dtype).name))})
            tokenized = table.map(_TowerTokens(self.encoder, tower, store.with_title), batched=True,
                                  batch_size=self.batch_size, remove_columns=table.column_names,
                                  features=features, new_fingerprint=key,
                                  num_proc=map_workers(len(table)),
                                  desc=f"tokenise {tower} table (cached)")
            self.tables[tower] = tokenized.data.column("input_ids")

    def reachable(self) -> Dict[str, List[str]]:
        """The ids the pool's groups can draw, per tower, in first-seen order (towers whose
        whole table is tokenised are left out)."""
        queries: Dict[str, None] = {}
        docs: Dict[str, None] = {}
        # a tower whose table is tokenised whole needs no list (MS MARCO: 50 M negative ids)
        want_queries, want_docs = "query" not in self.tables, "doc" not in self.tables
        for group in self.pool.groups if want_queries or want_docs else ():
            if want_queries:
                queries[group.qid] = None
                for positive in group.positives:
                    queries.update(dict.fromkeys(self.pool.neg_queries.get(positive, ())))
            if want_docs:
                docs.update(dict.fromkeys(group.positives))
                docs.update(dict.fromkeys(group.negatives))
        out = {"query": list(queries), "doc": list(docs)}
        return {tower: ids for tower, ids in out.items() if tower not in self.tables}

    def pretokenize(self, progress: bool = False) -> int:
        """Tokenise every reachable text once; returns how many were tokenised."""
        start, total = time.perf_counter(), 0
        for tower, ids in self.reachable().items():
            bar = tqdm(total=len(ids), disable=not progress, desc=f"tokenise {tower} texts",
                       unit="text")
            for begin in range(0, len(ids), self.batch_size):
                chunk = ids[begin:begin + self.batch_size]
                total += self._add(tower, chunk)
                bar.update(len(chunk))
            bar.close()
        log.info("tokenised %d training texts once, before the first step (%.1f s)", total,
                 time.perf_counter() - start)
        return total

    def _add(self, tower: str, ids: Iterable[str]) -> int:
        if tower in self.tables:
            return 0
        missing = [i for i in dict.fromkeys(ids) if i not in self.ids[tower]]
        if missing:
            store = self.stores[tower]
            tokens = self.encoder.token_ids([store[i] for i in missing], tower=tower)
            self.ids[tower].update((i, np.asarray(t, dtype=self.dtype))
                                   for i, t in zip(missing, tokens))
        return len(missing)

    def batch(self, ids: Sequence[str], tower: str) -> dict:
        """input_ids + attention_mask of the texts `ids` of `tower`, padded to the longest: the
        tensors `Encoder.tokenize` makes from their texts."""
        self.computed_in_steps += self._add(tower, ids)
        return self.encoder.pad([self._ids(tower, i).tolist() for i in ids])

    def _ids(self, tower: str, text_id: str) -> np.ndarray:
        if tower in self.tables:
            return self.tables[tower][self.stores[tower].row(text_id)].values.to_numpy()
        return self.ids[tower][text_id]

    def length(self, tower: str, text_id: str) -> int:
        """Tokens of one text, special tokens included (tokenised now if not kept yet)."""
        self.computed_in_steps += self._add(tower, [text_id])
        return len(self._ids(tower, text_id))

    def kept_tokens(self) -> int:
        return sum(len(t) for by_id in self.ids.values() for t in by_id.values())


class LongestDocument:
    """data.length_grouped: a training sample's padded length, the tokens of its longest
    document (positive or negative; documents dominate a step's cost)."""

    def __init__(self, tokens: TokenCache):
        self.tokens = tokens

    def __call__(self, sample) -> int:
        return max(self.tokens.length("doc", d) for d in [sample.positive, *sample.negatives])
