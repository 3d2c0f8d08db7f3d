"""Hard-negative mining: never a positive, rank window, false-negative filters, the jsonl output."""
import dataclasses
import json

import numpy as np
import pytest

from tests.test_beir_protocol import write_colliding_beir
from twotower.common.data import load_beir, load_hard_negatives
from twotower.common.eval.bm25 import BM25Index
from twotower.common.model.encoder import tiny_bert
from twotower.common.recipe.config import RecipeError, load_recipe
from twotower.finetune.args import FinetuneRecipe
from twotower.finetune.mine import MineArgs, main, mine

TOPICS = ["mangrove", "herpes", "volcano", "protein", "glacier"]


def write_beir(folder):
    folder.mkdir(parents=True, exist_ok=True)
    docs, queries, qrels = [], [], []
    for t, topic in enumerate(TOPICS):
        queries.append({"_id": f"q{t}", "text": f"{topic} facts"})
        for i in range(8):  # 8 documents per topic, all sharing the topic word
            docs.append({"_id": f"{topic}{i}", "title": "", "text": f"{topic} facts " + "x " * i + f"doc {i}"})
        qrels += [(f"q{t}", f"{topic}0", 1), (f"q{t}", f"{topic}1", 2), (f"q{t}", f"{topic}2", 0)]
    # a copy of a positive under another id: must not become a negative either
    docs.append({"_id": "dup", "title": "", "text": docs[0]["text"]})
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels").mkdir(exist_ok=True)
    (folder / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{r}\n" for q, d, r in qrels))
    return load_beir(folder, "train")


def bm25_ranking(data, qid):
    queries = dict(zip(data.queries["id"], data.queries["text"]))
    run = BM25Index(data.corpus).search([qid], [queries[qid]], 100)[qid]
    return [d for d, _ in sorted(run.items(), key=lambda kv: -kv[1])]


def test_mined_negatives_never_contain_a_positive(tmp_path):
    data = write_beir(tmp_path / "beir")
    mined = mine(data, MineArgs(retriever="bm25", depth=50, n=50))
    for t, topic in enumerate(TOPICS):
        row = mined[f"q{t}"]
        assert row["pos"] == [f"{topic}0", f"{topic}1"]  # relevance > 0; grade 0 is not positive
        assert not set(row["neg"]) & {f"{topic}0", f"{topic}1", "dup" if t == 0 else f"{topic}1"}
        assert row["neg"], "every query has candidates left"


def test_rank_window_and_sampling(tmp_path):
    data = write_beir(tmp_path / "beir")
    positives = {"mangrove0", "mangrove1", "dup"}
    ranked = [d for d in bm25_ranking(data, "q0") if d not in positives]
    args = MineArgs(retriever="bm25", depth=50, skip_top=2, window=4, n=4)
    assert mine(data, args)["q0"]["neg"] == ranked[2:6]  # n = window: the window, in rank order
    args = MineArgs(retriever="bm25", depth=50, skip_top=1, window=5, n=2, seed=3)
    first = mine(data, args)["q0"]["neg"]
    assert len(first) == 2 and set(first) <= set(ranked[1:6])
    assert first == sorted(first, key=ranked.index) and first == mine(data, args)["q0"]["neg"]


class FakeTeacher:
    def score(self, queries, passages):
        # "x" repetitions: the more, the lower the score; positives (no x) score highest
        return np.array([10.0 - p.count(" x") for p in passages])


def test_false_negative_filters(tmp_path):
    data = write_beir(tmp_path / "beir")
    kept = mine(data, MineArgs(retriever="bm25", depth=50, n=50, teacher_margin=4.5), FakeTeacher())
    for t in range(len(TOPICS)):
        # positives: topic0 (0 x) and topic1 (1 x) -> min positive score 9; keep t < 4.5, that
        # is documents i >= 6 (of any topic: "facts" matches them all)
        assert kept[f"q{t}"]["neg"] and all(int(d[-1]) >= 6 for d in kept[f"q{t}"]["neg"])
    full = mine(data, MineArgs(retriever="bm25", depth=50, n=50))
    queries = dict(zip(data.queries["id"], data.queries["text"]))
    scores = BM25Index(data.corpus).search(["q0"], [queries["q0"]], 50)["q0"]
    distinct = sorted({scores[d] for d in full["q0"]["neg"]})
    assert len(distinct) >= 2  # same-topic documents score above the others
    ceiling = distinct[-1]
    capped = mine(data, MineArgs(retriever="bm25", depth=50, n=50, max_score=ceiling))
    assert capped["q0"]["neg"] and all(scores[d] < ceiling for d in capped["q0"]["neg"])
    assert len(capped["q0"]["neg"]) < len(full["q0"]["neg"])
    below = mine(data, MineArgs(retriever="bm25", depth=50, n=50, max_pos_ratio=1.0))
    pos_score = min(scores[d] for d in ("mangrove0", "mangrove1"))
    assert below["q0"]["neg"] and all(scores[d] < pos_score for d in below["q0"]["neg"])
    assert not any(d.startswith("mangrove") for d in below["q0"]["neg"])
    with pytest.raises(ValueError, match="needs --teacher"):
        mine(data, MineArgs(retriever="bm25", teacher_margin=1.0))


def test_recipe_mining_applies_the_false_negative_filter(tmp_path):
    """data.mine.max_pos_ratio in a recipe reaches the miner: the training pool keeps only
    negatives scoring below the ratio times the query's weakest positive."""
    from twotower.finetune.args import DataArgs, MiningArgs
    from twotower.finetune.sources import build_pool

    data = write_beir(tmp_path / "beir")
    queries = dict(zip(data.queries["id"], data.queries["text"]))
    scores = BM25Index(data.corpus).search(["q0"], [queries["q0"]], 50)["q0"]

    def negatives(**filters):
        args = DataArgs(kind="beir", path=str(tmp_path / "beir"), split="train",
                        mine=MiningArgs(retriever="bm25", depth=50, n=50, **filters))
        args.mine.validate()
        return {g.qid: g.negatives for g in build_pool(args).groups}["q0"]

    unfiltered, filtered = negatives(), negatives(max_pos_ratio=0.8)
    ceiling = 0.8 * min(scores["mangrove0"], scores["mangrove1"])
    assert filtered and all(scores[d] < ceiling for d in filtered)
    assert set(filtered) == {d for d in unfiltered if scores[d] < ceiling} != set(unfiltered)
    with pytest.raises(Exception, match="max_pos_ratio"):
        MiningArgs(retriever="bm25", max_pos_ratio=0).validate()


def test_dense_mining_and_the_cli_output(tmp_path):
    write_beir(tmp_path / "beir")
    model = tiny_bert(dropout=0.0)
    model.save(tmp_path / "model")
    out = tmp_path / "negs.jsonl"
    argv = ["--data", str(tmp_path / "beir"), "--split", "train", "--retriever", "dense",
            "--model", str(tmp_path / "model"), "--skip-top", "1", "--n", "3", "--output", str(out)]
    assert main(argv) == 0
    table = load_hard_negatives(out)
    assert len(table) == len(TOPICS)
    for row in table:
        assert len(row["neg"]) == 3 and not set(row["neg"]) & set(row["pos"])
        assert set(row["neg_system"]) == {"dense:model"}
    assert main(argv) == 2  # refuses to overwrite without --overwrite


def test_mining_bf16_and_compile_reach_the_encoder(tmp_path, encode_options_seen):
    """--bf16/--compile (CLI) and data.mine.bf16/compile (recipes) set what dense mining's encode
    calls use."""
    from twotower.finetune.args import DataArgs, MiningArgs
    from twotower.finetune.sources import build_pool

    write_beir(tmp_path / "beir")
    tiny_bert(dropout=0.0).save(tmp_path / "model")
    seen = encode_options_seen
    assert main(["--data", str(tmp_path / "beir"), "--retriever", "dense", "--model",
                 str(tmp_path / "model"), "--n", "3", "--output", str(tmp_path / "n.jsonl"),
                 "--bf16", "--compile"]) == 0
    assert seen and set(seen) == {(True, True)}
    seen.clear()
    build_pool(DataArgs(kind="beir", path=str(tmp_path / "beir"), mine=MiningArgs(
        retriever="dense", model=str(tmp_path / "model"), n=3, bf16=True)))
    assert seen and set(seen) == {(True, False)}


def test_two_process_dense_mining_equals_one_process(tmp_path):
    """Under `accelerate launch` each process encodes half of the corpus and queries; the gathered
    embeddings give the same negatives as a single process, and only one process writes."""
    import os
    from pathlib import Path

    from tests.dist_utils import launch_prefix, run_to_end

    repo = Path(__file__).resolve().parents[1]
    write_beir(tmp_path / "beir")
    tiny_bert(dropout=0.0).save(tmp_path / "model")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
    args = ["-m", "twotower.finetune.mine", "--data", str(tmp_path / "beir"), "--split", "train",
            "--retriever", "dense", "--model", str(tmp_path / "model"), "--skip-top", "1",
            "--n", "4", "--batch-size", "3"]
    one = run_to_end([*launch_prefix(1), *args, "--output", str(tmp_path / "one.jsonl")],
                     env=env, cwd=repo)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_to_end([*launch_prefix(2), *args, "--output", str(tmp_path / "two.jsonl")],
                     env=env, cwd=repo)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads(two.stdout[two.stdout.index("{"):])["processes"] == 2
    assert json.loads(one.stdout[one.stdout.index("{"):])["processes"] == 1
    rows_one = load_hard_negatives(tmp_path / "one.jsonl").to_list()
    assert rows_one == load_hard_negatives(tmp_path / "two.jsonl").to_list()
    assert len(rows_one) == len(TOPICS) and all(len(r["neg"]) == 4 for r in rows_one)


@pytest.mark.timeout(600)
def test_two_process_recipe_with_dense_mining_equals_one_process_with_doubled_batch(tmp_path):
    """data.mine with a dense miner in a 2-process run of finetune/run.py: mining is collective
    (each process encodes a slice), so it must not run inside the one-process-at-a-time reading
    of the data (it used to hang there: the main process gathered while the other waited at a
    barrier); the run ends where 1 process with the doubled batch ends."""
    from tests.test_grad_cache_runs import final_weights, finetune_overrides, run

    write_beir(tmp_path / "beir")
    tiny_bert(dropout=0.0).save(tmp_path / "miner")
    dense = f"data.mine={{retriever: dense, model: {tmp_path / 'miner'}, depth: 20, window: 6, n: 3}}"
    for name, batch, processes in (("one", 2, 1), ("two", 1, 2)):
        proc = run([*finetune_overrides(tmp_path / "beir", tmp_path / name), dense,
                    f"train.per_device_batch_size={batch}"], processes=processes)
        assert proc.stderr.count("mined dense negatives") == processes  # the dense miner ran
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst <= 5e-5, f"2 processes differ from 1 process by {worst}"


def _bm25_mining_in_two(rank, world, folder):
    import twotower.finetune.mine as M

    calls = []
    real = M.mine

    def counted(*args, **kwargs):
        calls.append(rank)
        return real(*args, **kwargs)
    M.mine = counted
    args = MineArgs(retriever="bm25", depth=20, window=6, n=3)
    return M.mine_together(load_beir(folder, "train"), args), args.stats, calls


def test_bm25_mining_of_two_processes_ranks_once_and_sends_the_result(tmp_path):
    """mine_together with BM25: only the main process builds an index and ranks; the other gets
    the same negatives (and counts) as a single process computes."""
    from tests.dist_utils import run_distributed

    data = write_beir(tmp_path / "beir")
    args = MineArgs(retriever="bm25", depth=20, window=6, n=3)
    alone = mine(data, args)
    (mined0, stats0, calls0), (mined1, stats1, calls1) = run_distributed(
        _bm25_mining_in_two, 2, (tmp_path / "beir",))
    assert mined0 == mined1 == alone and stats0 == stats1 == args.stats
    assert calls0 == [0] and calls1 == []


def test_hybrid_mining_ranks_by_the_fused_run(tmp_path):
    """--retriever hybrid mines from BM25 and dense fused (common/eval/fusion.py): with all the
    weight on BM25 it is BM25's mining; RRF draws from both runs; the filters on a retriever's own
    scores are refused (a fused score has no such scale), in the CLI and in a recipe."""
    data = write_beir(tmp_path / "beir")
    tiny_bert(dropout=0.0).save(tmp_path / "model")
    common = dict(depth=50, n=50, model=str(tmp_path / "model"))
    bm25 = mine(data, MineArgs(retriever="bm25", depth=50, n=50))
    all_bm25 = mine(data, MineArgs(retriever="hybrid", fusion="wsum", dense_weight=0.0, **common))
    scores = {q: BM25Index(data.corpus).search([q], [t], 50)[q] for q, t in zip(
        data.queries["id"], data.queries["text"])}
    for q, row in all_bm25.items():  # BM25's candidates in BM25's order (ties broken by id)
        assert sorted(row["neg"]) == sorted(bm25[q]["neg"])
        ranked = [scores[q].get(d, 0.0) for d in row["neg"]]
        assert ranked == sorted(ranked, reverse=True)
    fused = mine(data, MineArgs(retriever="hybrid", **common))
    dense = mine(data, MineArgs(retriever="dense", **common))
    for q, row in fused.items():
        assert not set(row["neg"]) & set(row["pos"])
        assert set(row["neg"]) <= set(bm25[q]["neg"]) | set(dense[q]["neg"])
    with pytest.raises(ValueError, match="fused"):
        mine(data, MineArgs(retriever="hybrid", max_pos_ratio=0.9, **common))
    out = tmp_path / "negs.jsonl"
    assert main(["--data", str(tmp_path / "beir"), "--retriever", "hybrid", "--model",
                 str(tmp_path / "model"), "--n", "2", "--output", str(out)]) == 0
    assert {s for row in load_hard_negatives(out) for s in row["neg_system"]} == {
        "hybrid-rrf:model"}
    with pytest.raises(RecipeError, match="hybrid"):
        load_recipe(FinetuneRecipe, "fewshot_cpu", ["data.mine.retriever=hybrid",
                                                   f"data.mine.model={tmp_path / 'model'}",
                                                   "data.mine.max_score=0.9"])


def test_the_querys_own_document_is_never_its_negative(tmp_path):
    """ArguAna's shape (a query is a corpus document under the same id): the evaluation ignores
    that document (BEIR's ignore_identical_ids), so mining must not train against it either."""
    write_colliding_beir(tmp_path / "arguana_like")
    (tmp_path / "arguana_like" / "qrels" / "test.tsv").rename(
        tmp_path / "arguana_like" / "qrels" / "train.tsv")
    data = load_beir(tmp_path / "arguana_like", "train")
    mined = mine(data, MineArgs(retriever="bm25", depth=50, n=50))
    assert all(q not in row["neg"] and row["neg"] for q, row in mined.items())
    args = MineArgs(retriever="bm25", depth=50, n=50)
    mine(data, args)
    assert args.stats["dropped_identical_id"] == len(mined)  # each query retrieved itself


@pytest.mark.parametrize("normalize", [True, False])
def test_dense_mining_through_on_disk_shards_equals_in_ram(tmp_path, normalize):
    """--shards: the corpus embeddings on disk, searched shard by shard, positives' scores read
    back from the shards (the --max-pos-ratio filter uses them): the same negatives and counts."""
    data = write_beir(tmp_path / "beir")
    # without the copy of mangrove0: exact ties are ordered by row here, by faiss' choice there
    data = dataclasses.replace(data, corpus=data.corpus.filter(lambda row: row["id"] != "dup"))
    tiny_bert(dropout=0.0, normalize=normalize).save(tmp_path / "model")
    common = dict(retriever="dense", model=str(tmp_path / "model"), skip_top=1, n=4,
                  max_pos_ratio=1.0)
    in_ram = MineArgs(**common)
    on_disk = MineArgs(**common, shards=str(tmp_path / "emb"), shards_dtype="float32")
    expected = mine(data, in_ram)
    assert mine(data, on_disk) == expected and on_disk.stats == in_ram.stats
    assert in_ram.stats["dropped_pos_ratio"] > 0  # the positives' scores were used
    assert (tmp_path / "emb" / "manifest.json").is_file()
    assert mine(data, on_disk) == expected  # the shards are reused
    with pytest.raises(ValueError, match="not with --retriever bm25"):
        mine(data, MineArgs(retriever="bm25", shards=str(tmp_path / "emb")))


def test_recipe_mining_shards_reach_the_miner(tmp_path):
    from twotower.finetune.args import DataArgs, MiningArgs
    from twotower.finetune.sources import build_pool

    write_beir(tmp_path / "beir")
    tiny_bert(dropout=0.0).save(tmp_path / "model")
    build_pool(DataArgs(kind="beir", path=str(tmp_path / "beir"), mine=MiningArgs(
        retriever="dense", model=str(tmp_path / "model"), n=3, shards=str(tmp_path / "emb"))))
    assert json.loads((tmp_path / "emb" / "manifest.json").read_text())["rows"] == 41
    with pytest.raises(RecipeError, match="data.mine.shards"):
        MiningArgs(retriever="bm25", shards=str(tmp_path / "emb")).validate()
