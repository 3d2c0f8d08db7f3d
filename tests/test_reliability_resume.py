"""Crash and resume on the real stages (pretrain/run.py in-batch and MoCo, finetune/run.py with
hard negatives): a run SIGKILLed at a random step after a complete checkpoint, then resumed with
--resume, ends bit-for-bit where an uninterrupted run of the same recipe ends (weights, AdamW
moments, MoCo queue/pointer/key encoder), and its logged per-step loss after the resume point is
the uninterrupted run's (no jump). Tiny random BERTs *with dropout on* (the real recipes' setting),
one torch thread per process so two runs can share the machine deterministically."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from twotower.common.train.rundir import complete_checkpoints

REPO = Path(__file__).resolve().parents[1]
WORDS = ("protein cell gene river star planet forest city law market engine bridge island "
         "vaccine storm language song metal bird coast").split()
TINY_MODEL = ["model.name_or_path=bundled:all-MiniLM-L6-v2", "model.random_init=true",
              ("model.config_overrides={num_hidden_layers: 1, hidden_size: 32, "
               "num_attention_heads: 2, intermediate_size: 64}")]


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def command(script: str, recipe: str, out: Path, overrides: list[str], resume=False) -> list[str]:
    return ([sys.executable, str(REPO / script), "--recipe", recipe, f"train.output_dir={out}",
             *overrides] + (["--resume"] if resume else []))


def start(script, recipe, out, overrides, resume=False) -> subprocess.Popen:
    return subprocess.Popen(command(script, recipe, out, overrides, resume), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, what: str) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{what} failed:\n{err[-4000:]}"


def kill_after_checkpoint(proc: subprocess.Popen, out: Path, step: int) -> int:
    """SIGKILL `proc` as soon as checkpoint `step` is COMPLETE; returns the step resume will use."""
    marker = out / "checkpoints" / f"step-{step:08d}" / "COMPLETE"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert marker.exists(), f"the run never completed checkpoint {step}: {proc.communicate()[1][-3000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model").exists(), "killed too late: the run had already finished"
    done = complete_checkpoints(out)
    return int(done[-1].name.split("-")[1])


def losses_by_file(out: Path) -> list[dict[int, float]]:
    """train/loss per step of each tensorboard events file of a run, oldest file first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted((out / "logs").rglob("events.out.tfevents*"),
                   key=lambda p: float(p.name.split(".")[3]))
    result = []
    for path in files:
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        tags = events.Tags()["scalars"]
        result.append({e.step: e.value for e in events.Scalars("train/loss")}
                      if "train/loss" in tags else {})
    return result


def assert_identical_runs(straight: Path, resumed: Path, resume_step: int, max_steps: int,
                          buffers: tuple[str, ...] = ()) -> None:
    last = f"checkpoints/step-{max_steps:08d}"
    a, b = load_file(str(straight / last / "model.safetensors")), load_file(str(resumed / last / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"method state '{key}' differs after the resume"
    for name in buffers:  # the MoCo queue and pointer are part of the compared state
        assert any(k == name or k.startswith(name + ".") for k in a), f"{name} not checkpointed"
    fa, fb = (load_file(str(p / "model" / "model.safetensors")) for p in (straight, resumed))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    oa = torch.load(straight / last / "optimizer.bin", weights_only=False)["state"]
    ob = torch.load(resumed / last / "optimizer.bin", weights_only=False)["state"]
    assert oa.keys() == ob.keys() and oa
    for key in oa:
        for moment in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa[key][moment], ob[key][moment]), f"optimizer {moment} of {key}"
    # the logged loss: the resumed run's file continues exactly where the straight run is
    (full,) = losses_by_file(straight)
    assert sorted(full) == list(range(1, max_steps + 1))
    after = losses_by_file(resumed)[-1]
    assert sorted(after) == list(range(resume_step + 1, max_steps + 1))
    assert {s: full[s] for s in after} == after, "the loss jumps after the resume"


def crash_and_resume(tmp_path: Path, script: str, recipe: str, overrides: list[str],
                     max_steps: int, buffers=()) -> None:
    overrides = [*overrides, f"train.max_steps={max_steps}", "train.save_every=1",
                 "train.keep_last=2", "train.log_every=1", 'eval.data=""']
    kill_at = random.randint(1, max_steps - 3)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc_straight = start(script, recipe, straight, overrides)  # both share the 2 cores
    proc_killed = start(script, recipe, killed, overrides)
    resume_step = kill_after_checkpoint(proc_killed, killed, kill_at)
    # an interrupted checkpoint of the next step may be left behind; resume must ignore it
    resumed = start(script, recipe, killed, overrides, resume=True)
    finish(resumed, f"resume from step {resume_step} (killed after checkpoint {kill_at})")
    finish(proc_straight, "uninterrupted run")
    assert_identical_runs(straight, killed, resume_step, max_steps, buffers)


# ----------------------------------------------------------------------------- pretraining
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability_corpus")
    rng = random.Random(0)
    rows = []
    for i in range(40):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 80)))
        rows.append(json.dumps({"_id": f"d{i}", "title": "", "text": text}))
    (root / "corpus.jsonl").write_text("\n".join(rows) + "\n")
    return root


def pretrain_overrides(corpus: Path, method: str) -> list[str]:
    return [*TINY_MODEL, f"data.corpora=[{corpus / 'corpus.jsonl'}]",
            f"data.cache_dir={corpus / 'cache'}", "pairs.chunk_length=32", "pairs.n_pairs=2",
            "train.per_device_batch_size=4", "train.warmup_steps=2", f"method.name={method}",
            "method.queue_size=20"]  # 8 keys per step: the pointer wraps around


def test_inbatch_pretraining_resumes_exactly(tmp_path, corpus):
    crash_and_resume(tmp_path, "pretrain/run.py", "contriever_cpu",
                     pretrain_overrides(corpus, "inbatch"), max_steps=7)


def test_moco_pretraining_resumes_exactly_with_its_queue(tmp_path, corpus):
    crash_and_resume(tmp_path, "pretrain/run.py", "recontriever_cpu",
                     pretrain_overrides(corpus, "moco"), max_steps=7,
                     buffers=("queue", "queue_ptr", "key_encoder"))


# ----------------------------------------------------------------------------- fine-tuning
def test_finetuning_with_hard_negatives_resumes_exactly(tmp_path):
    from tests.test_finetune_mine import write_beir

    write_beir(tmp_path / "beir")  # 5 training queries: batch 2 -> 2 steps per epoch
    crash_and_resume(tmp_path, "finetune/run.py", "fewshot_cpu", [
        *TINY_MODEL, f"data.path={tmp_path / 'beir'}", "data.max_queries=0", "data.n_negatives=2",
        "data.mine={retriever: bm25, depth: 20, skip_top: 0, window: 6, n: 5}",
        "model.max_doc_length=32", "train.per_device_batch_size=2", "train.warmup_steps=1"],
        max_steps=7)
