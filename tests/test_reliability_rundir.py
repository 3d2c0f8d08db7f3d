"""Output directories beyond refusal and the lock (tests/test_training.py): --resume with a recipe
that trains something else than the run's checkpoints is refused, naming the keys and the flag
that accepts the change; run-control keys (max_steps, logging, saving, evaluation) may change."""
import pytest

from tests.test_training import run_toy, weights
from twotower.common.train.rundir import RunDirError, check_resumed_recipe, recipe_differences

STEPS = ["train.per_device_batch_size=8", "train.save_every=1"]


def test_recipe_differences_lists_dotted_keys():
    old = "model:\n  name_or_path: a\n  config_overrides: {}\ntrain:\n  lr: 0.1\n  seed: 1\n"
    new = "model:\n  name_or_path: b\n  config_overrides: {layers: 1}\ntrain:\n  lr: 0.1\n"
    assert recipe_differences(old, new) == ["model.config_overrides", "model.config_overrides.layers",
                                             "model.name_or_path", "train.seed"]
    assert recipe_differences(old, old) == []


def test_check_resumed_recipe_blocks_training_keys_only(tmp_path):
    saved = tmp_path / "recipe.yaml"
    saved.write_text("train:\n  lr: 0.1\n  max_steps: 5\neval:\n  data: x\n")
    assert check_resumed_recipe(saved, "train:\n  lr: 0.1\n  max_steps: 9\neval:\n  data: y\n",
                                False) == ["eval.data", "train.max_steps"]
    with pytest.raises(RunDirError, match=r"in train.lr\. .*train.allow_recipe_change=true"):
        check_resumed_recipe(saved, "train:\n  lr: 0.2\n  max_steps: 5\neval:\n  data: x\n", False)
    assert check_resumed_recipe(saved, "train:\n  lr: 0.2\n  max_steps: 5\neval:\n  data: x\n",
                                True) == ["train.lr"]


def test_resume_with_a_changed_recipe_is_refused_unless_accepted(tmp_path):
    out = tmp_path / "run"
    run_toy(out, "train.max_steps=2", *STEPS)
    before = weights(out)
    proc = run_toy(out, "train.max_steps=4", "train.lr=0.5", "temperature=0.1", *STEPS,
                   resume=True, check=False)
    assert proc.returncode != 0
    assert "differs from the one this run started with" in proc.stderr
    assert "temperature, train.lr." in proc.stderr  # the training keys, not train.max_steps
    assert "train.allow_recipe_change=true" in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001",
                                                                   "step-00000002"]
    assert all((before[k] == weights(out)[k]).all() for k in before)  # nothing was trained
    assert "lr: 0.001" in (out / "recipe.yaml").read_text()
    # extending the run (train.max_steps) is a run-control change: allowed
    run_toy(out, "train.max_steps=3", *STEPS, resume=True)
    # and a training change is accepted with the flag, then recorded in recipe.yaml
    run_toy(out, "train.max_steps=4", "train.lr=0.5", *STEPS, "train.allow_recipe_change=true",
            resume=True)
    assert "lr: 0.5" in (out / "recipe.yaml").read_text()
    assert (out / "checkpoints" / "step-00000004" / "COMPLETE").is_file()


# ------------------------------------------------- train.overwrite_output_dir never destroys
TOY = ["train.per_device_batch_size=8", "train.max_steps=1"]


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_overwrite_never_deletes_a_live_run(tmp_path):
    """Before: the folder was removed *before* the lock was taken, so a second run with
    overwrite_output_dir=true deleted the first's checkpoints while it trained."""
    from twotower.common.train.rundir import RunLock

    out = tmp_path / "run"
    run_toy(out, *TOY, "train.save_every=1")
    before = snapshot(out)
    with RunLock(out):  # the first run, still training
        proc = run_toy(out, *TOY, "train.overwrite_output_dir=true", check=False)
        assert proc.returncode != 0 and "another run" in proc.stderr
        assert snapshot(out) == before


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    data = tmp_path / "data"
    (data / "qrels").mkdir(parents=True)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "my notes.txt"):
        (data / name).write_text(f"the user's {name}\n")
    before = snapshot(data)
    proc = run_toy(data, *TOY, "train.overwrite_output_dir=true", check=False)
    assert proc.returncode != 0
    assert "holds 'corpus.jsonl', which no twotower run writes (and 3 more)" in proc.stderr
    assert snapshot(data) == before and not (data / ".lock").exists()
    # a run folder the user added a file to is not deleted either: the file is named
    out = tmp_path / "run"
    run_toy(out, *TOY)
    (out / "notes.md").write_text("why I ran this")
    proc = run_toy(out, *TOY, "train.overwrite_output_dir=true", check=False)
    assert proc.returncode != 0 and "holds 'notes.md'" in proc.stderr
    assert (out / "notes.md").read_text() == "why I ran this" and (out / "model").is_dir()
    # run output without the files a run writes first is not provably a run: kept
    models = tmp_path / "models"
    (models / "model").mkdir(parents=True)
    (models / "model" / "config.json").write_text("{}")
    proc = run_toy(models, *TOY, "train.overwrite_output_dir=true", check=False)
    assert proc.returncode != 0 and "not provably a twotower run folder" in proc.stderr
    assert (models / "model" / "config.json").read_text() == "{}"


def test_overwrite_replaces_a_finished_run(tmp_path):
    out = tmp_path / "run"
    run_toy(out, *TOY, "train.save_every=1", "train.seed=1")
    first = weights(out)
    run_toy(out, *TOY, "train.overwrite_output_dir=true", "train.seed=2")
    assert not all((first[k] == weights(out)[k]).all() for k in first)
    assert "seed: 2" in (out / "recipe.yaml").read_text()


def test_a_run_failed_before_its_first_checkpoint_does_not_block_its_rerun(tmp_path):
    """What a failed start leaves (recipe.yaml, run_info.json, logs/) used to refuse the
    corrected rerun ('already holds a run') and --resume ('the recipe differs')."""
    out = tmp_path / "run"
    proc = run_toy(out, *TOY, "nan_at_step=1", check=False)
    assert proc.returncode != 0 and "non-finite loss" in proc.stderr
    assert (out / "recipe.yaml").is_file() and not (out / "checkpoints").exists()
    run_toy(out, *TOY)  # the corrected rerun, no flag
    assert "nan_at_step: 0" in (out / "recipe.yaml").read_text() and (out / "model").is_dir()
    out2 = tmp_path / "run2"
    run_toy(out2, *TOY, "nan_at_step=1", check=False)
    run_toy(out2, *TOY, resume=True)  # --resume with no checkpoint starts, whatever changed
    assert (out2 / "model").is_dir()
