"""Benchmarks 2 and 3 of benchmarks/perf.py: fine-tuning throughput and loop overhead.

Data: recipe `fewshot` (SciFact train, BM25-mined hard negatives, one per query), the first
(warmup + steps) x batch groups in twotower's epoch-0 order; every system gets exactly these
(query, positive, negative) triples. Loss: MNRL / InfoNCE over the batch's positives and hard
negatives, cosine similarity x 20 (tau 0.05), AdamW lr 2e-5, gradient clipping at norm 1 (the
default of both trainers), max length 256, batch 32.

* twotower: twotower.common.train.trainer.Trainer with finetune's method and collator, as in a real run: the
  texts are tokenised once before training (data.pretokenize, not timed), a step pads; the
  recipe's model.forward_chunk=32 runs the 64 documents of a batch as two transformer calls;
* sentence-transformers: SentenceTransformerTrainer + MultipleNegativesRankingLoss (its default
  batch sampler shuffles the same triples, so batch compositions differ; tokenisation in its
  collator, inside the timed steps);
* bare loop: the batches tokenised up front (not timed), then forward (the same encoder
  settings, forward_chunk included), the same loss, backward, clipping, AdamW: the floor that
  twotower's step is compared with (benchmark 3).
Time = wall clock between the end of step `warmup` and the end of step `warmup + steps`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState, GradientState
from datasets import Dataset
from transformers import TrainerCallback

from benchmarks.perf_common import load_average, st_model
from twotower.common.model.encoder import Encoder
from twotower.common.recipe.config import load_recipe, recipe_to_yaml
from twotower.common.train.trainer import Trainer
from twotower.finetune.args import FinetuneRecipe
from twotower.finetune.run import build_stage

TEMPERATURE, LR = 0.05, 2e-5


def build(batch: int, max_length: int, n_groups: int):
    """(recipe, method, dataset, collate, triples) for the first `n_groups` groups."""
    recipe = load_recipe(FinetuneRecipe, "fewshot", [
        f"model.max_doc_length={max_length}", f"train.per_device_batch_size={batch}",
        f"train.lr={LR}", "train.warmup_steps=0", "train.scheduler=constant", "eval.data=''",
        "train.overwrite_output_dir=true", "train.log_every=1000", "train.save_every=0"])
    (_, stage), = recipe.stage_list()
    method, dataset, collate = build_stage(recipe, stage, recipe.model.name_or_path, 1)
    dataset.set_epoch(0)
    order = dataset.epoch_order(0, recipe.train.seed)[:n_groups]
    triples = [dataset[i] for i in order]
    return recipe, method, dataset, collate, triples


class _Subset(torch.utils.data.Dataset):
    """The dataset restricted to `order`, in that order (so the Trainer sees exactly the triples)."""

    def __init__(self, dataset, order):
        self.dataset, self.order = dataset, list(order)

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        return self.dataset[self.order[i]]

    def epoch_order(self, epoch, seed):
        return list(range(len(self.order)))


def twotower_pairs_per_s(batch: int, max_length: int, steps: int, warmup: int, precision: str,
                         built=None, grad_cache_chunk: int = 0) -> tuple[float, list[float]]:
    # one process measures several precisions: Accelerate's state is a singleton that refuses
    # a second mixed_precision unless reset
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    recipe, method, dataset, collate, _ = built or build(batch, max_length, batch * (steps + warmup))
    order = dataset.epoch_order(0, recipe.train.seed)[: batch * (steps + warmup)]
    stamps: list[float] = []
    method.on_optimizer_step = lambda: stamps.append(time.perf_counter())  # Trainer's hook
    with tempfile.TemporaryDirectory() as out:
        train = dataclasses.replace(recipe.train, output_dir=out, max_steps=steps + warmup,
                                    mixed_precision="bf16" if precision == "bf16" else "no",
                                    device="cpu")
        if grad_cache_chunk:
            train = dataclasses.replace(train, grad_cache_chunk=grad_cache_chunk)
        trainer = Trainer(args=train, method=method, train_dataset=_Subset(dataset, order),
                          collate_fn=collate,
                          recipe_yaml=recipe_to_yaml(dataclasses.replace(recipe, train=train)))
        trainer.train()
    step_times = [b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:])] if warmup else []
    seconds = stamps[-1] - stamps[warmup - 1]
    return batch * steps / seconds, step_times


def twotower_step_times(batch: int, max_length: int, steps: int, warmup: int,
                        grad_cache_chunk: int = 0) -> list[float]:
    return twotower_pairs_per_s(batch, max_length, steps, max(warmup, 1), "fp32",
                                grad_cache_chunk=grad_cache_chunk)[1]


def st_pairs_per_s(triples: list[dict], batch: int, max_length: int, steps: int, warmup: int,
                   precision: str) -> float:
    from sentence_transformers import (SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments, losses)

    model = st_model(max_length)
    data = Dataset.from_dict({"anchor": [t["query"] for t in triples],
                              "positive": [t["positive"] for t in triples],
                              "negative": [t["negatives"][0] for t in triples]})
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = SentenceTransformerTrainingArguments(
            output_dir=out, per_device_train_batch_size=batch, max_steps=steps + warmup,
            learning_rate=LR, warmup_steps=0, lr_scheduler_type="constant",
            bf16=precision == "bf16", use_cpu=True, report_to=[], save_strategy="no",
            logging_steps=10_000, dataloader_drop_last=True, seed=42)
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=data, callbacks=[Stamp()],
            loss=losses.MultipleNegativesRankingLoss(model, scale=1.0 / TEMPERATURE))
        trainer.train()
    return batch * steps / (stamps[-1] - stamps[warmup - 1])


def bare_pairs_per_s(built, batch: int, steps: int, warmup: int, precision: str) -> float:
    """forward, the same loss (InfoNCE over positives + hard negatives), backward, clip, AdamW."""
    recipe, _, _, collate, triples = built
    encoder = Encoder.load(recipe.model)  # the recipe's model settings: the same forward calls
    encoder.train()
    batches = [collate(triples[i:i + batch]) for i in range(0, len(triples), batch)]
    optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=LR)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    stamps = []
    for b in batches[: steps + warmup]:
        with autocast:
            q = encoder(b["query_input_ids"], b["query_attention_mask"], tower="query")
            d = encoder(b["doc_input_ids"], b["doc_attention_mask"], tower="doc")
            loss = F.cross_entropy(q @ d.T / TEMPERATURE, torch.arange(q.shape[0]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return batch * steps / (stamps[-1] - stamps[warmup - 1])


def bench_train(ns) -> dict:
    """Every system and precision `ns.train_repeats` times, interleaved (a burst of load on the
    shared machine hits every system alike); the median pairs/s of each is reported."""
    logging.getLogger("twotower").setLevel(logging.WARNING)
    batch, steps, warmup = ns.batch_size, ns.steps, max(ns.warmup, 1)
    out: dict = {"batch_size": batch, "max_length": ns.max_length, "steps": steps,
                 "warmup": warmup, "repeats": ns.train_repeats, "threads": torch.get_num_threads(),
                 "load_before": load_average(), "rows": [], "overhead": {}}
    built = build(batch, ns.max_length, batch * (steps + warmup))
    runs: dict = {}
    for _ in range(ns.train_repeats):
        for precision in ns.precisions:
            runs.setdefault(("bare loop", precision), []).append(
                bare_pairs_per_s(built, batch, steps, warmup, precision))
            # a fresh method (fresh weights) per run: build again
            fresh = build(batch, ns.max_length, batch * (steps + warmup))
            runs.setdefault(("twotower", precision), []).append(twotower_pairs_per_s(
                batch, ns.max_length, steps, warmup, precision, built=fresh)[0])
            runs.setdefault(("sentence-transformers", precision), []).append(st_pairs_per_s(
                built[4], batch, ns.max_length, steps, warmup, precision))
            print({k: [round(x, 2) for x in v] for k, v in runs.items()}, flush=True)
    speeds = {key: statistics.median(values) for key, values in runs.items()}
    for precision in ns.precisions:
        out["overhead"][precision] = round(
            speeds[("bare loop", precision)] / speeds[("twotower", precision)], 3)
    for (system, precision), pps in speeds.items():
        row = {"system": system, "precision": precision, "pairs_per_s": round(pps, 2),
               "runs": [round(x, 2) for x in runs[(system, precision)]]}
        st_same = speeds.get(("sentence-transformers", precision))
        st_fp32 = speeds.get(("sentence-transformers", "fp32"))
        if st_same:
            row["vs_st_same_precision"] = round(pps / st_same, 3)
        if st_fp32:
            row["vs_st_fp32"] = round(pps / st_fp32, 3)
        out["rows"].append(row)
    out["load_after"] = load_average()
    out["median_note"] = f"median of {ns.train_repeats} interleaved runs per system and precision"
    return out
