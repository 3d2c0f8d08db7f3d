"""Encode a list across processes (each takes a contiguous slice), then gather the whole matrix
on every process — evaluation of a large corpus under `accelerate launch` (as Contriever's
evaluation does). Every process must call it: it is for code that all processes run (the
evaluation CLI), not for the Trainer's main-process-only evaluation.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch
from accelerate import PartialState

from twotower.common.model.distributed import gather_variable, rank, use_cpu, world_size

T = TypeVar("T")


def shard_bounds(n: int, processes: int, index: int) -> tuple[int, int]:
    """[start, end) of process `index`'s contiguous share of n items (sizes differ by ≤ 1)."""
    base, extra = divmod(n, processes)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def encode_sharded(encode: Callable[[Sequence[T]], np.ndarray], items: Sequence[T]) -> np.ndarray:
    """`encode(items)` computed as one slice per process and gathered in order on every process."""
    if world_size() == 1:
        return encode(items)
    start, end = shard_bounds(len(items), world_size(), rank())
    local = torch.from_numpy(np.ascontiguousarray(encode(items[start:end]), dtype=np.float32))
    # the gather runs on the process group's device: NCCL (GPUs) gathers only GPU tensors
    return gather_variable(local.to(process_device())).cpu().numpy()


def process_device() -> torch.device:
    """Where this process encodes and gathers: its own GPU under `accelerate launch`, the GPU of
    a single process that has one, else the CPU (the standalone tools: evaluation, mining,
    analysis; the Trainer places its model through Accelerate)."""
    return PartialState(cpu=use_cpu("auto")).device


def join_processes() -> bool:
    """Under `accelerate launch --multi_gpu --num_processes N` (N > 1), join the process group
    (gloo on a machine without GPUs) and return True; False for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False

    PartialState(cpu=use_cpu("auto"))
    return True
