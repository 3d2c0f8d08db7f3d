"""Fine-tune a dense retriever from labelled or teacher-labelled pairs.

    python finetune/run.py --recipe fewshot_cpu [key=value ...] [--resume]
    accelerate launch --multi_gpu --num_processes 2 finetune/run.py --recipe pair_two_stage

A recipe with `stages` (pair_two_stage) runs them in order, each from the previous stage's model,
in <train.output_dir>/stages/<name>/; a recipe with `pretrain.recipe` (domain_adapt) first runs
that pretraining recipe (pretrain/run.py) into <train.output_dir>/pretrain/. The final model is
<train.output_dir>/model. --resume skips finished parts and resumes the unfinished one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import set_seed

from twotower.common.data import DataNotFoundError, SkipReport, resolve_data
from twotower.common.eval.evaluate import eval_args_data
from twotower.common.model.distributed import leave_processes
from twotower.common.model.encoder import Encoder
from twotower.common.model.loading import check_model
from twotower.common.recipe.config import RecipeError, load_recipe, recipe_to_yaml
from twotower.common.report.callbacks import callbacks_from_recipe
from twotower.common.report.model_card import CardFacts, command_of
from twotower.common.train.cli import RunArgs, parse_run_args, print_result, setup_process
from twotower.common.train.epochs import resolve_batch
from twotower.common.train.rundir import replace_folder_atomically, write_atomic
from twotower.common.train.trainer import Trainer, use_cpu
from twotower.finetune.args import FinetuneRecipe, StageArgs
from twotower.finetune.data import GroupCollator, GroupDataset
from twotower.finetune.data_files import data_file, msmarco_collection
from twotower.finetune.fusion_teacher import FusionTeacher
from twotower.finetune.method import FinetuneMethod
from twotower.finetune.pseudo import pseudo_candidates
from twotower.finetune.sources import build_pool, finish_pool, required_pairs
from twotower.finetune.teacher import Teacher
from twotower.finetune.tokens import LongestDocument, TokenCache
from twotower.pretrain.run import main as pretrain_main

log = logging.getLogger("twotower.finetune")


def _teacher(recipe: FinetuneRecipe, device):
    if not recipe.teacher.model:
        return None

    cache = recipe.teacher.cache or str(Path(recipe.train.output_dir).resolve().parent
                                        / "teacher_cache.sqlite")
    kind = FusionTeacher if recipe.teacher.kind == "fusion" else Teacher
    return kind(recipe.teacher, cache_path=cache, device=device)


def check_models(recipe: FinetuneRecipe) -> None:
    """Every model the recipe needs -- student (and its tokenizer), teacher, dense miners -- found
    and its config read before any long step (domain pretraining, BM25, mining, scoring); a
    missing one is a ModelLoadError naming the recipe key and what to download or set."""
    models = {"model.name_or_path": recipe.model.name_or_path, "model.tokenizer":
              recipe.model.tokenizer, "teacher.model": recipe.teacher.model}
    for name, stage in recipe.stage_list():
        where = "data" if name == "main" else f"stages.{name}.data"
        if stage.data.mine.retriever in ("dense", "hybrid"):
            models[f"{where}.mine.model"] = stage.data.mine.model
    for key, model in models.items():
        if model:
            check_model(model, key)


def dev_queries(recipe: FinetuneRecipe, stage: StageArgs) -> list[str]:
    """The eval.holdout dev queries when the evaluation data is the stage's training data (same
    folder): they are left out of training. [] otherwise."""
    if not (recipe.eval.holdout and recipe.eval.data and stage.data.path):
        return []

    eval_path = resolve_data(recipe.eval.data)
    try:  # never a download for the training data here: build_pool resolves it, or says why not
        stage_path = resolve_data(stage.data.path, download=False)
    except DataNotFoundError:
        return []
    if eval_path.resolve() != stage_path.resolve():
        return []
    return list(eval_args_data(recipe.eval).qrels)


def build_stage(recipe: FinetuneRecipe, stage: StageArgs, model_path: str, num_processes: int,
                device="cpu", report=None):
    """(method, dataset, collate) of one stage, starting from `model_path`; `report`
    (twotower.common.data.SkipReport) counts the records skipped with data.on_error=skip."""


    set_seed(recipe.train.seed)  # a random_init model must be the same on every process and run
    encoder = Encoder.load(dataclasses.replace(recipe.model, name_or_path=model_path))
    teacher = _teacher(recipe, device)
    with_teacher = stage.loss.needs_teacher_scores()
    state = PartialState()
    # pseudo labels' BM25 candidates: ranked by the main process, sent to the others (collective)
    candidates = pseudo_candidates(stage.data)
    with state.main_process_first():  # the main process reads first (and fills any file cache)
        pool = build_pool(stage.data, teacher=teacher, report=report,
                          exclude=dev_queries(recipe, stage), finish=False, candidates=candidates)
        pool.docs.open_digests()  # the texts' digests the sampler compares: built once, shared
        pool.queries.open_digests()
    # mining is collective (dense: one slice of the corpus per process), so not one at a time
    finish_pool(pool, stage.data)
    # the main process computes teacher scores into the cache first; the others then read them
    with state.main_process_first():
        if with_teacher and teacher is not None:
            n = teacher.fill_pool(pool, required_pairs(pool, with_neg_queries=stage.data.n_neg_queries > 0))
            log.info("teacher: %d pairs scored (%d computed, %d from the cache)", n,
                     teacher.computed, teacher.cache_hits)
    if teacher is not None:
        teacher.close()
    tokens = None
    if stage.data.pretokenize:
        tokens = TokenCache(encoder, pool)
        with state.main_process_first():  # one cached token table per data file, shared
            tokens.tokenize_tables()
        tokens.pretokenize(progress=state.is_main_process)
    dataset = GroupDataset(pool, stage.data.n_negatives, stage.data.n_neg_queries,
                           with_teacher=with_teacher, short_pool=stage.data.short_pool,
                           seed=recipe.train.seed,
                           global_batch_size=resolve_batch(recipe.train, num_processes)
                           .per_device_batch_size * num_processes,
                           length_of=LongestDocument(tokens) if stage.data.length_grouped else None)
    return FinetuneMethod(encoder, stage.loss), dataset, GroupCollator(encoder.tokenize, tokens)


def target_corpus(recipe: FinetuneRecipe) -> str:
    """The corpus of the last stage's training data (BEIR folder, or the MS MARCO collection
    file); "" for data without one (triples, jsonl)."""

    data = recipe.stage_list()[-1][1].data
    if not data.path:
        return ""
    if data.kind in ("beir", "pseudo"):
        return data.path
    if data.kind == "sentences":  # either layout (twotower.finetune.sentence_queries)
        collection = msmarco_collection(data)
        return str(collection) if collection is not None else data.path
    if data.kind == "msmarco":
        return str(data_file(data, data.collection))
    return ""


def run_domain_pretraining(recipe: FinetuneRecipe, resume: bool) -> str:
    """domain_adapt: the pretraining stage's driver on its own recipe; returns its model path."""
    out = Path(recipe.train.output_dir) / "pretrain"
    model = out / "model"
    if resume and (model / "config.json").is_file():
        log.info("pretraining already finished: %s", model)
        return str(model)
    # by default the pretraining corpus is the fine-tuning data's own corpus (the target domain),
    # the seed is the recipe's, and the intermediate model is not evaluated; pretrain.overrides
    # come after, so they win
    defaults = ["eval.data=", f"train.seed={recipe.train.seed}"]
    named = any(o.startswith("data.corpora=") for o in recipe.pretrain.overrides)
    corpus = target_corpus(recipe)
    if corpus:
        defaults.append(f"data.corpora=[{corpus}]")
    elif not named:  # the pretraining recipe's own corpus would be a silent wrong default
        raise RecipeError("pretrain: the fine-tuning data has no corpus to pretrain on "
                          f"(data.kind={recipe.stage_list()[-1][1].data.kind}); name one in "
                          "'pretrain.overrides: [data.corpora=[...]]'")
    argv = ["--recipe", recipe.pretrain.recipe, *defaults, *recipe.pretrain.overrides,
            f"model.name_or_path={recipe.model.name_or_path}", f"train.output_dir={out}"]
    if recipe.train.overwrite_output_dir:
        argv.append("train.overwrite_output_dir=true")
    pretrain_main(argv + (["--resume"] if resume and out.exists() else []))
    return str(model)


def run_recipe(recipe: FinetuneRecipe, resume: bool = False, run: RunArgs | None = None) -> dict:
    """Every stage of `recipe` in turn (`run`: its name and command, for the model card); the
    last stage's result."""
    # join the process group before anything else touches Accelerate's state: a bare
    # PartialState() on a CPU-only launch of N processes would make N independent "main" runs
    state = PartialState(cpu=use_cpu(recipe.train.device))
    check_models(recipe)
    skipped = SkipReport()
    root = Path(recipe.train.output_dir)
    model_path = recipe.model.name_or_path
    if recipe.pretrain.recipe:
        model_path = run_domain_pretraining(recipe, resume)
    stages = recipe.stage_list()
    single = len(stages) == 1 and not recipe.pretrain.recipe
    result: dict = {}
    recipe_yaml = recipe_to_yaml(recipe)
    # evaluation (and diagnostics) on recipe.eval.data, loaded once for all the stages
    card = CardFacts(Path(run.recipe).stem if run and run.recipe else "finetune", recipe_yaml,
                     recipe.model.name_or_path,
                     list(dict.fromkeys(s.data.path for _, s in stages if s.data.path)),
                     recipe.eval.data, recipe.eval.split,
                     command_of("finetune", run.recipe, run.overrides) if run else "")
    callbacks = callbacks_from_recipe(recipe.eval, recipe.train.seed, recipe_yaml, card)
    for name, stage in stages:
        out = root if single else root / "stages" / name
        if not single and resume and (out / "model" / "config.json").is_file():
            log.info("stage %s already finished: %s", name, out / "model")
            model_path = str(out / "model")
            continue
        train = dataclasses.replace(recipe.train, output_dir=str(out),
                                    max_steps=stage.max_steps or recipe.train.max_steps,
                                    # a stage's own max_steps wins over train.epochs
                                    epochs=0.0 if stage.max_steps else recipe.train.epochs,
                                    lr=stage.lr or recipe.train.lr)
        method, dataset, collate = build_stage(recipe, stage, model_path, state.num_processes,
                                               device=state.device, report=skipped)
        log.info("stage %s: %d groups, %d negatives and %d negative queries each, losses %s",
                 name, len(dataset), stage.data.n_negatives, stage.data.n_neg_queries,
                 stage.loss.active())
        trainer = Trainer(args=train, method=method, train_dataset=dataset, collate_fn=collate,
                          recipe_yaml=recipe_yaml, callbacks=callbacks)
        result = {**trainer.train(resume=resume and out.exists()), "stage": name}
        if collate.tokens is not None and collate.tokens.computed_in_steps:
            log.info("stage %s: %d texts outside the pretokenised pools were tokenised during "
                     "steps (random fillers of short negative pools)", name,
                     collate.tokens.computed_in_steps)
        model_path = str(out / "model")
    if any(stage.data.on_error == "skip" for _, stage in stages):  # opted in: say what was lost
        result["skipped_bad_lines"] = skipped.total
        if skipped:
            log.warning("data.on_error=skip: %s", skipped.summary())
    if not single and state.is_main_process:
        # the run's model: a copy of the last stage's, swapped in whole (a crash mid-copy keeps
        # an earlier attempt's folder intact), and result.json written the same way
        replace_folder_atomically(root / "model", lambda partial: shutil.copytree(model_path, partial))
        write_atomic(root / "result.json", json.dumps(result, indent=2, default=str))
    state.wait_for_everyone()
    return result


def main(argv: list[str] | None = None) -> dict:
    run = parse_run_args("Fine-tune a dense retriever (finetune/)", argv)
    recipe = load_recipe(FinetuneRecipe, run.recipe, run.overrides)
    setup_process()
    result = run_recipe(recipe, resume=run.resume, run=run)
    print_result(result, recipe.train.output_dir)
    return result


if __name__ == "__main__":
    main()
    leave_processes()
