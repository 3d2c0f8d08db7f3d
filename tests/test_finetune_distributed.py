"""Every fine-tuning loss, gathered across 2 gloo processes, equals 1 process with the doubled
batch: same loss (mean of the per-process losses) and same parameter gradients after DDP's
average (all_reduce / world)."""
import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_distributed
from twotower.finetune.args import LossArgs
from twotower.finetune.data import (GroupCollator, GroupDataset, TextStore, TrainGroup,
                                    TrainingPool, stable_hash)
from twotower.finetune.method import FinetuneMethod
from twotower.finetune.sources import mine_negative_queries

N_GROUPS = 4  # 2 per process
WORDS = "protein cell gene brain heart virus drug trial mouse human cancer blood".split()


def all_losses(symmetric=True) -> LossArgs:
    loss = LossArgs()
    loss.infonce.weight = 1.0
    loss.dance_dual.weight = 0.1
    loss.samtone.weight = 0.5
    loss.samtone.symmetric = symmetric
    loss.pair.weight = 0.7
    loss.margin_mse.weight = 0.3
    loss.margin_mse_dual.weight = 0.2
    for name in ("infonce", "dance_dual", "samtone", "pair"):
        getattr(loss, name).temperature = 0.5
    return loss


def make_batch(tokenize, groups=range(N_GROUPS)):
    queries = {f"q{i}": f"{WORDS[i]} {WORDS[i + 4]} question {i}" for i in range(N_GROUPS + 2)}
    docs, gs, teacher = {}, [], {}
    for i in range(N_GROUPS):
        docs[f"p{i}"] = f"about {WORDS[i]} and {WORDS[(i + 4) % 12]}"
        negs = [f"n{i}_{j}" for j in range(2)]
        docs.update({d: f"{WORDS[(i + 3 * j + 1) % 12]} notes {d}" for j, d in enumerate(negs)})
        gs.append(TrainGroup(f"q{i}", [f"p{i}"], negs))
    pool = TrainingPool(gs, TextStore.from_dict(queries), TextStore.from_dict(docs))
    mine_negative_queries(pool, 2, seed=0, fill_random=True)
    for q in queries:  # every (query, document) pair gets a teacher score
        teacher[q] = {d: (stable_hash(q + d) % 1000) / 100.0 for d in docs}
    pool.teacher = teacher
    ds = GroupDataset(pool, 2, n_neg_queries=2, with_teacher=True, seed=0)
    return GroupCollator(tokenize)([ds[i] for i in groups])


def _method(seed=0):
    from twotower.common.model.encoder import tiny_bert

    encoder = tiny_bert(dropout=0.0, seed=seed, normalize=True)
    return FinetuneMethod(encoder, all_losses()).eval()


def _two_process_step(rank, world):
    method = _method()
    per = N_GROUPS // world
    batch = make_batch(method.encoder.tokenize, range(rank * per, (rank + 1) * per))
    loss, stats = method(batch)
    loss.backward()
    grads = {}
    for name, p in method.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        g = g.clone()
        dist.all_reduce(g)
        grads[name] = g / world  # what DDP does
    return {"loss": loss.detach(), "grads": grads,
            "terms": {k: float(v) for k, v in stats.items() if k.startswith("loss_")}}


@pytest.mark.timeout(300)
def test_all_losses_two_processes_equal_one_process_with_doubled_batch():
    results = run_distributed(_two_process_step, 2)
    method = _method()
    loss, stats = method(make_batch(method.encoder.tokenize))
    loss.backward()
    mean_loss = torch.stack([r["loss"] for r in results]).mean()
    torch.testing.assert_close(mean_loss, loss.detach(), rtol=1e-5, atol=1e-6)
    for name in stats:
        if name.startswith("loss_"):
            two = sum(r["terms"][name] for r in results) / 2
            assert two == pytest.approx(float(stats[name]), rel=1e-5, abs=1e-6), name
    checked = 0
    for name, p in method.named_parameters():
        if p.grad is None:
            continue
        for r in results:  # every process holds the same averaged gradient
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked > 10
