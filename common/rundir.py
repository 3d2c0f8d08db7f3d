"""A run's output directory: refuse to clobber, lock against a second run, atomic checkpoints.

Layout of `train.output_dir`:
  recipe.yaml        the resolved recipe            run_info.json   versions, git commit, command
  checkpoints/step-00000100/   accelerate state + trainer_state.json + COMPLETE (written last)
  model/             final encoder (transformers + sentence-transformers layout)
  logs/              tensorboard events            metrics.json   final evaluation
  eval/              the final evaluation's run.trec, report.md, report.html
"""
from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
LOCK = ".lock"


class RunDirError(RuntimeError):
    """The output directory cannot be used as asked; the message names the flag that fixes it."""


def prepare_output_dir(path: Path, resume: bool, overwrite: bool) -> None:
    """Main process only: check the directory may be used and create it."""
    used = path.is_dir() and any(p.name != LOCK for p in path.iterdir())
    if used and not resume:
        if not overwrite:
            raise RunDirError(
                f"output directory '{path}' already holds a run. Pass --resume to continue it, "
                "set train.output_dir to a new folder, or train.overwrite_output_dir=true to "
                "delete it and start again.")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


class RunLock:
    """An exclusive advisory lock on the run directory (two runs on one directory are refused)."""

    def __init__(self, path: Path):
        self.path = path / LOCK
        self.handle = None

    def __enter__(self) -> "RunLock":
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "unknown"
            self.handle.close()
            raise RunDirError(f"another run (pid {holder}) is using '{self.path.parent}'; "
                              "wait for it or choose another train.output_dir") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(str(os.getpid()))
        self.handle.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.handle:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / CHECKPOINTS / f"step-{step:08d}"


# keys a resumed run may change without a flag: they steer the run (how long, how often it logs,
# saves, evaluates) but not what one step computes. train.max_steps changes a decaying LR schedule
# from the resume point on; that is the documented way to extend a run (a warning says so).
RUN_CONTROL_KEYS = ("train.output_dir", "train.overwrite_output_dir", "train.allow_recipe_change",
                    "train.max_steps", "train.log_every", "train.save_every", "train.keep_last",
                    "train.eval_every", "train.num_workers", "eval.")


def recipe_differences(old_yaml: str, new_yaml: str) -> list[str]:
    """Dotted keys whose values differ between two saved recipes (recipe.yaml texts)."""
    from omegaconf import OmegaConf

    def flat(node, prefix=""):
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                out.update(flat(value, f"{prefix}{key}."))
            return out or {prefix[:-1]: {}}
        return {prefix[:-1]: node}

    old, new = (flat(OmegaConf.to_container(OmegaConf.create(t), resolve=False) or {})
                for t in (old_yaml, new_yaml))
    return sorted(k for k in old.keys() | new.keys() if old.get(k, "<absent>") != new.get(k, "<absent>"))


def check_resumed_recipe(recipe_file: Path, new_yaml: str, allow_change: bool) -> list[str]:
    """Refuse to resume a run with a recipe that trains something else than its checkpoints (the
    checkpoint would silently win over e.g. a new model.name_or_path). Returns the changed keys."""
    if not recipe_file.is_file():
        return []
    changed = recipe_differences(recipe_file.read_text(encoding="utf-8"), new_yaml)
    blocking = [k for k in changed if not any(k == c or (c.endswith(".") and k.startswith(c))
                                              for c in RUN_CONTROL_KEYS)]
    if blocking and not allow_change:
        raise RunDirError(
            f"--resume: the recipe differs from the one this run started with ({recipe_file}) in "
            f"{', '.join(blocking)}. Resume with the original values, or set "
            "train.allow_recipe_change=true to continue the checkpoint with the new recipe.")
    return changed


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a folder without COMPLETE was interrupted: ignored)."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / COMPLETE).is_file()]
    return sorted(done, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder (step-00000042 -> 42)."""
    return int(path.name.split("-")[1])


def staging_dir(output_dir: Path, step: int) -> Path:
    return output_dir / CHECKPOINTS / f".partial-step-{step:08d}"


def publish_checkpoint(staging: Path, final: Path, state: dict, keep_last: int) -> None:
    """Main process: mark the staged checkpoint complete, move it in place, then rotate old ones."""
    (staging / "trainer_state.json").write_text(json.dumps(state, indent=2))
    (staging / COMPLETE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    if final.exists():  # a checkpoint of the same step from an earlier, resumed attempt
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(final.parent)
    for old in complete_checkpoints(final.parent.parent)[:-max(keep_last, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in final.parent.glob(".partial-step-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def git_commit() -> str:
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_info(world_size: int) -> dict:
    """What produced a run: versions, code commit, command, processes."""
    import accelerate
    import torch
    import transformers

    import common

    return {
        "twotower": common.__version__, "git_commit": git_commit(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "accelerate": accelerate.__version__, "python": platform.python_version(),
        "command": " ".join(sys.argv), "world_size": world_size,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
