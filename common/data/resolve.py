"""Resolve a data name or path to local files.

Order: an existing path → ``$TWOTOWER_DATA/<name>`` → a download into the cache
(``$TWOTOWER_CACHE``, default ``~/.cache/twotower``): BEIR's zip for the public BEIR dataset names
(``scifact``, ``scifact/qrels/test.tsv``, ...), or a Hugging Face dataset repo for names written
``hf:owner/repo[/sub/path]``.  When nothing works, :class:`DataNotFoundError` lists every location
tried and says what to set.  A failed download is always reported, never hidden.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

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
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=repo_id, repo_type="dataset",
                                  cache_dir=str(dest_root), etag_timeout=DOWNLOAD_TIMEOUT_S))


def _not_found(name: str, tried: list[str], hint: str) -> DataNotFoundError:
    steps = "\n".join(f"  {i}. {t}" for i, t in enumerate(tried, 1))
    return DataNotFoundError(f"data {name!r} not found. Tried:\n{steps}\n{hint}",
                             reason="data not found")


def resolve_data(name_or_path: str | os.PathLike, *, download: bool = True) -> Path:
    """Return a local path for ``name_or_path`` (see the module docstring for the order)."""
    name = str(name_or_path)
    if name.startswith(HF_PREFIX):
        return _resolve_hf(name[len(HF_PREFIX):], download)
    path = Path(name).expanduser()
    if path.exists():
        return path
    where = "" if path.is_absolute() else f" (relative to {os.getcwd()})"
    tried = [f"path {str(path)!r}{where}: does not exist"]
    shown = f"{name}/" if len(path.parts) == 1 and not path.suffix else name
    hint = f"Set {DATA_ENV} to a folder containing {shown}, or pass a path."
    if path.is_absolute():
        raise _not_found(name, tried, "Pass an existing path.")
    root = os.environ.get(DATA_ENV)
    if root:
        candidate = Path(root).expanduser() / path
        if candidate.exists():
            return candidate
        tried.append(f"${DATA_ENV}/{name} = {str(candidate)!r}: does not exist")
    else:
        tried.append(f"${DATA_ENV}/{name}: {DATA_ENV} is not set")
    dataset, rest = path.parts[0], path.parts[1:]
    if dataset not in BEIR_DATASETS:
        tried.append(f"download: {dataset!r} is not a known BEIR dataset name")
        raise _not_found(name, tried, hint)
    beir_root = cache_root() / "beir"
    local = beir_root / dataset
    if not local.is_dir():
        url = BEIR_URL.format(name=dataset)
        if not download:
            tried.append(f"download {url}: downloads are disabled (download=False)")
            raise _not_found(name, tried, hint)
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
