"""DANCE dual loss: query retrieval from the positive document (Li, Liu, Xiong & Liu 2021,
"More Robust Dense Retrieval with Contrastive Dual Learning", ICTIR, arXiv 2107.07773: the dual
(query-retrieval) training objective of its method section, added with weight 0.1 to the
document-retrieval loss; equation number not checked against the PDF offline):

    L_D = -1/B sum_i log  e^{s(d+_i, q_i)/tau} / (e^{s(d+_i, q_i)/tau} + sum_{q-} e^{s(d+_i, q-)/tau})

q- ranges over the other queries of the global batch and, when the batch carries them (data
.n_neg_queries > 0, use_mined_queries), every mined negative query of the global batch.
DANCE scores with a plain dot product (tau = 1 in this notation); the temperature is kept for
cosine students. MNRL-dual (sentence-transformers' MultipleNegativesSymmetricRankingLoss) is
infonce + dance_dual with recipe weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twotower.finetune.args import DanceDualArgs
from twotower.finetune.losses.base import GroupEmbeddings


class DanceDual(nn.Module):
    name = "dance_dual"

    def __init__(self, args: DanceDualArgs):
        super().__init__()
        self.temperature = args.temperature
        self.use_mined_queries = args.use_mined_queries

    def forward(self, emb: GroupEmbeddings) -> tuple[Tensor, dict]:
        queries = [emb.gathered("query")]
        if self.use_mined_queries and emb.neg_queries is not None:
            queries.append(emb.gathered("neg_queries"))
        logits = emb.positive @ torch.cat(queries).T / self.temperature
        return F.cross_entropy(logits, emb.local_targets()), {}
