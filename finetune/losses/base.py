"""What every fine-tuning loss sees: the embeddings of one process's groups, and their gathers.

A group is (query q_i, positive d+_i, k hard negatives d-_i1..d-_ik, optionally m negative
queries q-_i1..q-_im and teacher scores). The student score is the inner product of the
encoder's outputs, s(a, b) = <e(a), e(b)> (a cosine when the encoder normalises).

Losses follow the contract of common/train/trainer.py: anchors are this process's rows; candidates
are gathered from every process with `gather_with_grad` (rank order), so 2 processes with B
groups each compute exactly what 1 process with the 2B groups computes. Each loss is a mean
over local anchors (DDP's gradient average then gives the global mean).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from twotower.common.model.distributed import gather_with_grad, global_offset


@dataclass
class GroupEmbeddings:
    query: Tensor  # [B, H]
    positive: Tensor  # [B, H]
    negatives: Tensor  # [B, k, H]; k may be 0
    neg_queries: Optional[Tensor] = None  # [B, m, H]: queries that d+_i is not relevant to
    teacher_pos: Optional[Tensor] = None  # [B]     t(q_i, d+_i)
    teacher_neg: Optional[Tensor] = None  # [B, k]  t(q_i, d-_ij)
    teacher_neg_queries: Optional[Tensor] = None  # [B, m]  t(q-_ij, d+_i)
    _gathered: dict = field(default_factory=dict, repr=False)
    _offset: Optional[int] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        b = self.query.shape[0]
        if self.positive.shape[0] != b or self.negatives.shape[0] != b:
            raise ValueError(f"group embeddings disagree on the batch size: query {tuple(self.query.shape)}, "
                             f"positive {tuple(self.positive.shape)}, negatives {tuple(self.negatives.shape)}")

    @property
    def batch_size(self) -> int:
        return self.query.shape[0]

    @property
    def n_negatives(self) -> int:
        return self.negatives.shape[1]

    @property
    def offset(self) -> int:
        """Row of this process's first group in the gathered (global) batch."""
        if self._offset is None:
            self._offset = global_offset(self.batch_size, self.query.device)
        return self._offset

    def local_targets(self) -> Tensor:
        """Global index of each local group: the target column of its own positive/query."""
        return torch.arange(self.batch_size, device=self.query.device) + self.offset

    def gathered(self, name: str) -> Tensor:
        """All processes' rows of `name` ("query", "positive", "negatives", "neg_queries"),
        flattened to [rows, H] in rank order; gathered once per batch, with gradient."""
        if name not in self._gathered:
            local = getattr(self, name)
            if local is None:
                raise ValueError(f"this batch has no '{name}' embeddings")
            rows = local.reshape(-1, local.shape[-1])
            # k = 0 (or m = 0) is a recipe setting, equal on every process: nothing to gather
            self._gathered[name] = rows if rows.shape[0] == 0 else gather_with_grad(rows)
        return self._gathered[name]

    def gathered_documents(self) -> Tensor:
        """[all positives; all hard negatives]: positives at 0..N-1, group g's negatives at
        N + g*k .. N + (g+1)*k - 1 (N = global batch)."""
        return torch.cat([self.gathered("positive"), self.gathered("negatives")], dim=0)


def require(value: Optional[Tensor], what: str, loss: str) -> Tensor:
    if value is None:
        raise ValueError(f"loss '{loss}' needs {what} in the batch; see the recipe's data section")
    return value
