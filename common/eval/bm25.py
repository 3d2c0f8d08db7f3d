"""BM25 baseline with bm25s (Lù 2024, "BM25S: Orders of magnitude faster lexical search via eager
sparse scoring", arXiv:2407.03618).

BM25 variants as in Kamphuis et al. 2020, "Which BM25 do you mean? A large-scale reproducibility
study of scoring variants" (ECIR). Reference setting (the one behind the SciFact figure in the
data README): bm25s' Lucene variant (idf = ln(1 + (N - df + 0.5) / (df + 0.5)); term weight
tf / (tf + k1 * (1 - b + b * |d| / avgdl)), no (k1 + 1) factor), k1 = 1.5, b = 0.75,
lower-casing, bm25s' default token pattern (words of 2+ word characters), bm25s' English
stopword list and the Snowball English stemmer (PyStemmer). A document's text is
title + " " + text, as for the dense encoders.

Documents that share no term with the query score 0 and are not returned (a Lucene index would
not match them either; for bm25l / bm25+ too, whose scores include a constant for the query's
terms a document lacks); a query left without terms after stopwording returns nothing. Queries
are scored by common/eval/bm25_topk.py a block of documents at a time, on bm25s' own index and
sums (per query, time grows with the query's postings; bm25s' own retrieve allocates and ranks
every document of the collection for each query).

A corpus that is a cached datasets table (what every reader returns) gets its index built once,
a block of documents at a time (memory holds one block: common/eval/bm25_build.py), and saved
beside the table (bm25s' own files, in a folder named by
the table's fingerprint, the settings and bm25s' version, renamed into place when complete);
every later index of that table, in any process or run, loads it memory-mapped, with the ids
read through the on-disk id index (common/data/ids.py), so N processes do not hold N indexes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Sequence

import bm25s
import numpy as np
import Stemmer

from twotower.common.data.ids import IdIndex
from twotower.common.data.io import publish_folder
from twotower.common.data.progress import progress_bar
from twotower.common.eval.bm25_build import write_index
from twotower.common.eval.bm25_topk import PostingScorer, check_ascending

Run = Dict[str, Dict[str, float]]
INDEX_VERSION = 1  # bump when what a saved index holds changes
_BLOCK = 50_000  # documents tokenised per step while building from a table
_COMPLETE = "twotower_bm25.json"  # written last: a folder without it is not an index


@dataclass
class BM25Args:
    k1: float = 1.5
    b: float = 0.75
    method: str = "lucene"  # bm25s variants: robertson, atire, bm25l, bm25+, lucene
    stemmer_language: str = "english"  # PyStemmer (Snowball) language; "" = no stemming
    stopwords: str = "en"  # bm25s stopword list name; "" = keep stopwords


def doc_text(doc: Mapping[str, str]) -> str:
    # the convention of twotower.common.model.encoder.doc_text, not imported from there: that pulls in torch
    return (str(doc.get("title") or "") + " " + str(doc.get("text") or "")).strip()


def _rows(table, fields: Sequence[str], what: str) -> List[dict]:
    """Rows of a datasets.Dataset or a list of dicts, checking the needed fields."""
    rows = table.to_list() if hasattr(table, "to_list") else list(table)
    for i, row in enumerate(rows):
        missing = [f for f in fields if f not in row]
        if missing:
            raise KeyError(f"{what} row {i} has no field(s) {missing} (has {sorted(row)})")
    return rows


class BM25Index:
    """A bm25s index over a corpus, searchable and able to score given candidates."""

    def __init__(self, corpus: Iterable[Mapping[str, str]], args: BM25Args | None = None,
                 progress: bool = True):
        """progress: tokenising, indexing and every search show progress (common/data/progress.py).
        A cached datasets table is indexed once and the index saved beside it (module docstring)."""
        self.args, self.progress = args or BM25Args(), progress
        language = self.args.stemmer_language
        self._stemmer = Stemmer.Stemmer(language) if language else None
        self.path = None
        if getattr(corpus, "cache_files", None):
            for field in ("id", "text"):
                if field not in corpus.column_names:
                    raise KeyError(f"corpus has no field {field!r} (has {corpus.column_names})")
            index = IdIndex(corpus)
            if not len(index):
                raise ValueError("BM25 needs a non-empty corpus")
            self.doc_ids, self.row_of = index.ids, index
            self.path = self._saved_path(corpus)
            self.retriever = self._load() or self._build_saved(corpus)
            self.scorer = PostingScorer(self.retriever.scores, self.retriever.nonoccurrence_array)
            return
        rows = _rows(corpus, ("id",), "corpus")
        self.doc_ids = [str(r["id"]) for r in rows]
        if not self.doc_ids:
            raise ValueError("BM25 needs a non-empty corpus")
        self.row_of = {d: i for i, d in enumerate(self.doc_ids)}
        tokens = self._tokenize([doc_text(r) for r in rows])
        self.retriever = bm25s.BM25(k1=self.args.k1, b=self.args.b, method=self.args.method)
        self.retriever.index(tokens, show_progress=progress)
        if not check_ascending(self.retriever.scores):  # bm25s builds them so; the scorer needs it
            raise RuntimeError(f"bm25s {bm25s.__version__} built postings out of document order")
        self.scorer = PostingScorer(self.retriever.scores, self.retriever.nonoccurrence_array)

    # ------------------------------------------------------------------ saved indexes
    def _saved_path(self, table) -> Path:
        key = hashlib.sha256(json.dumps({
            "v": INDEX_VERSION, "table": table._fingerprint, "args": asdict(self.args),
            "bm25s": bm25s.__version__}, sort_keys=True).encode()).hexdigest()[:32]
        return Path(table.cache_files[0]["filename"]).parent / f"twotower-bm25-{key}"

    def _complete(self, path: Path) -> bool:
        try:
            done = json.loads((path / _COMPLETE).read_text())
        except (OSError, ValueError):
            return False
        return done.get("documents") == len(self.doc_ids)

    def _load(self):
        """The saved index, memory-mapped; None when absent or incomplete (then built)."""
        if not self._complete(self.path):
            return None
        return bm25s.BM25.load(str(self.path), mmap=True, show_progress=False)

    def _build_saved(self, table):
        """Tokenise and index the table a block at a time (bm25_build.write_index: memory holds
        one block, not the corpus), save to a temporary folder and rename it into place
        (io.publish_folder: a complete copy another process saved first is kept, never removed
        under its reader), then load the saved copy memory-mapped."""
        tmp = self.path.with_name(f"{self.path.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        retriever = bm25s.BM25(k1=self.args.k1, b=self.args.b, method=self.args.method)
        write_index(self._token_blocks(table), retriever, tmp,
                    tmp.with_name(f"{tmp.name}.scratch"))
        (tmp / _COMPLETE).write_text(json.dumps({"documents": len(self.doc_ids),
                                                 "args": asdict(self.args)}))
        publish_folder(tmp, self.path, self._complete)  # another process's copy is kept
        loaded = self._load()
        if loaded is None:  # cannot happen unless the disk lies: fail loudly
            raise OSError(f"{self.path}: the BM25 index just written does not read back")
        return loaded

    def _token_blocks(self, table) -> Iterator[List[List[str]]]:
        has_title = "title" in table.column_names
        bar = progress_bar(len(table), "BM25 index", "doc", self.progress)
        for start in range(0, len(table), _BLOCK):
            block = table[start:start + _BLOCK]
            titles = block["title"] if has_title else [""] * len(block["text"])
            texts = [doc_text({"title": t, "text": x}) for t, x in zip(titles, block["text"])]
            yield self._tokenize(texts, progress=False)
            bar.update(len(texts))
        bar.close()

    def _tokenize(self, texts: List[str], progress: bool = True) -> List[List[str]]:
        return bm25s.tokenize(
            texts,
            stopwords=self.args.stopwords or None,
            stemmer=self._stemmer,
            return_ids=False,
            show_progress=progress and self.progress and len(texts) > 1000,
        )

    def search(self, query_ids: Sequence[str], query_texts: Sequence[str], k: int = 1000) -> Run:
        k = min(k, len(self.doc_ids))
        run: Run = {}
        bar = progress_bar(len(query_ids), "BM25 search", "query", self.progress)
        for qid, tokens in zip(query_ids, self._tokenize(list(query_texts))):
            bar.update(1)
            run[str(qid)] = {}
            if not tokens:
                continue
            rows, scores = self.scorer.top_k(self.retriever.get_tokens_ids(tokens), k)
            run[str(qid)] = {self.doc_ids[j]: float(s) for j, s in zip(rows, scores) if s > 0}
        bar.close()
        return run

    def score_candidates(
        self,
        query_ids: Sequence[str],
        query_texts: Sequence[str],
        candidates: Mapping[str, Iterable[str]],
    ) -> Run:
        """BM25 score of each candidate document (all of them, zeros included) of each query."""
        run: Run = {}
        bar = progress_bar(len(query_ids), "BM25 scores", "query", self.progress)
        for qid, tokens in zip(query_ids, self._tokenize(list(query_texts))):
            bar.update(1)
            qid = str(qid)
            if qid not in candidates:
                continue
            cand = list(candidates[qid])
            missing = [d for d in cand if d not in self.row_of]
            if missing:
                raise KeyError(
                    f"candidate run query '{qid}': document '{missing[0]}' is not in the corpus "
                    f"({len(missing)} missing)"
                )
            scores = self.scorer.scores_at(self.retriever.get_tokens_ids(tokens),
                                           np.array([self.row_of[d] for d in cand], dtype=np.int64))
            run[qid] = {d: float(s) for d, s in zip(cand, scores)}
        bar.close()
        return run


def bm25_search(corpus, queries, k: int = 1000, args: BM25Args | None = None) -> Run:
    """Top-k BM25 run {qid: {docid: score}} for `queries` (rows with id, text) over `corpus`
    (rows with id, title, text), each a datasets.Dataset or a list of dicts."""
    index = BM25Index(corpus, args)
    rows = _rows(queries, ("id", "text"), "queries")
    return index.search([r["id"] for r in rows], [r["text"] for r in rows], k)
