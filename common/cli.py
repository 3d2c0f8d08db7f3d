"""Argument parsing shared by the thin entry points (`pretrain/run.py`, `finetune/run.py`).

argparse with `parse_args` (never `parse_known_args`): a mistyped flag is an error, and every
`key=value` word is a recipe override that `common.config` checks against the recipe's schema.
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunArgs:
    recipe: str
    overrides: list[str] = field(default_factory=list)
    resume: bool = False


def run_parser(description: str, default_recipe: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Overrides are dotted recipe keys, e.g. train.lr=3e-5 train.max_steps=100.",
    )
    parser.add_argument("--recipe", default=default_recipe, required=default_recipe is None,
                        help="recipe name (recipes/NAME.yaml) or path to a YAML file")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in train.output_dir from its latest checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")
    return parser


def parse_run_args(description: str, argv: list[str] | None = None,
                   default_recipe: str | None = None) -> RunArgs:
    parser = run_parser(description, default_recipe)
    ns = parser.parse_args(argv)
    for item in ns.overrides:
        if "=" not in item:
            parser.error(f"'{item}' is not a KEY=VALUE override (e.g. train.lr=3e-5)")
    return RunArgs(recipe=ns.recipe, overrides=ns.overrides, resume=ns.resume)


def setup_logging() -> None:
    """Warnings from libraries, progress of twotower's own modules."""
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("twotower").setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def print_result(result: dict, output_dir: str) -> None:
    """The final figures of a run, printed once (main process)."""
    from common.distributed import is_main

    if not is_main():
        return
    print(" | ".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}"
                     for k, v in result.items()))
    print(f"model saved to {Path(output_dir) / 'model'}")
