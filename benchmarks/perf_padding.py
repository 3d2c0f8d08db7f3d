"""Benchmark 6 of benchmarks/perf.py: what `data.length_grouped` saves, in padded document tokens
per epoch (the transformer's work grows with them), random duplicate-free order vs
length-grouped order, on the training data of two recipes: `msmarco_margin_mse_cpu` (the MS
MARCO sample, its hard-negatives file) and `fewshot` with Margin-MSE (SciFact train, BM25-mined
negatives). Counting, not timing: the result does not depend on the machine's load. Teacher
scores are not computed (the order does not depend on them)."""
from __future__ import annotations

import dataclasses
import logging

from twotower.common.model.encoder import Encoder
from twotower.common.recipe.config import load_recipe
from twotower.finetune.args import FinetuneRecipe
from twotower.finetune.data import GroupCollator, GroupDataset
from twotower.finetune.sources import build_pool
from twotower.finetune.tokens import LongestDocument, TokenCache


def _doc_tokens(dataset, collate, order: list[int], size: int) -> tuple[int, int]:
    """(tokens including padding, real tokens) of the document tensors of one epoch's batches."""
    padded = real = 0
    for start in range(0, len(order), size):
        batch = collate([dataset[i] for i in order[start:start + size]])
        padded += batch["doc_attention_mask"].numel()
        real += int(batch["doc_attention_mask"].sum())
    return padded, real


def bench_padding(ns) -> dict:
    logging.getLogger("twotower").setLevel(logging.WARNING)
    grouped_losses = ["loss.infonce.weight=0", "loss.margin_mse.weight=1",
                      "data.length_grouped=true"]
    setups = {"msmarco_margin_mse_cpu (MS MARCO sample)": ("msmarco_margin_mse_cpu", []),
              "fewshot + Margin-MSE (SciFact train)": ("fewshot", [*grouped_losses,
                                                                   "data.teacher_scores=unused"])}
    out: dict = {"rows": []}
    for name, (recipe_name, overrides) in setups.items():
        recipe = load_recipe(FinetuneRecipe, recipe_name, overrides)
        (_, stage), = recipe.stage_list()
        data = dataclasses.replace(stage.data, teacher_scores="", teacher_margin=None)
        pool = build_pool(data)
        encoder = Encoder.load(dataclasses.replace(recipe.model, random_init=False,
                                                   name_or_path="bundled:all-MiniLM-L6-v2"))
        tokens = TokenCache(encoder, pool)
        tokens.pretokenize()
        size = recipe.train.per_device_batch_size
        common = dict(n_negatives=data.n_negatives, seed=recipe.train.seed, global_batch_size=size)
        plain = GroupDataset(pool, **common)
        grouped = GroupDataset(pool, **common, length_of=LongestDocument(tokens))
        collate = GroupCollator(encoder.tokenize, tokens)
        row = {"data": name, "groups": len(pool.groups), "batch": size,
               "negatives": data.n_negatives, "max_doc_length": recipe.model.max_doc_length}
        for label, dataset in (("random", plain), ("length_grouped", grouped)):
            dataset.set_epoch(0)
            padded, real = _doc_tokens(dataset, collate, dataset.epoch_order(0, recipe.train.seed),
                                       size)
            row[f"{label}_padded"], row[f"{label}_real"] = padded, real
        # per real token: the two orders may leave out different groups of an epoch
        row["padded_ratio"] = round((row["length_grouped_padded"] / row["length_grouped_real"])
                                    / (row["random_padded"] / row["random_real"]), 3)
        out["rows"].append(row)
        print(row, flush=True)
    return out
