"""Domain adaptation on a CPU budget (issue #8): few-shot, label-free and both, on SciFact test.

    TWOTOWER_DATA=../shared/data python -m benchmarks.quality SECTION [SECTION ...]
        [--seeds 0 1 2] [--data scifact] [--dry-run] [--reuse]

Sections (each writes its rows into benchmarks/results/quality.json and regenerates quality.md,
so sections can be run separately; every row records wall and CPU seconds end to end, training
plus the final evaluation of the whole test split):
  reference     BM25 and the starting model (bundled all-MiniLM-L6-v2) on the test split
  fewshot       recipe `fewshot` (all training queries) next to sentence-transformers' trainer
                with MultipleNegativesRankingLoss on exactly the same triples (the same mined
                negatives, epoch by epoch), batch, learning rate, steps and precision
                (benchmarks/quality_st.py)
  dev           the choices behind `fewshot`, on a dev split of 100 training queries held out of
                training (eval.holdout; the test split is not used)
  label_free    recipe `domain_pretrain` from the bundled model on the corpus only (one run
                per --seeds; default the recipe's seed)
  label_free_dev  the choices behind `domain_pretrain` (crop vs ICT, learning rate), on the dev
                split (the labels of the held-out training queries only choose; training never
                sees a query)
  label_free_negatives  Contriever's ablation of the number of negatives for that run (MoCo
                queue 1024 / 4096 / 16384, in-batch only), on the dev split
  label_free_sentences  label-free fine-tuning on sentences of the corpus as queries
                (data.kind=sentences), on the dev split against the label-free base of the same
                seed (benchmarks/quality_sentences.py; --choices, --seeds)
  domain_adapt  recipe `domain_adapt`: corpus pretraining, then `fewshot` (one run per --seeds)
  curve         `fewshot` with 8 / 32 / 128 training queries (one sample per --seeds)
  fewshot_dual  `fewshot` plus DANCE's dual loss, the one change the dev ablation found may help
                (p 0.04 of four changes tried), run on the test split afterwards: one run per
                --seeds (default 0), the seeds of the `fewshot` rows it is compared with
  st_reference_lr  sentence-transformers on the `fewshot` triples at lr 2e-5, the learning rate of
                the issue's reference run, instead of the recipe's dev-chosen 5e-5 (one run per
                --seeds, default 0; benchmarks/quality_baselines.py)
  domain_adapt_dual  `domain_adapt` with that dual loss in its fine-tuning stage: one run per
                --seeds (default the recipe's seed), the seeds of the `domain_adapt` rows
  other_corpus  the recipes, unchanged, on another corpus (--other, default the MS MARCO sample:
                100 held-out queries, the other 100 for few-shot training)
  ablation      which seed methods help: one change at a time from `fewshot` (negatives: none,
                BM25, dense-mined, with a false-negative filter; dual loss; SamToNe; PAIR) and
                from the label-free dev run (multi-pair, relevance-aware weights), on the dev
                split, each compared with its base of the same seed query by query (one run
                each per --seeds; --choices: only these changes; benchmarks/quality_choices.py)
Rows of several seeds (or few-shot samples) are also summarised by their mean; the mean's
p-values compare per-query nDCG@10 averaged over the seeds (for an ablation row, against its
base averaged over the same seeds).
Every run is `python finetune/run.py` / `pretrain/run.py` in a subprocess with the committed
recipe; the only overrides are the data folder, output folder, seed, few-shot size and the
evaluation split: nothing is tuned on the test split (choices come from the `dev` section).
Per-query nDCG@10 of each run is compared with BM25 and the start model by a paired t-test and
a randomisation test (common/eval/significance.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from twotower.common.data import resolve_data
from twotower.common.eval.evaluate import (DenseEvaluator, evaluate_bm25, evaluate_dense,
                                           load_eval_data)
from twotower.common.eval.outputs import write_outputs
from twotower.common.model.encoder import Encoder
from twotower.common.recipe.config import load_recipe
from twotower.finetune.args import FinetuneRecipe

REPO = Path(__file__).resolve().parents[1]
from benchmarks.quality_baselines import ST_SAME, section_st_reference_lr, st_rows
from benchmarks.quality_choices import (CURVE_DEV_CHOICES, DEV_CHOICES, FEWSHOT_ABLATION,
                                        LABEL_FREE_ABLATION, LABEL_FREE_BASE,
                                        LABEL_FREE_DEV_CHOICES, MODEL, NEGATIVES)
from benchmarks.quality_dual import section_domain_adapt_dual, section_fewshot_dual
from benchmarks.quality_report import MEASURES, markdown, seed_means, significance
from benchmarks.quality_runs import (DEV_EVAL, RUNS, TEST_EVAL, finetune, load_script_recipe,
                                     recipe_seeds, run_script, seed_suffix, slug, start_model_dev)
from benchmarks.quality_sentences import section_label_free_sentences

RESULTS = REPO / "benchmarks" / "results"


# ----------------------------------------------------------------------------- sections
def section_reference(ns) -> dict:
    if ns.dry_run:
        print("$ (in process) BM25 and", MODEL, "on", ns.data, "test")
        return {}
    test = load_eval_data(ns.data, "test")
    rows = {}
    for name in ("BM25", "start model") if ns.reuse else ():
        out = RUNS / name.replace(" ", "_")
        if (out / "metrics.json").is_file() and (out / "run.trec").is_file():
            saved = json.loads((out / "metrics.json").read_text())
            rows[name] = {**{m: saved["metrics"][m] for m in MEASURES},
                          "wall_s": saved.get("timing", {}).get("total_s"),
                          "run_file": str(out / "run.trec"), "timing": "earlier run"}
    for name, run in (("BM25", lambda: evaluate_bm25(test, measures=MEASURES)),
                      ("start model", lambda: evaluate_dense(Encoder.load(MODEL), test,
                                                             measures=MEASURES, progress=False))):
        if name in rows:
            continue
        start, cpu = time.perf_counter(), time.process_time()
        result = run()
        out = RUNS / name.replace(" ", "_")
        write_outputs(result, out, overwrite=True, data=test)
        rows[name] = {**{m: result.metrics[m] for m in MEASURES},
                      "wall_s": round(time.perf_counter() - start, 1),
                      "cpu_s": round(time.process_time() - cpu, 1), "run_file": str(out / "run.trec")}
    return rows


def section_fewshot(ns) -> dict:
    rows = {}
    for seed in ns.seeds or [0]:
        tag = f"seed {seed}"
        rows[f"fewshot ({tag})"] = {**finetune(f"fewshot_s{seed}", "fewshot",
                                               [f"train.seed={seed}", *TEST_EVAL], ns),
                                    "group": "fewshot", "seed": seed}
        if not ns.without_st:
            rows.update(st_rows(ns, seed, f"st_mnrl_s{seed}", ST_SAME))
    return rows


def section_dev(ns) -> dict:
    chosen = _chosen(ns, DEV_CHOICES)
    rows = {f"dev: {name}": finetune("dev_" + slug(name),
                                     "fewshot", [*DEV_CHOICES[name], *DEV_EVAL], ns)
            for name in chosen}
    seed = load_script_recipe("finetune/run.py", "fewshot").train.seed  # these runs' dev slice
    rows["dev: start model (no training)"] = start_model_dev(ns, seed, RUNS / "dev_start_model")
    return rows


def section_label_free(ns) -> dict:
    group = "domain_pretrain, label-free"
    return {f"{group} (seed {seed})": {**run_script(
        "pretrain/run.py", "domain_pretrain", RUNS / f"domain_pretrain{seed_suffix(seed, own)}",
        [f"model.name_or_path={MODEL}", f"data.corpora=[{ns.data}]", f"eval.data={ns.data}",
         *TEST_EVAL, *own], ns), "group": group, "seed": seed}
        for seed, own in recipe_seeds(ns, "pretrain/run.py", "domain_pretrain")}


def _label_free_dev(name: str, overrides: list[str], ns, suffix: str = "") -> dict:
    return run_script(
        "pretrain/run.py", "domain_pretrain",
        RUNS / ("dev_lf_" + slug(name) + suffix),
        [f"model.name_or_path={MODEL}", f"data.corpora=[{ns.data}]", f"eval.data={ns.data}",
         "train.save_every=0", *overrides, *DEV_EVAL], ns)


def section_label_free_dev(ns) -> dict:
    chosen = _chosen(ns, LABEL_FREE_DEV_CHOICES)
    return {f"dev: label-free {name}": _label_free_dev(name, LABEL_FREE_DEV_CHOICES[name], ns)
            for name in chosen}


def _chosen(ns, table: dict) -> list:
    """--choices (names of `table`), or all of it."""
    chosen = ns.choices or list(table)
    unknown = set(chosen) - set(table)
    if unknown:
        raise SystemExit(f"unknown --choices {sorted(unknown)}; known: {list(table)}")
    return chosen


def section_label_free_negatives(ns) -> dict:
    base_name, base = LABEL_FREE_BASE, LABEL_FREE_DEV_CHOICES[LABEL_FREE_BASE]
    rows = {"dev: label-free negatives, queue 4096": _label_free_dev(base_name, base, ns)}
    rows.update({f"dev: label-free negatives, {name}": _label_free_dev(
        f"{base_name} {name}", [*base, *overrides], ns) for name, overrides in NEGATIVES.items()})
    return rows


def section_ablation(ns) -> dict:
    """One change at a time from the committed recipes, on the dev split; each row names its
    base (the committed recipe's dev run of the same seed), and is compared with it query by
    query. --seeds: training seeds (default the recipes' own); --choices: only these changes
    (their part's base always runs)."""
    unknown = set(ns.choices or ()) - {*FEWSHOT_ABLATION, *LABEL_FREE_ABLATION}
    if unknown:
        raise SystemExit(f"unknown --choices {sorted(unknown)}; known: "
                         f"{[*FEWSHOT_ABLATION, *LABEL_FREE_ABLATION]}")
    rows = {}
    for part, table, script, recipe, run in (
            ("fewshot", FEWSHOT_ABLATION, "finetune/run.py", "fewshot",
             lambda first, name, overrides, suffix: finetune(  # base: the `dev` section's run
                 "dev_" + slug("fewshot as committed" if first else name) + suffix, "fewshot",
                 [*overrides, *DEV_EVAL], ns)),
            ("label-free", LABEL_FREE_ABLATION, "pretrain/run.py", "domain_pretrain",
             lambda first, name, overrides, suffix: _label_free_dev(
                 LABEL_FREE_BASE if first else f"{LABEL_FREE_BASE} {name}",
                 [*LABEL_FREE_DEV_CHOICES[LABEL_FREE_BASE], *overrides], ns, suffix))):
        names = [n for i, n in enumerate(table) if i == 0 or not ns.choices or n in ns.choices]
        if len(names) == 1 and ns.choices:
            continue  # none of this part's changes chosen
        for seed, own in recipe_seeds(ns, script, recipe):
            base = None
            for name in names:
                group = f"ablation, {part}: {name}"
                suffix = seed_suffix(seed, own)
                if table[name] is None:  # no training: evaluated in process
                    done = start_model_dev(ns, seed, RUNS / f"dev_start_model{suffix}")
                else:
                    done = run(base is None, name, [*table[name], *own], suffix)
                row = {**done, "qrels": [ns.data, "train"], "group": group, "seed": seed}
                key = group + (f" (seed {seed})" if own else "")
                rows[key] = {**row, "base": base} if base else row
                base = base or key
    return rows


def section_other_corpus(ns) -> dict:
    """The committed recipes, unchanged, on another corpus (--other; offline: the MS MARCO
    sample): 100 of its judged queries held out for evaluation, the others the few-shot
    training set; the only overrides name the data."""
    other, prefix = ns.other, f"other corpus, {ns.other}: "
    held_out = [f"eval.data={other}", "eval.split=train", "eval.holdout=100", "eval.max_queries=0",
                "eval.max_docs=0", f"eval.metrics=[{','.join(MEASURES)}]"]
    ms = (resolve_data(other) / "collection.tsv").is_file()
    source = [f"data.kind={'msmarco' if ms else 'beir'}", f"data.path={other}"]
    where = {"qrels": [other, "train"]}
    rows = {}
    if not ns.dry_run:  # zero-shot rows, on the evaluator the trained runs use
        recipe = load_recipe(FinetuneRecipe, "fewshot", [*source, *held_out])
        evaluator = DenseEvaluator(recipe.eval, seed=recipe.train.seed)

        def start_model():
            evaluator(Encoder.load(MODEL))
            return evaluator.last
        for name, run in (("start model", start_model),
                          ("BM25", lambda: evaluate_bm25(evaluator.data, measures=MEASURES))):
            out = RUNS / f"{slug(other)}_{slug(name)}"
            start, cpu = time.perf_counter(), time.process_time()
            result = run()
            write_outputs(result, out, overwrite=True, data=evaluator.data)
            rows[prefix + name] = {
                **{m: result.metrics[m] for m in MEASURES}, **where,
                "wall_s": round(time.perf_counter() - start, 1),
                "cpu_s": round(time.process_time() - cpu, 1), "run_file": str(out / "run.trec")}
    trained = {"domain_pretrain (label-free)": (
                   "pretrain/run.py", "domain_pretrain",
                   [f"model.name_or_path={MODEL}", f"data.corpora=[{other}]"]),
               # diagnostic, not the recipe: is stream chunking across ~60-token passages what
               # hurts here? (README, "The same recipes on another corpus")
               "domain_pretrain, chunks inside documents (diagnostic)": (
                   "pretrain/run.py", "domain_pretrain",
                   [f"model.name_or_path={MODEL}", f"data.corpora=[{other}]",
                    "pairs.chunking=document"]),
               "fewshot": ("finetune/run.py", "fewshot", source),
               "domain_adapt": ("finetune/run.py", "domain_adapt", source)}
    for name, (script, recipe_name, data) in trained.items():
        rows[prefix + name] = {**run_script(script, recipe_name,
                                            RUNS / f"{slug(other)}_{slug(name)}",
                                            [*data, *held_out], ns),
                               **where, "base": prefix + "start model"}
    if prefix + "BM25" in rows:
        rows[prefix + "BM25"]["base"] = prefix + "start model"
    return rows


def section_domain_adapt(ns) -> dict:
    # the pretraining stage reads the fine-tuning data's corpus and takes the recipe's seed
    # (finetune/run.py)
    group = "domain_adapt, pretrain then fewshot"
    return {f"{group} (seed {seed})": {**finetune(
        f"domain_adapt{seed_suffix(seed, own)}", "domain_adapt", [*TEST_EVAL, *own], ns),
        "group": group, "seed": seed}
        for seed, own in recipe_seeds(ns, "finetune/run.py", "domain_adapt")}


def _sample(n: int, seed: int) -> list[str]:
    """Overrides of recipe `fewshot` for n sampled training queries: a batch of at most n / 2 (a
    batch of all n queries must hold every text, and two queries sharing a judged document cannot
    share a batch: the run stops, "no global batch ... without a repeated text")."""
    batch = load_recipe(FinetuneRecipe, "fewshot").train.per_device_batch_size
    return [f"data.max_queries={n}", f"data.sample_seed={seed}",
            f"train.per_device_batch_size={min(batch, n // 2)}"]


def section_curve(ns) -> dict:
    return {f"fewshot, {n} queries (sample {seed})": {
                **finetune(f"curve_{n}_s{seed}", "fewshot", [*_sample(n, seed), *TEST_EVAL], ns),
                "group": f"fewshot, {n} queries", "seed": seed}
            for n in (8, 32, 128) for seed in ns.seeds or [0]}


def section_curve_dev(ns) -> dict:
    """The steps of a small few-shot sample (CURVE_DEV_CHOICES), on the dev split, each choice
    against the committed recipe on the same sample."""
    rows = {}
    for n in (8, 32):
        base = None
        for name in _chosen(ns, CURVE_DEV_CHOICES):
            row = {**finetune(f"dev_curve_{n}_{slug(name)}", "fewshot",
                              [*_sample(n, 0), *CURVE_DEV_CHOICES[name], *DEV_EVAL], ns),
                   "qrels": [ns.data, "train"]}
            key = f"ablation, fewshot on {n} sampled queries: {name}"
            rows[key] = {**row, "base": base} if base else row
            base = base or key
    return rows


SECTIONS = {"reference": section_reference, "fewshot": section_fewshot, "dev": section_dev,
            "label_free": section_label_free, "label_free_dev": section_label_free_dev,
            "label_free_negatives": section_label_free_negatives,
            "label_free_sentences": section_label_free_sentences,
            "domain_adapt": section_domain_adapt, "domain_adapt_dual": section_domain_adapt_dual,
            "curve": section_curve, "fewshot_dual": section_fewshot_dual,
            "st_reference_lr": section_st_reference_lr,
            "curve_dev": section_curve_dev, "ablation": section_ablation,
            "other_corpus": section_other_corpus}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("sections", nargs="+", choices=sorted(SECTIONS))
    p.add_argument("--seeds", type=int, nargs="+",
                   help="fewshot / fewshot_dual / st_reference_lr / curve: training seeds / few-shot samples "
                        "(default 0); "
                        "label_free / domain_adapt(_dual) / ablation: training seeds (default the "
                        "recipe's own)")
    p.add_argument("--data", default="scifact", help="BEIR folder or name under $TWOTOWER_DATA")
    p.add_argument("--other", default="msmarco_sample",
                   help="other_corpus section: a BEIR or MS MARCO-layout folder (or name)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--reuse", action="store_true",
                   help="record runs that already finished with the same command instead of "
                        "training them again (an interrupted benchmark goes on where it stopped)")
    p.add_argument("--choices", nargs="+", help="dev / label_free_dev / curve_dev / ablation / "
                   "label_free_sentences sections: run only these of their choices "
                   "(benchmarks/quality_choices.py, quality_sentences.py)")
    p.add_argument("--without-st", action="store_true",
                   help="fewshot section: twotower's runs only (sentence-transformers' rows "
                        "stay as recorded)")
    ns = p.parse_args(argv)
    if not os.environ.get("TWOTOWER_DATA") and not Path(ns.data).is_dir():
        p.error("set TWOTOWER_DATA to the offline data folder (the one holding scifact/)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = RESULTS / "quality.json"
    everything = json.loads(path.read_text()) if path.is_file() else {}
    rows = everything.setdefault("rows", {})
    for section in ns.sections:
        rows.update(SECTIONS[section](ns))
        if ns.dry_run:
            continue
        significance(rows, ns.data)
        everything["means"] = seed_means(rows, ns.data)
        everything["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(everything, indent=2) + "\n")
        (RESULTS / "quality.md").write_text(markdown(rows, everything["means"]))
    if not ns.dry_run:
        print(markdown(rows, everything.get("means")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
