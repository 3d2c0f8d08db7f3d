"""Label-free distillation (issue #26): the listwise KL loss against its formula recomputed, the
fusion teacher's scores against min-max + weights recomputed from independent BM25 and dense
scores, recipe checks, and recipe domain_distil run end to end on a corpus alone."""
import math
import sqlite3

import pytest
import torch

from tests.test_finetune_sentences import data_overrides, write_corpus
from twotower.common.eval.bm25 import BM25Index
from twotower.common.model.encoder import Encoder, tiny_bert
from twotower.common.recipe.config import RecipeError, load_recipe
from twotower.finetune.args import FinetuneRecipe, ListwiseKLArgs, TeacherArgs
from twotower.finetune.fusion_teacher import FusionTeacher
from twotower.finetune.losses import GroupEmbeddings, ListwiseKL
from twotower.finetune.sources import build_pool, required_pairs
from twotower.finetune.teacher import Teacher


@pytest.mark.parametrize("positive", [True, False])
def test_listwise_kl_is_the_teacher_student_kl_over_each_candidate_list(positive):
    torch.manual_seed(0)
    b, k, h = 3, 4, 8
    q, pos, neg = torch.randn(b, h), torch.randn(b, h), torch.randn(b, k, h)
    t_pos, t_neg = torch.rand(b), torch.rand(b, k)
    loss, _ = ListwiseKL(ListwiseKLArgs(weight=1.0, temperature=0.5, teacher_temperature=0.2,
                                        positive=positive))(
        GroupEmbeddings(q, pos, neg, teacher_pos=t_pos, teacher_neg=t_neg))
    expected = 0.0
    for i in range(b):  # the positive first, unless left out of the list
        s = [float(q[i] @ pos[i]) / 0.5] * positive + [float(q[i] @ neg[i, j]) / 0.5
                                                       for j in range(k)]
        t = [float(t_pos[i]) / 0.2] * positive + [float(t_neg[i, j]) / 0.2 for j in range(k)]
        zs, zt = sum(math.exp(x) for x in s), sum(math.exp(x) for x in t)
        expected += sum(math.exp(tj) / zt * (math.log(math.exp(tj) / zt) - math.log(math.exp(sj) / zs))
                        for tj, sj in zip(t, s))
    assert float(loss) == pytest.approx(expected / b, rel=1e-5)
    with pytest.raises(ValueError, match="teacher scores"):
        ListwiseKL(ListwiseKLArgs(weight=1.0))(GroupEmbeddings(q, pos, neg))


def _pool(tmp_path):
    folder, _ = write_corpus(tmp_path / "c")
    recipe = load_recipe(FinetuneRecipe, "fewshot", data_overrides(
        folder, "data.mine.retriever=bm25", "data.mine.n=4", "data.mine.skip_top=0"))
    return build_pool(recipe.data)


def test_fusion_teacher_is_weighted_min_max_of_bm25_and_dense(tmp_path):
    pool = _pool(tmp_path)
    tiny_bert(dropout=0.0, normalize=True).save(tmp_path / "dense")
    kept_q, kept_p = pool.groups[0].qid, pool.groups[0].negatives[0]
    pool.teacher[kept_q] = {kept_p: 123.0}  # a score the pool holds is kept: only missing pairs are written
    pairs = required_pairs(pool, with_neg_queries=False)
    teacher = FusionTeacher(TeacherArgs(model=str(tmp_path / "dense"), kind="fusion",
                                        dense_weight=0.3), cache_path=tmp_path / "cache.sqlite")
    assert teacher.fill_pool(pool, pairs) == len(pairs) - 1
    assert teacher.fill_pool(pool, pairs) == 0
    teacher.close()
    # independently: BM25 over the corpus as a list, the encoder's embeddings one text at a time
    corpus = [{"id": d, "text": pool.docs[d]} for d in pool.docs.ids]
    bm25 = BM25Index(corpus, progress=False)
    encoder = Encoder.load(str(tmp_path / "dense"))
    by_query = {}
    for q, p in pairs:
        by_query.setdefault(q, []).append(p)
    checked = 0
    for q, docs in by_query.items():
        lexical = bm25.score_candidates([q], [pool.queries[q]], {q: docs})[q]
        eq = encoder.encode([pool.queries[q]], tower="query", progress=False)[0]
        dense = {d: float(eq @ encoder.encode([pool.docs[d]], tower="doc", progress=False)[0])
                 for d in docs}

        def minmax(scores):
            low, high = min(scores.values()), max(scores.values())
            return {d: (s - low) / (high - low) if high > low else 1.0 for d, s in scores.items()}
        lo, de = minmax(lexical), minmax(dense)
        for d in docs:
            if (q, d) == (kept_q, kept_p):
                assert pool.teacher[q][d] == 123.0
                continue
            assert pool.teacher[q][d] == pytest.approx(0.7 * lo[d] + 0.3 * de[d], abs=1e-5)
            checked += 1
    assert checked == len(pairs) - 1 > 10
    assert any(0 < s < 1 for scores in pool.teacher.values() for s in scores.values())


def test_a_teacher_kind_typo_is_an_error_not_a_bi_encoder(tmp_path):
    tiny_bert().save(tmp_path / "m")
    with pytest.raises(ValueError, match="'cross-encoder'"):
        Teacher(TeacherArgs(model=str(tmp_path / "m"), kind="cross-encoder"))
    with pytest.raises(ValueError, match="'fusion'"):  # fusion is FusionTeacher's, not a model's
        Teacher(TeacherArgs(model=str(tmp_path / "m"), kind="fusion"))


def test_recipe_checks_of_the_fusion_teacher_and_listwise_kl(tmp_path):
    base = ["teacher.model=m", "teacher.kind=fusion"]
    with pytest.raises(RecipeError, match="teacher.dense_weight"):
        load_recipe(FinetuneRecipe, "fewshot", [*base, "teacher.dense_weight=1.5"])
    with pytest.raises(RecipeError, match="pseudo"):
        load_recipe(FinetuneRecipe, "fewshot", [*base, "data.kind=pseudo", "data.mine.retriever="])
    with pytest.raises(RecipeError, match="mix"):
        load_recipe(FinetuneRecipe, "fewshot", [*base, "data.teacher_scores=s.jsonl"])
    with pytest.raises(RecipeError, match="loss.listwise_kl.teacher_temperature"):
        load_recipe(FinetuneRecipe, "fewshot", ["loss.listwise_kl.teacher_temperature=0"])
    with pytest.raises(RecipeError, match="n_negatives' must be >= 2"):
        load_recipe(FinetuneRecipe, "domain_distil", ["loss.listwise_kl.weight=1",
                                                      "loss.listwise_kl.positive=false",
                                                      "data.n_negatives=1"])
    with pytest.raises(RecipeError, match="loss.listwise_kl needs teacher scores"):
        load_recipe(FinetuneRecipe, "fewshot", ["loss.listwise_kl.weight=1"])
    recipe = load_recipe(FinetuneRecipe, "domain_distil", [])
    assert recipe.teacher.kind == "fusion" and recipe.data.kind == "sentences"
    assert recipe.loss.needs_teacher_scores()



def test_domain_adapt_distil_runs_domain_distil_then_fewshot():
    """Its stages repeat the two recipes' data and loss (a stage is not a recipe): kept in step
    here, so a change to domain_distil or fewshot that the combination misses fails."""
    both = load_recipe(FinetuneRecipe, "domain_adapt_distil", [])
    distil, fewshot = (load_recipe(FinetuneRecipe, r, []) for r in ("domain_distil", "fewshot"))
    assert [name for name, _ in both.stage_list()] == ["distil", "labelled"]
    assert both.stages["distil"].data == distil.data and both.stages["distil"].loss == distil.loss
    assert both.teacher == distil.teacher and both.model == distil.model == fewshot.model
    batch = distil.train.per_device_batch_size
    assert both.stages["distil"].max_steps == distil.train.epochs * distil.data.max_queries // batch
    labelled = both.stages["labelled"]
    assert labelled.data == fewshot.data and labelled.loss == fewshot.loss
    assert labelled.max_steps == 0 and both.train.epochs == fewshot.train.epochs

@pytest.mark.parametrize("loss", ["margin_mse", "listwise_kl", "listwise_kl_negatives"])
def test_domain_distil_trains_on_a_corpus_alone(tmp_path, loss):
    from twotower.finetune.run import main
    folder, _ = write_corpus(tmp_path / "c")
    tiny_bert(dropout=0.0, normalize=True).save(tmp_path / "student")
    model = str(tmp_path / "student")
    terms = {"margin_mse": ["loss.margin_mse.weight=1.0", "loss.listwise_kl.weight=0"],
             "listwise_kl": ["loss.margin_mse.weight=0", "loss.listwise_kl.weight=1.0"],
             "listwise_kl_negatives": ["loss.margin_mse.weight=0", "loss.listwise_kl.weight=1.0",
                                       "loss.listwise_kl.positive=false"]}[loss]
    result = main(["--recipe", "domain_distil", f"data.path={folder}", "data.sentences.punkt=train",
                   f"data.mine.model={model}", f"teacher.model={model}",
                   f"model.name_or_path={model}", f"train.output_dir={tmp_path / 'run'}",
                   "train.per_device_batch_size=2", "data.n_negatives=2", "train.epochs=0",
                   "train.max_steps=2",
                   "train.warmup_steps=0", "model.max_doc_length=32", "eval.data=", *terms])
    assert result["step"] == 2
    start = Encoder.load(model).state_dict()
    trained = Encoder.load(str(tmp_path / "run" / "model")).state_dict()
    assert any(not torch.equal(start[k], trained[k]) for k in start)
    with sqlite3.connect(tmp_path / "teacher_cache.sqlite") as db:  # the dense side, cached
        assert db.execute("SELECT COUNT(*) FROM scores").fetchone()[0] > 0


def test_domain_adapt_distil_runs_the_distil_stage_then_the_labelled_one(tmp_path, monkeypatch):
    """Both stages end to end on a tiny BEIR folder: the label-free stage from the start model,
    the labelled stage from its model; the final model is the labelled stage's."""
    import json

    from twotower.finetune import run as R
    started_from = []
    build = R.build_stage
    monkeypatch.setattr(R, "build_stage", lambda recipe, stage, model_path, *a, **k: (
        started_from.append(str(model_path)), build(recipe, stage, model_path, *a, **k))[1])
    main = R.main
    folder, docs = write_corpus(tmp_path / "c")
    (folder / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"q{i}", "text": d["text"].split(".")[1]}) + "\n"
        for i, d in enumerate(docs)))
    (folder / "qrels").mkdir()
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\t{d['_id']}\t1\n" for i, d in enumerate(docs)))
    tiny_bert(dropout=0.0, normalize=True).save(tmp_path / "start")
    model, out = str(tmp_path / "start"), tmp_path / "run"
    main(["--recipe", "domain_adapt_distil", f"model.name_or_path={model}",
          f"teacher.model={model}", f"stages.distil.data.mine.model={model}",
          f"stages.distil.data.path={folder}", "stages.distil.data.sentences.punkt=train",
          "stages.distil.data.n_negatives=2", "stages.distil.max_steps=2",
          f"stages.labelled.data.path={folder}", "stages.labelled.max_steps=2",
          f"train.output_dir={out}", "train.per_device_batch_size=2", "train.warmup_steps=0",
          "model.max_doc_length=32", "eval.data="])
    weights = {name: Encoder.load(str(path)).state_dict() for name, path in (
        ("start", model), ("distil", out / "stages" / "distil" / "model"),
        ("labelled", out / "stages" / "labelled" / "model"), ("final", out / "model"))}
    differ = lambda a, b: any(not torch.equal(weights[a][k], weights[b][k]) for k in weights[a])
    assert differ("start", "distil") and differ("distil", "labelled")
    assert not differ("labelled", "final")
    assert started_from == [model, str(out / "stages" / "distil" / "model")]
