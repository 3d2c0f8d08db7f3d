"""What the in-batch and MoCo methods share: encoding a pair batch, the per-pair InfoNCE, its
(relevance-)weighting and reduction (relevance.py), Contriever's logged statistics."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from twotower.common.model.grad_cache import EmbeddingMethod
from twotower.pretrain.args import MethodArgs
from twotower.pretrain.losses.relevance import reduce_pair_losses, relevance_weights


def pair_infonce(pos_logits: torch.Tensor, neg_lse: torch.Tensor) -> torch.Tensor:
    """InfoNCE of every (query i, positive j) row (van den Oord et al. 2018; Contriever Eq. 1):
        -log exp(p_ij) / (exp(p_ij) + sum_m exp(n_im)) = softplus(logsumexp_m(n_im) - p_ij)
    pos_logits [B, n] are s(q_i, d_ij) / tau, neg_lse [B] = logsumexp of the negatives' logits."""
    return F.softplus(neg_lse.unsqueeze(1) - pos_logits)


class PairMethod(EmbeddingMethod):
    """Base of the contrastive methods: `forward(batch) -> (loss, stats)`, `self.encoder` trained.

    A batch is PairCollator's: queries [B, Lq] and keys [B * n_pairs, Lk] in document-major order.
    Subclasses compute the loss from embeddings (`loss_from_embeddings`), so that
    train.grad_cache_chunk (common/model/grad_cache.py) can embed the trainable sides in chunks.
    """

    def __init__(self, encoder: nn.Module, args: MethodArgs, n_pairs: int):
        super().__init__()
        self.encoder, self.args, self.n_pairs = encoder, args, n_pairs

    def embedding_inputs(self, batch: dict) -> dict:
        """The trainable embeddings: queries and keys (MoCo overrides: its keys have no gradient)."""
        return {"query": (batch["q_input_ids"], batch["q_attention_mask"], "query"),
                "key": (batch["k_input_ids"], batch["k_attention_mask"], "doc")}

    def embed_rows(self, name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   tower: str, encoder: nn.Module | None = None) -> torch.Tensor:
        emb = (encoder or self.encoder)(input_ids, attention_mask, tower=tower).float()
        norm = self.args.norm_query if name == "query" else self.args.norm_doc
        return F.normalize(emb, dim=-1) if norm else emb

    def embed(self, encoder: nn.Module, batch: dict, side: str) -> torch.Tensor:
        prefix, tower = ("q", "query") if side == "query" else ("k", "doc")
        return self.embed_rows(side, batch[f"{prefix}_input_ids"],
                               batch[f"{prefix}_attention_mask"], tower, encoder=encoder)

    def check_shapes(self, q: torch.Tensor, k: torch.Tensor) -> None:
        if k.shape[0] != q.shape[0] * self.n_pairs:
            raise ValueError(f"{q.shape[0]} queries need {q.shape[0] * self.n_pairs} keys "
                             f"(pairs.n_pairs={self.n_pairs}); the batch has {k.shape[0]}")

    def pair_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """s(q_i, d_ij) [B, n] for document-major keys [B * n, H]."""
        return torch.einsum("bh,bnh->bn", q, k.view(q.shape[0], self.n_pairs, -1))

    def weighted_loss(self, pos_logits: torch.Tensor, neg_lse: torch.Tensor,
                      relevance: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, weights). Without relevance weighting every pair weighs 1/n: the mean InfoNCE
        over all (query, key) pairs (Contriever for n = 1, multi-pair alone for n > 1)."""
        ce = pair_infonce(pos_logits, neg_lse)
        a = self.args
        if relevance is None:
            weights = torch.full_like(ce, 1.0 / ce.shape[1])
            return reduce_pair_losses(ce, weights, "document", "query"), weights
        weights = relevance_weights(relevance, a.relevance_group, a.relevance_guard,
                                    a.relevance_eps, a.relevance_temperature)
        return reduce_pair_losses(ce, weights, a.relevance_group, a.relevance_reduction), weights

    @staticmethod
    def stats(loss: torch.Tensor, pos_logits: torch.Tensor, neg_max: torch.Tensor,
              q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor) -> dict[str, float]:
        """Contriever's logged statistics (accuracy, stdq, stdk) plus the largest weight."""
        return {
            "loss": loss.detach(),
            "accuracy": (pos_logits > neg_max.unsqueeze(1)).float().mean().detach() * 100,
            "stdq": q.detach().std(0).mean(),
            "stdk": k.detach().std(0).mean(),
            "weight_max": weights.detach().max(1).values.mean(),
        }
