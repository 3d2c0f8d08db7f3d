"""Title -> body pairs (pairs.task=title): a document's own title is the query and its text the
key, as in the (title, passage) and (title, abstract) pairs of E5's CCPairs (Wang et al. 2022,
arXiv 2212.03533; section number not checked offline). Label-free: it reads the corpus only, but
needs documents with titles (BEIR corpora have them; an MS MARCO collection has none).

Titles and texts are tokenised once, in a cached `datasets.map`. Documents with an empty title or
text are left out (counted in the log). With pairs.n_pairs = 1 the key is the whole text (cut to
model.max_doc_length); with n_pairs > 1 the keys are that many independent random crops of it
(pairs.ratio_min / ratio_max), so the relevance-aware loss can weight them (ReContriever).
"""
from __future__ import annotations

import logging
from typing import Sequence

import datasets
import numpy as np

from twotower.pretrain.chunks import cached_map, tokenizer_key
from twotower.pretrain.pairs import _QueryKeyPairs, random_crop

log = logging.getLogger("twotower.pretrain")


class _TokenizeTitleAndText:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch: dict) -> dict:
        out = {}
        for column in ("title", "text"):
            texts = [(t or "").strip() for t in batch[column]]
            out[f"{column}_ids"] = self.tokenizer(texts, add_special_tokens=False,
                                                  truncation=False, verbose=False)["input_ids"]
        return out


def title_pairs(corpora: Sequence[datasets.Dataset], tokenizer, cache_dir: str = "",
                batch_size: int = 1000) -> list[tuple[np.ndarray, np.ndarray]]:
    """(title ids, text ids) of every document with both, no special tokens."""
    pairs, left_out = [], 0
    for corpus in corpora:
        rows = cached_map(corpus, _TokenizeTitleAndText(tokenizer), "titles",
                          [tokenizer_key(tokenizer)], cache_dir, batch_size)
        for title, text in zip(rows["title_ids"], rows["text_ids"]):
            if title and text:
                pairs.append((np.asarray(title, dtype=np.int64), np.asarray(text, dtype=np.int64)))
            else:
                left_out += 1
    log.info("title pairs: %d documents with a title and a text (%d without, left out)",
             len(pairs), left_out)
    if not pairs:
        raise ValueError("pairs.task=title: no document has both a title and a text (an MS MARCO "
                         "collection has no titles); use pairs.task=crop or ict")
    return pairs


class TitlePairs(_QueryKeyPairs):
    """Units: (title ids, text ids) of each document (title_pairs)."""

    def __getitem__(self, index: int) -> dict:
        rng = self.rng(index)
        title, text = self.units[index]
        a = self.args
        spans = ([(0, len(text))] if a.n_pairs == 1 else
                 [random_crop(len(text), a.ratio_min, a.ratio_max, rng) for _ in range(a.n_pairs)])
        keys = [self.finish(text[s:e], rng, self.max_doc_length) for s, e in spans]
        return {"query": self.finish(title, rng, self.max_query_length), "keys": keys,
                "spans": [(0, len(title)), *spans], "id": f"document {index} (epoch {self.epoch})"}
