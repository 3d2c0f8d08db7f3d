"""benchmarks/quality.py section `label_free_sentences`: label-free fine-tuning on sentences of
the corpus (data.kind=sentences: a sentence of a document is the query, the document its
positive, one BM25-mined negative), on the dev split, each choice against the label-free base
(recipe `domain_pretrain`'s dev run, 300 steps) of the same seed, query by query. Like every
label-free run, training reads the corpus only; the held-out queries' labels only score."""
from __future__ import annotations

from benchmarks.quality_choices import LABEL_FREE_ABLATION
from benchmarks.quality_runs import DEV_EVAL, finetune, recipe_seeds, seed_suffix, slug

# recipe `fewshot` (its losses, batch, bf16, BM25 mining of ranks 4-53) on pseudo-queries: 2,400
# sampled documents for one epoch = 75 steps of 32, the step count of the 809-query `fewshot` run
SENTENCES = ["data.kind=sentences", "data.max_queries=2400", "train.epochs=1"]
SENTENCE_CHOICES = {
    "sentences as queries, BM25 negative, lr 5e-5": [*SENTENCES, "train.lr=5e-5"],
    "sentences as queries, BM25 negative, lr 2e-5": [*SENTENCES, "train.lr=2e-5"],
}
BASE = f"ablation, label-free: {next(iter(LABEL_FREE_ABLATION))}"  # section `ablation`'s row


def section_label_free_sentences(ns) -> dict:
    chosen = ns.choices or list(SENTENCE_CHOICES)
    unknown = set(chosen) - set(SENTENCE_CHOICES)
    if unknown:
        raise SystemExit(f"unknown --choices {sorted(unknown)}; known: {list(SENTENCE_CHOICES)}")
    rows = {}
    for seed, own in recipe_seeds(ns, "finetune/run.py", "fewshot"):
        suffix = seed_suffix(seed, own)
        for name in chosen:
            group = f"ablation, label-free: {name}"
            rows[group + (f" (seed {seed})" if own else "")] = {
                **finetune(f"dev_{slug(name)}{suffix}", "fewshot",
                           [*SENTENCE_CHOICES[name], *own, *DEV_EVAL], ns),
                "qrels": [ns.data, "train"], "group": group, "seed": seed,
                "base": BASE + (f" (seed {seed})" if own else "")}
    return rows
