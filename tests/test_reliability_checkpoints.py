"""Atomic checkpoints: a process SIGKILLed while it is inside `accelerator.save_state` leaves a
`.partial-step-*` folder without COMPLETE; the previous checkpoint is still there and intact
(rotation waits for the new one to be complete), --resume ignores the partial folder and continues
from the previous checkpoint, and the result equals an uninterrupted run bit for bit."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.test_reliability_resume import losses_by_file
from tests.test_training import BASE, REPO, assert_same_weights, run_toy
from twotower.common.train.rundir import complete_checkpoints

SLOW_SAVE = str(REPO / "tests" / "scripts" / "slow_save_train.py")
COMMON = ["train.max_steps=6", "train.per_device_batch_size=8", "train.save_every=1",
          "train.keep_last=1"]


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "TWOTOWER_TEST_SLOW_SAVE_STEP": "4"}  # same threads as run_toy: same float sums
    proc = subprocess.Popen([sys.executable, SLOW_SAVE, "--recipe", "none",
                             f"train.output_dir={killed}", *BASE, *COMMON], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_toy(straight, *COMMON)  # meanwhile, the reference run
    partial = killed / "checkpoints" / ".partial-step-00000004"
    deadline = time.time() + 240
    while not (partial / "STALLED").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert (partial / "STALLED").exists(), proc.communicate()[1][-3000:]
    # inside save_state of step 4: step 3 is complete and still there (keep_last=1 rotated 2)
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert names == [".partial-step-00000004", "step-00000003"]
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    assert (partial / "model.safetensors").is_file() and not (partial / "COMPLETE").exists()
    assert [p.name for p in complete_checkpoints(killed)] == ["step-00000003"]
    previous = load_file(str(killed / "checkpoints" / "step-00000003" / "model.safetensors"))
    assert int(previous["forward_calls"]) == 3  # the previous checkpoint is readable and whole

    run_toy(killed, *COMMON, resume=True)
    # resume started from step 3 (its log file holds steps 4-6 only), not from the partial step 4
    assert sorted(losses_by_file(killed)[-1]) == [4, 5, 6]
    assert_same_weights(straight, killed, atol=0.0)
    a = load_file(str(straight / "checkpoints" / "step-00000006" / "model.safetensors"))
    b = load_file(str(killed / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the stale partial folder is cleaned up once a new checkpoint is complete; rotation kept 1
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-00000006"]


def test_incomplete_checkpoint_folders_are_never_resumed_from(tmp_path):
    """A later folder without COMPLETE (hand-made: a crash of a different kind, a copy cut short)
    is not taken for the latest checkpoint."""
    out = tmp_path / "run"
    run_toy(out, "train.max_steps=2", "train.per_device_batch_size=8", "train.keep_last=3")
    fake = out / "checkpoints" / "step-00000009"
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"\x00garbage")
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000002"]
    run_toy(out, "train.max_steps=4", "train.per_device_batch_size=8", "train.keep_last=3",
            resume=True)
    assert sorted(losses_by_file(out)[-1]) == [3, 4]  # continued from step 2, garbage ignored


def test_resume_from_a_checkpoint_at_the_end_of_an_epoch(tmp_path):
    """48 pairs / batch 8 = 6 batches: the step-6 checkpoint sits at the end of epoch 0, so the
    resumed loader of epoch 0 is empty and the run must go on with epoch 1, as the straight run.
    (A constant schedule: extending max_steps would otherwise change a decaying learning rate.)"""
    fixed = ["train.per_device_batch_size=8", "train.scheduler=constant"]
    run_toy(tmp_path / "straight", "train.max_steps=8", *fixed)
    out = tmp_path / "extended"
    run_toy(out, "train.max_steps=6", *fixed)
    state = (out / "checkpoints" / "step-00000006" / "trainer_state.json").read_text()
    assert '"batches_in_epoch": 6' in state and '"epoch": 0' in state
    run_toy(out, "train.max_steps=8", *fixed, resume=True)
    assert_same_weights(tmp_path / "straight", out, atol=0.0)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl"])
def test_a_damaged_checkpoint_is_named_and_the_previous_one_resumed(tmp_path, name):
    """The newest COMPLETE checkpoint with one file cut in half (a copy cut short): before, a raw
    safetensors/pickle error without the path. Now: named, the previous checkpoint resumed, and
    the result is the uninterrupted run's."""
    fixed = ["train.per_device_batch_size=8", "train.save_every=1", "train.keep_last=2"]
    run_toy(tmp_path / "straight", "train.max_steps=5", *fixed)
    out = tmp_path / "run"
    run_toy(out, "train.max_steps=5", *fixed)
    shutil.rmtree(out / "model")  # as if killed after the step-5 checkpoint
    victim = out / "checkpoints" / "step-00000005" / name
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    proc = run_toy(out, "train.max_steps=5", *fixed, resume=True)
    assert f"{victim}: " in proc.stderr and "resuming from" in proc.stderr
    assert sorted(losses_by_file(out)[-1]) == [5]  # step 5 trained again, from step 4
    assert_same_weights(tmp_path / "straight", out, atol=0.0)


def test_no_readable_checkpoint_is_an_error_naming_the_file(tmp_path):
    out = tmp_path / "run"
    run_toy(out, "train.max_steps=2", "train.per_device_batch_size=8", "train.keep_last=1")
    victim = out / "checkpoints" / "step-00000002" / "model.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])
    proc = run_toy(out, "train.max_steps=3", "train.per_device_batch_size=8", resume=True,
                   check=False)
    assert proc.returncode != 0
    assert "no checkpoint of" in proc.stderr and f"{victim}: " in proc.stderr


def test_a_model_that_is_not_finite_is_never_written(tmp_path):
    """lr 1e30: one step leaves finite weights of ~1e30 whose embeddings are NaN. Before: exit 0
    and that model saved as the run's result."""
    out = tmp_path / "run"
    proc = run_toy(out, "train.max_steps=1", "train.per_device_batch_size=8", "train.lr=1e30",
                   "train.warmup_steps=0", "train.max_grad_norm=0", check=False)
    assert proc.returncode != 0 and "is not finite" in proc.stderr
    assert not (out / "model").exists() and not complete_checkpoints(out)
