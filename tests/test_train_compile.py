"""train.compile (issue #24): the towers under torch.compile in training mode give eager's
gradients (fp32 tolerance), leave parameters and state_dict as they were, and do not touch
evaluation; a compiled fine-tuning run killed after a checkpoint and resumed ends bit for bit
where the uninterrupted compiled run ends; GradCache with it is refused at load."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from tests.test_reliability_resume import TINY_MODEL, crash_and_resume
from twotower.common.model.encoder import tiny_bert
from twotower.common.recipe.config import RecipeError, load_recipe
from twotower.finetune.args import FinetuneRecipe

QUERIES = ["protein folding in cells", "river deltas", "the law of the market in city states"]
DOCS = ["proteins fold into shapes inside the cell", "a delta forms where a river meets the sea",
        "markets and law", "stars and planets form from gas", "island birds sing",
        "vaccines and doses"]


def loss_and_grads(encoder) -> tuple[float, dict]:
    encoder.zero_grad(set_to_none=True)
    q = encoder(**encoder.tokenize(QUERIES, "query"), tower="query")
    d = encoder(**encoder.tokenize(DOCS, "doc"), tower="doc")
    loss = F.cross_entropy(q @ d.T / 0.05, torch.arange(len(QUERIES)))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in encoder.named_parameters()
                         if p.grad is not None}


def test_compiled_training_gives_eager_gradients_and_keeps_the_state():
    eager = tiny_bert(dropout=0.0).train()
    compiled = tiny_bert(dropout=0.0).train()  # same seed: same weights
    keys = list(compiled.state_dict())
    counters.clear()
    compiled.compile_for_training()
    loss_eager, grads_eager = loss_and_grads(eager)
    loss_compiled, grads_compiled = loss_and_grads(compiled)
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert loss_compiled == pytest.approx(loss_eager, rel=1e-5)
    assert grads_eager.keys() == grads_compiled.keys() and grads_eager
    # inductor reorders float sums: equal up to rounding, relative to each gradient's size (and
    # to the whole gradient's for those that are 0 up to rounding, as the key biases' are)
    total = torch.cat([g.flatten() for g in grads_eager.values()]).norm()
    for name, grad in grads_eager.items():
        error = (grads_compiled[name] - grad).norm()
        assert error <= 1e-4 * grad.norm() + 1e-6 * total, f"{name}: differs by {error:.2e}"
    assert list(compiled.state_dict()) == keys  # the wrappers are not submodules
    assert "_orig_mod" not in " ".join(n for n, _ in compiled.named_parameters())
    # evaluation mode runs the towers themselves, not the compiled wrappers
    before = counters["stats"]["calls_captured"]
    compiled.encode(["an evaluation text"], progress=False)
    assert counters["stats"]["calls_captured"] == before


def test_compiled_finetuning_resumes_exactly(tmp_path):
    from tests.test_finetune_mine import write_beir

    write_beir(tmp_path / "beir")
    # dropout on: inductor draws its random seeds from torch's generator, which the Trainer
    # re-seeds per micro-batch, so the resumed run repeats the straight one bit for bit
    crash_and_resume(tmp_path, "finetune/run.py", "fewshot_cpu", [
        *TINY_MODEL, f"data.path={tmp_path / 'beir'}", "data.max_queries=0", "data.n_negatives=1",
        "data.mine={retriever: bm25, depth: 20, skip_top: 0, window: 6, n: 5}",
        "model.max_doc_length=32", "model.attention_dropout=0.1", "model.hidden_dropout=0.1",
        "train.per_device_batch_size=2", "train.warmup_steps=1", "train.compile=true"],
        max_steps=6)


def test_compile_with_grad_cache_is_refused():
    with pytest.raises(RecipeError, match="train.compile.*train.grad_cache_chunk"):
        load_recipe(FinetuneRecipe, "fewshot_cpu", ["train.compile=true",
                                                     "train.grad_cache_chunk=8"])
