"""Evaluation under `accelerate launch` with 2 processes: each encodes half of the corpus, the
halves are gathered, and the outputs equal a single-process evaluation."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.dist_utils import launch_prefix, run_distributed, run_to_end
from tests.test_eval_cli import write_beir
from twotower.common.eval.sharded import encode_sharded, shard_bounds

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_encoder_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_encoder_factory(hidden=32, layers=1, heads=2).save(path)
    return path


def test_shard_bounds_cover_everything_once():
    for n in (0, 1, 5, 7, 12):
        for processes in (1, 2, 3, 5):
            spans = [shard_bounds(n, processes, i) for i in range(processes)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert max(e - s for s, e in spans) - min(e - s for s, e in spans) <= 1


def _encode_in_two(rank, world):
    items = list(range(7))  # uneven: 4 and 3 rows
    seen = []

    def encode(part):
        seen.extend(part)
        return np.array([[x, x * x] for x in part], dtype=np.float32)

    return encode_sharded(encode, items), seen


def test_encode_sharded_gathers_in_order_and_each_process_encodes_its_slice():
    (full0, seen0), (full1, seen1) = run_distributed(_encode_in_two, 2)
    expected = np.array([[x, x * x] for x in range(7)], dtype=np.float32)
    assert np.array_equal(full0, expected) and np.array_equal(full1, expected)
    assert seen0 == [0, 1, 2, 3] and seen1 == [4, 5, 6]


def test_encode_sharded_gathers_on_the_process_device(monkeypatch):
    """NCCL (GPUs) gathers only GPU tensors: the slice goes to process_device() before the
    gather, and the result comes back to the host. ("meta" stands in for a GPU here.)"""
    import torch

    import twotower.common.eval.sharded as sharded

    seen = []

    def gather(x):
        seen.append(x.device)
        return torch.zeros((7, 2))  # what a gather would bring back (not a meta tensor)
    monkeypatch.setattr(sharded, "world_size", lambda: 2)
    monkeypatch.setattr(sharded, "rank", lambda: 0)
    monkeypatch.setattr(sharded, "process_device", lambda: torch.device("meta"))
    monkeypatch.setattr(sharded, "gather_variable", gather)
    out = encode_sharded(lambda part: np.ones((len(part), 2), dtype=np.float32), list(range(7)))
    assert seen == [torch.device("meta")]
    assert isinstance(out, np.ndarray) and out.shape == (7, 2)


def test_process_device_inside_a_recipe_run_is_the_recipes_device(tmp_path):
    """finetune/run.py run_recipe sets up Accelerate's (process-wide) state from train.device
    before it builds a stage (where data.mine runs); process_device() then returns that state's
    device, so with train.device=cpu a recipe's dense miner stays on the CPU on a machine with a
    GPU (faked here) instead of picking the GPU on its own."""
    code = "\n".join([
        "import sys, torch",
        "torch.cuda.is_available = lambda: True  # a machine with a GPU",
        "import twotower.finetune.run as run",
        "from twotower.common.recipe.config import load_recipe",
        "from twotower.common.eval.sharded import process_device",
        "from twotower.common.train.trainer import use_cpu",
        "from twotower.finetune.args import FinetuneRecipe",
        "assert use_cpu('auto') is False  # left alone, a tool would take the GPU",
        "def build_stage(*args, **kwargs):  # where the miner would ask for its device",
        "    print('miner device', process_device()); sys.exit(0)",
        "run.build_stage = build_stage",
        f"run.run_recipe(load_recipe(FinetuneRecipe, 'fewshot_cpu', "
        f"['train.device=cpu', 'train.output_dir={tmp_path / 'run'}']))"])
    out = run_to_end([sys.executable, "-c", code], cwd=REPO,
                     env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
                     timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "miner device cpu"


def test_two_process_cli_equals_one_process(tmp_path, tiny_model_dir):
    beir = tmp_path / "beir"
    write_beir(beir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    args = ["--model", str(tiny_model_dir), "--data", str(beir), "--split", "test", "--k", "10",
            "--no-progress"]
    one = run_to_end([*launch_prefix(1), "-m", "twotower.common.eval.evaluate", *args, "--output-dir",
                      str(tmp_path / "one")], env=env, cwd=REPO)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_to_end([*launch_prefix(2), "-m", "twotower.common.eval.evaluate", *args, "--output-dir",
                      str(tmp_path / "two")], env=env, cwd=REPO)
    assert two.returncode == 0, two.stderr[-3000:]
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["timing"]["encode_processes"] == 2 and "encode_processes" not in m1["timing"]
    assert m1["metrics"] == m2["metrics"]
    run1 = (tmp_path / "one" / "run.trec").read_text().splitlines()
    run2 = (tmp_path / "two" / "run.trec").read_text().splitlines()
    assert [line.split()[:3] for line in run1] == [line.split()[:3] for line in run2]
    scores1 = np.array([float(line.split()[4]) for line in run1])
    scores2 = np.array([float(line.split()[4]) for line in run2])
    np.testing.assert_allclose(scores1, scores2, atol=1e-5)
