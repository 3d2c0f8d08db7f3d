"""pretrain/run.py end to end on a tiny random BERT and a generated corpus (real subprocesses):
outputs, evaluation, and a resumed run that restores the MoCo queue, pointer and key encoder
exactly. Plus: every pretraining recipe loads and the faithful ones carry the papers' numbers."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from twotower.common.recipe.config import load_recipe
from twotower.pretrain.args import PretrainRecipe

REPO = Path(__file__).resolve().parents[1]
WORDS = ("protein cell gene river star planet forest city law market engine bridge island "
         "vaccine storm language song metal bird coast").split()
RECIPES = ["contriever", "contriever_inbatch", "recontriever", "ict", "domain_pretrain"]


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_run")
    rng = random.Random(0)
    docs = []
    for i in range(80):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize()
                     + "." for _ in range(rng.randint(3, 6))]
        docs.append({"_id": f"d{i}", "title": f"Title {i}", "text": " ".join(sentences)})
    write_jsonl(root / "corpus.jsonl", docs)
    write_jsonl(root / "beir" / "corpus.jsonl", docs[:30])
    write_jsonl(root / "beir" / "queries.jsonl",
                [{"_id": f"q{i}", "text": docs[i]["text"].split(".")[0]} for i in range(10)])
    (root / "beir" / "qrels").mkdir()
    (root / "beir" / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(10)))
    recipe = root / "tiny.yaml"
    recipe.write_text(f"""base: recontriever_cpu
model:
  name_or_path: bundled:all-MiniLM-L6-v2
  random_init: true
  # dropout off keeps this test about the queue; exact resume with dropout on is proved in
  # tests/test_reliability_resume.py
  config_overrides: {{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2,
                      intermediate_size: 64, hidden_dropout_prob: 0,
                      attention_probs_dropout_prob: 0}}
train:
  max_steps: 4
  per_device_batch_size: 4
  log_every: 1
  scheduler: constant             # the learning rate must not depend on max_steps (see resume)
  warmup_steps: 0
eval:
  data: {root / 'beir'}
  max_queries: 0
  max_docs: 0
data:
  corpora: [{root / 'corpus.jsonl'}]
  cache_dir: {root / 'cache'}
pairs:
  chunk_length: 32
method:
  queue_size: 48                  # 16 keys per step: the pointer ends at 64 % 48 = 16
""")
    return root, recipe


def run(recipe: Path, out: Path, *overrides: str, resume: bool = False):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "pretrain" / "run.py"), "--recipe", str(recipe),
           f"train.output_dir={out}", *overrides] + (["--resume"] if resume else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def state(out: Path, step: int) -> dict:
    return load_file(str(out / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def test_run_trains_evaluates_and_resume_restores_the_queue(tiny_setup):
    root, recipe = tiny_setup
    straight, resumed = root / "straight", root / "resumed"
    proc = run(recipe, straight, "train.save_every=2")
    assert "nDCG@10" in proc.stdout
    metrics = json.loads((straight / "metrics.json").read_text())
    assert 0 <= metrics["nDCG@10"] <= 1
    assert (straight / "model" / "modules.json").is_file()
    assert "4 key(s) per query" in proc.stderr

    run(recipe, resumed, "train.max_steps=2")  # stops after step 2 (and checkpoints it)
    half = state(resumed, 2)
    assert int(half["queue_ptr"]) == 32
    run(recipe, resumed, "train.max_steps=4", resume=True)
    a, b = state(straight, 4), state(resumed, 4)
    assert int(a["queue_ptr"]) == int(b["queue_ptr"]) == 16
    assert not torch.equal(a["queue"], half["queue"])  # the queue moved on after the resume
    assert a.keys() == b.keys() and any(k.startswith("key_encoder.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-6, msg=key)


def test_ict_and_inbatch_recipes_run(tiny_setup):
    root, recipe = tiny_setup
    proc = run(recipe, root / "ict", "pairs.task=ict", "pairs.n_pairs=1", "method.name=inbatch",
               "pairs.punkt=train", "train.max_steps=2", 'eval.data=""')
    assert "trained an unsupervised Punkt sentence splitter" in proc.stderr
    assert (root / "ict" / "model" / "model.safetensors").is_file()
    proc = run(recipe, root / "title", "pairs.task=title", "pairs.n_pairs=2", "train.max_steps=2",
               'eval.data=""')
    assert "title pairs: 80 documents" in proc.stderr
    assert (root / "title" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("name", RECIPES + [f"{n}_cpu" for n in RECIPES])
def test_pretraining_recipes_load(name):
    recipe = load_recipe(PretrainRecipe, name, [])
    assert recipe.method.name in ("moco", "inbatch")
    if name.endswith("_cpu"):
        assert recipe.model.name_or_path == "bundled:all-MiniLM-L6-v2"
        assert recipe.data.corpora == ["scifact"] and recipe.eval.data == "scifact"


def test_faithful_recipes_carry_the_papers_numbers():
    c = load_recipe(PretrainRecipe, "contriever", [])
    assert (c.model.name_or_path, c.model.pooling, c.method.name) == ("bert-base-uncased", "mean",
                                                                       "moco")
    assert (c.method.queue_size, c.method.momentum, c.method.temperature) == (131072, 0.9995, 0.05)
    assert (c.train.lr, c.train.warmup_steps, c.train.max_steps) == (5e-5, 20000, 500000)
    assert (c.train.adam_beta2, c.train.adam_eps, c.train.weight_decay) == (0.98, 1e-6, 0.01)
    assert c.train.global_batch_size == 2048 == c.train.per_device_batch_size * 32
    assert (c.pairs.chunk_length, c.pairs.ratio_min, c.pairs.ratio_max) == (256, 0.1, 0.5)
    assert (c.pairs.augmentation, c.pairs.prob_augmentation) == (["delete"], 0.1)
    r = load_recipe(PretrainRecipe, "recontriever", [])
    assert (r.pairs.n_pairs, r.method.relevance_aware, r.pairs.ratio_min) == (4, True, 0.05)
    assert r.train.global_batch_size == 2048 == r.train.per_device_batch_size * 16
    assert load_recipe(PretrainRecipe, "contriever_inbatch", []).method.name == "inbatch"
    assert load_recipe(PretrainRecipe, "ict", []).pairs.task == "ict"


def test_demo_prints_before_after_table_and_loss_curve(tiny_setup):
    root, recipe = tiny_setup
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "pretrain" / "demo.py"), "--recipe", str(recipe),
         f"train.output_dir={root / 'demo'}", "train.max_steps=3"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    header = lines.index("metric       before    after   change")
    row = lines[header + 1].split()
    assert row[0] == "nDCG@10" and float(row[3]) == pytest.approx(float(row[2]) - float(row[1]),
                                                                  abs=2e-4)
    after = json.loads((root / "demo" / "metrics.json").read_text())
    assert float(row[2]) == pytest.approx(after["nDCG@10"], abs=1e-4)
    assert "[demo] training loss: 1:" in proc.stdout and ", 3:" in proc.stdout
