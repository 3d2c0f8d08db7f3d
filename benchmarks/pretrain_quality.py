"""Does unsupervised pretraining move retrieval quality? Two fixed-CPU-budget runs, SciFact test.

    TWOTOWER_DATA=../shared/data python -m benchmarks.pretrain_quality [--parts a b]
        [--budget-s 420] [--max-docs 0]

(a) the bundled all-MiniLM-L6-v2 (already trained with supervision), further pretrained with the
    ReContriever objective on the SciFact *corpus* only (no queries, no labels):
    recipe domain_pretrain_cpu.
(b) a small randomly initialised BERT (4 layers, hidden 256, MiniLM's uncased vocabulary)
    pretrained from scratch with Contriever's in-batch objective on the shared Wikipedia text +
    the SciFact corpus: recipe contriever_inbatch_cpu with the overrides below.

Each part evaluates SciFact test before and after (all 300 queries; the whole corpus unless
--max-docs keeps the judged documents + N others), trains for about --budget-s seconds of this
machine (steps = budget / seconds per step measured on 3 warm-up steps), and writes
benchmarks/results/pretrain_quality.{json,md} and the loss curves as a PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from twotower.common.eval.evaluate import DenseEvaluator
from twotower.common.recipe.config import load_recipe, recipe_to_yaml
from twotower.common.train.trainer import Trainer
from twotower.pretrain.args import PretrainRecipe
from twotower.pretrain.demo import loss_curve
from twotower.pretrain.run import build

RESULTS = Path(__file__).parent / "results"
PARTS = {
    "a": ("domain_pretrain_cpu", [
        "train.per_device_batch_size=16", "train.lr=1e-5", "train.warmup_steps=10",
        "pairs.chunk_length=128", "method.queue_size=4096"]),
    "b": ("contriever_inbatch_cpu", [
        "model.random_init=true",
        "model.config_overrides.hidden_size=256", "model.config_overrides.num_hidden_layers=4",
        "model.config_overrides.num_attention_heads=4",
        "model.config_overrides.intermediate_size=1024",
        "data.corpora=[wiki/wiki_summaries.jsonl,wiki/wiki_articles.jsonl,scifact]",
        "train.per_device_batch_size=64", "train.lr=3e-4", "train.warmup_steps=50",
        "train.max_grad_norm=1.0", "pairs.chunk_length=64"]),
}
MEASURES = ["nDCG@10", "R@100"]


def seconds_per_step(method, dataset, collate, batch_size: int, steps: int = 3) -> float:
    """Forward + backward + AdamW on real batches (what one Trainer step costs here)."""
    trainable = [p for p in method.parameters() if p.requires_grad]
    state = {k: v.detach().clone() for k, v in method.state_dict().items()}
    optimizer = torch.optim.AdamW(trainable, lr=0.0)
    method.train()
    times = []
    for i in range(steps + 1):
        batch = collate([dataset[j] for j in range(i * batch_size, (i + 1) * batch_size)])
        start = time.perf_counter()
        loss, _ = method(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    method.load_state_dict(state)  # the calibration leaves no trace (queue, pointer, weights)
    return sum(times[1:]) / steps


def run_part(name: str, budget_s: float, max_docs: int, out_dir: Path) -> dict:
    recipe_name, overrides = PARTS[name]
    overrides = overrides + [
        f"train.output_dir={out_dir / name}", "train.overwrite_output_dir=true",
        f"eval.max_docs={max_docs}", "eval.max_queries=0", "train.log_every=10",
        f"eval.metrics=[{','.join(MEASURES)}]"]
    recipe = load_recipe(PretrainRecipe, recipe_name, overrides)
    method, dataset, collate = build(recipe)
    evaluate = DenseEvaluator(recipe.eval, seed=recipe.train.seed)
    data = evaluate.data
    t = time.perf_counter()
    before = evaluate(method.encoder, progress=True)
    eval_s = time.perf_counter() - t
    per_step = seconds_per_step(method, dataset, collate, recipe.train.per_device_batch_size)
    steps = max(10, int(budget_s / per_step))
    recipe.train.max_steps = steps
    print(f"[{name}] before {before}; {per_step:.2f} s/step -> {steps} steps", flush=True)
    trainer = Trainer(args=recipe.train, method=method, train_dataset=dataset, collate_fn=collate,
                      recipe_yaml=recipe_to_yaml(recipe))  # evaluated here
    t = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t
    after = evaluate(method.encoder, progress=True)
    result = {"recipe": recipe_name, "overrides": overrides, "model": recipe.model.name_or_path,
              "random_init": recipe.model.random_init, "corpora": recipe.data.corpora,
              "training_items": len(dataset), "steps": steps,
              "global_batch": recipe.train.per_device_batch_size, "train_seconds": round(train_s),
              "eval_seconds": round(eval_s), "eval_queries": len(data.qrels),
              "eval_docs": len(data.corpus), "before": before, "after": after,
              "loss": loss_curve(out_dir / name)}
    print(f"[{name}] after {after} ({train_s:.0f}s training)", flush=True)
    return result


def write_report(results: dict, path: Path) -> None:
    lines = ["| part | model | corpora | steps x batch | train s | nDCG@10 before | after | "
             "R@100 before | after |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        model = r["model"] + (" (random init, 4x256)" if r["random_init"] else "")
        lines.append(f"| ({name}) | {model} | {', '.join(r['corpora'])} | {r['steps']} x "
                     f"{r['global_batch']} | {r['train_seconds']} | {r['before']['nDCG@10']:.4f} | "
                     f"{r['after']['nDCG@10']:.4f} | {r['before']['R@100']:.4f} | "
                     f"{r['after']['R@100']:.4f} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.2), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        steps, values = zip(*r["loss"]) if r["loss"] else ((), ())
        ax.plot(steps, values)
        ax.set_title(f"({name}) {r['recipe']}")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
    fig.tight_layout()
    fig.savefig(path.with_name(path.name + "_loss.png"), dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=sorted(PARTS))
    p.add_argument("--budget-s", type=float, default=420.0, help="training seconds per part")
    p.add_argument("--max-docs", type=int, default=0,
                   help="evaluate on judged docs + this many others (0 = the whole corpus)")
    p.add_argument("--output", default=str(RESULTS / "pretrain_quality"))
    p.add_argument("--run-dir", default="runs/pretrain_quality")
    ns = p.parse_args(argv)
    if not os.environ.get("TWOTOWER_DATA"):
        p.error("set TWOTOWER_DATA to the offline data folder (the one holding scifact/, wiki/)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    output = Path(ns.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in ns.parts:
        results[name] = run_part(name, ns.budget_s, ns.max_docs, Path(ns.run_dir))
        write_report(results, output)  # after each part: a crash keeps what was measured
    print(output.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
