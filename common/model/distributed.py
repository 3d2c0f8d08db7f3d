"""Gathers across processes, with and without gradient (cf. contriever `src/dist_utils.py`).

Every function is a no-op on a single process, so losses call them unconditionally.

Why the gradient gather sums in backward: process p computes L_p (a mean over its local anchors)
against candidates gathered from all W processes. The parameters' true gradient for the global
objective mean_p L_p is (1/W) * sum_p dL_p/dθ. DDP already averages gradients over processes
(the 1/W), so each process must receive, for its own embeddings, the gradient of *every* process's
loss: sum_q dL_q/de_p. An all-reduce (sum) of the gathered gradient gives exactly that. Contriever's
`gather_wgrad` keeps only the local term dL_p/de_p, which drops the cross-process terms.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1



def leave_processes() -> None:
    """End of a command that finished: destroy the process group (every process). A process that
    exits with gloo's worker threads alive can abort while the interpreter shuts down ("terminate
    called without an active exception", exit -6: pytorch/pytorch#190489; seen here under load).
    Called by the entry points' `__main__` and the `twotower` command only, never by a `main()`
    another command calls in process (domain_adapt runs pretraining inside fine-tuning)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here (no-op on one process)."""
    if is_distributed():
        dist.barrier()


def use_cpu(device: str) -> bool:
    """Accelerate only picks gloo for several CPU processes when told to run on the CPU; without a
    GPU, `accelerate launch --multi_gpu --num_processes 2` (or torchrun) would otherwise give N
    independent single-process runs."""
    if device == "cpu":
        return True
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return device == "auto" and several and not torch.cuda.is_available()


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    size = torch.tensor([n], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _all_gather_padded(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All-gather tensors whose first dimension differs per process (pad to the max, then trim)."""
    longest = max(sizes)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(out, sizes)], dim=0)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        ctx.sizes = sizes
        return _all_gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: rank()])
        return grad[start : start + ctx.sizes[rank()]], None


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all processes along dim 0; gradients flow back to every process.

    First dimensions may differ between processes. Order is by rank, so a process's own rows start
    at `global_offset(x.shape[0])`.
    """
    if not is_distributed():
        return x
    sizes = _gather_sizes(x.shape[0], x.device)
    return _GatherWithGrad.apply(x, sizes)


@torch.no_grad()
def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (detached) from all processes along dim 0; sizes may differ per process."""
    if not is_distributed():
        return x.detach()
    return _all_gather_padded(x.detach(), _gather_sizes(x.shape[0], x.device))


def gather_variable(x: torch.Tensor, with_grad: bool = False) -> torch.Tensor:
    """Explicit name for gathers whose first dimension differs between processes."""
    return gather_with_grad(x) if with_grad else gather_nograd(x)


def global_offset(local_n: int, device: torch.device | None = None) -> int:
    """Index of this process's first row in a rank-ordered gather of `local_n` rows per process."""
    if not is_distributed():
        return 0
    return sum(_gather_sizes(local_n, device or torch.device("cpu"))[: rank()])


def gather_object(obj: Any) -> list[Any]:
    """Gather any picklable object from every process (rank order)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Average a (detached) tensor over processes — for logging statistics, not for gradients."""
    if not is_distributed():
        return x.detach()
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / world_size()


__all__ = [
    "is_distributed", "world_size", "rank", "is_main", "gather_with_grad", "gather_nograd",
    "gather_variable", "global_offset", "gather_object", "broadcast_object", "all_reduce_mean",
]
