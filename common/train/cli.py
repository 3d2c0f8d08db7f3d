"""Argument parsing shared by the thin entry points (`pretrain/run.py`, `finetune/run.py`).

argparse with `parse_args` (never `parse_known_args`): a mistyped flag is an error, and every
`key=value` word is a recipe override that `twotower.common.recipe.config` checks against the recipe's schema.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from twotower.common.model.distributed import is_main


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


class LaunchError(RuntimeError):
    """The process was started in a way that would not run what the user asked for."""


def setup_process() -> None:
    """What every training entry point does first: logging, a check of how it was launched, and,
    under a launcher, dying with it."""
    setup_logging()
    check_launch(os.environ)
    die_with_launcher()


def check_launch(env) -> None:
    """`accelerate launch --num_processes 2 script.py` without `--multi_gpu` (or a config saying
    so) runs Accelerate's simple launcher: ONE process, which then trains alone and records
    world_size 1. That launcher exports MASTER_PORT for N > 1 but no WORLD_SIZE; refuse it."""
    simple = "ACCELERATE_USE_CPU" in env and "MASTER_PORT" in env and "WORLD_SIZE" not in env
    if simple:
        raise LaunchError(
            "accelerate launch was given several processes but started one: without --multi_gpu "
            "(or a multi-process config) it runs a single process. On CPUs add --multi_gpu (gloo), "
            "e.g. accelerate launch --multi_gpu --num_processes 2 ...; for one process drop "
            "--num_processes.")


def die_with_launcher() -> None:
    """torchrun / `accelerate launch` start each worker in a session of its own (torch elastic's
    SubprocessHandler: start_new_session=True), so a SIGKILL of the launcher, or of its process
    group, leaves the workers training. Ask Linux to SIGKILL this worker when its parent dies
    (prctl PR_SET_PDEATHSIG); elsewhere, or outside a launcher, nothing changes."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
        logging.getLogger("twotower").warning(
            "prctl(PR_SET_PDEATHSIG) failed (errno %d): this worker outlives a killed launcher",
            ctypes.get_errno())
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def setup_logging() -> None:
    """Warnings from libraries, progress of twotower's own modules."""
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("twotower").setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def print_result(result: dict, output_dir: str) -> None:
    """The final figures of a run, printed once (main process)."""
    if not is_main():
        return
    print(" | ".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}"
                     for k, v in result.items()))
    print(f"model saved to {Path(output_dir) / 'model'}")
