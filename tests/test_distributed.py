"""Gathers with and without gradient: 2 gloo processes against 1 process holding both halves."""
import torch
import torch.nn.functional as F

from tests.dist_utils import run_distributed
from twotower.common.model import distributed as D

TAU = 0.1


def _inputs(n_per_rank=(3, 3), dim=5):
    torch.manual_seed(0)
    q = torch.randn(sum(n_per_rank), dim)
    d = torch.randn(sum(n_per_rank), dim)
    return q, d


def _infonce(q, d_all, offset):
    labels = torch.arange(q.shape[0]) + offset
    return F.cross_entropy(q @ d_all.T / TAU, labels)


def _two_process_infonce(rank, world, sizes):
    """Local queries against gathered documents; gradient averaged as DDP does."""
    q_full, d_full = _inputs(sizes)
    start, n = sum(sizes[:rank]), sizes[rank]
    q = q_full[start:start + n].clone().requires_grad_(True)
    d = d_full[start:start + n].clone().requires_grad_(True)
    d_all = D.gather_with_grad(d)
    assert D.global_offset(n) == start
    loss = _infonce(q, d_all, start)
    loss.backward()
    return {"loss": loss.detach(), "grad_q": q.grad, "grad_d": d.grad, "n": n,
            "nograd": D.gather_nograd(d).requires_grad, "world": D.world_size()}


def test_gather_with_grad_matches_single_process_doubled_batch():
    sizes = (3, 3)
    results = run_distributed(_two_process_infonce, 2, (sizes,))
    q, d = _inputs(sizes)
    q.requires_grad_(True)
    d.requires_grad_(True)
    full = _infonce(q, d, 0)
    full.backward()
    # the global objective is the mean of the per-process means (equal local sizes)
    assert torch.allclose(torch.stack([r["loss"] for r in results]).mean(), full.detach(), atol=1e-6)
    # process p's gradient, averaged over processes (DDP), equals the full gradient of its rows
    for rank, r in enumerate(results):
        rows = slice(3 * rank, 3 * rank + 3)
        assert torch.allclose(r["grad_q"] / 2, q.grad[rows], atol=1e-6)
        assert torch.allclose(r["grad_d"] / 2, d.grad[rows], atol=1e-6)
    assert all(r["world"] == 2 and r["nograd"] is False for r in results)


def _local_grad_only_gather(rank, world, sizes):
    """Contriever-style gather (local slice keeps grad, others detached): misses cross terms."""
    q_full, d_full = _inputs(sizes)
    q = q_full[3 * rank:3 * rank + 3].clone().requires_grad_(True)
    d = d_full[3 * rank:3 * rank + 3].clone().requires_grad_(True)
    parts = list(D.gather_nograd(d).split(3))
    parts[rank] = d
    _infonce(q, torch.cat(parts), 3 * rank).backward()
    return d.grad


def test_local_only_gather_would_be_wrong():
    """Guards the test above: dropping the cross-process gradient terms is detectably different."""
    sizes = (3, 3)
    results = run_distributed(_local_grad_only_gather, 2, (sizes,))
    q, d = _inputs(sizes)
    d.requires_grad_(True)
    _infonce(q, d, 0).backward()
    assert not torch.allclose(results[0] / 2, d.grad[:3], atol=1e-4)


def _variable(rank, world):
    x = torch.arange(rank + 2, dtype=torch.float32).unsqueeze(1) + 10 * rank  # sizes 2 and 3
    x.requires_grad_(True)
    gathered = D.gather_variable(x, with_grad=True)
    weights = torch.arange(gathered.shape[0], dtype=torch.float32).unsqueeze(1)
    (gathered * weights).sum().backward()
    return {"gathered": gathered.detach(), "grad": x.grad,
            "objects": D.gather_object({"rank": rank}), "offset": D.global_offset(x.shape[0])}


def test_variable_size_gather_and_its_gradient():
    r0, r1 = run_distributed(_variable, 2)
    expected = torch.tensor([[0.0], [1.0], [10.0], [11.0], [12.0]])
    assert torch.equal(r0["gathered"], expected) and torch.equal(r1["gathered"], expected)
    # each process's rows receive the sum over processes of d(sum(w*g))/dx = 2 * w
    assert torch.equal(r0["grad"], torch.tensor([[0.0], [2.0]]))
    assert torch.equal(r1["grad"], torch.tensor([[4.0], [6.0], [8.0]]))
    assert r0["objects"] == [{"rank": 0}, {"rank": 1}] and (r0["offset"], r1["offset"]) == (0, 2)


def test_single_process_is_identity():
    x = torch.randn(4, 3, requires_grad=True)
    assert D.gather_with_grad(x) is x
    assert torch.equal(D.gather_nograd(x), x) and not D.gather_nograd(x).requires_grad
    assert D.world_size() == 1 and D.rank() == 0 and D.gather_object(5) == [5]


def test_a_finished_command_leaves_the_process_group(tmp_path, monkeypatch):
    """leave_processes() destroys the group the entry points joined (a process that exits with
    gloo's threads alive can abort at interpreter shutdown, exit -6), and is a no-op without one."""
    D.leave_processes()  # no group: nothing to do
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29631")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1,
                                         init_method=f"file://{tmp_path / 'rendezvous'}")
    assert torch.distributed.is_initialized()
    D.leave_processes()
    assert not torch.distributed.is_initialized()
