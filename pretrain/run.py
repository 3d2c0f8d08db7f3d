"""Unsupervised pretraining of a dense retriever from raw text (Contriever / ReContriever / ICT).

    python pretrain/run.py --recipe recontriever_cpu [key=value ...] [--resume]
    accelerate launch --multi_gpu --num_processes 2 pretrain/run.py --recipe recontriever \
        train.max_steps=10
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import parse_run_args, print_result, setup_process  # noqa: E402
from common.config import load_recipe  # noqa: E402
from pretrain.args import PretrainRecipe  # noqa: E402

log = logging.getLogger("twotower.pretrain")


def build(recipe: PretrainRecipe, report=None):
    """(method, dataset, collate_fn) of a recipe; `report` (common.data.SkipReport) counts the
    corpus lines skipped with data.on_error=skip."""
    from accelerate.utils import set_seed

    from common.encoder import Encoder
    from pretrain.dataset import build_pair_dataset
    from pretrain.methods import build_method

    set_seed(recipe.train.seed)  # a random_init model must be the same on every process and run
    encoder = Encoder.load(recipe.model)
    dataset, collate = build_pair_dataset(recipe, encoder, report)
    method = build_method(encoder, recipe.method, recipe.pairs.n_pairs, recipe.train.seed)
    return method, dataset, collate


def main(argv: list[str] | None = None) -> dict:
    run = parse_run_args("Unsupervised contrastive pretraining (pretrain/)", argv)
    recipe = load_recipe(PretrainRecipe, run.recipe, run.overrides)
    setup_process()
    from accelerate import PartialState

    from common.data import SkipReport
    from common.training import Trainer, use_cpu

    # join the process group before building the data: the main process tokenises the corpora
    # first and the others read its cache (pretrain.dataset.main_process_first); a bare
    # PartialState() on a CPU-only launch of N processes would make N independent "main" runs
    PartialState(cpu=use_cpu(recipe.train.device))
    skipped = SkipReport()
    method, dataset, collate = build(recipe, skipped)
    log.info("%s: %d training items per epoch, method %s, %d key(s) per query", run.recipe,
             len(dataset), recipe.method.name, recipe.pairs.n_pairs)
    # evaluation (and diagnostics) on recipe.eval.data: built by the Trainer
    trainer = Trainer(args=recipe.train, method=method, train_dataset=dataset, collate_fn=collate,
                      recipe=recipe)
    result = trainer.train(resume=run.resume)
    if recipe.data.on_error == "skip":  # the opted-in count, at the end where it is seen
        result["skipped_bad_lines"] = skipped.total
        if skipped:
            log.warning("data.on_error=skip: %s", skipped.summary())
    print_result(result, recipe.train.output_dir)
    return result


if __name__ == "__main__":
    main()
