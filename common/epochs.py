"""Where a run is and what it reads next: the saved train state, the epoch order, the number of
steps, and the torch seed of each micro-batch -- all pure functions of (seed, epoch, position), so
that every process and every resumed run agree (common/training.py runs the loop)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from common.args import TrainArgs


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
