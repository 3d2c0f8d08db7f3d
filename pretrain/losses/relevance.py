"""ReContriever's relevance-aware weighting of the per-pair InfoNCE, computed from scores only.

Lei et al. 2023, "Unsupervised Dense Retrieval with Relevance-Aware Contrastive Pre-Training"
(arXiv 2306.03166), section "Relevance-Aware Contrastive Learning": for a query crop q of a
document and its positive crops d_1..d_n (one-document-multi-pair),
    w_j = s(q, d_j) / sum_k s(q, d_k)            (the relevance estimate, without gradient)
    L(q) = sum_j w_j * InfoNCE(q, d_j)             (the weighted contrastive loss)
with InfoNCE as in Contriever (arXiv 2112.09118, Eq. 1; base.pair_infonce), L(q) averaged over
the queries.
(Equation numbers of the ReContriever paper are not quoted: we could not check them offline.)

Notes on the released code (Yibin-Lei/ReContriever src/relevance_aware.py):
* it normalises with an undefined name (`relevance / sim.sum(...)`: `sim` does not exist);
* its `weighted_cross_entropy` takes the mean of w * CE over all n*B rows, i.e. (1/n) of the
  formula above. Here `reduction="query"` is the formula and `reduction="pair"` the released scale;
  with AdamW the factor mostly cancels, but it changes the balance against weight decay and any
  gradient clipping, so it is a recipe key (method.relevance_reduction), not a hidden constant;
* raw dot-product similarities can be negative or ~0, where s / sum(s) is undefined or flips
  sign. Guards: `clamp` w = max(s, eps) / sum max(s, eps) (a pair with s <= eps gets ~0 weight; a
  group whose pairs are all <= eps gets uniform weights) or `softmax` w = softmax(s / t).
"""
from __future__ import annotations

import torch

from twotower.common.model.distributed import gather_nograd, global_offset, world_size


def normalise_scores(scores: torch.Tensor, guard: str, eps: float,
                     temperature: float) -> torch.Tensor:
    """Weights along the last dimension summing to 1 (see the module docstring for the guards)."""
    if guard == "clamp":
        clamped = scores.clamp_min(eps)
        return clamped / clamped.sum(-1, keepdim=True)
    if guard == "softmax":
        return torch.softmax(scores / temperature, dim=-1)
    raise ValueError(f"relevance guard must be clamp or softmax; got {guard!r}")


@torch.no_grad()
def relevance_weights(scores: torch.Tensor, group: str = "document", guard: str = "clamp",
                      eps: float = 1e-6, temperature: float = 1.0) -> torch.Tensor:
    """w [B, n] from similarities s(q_i, d_ij) [B, n] (detached).

    group="document": each row sums to 1 (the paper). group="batch": all pairs of the *global*
    batch sum to 1 (gathered from every process), the weighting without one-document-multi-pair.
    """
    scores = scores.detach().float()
    if group == "document":
        return normalise_scores(scores, guard, eps, temperature)
    if group != "batch":
        raise ValueError(f"relevance group must be document or batch; got {group!r}")
    everything = gather_nograd(scores)
    weights = normalise_scores(everything.reshape(1, -1), guard, eps, temperature)
    start = global_offset(scores.shape[0], scores.device)
    return weights.view_as(everything)[start:start + scores.shape[0]]


def reduce_pair_losses(ce: torch.Tensor, weights: torch.Tensor, group: str = "document",
                       reduction: str = "query") -> torch.Tensor:
    """This process's share of the weighted loss; DDP's gradient averaging over W processes then
    gives exactly the single-process loss of the global batch.

    document/query: mean_i sum_j w_ij ce_ij            (ReContriever's loss, averaged over queries)
    document/pair:  mean over the n*B rows of w * ce     (the released code: 1/n of the above)
    batch/query:    sum over the global batch of w * ce  (weights sum to 1 over the batch)
    batch/pair:     that sum / (global rows n*B)
    """
    if reduction not in ("query", "pair"):
        raise ValueError(f"relevance reduction must be query or pair; got {reduction!r}")
    n = ce.shape[1]
    if group == "document":
        per_query = (weights * ce).sum(1)
        return per_query.mean() / (n if reduction == "pair" else 1)
    total = (weights * ce).sum() * world_size()  # the W local sums are averaged by DDP
    if reduction == "pair":
        global_queries = int(gather_nograd(torch.tensor([ce.shape[0]], device=ce.device)).sum())
        total = total / (global_queries * n)
    return total
