"""Where a fine-tuning stage's data lives: the folder `data.path` names, exactly the files the
recipe names in it (or an error naming the key, the file and the data root searched), and the
target corpus of the kinds that read either layout (MS MARCO collection or BEIR corpus.jsonl).
The pool readers (finetune/sources.py, pseudo.py, sentence_queries.py) all start here."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from twotower.common import data as D
from twotower.common.data.resolve import resolve_data_folder
from twotower.finetune.args import DataArgs


def _file(root: Path, name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else root / path


def named(data: DataArgs, key: str) -> str:
    """data.<key> when the recipe names it (a value other than the default), else ""."""
    value = getattr(data, key)
    return value if value != getattr(DataArgs(), key) else ""


def required_files(data: DataArgs) -> Dict[str, str]:
    """{recipe key: file} that data.path must hold for data.kind: every file an msmarco recipe
    reads; the queries a pseudo recipe names (pseudo and sentences read either layout: an MS
    MARCO folder when it holds data.collection, else a BEIR folder)."""
    if data.kind == "msmarco":
        return {"data.collection": data.collection, "data.queries": data.queries,
                "data.qrels": data.qrels, "data.hard_negatives": data.hard_negatives}
    if data.kind == "pseudo":
        return {"data.queries": named(data, "queries")}
    return {}


def data_root(data: DataArgs) -> Path:
    """The folder data.path names, holding every file the recipe names (required_files), or a
    DataNotFoundError naming the key, the file and the data root searched; BEIR's zip is
    downloaded only when it can hold them (twotower.common.data.resolve_data_folder)."""
    return resolve_data_folder(data.path, required_files(data))


def msmarco_collection(data: DataArgs) -> Optional[Path]:
    """data.collection inside data.path (or absolute) when that file exists — data.path is an
    MS MARCO folder — else None (a BEIR folder). For the kinds that read either layout."""
    collection = _file(data_root(data), data.collection)
    return collection if collection.is_file() else None


def load_target_corpus(data: DataArgs, read: Dict):
    """(corpus Dataset id/title/text, folder): an MS MARCO collection when data.path holds
    data.collection, else the BEIR corpus.jsonl."""
    root = data_root(data)
    collection = msmarco_collection(data)
    if collection is not None:
        return D.load_msmarco_collection(collection, **read), root
    corpus = next((root / n for n in ("corpus.jsonl", "corpus.jsonl.gz") if (root / n).is_file()),
                  None)
    if corpus is None:
        raise D.DataError(f"data.kind={data.kind}: no corpus.jsonl (BEIR) or {data.collection} "
                          "(MS MARCO) in the data folder", path=root)
    return D.load_corpus(corpus, **read), root


def data_file(data: DataArgs, name: str) -> Path:
    """A file named in the data section: absolute, inside data.path (msmarco folders), or
    anything twotower.common.data.resolve_data finds (a path or a name under $TWOTOWER_DATA)."""
    if data.kind in ("msmarco", "pseudo", "sentences") and data.path and not Path(name).is_absolute():
        try:  # the folder if it is here (or already downloaded); never a download for this look
            inside = D.resolve_data(data.path, download=False) / name
        except D.DataNotFoundError:
            inside = None
        if inside is not None and inside.exists():
            return inside
    return D.resolve_data(name)
