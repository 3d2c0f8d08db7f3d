"""Listwise distillation: the student's distribution over a query's candidate list learns the
teacher's (RocketQAv2: Ren, Qu, Liu, Zhao, She, Wu, Wang & Wen, "RocketQAv2: A Joint Training
Method for Dense Passage Retrieval and Passage Re-ranking", EMNLP 2021, arXiv 2110.07367, Sec. 3.2,
"dynamic listwise distillation"; soft targets at a temperature as in Hinton, Vinyals & Dean 2015,
arXiv 1503.02531):

    p_t(d | q_i) = softmax_d( t(q_i, d) / tau_t ),   p_s(d | q_i) = softmax_d( s(q_i, d) / tau_s )
    L = 1/B sum_i KL( p_t(. | q_i) || p_s(. | q_i) ),   d in [d+_i, d-_i1, ..., d-_ik]

RocketQAv2 trains retriever and re-ranker together and writes the divergence of the retriever's
distribution from the re-ranker's; with a fixed teacher, as here, KL(p_t || p_s) is the
cross-entropy to the teacher's soft labels minus the teacher's entropy (a constant), the form
used for a frozen teacher (e.g. sentence-transformers' DistillKLDivLoss). Only a query's own
candidates are compared, so nothing is gathered across processes. tau_t sets how sharp the
teacher's labels are: its scores' scale is the teacher's (a fused BM25 + dense teacher's lie in
[0, 1], a cross-encoder's are logits).
With `positive=false` the list is [d-_i1, ..., d-_ik] alone: the teacher's ranking among the mined
candidates, for pseudo-queries whose positive is trivially first (a sentence's own document,
data.kind=sentences) and would otherwise take nearly all of the teacher's mass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twotower.finetune.args import ListwiseKLArgs
from twotower.finetune.losses.base import GroupEmbeddings, require


class ListwiseKL(nn.Module):
    name = "listwise_kl"

    def __init__(self, args: ListwiseKLArgs):
        super().__init__()
        self.temperature, self.teacher_temperature = args.temperature, args.teacher_temperature
        self.positive = args.positive

    def forward(self, emb: GroupEmbeddings) -> tuple[Tensor, dict]:
        if emb.n_negatives == 0:
            raise ValueError("listwise_kl needs hard negatives (data.n_negatives > 0)")
        t_pos = require(emb.teacher_pos, "teacher scores", self.name)
        t_neg = require(emb.teacher_neg, "teacher scores", self.name)
        if self.positive:
            documents = torch.cat([emb.positive[:, None], emb.negatives], dim=1)  # [B, 1 + k, H]
            teacher = torch.cat([t_pos[:, None], t_neg], dim=1)
        else:
            documents, teacher = emb.negatives, t_neg
        student = torch.einsum("bh,bkh->bk", emb.query, documents) / self.temperature
        teacher = teacher.to(student.dtype)
        target = F.log_softmax(teacher / self.teacher_temperature, dim=-1)
        loss = F.kl_div(F.log_softmax(student, dim=-1), target, log_target=True,
                        reduction="batchmean")
        return loss, {}
