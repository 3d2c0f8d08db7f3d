"""The pretraining method a recipe names (`method.name`): in-batch negatives or MoCo, both
`pretrain.method.PairMethod`s."""
from __future__ import annotations

from torch import nn

from pretrain.args import MethodArgs
from pretrain.inbatch import InBatch
from pretrain.method import PairMethod
from pretrain.moco import MoCo


def build_method(encoder: nn.Module, args: MethodArgs, n_pairs: int, seed: int) -> PairMethod:
    if args.name == "inbatch":
        return InBatch(encoder, args, n_pairs)
    if args.name == "moco":
        return MoCo(encoder, args, n_pairs, seed=seed)
    raise ValueError(f"method.name must be inbatch or moco; got {args.name!r}")
