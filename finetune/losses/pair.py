"""PAIR: query-centric plus passage-centric similarity (Ren, Lv, Qu, Liu, Zhao, She, Wu, Wang &
Wen, "PAIR: Leveraging Passage-Centric Similarity Relation for Improving Dense Passage
Retrieval", Findings of ACL 2021, Sec. 3: the query-centric loss L_Q, the passage-centric
loss L_P and their combination; equation numbers not checked against the PDF offline):

    L_Q = InfoNCE over the global batch (finetune/losses/infonce.py)
    L_P = -1/B sum_i log  e^{s(p+_i, q_i)/tau} / (e^{s(p+_i, q_i)/tau} + sum_{p-} e^{s(p+_i, p-)/tau})
    L   = (1 - alpha) L_Q + alpha L_P        (alpha = 0.1 in the paper)

p- (passage_negatives): "hard" = every hard negative of the global batch (the paper's negatives
are the query's negatives, shared across the batch as in its cross-batch training; the
reference code is PaddlePaddle and not reproduced here), or "all" = every document of the batch
except p+_i itself. PAIR uses a dot product (tau = 1 here); alpha = 0 gives exactly L_Q.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twotower.finetune.args import PairArgs
from twotower.finetune.losses.base import GroupEmbeddings
from twotower.finetune.losses.infonce import infonce_loss


def passage_centric_logits(emb: GroupEmbeddings, temperature: float, negatives: str) -> Tensor:
    """[B, 1 + |p-|]: column 0 is s(p+_i, q_i), then s(p+_i, p-) for every p-."""
    own = (emb.positive * emb.query).sum(-1, keepdim=True)
    if negatives == "hard":
        if emb.n_negatives == 0:
            raise ValueError("PAIR with passage_negatives=hard needs hard negatives "
                             "(data.n_negatives > 0), or use passage_negatives=all")
        pp = emb.positive @ emb.gathered("negatives").T
    else:
        pp = emb.positive @ emb.gathered_documents().T
        pp = pp.masked_fill(F.one_hot(emb.local_targets(), pp.shape[1]).bool(), float("-inf"))
    return torch.cat([own, pp], dim=1) / temperature


class Pair(nn.Module):
    name = "pair"

    def __init__(self, args: PairArgs):
        super().__init__()
        self.temperature, self.alpha = args.temperature, args.alpha
        self.passage_negatives = args.passage_negatives

    def forward(self, emb: GroupEmbeddings) -> tuple[Tensor, dict]:
        loss_q = infonce_loss(emb, self.temperature)
        if self.alpha == 0.0:
            return loss_q, {"pair_q": loss_q.detach()}
        logits = passage_centric_logits(emb, self.temperature, self.passage_negatives)
        zeros = torch.zeros(emb.batch_size, dtype=torch.long, device=logits.device)
        loss_p = F.cross_entropy(logits, zeros)
        loss = (1.0 - self.alpha) * loss_q + self.alpha * loss_p
        return loss, {"pair_q": loss_q.detach(), "pair_p": loss_p.detach()}
