"""Determinism: the same recipe and seed give bit-identical weights on the same machine (two
independent runs of a tiny MoCo pretraining recipe and a tiny fine-tuning recipe, dropout on); a
different seed gives different weights (the comparison can fail); run_info.json records the
versions of torch/transformers/accelerate/twotower and the git commit of the code."""
import json
import subprocess

import accelerate
import torch
import transformers
from safetensors.torch import load_file

from tests.test_reliability_resume import REPO, TINY_MODEL, start
from twotower.common import __version__

WORDS = "protein cell gene river star planet forest city law market".split()


def final(out):
    return load_file(str(out / "checkpoints" / "step-00000003" / "model.safetensors"))


def identical(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_all(jobs):
    procs = [start(*job) for job in jobs]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]


def test_same_recipe_and_seed_give_identical_weights(tmp_path):
    from tests.test_finetune_mine import write_beir

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": " ".join(
        WORDS[(i * 7 + j * 3) % 10] for j in range(60))}) + "\n" for i in range(20)))
    write_beir(tmp_path / "beir")
    pre = [*TINY_MODEL, f"data.corpora=[{corpus}]", "pairs.chunk_length=32",
           "train.per_device_batch_size=4", 'eval.data=""', "train.max_steps=3",
           "method.queue_size=16"]
    fine = [*TINY_MODEL, f"data.path={tmp_path / 'beir'}", "data.max_queries=0",
            "data.n_negatives=1", "data.mine={retriever: bm25, depth: 20, window: 6, n: 5}",
            "train.per_device_batch_size=2", "train.max_steps=3", 'eval.data=""']
    run_all([("pretrain/run.py", "contriever_cpu", tmp_path / "p1", pre),
             ("pretrain/run.py", "contriever_cpu", tmp_path / "p2", pre)])
    run_all([("pretrain/run.py", "contriever_cpu", tmp_path / "p3", [*pre, "train.seed=7"]),
             ("finetune/run.py", "fewshot_cpu", tmp_path / "f1", fine)])
    run_all([("finetune/run.py", "fewshot_cpu", tmp_path / "f2", fine)])
    p1, p2, p3 = (final(tmp_path / n) for n in ("p1", "p2", "p3"))
    assert identical(p1, p2) and "queue" in p1  # weights, key encoder and MoCo queue
    assert not identical(p1, p3)  # another seed: another model, other crops, another queue
    assert identical(final(tmp_path / "f1"), final(tmp_path / "f2"))

    info = json.loads((tmp_path / "p1" / "run_info.json").read_text())
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    assert info["git_commit"].split("+")[0] == commit and len(commit) == 40
    assert (info["torch"], info["transformers"], info["accelerate"], info["twotower"]) == (
        torch.__version__, transformers.__version__, accelerate.__version__, __version__)
    assert "pretrain/run.py" in info["command"] and info["world_size"] == 1
