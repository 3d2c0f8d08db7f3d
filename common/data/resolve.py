"""Resolve a data name or path to local files.

Order: an existing path → ``$TWOTOWER_DATA/<name>`` → a download into the cache
(``$TWOTOWER_CACHE``, default ``~/.cache/twotower``): BEIR's zip for the public BEIR dataset names
(``scifact``, ``scifact/qrels/test.tsv``, ...), or a Hugging Face dataset repo for names written
``hf:owner/repo[/sub/path]``.  When nothing works, :class:`DataNotFoundError` lists every location
tried and says what to set.  A failed download is always reported, never hidden, and a download
is logged as a warning before it starts.

A recipe that names files inside a data folder goes through :func:`resolve_data_folder`: it gets
exactly those files or an error naming the recipe key, the file and the data root searched.  A
BEIR zip is downloaded only when it can hold every named file (BEIR's zips hold ``corpus.jsonl``,
``queries.jsonl`` and ``qrels/<split>.tsv``): ``msmarco`` with ``queries.train.tsv`` is an error,
never a silent download of BEIR's ``msmarco`` with its own queries.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Mapping

from huggingface_hub import snapshot_download

from .errors import DataError, DataNotFoundError

DATA_ENV = "TWOTOWER_DATA"
CACHE_ENV = "TWOTOWER_CACHE"
BEIR_URL = "https://public.ukp.informatik.uni-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
# Datasets BEIR publishes as zips (bioasq, signal1m, trec-news, robust04 need licences).
BEIR_DATASETS = frozenset({
    "msmarco", "trec-covid", "nfcorpus", "nq", "hotpotqa", "fiqa", "arguana",
    "webis-touche2020", "cqadupstack", "quora", "dbpedia-entity", "scidocs", "fever",
    "climate-fever", "scifact",
})
# Seconds a socket may stay silent before a download is abandoned (connect and each read).
DOWNLOAD_TIMEOUT_S = 20.0
HF_PREFIX = "hf:"
# the files and folders of a BEIR zip (cqadupstack adds one folder per forum around them)
BEIR_FILES = ("corpus.jsonl", "queries.jsonl")
BEIR_QRELS = "qrels"
log = logging.getLogger("twotower.common.data")


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "twotower").expanduser()


def _download_beir(name: str, dest_root: Path) -> Path:
    """Download and unzip BEIR's ``<name>.zip`` into ``dest_root/<name>`` (atomically).

    Not ``beir.util.download_and_unzip``: its ``requests.get`` has no timeout and no HTTP status
    check, and a partial zip left on disk is reused by the next call.
    """
    url = BEIR_URL.format(name=name)
    dest_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_root, prefix=f".{name}.download.") as tmp:
        zip_path = Path(tmp) / f"{name}.zip"
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, \
                open(zip_path, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(Path(tmp) / "unzipped")
        extracted = Path(tmp) / "unzipped" / name
        if not extracted.is_dir():
            raise DataError(f"the archive from {url} has no top-level folder {name}/",
                            reason="bad archive")
        target = dest_root / name
        try:
            os.replace(extracted, target)
        except OSError:
            if not target.is_dir():  # another process finishing first is fine
                raise
    return dest_root / name


def _download_hf(repo_id: str, dest_root: Path) -> Path:
    """Snapshot of a Hugging Face *dataset* repo (network timeouts from huggingface_hub)."""
    return Path(snapshot_download(repo_id=repo_id, repo_type="dataset",
                                  cache_dir=str(dest_root), etag_timeout=DOWNLOAD_TIMEOUT_S))


def _not_found(name: str, tried: list[str], hint: str) -> DataNotFoundError:
    steps = "\n".join(f"  {i}. {t}" for i, t in enumerate(tried, 1))
    return DataNotFoundError(f"data {name!r} not found. Tried:\n{steps}\n{hint}",
                             reason="data not found")


def _local(name: str) -> tuple[Path | None, list[str], str]:
    """(the existing path or ``$TWOTOWER_DATA/<name>``, or None; the locations tried; the hint)."""
    path = Path(name).expanduser()
    if path.exists():
        return path, [], ""
    where = "" if path.is_absolute() else f" (relative to {os.getcwd()})"
    tried = [f"path {str(path)!r}{where}: does not exist"]
    shown = f"{name}/" if len(path.parts) == 1 and not path.suffix else name
    hint = f"Set {DATA_ENV} to a folder containing {shown}, or pass a path."
    if path.is_absolute():
        return None, tried, "Pass an existing path."
    root = os.environ.get(DATA_ENV)
    if root:
        candidate = Path(root).expanduser() / path
        if candidate.exists():
            return candidate, [], ""
        tried.append(f"${DATA_ENV}/{name} = {str(candidate)!r}: does not exist")
    else:
        tried.append(f"${DATA_ENV}/{name}: {DATA_ENV} is not set")
    return None, tried, hint


def beir_may_hold(parts: tuple[str, ...]) -> bool:
    """Whether a path inside a BEIR dataset folder can be part of BEIR's zip: the folder itself,
    a sub-folder, corpus.jsonl, queries.jsonl or a file under qrels/."""
    if not parts or not Path(parts[-1]).suffix:
        return True
    return parts[-1] in BEIR_FILES or BEIR_QRELS in parts[:-1]


def resolve_data(name_or_path: str | os.PathLike, *, download: bool = True) -> Path:
    """Return a local path for ``name_or_path`` (see the module docstring for the order)."""
    name = str(name_or_path)
    if name.startswith(HF_PREFIX):
        return _resolve_hf(name[len(HF_PREFIX):], download)
    local, tried, hint = _local(name)
    if local is not None:
        return local
    path = Path(name).expanduser()
    if path.is_absolute():
        raise _not_found(name, tried, hint)
    dataset, rest = path.parts[0], path.parts[1:]
    if dataset not in BEIR_DATASETS:
        tried.append(f"download: {dataset!r} is not a known BEIR dataset name")
        raise _not_found(name, tried, hint)
    if not beir_may_hold(rest):
        tried.append(f"download: BEIR's {dataset}.zip holds corpus.jsonl, queries.jsonl and "
                     f"qrels/<split>.tsv, not {'/'.join(rest)}; not downloaded")
        raise _not_found(name, tried, hint)
    beir_root = cache_root() / "beir"
    local = beir_root / dataset
    if not local.is_dir():
        url = BEIR_URL.format(name=dataset)
        if not download:
            tried.append(f"download {url}: downloads are disabled (download=False)")
            raise _not_found(name, tried, hint)
        log.warning("data %r: not found locally (%s); downloading BEIR's %s from %s into %s",
                    name, "; ".join(tried), dataset, url, beir_root)
        try:
            local = _download_beir(dataset, beir_root)
        except Exception as e:  # any network/zip failure: report it, with what was tried
            tried.append(f"download {url} into {str(beir_root)!r}: failed "
                         f"({type(e).__name__}: {e})")
            raise _not_found(name, tried, hint) from e
    target = local.joinpath(*rest)
    if not target.exists():
        tried.append(f"downloaded BEIR copy {str(target)!r}: does not exist")
        raise _not_found(name, tried, hint)
    return target


def resolve_data_folder(name: str | os.PathLike, files: Mapping[str, str], *,
                        download: bool = True) -> Path:
    """The data folder ``name`` (resolved as :func:`resolve_data` does) holding every file of
    ``files`` ({recipe key: file name inside the folder, or an absolute path}; empty names are
    not needed). A missing file is a :class:`DataNotFoundError` naming its key, the file and the
    data root searched. When the folder is not local, BEIR's zip is downloaded only if it can
    hold every named file; otherwise nothing is downloaded and the error says why."""
    name = str(name)
    named = {key: str(file) for key, file in files.items() if file}
    for key, file in named.items():
        if Path(file).is_absolute() and not Path(file).exists():
            raise DataNotFoundError(f"{key}={file!r}: the file does not exist", reason="data not found")
    inside = {key: file for key, file in named.items() if not Path(file).is_absolute()}
    root, tried, hint = _local(name)
    if root is None and not name.startswith(HF_PREFIX):
        path = Path(name).expanduser()
        unfit = {key: file for key, file in inside.items()
                 if not beir_may_hold(path.parts[1:] + Path(file).parts)}
        if unfit and not path.is_absolute() and path.parts[0] in BEIR_DATASETS:
            what = ", ".join(f"{key}={file!r}" for key, file in unfit.items())
            tried.append(f"download: BEIR's {path.parts[0]}.zip holds corpus.jsonl, "
                         f"queries.jsonl and qrels/<split>.tsv, not {what}; not downloaded")
            first = next(iter(unfit.values()))
            raise _not_found(name, tried, f"{what}: set {DATA_ENV} to a folder containing "
                             f"{Path(name) / first}, or pass a path.")
    if root is None:
        root = resolve_data(name, download=download)  # a download (logged), or the error
    for key, file in inside.items():
        if not (root / file).exists():
            raise DataNotFoundError(
                f"{key}={file!r} is not in the data folder {str(root)!r} (resolved from "
                f"{name!r}); name a file of that folder, or point the data path at a folder "
                "holding it", reason="data not found")
    return root


def _resolve_hf(spec: str, download: bool) -> Path:
    parts = spec.strip("/").split("/")
    if len(parts) < 2:
        raise DataError(f"expected 'hf:owner/repo[/path]', got {HF_PREFIX + spec!r}",
                        reason="bad data name")
    repo_id, rest = "/".join(parts[:2]), parts[2:]
    hf_root = cache_root() / "hf"
    tried = []
    hint = f"Download it elsewhere and set {DATA_ENV} to its folder, or pass a path."
    if not download:
        tried.append(f"Hugging Face dataset {repo_id!r}: downloads are disabled (download=False)")
        raise _not_found(HF_PREFIX + spec, tried, hint)
    try:
        local = _download_hf(repo_id, hf_root)
    except Exception as e:
        tried.append(f"Hugging Face dataset {repo_id!r} into {str(hf_root)!r}: failed "
                     f"({type(e).__name__}: {e})")
        raise _not_found(HF_PREFIX + spec, tried, hint) from e
    target = local.joinpath(*rest)
    if not target.exists():
        tried.append(f"Hugging Face snapshot {str(target)!r}: does not exist")
        raise _not_found(HF_PREFIX + spec, tried, hint)
    return target
