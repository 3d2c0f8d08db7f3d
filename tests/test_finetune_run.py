"""finetune/run.py end to end with tiny random models: one stage, two stages (pseudo labels from a
cross-encoder teacher, then labelled data with Margin-MSE), resume, and every shipped recipe."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.quality import final_stage
from tests.test_finetune_mine import write_beir
from tests.test_finetune_teacher import save_tiny_cross_encoder
import twotower.common.eval.evaluate as evaluate_module
import twotower.finetune.run as finetune_run
from twotower.common.model.encoder import tiny_bert
from twotower.common.recipe.config import RecipeError, load_recipe
from twotower.finetune.args import FinetuneRecipe, TeacherArgs
from twotower.finetune.run import main
from twotower.finetune.teacher import Teacher
from twotower.pretrain.args import PretrainRecipe

RECIPES = ["msmarco_mnrl", "msmarco_dance_dual", "msmarco_samtone", "msmarco_margin_mse",
           "msmarco_margin_mse_dual", "pair_two_stage", "fewshot", "domain_adapt"]


@pytest.mark.parametrize("name", RECIPES + [r + "_cpu" for r in RECIPES] + ["gpl"])
def test_shipped_recipes_load(name):
    recipe = load_recipe(FinetuneRecipe, name)
    assert all(stage.loss.active() for _, stage in recipe.stage_list())


def test_recipe_errors_name_the_key():
    with pytest.raises(RecipeError, match="loss.infonce.weight=1"):
        load_recipe(FinetuneRecipe, None, [])
    with pytest.raises(RecipeError, match="did you mean 'loss.pair.alpha'"):
        load_recipe(FinetuneRecipe, "fewshot", ["loss.pair.alhpa=0.2"])
    with pytest.raises(RecipeError, match="needs teacher scores"):
        load_recipe(FinetuneRecipe, "fewshot", ["loss.margin_mse.weight=1"])


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    write_beir(root / "beir")
    tiny_bert(dropout=0.0, normalize=True).save(root / "student")
    save_tiny_cross_encoder(root / "ce")
    return root


def common_overrides(root: Path, out: str) -> list:
    return [f"model.name_or_path={root / 'student'}", f"train.output_dir={root / out}",
            "train.global_batch_size=0", "train.per_device_batch_size=2", "train.max_steps=2",
            "train.warmup_steps=0",
            "train.log_every=1", "model.max_doc_length=32",
            f"eval.data={root / 'beir'}", "eval.split=train", "eval.metrics=[nDCG@10]"]


def test_single_stage_fewshot_run(tiny_setup):
    root = tiny_setup
    result = main(["--recipe", "fewshot", *common_overrides(root, "one"), f"data.path={root / 'beir'}",
                   "data.max_queries=4", "data.n_negatives=2", "loss.samtone.weight=0.5",
                   "loss.samtone.symmetric=true", "loss.dance_dual.weight=0.1"])
    assert result["step"] == 2 and 0.0 <= result["nDCG@10"] <= 1.0
    assert (root / "one" / "model" / "config.json").is_file()
    saved = load_recipe(FinetuneRecipe, str(root / "one" / "recipe.yaml"))
    assert saved.data.max_queries == 4 and saved.loss.samtone.weight == 0.5


def test_evaluation_during_training_through_on_disk_shards(tiny_setup, monkeypatch):
    """eval.shards: each evaluation's corpus embeddings go to shards on disk (a corpus past RAM)
    and are searched exactly: the same metrics as in RAM (float32 shards); the folder of the
    step-1 evaluation is gone once step 2's is done, the last is kept."""
    root = tiny_setup
    argv = ["--recipe", "fewshot", f"data.path={root / 'beir'}", "data.max_queries=4",
            "data.n_negatives=1", "train.eval_every=1"]
    in_ram = main(argv + common_overrides(root, "ram"))
    folders = []
    real = evaluate_module.evaluate_dense

    def recording(*args, **kwargs):
        folders.append(kwargs.get("shards"))
        return real(*args, **kwargs)
    monkeypatch.setattr(evaluate_module, "evaluate_dense", recording)
    on_disk = main(argv + common_overrides(root, "disk") + [
        f"eval.shards={root / 'shards'}", "eval.shards_dtype=float32"])
    # one evaluation a step (the final one is step 2's), each through its own folder
    assert [f.name for f in folders] == ["step-00000001", "step-00000002"]
    assert on_disk["nDCG@10"] == pytest.approx(in_ram["nDCG@10"], abs=1e-6)
    assert [p.name for p in (root / "shards").iterdir()] == ["step-00000002"]
    assert (root / "shards" / "step-00000002" / "manifest.json").is_file()
    saved = json.loads((root / "disk" / "eval" / "metrics.json").read_text())
    assert saved["index"] == "shards" and saved["timing"]["shards_dtype"] == "float32"
    with pytest.raises(RecipeError, match="eval.shards_dtype"):
        load_recipe(FinetuneRecipe, "fewshot", ["eval.shards_dtype=int8"])


def two_stage_recipe(root: Path) -> Path:
    """Stage 1: pseudo labels from the tiny cross-encoder with PAIR; stage 2: labelled BEIR data
    with InfoNCE + Margin-MSE + dual Margin-MSE (teacher scores computed before training)."""
    teacher = Teacher(TeacherArgs(model=str(root / "ce")))
    texts = [json.loads(line)["text"] for line in (root / "beir" / "corpus.jsonl").read_text().splitlines()]
    scores = teacher.score(["mangrove facts"] * len(texts), texts)
    pos, neg = np.quantile(scores, 0.6), np.quantile(scores, 0.5)  # thresholds on raw logits
    path = root / "two_stage.yaml"
    path.write_text(f"""
teacher: {{model: {root / 'ce'}, kind: cross_encoder, batch_size: 8, max_length: 64}}
stages:
  pseudo:
    data:
      kind: pseudo
      path: {root / 'beir'}
      n_negatives: 1
      pseudo: {{candidates: bm25, top_k: 10, pos_threshold: {pos}, neg_threshold: {neg},
               apply_sigmoid: false}}
    loss: {{pair: {{weight: 1.0, alpha: 0.1, temperature: 0.1}}}}
  labelled:
    data: {{kind: beir, path: {root / 'beir'}, split: train, n_negatives: 2, n_neg_queries: 1,
            mine: {{retriever: bm25, n: 5, window: 6}}}}
    loss:
      infonce: {{weight: 1.0}}
      margin_mse: {{weight: 0.5}}
      margin_mse_dual: {{weight: 0.1}}
""")
    return path


def test_two_stage_run_and_resume(tiny_setup, caplog):
    root = tiny_setup
    recipe = two_stage_recipe(root)
    argv = ["--recipe", str(recipe), *common_overrides(root, "two"),
            f"teacher.cache={root / 'teacher.sqlite'}"]
    result = main(argv)
    out = root / "two"
    assert result["stage"] == "labelled" and result["step"] == 2
    for stage in ("pseudo", "labelled"):
        assert (out / "stages" / stage / "model" / "config.json").is_file()
    assert (out / "model" / "config.json").is_file()
    stage2 = load_recipe(FinetuneRecipe, str(out / "stages" / "labelled" / "recipe.yaml"))
    assert list(stage2.stages) == ["pseudo", "labelled"]
    # stage 2 starts from stage 1's weights: its first checkpoint differs from the student
    caplog.clear()
    with caplog.at_level("INFO", logger="twotower.finetune"):
        main(argv + ["--resume"])  # both stages finished: nothing is trained again
    assert "stage pseudo already finished" in caplog.text
    assert "stage labelled already finished" in caplog.text


def test_a_crash_while_publishing_the_final_model_keeps_the_earlier_one(tiny_setup, monkeypatch):
    """A multi-stage run copies its last stage's model to <output_dir>/model. A copy that dies
    half-way (disk full, killed) must leave the folder an earlier attempt published whole, and
    result.json readable -- it used to delete the old folder first, then copy."""
    root = tiny_setup
    argv = ["--recipe", str(two_stage_recipe(root)), *common_overrides(root, "crash"),
            f"teacher.cache={root / 'teacher.sqlite'}"]
    main(argv)
    final = root / "crash" / "model"
    before = {p.name: p.read_bytes() for p in final.iterdir() if p.is_file()}
    result = (root / "crash" / "result.json").read_text()

    def copy_half_then_die(src, dst, **kwargs):
        Path(dst).mkdir()
        (Path(dst) / "config.json").write_text("{")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("shutil.copytree", copy_half_then_die)
    with pytest.raises(OSError, match="No space left"):
        main(argv + ["--resume"])  # both stages finished: only the publishing runs again
    assert {p.name: p.read_bytes() for p in final.iterdir() if p.is_file()} == before
    assert (root / "crash" / "result.json").read_text() == result
    monkeypatch.undo()
    main(argv + ["--resume"])  # the next attempt replaces the partial copy and publishes
    assert not (root / "crash" / "model.partial").exists()
    assert json.loads((final / "config.json").read_text())


def write_generated_queries(root: Path) -> Path:
    """GPL's step 1 as it leaves a BEIR folder (files renamed): the corpus, and queries generated
    from passages, each judged relevant to its own passage."""
    gen = root / "generated"
    (gen / "qrels").mkdir(parents=True, exist_ok=True)
    docs = [json.loads(line) for line in (root / "beir" / "corpus.jsonl").read_text().splitlines()]
    (gen / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    sources = docs[::3]
    (gen / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"gen{i}", "text": " ".join(d["text"].split()[:3])}) + "\n"
        for i, d in enumerate(sources)))
    (gen / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"gen{i}\t{d['_id']}\t1\n" for i, d in enumerate(sources)))
    return gen


def test_gpl_recipe_distils_the_cross_encoder_on_generated_queries(tiny_setup, caplog):
    """recipes/gpl.yaml end to end: generated queries, negatives from a dense miner's top 50 (the
    tiny student stands in for GPL's miner), the cross-encoder scores each query's positive and
    every mined negative once, and Margin-MSE is the only loss; no data.path is a clear error."""
    root = tiny_setup
    gen = write_generated_queries(root)
    n_queries = len((gen / "queries.jsonl").read_text().splitlines())
    n_docs = len((gen / "corpus.jsonl").read_text().splitlines())
    argv = ["--recipe", "gpl", *common_overrides(root, "gpl"),
            f"data.mine.model={root / 'student'}", f"teacher.model={root / 'ce'}", f"teacher.cache={root / 'gpl_teacher.sqlite'}",
            "model.max_query_length=16", "teacher.max_length=64"]
    with pytest.raises(RecipeError, match="'data.path' is empty"):
        main(argv)
    caplog.clear()
    with caplog.at_level("INFO", logger="twotower.finetune"):
        result = main(argv + [f"data.path={gen}"])
    assert result["step"] == 2
    assert "losses {'margin_mse': 1.0}" in caplog.text
    # every query: its positive plus the top 50 of the other documents (the corpus is smaller),
    # less one: the copy of the first source passage under another id is never its negative
    assert n_docs - 1 < 50
    pairs = n_queries * n_docs - 1
    assert f"teacher: {pairs} pairs scored ({pairs} computed, 0 from the cache)" in caplog.text
    saved = load_recipe(FinetuneRecipe, str(root / "gpl" / "recipe.yaml"))
    assert saved.model.normalize is False and saved.data.mine.depth == 50


def test_existing_output_dir_is_refused(tiny_setup):
    root = tiny_setup
    (root / "busy").mkdir()
    (root / "busy" / "something").write_text("x")
    with pytest.raises(Exception, match="holds 'something', which no twotower run writes"):
        main(["--recipe", "fewshot", *common_overrides(root, "busy"), f"data.path={root / 'beir'}"])


def test_domain_adapt_pretrains_on_the_target_corpus_then_finetunes(tiny_setup):
    """domain_adapt: the pretraining stage reads the fine-tuning data's own corpus (no corpus named
    in the recipe), is not evaluated itself, and the few-shot stage starts from its weights."""
    from safetensors.torch import load_file

    root = tiny_setup
    recipe = root / "adapt.yaml"
    recipe.write_text(f"""
base: domain_adapt_cpu
pretrain:
  overrides: [train.max_steps=2, train.per_device_batch_size=4, pairs.chunk_length=16,
              pairs.n_pairs=2, method.queue_size=16, data.cache_dir={root / 'pcache'}]
""")
    result = main(["--recipe", str(recipe), *common_overrides(root, "adapt"),
                   f"data.path={root / 'beir'}", "data.max_queries=4", "train.seed=7"])
    out = root / "adapt"
    assert result["step"] == 2 and 0.0 <= result["nDCG@10"] <= 1.0
    pre = (out / "pretrain" / "recipe.yaml").read_text()
    assert str(root / "beir") in pre and "scifact" not in pre
    assert "\n  seed: 7\n" in pre  # both stages take the recipe's seed
    assert not (out / "pretrain" / "metrics.json").exists()  # the intermediate model: no test eval
    pretrained = load_file(str(out / "pretrain" / "model" / "model.safetensors"))
    student = load_file(str(root / "student" / "model.safetensors"))
    assert any(not torch.equal(pretrained[k], student[k]) for k in student)  # pretraining moved it
    final = load_file(str(out / "model" / "model.safetensors"))
    assert any(not torch.equal(final[k], pretrained[k]) for k in final)
    # benchmarks/quality.py records a run of several stages by its last stage's metrics
    final = final_stage(out)
    assert final == out / "stages" / "main"
    assert json.loads((final / "metrics.json").read_text())["nDCG@10"] == result["nDCG@10"]
    assert (final / "eval" / "run.trec").is_file()  # the per-query scores its p-values come from
    # the final model's card: this recipe, its command, its metrics; the pretraining stage its own
    card = (out / "model" / "README.md").read_text()
    assert "# twotower-adapt" in card and "model-index" in card
    assert f"twotower finetune --recipe {recipe} " in card  # the command, not pytest's
    assert "# twotower-" in (out / "pretrain" / "model" / "README.md").read_text()


def test_domain_adapt_pretraining_corpus_follows_the_data_kind(tmp_path):
    """The pretraining corpus of domain_adapt is the target data's: a BEIR folder, an MS MARCO
    collection file; data without a corpus (triples) must name one instead of silently
    pretraining on the pretraining recipe's own default corpus."""
    from twotower.finetune.run import run_domain_pretraining, target_corpus

    (tmp_path / "ms").mkdir()
    (tmp_path / "ms" / "passages.tsv").write_text("p1\tsome text\n")
    beir = load_recipe(FinetuneRecipe, "domain_adapt", ["data.path=/x/beir"])
    assert target_corpus(beir) == "/x/beir"
    ms = load_recipe(FinetuneRecipe, "domain_adapt", ["data.kind=msmarco", "data.mine.retriever=",
                                                     f"data.path={tmp_path / 'ms'}",
                                                     "data.collection=passages.tsv"])
    assert target_corpus(ms) == str(tmp_path / "ms" / "passages.tsv")
    # label-free sentence queries (data.kind=sentences) read either layout
    (tmp_path / "beir").mkdir()
    for folder, expected in ((tmp_path / "beir", str(tmp_path / "beir")),
                             (tmp_path / "ms", str(tmp_path / "ms" / "passages.tsv"))):
        sentences = load_recipe(FinetuneRecipe, "domain_adapt", [
            "data.kind=sentences", f"data.path={folder}", "data.collection=passages.tsv"])
        assert target_corpus(sentences) == expected
    triples = load_recipe(FinetuneRecipe, "domain_adapt", ["data.kind=triples", "data.mine.retriever=",
                                                          f"data.path={tmp_path / 't.tsv'}",
                                                          f"train.output_dir={tmp_path / 'out'}"])
    assert target_corpus(triples) == ""
    with pytest.raises(RecipeError, match=r"pretrain\.overrides"):
        run_domain_pretraining(triples, resume=False)
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_domain_adapt_pretraining_stage_is_the_measured_one(tmp_path, monkeypatch):
    """domain_adapt's pretraining stage, as its driver launches it, trains the settings issue #24
    chose on the dev split (300 steps, not domain_pretrain's epoch of the corpus; no dropout),
    `domain_pretrain` alone keeps its own, and a user's pretrain.overrides replace the recipe's
    list, as its comment says."""
    def launched(overrides: list[str]):
        argv = []
        monkeypatch.setattr(finetune_run, "pretrain_main", argv.extend)
        recipe = load_recipe(FinetuneRecipe, "domain_adapt", [
            "data.path=/x/beir", f"train.output_dir={tmp_path / 'out'}", *overrides])
        finetune_run.run_domain_pretraining(recipe, resume=False)
        assert argv[0] == "--recipe" and "--resume" not in argv
        return load_recipe(PretrainRecipe, argv[1], argv[2:])

    stage = launched([])
    assert (stage.train.epochs, stage.train.max_steps) == (0, 300)  # epochs 0: max_steps decides
    assert (stage.model.attention_dropout, stage.model.hidden_dropout) == (0, 0)
    assert stage.data.corpora == ["/x/beir"]
    alone = load_recipe(PretrainRecipe, "domain_pretrain", [])
    assert alone.train.epochs == 1 and alone.model.attention_dropout is None
    stage = launched(["pretrain.overrides=[train.max_steps=50]"])
    assert stage.train.max_steps == 50 and stage.train.epochs == 1  # the list was replaced
    assert stage.model.attention_dropout is None


def test_runs_with_different_mixed_precision_share_one_process(tiny_setup):
    """Accelerate keeps mixed precision process-wide and refuses a change; a process that trains
    several runs in turn (domain_adapt, a notebook, this test session) must still get each run's."""
    root = tiny_setup
    for i, precision in enumerate(("no", "bf16", "no")):
        result = main(["--recipe", "fewshot", *common_overrides(root, f"mp-{i}"),
                       f"data.path={root / 'beir'}", "data.max_queries=4",
                       f"train.mixed_precision={precision}"])
        assert result["step"] == 2


def test_length_grouped_margin_mse_run(tiny_setup, tmp_path):
    """data.length_grouped end to end: Margin-MSE from the scores in a jsonl, batches of groups of
    similar length, a model trained and saved."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({
        "query": f"question {i}", "positives": [f"answer {i} " + "fact " * (i % 7) * 5],
        "negatives": [f"other {i} " + "noise " * (i % 7) * 5], "scores": [5.0, float(i % 3)]}) + "\n"
        for i in range(16)))
    result = main(["--recipe", "fewshot", *common_overrides(tiny_setup, "grouped"),
                   "data.kind=jsonl", f"data.path={data}", "data.mine.retriever=",
                   "loss.infonce.weight=0", "loss.margin_mse.weight=1", "data.length_grouped=true",
                   "train.epochs=0", "train.min_steps=0"])
    out = tiny_setup / "grouped"
    assert result["step"] == 2 and (out / "model" / "config.json").is_file()
    saved = load_recipe(FinetuneRecipe, str(out / "recipe.yaml"))
    assert saved.data.length_grouped and saved.loss.active() == {"margin_mse": 1.0}
