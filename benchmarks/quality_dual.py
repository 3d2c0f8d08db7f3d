"""benchmarks/quality.py sections for the dev ablation's one likely gain, DANCE's dual loss
(p 0.04 of four `fewshot` changes tried on the dev split), run on the test split afterwards:
chosen on dev, then run on test once, so not tuned on test."""
from __future__ import annotations

from benchmarks.quality_choices import FEWSHOT_ABLATION
from benchmarks.quality_runs import TEST_EVAL, finetune, recipe_seeds

DUAL = "+ dual loss (DANCE, weight 0.1)"


def section_fewshot_dual(ns) -> dict:
    """`fewshot` plus the dual loss, next to `fewshot` and sentence-transformers' rows of the
    same seeds (default 0)."""
    group = f"fewshot {DUAL}"
    return {f"{group} (seed {seed})": {
                **finetune(f"fewshot_dual_s{seed}", "fewshot",
                           [f"train.seed={seed}", *FEWSHOT_ABLATION[DUAL], *TEST_EVAL], ns),
                "group": group, "seed": seed}
            for seed in ns.seeds or [0]}


def section_domain_adapt_dual(ns) -> dict:
    """`domain_adapt` with the dual loss in its fine-tuning stage (the overrides reach that stage
    only; the pretraining stage is the recipe's, with the same seed), next to `domain_adapt`'s
    rows of the same seeds (default the recipe's own)."""
    group = f"domain_adapt {DUAL}"
    return {f"{group} (seed {seed})": {
                **finetune(f"domain_adapt_dual_s{seed}", "domain_adapt",
                           [*TEST_EVAL, *own, *FEWSHOT_ABLATION[DUAL]], ns),
                "group": group, "seed": seed}
            for seed, own in recipe_seeds(ns, "finetune/run.py", "domain_adapt")}
