"""Every fine-tuning loss against a slow per-example re-computation of its paper formula."""
import math

import pytest
import torch

from twotower.finetune.args import DanceDualArgs, InfoNCEArgs, MarginMSEArgs, PairArgs, SamToNeArgs
from twotower.finetune.losses import (DanceDual, GroupEmbeddings, InfoNCE, MarginMSE, MarginMSEDual,
                                      Pair, SamToNe)
from twotower.finetune.losses.samtone import document_anchored_logits, query_anchored_logits

B, K, M, H = 3, 2, 2, 5
TAU = 0.7


def make_embeddings(seed=0, k=K, m=M, teacher=True):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    leaves = {"query": rand(B, H), "positive": rand(B, H), "negatives": rand(B, k, H),
              "neg_queries": rand(B, m, H)}
    for t in leaves.values():
        t.requires_grad_(True)
    scores = {"teacher_pos": rand(B) * 3, "teacher_neg": rand(B, k) * 3,
              "teacher_neg_queries": rand(B, m) * 3} if teacher else {}
    return leaves, scores


def emb_of(leaves, scores):
    return GroupEmbeddings(**leaves, **scores)


def dot(a, b):
    return sum(a[h] * b[h] for h in range(a.shape[0]))


def neg_log_softmax_first(pos, others):
    """-log e^pos / (e^pos + sum e^others), written out."""
    denom = torch.exp(pos) + sum(torch.exp(o) for o in others)
    return -(pos - torch.log(denom))


def grads(loss, leaves):
    return torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)


def assert_same(fast, slow, leaves):
    assert fast.item() == pytest.approx(slow.item(), rel=1e-9, abs=1e-12)
    for gf, gs in zip(grads(fast, leaves), grads(slow, leaves)):
        if gf is None or gs is None:
            assert (gf is None or not gf.any()) and (gs is None or not gs.any())
        else:
            torch.testing.assert_close(gf, gs, rtol=1e-8, atol=1e-10)


def all_documents(leaves):
    """Positives first, then each group's negatives in order (the gathered layout)."""
    docs = [leaves["positive"][j] for j in range(B)]
    for j in range(B):
        docs += [leaves["negatives"][j, n] for n in range(leaves["negatives"].shape[1])]
    return docs


# ------------------------------------------------------------------------------- references
def slow_infonce(leaves, tau):
    q, docs = leaves["query"], all_documents(leaves)
    total = 0
    for i in range(B):
        pos = dot(q[i], leaves["positive"][i]) / tau
        others = [dot(q[i], d) / tau for j, d in enumerate(docs) if j != i]
        total = total + neg_log_softmax_first(pos, others)
    return total / B


def slow_dance_dual(leaves, tau, mined):
    q, p = leaves["query"], leaves["positive"]
    total = 0
    for i in range(B):
        pos = dot(p[i], q[i]) / tau
        others = [dot(p[i], q[j]) / tau for j in range(B) if j != i]
        if mined:
            others += [dot(p[i], leaves["neg_queries"][j, n]) / tau
                       for j in range(B) for n in range(M)]
        total = total + neg_log_softmax_first(pos, others)
    return total / B


def slow_samtone(leaves, tau, symmetric):
    q, p, negs = leaves["query"], leaves["positive"], leaves["negatives"]
    k = negs.shape[1]
    docs = all_documents(leaves)
    total = 0
    for i in range(B):
        pos = dot(q[i], p[i]) / tau
        others = [dot(q[i], d) / tau for j, d in enumerate(docs) if j != i]
        others += [dot(q[i], q[j]) / tau for j in range(B) if j != i]
        total = total + neg_log_softmax_first(pos, others)
    loss = total / B
    if not symmetric:
        return loss
    total = 0
    for i in range(B):
        pos = dot(p[i], q[i]) / tau
        others = [dot(p[i], q[j]) / tau for j in range(B) if j != i]
        others += [dot(p[i], p[j]) / tau for j in range(B) if j != i]
        others += [dot(p[i], negs[j, n]) / tau for j in range(B) if j != i for n in range(k)]
        total = total + neg_log_softmax_first(pos, others)
    return loss + total / B


def slow_pair(leaves, tau, alpha, passage_negatives):
    q, p, negs = leaves["query"], leaves["positive"], leaves["negatives"]
    total = 0
    for i in range(B):
        pos = dot(p[i], q[i]) / tau
        if passage_negatives == "hard":
            others = [dot(p[i], negs[j, n]) / tau for j in range(B) for n in range(K)]
        else:
            others = [dot(p[i], d) / tau for j, d in enumerate(all_documents(leaves)) if j != i]
        total = total + neg_log_softmax_first(pos, others)
    return (1 - alpha) * slow_infonce(leaves, tau) + alpha * total / B


def slow_margin_mse(leaves, scores, scale):
    q, p, negs = leaves["query"], leaves["positive"], leaves["negatives"]
    total, count = 0, 0
    for i in range(B):
        for n in range(K):
            student = scale * dot(q[i], p[i]) - scale * dot(q[i], negs[i, n])
            teacher = scores["teacher_pos"][i] - scores["teacher_neg"][i, n]
            total, count = total + (student - teacher) ** 2, count + 1
    return total / count


def slow_margin_mse_dual(leaves, scores, scale):
    q, p, nq = leaves["query"], leaves["positive"], leaves["neg_queries"]
    total, count = 0, 0
    for i in range(B):
        for n in range(M):
            student = scale * dot(p[i], q[i]) - scale * dot(p[i], nq[i, n])
            teacher = scores["teacher_pos"][i] - scores["teacher_neg_queries"][i, n]
            total, count = total + (student - teacher) ** 2, count + 1
    return total / count


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("k", [0, K])
def test_infonce_matches_per_example_formula(k):
    leaves, scores = make_embeddings(k=k)
    fast, stats = InfoNCE(InfoNCEArgs(temperature=TAU))(emb_of(leaves, scores))
    assert_same(fast, slow_infonce(leaves, TAU), leaves)
    assert 0 <= stats["infonce_acc"].item() <= 1


@pytest.mark.parametrize("mined", [False, True])
def test_dance_dual_matches_per_example_formula(mined):
    leaves, scores = make_embeddings(seed=1)
    loss = DanceDual(DanceDualArgs(temperature=TAU, use_mined_queries=mined))
    fast, _ = loss(emb_of(leaves, scores))
    assert_same(fast, slow_dance_dual(leaves, TAU, mined), leaves)


def test_dance_dual_without_negative_queries_uses_batch_queries_only():
    leaves, scores = make_embeddings(seed=1)
    leaves_no_nq = {k: v for k, v in leaves.items() if k != "neg_queries"}
    fast, _ = DanceDual(DanceDualArgs(temperature=TAU))(GroupEmbeddings(**leaves_no_nq))
    assert_same(fast, slow_dance_dual(leaves, TAU, mined=False), leaves_no_nq)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("k", [0, K])
def test_samtone_matches_per_example_formula(symmetric, k):
    leaves, scores = make_embeddings(seed=2, k=k)
    fast, _ = SamToNe(SamToNeArgs(temperature=TAU, symmetric=symmetric))(emb_of(leaves, scores))
    assert_same(fast, slow_samtone(leaves, TAU, symmetric), leaves)


def test_samtone_masks_self_and_same_query_documents():
    leaves, scores = make_embeddings(seed=3)
    emb = emb_of(leaves, scores)
    n_docs = B + B * K
    q_logits = query_anchored_logits(emb, TAU)
    masked = torch.isinf(q_logits)
    expected = torch.zeros_like(masked)
    for i in range(B):
        expected[i, n_docs + i] = True  # s(q_i, q_i) only
    assert torch.equal(masked, expected)
    d_logits = document_anchored_logits(emb, TAU)
    masked = torch.isinf(d_logits)
    expected = torch.zeros_like(masked)
    for i in range(B):
        expected[i, B + i] = True  # d+_i against itself
        for n in range(K):
            expected[i, B + B + i * K + n] = True  # d+_i against its own query's negatives
    assert torch.equal(masked, expected)


def test_samtone_is_one_joint_denominator_and_never_negative():
    # queries identical to their positives: a separate q-q softmax term would go below zero
    leaves, scores = make_embeddings(seed=4)
    with torch.no_grad():
        leaves["query"].copy_(leaves["positive"] * 10)
    fast, _ = SamToNe(SamToNeArgs(temperature=TAU, symmetric=True))(emb_of(leaves, scores))
    assert fast.item() >= 0


@pytest.mark.parametrize("passage_negatives", ["hard", "all"])
def test_pair_matches_per_example_formula(passage_negatives):
    leaves, scores = make_embeddings(seed=5)
    args = PairArgs(temperature=TAU, alpha=0.1, passage_negatives=passage_negatives)
    fast, stats = Pair(args)(emb_of(leaves, scores))
    assert_same(fast, slow_pair(leaves, TAU, 0.1, passage_negatives), leaves)
    assert set(stats) == {"pair_q", "pair_p"}


def test_pair_with_alpha_zero_equals_infonce():
    leaves, scores = make_embeddings(seed=6)
    pair, _ = Pair(PairArgs(temperature=TAU, alpha=0.0))(emb_of(leaves, scores))
    infonce, _ = InfoNCE(InfoNCEArgs(temperature=TAU))(emb_of(leaves, scores))
    assert_same(pair, infonce, leaves)
    # and alpha > 0 differs: the passage-centric term is really there
    other, _ = Pair(PairArgs(temperature=TAU, alpha=0.5))(emb_of(leaves, scores))
    assert abs(other.item() - infonce.item()) > 1e-6


def test_pair_hard_needs_negatives():
    leaves, scores = make_embeddings(k=0)
    with pytest.raises(ValueError, match="passage_negatives=all"):
        Pair(PairArgs(alpha=0.1))(emb_of(leaves, scores))


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_margin_mse_matches_per_example_formula(scale):
    leaves, scores = make_embeddings(seed=7)
    fast, _ = MarginMSE(MarginMSEArgs(student_scale=scale))(emb_of(leaves, scores))
    assert_same(fast, slow_margin_mse(leaves, scores, scale), leaves)
    fast, _ = MarginMSEDual(MarginMSEArgs(student_scale=scale))(emb_of(leaves, scores))
    assert_same(fast, slow_margin_mse_dual(leaves, scores, scale), leaves)


def test_margin_mse_is_zero_when_margins_agree():
    leaves, _ = make_embeddings(seed=8, teacher=False)
    q, p, n, nq = (leaves[k].detach() for k in ("query", "positive", "negatives", "neg_queries"))
    shift = torch.tensor([5.0, -2.0, 0.5], dtype=torch.float64)  # teachers may be offset per query
    scores = {"teacher_pos": (q * p).sum(-1) * 2 + shift,
              "teacher_neg": torch.einsum("bh,bkh->bk", q, n) * 2 + shift[:, None],
              "teacher_neg_queries": torch.einsum("bh,bmh->bm", p, nq) * 2 + shift[:, None]}
    for cls in (MarginMSE, MarginMSEDual):
        loss, _ = cls(MarginMSEArgs(student_scale=2.0))(emb_of(leaves, scores))
        assert loss.item() == pytest.approx(0.0, abs=1e-20)
        assert all(g is None or g.abs().max() < 1e-12 for g in grads(loss, leaves))
    scores["teacher_neg"] = scores["teacher_neg"] + 1.0  # teacher margins now differ by 1
    loss, _ = MarginMSE(MarginMSEArgs(student_scale=2.0))(emb_of(leaves, scores))
    assert loss.item() == pytest.approx(1.0)


def test_margin_mse_needs_teacher_scores():
    leaves, _ = make_embeddings(teacher=False)
    with pytest.raises(ValueError, match="teacher scores"):
        MarginMSE(MarginMSEArgs())(emb_of(leaves, {}))


def test_losses_are_finite_for_normalised_embeddings_at_low_temperature():
    leaves, scores = make_embeddings(seed=9)
    with torch.no_grad():
        for key in ("query", "positive", "negatives", "neg_queries"):
            leaves[key].copy_(torch.nn.functional.normalize(leaves[key], dim=-1))
    for loss in (InfoNCE(InfoNCEArgs(temperature=0.01)),
                 SamToNe(SamToNeArgs(temperature=0.01, symmetric=True)),
                 Pair(PairArgs(temperature=0.01)), DanceDual(DanceDualArgs(temperature=0.01))):
        value, _ = loss(emb_of(leaves, scores))
        assert math.isfinite(value.item())
