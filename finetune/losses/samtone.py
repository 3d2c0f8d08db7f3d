"""SamToNe: contrastive loss with same-tower negatives (Moiseev, Hernandez Abrego, Dornbach,
Zitouni, Alfonseca & Dong, "SamToNe: Improving Contrastive Loss for Dual Encoder Retrieval
Models with Same Tower Negatives", Findings of ACL 2023, Sec. 3: the SamToNe loss and its
symmetric form; equation numbers not checked against the PDF offline).

Query-anchored, the other queries join the softmax denominator (j != i):

    L_q = -1/B sum_i log  e^{s(q_i,d+_i)/tau} /
                          ( sum_{d in D} e^{s(q_i,d)/tau} + sum_{j != i} e^{s(q_i,q_j)/tau} )

Symmetric variant, document-anchored with document-document terms, leaving out the documents
of the anchor's own query (d+_i itself and its hard negatives d-_i*):

    L_d = -1/B sum_i log  e^{s(d+_i,q_i)/tau} /
                          ( sum_j e^{s(d+_i,q_j)/tau} + sum_{d in D \\ D_i} e^{s(d+_i,d)/tau} )

    L = L_q  (+ L_d when symmetric)

One joint denominator per anchor: adding a separate "same-tower" softmax term instead could make
a per-direction loss negative. q-q terms come from the query tower and d-d terms from the
document tower, so the loss applies to shared and to separate towers alike. The paper sums the
two directions of the symmetric loss; the recipe weight scales the sum.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twotower.finetune.args import SamToNeArgs
from twotower.finetune.losses.base import GroupEmbeddings


def query_anchored_logits(emb: GroupEmbeddings, temperature: float) -> Tensor:
    """[B, docs + queries]: q_i against every document, then every query with q_i masked."""
    targets = emb.local_targets()
    qd = emb.query @ emb.gathered_documents().T
    qq = emb.query @ emb.gathered("query").T
    qq = qq.masked_fill(_one_hot(targets, qq.shape[1]), float("-inf"))  # no self-term
    return torch.cat([qd, qq], dim=1) / temperature


def document_anchored_logits(emb: GroupEmbeddings, temperature: float) -> Tensor:
    """[B, queries + docs]: d+_i against every query, then every document except its group's."""
    targets = emb.local_targets()
    n_global, k = emb.gathered("positive").shape[0], emb.n_negatives
    dq = emb.positive @ emb.gathered("query").T
    dd = emb.positive @ emb.gathered_documents().T
    same_query = _one_hot(targets, dd.shape[1])  # d+_i itself
    if k:
        cols = torch.arange(dd.shape[1], device=dd.device)
        first = n_global + targets * k  # group i's negatives sit at N + i*k .. N + i*k + k - 1
        same_query |= (cols[None, :] >= first[:, None]) & (cols[None, :] < first[:, None] + k)
    dd = dd.masked_fill(same_query, float("-inf"))
    return torch.cat([dq, dd], dim=1) / temperature


def _one_hot(targets: Tensor, width: int) -> Tensor:
    return F.one_hot(targets, width).bool()


class SamToNe(nn.Module):
    name = "samtone"

    def __init__(self, args: SamToNeArgs):
        super().__init__()
        self.temperature = args.temperature
        self.symmetric = args.symmetric

    def forward(self, emb: GroupEmbeddings) -> tuple[Tensor, dict]:
        targets = emb.local_targets()
        loss_q = F.cross_entropy(query_anchored_logits(emb, self.temperature), targets)
        if not self.symmetric:
            return loss_q, {}
        loss_d = F.cross_entropy(document_anchored_logits(emb, self.temperature), targets)
        return loss_q + loss_d, {"samtone_q": loss_q.detach(), "samtone_d": loss_d.detach()}
