"""MoCo's two pieces of state kept beside the loss (moco.py): the momentum update of the key
encoder (He et al. 2020, arXiv 1911.05722, Eq. 2) and the FIFO queue of negative keys (§3.1;
Contriever's src/moco.py `_dequeue_and_enqueue`)."""
from __future__ import annotations

import torch
from torch import nn


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
