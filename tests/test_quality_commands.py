"""benchmarks/quality.py --dry-run: every training command of every section names a recipe whose
overrides load (an unknown key or a bad value in a benchmark's overrides fails here, in seconds,
not hours into `make bench`)."""
import json
import os
import shlex
import subprocess
from argparse import Namespace
from pathlib import Path

import pytest

from benchmarks.quality import SECTIONS, main, recipe_digest
from twotower.common.recipe.config import load_recipe
from twotower.finetune.args import FinetuneRecipe


def test_every_section_command_loads_its_recipe(tmp_path, monkeypatch, capsys):
    data = os.environ.get("TWOTOWER_DATA", "")
    sections = sorted(SECTIONS)
    if not (Path(data) / "msmarco_sample").is_dir():
        sections.remove("other_corpus")  # reads the other corpus's layout even in a dry run
        monkeypatch.setenv("TWOTOWER_DATA", str(tmp_path))
    assert main([*sections, "--seeds", "42", "1", "--dry-run"]) == 0
    commands = [shlex.split(line[2:]) for line in capsys.readouterr().out.splitlines()
                if line.startswith("$ ") and " --recipe " in line]
    scripts = {Path(cmd[0]).parent.name for cmd in commands}
    assert {"finetune", "pretrain"} <= scripts and len(commands) >= 40
    checked = st_checked = 0
    for cmd in commands:
        script = f"{Path(cmd[0]).parent.name}/{Path(cmd[0]).name}"
        recipe = cmd[cmd.index("--recipe") + 1]
        if script == "benchmarks/quality_st.py":  # its own flags, then the recipe's overrides
            overrides = cmd[cmd.index("--data") + 2:]
            loaded = load_recipe(FinetuneRecipe, recipe, overrides)
            st_checked += 1
            assert ("train.lr=2e-5" in overrides) == (loaded.train.lr == 2e-5)
            continue
        recipe_digest(script, recipe, cmd[cmd.index("--recipe") + 2:])  # loads it (and a stage's)
        checked += 1
    assert checked >= 40 and st_checked == 6  # fewshot's, st_same's and st_reference_lr's, 2 seeds each


def test_start_model_dev_rows_are_saved_with_their_run_and_reused_only_for_the_same_slice(
        tmp_path, monkeypatch):
    """quality.start_model_dev (the label-free ablation's "no training" row): the start
    model on the dev split of a seed's corpus slice, its run file written for the paired test;
    --reuse records the saved row of the same slice without encoding, another seed encodes."""
    import benchmarks.quality as quality
    from benchmarks.quality import start_model_dev
    from twotower.common.model.encoder import Encoder, tiny_bert

    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": f"d{i}", "title": "", "text": f"topic {i} words {i % 7}"}) + "\n"
        for i in range(130)))
    (beir / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"q{i}", "text": f"topic {i}"}) + "\n" for i in range(120)))
    (beir / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t1\n" for i in range(120)))  # 120 judged: the dev split holds out 100
    tiny_bert(dropout=0.0, normalize=True).save(tmp_path / "model")
    monkeypatch.setattr(quality, "MODEL", str(tmp_path / "model"))
    ns = Namespace(data=str(beir), dry_run=False, reuse=True)
    row = start_model_dev(ns, 42, tmp_path / "out")
    assert 0.0 <= row["nDCG@10"] <= 1.0 and Path(row["run_file"]).is_file() and "wall_s" in row

    def no_encoding(*args, **kwargs):
        raise AssertionError("--reuse encoded again")
    with monkeypatch.context() as patched:
        patched.setattr(Encoder, "load", no_encoding)
        assert start_model_dev(ns, 42, tmp_path / "out") == row
        with pytest.raises(AssertionError, match="encoded again"):  # another seed's slice
            start_model_dev(ns, 1, tmp_path / "out")


def test_reuse_records_a_finished_run_only_for_the_same_command_and_recipe(tmp_path, monkeypatch):
    """--reuse: a run of a recipe edited since (another resolved recipe for the same command) is
    trained again, not recorded with its old numbers; without --reuse every row trains."""
    import benchmarks.quality as quality

    trained = []

    def fake_training(cmd, **kwargs):  # what finetune/run.py leaves in its output folder
        out = Path(next(a.split("=", 1)[1] for a in cmd if a.startswith("train.output_dir=")))
        (out / "eval").mkdir(parents=True, exist_ok=True)
        trained.append(out)
        (out / "metrics.json").write_text(json.dumps({"nDCG@10": len(trained) / 10, "R@100": 1}))
        return subprocess.CompletedProcess(cmd, 0)
    monkeypatch.setattr(quality.subprocess, "run", fake_training)
    stage = tmp_path / "stage.yaml"  # the recipe file of a pretraining stage counts too
    stage.write_text("base: domain_pretrain\ntrain:\n  lr: 1.0e-5\n")

    def run(reuse=True):
        return quality.run_script("finetune/run.py", "domain_adapt", tmp_path / "run",
                                  [f"pretrain.recipe={stage}"], Namespace(dry_run=False, reuse=reuse))
    first = run()
    assert first["nDCG@10"] == 0.1 and first["run_file"].endswith("eval/run.trec")
    assert run() == first and len(trained) == 1  # same command, same recipe: recorded
    stage.write_text("base: domain_pretrain\ntrain:\n  lr: 3.0e-5\n")  # edited since
    assert run()["nDCG@10"] == 0.2 and len(trained) == 2
    assert run(reuse=False)["nDCG@10"] == 0.3
    digest = json.loads((tmp_path / "run" / "quality_timing.json").read_text())["recipe_digest"]
    assert digest == quality.recipe_digest("finetune/run.py", "domain_adapt",
                                           [f"pretrain.recipe={stage}"])
