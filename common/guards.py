"""What stops a run before it writes a broken state: a non-finite loss (before the update) and
non-finite weights or embeddings (before a checkpoint or the final model is written)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class NonFiniteLossError(FloatingPointError):
    """A NaN/inf loss; raised before any update or checkpoint of the broken state."""


class NonFiniteModelError(FloatingPointError):
    """Non-finite weights or embeddings; raised before they are written as a checkpoint or model."""


PROBE = "a probe sentence: its embedding must be finite"


def check_finite_model(method: nn.Module, step: int) -> None:
    """Every weight of `method`, and the embedding of a probe text by each tower, finite -- or a
    NonFiniteModelError naming what is not. (Finite weights can still give NaN embeddings: with
    lr 1e30 one step leaves weights of ~1e30 and attention scores overflow.)"""
    bad = [name for name, t in method.state_dict().items()
           if t.is_floating_point() and not torch.isfinite(t).all()]
    encoder = getattr(method, "encoder", None)
    if not bad and encoder is not None:
        bad = [f"the {tower} embedding of a probe text" for tower in ("query", "doc")
               if not np.isfinite(encoder.encode([PROBE], tower=tower, progress=False)).all()]
    if bad:
        raise NonFiniteModelError(
            f"after step {step}, {bad[0]}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''} "
            "is not finite (a learning rate far too high, or an fp16 overflow); neither a "
            "checkpoint nor a model of this state was written. Lower train.lr and resume from "
            "the last checkpoint, or start again.")
