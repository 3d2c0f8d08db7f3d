"""Token-level augmentations of a crop (Contriever §3, facebookresearch/contriever src/data.py).

Each function takes token ids (no special tokens yet), a probability p and a numpy Generator, and
returns new ids; special tokens ([CLS] ... [SEP]) are added only after augmenting, so they are never
deleted, replaced, masked or moved. Randomness comes only from the generator passed in (the
datasets seed it from (seed, epoch, index)), so pairs are reproducible and resume exactly.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from twotower.pretrain.args import AUGMENTATIONS


def delete_tokens(ids: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Drop each token with probability p. At least one token survives: contriever's deleteword
    can return an empty crop (then only [CLS][SEP] would be encoded); we keep a random one."""
    keep = rng.random(len(ids)) >= p
    if len(ids) and not keep.any():
        keep[rng.integers(len(ids))] = True
    return ids[keep]


def replace_tokens(ids: np.ndarray, p: float, rng: np.random.Generator,
                   pool: np.ndarray) -> np.ndarray:
    """Replace each token with probability p by a token drawn uniformly from `pool` (the vocabulary
    without special tokens; contriever draws from [start_id, vocab_size - 1])."""
    out = ids.copy()
    hit = rng.random(len(ids)) < p
    out[hit] = pool[rng.integers(len(pool), size=int(hit.sum()))]
    return out


def mask_tokens(ids: np.ndarray, p: float, rng: np.random.Generator, mask_id: int) -> np.ndarray:
    """Replace each token with probability p by the mask token."""
    out = ids.copy()
    out[rng.random(len(ids)) < p] = mask_id
    return out


def shuffle_tokens(ids: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Select each position with probability p and permute the tokens among the selected positions
    (contriever's shuffleword: a Binomial count of positions, their values shuffled)."""
    out = ids.copy()
    picked = np.flatnonzero(rng.random(len(ids)) < p)
    out[picked] = out[rng.permutation(picked)]
    return out


class TokenAugmenter:
    """The augmentations of a recipe (`pairs.augmentation`, applied in order) for one tokenizer."""

    def __init__(self, names: Sequence[str], p: float, tokenizer):
        unknown = [n for n in names if n not in AUGMENTATIONS]
        if unknown:
            raise ValueError(f"unknown augmentation(s) {unknown}; choose from {AUGMENTATIONS}")
        self.names = [n for n in names if n != "none"]
        self.p = p
        self.mask_id = tokenizer.mask_token_id
        if "mask" in self.names and self.mask_id is None:
            raise ValueError("pairs.augmentation 'mask' needs a tokenizer with a mask token; "
                             f"{type(tokenizer).__name__} has none")
        special = set(tokenizer.all_special_ids)
        self.pool = np.array([i for i in range(len(tokenizer)) if i not in special], dtype=np.int64)

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if self.p <= 0:
            return ids
        for name in self.names:
            if name == "delete":
                ids = delete_tokens(ids, self.p, rng)
            elif name == "replace":
                ids = replace_tokens(ids, self.p, rng, self.pool)
            elif name == "mask":
                ids = mask_tokens(ids, self.p, rng, self.mask_id)
            else:
                ids = shuffle_tokens(ids, self.p, rng)
        return ids
