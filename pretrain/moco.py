"""MoCo (He et al. 2020, arXiv 1911.05722, Eq. 1-2; Contriever §3, facebookresearch/contriever
src/moco.py): keys from an exponential-moving-average copy of the encoder, negatives from a queue
of the keys of previous batches.

Timing: contriever updates the key encoder at the start of each forward, with the query encoder
the previous optimizer step produced. Here `on_optimizer_step()` (called by common.training after
every optimizer step) does the same update at the end of the step: the next forward sees the same
key encoder, and gradient accumulation (several forwards per step) does not update it several
times. The keys of every process are gathered, and enqueued by that same hook, after the
optimizer step: all processes hold the same queue, the micro-batches of one accumulated step all
see the same queue (as one batch of their size would), and a step the trainer skips for a
non-finite loss (train.nonfinite_loss=skip, `on_step_skipped()`) leaves no keys behind. The
queue, its pointer and the key encoder are part of this module's state_dict, hence of every
checkpoint.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from common.distributed import gather_nograd
from common.config import RecipeError
from pretrain.args import MOCO_SEPARATE_TOWERS, MethodArgs
from pretrain.method import PairMethod


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


@torch.no_grad()
def momentum_update(key_encoder: nn.Module, encoder: nn.Module, momentum: float) -> None:
    """theta_k <- m * theta_k + (1 - m) * theta_q (MoCo Eq. 2)."""
    for (name_k, p_k), (name_q, p_q) in zip(key_encoder.named_parameters(),
                                            encoder.named_parameters()):
        if name_k != name_q:
            raise RuntimeError(f"key encoder parameter {name_k} does not match {name_q}")
        p_k.mul_(momentum).add_(p_q.detach(), alpha=1.0 - momentum)


@torch.no_grad()
def enqueue(queue: torch.Tensor, pointer: torch.Tensor, keys: torch.Tensor) -> None:
    """FIFO: write `keys` at `pointer` (wrapping around the end), advance the pointer modulo K.

    Contriever asserts queue_size % batch == 0; wrapping around makes any size work, except a
    queue smaller than the keys of one step, which is refused.
    """
    size, count = queue.shape[0], keys.shape[0]
    if count > size:
        raise ValueError(f"method.queue_size={size} is smaller than the {count} keys enqueued per "
                         "step (global batch x pairs.n_pairs); raise method.queue_size")
    rows = (int(pointer) + torch.arange(count, device=queue.device)) % size
    queue[rows] = keys.to(queue.dtype)
    pointer.fill_((int(pointer) + count) % size)


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
