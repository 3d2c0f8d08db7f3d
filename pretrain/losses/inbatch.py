"""In-batch InfoNCE (Contriever §3, negatives within a batch, facebookresearch/contriever
src/inbatch.py), extended to n positives per query for ReContriever's multi-pair batches."""
from __future__ import annotations

import torch

from twotower.common.model.distributed import gather_with_grad, global_offset
from twotower.pretrain.losses.base import PairMethod


def inbatch_logits(q: torch.Tensor, k: torch.Tensor, n_pairs: int, temperature: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local queries q [B, H] against the keys of *all* processes.

    k [B * n, H] are this process's keys, document-major. The keys are gathered with gradient
    (twotower.common.model.distributed.gather_with_grad), so the local loss's gradient reaches every process's
    keys. For query i (global document g = offset + i) the logits are s(q_i, k) / tau over all
    gathered keys; its positives are the n keys of document g, and its negatives every key of
    the *other* documents: the other n - 1 crops of its own document are positives too, so they
    are left out of its denominator (with n = 1 this is exactly contriever's in-batch loss).
    Returns (pos_logits [B, n], logsumexp of the negatives' logits [B], their max [B]).
    """
    batch = q.shape[0]
    keys = gather_with_grad(k)
    logits = q @ keys.T / temperature  # [B, G * n]
    if keys.shape[0] <= n_pairs:
        raise ValueError("in-batch negatives need at least 2 documents in the global batch; "
                         f"got {keys.shape[0] // n_pairs}")
    docs = global_offset(batch, q.device) + torch.arange(batch, device=q.device)
    pos_cols = docs.unsqueeze(1) * n_pairs + torch.arange(n_pairs, device=q.device)
    same_doc = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, pos_cols, True)
    negatives = logits.masked_fill(same_doc, float("-inf"))
    return (logits.gather(1, pos_cols), torch.logsumexp(negatives, dim=1),
            negatives.max(dim=1).values)


class InBatch(PairMethod):
    """Queries and keys from the same (trained) encoder; relevance weights, if on, from the same
    embeddings without gradient (ReContriever's weighting with the current encoder)."""

    def loss_from_embeddings(self, emb: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        q, k = emb["query"], emb["key"]
        self.check_shapes(q, k)
        pos, neg_lse, neg_max = inbatch_logits(q, k, self.n_pairs, self.args.temperature)
        relevance = self.pair_scores(q, k).detach() if self.args.relevance_aware else None
        loss, weights = self.weighted_loss(pos, neg_lse, relevance)
        return loss, self.stats(loss, pos, neg_max, q, k, weights)
