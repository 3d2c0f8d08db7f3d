"""Few-shot fine-tuning on SciFact: does the `fewshot` recipe move the bundled MiniLM?

    TWOTOWER_DATA=../shared/data python benchmarks/finetune_fewshot.py [--max-steps 50]
        [--batch-size 16] [--skip-start] [--max-queries 0]

--skip-start takes the starting model's figures from benchmarks/results/acceptance.json (the
same evaluation, written by benchmarks/acceptance.py) instead of re-encoding the corpus.

Runs recipe `fewshot` (SciFact train, 809 queries; BM25-mined hard negatives, 20 of ranks
4-53; MNRL with tau 0.05) from bundled:all-MiniLM-L6-v2 for --max-steps steps, then evaluates the whole
SciFact test split (300 queries, 5,183 documents, max 256 tokens) with common.evaluate, next to
BM25 and the starting model (measured here unless --skip-start; the data README's reference
figures are 0.686 and 0.645 nDCG@10). Writes benchmarks/results/finetune_fewshot.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).parent / "results"
REFERENCE = {"BM25": 0.686, "all-MiniLM-L6-v2 (start)": 0.645,  # data README, nDCG@10
             "all-MiniLM-L6-v2 (start, from acceptance.json)": 0.645}
MEASURES = ["nDCG@10", "R@100"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--max-steps", type=int, default=50, help="~1 epoch of 809 queries at 16")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--max-queries", type=int, default=0, help="few-shot size (0 = all 809)")
    p.add_argument("--skip-start", action="store_true", help="do not re-measure the start model")
    p.add_argument("--output-dir", default="runs/bench_fewshot")
    p.add_argument("--output", default=str(RESULTS / "finetune_fewshot"))
    ns = p.parse_args(argv)
    if not os.environ.get("TWOTOWER_DATA"):
        p.error("set TWOTOWER_DATA to the offline data folder (the one holding scifact/)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from common.config import load_recipe
    from common.encoder import Encoder
    from common.evaluate import evaluate_bm25, evaluate_dense, load_eval_data
    from finetune.args import FinetuneRecipe
    from finetune.run import run_recipe

    test = load_eval_data("scifact", "test")
    rows = {}
    t = time.perf_counter()
    rows["BM25"] = {**evaluate_bm25(test, measures=MEASURES).metrics, "seconds": 0.0}
    rows["BM25"]["seconds"] = round(time.perf_counter() - t, 1)
    overrides = [f"train.output_dir={ns.output_dir}", "train.overwrite_output_dir=true",
                 f"train.max_steps={ns.max_steps}", f"train.per_device_batch_size={ns.batch_size}",
                 f"train.lr={ns.lr}", f"data.max_queries={ns.max_queries}",
                 "eval.data=scifact", "eval.split=test", "eval.max_queries=0", "eval.max_docs=0",
                 f"eval.metrics=[{','.join(MEASURES)}]"]
    recipe = load_recipe(FinetuneRecipe, "fewshot", overrides)
    if not ns.skip_start:
        t = time.perf_counter()
        start = evaluate_dense(Encoder.load(recipe.model), test, measures=MEASURES, progress=False)
        rows["all-MiniLM-L6-v2 (start)"] = {**start.metrics, "seconds": round(time.perf_counter() - t, 1)}
    elif (RESULTS / "acceptance.json").is_file():  # the same library evaluation, measured before
        checks = json.loads((RESULTS / "acceptance.json").read_text())["checks"]
        found = {c["metric"]: c["measured"] for c in checks if c["system"] == "all-MiniLM-L6-v2"}
        if set(MEASURES) <= set(found):
            rows["all-MiniLM-L6-v2 (start, from acceptance.json)"] = {**found, "seconds": "-"}
    t = time.perf_counter()
    result = run_recipe(recipe)  # trains, then evaluates SciFact test (whole corpus)
    seconds = round(time.perf_counter() - t, 1)
    rows["fewshot fine-tuned"] = {m: result[m] for m in MEASURES}
    rows["fewshot fine-tuned"]["seconds"] = seconds

    summary = {"rows": rows, "reference_nDCG@10": REFERENCE, "overrides": overrides,
               "train_queries": ns.max_queries or 809, "steps": result.get("step"),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
               "recipe": "fewshot"}
    out = Path(ns.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["| system | nDCG@10 | R@100 | reference nDCG@10 | seconds |", "|---|---|---|---|---|"]
    for name, m in rows.items():
        ref = REFERENCE.get(name, "")
        lines.append(f"| {name} | {m['nDCG@10']:.4f} | {m['R@100']:.4f} | {ref} | {m['seconds']} |")
    lines.append("")
    lines.append(f"fewshot: {summary['train_queries']} SciFact training queries, {result.get('step')} "
                 f"steps of {ns.batch_size}, lr {ns.lr}; seconds = training + final evaluation.")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
