"""Bad input through the real drivers (pretrain/run.py, finetune/run.py as subprocesses): each
exits non-zero with a message naming the key, file or pairs at fault; counted skipping when a
recipe opts in; a non-finite loss on a real stage stops naming the step and the batch's ids."""
import json
import subprocess
import sys
from pathlib import Path

from tests.test_reliability_resume import REPO, TINY_MODEL, env

TINY_PRETRAIN = [*TINY_MODEL, "pairs.chunk_length=32", "train.per_device_batch_size=4",
                 'eval.data=""', "train.max_steps=2"]


def drive(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *args], env=env(),
                          capture_output=True, text=True, timeout=300)


def write_corpus(path: Path, n: int = 20, bad_lines: tuple = ()) -> Path:
    words = "protein cell gene river star planet forest city law market".split()
    rows = [json.dumps({"_id": f"d{i}", "title": "", "text": " ".join(
        words[(i * 7 + j) % 10] for j in range(60))}) for i in range(n)]
    for at, line in bad_lines:
        rows.insert(at, line)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return path


def test_unknown_or_mistyped_recipe_key_fails_naming_it():
    proc = drive("pretrain/run.py", "--recipe", "contriever_cpu", "trian.lr=1")
    assert proc.returncode != 0
    assert "unknown key 'trian'" in proc.stderr and "did you mean 'train'" in proc.stderr
    proc = drive("finetune/run.py", "--recipe", "fewshot_cpu", "train.lr=fast")
    assert proc.returncode != 0 and "'train.lr'" in proc.stderr and "fast" in proc.stderr


def test_model_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "no_such_model"
    proc = drive("finetune/run.py", "--recipe", "fewshot_cpu", f"model.name_or_path={missing}",
                 f"train.output_dir={tmp_path / 'out'}")
    assert proc.returncode != 0
    assert f"model path '{missing}' does not exist" in proc.stderr


def test_empty_corpus_names_the_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")  # whitespace only
    proc = drive("pretrain/run.py", "--recipe", "contriever_cpu", *TINY_PRETRAIN,
                 f"data.corpora=[{empty}]", f"train.output_dir={tmp_path / 'out'}")
    assert proc.returncode != 0 and f"{empty}: empty file" in proc.stderr


def test_teacher_scores_missing_pairs_through_the_finetuning_driver(tmp_path):
    from tests.test_finetune_mine import write_beir

    write_beir(tmp_path / "beir")
    scores = tmp_path / "scores.jsonl"  # every query but q4 scored
    corpus = [json.loads(line)["_id"] for line in (tmp_path / "beir" / "corpus.jsonl").open()]
    scores.write_text("".join(json.dumps({"qid": f"q{q}", "scores": {d: 1.0 for d in corpus}}) + "\n"
                              for q in range(4)))
    proc = drive("finetune/run.py", "--recipe", "fewshot_cpu", *TINY_MODEL,
                 f"data.path={tmp_path / 'beir'}", f"data.teacher_scores={scores}",
                 "data.max_queries=0", "loss.margin_mse.weight=1", "loss.infonce.weight=0",
                 'eval.data=""', f"train.output_dir={tmp_path / 'out'}")
    assert proc.returncode != 0
    assert "have no teacher score" in proc.stderr and "('q4', 'glacier" in proc.stderr
    assert "teacher scores" in proc.stderr


def test_counted_skipping_is_opt_in_and_reported_at_the_end(tmp_path):
    bad = [(3, '{"_id": "broken", "text": '), (7, json.dumps({"_id": "d1", "text": "again"})),
           (9, json.dumps({"_id": "blank", "text": "   "}))]
    corpus = write_corpus(tmp_path / "dirty.jsonl", bad_lines=bad)
    args = ["--recipe", "contriever_cpu", *TINY_PRETRAIN, f"data.corpora=[{corpus}]",
            f"data.cache_dir={tmp_path / 'cache'}"]
    proc = drive("pretrain/run.py", *args, f"train.output_dir={tmp_path / 'strict'}")
    assert proc.returncode != 0 and f"{corpus}:4:" in proc.stderr  # the first bad line, named
    proc = drive("pretrain/run.py", *args, "data.on_error=skip", f"train.output_dir={tmp_path / 'skip'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped_bad_lines: 3" in proc.stdout
    tail = proc.stderr[proc.stderr.index("train:"):]  # reported after training, with the lines
    assert "skipped 3 bad line(s)" in tail and str(corpus) in tail


def test_nonfinite_loss_on_a_real_stage_stops_with_step_and_ids(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "out"
    # a temperature of 1e-45 makes the logits +-inf: the InfoNCE loss is NaN at the first step
    proc = drive("pretrain/run.py", "--recipe", "contriever_cpu", *TINY_PRETRAIN,
                 f"data.corpora=[{corpus}]", "method.temperature=1e-45", "train.save_every=1",
                 f"train.output_dir={out}")
    assert proc.returncode != 0
    assert "non-finite loss (nan) at step 1" in proc.stderr
    assert "batch ids: ['chunk " in proc.stderr  # PairCollator's ids reach the message
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert not (out / "model").exists()


def test_skip_policy_stops_when_no_step_can_succeed(tmp_path):
    """train.nonfinite_loss=skip with a loss that is never finite: an error after one epoch of
    skipped batches, not an endless loop over epochs."""
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    proc = drive("pretrain/run.py", "--recipe", "contriever_cpu", *TINY_PRETRAIN,
                 f"data.corpora=[{corpus}]", "method.temperature=1e-45",
                 "train.nonfinite_loss=skip", f"train.output_dir={tmp_path / 'out'}")
    assert proc.returncode != 0
    assert "every batch of epoch 0 had a non-finite loss" in proc.stderr
    assert "step skipped (train.nonfinite_loss=skip)" in proc.stderr


def test_finetuning_counted_skipping_is_opt_in_and_reported(tmp_path):
    """Generic jsonl training data with a malformed line, a group without positives and a
    duplicate query: the strict run names the first bad line; data.on_error=skip trains on the
    good groups and reports the count at the end."""
    good = [{"query": f"what about {w}", "positives": [f"{w} is a topic of study"],
             "negatives": [f"nothing on {w[::-1]}"]}
            for w in "protein cell gene river star planet forest city law market".split()]
    lines = [json.dumps(g) for g in good]
    lines.insert(2, '{"query": "broken", "positives": [')
    lines.insert(5, json.dumps({"query": "no positives here", "positives": []}))
    lines.insert(8, json.dumps(good[0]))
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    args = ["--recipe", "fewshot_cpu", *TINY_MODEL, "data.kind=jsonl", f"data.path={data}",
            "data.mine.retriever=", "data.n_negatives=1", "data.max_queries=0",
            "train.per_device_batch_size=4",
            "train.max_steps=2", 'eval.data=""']
    proc = drive("finetune/run.py", *args, f"train.output_dir={tmp_path / 'strict'}")
    assert proc.returncode != 0 and f"{data}:3:" in proc.stderr  # the first bad line, named
    proc = drive("finetune/run.py", *args, "data.on_error=skip",
                 f"train.output_dir={tmp_path / 'skip'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped_bad_lines: 3" in proc.stdout
    assert "data.on_error=skip" in proc.stderr and str(data) in proc.stderr
