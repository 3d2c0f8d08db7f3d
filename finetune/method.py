"""The fine-tuning method handed to common.training.Trainer: encode a batch of groups, then a
weighted sum of the recipe's loss terms (finetune/losses), each computed from the embeddings."""
from __future__ import annotations

from typing import Mapping

from torch import Tensor, nn

from common.encoder import Encoder
from finetune.args import LossArgs
from finetune.losses import LOSSES, GroupEmbeddings


class FinetuneMethod(nn.Module):
    """forward(batch) -> (sum_t weight_t * L_t, stats). Batch layout: see finetune.data.GroupCollator."""

    def __init__(self, encoder: Encoder, loss: LossArgs):
        super().__init__()
        self.encoder = encoder
        self.weights = loss.active()
        if not self.weights:
            raise ValueError("no loss term has a weight != 0")
        self.terms = nn.ModuleDict({name: LOSSES[name](getattr(loss, name)) for name in self.weights})

    def embed(self, batch: Mapping[str, Tensor]) -> GroupEmbeddings:
        query = self.encoder(batch["query_input_ids"], batch["query_attention_mask"], tower="query")
        docs = self.encoder(batch["doc_input_ids"], batch["doc_attention_mask"], tower="doc")
        b, hidden = query.shape
        if docs.shape[0] % b:
            raise ValueError(f"{docs.shape[0]} documents for {b} queries: expected B * (1 + k)")
        negatives = docs[b:].reshape(b, docs.shape[0] // b - 1, hidden)
        neg_queries = None
        if "negq_input_ids" in batch:
            neg_queries = self.encoder(batch["negq_input_ids"], batch["negq_attention_mask"],
                                       tower="query").reshape(b, -1, hidden)
        return GroupEmbeddings(
            query=query, positive=docs[:b], negatives=negatives, neg_queries=neg_queries,
            teacher_pos=batch.get("teacher_pos"), teacher_neg=batch.get("teacher_neg"),
            teacher_neg_queries=batch.get("teacher_neg_queries"))

    def forward(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict]:
        emb = self.embed(batch)
        total: Tensor | None = None
        stats: dict = {}
        for name, term in self.terms.items():
            value, extra = term(emb)
            weighted = self.weights[name] * value
            total = weighted if total is None else total + weighted
            stats[f"loss_{name}"] = value.detach()
            stats.update({k: v.detach() if isinstance(v, Tensor) else v for k, v in extra.items()})
        assert total is not None
        return total, stats
