"""Where a run is and what it reads next: the saved train state, the epoch order, the number of
steps, and the torch seed of each micro-batch -- all pure functions of (seed, epoch, position), so
that every process and every resumed run agree (common/train/trainer.py runs the loop)."""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from twotower.common.recipe.args import TrainArgs
from twotower.common.recipe.config import RecipeError

log = logging.getLogger("twotower.train")


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint so that resume continues the same data order."""

    step: int = 0  # optimizer steps done
    micro_batches: int = 0  # micro-batches consumed in total (accumulation continues across epochs)
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed by this process
    skipped_nonfinite: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class EpochSampler(Sampler[int]):
    """A permutation that is a pure function of (seed, epoch): identical on every process, so
    Accelerate's batch sharding gives rank r the r-th slice of each global batch. A dataset may
    define `epoch_order(epoch, seed) -> list[int]` to choose the order itself (e.g. keeping the
    same text out of one batch)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __iter__(self):
        order = getattr(self.dataset, "epoch_order", None)
        if callable(order):
            return iter(order(self.epoch, self.seed))
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(len(self), generator=gen).tolist())


def micro_batch_seed(seed: int, micro_batch: int, process: int) -> int:
    """The torch seed of one micro-batch (see `Trainer._loop`)."""
    return int(np.random.default_rng([seed, micro_batch, process]).integers(2**62))


def steps_for_epochs(args: TrainArgs, n_examples: int, processes: int = 1) -> int:
    """Optimizer steps for `args.epochs` passes over `n_examples` (incomplete batches dropped),
    at least `args.min_steps`."""
    per_step = args.per_device_batch_size * args.gradient_accumulation_steps * processes
    if n_examples < per_step:
        raise ValueError(f"{n_examples} training examples do not fill one step of {per_step} "
                         "(train.per_device_batch_size x gradient_accumulation_steps x processes)")
    return max(1, args.min_steps, math.ceil(args.epochs * (n_examples // per_step)))


def resolve_batch(args: TrainArgs, processes: int, announce: bool = False) -> TrainArgs:
    """`args` with the per-device batch that `train.global_batch_size` asks for on `processes`
    processes (unchanged when it is 0): global / processes exactly, or a RecipeError. With
    `announce`, the log says how the global batch is reached."""
    if not args.global_batch_size:
        return args
    per_device, rest = divmod(args.global_batch_size, processes)
    if rest or not per_device:
        raise RecipeError(
            f"'train.global_batch_size' {args.global_batch_size} cannot be split evenly over "
            f"{processes} processes; choose a multiple of {processes} or another process count")
    if announce:
        log.info("train.global_batch_size=%d: %d processes x %d per device (recipe's "
                 "per_device_batch_size %d), in-batch negatives gathered over all %d%s",
                 args.global_batch_size, processes, per_device, args.per_device_batch_size,
                 args.global_batch_size, f"; GradCache chunks of {args.grad_cache_chunk}"
                 if args.grad_cache_chunk else "")
        if per_device > args.per_device_batch_size and not args.grad_cache_chunk:
            log.warning("%d per device is more than the recipe's per_device_batch_size %d: if "
                        "memory runs out, set train.grad_cache_chunk=%d (same gradients)",
                        per_device, args.per_device_batch_size, args.per_device_batch_size)
    return dataclasses.replace(args, per_device_batch_size=per_device)
