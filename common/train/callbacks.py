"""What the Trainer calls at its evaluation points and at the end of a run, without knowing what
the callbacks do (evaluation, diagnostics and reports live in twotower.common.eval and
twotower.common.report; twotower.common.report.callbacks builds them from a recipe).

The Trainer calls, in order:
  on_train_begin(accelerator)  on every process, once trackers exist (load data, build state)
  on_evaluate(point)           at step 0 when `evaluate_before_training`, every train.eval_every
                               steps and after the last step; on every process when
                               `every_process`, else on the main one. Returns metrics, which the
                               Trainer logs as `eval/<name>` and writes to metrics.json at the end
  on_train_end(point, metrics) on the main process, after the model is saved
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from torch import nn


@dataclass(frozen=True)
class TrainPoint:
    """Where training stands when a callback is called."""
    step: int
    encoder: nn.Module  # the unwrapped encoder being trained
    accelerator: Accelerator
    output_dir: Path
    final: bool  # after the last step


class TrainerCallback:
    """Base class: every hook does nothing. Subclass and override what you need."""
    every_process: bool = False  # on_evaluate on every process (e.g. each encodes a slice)
    evaluate_before_training: bool = False

    def on_train_begin(self, accelerator: Accelerator) -> None:
        pass

    def on_evaluate(self, point: TrainPoint) -> dict[str, float]:
        return {}

    def on_train_end(self, point: TrainPoint, metrics: dict[str, float]) -> None:
        pass
