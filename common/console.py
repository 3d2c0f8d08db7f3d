"""The `twotower` command: one subcommand per entry point.

    twotower finetune --recipe fewshot_cpu [key=value ...] [--resume]
    twotower pretrain --recipe recontriever_cpu
    twotower evaluate --model runs/x/model --data scifact --split test
    twotower recipes                       # the recipe names, shipped and in $TWOTOWER_RECIPES

Each subcommand runs its module's `main(argv)` in this process (one process; for several, run the
module under Accelerate: `accelerate launch --multi_gpu --num_processes 8 -m twotower.finetune.run
--recipe pair_two_stage`). A subcommand's module is imported only when it is asked for, by name:
`twotower --help` stays fast, and this file depends on no stage (it sits below them).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from twotower.common.recipe.config import recipe_dirs

COMMANDS = {  # subcommand -> (module with main(argv), what it does)
    "pretrain": ("twotower.pretrain.run", "unsupervised contrastive pretraining from raw text"),
    "finetune": ("twotower.finetune.run", "fine-tune a dense retriever (labelled or teacher pairs)"),
    "evaluate": ("twotower.common.eval.cli", "BM25, dense or reranking evaluation, BEIR-style"),
    "mine": ("twotower.finetune.mine", "mine hard negatives with BM25 or a dense model"),
    "analyze": ("twotower.common.report.analyze", "embedding-space diagnostics of a model"),
    "compare": ("twotower.common.report.compare", "compare runs with paired significance tests"),
    "export": ("twotower.common.model.export_cli", "ONNX and int8 files for CPU serving"),
    "push": ("twotower.common.model.push_cli", "upload a saved model to the Hugging Face Hub"),
    "demo": ("twotower.pretrain.demo", "evaluate, pretrain without labels, evaluate again"),
}


def recipe_names() -> list[str]:
    return sorted({p.stem for d in recipe_dirs() if d.is_dir() for p in d.glob("*.yaml")})


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="twotower", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train dense retrievers in two stages and evaluate them.",
        epilog="subcommands:\n" + "\n".join(f"  {k:<10}{v[1]}" for k, v in COMMANDS.items())
        + "\n  recipes   list the recipe names\n\n`twotower SUBCOMMAND --help` for its options.")
    parser.add_argument("command", choices=[*COMMANDS, "recipes"], metavar="SUBCOMMAND")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    ns = parser.parse_args(argv[:1])
    if ns.command == "recipes":
        print("\n".join(recipe_names()))
        return 0
    module = importlib.import_module(COMMANDS[ns.command][0])  # by name: only the one asked for
    sys.argv = [f"twotower {ns.command}", *argv[1:]]  # what the run records as its command
    result = module.main(argv[1:])
    # by name, as the subcommand (torch is loaded by now; `twotower --help` never loads it)
    importlib.import_module("twotower.common.model.distributed").leave_processes()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
