"""InfoNCE / MultipleNegativesRankingLoss with hard negatives and cross-process negatives.

van den Oord et al. 2018 (arXiv 1807.03748), Eq. 4; in-batch negatives as in DPR (Karpukhin et
al., EMNLP 2020, Eq. 2) and sentence-transformers' MultipleNegativesRankingLoss
(Henderson et al. 2017, arXiv 1705.00652):

    L_Q = -1/B sum_i log  e^{s(q_i, d+_i)/tau} / sum_{d in D} e^{s(q_i, d)/tau}

where D holds every positive and every hard negative of the global batch (all processes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twotower.finetune.args import InfoNCEArgs
from twotower.finetune.losses.base import GroupEmbeddings


def infonce_logits(emb: GroupEmbeddings, temperature: float) -> Tensor:
    """[B, N + N*k] scores of each local query against every document of the global batch."""
    return emb.query @ emb.gathered_documents().T / temperature


def infonce_loss(emb: GroupEmbeddings, temperature: float) -> Tensor:
    return F.cross_entropy(infonce_logits(emb, temperature), emb.local_targets())


class InfoNCE(nn.Module):
    name = "infonce"

    def __init__(self, args: InfoNCEArgs):
        super().__init__()
        self.temperature = args.temperature

    def forward(self, emb: GroupEmbeddings) -> tuple[Tensor, dict]:
        logits = infonce_logits(emb, self.temperature)
        targets = emb.local_targets()
        with torch.no_grad():
            accuracy = (logits.argmax(dim=1) == targets).float().mean()
        return F.cross_entropy(logits, targets), {"infonce_acc": accuracy}
