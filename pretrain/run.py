"""Unsupervised pretraining of a dense retriever from raw text (Contriever / ReContriever / ICT).

    python pretrain/run.py --recipe recontriever_cpu [key=value ...] [--resume]
    accelerate launch --multi_gpu --num_processes 2 pretrain/run.py --recipe recontriever \
        train.max_steps=10
"""
from __future__ import annotations

import logging
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import set_seed

from twotower.common.data import SkipReport
from twotower.common.model.distributed import leave_processes, use_cpu
from twotower.common.model.encoder import Encoder
from twotower.common.recipe.config import load_recipe, recipe_to_yaml
from twotower.common.report.callbacks import callbacks_from_recipe
from twotower.common.report.model_card import CardFacts, command_of
from twotower.common.train.cli import parse_run_args, print_result, setup_process
from twotower.common.train.trainer import Trainer
from twotower.pretrain.args import PretrainRecipe
from twotower.pretrain.dataset import build_pair_dataset
from twotower.pretrain.losses import build_method

log = logging.getLogger("twotower.pretrain")


def build(recipe: PretrainRecipe, report=None):
    """(method, dataset, collate_fn) of a recipe; `report` (twotower.common.data.SkipReport) counts the
    corpus lines skipped with data.on_error=skip."""
    set_seed(recipe.train.seed)  # a random_init model must be the same on every process and run
    encoder = Encoder.load(recipe.model)
    dataset, collate = build_pair_dataset(recipe, encoder, report)
    method = build_method(encoder, recipe.method, recipe.pairs.n_pairs, recipe.train.seed)
    return method, dataset, collate


def main(argv: list[str] | None = None) -> dict:
    run = parse_run_args("Unsupervised contrastive pretraining (pretrain/)", argv)
    recipe = load_recipe(PretrainRecipe, run.recipe, run.overrides)
    setup_process()
    # join the process group before building the data: the main process tokenises the corpora
    # first and the others read its cache (twotower.pretrain.dataset.main_process_first); a bare
    # PartialState() on a CPU-only launch of N processes would make N independent "main" runs
    PartialState(cpu=use_cpu(recipe.train.device))
    skipped = SkipReport()
    method, dataset, collate = build(recipe, skipped)
    log.info("%s: %d training items per epoch, method %s, %d key(s) per query", run.recipe,
             len(dataset), recipe.method.name, recipe.pairs.n_pairs)
    recipe_yaml = recipe_to_yaml(recipe)
    card = CardFacts(Path(run.recipe or "defaults").stem, recipe_yaml, recipe.model.name_or_path,
                     list(recipe.data.corpora), recipe.eval.data, recipe.eval.split,
                     command_of("pretrain", run.recipe, run.overrides))
    trainer = Trainer(args=recipe.train, method=method, train_dataset=dataset, collate_fn=collate,
                      recipe_yaml=recipe_yaml, callbacks=callbacks_from_recipe(
                          recipe.eval, recipe.train.seed, recipe_yaml, card))
    result = trainer.train(resume=run.resume)
    if recipe.data.on_error == "skip":  # the opted-in count, at the end where it is seen
        result["skipped_bad_lines"] = skipped.total
        if skipped:
            log.warning("data.on_error=skip: %s", skipped.summary())
    print_result(result, recipe.train.output_dir)
    return result


if __name__ == "__main__":
    main()
    leave_processes()
