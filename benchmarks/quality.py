"""Domain adaptation on a CPU budget: few-shot, label-free and both, on SciFact.

    TWOTOWER_DATA=../shared/data python -m benchmarks.quality SECTION [SECTION ...]
        [--seeds 0 1 2] [--choices NAME ...] [--data scifact] [--dry-run] [--reuse]

A row is a committed recipe run in a subprocess (`finetune/run.py`, `pretrain/run.py`, or
sentence-transformers' trainer on the same triples: benchmarks/quality_st.py), overridden only
by benchmarks/quality_choices.py, the data, output folder, seed and evaluation split; or an
evaluation without training (BM25, the start model). Rows go into benchmarks/results/quality.json;
quality.md is generated from them (quality_report.py: paired randomisation tests of per-query
nDCG@10, means over seeds). --reuse records a finished run only if its command and resolved
recipe are unchanged; otherwise the row is run again.

Test split (chooses nothing): reference, fewshot (+ sentence-transformers; st_same: those
alone), st_reference_lr, fewshot_dual, label_free, domain_adapt, distil, domain_adapt_distil,
curve (8 / 32 / 128 queries). Dev split (100 training queries held out of training, each change
against its base of the same seed): ablation (of recipes fewshot, domain_pretrain and
domain_adapt), distil_dev. other_corpus: the recipes unchanged on --other (100 held-out
queries, the rest for few-shot training). --seeds: training seeds (curve:
samples); default 0 for fewshot, st_*, fewshot_dual and curve, elsewhere the recipe's own (not
named on the command). Sections retired once their recipes changed (dev, label_free_dev,
label_free_negatives, label_free_sentences, curve_dev, domain_adapt_dual): docs/results.md names
the commit that ran them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from benchmarks.quality_choices import (DEV_EVAL, DISTIL_CHOICES, DOMAIN_ADAPT_ABLATION, DUAL,
                                        FEWSHOT_ABLATION, LABEL_FREE_ABLATION, LABEL_FREE_BASE,
                                        MODEL, ST_REFERENCE_LR, ST_SAME, TEST_EVAL)
from benchmarks.quality_report import MEASURES, markdown, seed_means, significance
from twotower.common.data import resolve_data
from twotower.common.eval.evaluate import (DenseEvaluator, evaluate_bm25, evaluate_dense,
                                           load_eval_data)
from twotower.common.eval.outputs import write_outputs
from twotower.common.model.encoder import Encoder
from twotower.common.recipe.config import load_recipe
from twotower.common.train.rundir import write_atomic
from twotower.finetune.args import FinetuneRecipe
from twotower.pretrain.args import PretrainRecipe

REPO = Path(__file__).resolve().parents[1]
RUNS, RESULTS = REPO / "runs" / "quality", REPO / "benchmarks" / "results"

# ------------------------------------------------------------------ running one row
def _cpu_s() -> float:  # of the finished subprocesses
    return sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def recipe_digest(script: str, recipe: str, overrides: list[str]) -> str:
    """What a command trains (its resolved recipe, and its pretraining stage's): --reuse records
    a finished run only when this is unchanged, so an edited recipe's row is run again."""
    kind = PretrainRecipe if script.startswith("pretrain") else FinetuneRecipe
    resolved = [load_recipe(kind, recipe, list(overrides))]
    stage = getattr(resolved[0], "pretrain", None)
    if stage is not None and stage.recipe:
        resolved.append(load_recipe(PretrainRecipe, stage.recipe, list(stage.overrides)))
    texts = [OmegaConf.to_yaml(OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(r))))
             for r in resolved]
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


def final_stage(out: Path) -> Path:
    """Where a run's last Trainer wrote metrics.json and eval/: `out`, or for a recipe of several
    stages (domain_adapt) the stage `out`/result.json names."""
    result = out / "result.json"
    stage = json.loads(result.read_text()).get("stage") if result.is_file() else None
    return out / "stages" / stage if stage and (out / "stages" / stage).is_dir() else out


def run_script(script: str, recipe: str, out: Path, overrides: list[str], ns,
               trains: tuple | None = None) -> dict:
    """One training run in a subprocess: its final metrics, run file, wall and CPU seconds.
    `trains`: (script, overrides) of the recipe it trains when not its own command's
    (benchmarks/quality_st.py takes --output-dir and trains recipe `fewshot`'s triples)."""
    st = trains is not None
    cmd = [sys.executable, str(REPO / script), "--recipe", recipe,
           *(["--output-dir", str(out)] if st else
             [f"train.output_dir={out}", "train.overwrite_output_dir=true"]), *overrides]
    command = " ".join(cmd[1:])
    print("$", command, flush=True)
    if ns.dry_run:
        return {"command": command}
    trained_by, trained_with = trains or (script, overrides)
    digest = recipe_digest(trained_by, recipe, trained_with)
    timing_file, metrics = out / "quality_timing.json", final_stage(out) / "metrics.json"
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    if not (ns.reuse and metrics.is_file() and timing.get("command") == command
            and timing.get("recipe_digest") == digest):
        cpu, start = _cpu_s(), time.perf_counter()
        if subprocess.run(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode:
            raise SystemExit(f"{script} --recipe {recipe} failed; see the output above")
        if not final_stage(out).joinpath("metrics.json").is_file():
            raise SystemExit(f"{script} --recipe {recipe} wrote no metrics.json under {out}")
        timing = {"wall_s": round(time.perf_counter() - start, 1),
                  "cpu_s": round(_cpu_s() - cpu, 1), "command": command,
                  "recipe_digest": digest}
        write_atomic(timing_file, json.dumps(timing))
    saved = json.loads(final_stage(out).joinpath("metrics.json").read_text())
    if st:  # written by write_outputs (the Trainer's metrics.json is the metrics alone)
        saved = saved["metrics"]
    run_file = final_stage(out) / ("run.trec" if st else "eval/run.trec")
    return {**timing, **{m: saved.get(m) for m in MEASURES}, "run_file": str(run_file)}


def in_process(name: str, out: Path, evaluate, data, key, ns) -> dict:
    """An evaluation without training (`evaluate()` -> an EvalResult on `data`), its run file
    saved for the paired tests; --reuse records the saved row when it has the same `key`."""
    print(f"$ (in process) {name}", flush=True)
    if ns.dry_run:
        return {}
    saved = out / "metrics.json"
    earlier = json.loads(saved.read_text()) if saved.is_file() else {}
    if not (ns.reuse and earlier.get("quality_key") == key and (out / "run.trec").is_file()):
        start, cpu = time.perf_counter(), time.process_time()
        result = evaluate()
        timing = {"wall_s": round(time.perf_counter() - start, 1),
                  "cpu_s": round(time.process_time() - cpu, 1)}
        write_outputs(result, out, overwrite=True, data=data,
                      extra={"quality_key": key, "quality_timing": timing})
        earlier = json.loads(saved.read_text())
    return {**{m: earlier["metrics"][m] for m in MEASURES}, **earlier["quality_timing"],
            "run_file": str(out / "run.trec")}


def finetune(folder: str, recipe: str, overrides: list[str], ns) -> dict:
    return run_script("finetune/run.py", recipe, RUNS / folder,
                      [f"data.path={ns.data}", f"eval.data={ns.data}", *overrides], ns)


def label_free(folder: str, overrides: list[str], ns) -> dict:
    return run_script("pretrain/run.py", "domain_pretrain", RUNS / folder,
                      [f"model.name_or_path={MODEL}", f"data.corpora=[{ns.data}]",
                       f"eval.data={ns.data}", *overrides], ns)


def st_run(folder: str, seed: int, overrides: list[str], ns) -> dict:
    return run_script("benchmarks/quality_st.py", "fewshot", RUNS / folder,
                      ["--seed", str(seed), "--data", ns.data, *overrides], ns,
                      trains=("finetune/run.py", [f"data.path={ns.data}", f"train.seed={seed}",
                                                  *overrides]))


def own_seeds(ns, script: str, recipe: str) -> list[tuple[int, list[str], str]]:
    """(seed, overrides, folder suffix) per --seeds value; the recipe's own seed (the default)
    is not named on the command and keeps the run's first folder."""
    kind = PretrainRecipe if script.startswith("pretrain") else FinetuneRecipe
    own = load_recipe(kind, recipe, []).train.seed
    return [(s, [], "") if s == own else (s, [f"train.seed={s}"], f"_s{s}")
            for s in ns.seeds or [own]]


def start_model_dev(ns, seed: int, out: Path) -> dict:
    """The start model, untrained, on the dev split and corpus slice of training seed `seed`
    (the Trainer's evaluator, seeded as a run of that seed is): the base of label-free rows."""
    recipe = load_recipe(FinetuneRecipe, "fewshot", [f"data.path={ns.data}",
                                                     f"eval.data={ns.data}", *DEV_EVAL])
    evaluator = DenseEvaluator(recipe.eval, seed=seed) if not ns.dry_run else None

    def evaluate():
        evaluator(Encoder.load(MODEL))
        return evaluator.last
    return in_process(f"{MODEL} on the dev split, corpus slice of seed {seed}", out, evaluate,
                      evaluator and evaluator.data, f"{ns.data} dev slice of seed {seed}", ns)


def chosen(ns, table: dict) -> list:
    names = ns.choices or list(table)
    if set(names) - set(table):
        raise SystemExit(f"unknown --choices {sorted(set(names) - set(table))}; known: {list(table)}")
    return names


# ------------------------------------------------------------------ sections
def section_reference(ns) -> dict:
    test = None if ns.dry_run else load_eval_data(ns.data, "test")
    return {"BM25": in_process("BM25 on the test split", RUNS / "BM25",
                               lambda: evaluate_bm25(test, measures=MEASURES), test, ns.data, ns),
            "start model": in_process(f"{MODEL} on the test split", RUNS / "start_model", lambda:
                                      evaluate_dense(Encoder.load(MODEL), test, measures=MEASURES,
                                                     progress=False), test, ns.data, ns)}


def _seeded(group: str, rows: dict) -> dict:
    return {f"{group} (seed {seed})": {**row, "group": group, "seed": seed}
            for seed, row in rows.items()}


def section_fewshot(ns) -> dict:
    rows = {}
    for seed in ns.seeds or [0]:
        rows.update(_seeded("fewshot", {seed: finetune(
            f"fewshot_s{seed}", "fewshot", [f"train.seed={seed}", *TEST_EVAL], ns)}))
        if not ns.without_st:
            rows.update(_seeded(ST_SAME, {seed: st_run(f"st_mnrl_s{seed}", seed, [], ns)}))
    return rows


def section_st_same(ns) -> dict:
    """The `fewshot` section's sentence-transformers rows alone (same folders and commands)."""
    return _seeded(ST_SAME, {s: st_run(f"st_mnrl_s{s}", s, [], ns) for s in ns.seeds or [0]})


def section_st_reference_lr(ns) -> dict:
    return _seeded(ST_REFERENCE_LR, {s: st_run(f"st_mnrl_lr2e-5_s{s}", s, ["train.lr=2e-5"], ns)
                                     for s in ns.seeds or [0]})


def section_fewshot_dual(ns) -> dict:
    return _seeded(f"fewshot {DUAL}", {s: finetune(
        f"fewshot_dual_s{s}", "fewshot", [f"train.seed={s}", *FEWSHOT_ABLATION[DUAL], *TEST_EVAL],
        ns) for s in ns.seeds or [0]})


def section_label_free(ns) -> dict:
    return _seeded("domain_pretrain, label-free", {s: label_free(
        f"domain_pretrain{suffix}", [*TEST_EVAL, *own], ns)
        for s, own, suffix in own_seeds(ns, "pretrain/run.py", "domain_pretrain")})


def _on_test_split(group: str, recipe: str, ns) -> dict:
    """Fine-tuning recipe `recipe` as committed, on the test split, one row per --seeds value."""
    return _seeded(group, {s: finetune(f"{recipe}{suffix}", recipe, [*TEST_EVAL, *own], ns)
                           for s, own, suffix in own_seeds(ns, "finetune/run.py", recipe)})


def section_domain_adapt(ns) -> dict:
    # the pretraining stage reads the fine-tuning data's corpus, with the recipe's seed
    return _on_test_split("domain_adapt, pretrain then fewshot", "domain_adapt", ns)


def section_distil(ns) -> dict:
    # label-free: training reads SciFact's corpus only (issue #26)
    return _on_test_split("domain_distil, label-free", "domain_distil", ns)


def section_domain_adapt_distil(ns) -> dict:
    return _on_test_split("domain_adapt_distil, distil then fewshot", "domain_adapt_distil", ns)


def _sample(n: int, seed: int) -> list[str]:
    """`fewshot` on n sampled training queries, batch at most n / 2 (two queries sharing a judged
    document cannot share a batch, so a batch of all n could not be drawn)."""
    batch = load_recipe(FinetuneRecipe, "fewshot", []).train.per_device_batch_size
    return [f"data.max_queries={n}", f"data.sample_seed={seed}",
            f"train.per_device_batch_size={min(batch, n // 2)}"]


def section_curve(ns) -> dict:
    rows = {}
    for n in (8, 32, 128):
        rows.update({f"fewshot, {n} queries (sample {s})": {**finetune(
            f"curve_{n}_s{s}", "fewshot", [*_sample(n, s), *TEST_EVAL], ns),
            "group": f"fewshot, {n} queries", "seed": s} for s in ns.seeds or [0]})
    return rows


def _compared(rows: list[tuple[str, dict]], seed: int, own: list, data: str) -> dict:
    """Rows of one seed, the first the base of the others (paired on the dev queries)."""
    keyed = {}
    for group, row in rows:
        key = group + (f" (seed {seed})" if own else "")
        keyed[key] = {**row, "qrels": [data, "train"], "group": group, "seed": seed,
                      **({"base": next(iter(keyed))} if keyed else {})}
    return keyed


def section_ablation(ns) -> dict:
    known = [*FEWSHOT_ABLATION, *LABEL_FREE_ABLATION, *DOMAIN_ADAPT_ABLATION]
    if set(ns.choices or ()) - set(known):
        raise SystemExit(f"unknown --choices {sorted(set(ns.choices) - set(known))}; known: {known}")
    lf_base = ["train.save_every=0", *LABEL_FREE_BASE[1]]
    rows = {}
    for part, table, script, recipe in (
            ("fewshot", FEWSHOT_ABLATION, "finetune/run.py", "fewshot"),
            ("label-free", LABEL_FREE_ABLATION, "pretrain/run.py", "domain_pretrain"),
            ("domain_adapt", DOMAIN_ADAPT_ABLATION, "finetune/run.py", "domain_adapt")):
        names = [n for i, n in enumerate(table) if i == 0 or not ns.choices or n in ns.choices]
        if len(names) == 1 and ns.choices:
            continue  # none of this part's changes chosen
        for seed, own, suffix in own_seeds(ns, script, recipe):
            def run(i: int, name: str) -> dict:
                if table[name] is None:  # no training: the start model, evaluated in process
                    return start_model_dev(ns, seed, RUNS / f"dev_start_model{suffix}")
                if script == "finetune/run.py":  # fewshot's base: the retired `dev` section's folder
                    folder = ("dev_" + slug("fewshot as committed" if i == 0 else name)
                              if part == "fewshot" else f"dev_da_{slug(name)}")
                    return finetune(folder + suffix, recipe, [*table[name], *own, *DEV_EVAL], ns)
                folder = "dev_lf_" + slug(LABEL_FREE_BASE[0] + ("" if i == 0 else " " + name))
                return label_free(folder + suffix, [*lf_base, *table[name], *own, *DEV_EVAL], ns)
            rows.update(_compared([(f"ablation, {part}: {name}", run(i, name))
                                   for i, name in enumerate(names)], seed, own, ns.data))
    return rows


def section_distil_dev(ns) -> dict:
    """Recipe domain_distil's choices against the start model on the same dev slice (training
    reads the corpus only; the held-out queries' labels only score)."""
    rows = {}
    for seed, own, suffix in own_seeds(ns, "finetune/run.py", "domain_distil"):
        runs = [("distil: the start model", start_model_dev(ns, seed,
                                                             RUNS / f"dev_start_model{suffix}"))]
        runs += [(f"distil: {name}", finetune(f"dev_distil_{slug(name)}{suffix}", "domain_distil",
                                              [*DISTIL_CHOICES[name], *own, *DEV_EVAL], ns))
                 for name in chosen(ns, DISTIL_CHOICES)]
        rows.update(_compared(runs, seed, own, ns.data))
    return rows


def section_other_corpus(ns) -> dict:
    """The committed recipes, unchanged, on --other (offline: the MS MARCO sample); the only
    overrides name the data and hold out 100 of its judged queries for evaluation."""
    other, prefix = ns.other, f"other corpus, {ns.other}: "
    held_out = [f"eval.data={other}", "eval.split=train", "eval.holdout=100", "eval.max_queries=0",
                "eval.max_docs=0", f"eval.metrics=[{','.join(MEASURES)}]"]
    ms = (resolve_data(other) / "collection.tsv").is_file()
    source = [f"data.kind={'msmarco' if ms else 'beir'}", f"data.path={other}"]
    recipe = load_recipe(FinetuneRecipe, "fewshot", [*source, *held_out])
    evaluator = None if ns.dry_run else DenseEvaluator(recipe.eval, seed=recipe.train.seed)

    def start_model():
        evaluator(Encoder.load(MODEL))
        return evaluator.last
    rows = {prefix + name: in_process(f"{name} on {other}", RUNS / f"{slug(other)}_{slug(name)}",
                                      run, evaluator and evaluator.data,
                                      f"held out, seed {recipe.train.seed}", ns)
            for name, run in (("start model", start_model),
                              ("BM25", lambda: evaluate_bm25(evaluator.data, measures=MEASURES)))}
    start = [f"model.name_or_path={MODEL}", f"data.corpora=[{other}]"]
    trained = {"domain_pretrain (label-free)": ("pretrain/run.py", "domain_pretrain", start),
               # diagnostic, not the recipe: does chunking across ~60-token passages hurt here?
               "domain_pretrain, chunks inside documents (diagnostic)": (
                   "pretrain/run.py", "domain_pretrain", [*start, "pairs.chunking=document"]),
               "fewshot": ("finetune/run.py", "fewshot", source),
               "domain_adapt": ("finetune/run.py", "domain_adapt", source),
               # label-free (issue #26): the corpus of data.path only, whatever its layout
               "domain_distil (label-free)": ("finetune/run.py", "domain_distil",
                                              [f"data.path={other}"]),
               # a recipe of stages: each stage's data named (the recipe's own say scifact)
               "domain_adapt_distil": ("finetune/run.py", "domain_adapt_distil", [
                   f"stages.distil.data.path={other}", f"stages.labelled.{source[0]}",
                   f"stages.labelled.{source[1]}"])}
    for name, (script, recipe, data) in trained.items():
        rows[prefix + name] = run_script(script, recipe, RUNS / f"{slug(other)}_{slug(name)}",
                                         [*data, *held_out], ns)
    return {name: {**row, "qrels": [other, "train"],
                   **({} if name.endswith("start model") else {"base": prefix + "start model"})}
            for name, row in rows.items()}


SECTIONS = {name.removeprefix("section_"): fn for name, fn in globals().items()
            if name.startswith("section_")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("sections", nargs="+", choices=sorted(SECTIONS))
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds (curve: samples)")
    p.add_argument("--choices", nargs="+", help="dev-split sections: only these of their choices")
    p.add_argument("--data", default="scifact", help="BEIR folder or name under $TWOTOWER_DATA")
    p.add_argument("--other", default="msmarco_sample", help="other_corpus: a BEIR or MS MARCO folder")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--reuse", action="store_true",
                   help="record runs finished with the same command and recipe instead of training "
                        "them again (an interrupted benchmark goes on where it stopped)")
    p.add_argument("--without-st", action="store_true",
                   help="fewshot: twotower's runs only (sentence-transformers' rows stay as recorded)")
    ns = p.parse_args(argv)
    if not os.environ.get("TWOTOWER_DATA") and not Path(ns.data).is_dir():
        p.error("set TWOTOWER_DATA to the offline data folder (the one holding scifact/)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = RESULTS / "quality.json"
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    rows = recorded.setdefault("rows", {})
    for section in ns.sections:
        rows.update(SECTIONS[section](ns))
        if not ns.dry_run:  # written after each section: a later failure keeps these rows
            significance(rows, ns.data)
            recorded.update(means=seed_means(rows, ns.data, recorded.get("means")),
                            when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
            write_atomic(path, json.dumps(recorded, indent=2) + "\n")
            write_atomic(RESULTS / "quality.md", markdown(rows, recorded["means"]))
    if not ns.dry_run:
        print(markdown(rows, recorded["means"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
