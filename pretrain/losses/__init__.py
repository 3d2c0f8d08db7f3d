"""The pretraining methods, one file each like the fine-tuning losses (finetune/losses/): every
method is an `nn.Module` whose `forward(batch)` returns `(loss, stats)` (base.PairMethod).

    inbatch.py     in-batch InfoNCE, negatives gathered across processes (Contriever)
    moco.py        MoCo: a momentum key encoder and a queue of negatives (moco_queue.py)
    relevance.py   ReContriever's relevance-aware weighting of the multi-pair InfoNCE
"""
from __future__ import annotations

from torch import nn

from twotower.pretrain.args import MethodArgs
from twotower.pretrain.losses.base import PairMethod
from twotower.pretrain.losses.inbatch import InBatch
from twotower.pretrain.losses.moco import MoCo

__all__ = ["InBatch", "MoCo", "PairMethod", "build_method"]


def build_method(encoder: nn.Module, args: MethodArgs, n_pairs: int, seed: int) -> PairMethod:
    """The method a recipe names (`method.name`)."""
    if args.name == "inbatch":
        return InBatch(encoder, args, n_pairs)
    if args.name == "moco":
        return MoCo(encoder, args, n_pairs, seed=seed)
    raise ValueError(f"method.name must be inbatch or moco; got {args.name!r}")
