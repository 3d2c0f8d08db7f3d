"""How benchmarks/quality.py runs one training: a subprocess of the committed recipe with
overrides, timed (wall and CPU seconds), and recorded again without training (--reuse) only
when a finished run has exactly the same command and resolved recipe; when a recipe (or its
schema) changed, the row is run again."""
from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from benchmarks.quality_choices import MODEL
from benchmarks.quality_report import MEASURES
from twotower.common.eval.evaluate import DenseEvaluator
from twotower.common.eval.outputs import write_outputs
from twotower.common.model.encoder import Encoder
from twotower.common.recipe.config import load_recipe
from twotower.finetune.args import FinetuneRecipe
from twotower.pretrain.args import PretrainRecipe

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "quality"
TEST_EVAL = ["eval.split=test", "eval.max_queries=0", "eval.max_docs=0", "eval.holdout=0",
             f"eval.metrics=[{','.join(MEASURES)}]"]
# dev: 100 training queries held out; corpus = their judged documents + 2,000 others (cheaper
# than the whole corpus; sampled with the training seed, so the same for every choice of a seed)
DEV_EVAL = ["eval.split=train", "eval.holdout=100", "eval.max_queries=0", "eval.max_docs=2000",
            f"eval.metrics=[{','.join(MEASURES)}]"]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def final_stage(out: Path) -> Path:
    """Where a run's last Trainer wrote recipe.yaml, metrics.json and eval/: `out` itself, or for
    a recipe of several stages (domain_adapt) the stage that `out`/result.json names."""
    result = out / "result.json"
    if result.is_file():
        stage = json.loads(result.read_text()).get("stage")
        if stage and (out / "stages" / stage).is_dir():
            return out / "stages" / stage
    return out


def load_script_recipe(script: str, recipe: str, overrides: list[str] = ()):
    """`recipe` resolved as `script` (pretrain/run.py or finetune/run.py) resolves it."""
    kind = PretrainRecipe if script.startswith("pretrain") else FinetuneRecipe
    return load_recipe(kind, recipe, list(overrides))


def resolved_recipes(script: str, recipe: str, overrides: list[str]) -> list:
    """What a command trains: its resolved recipe, and its pretraining stage's if it has one."""
    resolved = load_script_recipe(script, recipe, overrides)
    stage = getattr(resolved, "pretrain", None)
    if stage is not None and stage.recipe:
        return [resolved, load_script_recipe("pretrain", stage.recipe, stage.overrides)]
    return [resolved]


def recipe_digest(script: str, recipe: str, overrides: list[str]) -> str:
    """A digest of resolved_recipes, so that --reuse does not record a run of a recipe file
    edited since (nor one from before a schema key was added: re-run that row)."""
    texts = [OmegaConf.to_yaml(OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(r))))
             for r in resolved_recipes(script, recipe, overrides)]
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


def finished_run(out: Path, command: str, digest: str) -> dict | None:
    """A run of exactly `command` and resolved recipe `digest` that already finished in `out`
    (--reuse), with the timing this script measured. A run of a recipe edited since, or recorded
    without its digest, is not reused: its row is run again."""
    metrics, timing_file = final_stage(out) / "metrics.json", out / "quality_timing.json"
    if not metrics.is_file() or not timing_file.is_file():
        return None
    timing = json.loads(timing_file.read_text())
    if timing.get("command") != command or timing.get("recipe_digest") != digest:
        return None
    return {"metrics": json.loads(metrics.read_text()), **timing,
            "run_file": str(final_stage(out) / "eval" / "run.trec")}


def run_script(script: str, recipe: str, out: Path, overrides: list[str], ns) -> dict:
    """One run in a subprocess; its final metrics.json plus wall and CPU seconds."""
    cmd = [sys.executable, str(REPO / script), "--recipe", recipe, f"train.output_dir={out}",
           "train.overwrite_output_dir=true", *overrides]
    command = " ".join(cmd[1:])
    print("$", command, flush=True)
    if ns.dry_run:
        return {"command": command}
    digest = recipe_digest(script, recipe, cmd[cmd.index(recipe) + 1:])
    done = finished_run(out, command, digest) if ns.reuse else None
    if done is None:
        cpu, start = children_cpu_s(), time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode:
            raise SystemExit(f"{script} --recipe {recipe} failed ({proc.returncode})")
        timing = {"wall_s": round(time.perf_counter() - start, 1),
                  "cpu_s": round(children_cpu_s() - cpu, 1), "command": command,
                  "recipe_digest": digest}
        (out / "quality_timing.json").write_text(json.dumps(timing))
        done = finished_run(out, command, digest)
        if done is None:  # a table row without its numbers would hide the failure
            raise SystemExit(f"{script} --recipe {recipe} wrote no metrics.json under {out}")
    metrics = done.pop("metrics")
    return {**done, "command": command, **{m: metrics.get(m) for m in MEASURES}}


def finetune(name: str, recipe: str, overrides: list[str], ns) -> dict:
    return run_script("finetune/run.py", recipe, RUNS / name,
                      [f"data.path={ns.data}", f"eval.data={ns.data}", *overrides], ns)


def recipe_seeds(ns, script: str, recipe: str) -> list[tuple[int, list[str]]]:
    """(seed, overrides) per --seeds value (default: the recipe's own train.seed) for a section
    whose first rows ran with the recipe's seed: that seed is not named on the command, so those
    runs' commands, and --reuse of them, stay as they were."""
    own = load_script_recipe(script, recipe).train.seed
    return [(seed, [] if seed == own else [f"train.seed={seed}"]) for seed in ns.seeds or [own]]


def seed_suffix(seed: int, own: list[str]) -> str:
    return f"_s{seed}" if own else ""  # the recipe's own seed keeps its first run folder


def start_model_dev(ns, seed: int, out: Path) -> dict:
    """The start model, untrained, on the dev split and the corpus slice of training seed `seed`
    (the Trainer's evaluator, seeded as a training run of that seed is), with its run file: a
    row the dev runs of the same seed can be compared with query by query. --reuse: the saved
    run of an earlier call."""
    if ns.dry_run:
        print(f"$ (in process) {MODEL} on the dev split, corpus slice of seed {seed}")
        return {}
    saved = out / "metrics.json"
    if ns.reuse and saved.is_file() and (out / "run.trec").is_file():
        earlier = json.loads(saved.read_text())
        if earlier.get("slice_seed") == seed:
            return {**{m: earlier["metrics"][m] for m in MEASURES}, **earlier["quality_timing"],
                    "run_file": str(out / "run.trec")}

    recipe = load_recipe(FinetuneRecipe, "fewshot", [f"data.path={ns.data}",
                                                     f"eval.data={ns.data}", *DEV_EVAL])
    start, cpu = time.perf_counter(), time.process_time()
    evaluate = DenseEvaluator(recipe.eval, seed=seed)
    evaluate(Encoder.load(MODEL))
    timing = {"wall_s": round(time.perf_counter() - start, 1),
              "cpu_s": round(time.process_time() - cpu, 1)}
    write_outputs(evaluate.last, out, overwrite=True, data=evaluate.data,
                  extra={"slice_seed": seed, "quality_timing": timing})
    return {**{m: evaluate.last.metrics[m] for m in MEASURES}, **timing,
            "run_file": str(out / "run.trec")}
