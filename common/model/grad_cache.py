"""Gradient caching (GradCache: Gao, Zhang, Han & Callan, "Scaling Deep Contrastive Learning Batch
Size under Memory Limited Setup", RepL4NLP 2021, Sec. 3): a contrastive batch of any size in the
memory of one chunk, with exactly the gradient of the uncached loss.

    1. embed every input in chunks of `train.grad_cache_chunk` rows *without* a graph, saving the
       RNG state before each chunk;
    2. compute the loss from those embeddings (as leaves) and its gradient g = dL/de with respect
       to the embeddings — the loss code is the method's own, unchanged;
    3. re-embed each chunk *with* a graph under its saved RNG state (so dropout draws the same
       masks as in step 1) and backpropagate sum(e * g) — by the chain rule this accumulates
       dL/dtheta = sum_rows (de/dtheta)^T g in the parameters.

The contract a method fulfils (`EmbeddingMethod`):
    embedding_inputs(batch) -> {name: (input_ids, attention_mask, tower)}   every trainable embedding
    embed_rows(name, input_ids, attention_mask, tower) -> Tensor[rows, H]  row-wise (default: encoder)
    loss_from_embeddings(embeddings: {name: Tensor}, batch) -> (loss, stats)
and forward(batch) = loss_from_embeddings(embed_all(batch), batch), the uncached path.

Distributed: the re-embedding passes go through the (DDP-wrapped) module's forward, so DDP sees
them; all passes but the last run under `no_sync`, and the last pass holds the last chunk of
*every* embedding (chunks are aligned at the end), so separate towers all take part in the
synchronised backward. Cross-process negatives stay exact: step 2's gathers all-reduce the
embedding gradients (twotower.common.model.distributed.gather_with_grad) before step 3.
Reference implementation consulted for the RNG replay: luyug/GradCache (`RandContext`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

EmbeddingInputs = Mapping[str, "tuple[Tensor, Tensor, str]"]


class EmbeddingMethod(nn.Module):
    """Base of methods whose loss is computed from encoder embeddings (see the module docstring)."""

    def embedding_inputs(self, batch: Mapping) -> dict[str, tuple[Tensor, Tensor, str]]:
        raise NotImplementedError

    def embed_rows(self, name: str, input_ids: Tensor, attention_mask: Tensor,
                   tower: str) -> Tensor:
        return self.encoder(input_ids, attention_mask, tower=tower)

    def loss_from_embeddings(self, embeddings: dict[str, Tensor], batch: Mapping
                             ) -> tuple[Tensor, dict]:
        raise NotImplementedError

    def embed_all(self, batch: Mapping) -> dict[str, Tensor]:
        return {name: self.embed_rows(name, ids, mask, tower)
                for name, (ids, mask, tower) in self.embedding_inputs(batch).items()}

    def forward(self, batch: Mapping, replay: "_ReplayPass | None" = None):
        if replay is not None:  # GradCache step 3, routed through forward so DDP sees it
            return replay.surrogate(self)
        return self.loss_from_embeddings(self.embed_all(batch), batch)


class RandContext:
    """The RNG state at construction; `with ctx:` runs under that state and restores the outer one
    afterwards (CPU generator and, when CUDA is in use, every CUDA device's)."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self._fork: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> None:
        devices = list(range(torch.cuda.device_count())) if self.cuda is not None else []
        self._fork = torch.random.fork_rng(devices=devices)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)

    def __exit__(self, *exc) -> None:
        assert self._fork is not None
        self._fork.__exit__(*exc)
        self._fork = None


@dataclass
class _Chunk:
    name: str
    rows: slice
    input_ids: Tensor
    attention_mask: Tensor
    tower: str
    rng: RandContext
    grad: Tensor | None = None


@dataclass
class _ReplayPass:
    """Step 3 for one group of chunks: re-embed with a graph, return sum(e * g)."""

    chunks: list[_Chunk]
    autocast: Callable[[], contextlib.AbstractContextManager]

    def surrogate(self, method: EmbeddingMethod) -> Tensor:
        total = None
        for c in self.chunks:
            with c.rng, self.autocast():
                emb = method.embed_rows(c.name, c.input_ids, c.attention_mask, c.tower)
            term = (emb.float() * c.grad).sum()
            total = term if total is None else total + term
        assert total is not None
        return total


def _trim(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the columns that are padding in every row of the chunk (right padding): a chunk of
    short texts does not pay for the longest text of the batch. Pooling ignores padding, so the
    embeddings are the same."""
    if attention_mask.shape[1] == 0:
        return input_ids, attention_mask
    width = int(attention_mask.sum(1).max())
    if bool(attention_mask[:, width:].any()):  # left padding or holes: keep everything
        return input_ids, attention_mask
    return input_ids[:, :width], attention_mask[:, :width]


@dataclass
class GradCache:
    """One cached micro-batch: `loss, stats = gc.forward(batch)`, then `gc.backward(...)`."""

    method: nn.Module  # possibly wrapped (DDP); its unwrapped module is an EmbeddingMethod
    chunk_size: int
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    _chunks: list[_Chunk] = field(default_factory=list, repr=False)

    @property
    def inner(self) -> EmbeddingMethod:
        inner = getattr(self.method, "module", self.method)
        if not all(hasattr(inner, a) for a in ("embedding_inputs", "loss_from_embeddings")):
            raise TypeError(f"train.grad_cache_chunk needs a method with embedding_inputs() and "
                            f"loss_from_embeddings() (twotower.common.model.grad_cache.EmbeddingMethod); "
                            f"{type(inner).__name__} has not")
        return inner

    def forward(self, batch: Mapping) -> tuple[Tensor, dict]:
        """Steps 1 and 2: the loss (its graph ends at the cached embeddings) and its stats."""
        if self.chunk_size <= 0:
            raise ValueError(f"train.grad_cache_chunk must be > 0; got {self.chunk_size}")
        inner = self.inner
        self._chunks = []
        leaves: dict[str, Tensor] = {}
        for name, (ids, mask, tower) in inner.embedding_inputs(batch).items():
            parts = []
            for start in range(0, ids.shape[0], self.chunk_size):
                rows = slice(start, start + self.chunk_size)
                c_ids, c_mask = _trim(ids[rows], mask[rows])
                chunk = _Chunk(name, rows, c_ids, c_mask, tower, RandContext())
                with torch.no_grad(), self.autocast():
                    parts.append(inner.embed_rows(name, c_ids, c_mask, tower))
                self._chunks.append(chunk)
            full = torch.cat(parts) if parts else ids.new_zeros((0, 0), dtype=torch.float)
            leaves[name] = full.detach().float().requires_grad_(True)
        # the RNG state after step 1 is the one the rest of the step (and the next) continues from
        with self.autocast():
            loss, stats = inner.loss_from_embeddings(leaves, batch)
        self._leaves = leaves
        self._loss = loss
        return loss, stats

    def backward(self, scale: float = 1.0, backward_fn: Callable[[Tensor], None] | None = None,
                 no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 sync_last: bool = True) -> None:
        """Steps 2b and 3: g = scale * dL/de, then one re-embedding pass per chunk index.

        backward_fn: e.g. `accelerator.backward` (loss scaling for fp16); no_sync: the wrapped
        module's `no_sync` (every pass but the last; the last too unless sync_last)."""
        backward_fn = backward_fn or (lambda t: t.backward())
        names = list(self._leaves)
        used = [n for n in names if self._leaves[n].numel()]
        grads = torch.autograd.grad(self._loss, [self._leaves[n] for n in used], allow_unused=True)
        by_name = {n: (g if g is not None else torch.zeros_like(self._leaves[n])) * scale
                   for n, g in zip(used, grads)}
        per_name: dict[str, list[_Chunk]] = {}
        for c in self._chunks:
            if c.name in by_name:
                c.grad = by_name[c.name][c.rows]
                per_name.setdefault(c.name, []).append(c)
        n_passes = max((len(v) for v in per_name.values()), default=0)
        for p in range(n_passes):  # align at the end: the last pass has every name's last chunk
            group = [cs[p - (n_passes - len(cs))] for cs in per_name.values()
                     if p - (n_passes - len(cs)) >= 0]
            last = p == n_passes - 1
            with (contextlib.nullcontext() if last and sync_last else no_sync()):
                backward_fn(self.method(None, replay=_ReplayPass(group, self.autocast)))
        self._chunks, self._leaves, self._loss = [], {}, None
