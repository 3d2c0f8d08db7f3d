"""Margin-MSE distillation (Hofstätter, Althammer, Schröder, Sertkan & Hanbury, "Improving
Efficient Neural Ranking Models with Cross-Architecture Knowledge Distillation", arXiv
2010.02666, Eq. 1):

    L = 1/(B k) sum_i sum_j ( (s(q_i,d+_i) - s(q_i,d-_ij)) - (t(q_i,d+_i) - t(q_i,d-_ij)) )^2

The paper uses one negative per triple; with k negatives every (positive, negative) margin is one
term of the mean (as sentence-transformers' MarginMSELoss does). Only a query's own documents are
compared, so nothing is gathered across processes. Student scores are multiplied by
student_scale first (1 for a dot-product student).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twotower.finetune.args import MarginMSEArgs
from twotower.finetune.losses.base import GroupEmbeddings, require


class MarginMSE(nn.Module):
    name = "margin_mse"

    def __init__(self, args: MarginMSEArgs):
        super().__init__()
        self.student_scale = args.student_scale

    def forward(self, emb: GroupEmbeddings) -> tuple[Tensor, dict]:
        if emb.n_negatives == 0:
            raise ValueError("margin_mse needs hard negatives (data.n_negatives > 0)")
        t_pos = require(emb.teacher_pos, "teacher scores", self.name)
        t_neg = require(emb.teacher_neg, "teacher scores", self.name)
        s_pos = (emb.query * emb.positive).sum(-1) * self.student_scale  # [B]
        s_neg = torch.einsum("bh,bkh->bk", emb.query, emb.negatives) * self.student_scale
        student = s_pos[:, None] - s_neg
        teacher = (t_pos[:, None] - t_neg).to(student.dtype)
        return F.mse_loss(student, teacher), {}
