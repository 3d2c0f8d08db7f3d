"""The sentence-transformers rows of benchmarks/quality.py: its trainer with MNRL on exactly the
triples of the `fewshot` recipe (benchmarks/quality_st.py, in a subprocess), at the recipe's
settings (section `fewshot`) or at the learning rate of the issue's reference run (section
`st_reference_lr`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from benchmarks.quality_report import MEASURES
from benchmarks.quality_runs import REPO, RUNS, children_cpu_s

ST_SAME = "sentence-transformers MNRL, same triples"
# the reference run (sentence-transformers MNRL, one BM25 negative of ranks 4-30, batch
# 32, lr 2e-5: 0.674 after 1 epoch, 0.699 after 3). 2e-5 is the old fit()'s default and that of
# sentence-transformers' training examples; SentenceTransformerTrainingArguments inherit
# transformers' 5e-5
ST_REFERENCE_LR = "sentence-transformers MNRL, same triples, lr 2e-5 (the issue's reference)"


def st_rows(ns, seed: int, folder: str, group: str, overrides: list[str] = ()) -> dict:
    """One seed of sentence-transformers' trainer on the `fewshot` triples of that seed; with
    --reuse, a run recorded with the same command is not trained again."""
    out = RUNS / folder
    cmd = [sys.executable, str(REPO / "benchmarks" / "quality_st.py"), "--recipe", "fewshot",
           "--output-dir", str(out), "--seed", str(seed), "--data", ns.data, *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    if ns.dry_run:
        return {}
    timing_file = out / "quality_timing.json"
    reusable = (ns.reuse and timing_file.is_file()
                and json.loads(timing_file.read_text()).get("command") == " ".join(cmd[1:]))
    if not reusable:
        cpu, start = children_cpu_s(), time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        timing_file.write_text(json.dumps({
            "wall_s": round(time.perf_counter() - start, 1),
            "cpu_s": round(children_cpu_s() - cpu, 1), "command": " ".join(cmd[1:])}))
    st = json.loads((out / "metrics.json").read_text())
    return {f"{group} (seed {seed})": {
        **{m: st["metrics"][m] for m in MEASURES}, **json.loads(timing_file.read_text()),
        "group": group, "seed": seed, "train_s": st.get("train_s"),
        "run_file": str(out / "run.trec")}}


def section_st_reference_lr(ns) -> dict:
    """sentence-transformers on the same triples, batch, steps and precision as `fewshot`, at
    lr 2e-5 instead of the recipe's dev-chosen 5e-5: one run per --seeds (default 0)."""
    rows = {}
    for seed in ns.seeds or [0]:
        rows.update(st_rows(ns, seed, f"st_mnrl_lr2e-5_s{seed}", ST_REFERENCE_LR,
                            ["train.lr=2e-5"]))
    return rows
