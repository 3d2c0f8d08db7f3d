"""Output directories beyond refusal and the lock (tests/test_training.py): --resume with a recipe
that trains something else than the run's checkpoints is refused, naming the keys and the flag
that accepts the change; run-control keys (max_steps, logging, saving, evaluation) may change."""
import pytest

from common.rundir import RunDirError, check_resumed_recipe, recipe_differences
from tests.test_training import run_toy, weights

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
