"""Hybrid BM25 + dense retrieval (common/eval/fusion.py) against each alone, the fusion chosen on a
dev split and reported on test.

    TWOTOWER_DATA=../shared/data python -m benchmarks.hybrid [--model bundled:all-MiniLM-L6-v2]

Dev: SciFact's train split (809 judged queries the bundled model never saw; the test split is
not looked at while choosing). Choices: rrf (k = 60, Cormack et al.'s constant, nothing tuned)
and wsum with dense weight 0.1 ... 0.9; the best dev nDCG@10 is then run on SciFact test and on
the MS MARCO sample (200 dev queries, 3,969 passages), with paired randomisation-test p-values
of per-query nDCG@10 against BM25 and against dense. Writes benchmarks/results/hybrid.{json,md}.

Its SciFact test rows for BM25 and the bundled model are also the evaluation's acceptance check:
they must match figures measured outside the project (bm25s and sentence-transformers: mean
pooling, cosine, 256 tokens) within REFERENCE's tolerances, or the command exits 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from twotower.common.eval.evaluate import evaluate_bm25, evaluate_dense, load_eval_data
from twotower.common.eval.fusion import fuse
from twotower.common.eval.metrics import aggregate, per_query
from twotower.common.eval.significance import compare_paired
from twotower.common.model.encoder import Encoder
from twotower.common.recipe.args import ModelArgs
from twotower.common.train.rundir import write_atomic

RESULTS = Path(__file__).parent / "results"
MEASURES = ["nDCG@10", "R@100"]
CHOICES = [("rrf", 0.5)] + [("wsum", w / 10) for w in range(1, 10)]
# (system, measure) -> (reference, tolerance) on SciFact test, from the data README; nDCG@10's
# tolerances are the acceptance issue's, R@100's ours
REFERENCE = {("bm25", "nDCG@10"): (0.686, 0.01), ("bm25", "R@100"): (0.913, 0.01),
             ("dense", "nDCG@10"): (0.645, 0.002), ("dense", "R@100"): (0.925, 0.01)}


def runs(encoder, data, cache: str) -> dict:
    """BM25 and dense runs (depth 1000) with their per-query values."""
    return {"bm25": evaluate_bm25(data, measures=MEASURES).run,
            "dense": evaluate_dense(encoder, data, measures=MEASURES, progress=False,
                                    cache_dir=cache).run}


def score(data, run) -> dict:
    values = per_query(data.qrels, run, MEASURES)
    return {"metrics": aggregate(values), "ndcg": values["nDCG@10"]}


def name(method: str, weight: float) -> str:
    return "hybrid rrf (k 60)" if method == "rrf" else f"hybrid wsum (dense {weight:.1f})"


def report(data, parts: dict, method: str, weight: float) -> list[dict]:
    rows = {"bm25": score(data, parts["bm25"]), "dense": score(data, parts["dense"]),
            name(method, weight): score(data, fuse(parts["bm25"], parts["dense"], method,
                                                   weight, depth=1000))}
    if method != "rrf":  # rrf chooses nothing: show it beside the chosen wsum
        rows[name("rrf", 0.5)] = score(data, fuse(parts["bm25"], parts["dense"], "rrf",
                                                  depth=1000))
    out = []
    for system, row in rows.items():
        p = {ref: compare_paired(row["ndcg"], rows[ref]["ndcg"]).p_randomization
             for ref in ("bm25", "dense") if ref != system}
        out.append({"system": system, **{m: round(v, 4) for m, v in row["metrics"].items()},
                    **{f"p vs {ref}": round(v, 4) for ref, v in p.items()}})
    return out


def acceptance(result: dict) -> list[str]:
    """REFERENCE's figures against the SciFact test rows: one line each, "outside" when off."""
    if result["model"] != "bundled:all-MiniLM-L6-v2":
        return []
    measured = {r["system"]: r for r in result["test"]["SciFact test"]}
    return [f"{system} {measure} {measured[system][measure]:.4f} vs reference {ref} ± {tol}: "
            + ("within" if abs(measured[system][measure] - ref) <= tol else "**outside**")
            for (system, measure), (ref, tol) in REFERENCE.items()]


def markdown(result: dict) -> str:
    lines = ["# Hybrid retrieval (benchmarks/hybrid.py)", "",
             f"`{result['command']}`; model {result['model']}; {result['wall_s']} s.", "",
             "Dev (SciFact train, 809 queries), nDCG@10 of each choice: "
             + ", ".join(f"{k} {v:.4f}" for k, v in result["dev"].items())
             + f". Chosen: **{result['chosen']}**.", ""]
    for data_name, rows in result["test"].items():
        lines += [f"## {data_name}", "", "| system | nDCG@10 | R@100 | p vs BM25 | p vs dense |",
                  "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['system']} | {r['nDCG@10']:.4f} | {r['R@100']:.4f} | "
                         f"{r.get('p vs bm25', '—')} | {r.get('p vs dense', '—')} |")
        lines.append("")
    lines.append("p: paired randomisation test on per-query nDCG@10 (10,000 permutations).")
    checks = acceptance(result)
    if checks:
        lines += ["", "Acceptance (SciFact test against figures measured outside the project):", "",
                  *(f"- {line}" for line in checks)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled:all-MiniLM-L6-v2")
    ns = parser.parse_args(argv)
    started = time.perf_counter()
    encoder = Encoder.load(ModelArgs(name_or_path=ns.model))
    with tempfile.TemporaryDirectory() as cache:  # SciFact's corpus encoded once for both splits
        dev = load_eval_data("scifact", "train")
        dev_runs = runs(encoder, dev, cache)
        on_dev = {name(m, w): score(dev, fuse(dev_runs["bm25"], dev_runs["dense"], m, w,
                                              depth=1000))["metrics"]["nDCG@10"]
                  for m, w in CHOICES}
        method, weight = max(CHOICES, key=lambda c: on_dev[name(*c)])
        test = {"SciFact test": (load_eval_data("scifact", "test"), cache),
                "MS MARCO sample (dev)": (load_eval_data("msmarco_sample", "dev"), None)}
        tables = {label: report(data, runs(encoder, data, where), method, weight)
                  for label, (data, where) in test.items()}
    given = sys.argv[1:] if argv is None else argv
    result = {"command": " ".join(["python -m benchmarks.hybrid", *given]),
              "model": ns.model, "dev": {k: round(v, 4) for k, v in on_dev.items()},
              "chosen": name(method, weight), "test": tables,
              "wall_s": round(time.perf_counter() - started)}
    write_atomic(RESULTS / "hybrid.json", json.dumps(result, indent=2))
    write_atomic(RESULTS / "hybrid.md", markdown(result))
    print(markdown(result))
    if any(line.endswith("**outside**") for line in acceptance(result)):
        raise SystemExit("SciFact test figures outside the reference tolerances (see above)")
    return result


if __name__ == "__main__":
    main()
