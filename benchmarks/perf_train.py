"""Sections 2-3 of benchmarks/perf.py: fine-tuning throughput, model FLOPs and loop overhead
(and the model, load average and sentence-transformers baseline that perf.py shares).

Data: recipe `fewshot` (SciFact train, BM25-mined hard negatives, one per query), the first
(warmup + steps) x batch groups in twotower's epoch-0 order; every system gets exactly these
(query, positive, negative) triples. Loss: MNRL / InfoNCE over the batch's positives and hard
negatives, cosine similarity x 20 (tau 0.05), AdamW lr 2e-5, gradient clipping at norm 1 (the
default of both trainers), max length 256, batch 32.

* twotower: its Trainer with finetune's method and collator, as in a real run: the texts are
  tokenised once before training (data.pretokenize, not timed), a step pads; the recipe's
  model.forward_chunk=32 runs the 64 documents of a batch as two transformer calls;
* sentence-transformers: SentenceTransformerTrainer + MultipleNegativesRankingLoss with the
  checkpoint's dropout (its batch sampler shuffles the same triples, so batch compositions
  differ; tokenisation in its collator, inside the timed steps): the reference of the ratios;
* bare loop: the batches tokenised up front (not timed), then forward (the same encoder
  settings, forward_chunk included), the same loss, backward, clipping, AdamW: the floor that
  twotower's step is compared with (benchmark 3).

Bare loop and twotower run at each --dropout: `configured` (the checkpoint's, BERT 0.1 / 0.1),
`attention_off` (model.attention_dropout=0, so PyTorch's fused CPU attention kernel applies) and
`none` (model.hidden_dropout=0 too), set through the recipe keys as a real run sets them.
With --compile, also "bare loop, compiled" (forward + loss under torch.compile) and "twotower,
compiled" (train.compile=true); both compile in the warm-up steps (--warmup 2 leaves room).
Time = wall clock between the end of step `warmup` and the end of step `warmup + steps`; model
FLOPs = 3 x the forward FLOPs of the transformer calls in that time (a hook counts each call at
its padded shape), also as a fraction of the machine's torch.mm peak at the row's precision.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState, GradientState
from datasets import Dataset
from transformers import TrainerCallback

from twotower.common.model.encoder import Encoder
from twotower.common.model.loading import resolve_model_path
from twotower.common.recipe.config import load_recipe, recipe_to_yaml
from twotower.common.train.trainer import Trainer
from twotower.finetune.args import FinetuneRecipe
from twotower.finetune.run import build_stage

MODEL = "bundled:all-MiniLM-L6-v2"
TEMPERATURE, LR = 0.05, 2e-5
# --dropout: (label, recipe overrides); explicit, whatever the recipe's default (fewshot: none)
DROPOUT = {"configured": ("as configured", ["model.attention_dropout=null",
                                            "model.hidden_dropout=null"]),
           "attention_off": ("attention dropout off", ["model.attention_dropout=0",
                                                        "model.hidden_dropout=null"]),
           "none": ("no dropout", ["model.attention_dropout=0", "model.hidden_dropout=0"])}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def st_model(max_length: int, bf16: bool = False):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve_model_path(MODEL), device="cpu",  # bf16: weights in bf16
                                model_kwargs={"dtype": torch.bfloat16} if bf16 else None)
    model.max_seq_length = max_length
    return model


def forward_flops(config, batch: int, length: int) -> int:
    """Forward FLOPs of `batch` sequences padded to `length` (padding is computed too) through a
    BERT-style encoder. Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1:
    C_forward = 2N + 2 n_layer n_ctx d_attn per token, N = 2 d_model n_layer (2 d_attn + d_ff)
    the non-embedding parameters, d_attn = d_model; per sequence 2 N L + 2 n_layer L^2 d_model."""
    d, layers = config.hidden_size, config.num_hidden_layers
    n = 2 * d * layers * (2 * d + config.intermediate_size)
    return batch * (2 * n * length + 2 * layers * length ** 2 * d)


def count_flops(models, calls: list) -> None:
    """Append (time, forward FLOPs) of every forward call of the transformers `models` to
    `calls`. The hook sits on the input embedding, which every call runs through its __call__
    (sentence-transformers calls the model's forward method directly, passing its hooks by).
    The hook runs outside torch.compile: traced, its growing `calls` would recompile the tower
    on every call until dynamo's limit, then run it eagerly."""
    for model in models:
        model.get_input_embeddings().register_forward_pre_hook(torch.compiler.disable(
            lambda module, args, config=model.config: calls.append(
                (time.perf_counter(), forward_flops(config, *args[0].shape)))))


def rates(stamps: list, calls: list, batch: int, steps: int, warmup: int) -> tuple[float, float]:
    """(pairs/s, model FLOPs/s) after the warm-up; training FLOPs = 3 x forward (Kaplan et al.:
    the backward pass costs twice the forward)."""
    start, seconds = stamps[warmup - 1], stamps[-1] - stamps[warmup - 1]
    return batch * steps / seconds, 3 * sum(f for t, f in calls if t > start) / seconds


def matmul_peak(precision: str, repeats: int = 3, n: int = 4096) -> float:
    """Dense FLOPs/s of torch.mm of two n x n matrices: median of `repeats` after a warm-up."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    return 2 * n ** 3 / statistics.median(timed(torch.mm, a, b)[0] for _ in range(repeats))


class InOrder(list):
    """Training examples that the Trainer's sampler takes in this order (it asks epoch_order)."""

    def epoch_order(self, epoch, seed):
        return list(range(len(self)))


def build(batch: int, max_length: int, n_groups: int, overrides=()):
    """(recipe, method, collate, triples): fresh weights, the first `n_groups` groups."""
    recipe = load_recipe(FinetuneRecipe, "fewshot", [
        f"model.max_doc_length={max_length}", f"train.per_device_batch_size={batch}",
        f"train.lr={LR}", "train.warmup_steps=0", "train.scheduler=constant", "eval.data=''",
        "train.overwrite_output_dir=true", "train.log_every=1000", "train.save_every=0",
        *overrides])
    (_, stage), = recipe.stage_list()
    method, dataset, collate = build_stage(recipe, stage, recipe.model.name_or_path, 1)
    dataset.set_epoch(0)
    order = dataset.epoch_order(0, recipe.train.seed)[:n_groups]
    return recipe, method, collate, InOrder(dataset[i] for i in order)


def twotower_run(built, steps: int, warmup: int, precision: str, grad_cache_chunk: int = 0,
                 compiled: bool = False):
    """(step end times, transformer calls) of twotower's Trainer on `built`; `compiled`: the
    recipe's train.compile (the towers under torch.compile, compiled in the warm-up steps)."""
    # one process measures several precisions: Accelerate's state is a singleton that refuses
    # a second mixed_precision unless reset
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    recipe, method, collate, triples = built
    stamps, calls = [], []
    method.on_optimizer_step = lambda: stamps.append(time.perf_counter())  # Trainer's hook
    count_flops(method.encoder.towers(), calls)
    with tempfile.TemporaryDirectory() as out:
        train = dataclasses.replace(recipe.train, output_dir=out, max_steps=steps + warmup,
                                    mixed_precision="bf16" if precision == "bf16" else "no",
                                    device="cpu", grad_cache_chunk=grad_cache_chunk,
                                    compile=compiled)
        Trainer(args=train, method=method, train_dataset=triples, collate_fn=collate,
                recipe_yaml=recipe_to_yaml(dataclasses.replace(recipe, train=train))).train()
    return stamps, calls


def st_run(triples, batch: int, max_length: int, steps: int, warmup: int, precision: str):
    """(step end times, transformer calls) of sentence-transformers' trainer on the triples."""
    from sentence_transformers import (SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments, losses)

    model, stamps, calls = st_model(max_length), [], []
    count_flops([model[0].auto_model], calls)
    data = Dataset.from_dict({"anchor": [t["query"] for t in triples],
                              "positive": [t["positive"] for t in triples],
                              "negative": [t["negatives"][0] for t in triples]})

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = SentenceTransformerTrainingArguments(
            output_dir=out, per_device_train_batch_size=batch, max_steps=steps + warmup,
            learning_rate=LR, warmup_steps=0, lr_scheduler_type="constant",
            bf16=precision == "bf16", use_cpu=True, report_to=[], save_strategy="no",
            logging_steps=10_000, dataloader_drop_last=True, seed=42)
        SentenceTransformerTrainer(
            model=model, args=args, train_dataset=data, callbacks=[Stamp()],
            loss=losses.MultipleNegativesRankingLoss(model, scale=1.0 / TEMPERATURE)).train()
    return stamps, calls


def bare_run(built, batch: int, steps: int, warmup: int, precision: str, compiled: bool = False):
    """forward, the same loss (InfoNCE over positives + hard negatives), backward, clip, AdamW;
    `compiled`: forward + loss under torch.compile (dynamic shapes: batches differ in padded
    length), compiled during the warm-up steps (issue #24's compiled step, measured here first)."""
    recipe, _, collate, triples = built
    encoder = Encoder.load(dataclasses.replace(recipe.model)).train()  # its settings and dropout
    stamps, calls = [], []
    count_flops(encoder.towers(), calls)
    batches = [collate(triples[i:i + batch]) for i in range(0, len(triples), batch)]
    optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=LR)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    def forward_loss(b):
        q = encoder(b["query_input_ids"], b["query_attention_mask"], tower="query")
        d = encoder(b["doc_input_ids"], b["doc_attention_mask"], tower="doc")
        return F.cross_entropy(q @ d.T / TEMPERATURE, torch.arange(q.shape[0]))
    step = torch.compile(forward_loss, dynamic=True) if compiled else forward_loss
    for b in batches[: steps + warmup]:
        with autocast:
            loss = step(b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return stamps, calls


def bench_train(ns) -> dict:
    """Every system, precision and dropout `ns.train_repeats` times, interleaved (a burst of load
    on the shared machine hits every system alike); the median of each is reported."""
    logging.getLogger("twotower").setLevel(logging.WARNING)
    batch, steps, warmup = ns.batch_size, ns.steps, max(ns.warmup, 1)
    n_groups = batch * (steps + warmup)
    out: dict = {"batch_size": batch, "max_length": ns.max_length, "steps": steps,
                 "warmup": warmup, "repeats": ns.train_repeats, "threads": torch.get_num_threads(),
                 "load_before": load_average(), "rows": [], "overhead": {}}
    peak = {p: matmul_peak(p) for p in ns.precisions}
    out["matmul_peak_gflops"] = {p: round(f / 1e9, 1) for p, f in peak.items()}
    runs: dict = {}  # (system, precision, dropout) -> [(pairs/s, FLOPs/s) per repeat]

    def measure(key, stamps_calls):
        runs.setdefault(key, []).append(rates(*stamps_calls, batch, steps, warmup))

    for _ in range(ns.train_repeats):
        for precision in ns.precisions:
            for i, d in enumerate(ns.dropout):
                built = build(batch, ns.max_length, n_groups, DROPOUT[d][1])  # fresh weights
                measure(("bare loop", precision, d),
                        bare_run(built, batch, steps, warmup, precision))
                measure(("twotower", precision, d), twotower_run(built, steps, warmup, precision))
                if ns.compile:
                    measure(("bare loop, compiled", precision, d),
                            bare_run(built, batch, steps, warmup, precision, compiled=True))
                    built = build(batch, ns.max_length, n_groups, DROPOUT[d][1])  # fresh weights
                    measure(("twotower, compiled", precision, d),
                            twotower_run(built, steps, warmup, precision, compiled=True))
                if i == 0:  # the reference, once per precision: its default, dropout configured
                    measure(("sentence-transformers", precision, "configured"), st_run(
                        built[3], batch, ns.max_length, steps, warmup, precision))
            print({k: [round(x, 2) for x, _ in v] for k, v in runs.items()}, flush=True)
    speeds = {key: (statistics.median(p for p, _ in v), statistics.median(f for _, f in v))
              for key, v in runs.items()}
    st = {p: speeds.get(("sentence-transformers", p, "configured"), (None,))[0]
          for p in ns.precisions}
    for precision in ns.precisions:
        for d in ns.dropout:
            key = precision if d == "configured" else f"{precision}, {DROPOUT[d][0]}"
            out["overhead"][key] = round(speeds[("bare loop", precision, d)][0]
                                         / speeds[("twotower", precision, d)][0], 3)
    for (system, precision, d), (pps, fps) in speeds.items():
        row = {"system": system, "precision": precision, "dropout": DROPOUT[d][0],
               "pairs_per_s": round(pps, 2), "model_gflops_per_s": round(fps / 1e9, 2),
               "of_matmul_peak": round(fps / peak[precision], 3),
               "runs": [round(x, 2) for x, _ in runs[(system, precision, d)]]}
        if st[precision]:
            row["vs_st_same_precision"] = round(pps / st[precision], 3)
        if st.get("fp32"):
            row["vs_st_fp32"] = round(pps / st["fp32"], 3)
        out["rows"].append(row)
    out["load_after"] = load_average()
    out["median_note"] = (f"median of {ns.train_repeats} interleaved runs per system, "
                          "precision and dropout")
    return out
