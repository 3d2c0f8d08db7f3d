"""2 gloo processes, each with half of a batch == 1 process with the whole batch: same loss (mean
over processes), same encoder gradients after DDP-style averaging (all_reduce, / world), same
MoCo queue, pointer and key encoder, over two steps (the second one after an SGD update and the
momentum update). A small random BERT with dropout off, real token batches."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from twotower.common.model.encoder import tiny_bert
from twotower.pretrain.args import MethodArgs
from twotower.pretrain.losses import build_method

B, WORLD, LR = 3, 2, 0.5  # per-process batch, processes, SGD step between the two steps
SCENARIOS = {
    "inbatch": (1, dict(name="inbatch")),
    "inbatch_relevance_3pairs": (3, dict(name="inbatch", relevance_aware=True)),
    "inbatch_batchweights_softmax": (2, dict(name="inbatch", relevance_aware=True,
                                             relevance_group="batch", relevance_guard="softmax",
                                             relevance_reduction="pair")),
    "moco": (1, dict(name="moco", queue_size=10)),  # 6 keys per step: wraps, 10 % 6 != 0
    "moco_relevance_2pairs": (2, dict(name="moco", queue_size=16, relevance_aware=True)),
    "moco_batchweights": (2, dict(name="moco", queue_size=16, relevance_aware=True,
                                  relevance_group="batch")),
}


def full_batch(n_pairs: int, step: int) -> dict:
    """WORLD * B documents, varied lengths (padding differs between halves and the whole)."""
    gen = torch.Generator().manual_seed(100 * step + n_pairs)

    def rows(count):
        lengths = torch.randint(3, 12, (count,), generator=gen)
        ids = torch.zeros(count, 12, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, n in enumerate(lengths.tolist()):
            ids[r, :n] = torch.randint(1000, 5000, (n,), generator=gen)
            mask[r, :n] = 1
        return ids, mask

    q, qm = rows(WORLD * B)
    k, km = rows(WORLD * B * n_pairs)
    return {"q_input_ids": q, "q_attention_mask": qm, "k_input_ids": k, "k_attention_mask": km}


def shard(batch: dict, n_pairs: int, rank: int, world: int) -> dict:
    """This rank's documents (rank 0 the first half), re-padded to their own longest row."""
    per = batch["q_input_ids"].shape[0] // world
    out = {}
    for side, rows in (("q", slice(rank * per, (rank + 1) * per)),
                       ("k", slice(rank * per * n_pairs, (rank + 1) * per * n_pairs))):
        mask = batch[f"{side}_attention_mask"][rows]
        width = int(mask.sum(1).max())
        out[f"{side}_input_ids"] = batch[f"{side}_input_ids"][rows, :width]
        out[f"{side}_attention_mask"] = mask[:, :width]
    return out


def make_method(n_pairs: int, overrides: dict):
    encoder = tiny_bert(hidden=16, layers=1, heads=2, seed=0)
    for module in encoder.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    args = MethodArgs(temperature=0.1, norm_query=True, norm_doc=True, momentum=0.9, **overrides)
    return build_method(encoder, args, n_pairs, seed=0).train()


def run_scenario(n_pairs: int, overrides: dict, rank: int, world: int) -> dict:
    """Two steps; returns losses, averaged gradients of step 1, final queue/pointer/key encoder."""
    torch.manual_seed(0)
    method = make_method(n_pairs, overrides)
    out = {"loss": [], "grads": None}
    params = [p for p in method.encoder.parameters()]
    for step in range(2):
        batch = shard(full_batch(n_pairs, step), n_pairs, rank, world)
        loss, _ = method(batch)
        method.zero_grad()
        loss.backward()
        grads = []
        for p in params:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if world > 1:
                dist.all_reduce(g)
                g = g / world
            grads.append(g.clone())
        mean_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= world
        out["loss"].append(mean_loss.item())
        if step == 0:
            out["grads"] = grads
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g, alpha=-LR)
        hook = getattr(method, "on_optimizer_step", None)
        if hook:
            hook()
    if hasattr(method, "queue"):
        out["queue"], out["ptr"] = method.queue.clone(), int(method.queue_ptr)
        out["key_params"] = [p.detach().clone() for p in method.key_encoder.parameters()]
    return out


def _worker(rank: int, world: int, port: int, result_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {name: run_scenario(n, o, rank, world) for name, (n, o) in SCENARIOS.items()}
        if rank == 0:
            torch.save(results, result_file)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    result_file = str(tmp_path_factory.mktemp("dist") / "results.pt")
    mp.spawn(_worker, args=(WORLD, _free_port(), result_file), nprocs=WORLD, join=True)
    return torch.load(result_file)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_processes_equal_one_process_with_the_doubled_batch(two_process_results, name):
    n_pairs, overrides = SCENARIOS[name]
    torch.set_num_threads(1)
    single = run_scenario(n_pairs, overrides, rank=0, world=1)
    double = two_process_results[name]
    for a, b in zip(single["loss"], double["loss"]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert single["loss"][0] != single["loss"][1]
    for g1, g2 in zip(single["grads"], double["grads"]):
        torch.testing.assert_close(g1, g2, atol=2e-6, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in single["grads"])
    if "queue" in single:
        assert single["ptr"] == double["ptr"] == (2 * WORLD * B * n_pairs) % overrides["queue_size"]
        torch.testing.assert_close(single["queue"], double["queue"], atol=1e-5, rtol=1e-4)
        for p1, p2 in zip(single["key_params"], double["key_params"]):
            torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-5)
