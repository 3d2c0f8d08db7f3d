"""MoCo (He et al. 2020, arXiv 1911.05722, Eq. 1-2; Contriever §3, facebookresearch/contriever
src/moco.py): keys from a momentum copy of the encoder, negatives from a queue of earlier keys.

Timing: contriever updates the key encoder at the start of each forward; here
`on_optimizer_step()` (the Trainer calls it after every optimizer step) does it at the end of the
step, so the next forward sees the same key encoder and gradient accumulation does not update it
twice. The gathered keys are enqueued by that hook too: all processes hold the same queue, every
micro-batch of a step sees the same queue, and a skipped step (train.nonfinite_loss=skip,
`on_step_skipped()`) leaves no keys behind. Queue, pointer and key encoder are in the state_dict.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from twotower.common.model.distributed import gather_nograd
from twotower.common.recipe.config import RecipeError
from twotower.pretrain.args import MOCO_SEPARATE_TOWERS, MethodArgs
from twotower.pretrain.losses.base import PairMethod
from twotower.pretrain.losses.moco_queue import enqueue, momentum_update


def moco_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits = [q.k+, q.queue] / tau (MoCo Eq. 1), for n positives per query.

    q [B, H], k [B * n, H] document-major (no gradient), queue [K, H].
    Returns (pos_logits [B, n], logsumexp of q.queue / tau [B], max of q.queue / tau [B]).
    """
    batch = q.shape[0]
    pos = torch.einsum("bh,bnh->bn", q, k.view(batch, -1, k.shape[-1])) / temperature
    # a copy: the queue changes in place at the optimizer step; the logits must not alias it
    neg = q @ queue.detach().clone().T.to(q.dtype) / temperature
    return pos, torch.logsumexp(neg, dim=1), neg.max(dim=1).values


class MoCo(PairMethod):
    def __init__(self, encoder: nn.Module, args: MethodArgs, n_pairs: int, seed: int = 0):
        if getattr(encoder, "doc_model", None) is not None:
            raise RecipeError(MOCO_SEPARATE_TOWERS)
        super().__init__(encoder, args, n_pairs)
        self.key_encoder = copy.deepcopy(encoder)
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)
        # contriever: a random queue, each key L2-normalised, until real keys replace it
        gen = torch.Generator().manual_seed(seed)
        queue = F.normalize(torch.randn(args.queue_size, encoder.dim, generator=gen), dim=1)
        self.register_buffer("queue", queue.to(encoder.device))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long, device=encoder.device))
        self.pending_keys: list[torch.Tensor] = []  # this step's keys, enqueued once it is taken

    def embedding_inputs(self, batch: dict) -> dict:
        return {"query": (batch["q_input_ids"], batch["q_attention_mask"], "query")}

    def loss_from_embeddings(self, emb: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        """Called once per micro-batch also under train.grad_cache_chunk (only the queries are
        chunked), so the keys are encoded and enqueued once."""
        q = emb["query"]
        with torch.no_grad():
            self.key_encoder.train(self.training and self.args.key_encoder_train_mode)
            k = self.embed(self.key_encoder, batch, "key")
        self.check_shapes(q, k)
        pos, neg_lse, neg_max = moco_logits(q, k, self.queue, self.args.temperature)
        # relevance as the released code: current query embedding . key-encoder key, no gradient
        relevance = self.pair_scores(q.detach(), k) if self.args.relevance_aware else None
        loss, weights = self.weighted_loss(pos, neg_lse, relevance)
        stats = self.stats(loss, pos, neg_max, q, k, weights)
        if self.training:  # enqueued after the step: never this batch's own negatives
            self.pending_keys.append(gather_nograd(k))
        return loss, stats

    def on_optimizer_step(self) -> None:
        for keys in self.pending_keys:
            enqueue(self.queue, self.queue_ptr, keys)
        self.pending_keys.clear()
        momentum_update(self.key_encoder, self.encoder, self.args.momentum)

    def on_step_skipped(self) -> None:
        self.pending_keys.clear()
