"""The fine-tuning method handed to twotower.common.train.trainer.Trainer: encode a batch of groups, then a
weighted sum of the recipe's loss terms (finetune/losses), each computed from the embeddings.

Encoding and loss are separate (twotower.common.model.grad_cache.EmbeddingMethod), so `train.grad_cache_chunk`
can embed in chunks and reuse every loss term unchanged."""
from __future__ import annotations

from typing import Mapping

from torch import Tensor, nn

from twotower.common.model.encoder import Encoder
from twotower.common.model.grad_cache import EmbeddingMethod
from twotower.finetune.args import LossArgs
from twotower.finetune.losses import LOSSES, GroupEmbeddings


class FinetuneMethod(EmbeddingMethod):
    """forward(batch) -> (sum_t weight_t * L_t, stats). Batch layout: see twotower.finetune.data.GroupCollator."""

    def __init__(self, encoder: Encoder, loss: LossArgs):
        super().__init__()
        self.encoder = encoder
        self.weights = loss.active()
        if not self.weights:
            raise ValueError("no loss term has a weight != 0")
        self.terms = nn.ModuleDict({name: LOSSES[name](getattr(loss, name)) for name in self.weights})

    def embedding_inputs(self, batch: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor, str]]:
        inputs = {"query": (batch["query_input_ids"], batch["query_attention_mask"], "query"),
                  "docs": (batch["doc_input_ids"], batch["doc_attention_mask"], "doc")}
        if "negq_input_ids" in batch:
            inputs["neg_queries"] = (batch["negq_input_ids"], batch["negq_attention_mask"], "query")
        return inputs

    def group_embeddings(self, emb: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> GroupEmbeddings:
        query, docs = emb["query"], emb["docs"]
        b, hidden = query.shape
        if docs.shape[0] % b:
            raise ValueError(f"{docs.shape[0]} documents for {b} queries: expected B * (1 + k)")
        negatives = docs[b:].reshape(b, docs.shape[0] // b - 1, hidden)
        neg_queries = emb["neg_queries"].reshape(b, -1, hidden) if "neg_queries" in emb else None
        return GroupEmbeddings(
            query=query, positive=docs[:b], negatives=negatives, neg_queries=neg_queries,
            teacher_pos=batch.get("teacher_pos"), teacher_neg=batch.get("teacher_neg"),
            teacher_neg_queries=batch.get("teacher_neg_queries"))

    def embed(self, batch: Mapping[str, Tensor]) -> GroupEmbeddings:
        return self.group_embeddings(self.embed_all(batch), batch)

    def loss_from_embeddings(self, emb: Mapping[str, Tensor], batch: Mapping[str, Tensor]
                             ) -> tuple[Tensor, dict]:
        groups = self.group_embeddings(emb, batch)
        total: Tensor | None = None
        stats: dict = {}
        for name, term in self.terms.items():
            value, extra = term(groups)
            weighted = self.weights[name] * value
            total = weighted if total is None else total + weighted
            stats[f"loss_{name}"] = value.detach()
            stats.update({k: v.detach() if isinstance(v, Tensor) else v for k, v in extra.items()})
        assert total is not None
        return total, stats
