"""The pretraining showcase (`make demo`): evaluate, pretrain without labels, evaluate again.

    python pretrain/demo.py                      # recontriever_cpu: bundled MiniLM on SciFact
    python pretrain/demo.py --recipe ict_cpu train.max_steps=20

Prints the before/after retrieval figures on the recipe's evaluation slice and the loss curve
(read back from the run's tensorboard log).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from twotower.common.eval.evaluate import DenseEvaluator
from twotower.common.recipe.config import load_recipe, recipe_to_yaml
from twotower.common.report.callbacks import RetrievalEvaluation
from twotower.common.train.cli import setup_process
from twotower.common.train.trainer import Trainer
from twotower.pretrain.args import PretrainRecipe
from twotower.pretrain.run import build

DEFAULTS = ["train.output_dir=runs/demo_pretrain", "train.overwrite_output_dir=true"]


def loss_curve(output_dir: Path) -> list[tuple[int, float]]:
    """(step, train/loss) pairs from the run's tensorboard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for events in sorted(output_dir.glob("logs/**/events.out.tfevents*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "train/loss" in acc.Tags().get("scalars", []):
            points.update({e.step: e.value for e in acc.Scalars("train/loss")})
    return sorted(points.items())


def format_table(before: dict, after: dict) -> str:
    lines = [f"{'metric':<10} {'before':>8} {'after':>8} {'change':>8}"]
    for name in before:
        b, a = before[name], after.get(name, float("nan"))
        lines.append(f"{name:<10} {b:>8.4f} {a:>8.4f} {a - b:>+8.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recontriever_cpu")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    ns = parser.parse_args(argv)
    recipe = load_recipe(PretrainRecipe, ns.recipe, DEFAULTS + ns.overrides)
    if not recipe.eval.data:
        parser.error("the demo needs eval.data (a BEIR dataset) to show before/after figures")
    setup_process()

    started = time.perf_counter()
    method, dataset, collate = build(recipe)
    evaluate = DenseEvaluator(recipe.eval, seed=recipe.train.seed)
    data = evaluate.data
    print(f"[demo] {ns.recipe}: {recipe.model.name_or_path}, corpora {recipe.data.corpora} "
          f"(text only), {recipe.train.max_steps} steps of {recipe.method.name}"
          f"{' + relevance-aware' if recipe.method.relevance_aware else ''}, "
          f"{recipe.pairs.n_pairs} key crop(s) per query; evaluation: {data.name}/{data.split} "
          f"{len(data.qrels)} queries x {len(data.corpus)} documents", flush=True)
    before = evaluate(method.encoder)
    print(f"[demo] before: nDCG@10 {before.get('nDCG@10', float('nan')):.4f} "
          f"({time.perf_counter() - started:.0f}s)", flush=True)
    recipe_yaml = recipe_to_yaml(recipe)
    trainer = Trainer(args=recipe.train, method=method, train_dataset=dataset, collate_fn=collate,
                      recipe_yaml=recipe_yaml,
                      callbacks=[RetrievalEvaluation(evaluate, recipe_yaml)])
    result = trainer.train()
    after = {k: v for k, v in result.items() if k in before}
    curve = loss_curve(Path(recipe.train.output_dir))
    print("\n[demo] training loss: " + ", ".join(f"{s}:{v:.3f}" for s, v in curve))
    print(f"[demo] {data.name} {data.split} slice, before vs after pretraining "
          f"({time.perf_counter() - started:.0f}s in total)")
    print(format_table(before, after))
    print(f"[demo] model saved to {Path(recipe.train.output_dir) / 'model'}")
    return {"before": before, "after": after, "loss": curve}


if __name__ == "__main__":
    main()
