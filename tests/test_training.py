"""The shared training loop, driven through a toy stage (tests/scripts/toy_train.py) in real
subprocesses: outputs, exact resume after SIGKILL, 2 processes == 1 process with the doubled batch,
run-directory protection, non-finite losses."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.dist_utils import launch_prefix, run_to_end

REPO = Path(__file__).resolve().parents[1]
TOY = str(REPO / "tests" / "scripts" / "toy_train.py")
BASE = ["train.log_every=1", "train.lr=1e-3", "train.warmup_steps=2", "n_pairs=48"]


def run_toy(out, *overrides, resume=False, processes=1, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    args = ["--recipe", "none", f"train.output_dir={out}", *BASE, *overrides]
    if resume:
        args.append("--resume")
    proc = run_to_end([*launch_prefix(processes), TOY, *args], env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"toy run failed:\n{proc.stderr[-4000:]}")
    return proc


def weights(out):
    return load_file(str(Path(out) / "model" / "model.safetensors"))


def assert_same_weights(a, b, atol=0.0):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= atol, f"weights differ by {worst}"


def test_run_writes_outputs_and_rotates_checkpoints(tmp_path):
    out = tmp_path / "run"
    run_toy(out, "train.max_steps=6", "train.per_device_batch_size=8", "train.save_every=2",
            "train.keep_last=2")
    assert (out / "recipe.yaml").read_text().count("max_steps: 6") == 1
    info = json.loads((out / "run_info.json").read_text())
    assert info["torch"] == torch.__version__ and "git_commit" in info
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step-00000004", "step-00000006"]  # step 2 rotated away
    state = json.loads((out / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    assert state["step"] == 6
    assert (out / "model" / "modules.json").is_file()
    assert list((out / "logs").rglob("events.out.tfevents*"))


def test_existing_run_dir_is_refused_then_overwritten_only_on_request(tmp_path):
    out = tmp_path / "run"
    run_toy(out, "train.max_steps=2", "train.per_device_batch_size=8")
    proc = run_toy(out, "train.max_steps=2", "train.per_device_batch_size=8", check=False)
    assert proc.returncode != 0
    assert "--resume" in proc.stderr and "train.overwrite_output_dir=true" in proc.stderr
    run_toy(out, "train.max_steps=2", "train.per_device_batch_size=8",
            "train.overwrite_output_dir=true")


def test_second_run_on_a_locked_dir_is_refused(tmp_path):
    from twotower.common.train.rundir import RunDirError, RunLock

    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):
        with pytest.raises(RunDirError, match="another run"):
            with RunLock(out):
                pass
        proc = run_toy(out, "train.max_steps=1", "train.per_device_batch_size=8", resume=True,
                       check=False)
        assert proc.returncode != 0 and "another run" in proc.stderr


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    common = ["train.max_steps=8", "train.per_device_batch_size=8", "train.save_every=3"]
    straight = tmp_path / "straight"
    run_toy(straight, *common)

    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, TOY, "--recipe", "none", f"train.output_dir={killed}",
                             *BASE, *common, "sleep_per_step=0.4"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "checkpoints" / "step-00000003" / "COMPLETE"
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "the run never wrote its step-3 checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists(), "killed too late: the run had finished"

    # the same recipe as the killed run (a changed recipe is refused on resume)
    run_toy(killed, *common, "sleep_per_step=0.4", resume=True)
    assert_same_weights(straight, killed, atol=0.0)
    a = torch.load(straight / "checkpoints" / "step-00000008" / "optimizer.bin", weights_only=False)
    b = torch.load(killed / "checkpoints" / "step-00000008" / "optimizer.bin", weights_only=False)
    for key, sa in a["state"].items():
        assert torch.equal(sa["exp_avg"], b["state"][key]["exp_avg"])
        assert torch.equal(sa["exp_avg_sq"], b["state"][key]["exp_avg_sq"])


def test_two_processes_equal_one_process_with_doubled_batch(tmp_path):
    run_toy(tmp_path / "one", "train.max_steps=3", "train.per_device_batch_size=8")
    run_toy(tmp_path / "two", "train.max_steps=3", "train.per_device_batch_size=4", processes=2)
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=2e-5)
    # and a different batch really changes the result (the comparison can fail)
    run_toy(tmp_path / "other", "train.max_steps=3", "train.per_device_batch_size=4")
    with pytest.raises(AssertionError):
        assert_same_weights(tmp_path / "one", tmp_path / "other", atol=2e-5)


def test_nonfinite_loss_stops_without_checkpoint_or_is_skipped(tmp_path):
    out = tmp_path / "nan"
    proc = run_toy(out, "train.max_steps=5", "train.per_device_batch_size=8", "train.save_every=1",
                   "nan_at_step=3", check=False)
    assert proc.returncode != 0
    assert "non-finite loss" in proc.stderr and "step 3" in proc.stderr and "batch ids" in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000001", "step-00000002"]
    skipped = tmp_path / "skip"
    run_toy(skipped, "train.max_steps=5", "train.per_device_batch_size=8", "nan_at_step=3",
            "train.nonfinite_loss=skip")
    state = json.loads((skipped / "checkpoints" / "step-00000005" / "trainer_state.json").read_text())
    assert state["skipped_nonfinite"] == 1 and state["step"] == 5


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
    """Steps a killed run logged after its last checkpoint are logged again on resume; reading the
    whole log folder (as tensorboard does) must show each step once, with the resumed values.
    The kill is simulated deterministically: a run logs steps 1-3, its step-3 checkpoint is
    removed (as if the process died before writing it), and the resume goes on from step 2."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    common = ["train.per_device_batch_size=8", "train.save_every=2", "train.keep_last=5"]
    run_toy(out, "train.max_steps=3", *common)
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    run_toy(out, "train.max_steps=4", *common, resume=True)
    files = list((out / "logs").rglob("events.out.tfevents*"))
    assert len(files) == 2 and len({f.parent for f in files}) == 1
    events = EventAccumulator(str(files[0].parent), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == [1, 2, 3, 4]
    resumed = EventAccumulator(str(max(files, key=lambda f: float(f.name.split(".")[3]))),
                               size_guidance={"scalars": 0})
    resumed.Reload()
    assert {e.step: e.value for e in resumed.Scalars("train/loss")} == {
        e.step: e.value for e in events.Scalars("train/loss") if e.step >= 3}


def test_skip_mode_drops_the_whole_accumulated_step(tmp_path):
    """With gradient accumulation, a non-finite micro-batch skips its whole optimizer step: a NaN
    in the first or in the last micro-batch of step 2 gives the same weights (before, a NaN in
    the first one was dropped alone and step 2 was taken from the second micro-batch), and the
    method hears of the skip (MoCo discards that step's keys)."""
    runs = {}
    for at in (3, 4):  # micro-batches 3 and 4 make up step 2
        runs[at] = tmp_path / f"nan{at}"
        run_toy(runs[at], "train.max_steps=3", "train.per_device_batch_size=4",
                "train.gradient_accumulation_steps=2", f"nan_at_step={at}",
                "train.nonfinite_loss=skip")
        final = load_file(str(runs[at] / "checkpoints" / "step-00000003" / "model.safetensors"))
        assert int(final["skipped_steps"]) == 1 and int(final["forward_calls"]) == 8
    assert_same_weights(runs[3], runs[4])
    clean = tmp_path / "clean"  # and the skip mattered: without it the weights differ
    run_toy(clean, "train.max_steps=3", "train.per_device_batch_size=4",
            "train.gradient_accumulation_steps=2")
    with pytest.raises(AssertionError):
        assert_same_weights(runs[3], clean)


def _tiny_beir(folder: Path) -> Path:
    from tests.scripts.toy_train import WORDS

    (folder / "qrels").mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": f"about {WORDS[i % 20]}"}) + "\n")
    with open(folder / "queries.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"_id": f"q{i}", "text": f"{WORDS[i]} question"}) + "\n")
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(10)))
    return folder


def test_periodic_evaluation_and_diagnostics_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = _tiny_beir(tmp_path / "beir")
    out = tmp_path / "run"
    run_toy(out, "train.max_steps=4", "train.per_device_batch_size=8", "train.eval_every=2",
            f"eval.data={data}", "eval.before_training=true")
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent),
                              size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    ndcg = events.Scalars("eval/nDCG@10")
    assert [e.step for e in ndcg] == [0, 2, 4]
    assert all(0.0 <= e.value <= 1.0 for e in ndcg)
    assert any(t.startswith("diagnostics/") for t in events.Tags()["scalars"])
    assert "diagnostics/overview" in events.Tags()["images"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["nDCG@10"] == pytest.approx(ndcg[-1].value)
    # the final evaluation's reports sit beside its metrics: recipe, best/worst queries
    report = json.loads((out / "eval" / "metrics.json").read_text())
    assert report["metrics"]["nDCG@10"] == pytest.approx(metrics["nDCG@10"]) and report["step"] == 4
    html = (out / "eval" / "report.html").read_text()
    assert "eval_every: 2" in html and "data:image/png;base64," in html
    assert "## Worst queries by nDCG@10" in (out / "eval" / "report.md").read_text()


def test_epochs_set_the_number_of_steps(tmp_path):
    from twotower.common.recipe.args import TrainArgs
    from twotower.common.train.epochs import steps_for_epochs

    args = TrainArgs(per_device_batch_size=8, epochs=2.5)
    assert steps_for_epochs(args, 48) == 15  # 6 full batches per epoch
    assert steps_for_epochs(args, 50) == 15  # the incomplete batch is dropped
    assert steps_for_epochs(args, 48, processes=2) == 8  # ceil(2.5 x 3)
    with pytest.raises(ValueError, match="do not fill one step"):
        steps_for_epochs(args, 7)
    floor = TrainArgs(per_device_batch_size=8, epochs=2.5, min_steps=20)
    assert steps_for_epochs(floor, 48) == 20  # a small set: more passes
    assert steps_for_epochs(floor, 96) == 30  # a large one: the epochs decide
    out = tmp_path / "run"
    run_toy(out, "train.max_steps=1000", "train.epochs=2", "train.per_device_batch_size=8")
    state = json.loads(next((out / "checkpoints").iterdir()).joinpath("trainer_state.json").read_text())
    # 48 pairs / 8 = 6 steps per epoch; the run stops inside epoch index 1 (the second)
    assert state["step"] == 12 and state["epoch"] == 1
    capped = tmp_path / "capped"  # train.max_steps stays a cap
    run_toy(capped, "train.max_steps=5", "train.epochs=2", "train.per_device_batch_size=8")
    state = json.loads(next((capped / "checkpoints").iterdir()).joinpath("trainer_state.json").read_text())
    assert state["step"] == 5
    floored = tmp_path / "floored"  # train.min_steps: 2 epochs of 6 steps would be 12
    run_toy(floored, "train.max_steps=1000", "train.epochs=2", "train.min_steps=15",
            "train.per_device_batch_size=8")
    state = json.loads(next((floored / "checkpoints").iterdir()).joinpath("trainer_state.json").read_text())
    assert state["step"] == 15 and state["epoch"] == 2  # into a third pass over the data
