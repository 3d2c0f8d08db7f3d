"""Training groups: deterministic sampling, duplicate-free global batches, readers, collation."""
import json

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler

from twotower.common.data import DataError
from twotower.finetune.args import DataArgs
from twotower.finetune.data import GroupCollator, GroupDataset, TextStore, TrainGroup, TrainingPool
from twotower.finetune.sources import build_pool, mine_negative_queries


def make_pool(n=12, n_neg=6, shared_every=0, teacher=False):
    """n groups; with shared_every, every that-many groups reuse one positive text (duplicates)."""
    queries = {f"q{i}": f"query {i}" for i in range(n)}
    docs = {}
    groups = []
    for i in range(n):
        pos = f"p{i}"
        docs[pos] = f"positive of {i // shared_every if shared_every else i}"
        negs = [f"n{i}_{j}" for j in range(n_neg)]
        docs.update({d: f"negative {d}" for d in negs})
        groups.append(TrainGroup(f"q{i}", [pos], negs))
    scores = {}
    if teacher:
        scores = {g.qid: {g.positives[0]: 5.0, **{d: float(j) for j, d in enumerate(g.negatives[:3])}}
                  for g in groups}
    return TrainingPool(groups, TextStore.from_dict(queries), TextStore.from_dict(docs), teacher=scores)


def test_sampling_is_a_pure_function_of_seed_epoch_index():
    pool = make_pool()
    a, b = GroupDataset(pool, 3, seed=7), GroupDataset(pool, 3, seed=7)
    assert a.sample(4, 2) == b.sample(4, 2)
    assert [a.sample(i, 0).negatives for i in range(12)] != [a.sample(i, 1).negatives for i in range(12)]
    a.set_epoch(1)
    assert a[4]["negatives"] == [pool.docs[d] for d in a.sample(4, 1).negatives]


def test_negatives_exclude_positives_and_their_duplicate_texts():
    pool = make_pool(n=4)
    g = pool.groups[0]
    # a negative id that is a positive, and one whose text duplicates the positive's text
    g.negatives = [g.positives[0], "dup", "n0_1", "n0_2"]
    pool.docs = TextStore.from_dict({**{d: pool.docs[d] for d in pool.docs.ids},
                                     "dup": pool.docs[g.positives[0]]})
    ds = GroupDataset(pool, 2, seed=0)
    for epoch in range(20):
        assert sorted(ds.sample(0, epoch).negatives) == ["n0_1", "n0_2"]


def test_short_pool_is_filled_with_random_documents_or_refused():
    pool = make_pool(n=6, n_neg=1)
    ds = GroupDataset(pool, 3, seed=0, short_pool="random")
    for i in range(6):
        s = ds.sample(i, 0)
        assert len(set(s.negatives)) == 3 and pool.groups[i].positives[0] not in s.negatives
        assert pool.groups[i].negatives[0] in s.negatives
    with pytest.raises(ValueError, match="query 'q0' has 1 usable negatives"):
        GroupDataset(pool, 3, seed=0, short_pool="error").sample(0, 0)


def test_teacher_mode_samples_only_scored_negatives_and_returns_scores():
    pool = make_pool(teacher=True)
    ds = GroupDataset(pool, 2, with_teacher=True, seed=0)
    item = ds[3]
    scored = pool.teacher["q3"]
    assert item["teacher_pos"] == 5.0
    for text, score in zip(item["negatives"], item["teacher_neg"]):
        pid = next(d for d in pool.groups[3].negatives if pool.docs[d] == text)
        assert scored[pid] == score
    del pool.teacher["q5"]["p5"]
    with pytest.raises(DataError, match="'q5', 'p5'"):
        GroupDataset(pool, 2, with_teacher=True, seed=0)


def _global_batches(order, per_device, world):
    """Global batches as Accelerate's BatchSamplerShard hands them out (rank r: r-th batch)."""
    from accelerate.data_loader import BatchSamplerShard

    shards = [list(BatchSamplerShard(BatchSampler(order, per_device, drop_last=True), world, r))
              for r in range(world)]
    return [sum((shards[r][t] for r in range(world)), []) for t in range(len(shards[0]))]


@pytest.mark.parametrize("world", [1, 2])
def test_epoch_order_keeps_duplicate_texts_out_of_a_global_batch(world):
    pool = make_pool(n=40, n_neg=3, shared_every=4)  # positives repeat across groups of 4
    per_device = 3
    ds = GroupDataset(pool, 2, seed=1, global_batch_size=per_device * world)
    for epoch in range(3):
        order = ds.epoch_order(epoch, 1)
        assert len(order) % (per_device * world) == 0 and len(set(order)) == len(order)
        batches = _global_batches(order, per_device, world)
        assert sum(map(len, batches)) == len(order)
        for batch in batches:
            texts = [t for i in batch for t in set(ds.texts_of(ds.sample(i, epoch)))]
            assert len(texts) == len(set(texts)), "a text occurs in two groups of one batch"
        assert order == ds.epoch_order(epoch, 1)  # pure function of (seed, epoch)
    assert ds.epoch_order(0, 1) != ds.epoch_order(1, 1)


def _greedy_order(ds, epoch, seed, size):
    """The epoch order's rule, recomputed slowly: walk the shuffled groups, put a group in the
    batch when none of its texts (sets of digests) is there yet; a group no batch can start
    with waits."""
    remaining = list(np.random.default_rng([seed, epoch]).permutation(len(ds)))
    texts = {i: set(ds.texts_of(ds.sample(i, epoch))) for i in remaining}
    order = []
    while len(remaining) >= size:
        batch, seen = [], set()
        for i in remaining:
            if not texts[i] & seen:
                batch.append(i)
                seen |= texts[i]
                if len(batch) == size:
                    break
        if len(batch) < size:
            remaining.pop(0)
            continue
        remaining = [i for i in remaining if i not in batch]
        order += batch
    return order


@pytest.mark.parametrize("n_neg, shared, size, teacher", [(2, 4, 3, False), (1, 3, 4, False),
                                                          (3, 0, 5, False), (2, 5, 2, True)])
def test_epoch_order_is_the_greedy_rule_over_one_digest_array(n_neg, shared, size, teacher):
    """The order built over one uint64 array of digests equals the rule recomputed with a set
    per group (duplicate texts across groups, a teacher's repeated negatives)."""
    ds = GroupDataset(make_pool(n=37, n_neg=n_neg + 1, shared_every=shared, teacher=teacher),
                      n_neg, seed=3, with_teacher=teacher, global_batch_size=size)
    rows = ds._digest_rows(1)
    assert rows.dtype == np.uint64 and rows.shape == (37, 2 + n_neg)
    for epoch in range(3):
        assert ds.epoch_order(epoch, 3) == _greedy_order(ds, epoch, 3, size)


def test_epoch_order_refuses_impossible_batches():
    pool = make_pool(n=6, shared_every=6)  # every group has the same positive text
    with pytest.raises(ValueError, match="no global batch"):
        GroupDataset(pool, 1, seed=0, global_batch_size=2).epoch_order(0, 0)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        GroupDataset(make_pool(n=3), 1, seed=0, global_batch_size=4).epoch_order(0, 0)


def test_negative_queries_are_mined_from_negative_lists():
    pool = make_pool(n=5)
    pool.groups[1].negatives.append("p0")  # q1 lists p0 among its negatives: q1 is a q- of p0
    mine_negative_queries(pool, 1, seed=0, fill_random=False)
    assert pool.neg_queries["p0"] == ["q1"] and pool.neg_queries["p2"] == []
    ds = GroupDataset(pool, 1, n_neg_queries=1, seed=0)
    assert ds[0]["neg_queries"] == ["query 1"]
    mine_negative_queries(pool, 2, seed=0, fill_random=True)
    assert len(pool.neg_queries["p2"]) == 2 and "q2" not in pool.neg_queries["p2"]


def test_collator_layout(tiny_encoder_factory):
    enc = tiny_encoder_factory()
    pool = make_pool(teacher=True)
    mine_negative_queries(pool, 2, seed=0, fill_random=True)
    for g in pool.groups:  # teacher scores for the negative queries too
        for q in pool.neg_queries[g.positives[0]]:
            pool.teacher[q][g.positives[0]] = -1.0
    ds = GroupDataset(pool, 2, n_neg_queries=2, with_teacher=True, seed=0)
    items = [ds[i] for i in range(3)]
    batch = GroupCollator(enc.tokenize)(items)
    assert batch["ids"] == ["q0", "q1", "q2"]
    assert batch["query_input_ids"].shape[0] == 3 and batch["doc_input_ids"].shape[0] == 3 * 3
    assert batch["negq_input_ids"].shape[0] == 6
    assert batch["teacher_neg"].shape == (3, 2) and batch["teacher_neg_queries"].shape == (3, 2)
    # documents: positives first, then each group's negatives in order
    second_neg_of_first = enc.tokenize([items[0]["negatives"][1]], tower="doc")["input_ids"][0]
    row = batch["doc_input_ids"][3 + 1]
    assert torch.equal(row[: len(second_neg_of_first)], second_neg_of_first)


def _varied_pool(n=10, n_neg=3):
    """Texts of very different lengths (some past the length limits), and negative queries."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    queries = {f"q{i}": " ".join(words[: 1 + i % 5] * (1 + 3 * (i % 3))) for i in range(n)}
    docs, groups = {}, []
    for i in range(n):
        docs[f"p{i}"] = f"passage {i} " + " ".join(words[i % 12:] * (1 + 7 * (i % 4)))
        negs = [f"n{i}_{j}" for j in range(n_neg if i else 1)]  # q0: a short pool, random fillers
        docs.update({d: f"negative {d} " + "word " * (5 * j + i) for j, d in enumerate(negs)})
        groups.append(TrainGroup(f"q{i}", [f"p{i}"], negs))
    docs.update({f"x{j}": f"extra document {j} " + "filler " * j for j in range(40)})  # in no pool
    pool = TrainingPool(groups, TextStore.from_dict(queries), TextStore.from_dict(docs))
    mine_negative_queries(pool, 2, seed=0, fill_random=True)
    return pool


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_pretokenized_batches_equal_tokenizing_each_batch(tiny_encoder_factory, padding_side):
    """data.pretokenize: the collator pads ids kept from before training, and makes exactly the
    tensors of tokenising the batch's texts (tower prefixes, truncation, either padding side);
    after pretokenising, steps tokenise nothing but random fillers of short pools."""
    from twotower.finetune.tokens import TokenCache

    enc = tiny_encoder_factory(query_prefix="query: ", doc_prefix="passage: ",
                               max_query_length=12, max_doc_length=40)
    enc.tokenizer.padding_side = padding_side
    pool = _varied_pool()
    ds = GroupDataset(pool, 3, n_neg_queries=2, seed=0)
    tokens = TokenCache(enc, pool, batch_size=4)
    assert tokens.pretokenize() == len(pool.queries) + len(pool.docs) - 40  # all but the extras
    calls = []
    token_ids = enc.token_ids
    enc.token_ids = lambda texts, **kw: calls.append(list(texts)) or token_ids(texts, **kw)
    plain, cached = GroupCollator(enc.tokenize), GroupCollator(enc.tokenize, tokens)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for start in range(0, len(ds), 4):
            items = [ds[i] for i in range(start, min(start + 4, len(ds)))]
            a, b = plain(items), cached(items)
            assert a.keys() == b.keys() and "negq_input_ids" in a
            for key in a:
                if torch.is_tensor(a[key]):
                    assert torch.equal(a[key], b[key]), (epoch, start, key)
    assert max(len(r) for r in b["doc_input_ids"]) <= 40 and b["query_input_ids"].shape[1] <= 12
    # during steps, only q0's random fillers from outside every pool were tokenised, once each
    filled = [t for c in calls for t in c]
    assert filled and tokens.computed_in_steps == len(filled) == len(set(filled))
    assert all(t.startswith("extra document") for t in filled)


def test_recipe_pretokenize_switch_reaches_the_collator(tiny_encoder_factory, tmp_path):
    from twotower.common.recipe.config import load_recipe
    from twotower.finetune.args import FinetuneRecipe
    from twotower.finetune.run import build_stage

    tiny_model_dir = tmp_path / "model"
    tiny_encoder_factory().save(tiny_model_dir)

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"query": f"question {i}", "positives": [f"answer {i}"],
                                        "negatives": [f"other {i}"]}) + "\n" for i in range(8)))
    for switch in (True, False):
        recipe = load_recipe(FinetuneRecipe, None, [
            f"model.name_or_path={tiny_model_dir}", "data.kind=jsonl", f"data.path={data}",
            "loss.infonce.weight=1", f"train.output_dir={tmp_path / 'out'}",
            f"data.pretokenize={str(switch).lower()}", "train.per_device_batch_size=4"])
        (_, stage), = recipe.stage_list()
        _, ds, collate = build_stage(recipe, stage, str(tiny_model_dir), 1)
        assert (collate.tokens is not None) == switch
        if switch:
            assert len(collate.tokens.ids["query"]) == 8 and len(collate.tokens.ids["doc"]) == 16


def test_length_grouped_order_pads_less_and_keeps_every_group_once(tiny_encoder_factory):
    """data.length_grouped (transformers' LengthGroupedSampler over global batches): every usable
    group once per epoch, a pure function of (seed, epoch), mega-batches sorted longest first with
    the longest batch in front, and far fewer padded document tokens than the random order."""
    from twotower.finetune.tokens import LongestDocument, TokenCache

    enc = tiny_encoder_factory(max_doc_length=128)
    n, size = 402, 4  # mega-batches of 25 batches (100 groups)
    rng = np.random.default_rng(3)
    queries = {f"q{i}": f"question {i}" for i in range(n)}
    docs, groups = {}, []
    for i in range(n):  # lengths vary between groups far more than within one
        words = int(rng.integers(1, 110))
        docs[f"p{i}"] = f"positive {i} " + "word " * words
        docs[f"n{i}"] = f"negative {i} " + "term " * (words + int(rng.integers(0, 10)))
        groups.append(TrainGroup(f"q{i}", [f"p{i}"], [f"n{i}"]))
    pool = TrainingPool(groups, TextStore.from_dict(queries), TextStore.from_dict(docs))
    tokens = TokenCache(enc, pool)
    tokens.pretokenize()
    longest = LongestDocument(tokens)
    grouped = GroupDataset(pool, 1, seed=0, global_batch_size=size, length_of=longest)
    plain = GroupDataset(pool, 1, seed=0, global_batch_size=size)
    collate = GroupCollator(enc.tokenize, tokens)

    def padded_doc_tokens(ds, order):
        ds.set_epoch(0)
        return sum(collate([ds[i] for i in order[b:b + size]])["doc_input_ids"].numel()
                   for b in range(0, len(order), size))
    orders = [grouped.epoch_order(epoch, 0) for epoch in range(3)]
    assert orders[0] == grouped.epoch_order(0, 0) and orders[0] != orders[1]
    mega = size * max(min(n // (4 * size), 50), 1)
    for epoch, order in enumerate(orders):
        assert len(order) == n // size * size == len(set(order)) and grouped.left_out_last_epoch == n % size
        length = [longest(grouped.sample(i, epoch)) for i in order]
        assert max(length[:size]) == max(length)  # the longest batch goes first
        # swapping the first batch back to where it came from leaves every mega-batch sorted

        def sorted_after_swap(j):
            restored = list(length)
            restored[:size], restored[j:j + size] = length[j:j + size], length[:size]
            return all(restored[a:a + mega] == sorted(restored[a:a + mega], reverse=True)
                       for a in range(0, len(order), mega))
        assert any(sorted_after_swap(j) for j in range(0, len(order), size)), epoch
        assert not sorted_after_swap(0) or max(length[:size]) == max(length[:mega])
    assert padded_doc_tokens(grouped, orders[0]) < 0.7 * padded_doc_tokens(plain, plain.epoch_order(0, 0))


def test_length_grouped_is_refused_for_losses_with_in_batch_terms():
    from twotower.common.recipe.config import RecipeError, load_recipe
    from twotower.finetune.args import FinetuneRecipe

    with pytest.raises(RecipeError, match=r"data.length_grouped.*\['infonce'\]"):
        load_recipe(FinetuneRecipe, "fewshot", ["data.length_grouped=true"])
    ok = ["data.length_grouped=true", "loss.infonce.weight=0", "loss.margin_mse.weight=1",
          "data.teacher_scores=scores.jsonl"]
    assert load_recipe(FinetuneRecipe, "fewshot", ok).data.length_grouped
    with pytest.raises(RecipeError, match="needs 'data.pretokenize=true'"):
        load_recipe(FinetuneRecipe, "fewshot", [*ok, "data.pretokenize=false"])


# ------------------------------------------------------------------------------ readers
def test_msmarco_sample_reader(shared_data_root):
    pool = build_pool(DataArgs(kind="msmarco", path=str(shared_data_root / "msmarco_sample"),
                               hard_negatives="hard_negatives.jsonl"))
    assert len(pool.groups) == 200
    for g in pool.groups:
        assert g.positives and not set(g.positives) & set(g.negatives)
        assert g.qid in pool.queries and all(d in pool.docs for d in g.positives + g.negatives)
    few = build_pool(DataArgs(kind="msmarco", path=str(shared_data_root / "msmarco_sample"),
                              max_queries=10, sample_seed=3))
    again = build_pool(DataArgs(kind="msmarco", path=str(shared_data_root / "msmarco_sample"),
                                max_queries=10, sample_seed=3))
    assert [g.qid for g in few.groups] == [g.qid for g in again.groups] and len(few.groups) == 10


def test_beir_and_triples_readers(shared_data_root):
    pool = build_pool(DataArgs(kind="beir", path=str(shared_data_root / "scifact"), split="train"))
    assert len(pool.groups) == 809  # SciFact's training queries
    triples = build_pool(DataArgs(kind="triples", path=str(shared_data_root / "msmarco_sample/triples.tsv")))
    g = triples.groups[0]
    assert triples.queries[g.qid] == "are florida mangroves protected" and len(g.negatives) >= 1


def test_generic_jsonl_reader(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"query": "what is a cat", "positives": ["a cat is an animal"],
             "negatives": ["a car is a vehicle", {"title": "Dogs", "text": "bark"}],
             "scores": [9.0, 1.0, 2.0]},
            {"query": "what is a dog", "positives": ["dogs bark"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pool = build_pool(DataArgs(kind="jsonl", path=str(path)))
    g = pool.groups[0]
    assert pool.docs[g.negatives[1]] == "Dogs bark"
    assert pool.teacher[g.qid] == {g.positives[0]: 9.0, g.negatives[0]: 1.0, g.negatives[1]: 2.0}
    rows[0]["scores"] = [1.0]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"train.jsonl:1: 'scores' must list 3 numbers"):
        build_pool(DataArgs(kind="jsonl", path=str(path)))


def test_a_teacher_dual_pool_keeps_only_anchored_positives_up_front(caplog):
    """With teacher scores and data.n_neg_queries, a positive that is no other query's scored
    negative cannot be trained on by the dual loss. Before: a ValueError at whatever step first
    sampled such a group (the rehearsal of msmarco_margin_mse_dual stopped at step 0). Now the
    dataset keeps the anchored positives, counts the rest, and samples without an error."""
    pool = make_pool(n=5, teacher=True)
    pool.groups[1].negatives.append("p0")  # q1 lists p0: q1 is a scored q- of p0 only
    pool.teacher["q1"]["p0"] = -1.0
    mine_negative_queries(pool, 1, seed=0, fill_random=False)
    with caplog.at_level("WARNING"):
        ds = GroupDataset(pool, 1, n_neg_queries=1, with_teacher=True, seed=0)
    assert [g.qid for g in ds.pool.groups] == ["q0"] and len(ds) == 1
    assert "1 of 5 queries kept (4 positives left out)" in caplog.text
    assert ds[0]["neg_queries"] == ["query 1"]
    with pytest.raises(ValueError, match="set data.n_neg_queries=0"):  # nothing anchored
        GroupDataset(make_pool(n=5, teacher=True), 1, n_neg_queries=1, with_teacher=True, seed=0)


def test_table_backed_texts_are_tokenised_once_into_a_shared_cached_table(tiny_encoder_factory,
                                                                           tmp_path, monkeypatch):
    """A corpus / queries file is tokenised whole into a cached Arrow table beside it (a warm
    start tokenises nothing), and the collator's tensors equal tokenising each batch's texts."""
    from twotower.common.data import load_msmarco_collection, load_msmarco_queries
    from twotower.finetune import tokens as T

    enc = tiny_encoder_factory(query_prefix="query: ", doc_prefix="passage: ",
                               max_query_length=12, max_doc_length=20)
    (tmp_path / "c.tsv").write_text("".join(
        f"{100 + i}\tpassage {i} " + "word " * (i % 30) + "\n" for i in range(60)))
    (tmp_path / "q.tsv").write_text("".join(f"{i}\tquestion {i} about things\n" for i in range(20)))

    def pool():
        docs = TextStore.from_table(load_msmarco_collection(tmp_path / "c.tsv",
                                                            cache_dir=tmp_path / "k"), True)
        queries = TextStore.from_table(load_msmarco_queries(tmp_path / "q.tsv",
                                                            cache_dir=tmp_path / "k"), False)
        groups = [TrainGroup(str(i), [str(100 + 3 * i)], [str(101 + 3 * i), str(102 + 3 * i)])
                  for i in range(20)]
        return TrainingPool(groups, queries, docs)

    cold = T.TokenCache(enc, pool())
    cold.tokenize_tables()
    assert set(cold.tables) == {"query", "doc"} and cold.pretokenize() == 0
    warm = T.TokenCache(enc, pool())
    monkeypatch.setattr(T._TowerTokens, "__call__", lambda *a: pytest.fail("tokenised again"))
    warm.tokenize_tables()
    monkeypatch.undo()
    ds = GroupDataset(warm.pool, 2, seed=0)
    plain, cached = GroupCollator(enc.tokenize), GroupCollator(enc.tokenize, warm)
    for start in range(0, len(ds), 4):
        items = [ds[i] for i in range(start, start + 4)]
        a, b = plain(items), cached(items)
        for key in a:
            if torch.is_tensor(a[key]):
                assert torch.equal(a[key], b[key]), (start, key)
    assert warm.computed_in_steps == 0 and warm.length("doc", "129") == len(
        enc.token_ids(["passage 29 " + "word " * 29], tower="doc")[0])
    # other tower settings (a longer document limit) are another cached table, not a stale one
    longer = T.TokenCache(tiny_encoder_factory(query_prefix="query: ", doc_prefix="passage: ",
                                               max_query_length=12, max_doc_length=30), pool())
    longer.tokenize_tables()
    assert longer.length("doc", "129") > warm.length("doc", "129")


def test_large_tables_are_tokenised_by_several_processes_to_the_same_ids(tiny_encoder_factory,
                                                                        tmp_path, monkeypatch):
    """Above PARALLEL_MAP_ROWS the table is tokenised by map_workers processes: the same ids, in
    order, as in one process, and a warm start reuses the shards."""
    from twotower.common.data import load_msmarco_collection
    from twotower.finetune import tokens as T

    enc = tiny_encoder_factory(doc_prefix="passage: ", max_doc_length=16)
    (tmp_path / "c.tsv").write_text("".join(
        f"{i}\tpassage {i} " + "word " * (i % 23) + "\n" for i in range(301)))
    assert T.map_workers(10) is None and T.map_workers(10 ** 9) in (None, *range(2, 17))

    def tokenised(cache, workers):
        monkeypatch.setattr(T, "map_workers", lambda rows: workers)
        docs = TextStore.from_table(load_msmarco_collection(tmp_path / "c.tsv", cache_dir=cache),
                                    True)
        cache_ = T.TokenCache(enc, TrainingPool([TrainGroup("q", ["0"])], TextStore.from_dict(
            {"q": "a question"}), docs))
        cache_.tokenize_tables()
        return cache_.tables["doc"].to_pylist()

    one = tokenised(tmp_path / "one", None)
    assert len(one) == 301 and one[7] == enc.token_ids(["passage 7 " + "word " * 7], "doc")[0]
    assert tokenised(tmp_path / "two", 2) == one
    monkeypatch.setattr(T._TowerTokens, "__call__", lambda *a: pytest.fail("tokenised again"))
    assert tokenised(tmp_path / "two", 2) == one


def test_row_ids_behave_as_the_list_of_their_ids(tmp_path):
    from twotower.common.data import load_msmarco_collection
    from twotower.finetune.stores import RowIds

    (tmp_path / "c.tsv").write_text("".join(f"p{i}\tpassage {i}\n" for i in range(10)))
    store = TextStore.from_table(load_msmarco_collection(tmp_path / "c.tsv",
                                                         cache_dir=tmp_path / "k"), True)
    for ids in (store.ids, [f"p{i}" for i in range(10)]):  # an Arrow id column, or a list
        negatives = RowIds(np.array([3, 0, 9]), ids)
        assert negatives == ["p3", "p0", "p9"] and list(negatives) == ["p3", "p0", "p9"]
        assert len(negatives) == 3 and negatives[1] == "p0" and negatives[-1] == "p9"
        assert negatives[1:] == ["p0", "p9"] and "p9" in negatives and "p1" not in negatives
        assert ["p5"] + negatives == ["p5", "p3", "p0", "p9"] and negatives.rows.dtype == np.int32
    assert store.rows_of(["p3", "nope", "p0"]).tolist() == [3, -1, 0]
    assert TextStore.from_dict({"a": "x", "b": "y"}).rows_of(["b", "c"]).tolist() == [1, -1]


def test_hard_negative_pools_are_kept_as_corpus_rows(shared_data_root):
    """MS MARCO-layout pools are RowIds over the collection (4 bytes a negative, not a str)."""
    from twotower.finetune.stores import RowIds

    pool = build_pool(DataArgs(kind="msmarco", path=str(shared_data_root / "msmarco_sample"),
                               queries="queries.tsv", qrels="qrels.tsv",
                               hard_negatives="hard_negatives.jsonl", teacher_scores="",
                               teacher_margin=None, negatives_per_system=0))
    with_negatives = [g for g in pool.groups if len(g.negatives)]
    assert with_negatives and all(isinstance(g.negatives, RowIds) for g in with_negatives)
    for g in with_negatives[:20]:
        assert [pool.docs.row(p) for p in g.negatives] == g.negatives.rows.tolist()


@pytest.mark.parametrize("backing", ["dict", "table"])
def test_row_pools_sample_as_the_same_pools_of_ids(tmp_path, backing):
    """A pool held as RowIds draws the same negatives as that pool as a list of ids (the
    positive excluded, duplicate texts skipped, a short pool filled), every group and epoch."""
    from twotower.common.data import load_msmarco_collection
    from twotower.finetune.stores import RowIds

    rng = np.random.default_rng(3)
    texts = [f"passage {int(rng.integers(40))}" for _ in range(60)]  # many duplicate texts
    if backing == "table":
        (tmp_path / "c.tsv").write_text("".join(f"p{i}\t{t}\n" for i, t in enumerate(texts)))
        docs = TextStore.from_table(load_msmarco_collection(tmp_path / "c.tsv",
                                                            cache_dir=tmp_path / "k"), True)
    else:
        docs = TextStore.from_dict({f"p{i}": t for i, t in enumerate(texts)})
    queries = TextStore.from_dict({f"q{i}": f"query {i}" for i in range(12)})
    as_ids, as_rows = [], []
    for i in range(12):
        rows = rng.choice(60, size=int(rng.integers(1, 9)), replace=False)
        positive = f"p{int(rows[0])}" if i % 3 else f"p{int(rng.integers(60))}"
        as_ids.append(TrainGroup(f"q{i}", [positive], [f"p{int(r)}" for r in rows]))
        as_rows.append(TrainGroup(f"q{i}", [positive], RowIds(rows, docs.ids)))
    a = GroupDataset(TrainingPool(as_ids, queries, docs), 3, seed=1, short_pool="random")
    b = GroupDataset(TrainingPool(as_rows, queries, docs), 3, seed=1, short_pool="random")
    for epoch in range(4):
        for i in range(12):
            assert a.sample(i, epoch) == b.sample(i, epoch)


def test_listed_rows_are_found_once_per_file_and_collection(tmp_path, monkeypatch):
    """The rows of every id a hard-negatives line lists: equal to looking each up, saved beside
    the file's table, reused without looking up again, rebuilt when damaged, never reused for
    another collection."""
    from twotower.common.data import load_hard_negatives, load_msmarco_collection
    from twotower.finetune import stores

    def collection(name, n):
        (tmp_path / name).write_text("".join(f"p{i}\tpassage {i}\n" for i in range(n)))
        return TextStore.from_table(load_msmarco_collection(tmp_path / name,
                                                            cache_dir=tmp_path / "k"), True)

    docs, other = collection("a.tsv", 30), collection("b.tsv", 20)
    lines = [{"qid": q, "pos": [f"p{q}"],
              "neg": {"bm25": [f"p{(q * 7 + j) % 30}" for j in range(q % 5)]}} for q in range(25)]
    (tmp_path / "hn.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    table = load_hard_negatives(tmp_path / "hn.jsonl", cache_dir=tmp_path / "k")
    expected = [docs.rows_of([*x["pos"], *x["neg"]["bm25"]]).tolist() for x in lines]
    rows, offsets = stores.listed_rows(table, ("pos", "neg"), docs)
    assert [rows[offsets[i]:offsets[i + 1]].tolist() for i in range(25)] == expected

    looked_up = []
    monkeypatch.setattr(TextStore, "rows_of", lambda self, keys: looked_up.append(len(keys))
                        or np.array([self.row(k) if k in self else -1 for k in keys]))
    rows, offsets = stores.listed_rows(table, ("pos", "neg"), docs)
    assert isinstance(rows, np.memmap) and len(looked_up) <= 8  # the spot check only
    assert [rows[offsets[i]:offsets[i + 1]].tolist() for i in range(25)] == expected
    (saved,) = (tmp_path / "k").rglob("twotower-rows-*.rows.npy")
    data = np.load(saved)
    np.save(saved, (data + 1).astype(np.int32))  # damaged: found by the spot check, rebuilt
    rows, offsets = stores.listed_rows(table, ("pos", "neg"), docs)
    assert [rows[offsets[i]:offsets[i + 1]].tolist() for i in range(25)] == expected
    rows, offsets = stores.listed_rows(table, ("pos", "neg"), other)  # pids >= 20 unknown there
    assert [rows[offsets[i]:offsets[i + 1]].tolist() for i in range(25)] == \
        [[other.row(p) if p in other else -1 for p in [*x["pos"], *x["neg"]["bm25"]]]
         for x in lines]
    assert len(list((tmp_path / "k").rglob("twotower-rows-*.rows.npy"))) == 2


def test_a_hard_negative_outside_the_collection_is_named_or_counted(tmp_path, shared_data_root):
    import shutil

    root = tmp_path / "msmarco"
    shutil.copytree(shared_data_root / "msmarco_sample", root)
    lines = (root / "hard_negatives.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    bad["neg"]["bm25"][2] = "99999999"
    lines[1] = json.dumps(bad)
    (root / "hard_negatives.jsonl").write_text("\n".join(lines) + "\n")
    args = dict(kind="msmarco", path=str(root), queries="queries.tsv", qrels="qrels.tsv",
                hard_negatives="hard_negatives.jsonl", teacher_scores="", teacher_margin=None,
                negatives_per_system=0)
    with pytest.raises(DataError, match=f"query '{bad['qid']}': passage '99999999' is not in "
                                        "the corpus"):
        build_pool(DataArgs(**args))
    pool = build_pool(DataArgs(**args, on_error="skip"))
    assert [len(g.negatives) for g in pool.groups if g.qid == str(bad["qid"])] == [0]
    assert sum(len(g.negatives) > 0 for g in pool.groups) == len(lines) - 1
