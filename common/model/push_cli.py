"""`twotower push MODEL_DIR REPO_ID`: upload a saved model folder to the Hugging Face Hub.

    twotower push runs/fewshot_scifact/model me/twotower-scifact --private
    twotower push runs/fewshot_scifact/model me/twotower-scifact --dry-run

as sentence-transformers' `push_to_hub` does: the repo is created if missing (and the branch, with
`--revision`), then the model's files go up in one upload: the model card (README.md), weights,
tokenizer, the sentence-transformers modules, doc_tower/ and onnx/ where the folder has them.
Hidden entries (`.partial-*` folders left by an interrupted export, `.lock`), `*.tmp` files and a
`checkpoints/` folder are no part of the model and stay behind. `--dry-run` lists the files and
uploads nothing; a failed upload exits non-zero naming the repo.
"""
from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path
from typing import Sequence

from huggingface_hub import HfApi
from huggingface_hub.errors import OfflineModeIsEnabled

from twotower.common.model.encoder import SETTINGS_FILE
from twotower.common.model.export import DOC_TOWER_DIR

WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
           "pytorch_model.bin.index.json")
CARD = "README.md"
NOT_MODEL = frozenset({"checkpoints", "__pycache__"})  # folders that are no part of a model
DEFAULT_MESSAGE = "Upload twotower model"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="twotower push", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a saved model folder (a run's model/)")
    p.add_argument("repo_id", metavar="REPO_ID", help="the hub repo, e.g. user/name")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", metavar="BRANCH", help="push to this branch (created if missing)")
    p.add_argument("--commit-message", default=DEFAULT_MESSAGE, metavar="MSG")
    p.add_argument("--token", help="hub token (default: HF_TOKEN or the saved login)")
    p.add_argument("--dry-run", action="store_true", help="list the files; upload nothing")
    return p


def missing_parts(folder: Path) -> list[str]:
    """What a saved twotower model folder should hold and `folder` does not (empty: a model)."""
    if not folder.is_dir():
        return ["the folder itself"]
    missing = [name for name in ("config.json", "modules.json", SETTINGS_FILE)
               if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in WEIGHTS):
        missing.append(f"model weights ({' or '.join(WEIGHTS[::2])})")
    if not (folder / CARD).is_file():
        missing.append(f"{CARD} (the model card a training run writes)")
    settings = folder / SETTINGS_FILE
    try:
        shared = (not settings.is_file()
                  or json.loads(settings.read_text()).get("shared_tower", True))
    except ValueError:
        return [*missing, f"a readable {SETTINGS_FILE}"]
    if not shared:
        tower = folder / DOC_TOWER_DIR
        if not ((tower / "config.json").is_file() and any((tower / n).is_file() for n in WEIGHTS)):
            missing.append(f"{DOC_TOWER_DIR}/ with config.json and weights (separate towers)")
    return missing


def model_files(folder: Path) -> list[str]:
    """The files of the model in `folder`, relative POSIX paths, sorted."""
    files = []
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if any(p.startswith(".") for p in parts) or parts[0] in NOT_MODEL or "__pycache__" in parts:
            continue
        if path.is_file() and not path.name.endswith(".tmp"):
            files.append("/".join(parts))
    return files


def human(size: float) -> str:
    unit = "B"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            break
        size /= 1024
    return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    folder = Path(ns.model_dir).expanduser()
    missing = missing_parts(folder)
    if missing:
        hint = (f"; did you mean {folder / 'model'}?" if (folder / "model").is_dir() else "")
        parser.error(f"{folder} is not a saved twotower model folder: no {', no '.join(missing)}"
                     + hint)
    files = model_files(folder)
    sizes = {f: (folder / f).stat().st_size for f in files}
    listing = "\n".join(f"  {f}  {human(sizes[f])}" for f in files)
    total = f"{len(files)} files, {human(sum(sizes.values()))}"
    where = ns.repo_id + (f" (branch {ns.revision})" if ns.revision else "")
    if ns.dry_run:
        print(f"dry run: would upload {total} from {folder} to {where}:\n{listing}")
        return 0
    api = HfApi(token=ns.token)
    step = "creating the repo"
    try:
        repo_url = api.create_repo(ns.repo_id, private=ns.private, exist_ok=True,
                                   repo_type="model")
        if ns.revision:
            step = f"creating branch {ns.revision}"
            api.create_branch(ns.repo_id, branch=ns.revision, exist_ok=True, repo_type="model")
        step = f"uploading {total}"
        commit = api.upload_folder(
            repo_id=ns.repo_id, folder_path=str(folder), repo_type="model",
            revision=ns.revision, commit_message=ns.commit_message,
            allow_patterns=[glob.escape(f) for f in files])  # exactly these, nothing else
    except OfflineModeIsEnabled as err:
        parser.exit(1, f"error: cannot push to {ns.repo_id}: huggingface_hub's offline mode is "
                    f"on (HF_HUB_OFFLINE=1), so the Hub cannot be reached ({err}). Unset "
                    "HF_HUB_OFFLINE where there is internet, or pass --dry-run to list the files\n")
    except (OSError, ValueError) as err:  # HfHubHTTPError: OSError; HFValidationError: ValueError
        parser.exit(1, f"error: pushing {folder} to {where} failed while {step}: "
                    f"{type(err).__name__}: {err}\n")
    print(f"pushed {total} from {folder} to {repo_url}\n{listing}\n"
          f"commit {commit.oid}: {commit.commit_url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
