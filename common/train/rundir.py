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
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import accelerate
import torch
import transformers
from omegaconf import OmegaConf
from safetensors.torch import load_file

from twotower.common import __version__

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
LOCK = ".lock"

log = logging.getLogger("twotower.train")


class RunDirError(RuntimeError):
    """The output directory cannot be used as asked; the message names the flag that fixes it."""


# what a run writes into its folder (and nothing else): train.overwrite_output_dir deletes a folder
# only when it holds these alone. finetune/run.py adds stages/, pretrain/ and result.json.
RUN_OUTPUTS = frozenset({"recipe.yaml", "run_info.json", CHECKPOINTS, "logs", "metrics.json",
                         "eval", "model", "model.partial", "model.old", "stages", "pretrain",
                         "result.json", LOCK})
RUN_MARKERS = ("run_info.json", "recipe.yaml")  # written first, under the lock


def foreign_entries(path: Path) -> list[Path]:
    """What in `path` no run writes (temporary `*.tmp` files of write_atomic are a run's)."""
    return [p for p in sorted(path.iterdir())
            if p.name not in RUN_OUTPUTS and not p.name.endswith(".tmp")]


def started(path: Path) -> bool:
    """The run in `path` got somewhere: a complete checkpoint or a final model."""
    return bool(complete_checkpoints(path)) or (path / "model").exists()


def claim_output_dir(path: Path, resume: bool, overwrite: bool) -> "RunLock":
    """Main process: take the run lock on `path` (created if needed), then decide under it whether
    the folder may be used; returns the held lock. Never deletes a live run (the lock is taken
    first) nor a folder that is not provably a twotower run folder (anything foreign is named)."""
    if path.is_dir() and not resume:  # read-only checks first: no lock file in a foreign folder
        foreign = foreign_entries(path)
        if foreign:
            raise RunDirError(
                f"output directory '{path}' holds '{foreign[0].name}', which no twotower run "
                f"writes{' (and %d more)' % (len(foreign) - 1) if len(foreign) > 1 else ''}: it "
                "is not a run folder and is left untouched. Set train.output_dir to a new folder.")
    path.mkdir(parents=True, exist_ok=True)
    lock = RunLock(path).acquire()
    try:
        _check_claimed(path, resume, overwrite)
    except BaseException:
        lock.release()
        raise
    return lock


def _check_claimed(path: Path, resume: bool, overwrite: bool) -> None:
    output = [p for p in path.iterdir() if p.name != LOCK]
    if resume or not output:
        return
    if overwrite:
        if not any((path / m).is_file() for m in RUN_MARKERS):
            raise RunDirError(f"train.overwrite_output_dir=true: '{path}' has no "
                              f"{' or '.join(RUN_MARKERS)}, so it is not provably a twotower run "
                              "folder; it is left untouched. Remove it yourself or choose "
                              "another train.output_dir.")
        log.warning("train.overwrite_output_dir=true: deleting the run in %s", path)
    elif started(path):
        raise RunDirError(
            f"output directory '{path}' already holds a run. Pass --resume to continue it, "
            "set train.output_dir to a new folder, or train.overwrite_output_dir=true to "
            "delete it and start again.")
    else:  # an attempt that failed before its first checkpoint: nothing of it to keep
        log.warning("%s holds a run that stopped before its first checkpoint; starting it afresh",
                    path)
    for entry in output:
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


class RunLock:
    """An exclusive advisory lock on the run directory (two runs on one directory are refused).
    `acquire()` takes it; as a context manager it is taken on entry (if not held) and released
    on exit."""

    def __init__(self, path: Path):
        self.path = path / LOCK
        self.handle = None

    def acquire(self) -> "RunLock":
        if self.handle:
            return self
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunDirError(f"another run (pid {holder}) is using '{self.path.parent}'; "
                              "wait for it or choose another train.output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / CHECKPOINTS / f"step-{step:08d}"


# keys a resumed run may change without a flag: they steer the run (how long, how often it logs,
# saves, evaluates) but not what one step computes. train.max_steps changes a decaying LR schedule
# from the resume point on; that is the documented way to extend a run (a warning says so).
RUN_CONTROL_KEYS = ("train.output_dir", "train.overwrite_output_dir", "train.allow_recipe_change",
                    "train.max_steps", "train.log_every", "train.save_every", "train.keep_last",
                    "train.eval_every", "train.num_workers", "train.log_with", "eval.")


def recipe_differences(old_yaml: str, new_yaml: str) -> list[str]:
    """Dotted keys whose values differ between two saved recipes (recipe.yaml texts)."""
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


class CheckpointError(RuntimeError):
    """No complete checkpoint of a run can be read; the message names the damaged files."""


def damaged_file(checkpoint: Path) -> str | None:
    """'<file>: <reason>' for the first file of `checkpoint` that cannot be read whole (a copy cut
    short, a disk error), None if every file loads. Reads each file once: safetensors, torch
    pickles (optimizer, scheduler, RNG and custom states) and JSON."""
    for path in sorted(checkpoint.iterdir()):
        try:
            if path.suffix == ".safetensors":
                load_file(str(path))
            elif path.suffix in (".bin", ".pkl", ".pt"):
                torch.load(path, map_location="cpu", weights_only=False)
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
        except Exception as exc:  # noqa: BLE001 -- any failure to read is damage, named
            return f"{path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


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
    return {
        "twotower": __version__, "git_commit": git_commit(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "accelerate": accelerate.__version__, "python": platform.python_version(),
        "command": " ".join(sys.argv), "world_size": world_size,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def save_encoder_atomically(encoder, path: Path) -> None:
    """Write into a sibling folder, then swap it in: a crash never leaves half a model."""
    replace_folder_atomically(path, encoder.save)


def replace_folder_atomically(path: Path, fill: Callable[[Path], object]) -> None:
    """``fill(partial)`` writes a new folder beside `path`, which then replaces `path` by renames:
    a crash while filling leaves the previous `path` whole (and the partial folder, removed by the
    next attempt); the old copy is deleted only after the new one is in place."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    fill(partial)
    if path.exists():
        old = path.with_name(path.name + ".old")
        os.replace(path, old)
        os.replace(partial, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, path)
