"""GradCache (common/model/grad_cache.py): the parameters' gradients with train.grad_cache_chunk equal
those of the uncached loss, for every loss of both stages, with dropout (RNG replay), under
gradient accumulation in the Trainer, and with 2 gloo processes."""
import copy

import pytest
import torch

from twotower.common.model.encoder import tiny_bert
from twotower.common.model.grad_cache import GradCache
from twotower.finetune.args import LossArgs
from twotower.finetune.method import FinetuneMethod

B, K, M = 5, 2, 1
WORDS = ("protein cell gene virus climate ocean rainfall neuron vaccine enzyme receptor drug "
         "trial cancer tumour heart lung brain bone blood").split()


def texts(n, seed, lo=2, hi=12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (length,), generator=g)))
    return out


def finetune_batch(encoder, b=B, seed=0, rank=0, world=1):
    """B groups (query, positive, K negatives, M negative queries, teacher scores); with
    world > 1 the groups of `rank` only (the r-th slice, as Accelerate shards a batch)."""
    queries, docs, neg_queries = texts(b, seed), texts(b * (1 + K), seed + 1, 4, 20), texts(b * M, seed + 2)
    g = torch.Generator().manual_seed(seed + 3)
    t_pos, t_neg, t_negq = (torch.randn(b, generator=g) * 3, torch.randn(b, K, generator=g) * 3,
                            torch.randn(b, M, generator=g) * 3)
    mine = range(rank * b // world, (rank + 1) * b // world)
    pos = [docs[i] for i in mine]
    negs = [docs[b + i * K + j] for i in mine for j in range(K)]
    q = encoder.tokenize([queries[i] for i in mine], tower="query")
    d = encoder.tokenize(pos + negs, tower="doc")
    nq = encoder.tokenize([neg_queries[i * M + j] for i in mine for j in range(M)], tower="query")
    rows = list(mine)
    return {"query_input_ids": q["input_ids"], "query_attention_mask": q["attention_mask"],
            "doc_input_ids": d["input_ids"], "doc_attention_mask": d["attention_mask"],
            "negq_input_ids": nq["input_ids"], "negq_attention_mask": nq["attention_mask"],
            "teacher_pos": t_pos[rows], "teacher_neg": t_neg[rows], "teacher_neg_queries": t_negq[rows]}


LOSS_SETTINGS = {
    "infonce": {"infonce": {"weight": 1.0, "temperature": 0.1}},
    "dance_dual": {"dance_dual": {"weight": 1.0, "temperature": 0.1}},
    "samtone_symmetric": {"samtone": {"weight": 1.0, "temperature": 0.1, "symmetric": True}},
    "pair_hard": {"pair": {"weight": 1.0, "temperature": 0.1, "alpha": 0.3}},
    "pair_all": {"pair": {"weight": 1.0, "temperature": 0.1, "alpha": 0.3,
                          "passage_negatives": "all"}},
    "margin_mse": {"margin_mse": {"weight": 1.0, "student_scale": 4.0}},
    "margin_mse_dual": {"margin_mse_dual": {"weight": 1.0, "student_scale": 4.0}},
    "mnrl_dual_mix": {"infonce": {"weight": 1.0, "temperature": 0.1},
                      "dance_dual": {"weight": 0.3, "temperature": 0.1}},
}


def loss_args(setting: dict) -> LossArgs:
    args = LossArgs()
    for name, values in setting.items():
        for key, value in values.items():
            setattr(getattr(args, name), key, value)
    return args


def make_finetune_method(setting, dropout=0.0, seed=0, **model_args):
    encoder = tiny_bert(dropout=dropout, seed=seed, normalize=True, **model_args)
    return FinetuneMethod(encoder, loss_args(LOSS_SETTINGS[setting])).train()


def param_grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()
            if p.requires_grad and p.grad is not None}


def uncached_grads(method, batch):
    method.zero_grad(set_to_none=True)
    loss, _ = method(batch)
    loss.backward()
    return loss.detach(), param_grads(method)


def cached_grads(method, batch, chunk, scale=1.0):
    method.zero_grad(set_to_none=True)
    cache = GradCache(method, chunk)
    loss, _ = cache.forward(batch)
    cache.backward(scale=scale)
    return loss.detach(), param_grads(method)


def assert_grads_close(got, want, rel=2e-5):
    """Every tensor equal up to float32 rounding, relative to that tensor's largest entry."""
    assert got.keys() == want.keys() and want
    for name in want:
        scale = float(want[name].abs().max())
        err = float((got[name] - want[name]).abs().max())
        assert err <= rel * scale + 1e-8, f"{name}: max error {err:.3g} at scale {scale:.3g}"
    assert any(g.abs().sum() > 0 for g in want.values())


# --------------------------------------------------------------------------- fine-tuning
CASES = [(s, 2) for s in sorted(LOSS_SETTINGS)] + [("infonce", 1), ("infonce", 7)]


@pytest.mark.parametrize("setting,chunk", CASES)
def test_finetune_losses_cached_equal_uncached(setting, chunk):
    method = make_finetune_method(setting)
    batch = finetune_batch(method.encoder)
    want_loss, want = uncached_grads(method, batch)
    got_loss, got = cached_grads(method, batch, chunk)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-5)
    assert_grads_close(got, want)


def test_separate_towers_both_receive_cached_gradients():
    method = make_finetune_method("infonce", shared_tower=False)
    batch = finetune_batch(method.encoder)
    _, want = uncached_grads(method, batch)
    _, got = cached_grads(method, batch, 2)
    assert any(n.startswith("encoder.doc_model") for n in want)
    assert_grads_close(got, want)


def chunked_reference_grads(method, batch, chunk, seed):
    """The uncached loss on embeddings computed chunk by chunk *with* a graph, in GradCache's
    order, from the same RNG seed: what dropout-exact caching must reproduce."""
    from twotower.common.model.grad_cache import _trim

    torch.manual_seed(seed)
    method.zero_grad(set_to_none=True)
    emb = {}
    for name, (ids, mask, tower) in method.embedding_inputs(batch).items():
        parts = [method.embed_rows(name, *_trim(ids[s:s + chunk], mask[s:s + chunk]), tower)
                 for s in range(0, ids.shape[0], chunk)]
        emb[name] = torch.cat(parts)
    loss, _ = method.loss_from_embeddings(emb, batch)
    loss.backward()
    return param_grads(method), torch.get_rng_state()


@pytest.mark.parametrize("setting", ["infonce", "samtone_symmetric"])
def test_dropout_masks_are_replayed(setting):
    method = make_finetune_method(setting, dropout=0.3)
    batch = finetune_batch(method.encoder)
    want, rng_after_want = chunked_reference_grads(method, batch, 2, seed=123)
    torch.manual_seed(123)
    _, got = cached_grads(method, batch, 2)
    assert_grads_close(got, want)
    # the step leaves the RNG where the uncached computation leaves it
    assert torch.equal(torch.get_rng_state(), rng_after_want)
    # and dropout really is on: another seed gives other gradients
    other, _ = chunked_reference_grads(method, batch, 2, seed=124)
    assert any(not torch.allclose(other[n], want[n], atol=1e-5) for n in want)


def test_accumulation_scale_is_applied():
    method = make_finetune_method("infonce")
    batch = finetune_batch(method.encoder)
    _, full = cached_grads(method, batch, 3)
    _, half = cached_grads(method, batch, 3, scale=0.5)
    assert_grads_close(half, {n: g * 0.5 for n, g in full.items()})


def test_method_without_contract_is_refused():
    class Plain(torch.nn.Module):
        def forward(self, batch):
            return torch.zeros(()), {}

    with pytest.raises(TypeError, match="embedding_inputs"):
        GradCache(Plain(), 2).forward({})


# ---------------------------------------------------------------------------- pretraining
N_PAIRS = 2
PRETRAIN_SETTINGS = {
    "inbatch": dict(name="inbatch"),
    "inbatch_relevance": dict(name="inbatch", relevance_aware=True, relevance_guard="softmax"),
    "inbatch_relevance_batch": dict(name="inbatch", relevance_aware=True, relevance_group="batch",
                                    norm_query=True, norm_doc=True),
    "moco_relevance": dict(name="moco", relevance_aware=True, queue_size=64, momentum=0.9),
}


def make_pretrain_method(setting, dropout=0.0, seed=0):
    from twotower.pretrain.args import MethodArgs
    from twotower.pretrain.losses import build_method

    encoder = tiny_bert(dropout=dropout, seed=seed)
    args = MethodArgs(temperature=0.2, **PRETRAIN_SETTINGS[setting])
    return build_method(encoder, args, N_PAIRS, seed=seed).train()


def pretrain_batch(encoder, b=B, seed=10, rank=0, world=1):
    """B queries with N_PAIRS keys each (document-major); with world > 1 rank's slice only."""
    queries, keys = texts(b, seed), texts(b * N_PAIRS, seed + 1, 3, 16)
    mine = range(rank * b // world, (rank + 1) * b // world)
    q = encoder.tokenize([queries[i] for i in mine], tower="query")
    k = encoder.tokenize([keys[i * N_PAIRS + j] for i in mine for j in range(N_PAIRS)], tower="doc")
    return {"q_input_ids": q["input_ids"], "q_attention_mask": q["attention_mask"],
            "k_input_ids": k["input_ids"], "k_attention_mask": k["attention_mask"]}


@pytest.mark.parametrize("setting", sorted(PRETRAIN_SETTINGS))
def test_pretrain_losses_cached_equal_uncached(setting):
    method = make_pretrain_method(setting, dropout=0.0)
    twin = copy.deepcopy(method)
    batch = pretrain_batch(method.encoder)
    want_loss, want = uncached_grads(method, batch)
    got_loss, got = cached_grads(twin, batch, 2)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-5)
    assert_grads_close(got, want)
    if setting.startswith("moco"):  # the keys are enqueued once, the same ones
        method.on_optimizer_step()
        twin.on_optimizer_step()
        assert int(twin.queue_ptr) == int(method.queue_ptr) == B * N_PAIRS
        torch.testing.assert_close(twin.queue, method.queue)


def test_pretrain_dropout_masks_are_replayed():
    method = make_pretrain_method("inbatch_relevance", dropout=0.3)
    batch = pretrain_batch(method.encoder)
    want, rng_after = chunked_reference_grads(method, batch, 3, seed=7)
    torch.manual_seed(7)
    _, got = cached_grads(method, batch, 3)
    assert_grads_close(got, want)
    assert torch.equal(torch.get_rng_state(), rng_after)


# ---------------------------------------------------------------------------- 2 processes
def _distributed_cached_grads(rank, world, kind, setting, chunk):
    from torch.nn.parallel import DistributedDataParallel

    method = make_finetune_method(setting) if kind == "finetune" else make_pretrain_method(setting)
    make = finetune_batch if kind == "finetune" else pretrain_batch
    half = make(method.encoder, b=2 * B, rank=rank, world=world)
    wrapped = DistributedDataParallel(method)
    cache = GradCache(wrapped, chunk)
    cache.forward(half)
    cache.backward(no_sync=wrapped.no_sync)
    return param_grads(method)


@pytest.mark.parametrize("kind,setting", [("finetune", "samtone_symmetric"),
                                          ("finetune", "mnrl_dual_mix"),
                                          ("pretrain", "inbatch_relevance_batch"),
                                          ("pretrain", "moco_relevance")])
def test_two_gloo_processes_equal_one_process_uncached(kind, setting):
    from tests.dist_utils import run_distributed

    method = make_finetune_method(setting) if kind == "finetune" else make_pretrain_method(setting)
    batch = (finetune_batch if kind == "finetune" else pretrain_batch)(method.encoder, b=2 * B)
    _, want = uncached_grads(method, batch)
    results = run_distributed(_distributed_cached_grads, 2, (kind, setting, 3))
    for got in results:  # DDP averaged: every rank holds the full batch's gradient
        assert_grads_close(got, want, rel=5e-5)


# ---------------------------------------------------------------------------- the Trainer
class _Groups(torch.utils.data.Dataset):
    def __init__(self, n):
        q, d, nq = texts(n, 20), texts(n * 2, 21, 4, 20), texts(n, 22)
        self.items = [{"qid": str(i), "query": q[i], "positive": d[2 * i], "negatives": [d[2 * i + 1]],
                       "neg_queries": [nq[i]]} for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _train(tmp_path, chunk, name):
    from twotower.common.recipe.args import TrainArgs
    from twotower.common.train.trainer import Trainer
    from twotower.finetune.data import GroupCollator

    method = make_finetune_method("mnrl_dual_mix")
    args = TrainArgs(output_dir=str(tmp_path / name), max_steps=2, per_device_batch_size=4,
                     gradient_accumulation_steps=2, lr=1e-3, warmup_steps=0, device="cpu",
                     log_every=1, grad_cache_chunk=chunk)
    Trainer(args=args, method=method, train_dataset=_Groups(16),
            collate_fn=GroupCollator(method.encoder.tokenize)).train()
    return {k: v.clone() for k, v in method.encoder.state_dict().items()}


def test_trainer_with_grad_cache_takes_the_same_steps(tmp_path):
    plain = _train(tmp_path, 0, "plain")
    cached = _train(tmp_path, 3, "cached")
    start = make_finetune_method("mnrl_dual_mix").encoder.state_dict()
    moved = [k for k in plain if not torch.equal(plain[k], start[k])]
    assert moved  # training changed the weights
    for k in plain:
        torch.testing.assert_close(cached[k], plain[k], atol=2e-5, rtol=1e-4, msg=k)
