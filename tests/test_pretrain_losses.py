"""Pretraining losses against slow per-row re-computations of the paper formulas.

A lookup-table "encoder" (embedding of a text = a row of a table, chosen by its first token) makes
the embeddings exact inputs, so the method modules (InBatch, MoCo) are checked end to end: loss
and gradient against a loop over queries and positives written straight from the formulas.
"""
import copy

import pytest
import torch
from torch import nn

from twotower.pretrain.args import MethodArgs
from twotower.pretrain.losses.inbatch import InBatch
from twotower.pretrain.losses.moco import MoCo
from twotower.pretrain.losses.moco_queue import enqueue, momentum_update
from twotower.pretrain.losses.relevance import (normalise_scores, reduce_pair_losses,
                                                relevance_weights)

H = 5


class TableEncoder(nn.Module):
    """Embedding of row r = table[input_ids[r, 0]]; the doc tower uses the same table."""

    def __init__(self, rows: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(rows, H, generator=gen))
        self.dim = H
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask, tower="query"):
        return self.table[input_ids[:, 0]]


def make_batch(n_docs: int, n_pairs: int) -> dict:
    """Query of doc i = table row i; key j of doc i = row n_docs + i * n_pairs + j."""
    q = torch.arange(n_docs).unsqueeze(1)
    k = (n_docs + torch.arange(n_docs * n_pairs)).unsqueeze(1)
    return {"q_input_ids": q, "q_attention_mask": torch.ones_like(q),
            "k_input_ids": k, "k_attention_mask": torch.ones_like(k)}


def slow_weights(s: list[float], guard: str, eps: float = 1e-6, t: float = 1.0) -> list[float]:
    if guard == "clamp":
        c = [max(x, eps) for x in s]
        return [x / sum(c) for x in c]
    e = [torch.exp(torch.tensor(x / t)).item() for x in s]
    return [x / sum(e) for x in e]


def slow_loss(table, n_docs, n_pairs, tau, negatives, relevance=None, group="document",
              guard="clamp", reduction="query", rel_keys=None):
    """Per-row InfoNCE: for query i and positive j, cross-entropy over [q.k_ij, q.negatives]/tau.
    `negatives(i)` gives the negative embeddings of query i. ReContriever weights from
    s(q_i, d_ij) (keys `rel_keys` if given, e.g. the key encoder's)."""
    q = table[:n_docs]
    k = table[n_docs:n_docs + n_docs * n_pairs]
    rel_keys = k if rel_keys is None else rel_keys
    ce = [[None] * n_pairs for _ in range(n_docs)]
    for i in range(n_docs):
        for j in range(n_pairs):
            row = torch.cat([(q[i] * k[i * n_pairs + j]).sum().view(1), negatives(i) @ q[i]])
            ce[i][j] = -torch.log_softmax(row / tau, dim=0)[0]
    if relevance is None:
        return sum(c for r in ce for c in r) / (n_docs * n_pairs)
    s = [[float(q[i].detach() @ rel_keys[i * n_pairs + j].detach()) for j in range(n_pairs)]
         for i in range(n_docs)]
    if group == "document":
        w = [slow_weights(s[i], guard) for i in range(n_docs)]
        total = sum(w[i][j] * ce[i][j] for i in range(n_docs) for j in range(n_pairs)) / n_docs
        return total / (n_pairs if reduction == "pair" else 1)
    flat = slow_weights([x for r in s for x in r], guard)
    total = sum(flat[i * n_pairs + j] * ce[i][j] for i in range(n_docs) for j in range(n_pairs))
    return total / (n_docs * n_pairs if reduction == "pair" else 1)


def inbatch_negatives(table, n_docs, n_pairs):
    k = table[n_docs:n_docs + n_docs * n_pairs]
    return lambda i: torch.stack([k[m] for m in range(n_docs * n_pairs) if m // n_pairs != i])


CASES = [  # n_pairs, relevance_aware, group, guard, reduction
    (1, False, "document", "clamp", "query"),
    (3, False, "document", "clamp", "query"),
    (3, True, "document", "clamp", "query"),
    (3, True, "document", "clamp", "pair"),
    (2, True, "document", "softmax", "query"),
    (2, True, "batch", "clamp", "query"),
    (2, True, "batch", "softmax", "pair"),
]


@pytest.mark.parametrize("n_pairs,relevance,group,guard,reduction", CASES)
def test_inbatch_loss_and_gradient_equal_per_row_recomputation(n_pairs, relevance, group, guard,
                                                               reduction):
    n_docs, tau = 4, 0.5
    args = MethodArgs(name="inbatch", temperature=tau, relevance_aware=relevance,
                      relevance_group=group, relevance_guard=guard, relevance_reduction=reduction)
    enc = TableEncoder(n_docs * (1 + n_pairs))
    method = InBatch(enc, args, n_pairs)
    loss, stats = method(make_batch(n_docs, n_pairs))
    (grad,) = torch.autograd.grad(loss, enc.table)

    ref_table = enc.table.detach().clone().requires_grad_(True)
    ref = slow_loss(ref_table, n_docs, n_pairs, tau, inbatch_negatives(ref_table, n_docs, n_pairs),
                    relevance=relevance or None, group=group, guard=guard, reduction=reduction)
    (ref_grad,) = torch.autograd.grad(ref, ref_table)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-4)
    assert 0 <= stats["accuracy"] <= 100


@pytest.mark.parametrize("n_pairs,relevance,group,guard,reduction", CASES)
def test_moco_loss_and_gradient_equal_per_row_recomputation(n_pairs, relevance, group, guard,
                                                            reduction):
    n_docs, tau = 3, 0.3
    args = MethodArgs(name="moco", temperature=tau, queue_size=11, relevance_aware=relevance,
                      relevance_group=group, relevance_guard=guard, relevance_reduction=reduction)
    enc = TableEncoder(n_docs * (1 + n_pairs))
    method = MoCo(enc, args, n_pairs, seed=1)
    with torch.no_grad():  # a key encoder that differs from the query encoder
        method.key_encoder.table.add_(0.3 * torch.randn_like(enc.table))
    key_table = method.key_encoder.table.detach().clone()
    queue = method.queue.clone()
    loss, _ = method.train()(make_batch(n_docs, n_pairs))
    (grad,) = torch.autograd.grad(loss, enc.table)

    ref_table = enc.table.detach().clone().requires_grad_(True)
    keys = key_table[n_docs:]
    # keys come from the key encoder, without gradient: substitute them into the table rows
    mixed = torch.cat([ref_table[:n_docs], keys])
    ref = slow_loss(mixed, n_docs, n_pairs, tau, lambda i: queue, relevance=relevance or None,
                    group=group, guard=guard, reduction=reduction)
    (ref_grad,) = torch.autograd.grad(ref, ref_table)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-4)
    assert grad[n_docs:].abs().sum() == 0  # no gradient reaches the keys


def test_moco_momentum_update_matches_hand_computation():
    enc = TableEncoder(4)
    method = MoCo(enc, MethodArgs(queue_size=4, momentum=0.9), 1)
    old_k = method.key_encoder.table.detach().clone()
    assert torch.equal(old_k, enc.table.detach())  # starts as a copy
    assert not method.key_encoder.table.requires_grad
    with torch.no_grad():
        enc.table.add_(1.0)
    method.on_optimizer_step()
    torch.testing.assert_close(method.key_encoder.table.detach(),
                               0.9 * old_k + 0.1 * enc.table.detach())
    momentum_update(method.key_encoder, enc, 0.0)  # m = 0: a plain copy
    assert torch.equal(method.key_encoder.table.detach(), enc.table.detach())


def test_fifo_queue_against_a_hand_simulation():
    queue = torch.zeros(5, 1)
    ptr = torch.zeros((), dtype=torch.long)
    expected = [0.0] * 5
    position = 0
    for step, count in enumerate([2, 2, 3, 1, 5]):  # wraps around twice, queue size not a multiple
        keys = torch.arange(count, dtype=torch.float).unsqueeze(1) + 10 * (step + 1)
        enqueue(queue, ptr, keys)
        for value in keys[:, 0].tolist():
            expected[position] = value
            position = (position + 1) % 5
        assert queue[:, 0].tolist() == expected
        assert int(ptr) == position
    with pytest.raises(ValueError, match="queue_size=5 is smaller than the 6 keys"):
        enqueue(queue, ptr, torch.zeros(6, 1))


def test_moco_enqueues_this_batch_after_its_logits_and_state_dict_holds_the_queue():
    n_docs, n_pairs = 2, 2
    enc = TableEncoder(n_docs * 3)
    method = MoCo(enc, MethodArgs(queue_size=6), n_pairs, seed=0).train()
    start = method.queue.clone()
    method(make_batch(n_docs, n_pairs))
    assert torch.equal(method.queue, start)  # the keys wait for the optimizer step
    keys = method.key_encoder.table.detach()[n_docs:]
    method.on_optimizer_step()
    torch.testing.assert_close(method.queue[:4], keys)  # all n_pairs keys of every document
    assert int(method.queue_ptr) == 4
    state = method.state_dict()
    assert {"queue", "queue_ptr", "key_encoder.table", "encoder.table"} <= set(state)
    fresh = MoCo(TableEncoder(n_docs * 3, seed=5), MethodArgs(queue_size=6), n_pairs, seed=9)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.queue, method.queue) and int(fresh.queue_ptr) == 4
    method.eval()(make_batch(n_docs, n_pairs))  # evaluation forwards leave the queue alone
    assert int(method.queue_ptr) == 4


def test_moco_step_skipped_for_a_nonfinite_loss_enqueues_nothing():
    n_docs, n_pairs = 2, 2
    method = MoCo(TableEncoder(n_docs * 3), MethodArgs(queue_size=12), n_pairs, seed=0).train()
    start = method.queue.clone()
    method(make_batch(n_docs, n_pairs))
    method.on_step_skipped()  # twotower.common.train.trainer: train.nonfinite_loss=skip dropped the step
    method.on_optimizer_step()  # the next step taken
    assert torch.equal(method.queue, start) and int(method.queue_ptr) == 0
    # accumulation: two micro-batches, both enqueued after the step, in order
    method(make_batch(n_docs, n_pairs))
    method(make_batch(n_docs, n_pairs))
    assert torch.equal(method.queue, start)
    method.on_optimizer_step()
    assert int(method.queue_ptr) == 2 * n_docs * n_pairs


def test_moco_queue_starts_random_unit_rows_seeded():
    a = MoCo(TableEncoder(2), MethodArgs(queue_size=8), 1, seed=3)
    b = MoCo(TableEncoder(2), MethodArgs(queue_size=8), 1, seed=3)
    assert torch.equal(a.queue, b.queue)
    torch.testing.assert_close(a.queue.norm(dim=1), torch.ones(8))


def test_relevance_weights_sum_to_one_per_document_and_guard_bad_similarities():
    s = torch.tensor([[2.0, 1.0, 1.0], [-3.0, 0.0, 4.0], [-1.0, -2.0, 0.0], [1e-9, -1e-9, 0.0]])
    w = relevance_weights(s, "document", "clamp", eps=1e-6)
    torch.testing.assert_close(w.sum(1), torch.ones(4))
    torch.testing.assert_close(w[0], torch.tensor([0.5, 0.25, 0.25]))
    assert (w >= 0).all() and torch.isfinite(w).all()
    assert w[1, 2] > 0.999  # negative / zero similarity: (almost) no weight
    torch.testing.assert_close(w[2], torch.full((3,), 1 / 3))  # nothing positive: uniform
    torch.testing.assert_close(w[3], torch.full((3,), 1 / 3), atol=1e-3, rtol=0)
    soft = relevance_weights(s, "document", "softmax", temperature=2.0)
    torch.testing.assert_close(soft, torch.softmax(s / 2.0, dim=1))
    for i in range(4):
        torch.testing.assert_close(w[i], torch.tensor(slow_weights(s[i].tolist(), "clamp")))
    batch = relevance_weights(s, "batch", "clamp")
    assert batch.sum().item() == pytest.approx(1.0)
    # the unguarded released formula s / sum(s) would give negative or infinite weights here
    assert (s[1] / s[1].sum()).min() < 0 and not torch.isfinite(s[3] / s[3].sum()).all()


def test_weighted_reductions_are_explicit_about_the_scale():
    ce = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    w = normalise_scores(torch.tensor([[1.0, 3.0], [1.0, 1.0]]), "clamp", 1e-6, 1.0)
    per_query = [(0.25 * 1 + 0.75 * 3), 2.0]
    got = reduce_pair_losses(ce, w, "document", "query").item()
    assert got == pytest.approx(sum(per_query) / 2)
    # the released code's mean over the n*B rows is n times smaller
    assert reduce_pair_losses(ce, w, "document", "pair").item() == pytest.approx(sum(per_query) / 4)


def test_inbatch_needs_two_documents():
    method = InBatch(TableEncoder(3), MethodArgs(name="inbatch"), 2)
    with pytest.raises(ValueError, match="at least 2 documents"):
        method(make_batch(1, 2))


def test_wrong_number_of_keys_is_a_clear_error():
    method = InBatch(TableEncoder(10), MethodArgs(name="inbatch"), 3)
    batch = make_batch(2, 2)
    with pytest.raises(ValueError, match="need 6 keys .*pairs.n_pairs=3.* has 4"):
        method(batch)


def test_deepcopied_key_encoder_is_excluded_from_trainable_parameters():
    enc = TableEncoder(3)
    method = MoCo(enc, MethodArgs(queue_size=4), 1)
    trainable = [n for n, p in method.named_parameters() if p.requires_grad]
    assert trainable == ["encoder.table"]
    assert copy.deepcopy(method).queue.shape == (4, H)
