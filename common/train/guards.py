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


class ShardingError(RuntimeError):
    """A launch that would shard the weights (FSDP, DeepSpeed ZeRO-3), or ask for it and not."""


def check_sharding(distributed_type: str, env, zero_stage: int | None = None) -> None:
    """Refuse what would not run to the end. FSDP on a CPU: Accelerate quietly trains plain DDP
    (MULTI_CPU) instead. Sharded weights on GPUs (FSDP, ZeRO-3): training and resume work, but
    the exported model and the finiteness check above read whole weights (measured on one H200:
    the final save_pretrained fails on sharded storage) -- so not yet."""
    wants_fsdp = str(env.get("ACCELERATE_USE_FSDP", "")).lower() in ("1", "true", "yes")
    if wants_fsdp and distributed_type != "FSDP":
        raise ShardingError(f"FSDP was asked for (accelerate config) but Accelerate runs "
                            f"{distributed_type}: FSDP needs GPUs. Drop the FSDP config.")
    if distributed_type == "FSDP" or (distributed_type == "DEEPSPEED" and zero_stage == 3):
        raise ShardingError(
            "sharded weights (FSDP, DeepSpeed ZeRO-3) are not supported yet: the model export "
            "needs whole weights. Use DDP (accelerate launch --multi_gpu) with "
            "train.grad_cache_chunk to bound memory, or DeepSpeed ZeRO-2 "
            "(recipes/accelerate/deepspeed_zero2.yaml).")
