"""Several processes: refused when the launch would silently run one; killed together with the
launcher; resumed exactly.

Resume on 2 gloo processes, past the first epoch: a run stopped (or SIGKILLed, launcher and
workers together) inside epoch >= 1 and resumed with --resume ends bit for bit where the
uninterrupted run ends -- weights, AdamW moments and the logged loss.

Before the fix the resumed processes read epoch 0's order for the rest of the epoch they resumed
in: Accelerate's skip_first_batches wraps the sharded batch sampler one level deeper than its
set_epoch looks, so the sampler kept the epoch it was built with (1 process was exact, having
one wrapper less)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dist_utils import launch_prefix, run_to_end
from tests.test_reliability_resume import TINY_MODEL, WORDS, assert_identical_runs, env
from tests.test_training import assert_same_weights
from twotower.common.train.cli import LaunchError, check_launch
from twotower.common.train.guards import ShardingError, check_sharding
from twotower.common.train.rundir import complete_checkpoints

REPO = Path(__file__).resolve().parents[1]
N_QUERIES = 12  # per-device batch 2 x 2 processes: 3 steps an epoch


def write_folder(root: Path) -> Path:
    """A BEIR folder of 12 training queries, each with one judged document and 3 others."""
    root.mkdir(parents=True, exist_ok=True)
    docs, queries, qrels = [], [], []
    for i in range(N_QUERIES):
        a, b = WORDS[i % len(WORDS)], WORDS[(3 * i + 1) % len(WORDS)]
        queries.append({"_id": f"q{i}", "text": f"{a} {b} question {i}"})
        docs.append({"_id": f"p{i}", "title": "", "text": f"{a} and {b} answer {i} " * 3})
        docs += [{"_id": f"n{i}_{j}", "title": "", "text": f"{b} other {j} {i} {a}"} for j in range(3)]
        qrels.append(f"q{i}\tp{i}\t1")
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels").mkdir(exist_ok=True)
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(qrels) + "\n")
    return root


def finetune_cmd(data: Path, out: Path, max_steps: int, *extra: str) -> list[str]:
    return [*launch_prefix(2), str(REPO / "finetune/run.py"), "--recipe", "fewshot_cpu",
            *TINY_MODEL, f"data.path={data}", "data.max_queries=0", "data.n_negatives=1",
            "data.mine={retriever: bm25, depth: 20, skip_top: 0, window: 3, n: 3}",
            "model.max_doc_length=32", "train.per_device_batch_size=2", "train.log_every=1",
            "train.scheduler=constant", "train.warmup_steps=0", 'eval.data=""',
            f"train.max_steps={max_steps}", f"train.output_dir={out}", *extra]


def run_ok(cmd: list[str], what: str) -> None:
    done = run_to_end(cmd, timeout=400, env=env())
    assert done.returncode == 0, f"{what} failed:\n{done.stderr[-4000:]}"


@pytest.mark.parametrize("grad_cache", [0, 1])
def test_two_process_finetuning_resumed_inside_epoch_one_is_exact(tmp_path, grad_cache):
    data = write_folder(tmp_path / "data")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cache = f"train.grad_cache_chunk={grad_cache}"
    run_ok(finetune_cmd(data, straight, 8, "train.save_every=4", cache), "uninterrupted run")
    run_ok(finetune_cmd(data, resumed, 4, "train.save_every=4", cache), "first half")
    # step 4 = epoch 1, one batch in: the resumed processes skip one batch of epoch 1's order
    state = json.loads((complete_checkpoints(resumed)[-1] / "trainer_state.json").read_text())
    assert (state["epoch"], state["batches_in_epoch"]) == (1, 1)
    run_ok(finetune_cmd(data, resumed, 8, "train.save_every=4", cache, "--resume"), "resume")
    assert_identical_runs(straight, resumed, resume_step=4, max_steps=8)


def in_epoch_one(out: Path) -> bool:
    """A complete checkpoint of step 4 or later exists (keep_last rotates old ones away)."""
    return any(int(p.name.split("-")[1]) >= 4 for p in complete_checkpoints(out))


def test_two_process_run_killed_in_epoch_one_resumes_exactly(tmp_path):
    """SIGKILL of the launch's whole process group (launcher and both workers) once a checkpoint
    inside epoch 1 or later is complete, then --resume."""
    data = write_folder(tmp_path / "data")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_ok(finetune_cmd(data, straight, 9, "train.save_every=1"), "uninterrupted run")
    cmd = finetune_cmd(data, killed, 9, "train.save_every=1")
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 300
    while not in_epoch_one(killed) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    err = proc.communicate()[1]
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill:\n{err[-3000:]}"
    assert not (killed / "model").exists(), "killed too late: the run had already finished"
    step = int(complete_checkpoints(killed)[-1].name.split("-")[1])
    assert 4 <= step < 9
    run_ok(cmd + ["--resume"], f"resume from step {step}")
    assert_identical_runs(straight, killed, resume_step=step, max_steps=9)


def test_two_process_pretraining_resumed_inside_a_later_epoch_is_exact(tmp_path):
    """contriever_inbatch_cpu on a small corpus: stopped at the first step that ends inside
    epoch >= 1 (not at its end), resumed to the end."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": " ".join(
        WORDS[(i * 7 + k) % len(WORDS)] for k in range(50))}) + "\n" for i in range(12)))

    def cmd(out: Path, steps: int, *extra: str) -> list[str]:
        return [*launch_prefix(2), str(REPO / "pretrain/run.py"), "--recipe",
                "contriever_inbatch_cpu", *TINY_MODEL, f"data.corpora=[{corpus}]",
                f"data.cache_dir={tmp_path / 'cache'}", "pairs.chunk_length=32",
                "train.per_device_batch_size=2", "train.scheduler=constant",
                "train.warmup_steps=0", "train.log_every=1", 'eval.data=""',
                f"train.max_steps={steps}", f"train.output_dir={out}", *extra]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_ok(cmd(straight, 9, "train.save_every=1", "train.keep_last=9"), "uninterrupted run")
    states = {int(p.name.split("-")[1]): json.loads((p / "trainer_state.json").read_text())
              for p in complete_checkpoints(straight)}
    stop = min(s for s, st in states.items() if st["epoch"] >= 1 and st["batches_in_epoch"])
    assert stop < 9, states
    run_ok(cmd(resumed, stop, f"train.save_every={stop}"), "first part")
    run_ok(cmd(resumed, 9, f"train.save_every={stop}", "--resume"), "resume")
    assert_identical_runs(straight, resumed, resume_step=stop, max_steps=9)


def test_two_processes_asked_without_multi_gpu_are_refused(tmp_path):
    """Accelerate's simple launcher would run ONE process that records world_size 1."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29731", str(REPO / "finetune/run.py"), "--recipe",
           "fewshot_cpu", f"train.output_dir={tmp_path / 'run'}"]
    done = run_to_end(cmd, timeout=300, env=env())
    assert done.returncode != 0
    assert "--multi_gpu" in done.stderr and "started one" in done.stderr
    assert not (tmp_path / "run").exists()
    # what the real multi-process launchers export is accepted
    check_launch({"ACCELERATE_USE_CPU": "True", "MASTER_PORT": "1", "WORLD_SIZE": "2"})
    check_launch({})  # plain python
    with pytest.raises(LaunchError):
        check_launch({"ACCELERATE_USE_CPU": "False", "MASTER_PORT": "1"})


def test_gradient_checkpointing_on_two_processes_matches_plain_training(tmp_path):
    """A shared tower runs twice per step (queries, then documents): under DDP, reentrant
    checkpointing marks its parameters ready twice and fails; non-reentrant must give the plain
    run's weights (dropout on: the recomputation replays the same masks)."""
    data = write_folder(tmp_path / "data")
    run_ok(finetune_cmd(data, tmp_path / "plain", 3), "plain run")
    run_ok(finetune_cmd(data, tmp_path / "ckpt", 3, "model.gradient_checkpointing=true"),
           "gradient checkpointing")
    assert_same_weights(tmp_path / "plain", tmp_path / "ckpt", atol=1e-6)


def test_evaluation_during_training_is_sharded_over_the_processes(tmp_path):
    """Before: rank 0 encoded the whole evaluation corpus while the others waited at a barrier
    (a collective time-out on a large set). Now each process encodes a slice; the metrics equal
    a one-process evaluation of the saved model."""
    from twotower.common.data import load_beir
    from twotower.common.eval.evaluate import evaluate_dense
    from twotower.common.model.encoder import Encoder

    data = write_folder(tmp_path / "data")
    out = tmp_path / "run"
    run_ok(finetune_cmd(data, out, 2, f"eval.data={data}", "eval.split=train",
                        "eval.max_queries=0", "eval.max_docs=0", "eval.diagnostics=false",
                        "eval.metrics=[nDCG@10,R@10]"), "run with evaluation")
    report = json.loads((out / "eval" / "metrics.json").read_text())
    assert report["timing"]["encode_processes"] == 2
    alone = evaluate_dense(Encoder.load(str(out / "model")), load_beir(data, "train"),
                           measures=["nDCG@10", "R@10"], progress=False)
    assert report["metrics"] == pytest.approx(alone.metrics, abs=1e-6)
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(alone.metrics, abs=1e-6)


FSDP_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config: {fsdp_version: 2, fsdp_auto_wrap_policy: SIZE_BASED_WRAP, fsdp_min_num_params: 1000}
machine_rank: 0
mixed_precision: 'no'
num_machines: 1
num_processes: 2
use_cpu: false
"""


def test_fsdp_is_refused_instead_of_silently_running_ddp(tmp_path):
    """On a CPU Accelerate 1.16 turns an FSDP config into plain DDP (MULTI_CPU) without a word;
    on a GPU the sharded weights break the export. Both are refused before training."""
    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP_CONFIG)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", "29733", str(REPO / "tests/scripts/toy_train.py"),
           "--recipe", "none", f"train.output_dir={tmp_path / 'run'}",
           "train.per_device_batch_size=4", "train.max_steps=1"]
    done = run_to_end(cmd, timeout=300, env=env())
    assert done.returncode != 0 and "FSDP needs GPUs" in done.stderr
    assert not (tmp_path / "run" / "model").exists()
    with pytest.raises(ShardingError, match="not supported yet"):
        check_sharding("FSDP", {"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(ShardingError, match="not supported yet"):
        check_sharding("DEEPSPEED", {}, zero_stage=3)
    check_sharding("DEEPSPEED", {}, zero_stage=2)
    check_sharding("MULTI_GPU", {})
