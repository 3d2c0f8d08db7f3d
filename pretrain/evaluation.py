"""Retrieval evaluation during/after pretraining (common.evaluate on a BEIR split, optionally a
slice: eval.max_queries judged queries, their judged documents + eval.max_docs others)."""
from __future__ import annotations

from typing import Callable

from common.args import EvalArgs


def load_eval_slice(args: EvalArgs, seed: int = 0):
    from common.evaluate import load_eval_data, subsample

    return subsample(load_eval_data(args.data, args.split), args.max_queries, args.max_docs, seed)


def evaluate_encoder(encoder, data, args: EvalArgs, progress: bool = False) -> dict[str, float]:
    from common.evaluate import evaluate_dense

    result = evaluate_dense(encoder, data, batch_size=args.batch_size, measures=args.metrics,
                            progress=progress)
    return dict(result.metrics)


def make_evaluate_fn(args: EvalArgs, seed: int = 0) -> Callable | None:
    """`encoder -> metrics` for common.training.Trainer, or None when eval.data is empty. The
    data are loaded once, on first use (only the main process evaluates)."""
    if not args.data:
        return None
    cache: dict = {}

    def evaluate(encoder) -> dict[str, float]:
        if "data" not in cache:
            cache["data"] = load_eval_slice(args, seed)
        return evaluate_encoder(encoder, cache["data"], args)

    return evaluate
