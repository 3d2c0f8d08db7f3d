"""Positive pairs from raw text: independent cropping, one-document-multi-pair, inverse cloze task.

Every item is a pure function of (seed, epoch, index): `np.random.default_rng([seed, epoch, index])`
draws the crops, the ICT sentence and the augmentations, so two processes holding halves of a batch
build exactly the pairs one process would, and a resumed run rebuilds the same pairs.

Item: {"query": ids, "keys": [ids] * n_pairs, "id": str, "spans": [(start, end)] * (1 + n_pairs)};
ids carry the tokenizer's special tokens, added after augmentation.
Batch (PairCollator): q_input_ids/q_attention_mask [B, Lq], k_input_ids/k_attention_mask
[B * n_pairs, Lk] in document-major order (row i * n_pairs + j = key j of item i), "ids".
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from twotower.pretrain.args import PairArgs
from twotower.pretrain.augment import TokenAugmenter
from twotower.pretrain.chunks import Chunker, DocumentChunker


def random_crop(n: int, ratio_min: float, ratio_max: float,
                rng: np.random.Generator) -> tuple[int, int]:
    """A span of a sequence of n tokens whose length is int(n * U(ratio_min, ratio_max)), at a
    uniform start (contriever src/data.py `randomcrop`); at least one token long."""
    length = max(1, min(n, int(n * rng.uniform(ratio_min, ratio_max))))
    start = int(rng.integers(0, n - length + 1))
    return start, start + length


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special ids a tokenizer puts before and after one sequence (BERT: [CLS] / [SEP]),
    read from how it encodes a probe word (transformers 5 tokenizers have no public
    build_inputs_with_special_tokens)."""
    bare = tokenizer("retrieval", add_special_tokens=False)["input_ids"]
    full = tokenizer("retrieval", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    raise ValueError(f"cannot find where {type(tokenizer).__name__} puts its special tokens")


class _PairDataset(Dataset):
    def __init__(self, args: PairArgs, tokenizer, seed: int):
        self.args, self.tokenizer, self.seed, self.epoch = args, tokenizer, seed, 0
        self.augment = TokenAugmenter(args.augmentation, args.prob_augmentation, tokenizer)
        self.prefix, self.suffix = special_affixes(tokenizer)
        self.n_special = len(self.prefix) + len(self.suffix)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def finish(self, ids: np.ndarray, rng: np.random.Generator, max_length: int) -> np.ndarray:
        """Augment, cut to the model's limit, then add the special tokens."""
        ids = self.augment(ids, rng)[: max(max_length - self.n_special, 1)]
        return np.concatenate([np.asarray(self.prefix, dtype=np.int64), ids,
                               np.asarray(self.suffix, dtype=np.int64)])


class CropPairs(_PairDataset):
    """Contriever's independent cropping (paper §3) generalised to ReContriever's
    one-document-multi-pair (arXiv 2306.03166): one query crop and `n_pairs` key crops, each
    drawn independently from the same chunk and augmented independently."""

    def __init__(self, chunker: Chunker | DocumentChunker, args: PairArgs, tokenizer, seed: int,
                 max_length: int = 512):
        super().__init__(args, tokenizer, seed)
        if args.chunk_length + self.n_special > max_length:
            raise ValueError(f"pairs.chunk_length={args.chunk_length} plus {self.n_special} "
                             f"special tokens exceeds the model's {max_length} positions")
        self.chunker, self.max_length = chunker, max_length

    def __len__(self) -> int:
        return self.chunker.num_chunks

    def __getitem__(self, index: int) -> dict:
        rng = self.rng(index)
        chunk = self.chunker.chunk(self.epoch, index)
        a = self.args
        spans = [random_crop(len(chunk), a.ratio_min, a.ratio_max, rng)
                 for _ in range(1 + a.n_pairs)]
        crops = [self.finish(chunk[s:e], rng, self.max_length) for s, e in spans]
        where = self.chunker.start(self.epoch, index)
        return {"query": crops[0], "keys": crops[1:], "spans": spans,
                "id": f"chunk {index} (epoch {self.epoch}, token {where})"}


class _QueryKeyPairs(_PairDataset):
    """Pairs built from a fixed list of units (ICT passages, titled documents), with a query
    and a key length limit."""

    def __init__(self, units: list, args: PairArgs, tokenizer, seed: int,
                 max_query_length: int, max_doc_length: int):
        super().__init__(args, tokenizer, seed)
        self.units = units
        self.max_query_length, self.max_doc_length = max_query_length, max_doc_length

    def __len__(self) -> int:
        return len(self.units)


class ICTPairs(_QueryKeyPairs):
    """Inverse cloze task (Lee et al. 2019): one sentence of a passage is the query, the passage
    is the key; with probability `ict_remove_prob` the sentence is removed from the key.
    Units: passages, each a list of sentence token ids."""

    def __getitem__(self, index: int) -> dict:
        rng = self.rng(index)
        sentences = self.units[index]
        pick = int(rng.integers(len(sentences)))
        removed = bool(rng.random() < self.args.ict_remove_prob)
        context = [s for i, s in enumerate(sentences) if not (removed and i == pick)]
        query = self.finish(sentences[pick], rng, self.max_query_length)
        key = self.finish(np.concatenate(context), rng, self.max_doc_length)
        return {"query": query, "keys": [key], "spans": [(pick, pick + 1)], "removed": removed,
                "id": f"passage {index} sentence {pick} (epoch {self.epoch})"}


def _pad(rows: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


class PairCollator:
    """Pads queries and keys separately (dynamic padding); keys in document-major order."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict:
        n = {len(it["keys"]) for it in items}
        if len(n) != 1:
            raise ValueError(f"items with different numbers of keys in one batch: {sorted(n)}")
        q_ids, q_mask = _pad([it["query"] for it in items], self.pad_id)
        k_ids, k_mask = _pad([k for it in items for k in it["keys"]], self.pad_id)
        return {"q_input_ids": q_ids, "q_attention_mask": q_mask,
                "k_input_ids": k_ids, "k_attention_mask": k_mask,
                "ids": [it["id"] for it in items]}
