"""Teacher scoring (cross-encoder / bi-encoder) with its on-disk cache, and pseudo-labelling."""
import json
import multiprocessing as mp

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from twotower.common.model.encoder import tiny_bert
from twotower.common.model.loading import resolve_model_path
from twotower.finetune.args import DataArgs, PseudoArgs, TeacherArgs
from twotower.finetune.pseudo import pseudo_label_pool
from twotower.finetune.teacher import ScoreCache, Teacher

QUERIES = ["what do cats eat", "how tall are giraffes"]
PASSAGES = ["Cats eat meat and fish.", "Giraffes grow to about five metres tall."]


def save_tiny_cross_encoder(path, seed=0):
    """A random BertForSequenceClassification(num_labels=1) with the bundled tokenizer, saved as
    a real cross-encoder (e.g. cross-encoder/ms-marco-MiniLM-L-6-v2) would be."""
    tok = AutoTokenizer.from_pretrained(resolve_model_path("bundled:all-MiniLM-L6-v2"))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, num_labels=1)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def test_cross_encoder_scores_equal_the_model_logits_and_are_cached(tmp_path):
    model, tok = save_tiny_cross_encoder(tmp_path / "ce")
    args = TeacherArgs(model=str(tmp_path / "ce"), kind="cross_encoder", batch_size=1)
    cache = tmp_path / "cache.sqlite"
    pairs_q, pairs_p = QUERIES * 2, PASSAGES + PASSAGES[::-1]
    teacher = Teacher(args, cache_path=cache)
    scores = teacher.score(pairs_q, pairs_p)
    with torch.no_grad():
        expected = [model(**tok(q, p, return_tensors="pt")).logits[0, 0].item()
                    for q, p in zip(pairs_q, pairs_p)]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert teacher.computed == 4 and teacher.cache_hits == 0
    teacher.close()

    rerun = Teacher(args, cache_path=cache)  # a new run: everything comes from the cache
    np.testing.assert_array_equal(rerun.score(pairs_q, pairs_p), scores)
    assert rerun.computed == 0 and rerun.cache_hits == 4 and rerun._model is None
    rerun.score(["a new query"], PASSAGES[:1])
    assert rerun.computed == 1
    rerun.close()

    save_tiny_cross_encoder(tmp_path / "ce", seed=1)  # new weights, same folder: no stale hits
    retrained = Teacher(args, cache_path=cache)
    assert retrained.id != rerun.id
    retrained.score(pairs_q, pairs_p)
    assert retrained.computed == 4
    retrained.close()


def test_bi_encoder_teacher_is_the_inner_product_of_embeddings(tmp_path):
    encoder = tiny_bert(dropout=0.0)
    encoder.save(tmp_path / "bi")
    teacher = Teacher(TeacherArgs(model=str(tmp_path / "bi"), kind="bi_encoder"))
    scores = teacher.score(QUERIES, PASSAGES)
    q = encoder.encode(QUERIES, progress=False)
    d = encoder.encode(PASSAGES, tower="doc", progress=False)
    np.testing.assert_allclose(scores, (q * d).sum(1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["cross_encoder", "bi_encoder"])
def test_a_bf16_teacher_scores_under_autocast_with_its_own_cache_key(tmp_path, kind, monkeypatch):
    if kind == "cross_encoder":
        save_tiny_cross_encoder(tmp_path / "m")
    else:
        tiny_bert(dropout=0.0).save(tmp_path / "m")
    cache = tmp_path / "cache.sqlite"
    fp32 = Teacher(TeacherArgs(model=str(tmp_path / "m"), kind=kind), cache_path=cache)
    exact = fp32.score(QUERIES, PASSAGES)
    fp32.close()
    seen = []
    real = torch.autocast.__init__

    def spy(self, device_type, dtype=None, enabled=True, **kw):
        seen.append((dtype, enabled))
        real(self, device_type, dtype=dtype, enabled=enabled, **kw)
    monkeypatch.setattr(torch.autocast, "__init__", spy)
    half = Teacher(TeacherArgs(model=str(tmp_path / "m"), kind=kind, bf16=True), cache_path=cache)
    scores = half.score(QUERIES, PASSAGES)
    assert half.computed == 2 and half.cache_hits == 0  # not the fp32 scores from the cache
    assert (torch.bfloat16, True) in seen
    np.testing.assert_allclose(scores, exact, atol=0.05 * max(1.0, float(np.abs(exact).max())))
    half.close()


class FakeTeacher:
    """Scores a pair by a fixed table (logits), so thresholds can be checked exactly."""

    def __init__(self, table):
        self.table, self.args = table, TeacherArgs(model="fake")

    def score(self, queries, passages):
        return np.array([self.table.get((q, p), -10.0) for q, p in zip(queries, passages)])


def test_pseudo_labels_follow_the_thresholds(tmp_path):
    folder = tmp_path / "beir"
    folder.mkdir()
    docs = {f"d{i}": f"document number {i}" for i in range(6)}
    (folder / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": k, "title": "", "text": v}) + "\n" for k, v in docs.items()))
    (folder / "queries.jsonl").write_text("".join(
        json.dumps({"_id": q, "text": t}) + "\n" for q, t in [("a", "query a"), ("b", "query b")]))
    run = tmp_path / "cands.trec"
    run.write_text("".join(f"{q} Q0 d{i} {i + 1} {10 - i} bm25\n" for q in "ab" for i in range(6)))
    logit = lambda p: float(np.log(p / (1 - p)))  # noqa: E731
    table = {("query a", docs["d0"]): logit(0.95), ("query a", docs["d1"]): logit(0.92),
             ("query a", docs["d2"]): logit(0.5), ("query a", docs["d3"]): logit(0.05),
             ("query b", docs["d4"]): logit(0.6)}
    data = DataArgs(kind="pseudo", path=str(folder), pseudo=PseudoArgs(
        candidates=str(run), top_k=6, pos_threshold=0.9, neg_threshold=0.1, max_positives=1))
    pool = pseudo_label_pool(data, FakeTeacher(table))
    assert len(pool.groups) == 1  # query b has no candidate above 0.9
    g = pool.groups[0]
    assert g.qid == "a" and g.positives == ["d0"]  # the most confident positive only
    assert sorted(g.negatives) == ["d3", "d4", "d5"]  # <= 0.1 (unlisted pairs score -10)
    assert pool.teacher["a"]["d0"] == pytest.approx(logit(0.95))
    data.pseudo.max_positives = 2
    assert pseudo_label_pool(data, FakeTeacher(table)).groups[0].positives == ["d0", "d1"]
    data.pseudo.pos_threshold = 0.99
    with pytest.raises(ValueError, match="pos_threshold"):
        pseudo_label_pool(data, FakeTeacher(table))


def _open_and_put(path, barrier, key):
    barrier.wait()  # every process opens the fresh file at the same moment
    try:
        cache = ScoreCache(path)
        cache.put("t", [("q", key)], [1.0])
        cache.close()
        return ""
    except Exception as exc:  # noqa: BLE001 - reported by the test
        return repr(exc)


def test_ranks_opening_a_new_score_cache_at_once_all_succeed(tmp_path):
    """Every rank of a launch builds its Teacher (and opens the cache) at the same time. Before
    the fix, sqlite answered a second opener's switch to WAL with 'database is locked' at once
    (the busy timeout does not apply), about one fresh file in four with 4 openers; in CI it
    crashed rank 0 of the pair_two_stage rehearsal."""
    ctx = mp.get_context("fork")
    with ctx.Manager() as manager, ctx.Pool(4) as pool:
        for attempt in range(12):
            path = tmp_path / f"cache{attempt}.sqlite"
            barrier = manager.Barrier(4)
            errors = [e for e in pool.starmap(_open_and_put, [(path, barrier, str(i)) for i in range(4)]) if e]
            assert not errors, f"attempt {attempt}: {errors}"
            cache = ScoreCache(path)
            assert cache.get("t", [("q", str(i)) for i in range(4)]) == [1.0] * 4
            cache.close()
