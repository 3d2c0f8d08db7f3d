"""Passages of whole sentences for the inverse cloze task (Lee et al. 2019, ORQA, arXiv 1906.00300).

Each document is split into sentences (pretrain/sentences.py) and every sentence tokenised, once,
in a cached `datasets.map`. Consecutive sentences of one document are grouped greedily into
passages of at most `chunk_length` tokens (ORQA: blocks of up to 288 wordpieces); a sentence longer
than that is cut. Passages with fewer than two sentences cannot give a query *and* a context and are
left out (counted in the log). The passages are fixed; the query sentence and whether it is removed
from the context are drawn per (seed, epoch, index) in pretrain/pairs.py.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import datasets
import numpy as np

from twotower.common.model.encoder import doc_text
from twotower.pretrain.chunks import cached_map, tokenizer_key
from twotower.pretrain.sentences import load_splitter, resolved_mode

log = logging.getLogger("twotower.pretrain")


class _SplitAndTokenize:
    def __init__(self, tokenizer, splitter: Callable[[str], list[str]]):
        self.tokenizer, self.splitter = tokenizer, splitter

    def __call__(self, batch: dict) -> dict:
        out = []
        for title, text in zip(batch["title"], batch["text"]):
            sentences = [s for s in self.splitter(doc_text({"title": title, "text": text}))
                         if s.strip()]
            ids = self.tokenizer(sentences, add_special_tokens=False, truncation=False,
                                 verbose=False)["input_ids"] if sentences else []
            out.append([x for x in ids if x])
        return {"sentence_ids": out}


def sentence_tokens(corpus: datasets.Dataset, tokenizer, punkt: str = "auto",
                    punkt_train_chars: int = 2_000_000, cache_dir: str = "",
                    batch_size: int = 1000) -> datasets.Dataset:
    """One row per document: `sentence_ids`, a list of token-id lists (no special tokens)."""
    mode = resolved_mode(punkt)
    holder: dict = {}

    def splitter(text: str) -> list[str]:  # trained lazily: a cache hit needs no Punkt at all
        if "split" not in holder:
            holder["split"] = load_splitter(
                punkt, lambda: (doc_text(r) for r in corpus), punkt_train_chars)
        return holder["split"](text)

    key = [tokenizer_key(tokenizer), mode, str(punkt_train_chars if mode == "trained" else 0)]
    return cached_map(corpus, _SplitAndTokenize(tokenizer, splitter), "sentences", key,
                      cache_dir, batch_size)


def group_passages(docs_sentences: Sequence[Sequence[Sequence[int]]], chunk_length: int
                   ) -> tuple[list[list[np.ndarray]], int]:
    """Greedy grouping of each document's consecutive sentences into passages of at most
    `chunk_length` tokens. Returns (passages with >= 2 sentences, number of 1-sentence passages
    left out)."""
    passages: list[list[np.ndarray]] = []
    dropped = 0

    def flush(current: list[np.ndarray]) -> None:
        nonlocal dropped
        if len(current) >= 2:
            passages.append(current)
        elif current:
            dropped += 1

    for sentences in docs_sentences:
        current: list[np.ndarray] = []
        used = 0
        for ids in sentences:
            ids = np.asarray(ids[:chunk_length], dtype=np.int64)
            if current and used + len(ids) > chunk_length:
                flush(current)
                current, used = [], 0
            current.append(ids)
            used += len(ids)
        flush(current)
    return passages, dropped


def ict_passages(corpora: Sequence[datasets.Dataset], tokenizer, chunk_length: int,
                 punkt: str = "auto", punkt_train_chars: int = 2_000_000, cache_dir: str = "",
                 batch_size: int = 1000) -> list[list[np.ndarray]]:
    passages: list[list[np.ndarray]] = []
    dropped = 0
    for corpus in corpora:
        rows = sentence_tokens(corpus, tokenizer, punkt, punkt_train_chars, cache_dir, batch_size)
        got, lost = group_passages(rows["sentence_ids"], chunk_length)
        passages += got
        dropped += lost
    log.info("ICT: %d passages of >= 2 sentences (%d single-sentence passages left out)",
             len(passages), dropped)
    if not passages:
        raise ValueError("ICT: no passage has two sentences; the corpus is too small or its "
                         "documents are single sentences")
    return passages
