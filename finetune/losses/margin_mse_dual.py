"""Dual Margin-MSE: Margin-MSE (Hofstätter et al., arXiv 2010.02666, Eq. 1) in the query
retrieval direction of DANCE (arXiv 2107.07773): the document is the anchor and queries are
ranked for it.

    L = 1/(B m) sum_i sum_j ( (s(d+_i,q_i) - s(d+_i,q-_ij)) - (t(q_i,d+_i) - t(q-_ij,d+_i)) )^2

q-_ij are the group's m negative queries (data.n_neg_queries: queries that have d+_i among their
mined negatives), with teacher scores t(q-_ij, d+_i). Weighted with `margin_mse` in the recipe.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twotower.finetune.args import MarginMSEArgs
from twotower.finetune.losses.base import GroupEmbeddings, require


class MarginMSEDual(nn.Module):
    name = "margin_mse_dual"

    def __init__(self, args: MarginMSEArgs):
        super().__init__()
        self.student_scale = args.student_scale

    def forward(self, emb: GroupEmbeddings) -> tuple[Tensor, dict]:
        neg_queries = require(emb.neg_queries, "negative queries (data.n_neg_queries)", self.name)
        t_pos = require(emb.teacher_pos, "teacher scores", self.name)
        t_negq = require(emb.teacher_neg_queries, "teacher scores of the negative queries",
                         self.name)
        s_pos = (emb.positive * emb.query).sum(-1) * self.student_scale  # [B]
        s_negq = torch.einsum("bh,bmh->bm", emb.positive, neg_queries) * self.student_scale
        student = s_pos[:, None] - s_negq
        teacher = (t_pos[:, None] - t_negq).to(student.dtype)
        return F.mse_loss(student, teacher), {}
