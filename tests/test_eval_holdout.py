"""A dev split carved from the training queries (eval.holdout): a seeded, order-independent choice;
the evaluation sees only those queries, and fine-tuning on the same data never trains on them
(nor on any other split's query texts, as random negative queries)."""
import json
import random

import pytest

from tests.test_finetune_mine import TOPICS, write_beir
from twotower.common.eval.evaluate import eval_args_data, holdout_queries
from twotower.common.model.encoder import tiny_bert
from twotower.common.recipe.args import EvalArgs
from twotower.common.recipe.config import load_recipe
from twotower.finetune.args import FinetuneRecipe
from twotower.finetune.run import build_stage, dev_queries

QIDS = [f"q{i}" for i in range(50)]


def test_holdout_is_seeded_sized_and_independent_of_order():
    dev = holdout_queries(QIDS, 10, seed=0)
    assert len(dev) == len(set(dev)) == 10 and set(dev) <= set(QIDS)
    shuffled = QIDS[:]
    random.Random(1).shuffle(shuffled)
    assert set(holdout_queries(shuffled, 10, seed=0)) == set(dev)
    assert holdout_queries(shuffled, 10, seed=0) == [q for q in shuffled if q in set(dev)]
    assert set(holdout_queries(QIDS, 10, seed=1)) != set(dev)
    assert set(holdout_queries(QIDS, 5, seed=0)) < set(dev)  # nested: a smaller dev split is inside
    for n in (0, 50, 60):
        with pytest.raises(ValueError, match="holdout"):
            holdout_queries(QIDS, n)


def test_evaluation_data_is_restricted_to_the_dev_queries(tmp_path):
    write_beir(tmp_path / "beir")
    full = eval_args_data(EvalArgs(data=str(tmp_path / "beir"), split="train"))
    dev = eval_args_data(EvalArgs(data=str(tmp_path / "beir"), split="train", holdout=2,
                                  holdout_seed=3))
    assert len(full.qrels) == len(TOPICS) and len(dev.qrels) == 2
    assert set(dev.qrels) == set(holdout_queries(sorted(full.qrels), 2, seed=3))
    assert sorted(dev.queries["id"]) == sorted(dev.qrels)
    assert all(dev.qrels[q] == full.qrels[q] for q in dev.qrels)
    assert len(dev.corpus) == len(full.corpus)


def _recipe(tmp_path, *extra):
    model = tmp_path / "model"
    if not model.exists():
        tiny_bert(dropout=0.0).save(model)
    return load_recipe(FinetuneRecipe, "fewshot_cpu", [
        f"model.name_or_path={model}", f"data.path={tmp_path / 'beir'}", "data.max_queries=0",
        "data.mine={retriever: bm25, depth: 20, skip_top: 0, window: 6, n: 3}",
        "model.max_doc_length=32", *extra])


def _trained_qids(recipe):
    (_, stage), = recipe.stage_list()
    _, dataset, _ = build_stage(recipe, stage, recipe.model.name_or_path, 1)
    return {dataset[i]["qid"] for i in range(len(dataset))}, dataset


def test_finetuning_leaves_the_dev_queries_out(tmp_path):
    write_beir(tmp_path / "beir")
    everything, _ = _trained_qids(_recipe(tmp_path, 'eval.data=""'))
    assert len(everything) == len(TOPICS)
    recipe = _recipe(tmp_path, f"eval.data={tmp_path / 'beir'}", "eval.split=train",
                     "eval.holdout=2")
    (_, stage), = recipe.stage_list()
    dev = dev_queries(recipe, stage)
    assert len(dev) == 2
    trained, _ = _trained_qids(recipe)
    assert trained == everything - set(dev)
    # evaluation on another folder: nothing is held out of this training data
    write_beir(tmp_path / "other")
    other = _recipe(tmp_path, f"eval.data={tmp_path / 'other'}", "eval.split=train",
                    "eval.holdout=2")
    assert dev_queries(other, other.stage_list()[0][1]) == []


def test_random_negative_queries_are_training_queries_only(tmp_path):
    write_beir(tmp_path / "beir")
    with open(tmp_path / "beir" / "queries.jsonl", "a") as f:  # test-split queries share the file
        for i in range(30):
            f.write(json.dumps({"_id": f"test{i}", "text": f"unseen question {i}"}) + "\n")
    recipe = _recipe(tmp_path, f"eval.data={tmp_path / 'beir'}", "eval.split=train",
                     "eval.holdout=1", "data.n_neg_queries=2", "loss.dance_dual.weight=0.1")
    trained, dataset = _trained_qids(recipe)
    dev = set(dev_queries(recipe, recipe.stage_list()[0][1]))
    text_of = {f"q{t}": f"{topic} facts" for t, topic in enumerate(TOPICS)}  # write_beir's
    used = {q for i in range(len(dataset)) for q in dataset[i]["neg_queries"]}  # texts
    assert used and used <= {text_of[q] for q in trained}
    assert not used & {text_of[q] for q in dev}
