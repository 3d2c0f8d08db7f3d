"""Rehearse every committed GPU recipe (recipes/*.yaml without `_cpu`) on this CPU machine.

    python -m benchmarks.rehearse [--recipes contriever gpl ...] [--work runs/rehearsal]

Each recipe file is used as committed, under `accelerate launch --multi_gpu --num_processes 2`
(gloo on CPU), substituting only what this machine cannot have, and printing each substitution:
hub model ids -> tiny random models of the same architecture class (benchmarks/synthetic_data.py),
$TWOTOWER_DATA -> synthetic data in the official layouts, step counts and sizes -> small
command-line overrides. Per recipe: an uninterrupted run (ran, steps, final loss finite), a run
SIGKILLed (its whole process group) after a COMPLETE checkpoint of its last training part and
resumed with --resume (final model and checkpoint tensors bit for bit equal to the
uninterrupted run's), and the exported <output_dir>/model loaded by
sentence_transformers.SentenceTransformer against the toolkit's own Encoder.encode (atol 1e-5).
The table is printed and written to benchmarks/results/rehearsal.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from twotower.common.model.encoder import DOC_TOWER_DIR, Encoder
from twotower.common.recipe.config import RecipeError, load_recipe
from twotower.common.train.rundir import checkpoint_dir
from twotower.finetune.args import FinetuneRecipe
from twotower.pretrain.args import PretrainRecipe

REPO = Path(__file__).resolve().parents[1]

from benchmarks import synthetic_data

RESULTS = REPO / "benchmarks" / "results" / "rehearsal.md"
PROCESSES = 2


@dataclass
class Sizes:
    steps: int = 10  # train.max_steps of every training part
    save_every: int = 3
    kill_after: int = 6  # SIGKILL once this checkpoint of the last part is COMPLETE
    batch: int = 4  # per device
    chunk_length: int = 64  # pretraining chunks
    timeout: float = 600.0  # per launch


@dataclass
class Row:
    recipe: str
    ran: str = "-"
    steps: str = "-"
    loss: str = "-"
    resume: str = "-"
    export: str = "-"
    wall: float = 0.0
    notes: list[str] = field(default_factory=list)

    def cells(self) -> list[str]:
        return [self.recipe, self.ran, self.steps, self.loss, self.resume, self.export,
                f"{self.wall:.0f}", "; ".join(self.notes)]

    @property
    def passed(self) -> bool:
        return all(c.startswith("ok") for c in (self.ran, self.loss, self.resume, self.export))


def committed_recipes() -> list[str]:
    return sorted(p.stem for p in (REPO / "recipes").glob("*.yaml") if "_cpu" not in p.stem)


def load(name: str, overrides=()):
    """(script, recipe object) of a recipe name: pretrain or finetune by its schema."""
    try:
        return "finetune/run.py", load_recipe(FinetuneRecipe, name, list(overrides))
    except RecipeError as first:
        try:
            return "pretrain/run.py", load_recipe(PretrainRecipe, name, list(overrides))
        except RecipeError:
            raise first from None


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def plan(name: str, models: Path, sizes: Sizes, say=print) -> tuple[str, list[str], list[str]]:
    """(script, overrides, parts) of a recipe: the substitutions, printed; parts are the
    training parts' folders relative to train.output_dir, in run order."""
    script, recipe = load(name)
    subs: list[tuple[str, str, str]] = []  # key, new value, why

    def model(key: str, value: str, role="model"):
        kind = synthetic_data.substitute_kind(value, role)
        if kind:
            path = synthetic_data.write_model(kind, models / kind)
            subs.append((key, str(path), f"{value} -> {synthetic_data.MODEL_KINDS[kind]}"))

    def scale(key: str, value):
        old = _get(recipe, key)
        if old != value:
            subs.append((key, str(value), f"{old} -> {value} (scaled down)"))

    model("model.name_or_path", recipe.model.name_or_path)
    common = [("train.max_steps", sizes.steps), ("train.per_device_batch_size", sizes.batch),
              ("train.save_every", sizes.save_every), ("train.log_every", 1),
              ("train.warmup_steps", min(recipe.train.warmup_steps, 2))]
    if getattr(recipe.train, "global_batch_size", 0):  # a global batch wins over per device
        common.append(("train.global_batch_size", sizes.batch * PROCESSES))
    for key, value in common:
        scale(key, value)
    if recipe.train.mixed_precision == "fp16":  # GPU only: the trainer refuses it on a CPU
        subs.append(("train.mixed_precision", "bf16", "fp16 -> bf16 (fp16 autocast needs a GPU)"))
    parts = [""]
    if script == "pretrain/run.py":
        for key, value in _pretrain_scaling(recipe, sizes):
            scale(key, value)
    else:
        if recipe.teacher.model:
            model("teacher.model", recipe.teacher.model, role="teacher")
        stages = recipe.stage_list()
        for sname, stage in stages:
            where = "data" if not recipe.stages else f"stages.{sname}.data"
            if stage.data.mine.model:
                model(f"{where}.mine.model", stage.data.mine.model)
            if not stage.data.path:  # gpl: the generated-query folder is the user's input
                subs.append((f"{where}.path", "gpl", "'' (GPL's generated queries, required) "
                             "-> synthetic gpl/ BEIR folder"))
        if recipe.stages or recipe.pretrain.recipe:
            parts = [f"stages/{s}" for s, _ in stages]
        if recipe.pretrain.recipe:  # domain_adapt: its pretraining run gets the same scaling
            _, pre = load(recipe.pretrain.recipe, recipe.pretrain.overrides)
            inner = [f"{k}={v}" for k, v in common + _pretrain_scaling(pre, sizes)
                     if _get(pre, k) != v and not (k == "train.global_batch_size"
                                                   and not getattr(pre.train, k[6:], 0))]
            subs.append(("pretrain.overrides", "[" + ", ".join(inner) + "]",
                         f"{recipe.pretrain.recipe} (model {pre.model.name_or_path} -> this "
                         "recipe's model.name_or_path) scaled down alike"))
            parts = ["pretrain"] + parts
    for key, value, why in subs:
        say(f"  {name}: {key}: {why}")
    return script, [f"{k}={v}" for k, v, _ in subs], parts


def _pretrain_scaling(recipe, sizes: Sizes) -> list[tuple[str, object]]:
    out = [("pairs.chunk_length", min(recipe.pairs.chunk_length, sizes.chunk_length))]
    if recipe.method.name == "moco":  # a queue that wraps within the run: 2.5 steps of keys
        keys = sizes.batch * PROCESSES * recipe.pairs.n_pairs
        out.append(("method.queue_size", keys * 5 // 2))
    return out


# ------------------------------------------------------------------------------- launching
def launch_prefix() -> list[str]:  # as tests/dist_utils.launch_prefix
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(PROCESSES), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
            "no", "--main_process_port", str(port)]


def start(script: str, name: str, overrides: list[str], out: Path, env: dict, resume=False):
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [*launch_prefix(), str(REPO / script), "--recipe", name, *overrides,
           f"train.output_dir={out}"] + (["--resume"] if resume else [])
    log = open(out.parent / ("resume.log" if resume else "run.log"), "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True), log


def wait(proc, log, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return 124
    finally:
        log.close()


def tail(out: Path, resume=False, n=1) -> str:
    """The last error-looking line of a launch's log, for the table."""
    lines = (out.parent / ("resume.log" if resume else "run.log")).read_text(errors="replace").splitlines()
    errors = [x for x in lines if re.search(r"\w+(Error|Exception): ", x)
              and "ChildFailedError" not in x]
    # a rank that crashed shows as "Connection closed by peer" in the others: name the cause
    causes = [x for x in errors if not re.search(r"closed by peer|remote worker crash", x)]
    errors = causes or errors or [x for x in lines if "Error" in x] or lines
    return " | ".join(x.strip()[:200] for x in errors[-n:])


def losses(part: Path) -> dict[int, float]:
    """train/loss per step of a training part (its newest tensorboard file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(part.glob("logs/**/events.out.tfevents*"),
                   key=lambda p: float(p.name.split(".")[3]))
    if not files:
        return {}
    acc = EventAccumulator(str(files[-1]), size_guidance={"scalars": 0})
    acc.Reload()
    if "train/loss" not in acc.Tags()["scalars"]:
        return {}
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def tensors_equal(a: Path, b: Path) -> str:
    """'' when every *.safetensors under folder a equals b's bit for bit, else the first difference."""
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    if not files:
        return f"no safetensors in {a}"
    for rel in files:
        if not (b / rel).is_file():
            return f"{rel} missing after resume"
        ta, tb = load_file(str(a / rel)), load_file(str(b / rel))
        if ta.keys() != tb.keys():
            return f"{rel}: different tensor names"
        for key in ta:
            if not torch.equal(ta[key], tb[key]):
                diff = (ta[key].double() - tb[key].double()).abs().max().item()
                return f"{rel}:{key} differs (max |diff| {diff:.2e})"
    return ""


def export_check(path: Path, texts: list[str]) -> str:
    """'' when SentenceTransformer(path) gives Encoder.load(path).encode's embeddings (1e-5)."""
    from sentence_transformers import SentenceTransformer

    enc = Encoder.load(str(path))
    for tower, folder in (("query", path), ("doc", path / DOC_TOWER_DIR)):
        folder = folder if folder.is_dir() else path
        st = SentenceTransformer(str(folder), device="cpu")
        kwargs = {"prompt_name": "document"} if tower == "doc" and st.prompts.get("document") else {}
        ours = enc.encode(texts, tower=tower, progress=False)
        theirs = st.encode(texts, convert_to_numpy=True, show_progress_bar=False, **kwargs)
        if ours.shape != theirs.shape:
            return f"{tower}: shape {ours.shape} vs ST {theirs.shape}"
        diff = float(np.abs(ours - theirs).max())
        if not diff <= 1e-5:
            return f"{tower} tower: max |ours - ST| {diff:.1e} ({folder.name})"
    return ""


def sample_texts(data: Path, n: int = 8) -> list[str]:
    """Short real texts (16 words: within every recipe's max_query_length, so both sides see
    the same tokens; the ST folder truncates at max_doc_length, the query tower earlier)."""
    rows = (data / "scifact" / "corpus.jsonl").read_text().splitlines()[:n]
    return [synthetic_data._words(json.loads(r)["text"], 16) for r in rows]


# ---------------------------------------------------------------------------------- driver
def rehearse_recipe(name: str, work: Path, data: Path, models: Path, sizes: Sizes,
                    say=print) -> Row:
    row, t0 = Row(name), time.time()
    try:
        script, overrides, parts = plan(name, models, sizes, say)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        row.ran, row.wall = f"FAIL plan: {type(exc).__name__}: {exc}"[:200], time.time() - t0
        return row
    env = {**os.environ, "TWOTOWER_DATA": str(data), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(work / "hf_datasets_cache"), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    shutil.rmtree(work / name, ignore_errors=True)
    straight, killed = work / name / "straight" / "run", work / name / "killed" / "run"
    say(f"  {name}: TWOTOWER_DATA -> {data} (synthetic); launch {PROCESSES} gloo processes")
    proc, log = start(script, name, overrides, straight, env)
    rc = wait(proc, log, sizes.timeout)
    row.ran = "ok" if rc == 0 else f"FAIL rc {rc}"
    if rc != 0:
        row.notes.append(tail(straight))
    curves = {p or "main": losses(straight / p) for p in parts}
    row.steps = ", ".join(f"{p.split('/')[-1]} {max(c) if c else 0}" if len(parts) > 1 else
                          str(max(c) if c else 0) for p, c in curves.items())
    finals = [c[max(c)] for c in curves.values() if c]
    if finals and len(finals) == len(parts):
        ok = all(math.isfinite(x) for c in curves.values() for x in c.values())
        row.loss = f"{'ok' if ok else 'FAIL'} {finals[-1]:.4g}"
    elif rc == 0:
        row.loss = "FAIL no train/loss logged"
    if rc == 0:
        try:
            problem = export_check(straight / "model", sample_texts(data))
            row.export = "ok" if not problem else "FAIL"
            if problem:
                row.notes.append(f"export: {problem}")
        except Exception as exc:  # noqa: BLE001
            row.export = "FAIL"
            row.notes.append(f"export: {type(exc).__name__}: {str(exc)[:150]}")
        row.resume = resume_check(script, name, overrides, parts, straight, killed, env, sizes, row)
    row.wall = time.time() - t0
    return row


def resume_check(script, name, overrides, parts, straight, killed, env, sizes, row) -> str:
    last = killed / parts[-1]
    marker = checkpoint_dir(last, sizes.kill_after) / "COMPLETE"
    proc, log = start(script, name, overrides, killed, env)
    deadline = time.time() + sizes.timeout
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # accelerate launch and both of its workers
    proc.wait()
    log.close()
    if not marker.exists():
        row.notes.append(f"resume: checkpoint {sizes.kill_after} never completed ({tail(killed)})")
        return "FAIL no checkpoint"
    if (last / "model").exists():
        return "n/a killed too late"
    proc, log = start(script, name, overrides, killed, env, resume=True)
    rc = wait(proc, log, sizes.timeout)
    if rc != 0:
        row.notes.append(f"resume rc {rc}: {tail(killed, resume=True)}")
        return "FAIL resume rc"
    final = checkpoint_dir(last, sizes.steps)
    problem = (tensors_equal(straight / "model", killed / "model")
               or tensors_equal(checkpoint_dir(straight / parts[-1], sizes.steps), final))
    if problem:
        a, b = losses(straight / parts[-1]), losses(last)  # b: the resumed part's own file
        first = next((s for s in sorted(b) if a.get(s) != b[s]), None)
        where = (f"logged loss first differs at step {first} ({a.get(first)} vs {b[first]})"
                 if first else "logged losses equal")
        row.notes.append(f"resume at {parts[-1] or 'run'} step {sizes.kill_after}: {problem}; "
                         f"{where}")
        return "FAIL differs"
    return f"ok (killed after step {sizes.kill_after})"


HEADER = ["recipe", "ran", "steps", "final loss finite", "SIGKILL+resume == straight",
          "ST export == Encoder", "wall s", "failure reasons"]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def rehearse(names: list[str], work: Path, sizes: Sizes = Sizes(), say=print) -> list[Row]:
    """The rehearsal of `names` in `work` (synthetic data and tiny models made once there)."""
    work = Path(work).resolve()
    say(f"synthetic data root: {synthetic_data.write_data(work / 'data')} (imitating "
        f"{synthetic_data.real_data()}'s corpora in the official layouts; see benchmarks/synthetic_data.py)")
    say(f"sizes: {sizes}")
    rows = []
    for name in names:
        say(f"== {name}")
        rows.append(rehearse_recipe(name, work, work / "data", work / "models", sizes, say))
        say(table(rows[-1:]).splitlines()[-1])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="*", default=None, help="default: every non-_cpu recipe")
    parser.add_argument("--work", default=str(REPO / "runs" / "rehearsal"))
    parser.add_argument("--steps", type=int, default=Sizes.steps)
    parser.add_argument("--kill-after", type=int, default=Sizes.kill_after)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    sizes = Sizes(steps=args.steps, kill_after=min(args.kill_after, args.steps - 1))
    t0, said = time.time(), []

    def say(line: str) -> None:
        print(line, flush=True)
        said.append(line)

    rows = rehearse(args.recipes or committed_recipes(), Path(args.work), sizes, say)
    subs = "\n".join(x for x in said if not x.startswith("|"))
    text = (f"# Rehearsal of the committed recipes\n\n`make rehearse` (benchmarks/rehearse.py): "
            f"{len(rows)} recipes, 2 gloo processes on CPU, {sizes.steps} steps per training "
            f"part, wall {time.time() - t0:.0f} s.\n\n{table(rows)}\n\n"
            f"Substitutions (as printed):\n\n```\n{subs}\n```\n")
    print("\n" + table(rows))
    print(f"\nwall {time.time() - t0:.0f} s; {sum(r.passed for r in rows)}/{len(rows)} pass")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
