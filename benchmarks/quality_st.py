"""The sentence-transformers baseline of benchmarks/quality.py: its trainer with
MultipleNegativesRankingLoss on exactly the (query, positive, hard negatives) triples a twotower
fine-tuning recipe trains on, epoch by epoch, with the recipe's batch, steps, learning rate,
warmup, scheduler, weight decay, clipping, precision and maximum length; then the same
evaluation code (twotower.common.eval.evaluate) on the test split.

    TWOTOWER_DATA=../shared/data python -m benchmarks.quality_st --recipe fewshot \
        --output-dir runs/quality/st_mnrl --seed 0 [--data scifact]

Differences that remain, by design of the two libraries: sentence-transformers' batch sampler
shuffles the triples (so batches are composed differently), it has one maximum length for
queries and documents (the recipe's document length), and MNRL's scale 1/temperature is taken
from the recipe's InfoNCE temperature.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from datasets import Dataset

from twotower.common.eval.evaluate import evaluate_dense, load_eval_data
from twotower.common.eval.outputs import write_outputs
from twotower.common.model.encoder import Encoder
from twotower.common.model.loading import resolve_model_path
from twotower.common.recipe.config import load_recipe
from twotower.common.train.epochs import steps_for_epochs
from twotower.finetune.args import FinetuneRecipe
from twotower.finetune.run import \
    build_stage  # leaves an eval.holdout dev split out, as in training


def recipe_triples(recipe) -> tuple[list[dict], int]:
    """The groups the Trainer would draw (one process), and its number of steps."""
    (_, stage), = recipe.stage_list()
    _, dataset, _ = build_stage(recipe, stage, recipe.model.name_or_path, 1)
    steps = recipe.train.max_steps  # a cap when train.epochs is set, as in the Trainer
    if recipe.train.epochs > 0:
        steps = min(steps, steps_for_epochs(recipe.train, len(dataset)))
    needed = steps * recipe.train.per_device_batch_size
    triples, epoch = [], 0
    while len(triples) < needed:
        dataset.set_epoch(epoch)
        order = dataset.epoch_order(epoch, recipe.train.seed)
        usable = len(order) - len(order) % recipe.train.per_device_batch_size  # drop_last
        triples += [dataset[i] for i in order[:usable]]
        epoch += 1
    return triples[:needed], steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--recipe", default="fewshot")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="scifact")
    p.add_argument("overrides", nargs="*", help="recipe overrides (key=value)")
    ns = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments, losses)

    recipe = load_recipe(FinetuneRecipe, ns.recipe, [
        f"data.path={ns.data}", f"train.seed={ns.seed}", *ns.overrides])
    (_, stage), = recipe.stage_list()
    if set(stage.loss.active()) != {"infonce"}:
        p.error(f"the baseline is MNRL: recipe {ns.recipe} trains {sorted(stage.loss.active())}")
    train = recipe.train
    triples, steps = recipe_triples(recipe)
    columns = {"anchor": [t["query"] for t in triples], "positive": [t["positive"] for t in triples]}
    for j in range(stage.data.n_negatives):
        columns[f"negative_{j}"] = [t["negatives"][j] for t in triples]
    model = SentenceTransformer(resolve_model_path(recipe.model.name_or_path), device="cpu")
    model.max_seq_length = recipe.model.max_doc_length
    out = Path(ns.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        args = SentenceTransformerTrainingArguments(
            output_dir=scratch, per_device_train_batch_size=train.per_device_batch_size,
            max_steps=steps, learning_rate=train.lr, warmup_steps=train.warmup_steps,
            lr_scheduler_type=train.scheduler, weight_decay=train.weight_decay,
            max_grad_norm=train.max_grad_norm, bf16=train.mixed_precision == "bf16",
            use_cpu=True, report_to=[], save_strategy="no", logging_steps=max(train.log_every, 1),
            dataloader_drop_last=True, seed=ns.seed)
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=Dataset.from_dict(columns),
            loss=losses.MultipleNegativesRankingLoss(
                model, scale=1.0 / stage.loss.infonce.temperature))
        start = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - start
    model.save(str(out / "model"))
    test = load_eval_data(recipe.eval.data or ns.data, "test")
    start = time.perf_counter()
    result = evaluate_dense(Encoder.load(str(out / "model")), test, measures=["nDCG@10", "R@100"],
                            progress=False)
    write_outputs(result, out, overwrite=True, data=test,
                  extra={"train_s": round(train_s, 1), "triples": len(triples),
                         "recipe": ns.recipe, "eval_s": round(time.perf_counter() - start, 1)})
    summary = json.loads((out / "metrics.json").read_text())
    print(json.dumps({"metrics": summary["metrics"], "train_s": round(train_s, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
